"""Balancing algorithms at unit level (lb.balance): distribution within 2% of the weight
share over 10,000 picks, leastconn spread, source stickiness and consistent hashing moving
about 1/N of the addresses, backup and maxconn handling through lb.server.BackendState."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter

import pytest

from lb.balance import ALGORITHMS, WEIGHT_SCALE, create_balancer
from lb.balance.source import full_hash
from lb.config.errors import Origin
from lb.config.keywords import BALANCE_ALGORITHMS
from lb.config.model import Backend, Options, Server
from lb.queue import PendingConnection
from lb.server import BackendState, QueueFull, ServerState

pytestmark = pytest.mark.timeout(60)

PICKS = 10_000


class FakeServer:
    def __init__(self, name: str, weight: int = 1, maxconn: int | None = None) -> None:
        self.name = name
        self.weight = weight
        self.active_connections = 0
        self.queued_connections = 0
        self.maxconn = maxconn

    @property
    def effective_weight(self) -> int:
        return self.weight * WEIGHT_SCALE

    def has_room(self) -> bool:
        return self.maxconn is None or self.active_connections < self.maxconn

    def accepts_queued(self) -> bool:
        return False


def balancer_with(algorithm: str, weights: list[int], hash_type: str = "map-based"):  # type: ignore[no-untyped-def]
    balancer = create_balancer(algorithm, hash_type)
    servers = [FakeServer(f"s{i}", w) for i, w in enumerate(weights)]
    for server in servers:
        balancer.add(server)
        balancer.set_up(server)
    return balancer, servers


def addresses(count: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.getrandbits(32).to_bytes(4, "big") for _ in range(count)]


def assert_shares(counts: Counter[str], weights: list[int], tolerance: float = 0.02) -> None:
    total = sum(counts.values())
    weight_total = sum(weights)
    for index, weight in enumerate(weights):
        share = counts.get(f"s{index}", 0) / total
        assert abs(share - weight / weight_total) <= tolerance, (index, share, counts)


def test_registry_names_match_the_config_keyword() -> None:
    assert set(BALANCE_ALGORITHMS) == set(ALGORITHMS)
    assert set(ALGORITHMS) == {"roundrobin", "static-rr", "leastconn", "source", "first", "hash"}


@pytest.mark.parametrize("algorithm", ["roundrobin", "static-rr"])
@pytest.mark.parametrize("weights", [[1, 1, 1], [3, 1, 1], [256, 1, 10, 0], [5, 7, 11, 13]])
def test_round_robin_shares_follow_weights(algorithm: str, weights: list[int]) -> None:
    balancer, _servers = balancer_with(algorithm, weights)
    counts: Counter[str] = Counter()
    for _ in range(PICKS):
        server = balancer.pick()
        assert server is not None
        counts[server.name] += 1
    assert_shares(counts, weights)
    if 0 in weights:
        assert counts[f"s{weights.index(0)}"] == 0


@pytest.mark.parametrize("weights", [[1, 1, 1], [3, 1, 1], [5, 7, 11, 13]])
def test_source_map_based_shares_follow_weights(weights: list[int]) -> None:
    balancer, _servers = balancer_with("source", weights)
    counts = Counter(balancer.pick(key).name for key in addresses(PICKS))  # type: ignore[union-attr]
    assert_shares(counts, weights)


def test_source_consistent_shares_are_close_to_weights() -> None:
    """Consistent hashing promises stability, not exact shares: within 5% here."""
    weights = [1, 1, 1, 2]
    balancer, _servers = balancer_with("source", weights, "consistent")
    counts = Counter(balancer.pick(key).name for key in addresses(PICKS))  # type: ignore[union-attr]
    assert_shares(counts, weights, tolerance=0.05)


@pytest.mark.parametrize("hash_type", ["map-based", "consistent"])
def test_source_is_sticky_while_servers_are_unchanged(hash_type: str) -> None:
    balancer, _servers = balancer_with("source", [1, 2, 3], hash_type)
    keys = addresses(2000)
    first = [balancer.pick(key) for key in keys]
    for _ in range(3):
        assert [balancer.pick(key) for key in keys] == first


def test_consistent_hashing_moves_about_one_nth_when_one_goes_down() -> None:
    count = 5
    balancer, servers = balancer_with("source", [1] * count, "consistent")
    keys = addresses(PICKS)
    before = {key: balancer.pick(key).name for key in keys}  # type: ignore[union-attr]
    balancer.set_down(servers[2])
    after = {key: balancer.pick(key).name for key in keys}  # type: ignore[union-attr]
    moved = [key for key in keys if before[key] != after[key]]
    # Only the addresses of the server that went down move, and they are about 1/N.
    assert all(before[key] == "s2" for key in moved)
    assert abs(len(moved) / PICKS - 1 / count) < 0.05, len(moved) / PICKS
    balancer.set_up(servers[2])
    assert {key: balancer.pick(key).name for key in keys} == before  # type: ignore[union-attr]


def test_map_based_moves_most_addresses_when_one_goes_down() -> None:
    balancer, servers = balancer_with("source", [1] * 5)
    keys = addresses(2000)
    before = {key: balancer.pick(key) for key in keys}
    balancer.set_down(servers[2])
    moved = sum(1 for key in keys if balancer.pick(key) is not before[key])
    assert moved / len(keys) > 0.5  # why `hash-type consistent` exists


def test_source_hash_is_haproxys() -> None:
    # get_server_sh on IPv4: the address as an integer, modulo the total weight.
    balancer, _servers = balancer_with("source", [1, 1, 1])
    ip = int(ipaddress.IPv4Address("192.0.2.10"))
    table = [balancer.pick((ip - ip % 3 + i).to_bytes(4, "big")).name for i in range(3)]  # type: ignore[union-attr]
    assert sorted(table) == ["s0", "s1", "s2"]
    assert len({full_hash(i) for i in range(1000)}) == 1000
    assert all(0 <= full_hash(i) <= 0xFFFFFFFF for i in (0, 1, 0xFFFFFFFF))


def test_leastconn_always_picks_a_least_loaded_server_ties_round_robin() -> None:
    balancer, servers = balancer_with("leastconn", [1, 1, 1, 1])
    rng = random.Random(3)
    live: list[FakeServer] = []
    order: list[str] = []
    for _ in range(PICKS):
        if live and rng.random() < 0.45:
            gone = live.pop(rng.randrange(len(live)))
            gone.active_connections -= 1
            continue
        lowest = min(s.active_connections for s in servers)
        server = balancer.pick()
        assert server is not None
        assert server.active_connections == lowest
        server.active_connections += 1
        live.append(server)
        if len(order) < 8:
            order.append(server.name)
    # From all-equal loads, picks go round robin.
    assert order[:4] == ["s0", "s1", "s2", "s3"]


def test_leastconn_spread_within_one_when_connections_only_arrive() -> None:
    balancer, servers = balancer_with("leastconn", [1, 1, 1])
    for _ in range(1000):
        server = balancer.pick()
        assert server is not None
        server.active_connections += 1
        loads = [s.active_connections for s in servers]
        assert max(loads) - min(loads) <= 1


def test_leastconn_follows_weights() -> None:
    balancer, servers = balancer_with("leastconn", [1, 3])
    for _ in range(400):
        server = balancer.pick()
        assert server is not None
        server.active_connections += 1
    assert [s.active_connections for s in servers] == [100, 300]


def test_first_fills_servers_in_order() -> None:
    balancer = create_balancer("first")
    servers = [FakeServer(f"s{i}", maxconn=2) for i in range(3)]
    for server in servers:
        balancer.add(server)
        balancer.set_up(server)
    picked = []
    for _ in range(6):
        server = balancer.pick()
        assert server is not None
        server.active_connections += 1
        picked.append(server.name)
    assert picked == ["s0", "s0", "s1", "s1", "s2", "s2"]
    assert balancer.pick() is None
    servers[1].active_connections -= 1
    assert balancer.pick() is servers[1]


def test_roundrobin_honours_runtime_weight_static_rr_does_not() -> None:
    for algorithm, expected in (("roundrobin", [0.75, 0.25]), ("static-rr", [0.5, 0.5])):
        balancer, servers = balancer_with(algorithm, [1, 1])
        servers[0].weight = 3
        balancer.set_weight(servers[0])
        counts = Counter(balancer.pick().name for _ in range(PICKS))  # type: ignore[union-attr]
        assert abs(counts["s0"] / PICKS - expected[0]) < 0.02, (algorithm, counts)
        servers[0].weight = 0  # 0 stops traffic for both kinds
        balancer.set_weight(servers[0])
        assert all(balancer.pick().name == "s1" for _ in range(50))  # type: ignore[union-attr]


# -- through BackendState: backups, maxconn, queues --------------------------------------------

ORIGIN = Origin("test.cfg", 1)


def server(name: str, **options: object) -> Server:
    return Server(ORIGIN, name, f"127.0.0.1:{1000}", "127.0.0.1", 1000, **options)  # type: ignore[arg-type]


def backend(*servers: Server, balance: str = "roundrobin", **options: object) -> BackendState:
    option = Options(**{k: v for k, v in options.items() if k in ("redispatch", "allbackups")})  # type: ignore[arg-type]
    config = Backend(ORIGIN, "be", servers=servers, balance=balance, option=option)
    return BackendState(config)


def take(state: BackendState, key: bytes = b"") -> ServerState:
    outcome = state.assign(key, frozenset(), lambda granted: None)
    assert isinstance(outcome, ServerState), outcome
    return outcome


def test_backup_only_when_no_active_server_and_first_backup_only() -> None:
    state = backend(server("a"), server("b1", backup=True), server("b2", backup=True))
    assert {take(state).name for _ in range(10)} == {"a"}
    state.set_up(state.server("a"), False)
    assert {take(state).name for _ in range(10)} == {"b1"}
    state = backend(
        server("a"), server("b1", backup=True), server("b2", backup=True), allbackups=True
    )
    state.set_up(state.server("a"), False)
    assert {take(state).name for _ in range(10)} == {"b1", "b2"}


def test_disabled_server_takes_nothing_and_no_server_is_none() -> None:
    state = backend(server("a", disabled=True), server("b"))
    assert {take(state).name for _ in range(10)} == {"b"}
    state.set_up(state.server("b"), False)
    assert state.assign(b"", frozenset(), lambda granted: None) is None


def test_maxconn_queues_in_the_backend_and_serves_in_order() -> None:
    state = backend(server("a", maxconn=2), server("b", maxconn=1))
    held = [take(state) for _ in range(3)]
    grants: list[tuple[int, str]] = []
    pendings = []
    for index in range(4):
        outcome = state.assign(
            b"", frozenset(), lambda granted, index=index: grants.append((index, granted.name))
        )
        assert isinstance(outcome, PendingConnection)
        pendings.append(outcome)
    assert state.queued == 4 and state.session_count == 7
    state.abandon(pendings[1])  # timeout queue of the second
    held[0].connection_ended(failed=False)
    held[2].connection_ended(failed=False)
    assert grants == [(0, held[0].name), (2, held[2].name)]
    assert pendings[0].backend_queue_position == 1
    assert pendings[2].backend_queue_position == 2  # one left the queue ahead of it
    assert pendings[1].backend_queue_position == 1


def test_hashed_server_queue_and_maxqueue() -> None:
    state = backend(server("a", maxconn=1, maxqueue=1), balance="source")
    take(state, b"\x01\x02\x03\x04")
    queued = state.assign(b"\x01\x02\x03\x04", frozenset(), lambda granted: None)
    assert isinstance(queued, PendingConnection) and queued.server is state.server("a")
    refused = state.assign(b"\x01\x02\x03\x04", frozenset(), lambda granted: None)
    assert isinstance(refused, QueueFull)


def test_full_maxqueue_redispatches_with_option_redispatch() -> None:
    state = backend(
        server("a", maxconn=1, maxqueue=1),
        server("b", maxconn=1, maxqueue=1),
        balance="source",
        redispatch=True,
    )
    key = b"\x0a\x00\x00\x01"
    first = take(state, key)
    state.assign(key, frozenset(), lambda granted: None)  # queued on the same server
    other = state.assign(key, frozenset(), lambda granted: None)
    assert isinstance(other, ServerState) and other is not first


def test_redispatch_rules() -> None:
    state = backend(server("a"), server("b"))
    a = state.server("a")
    assert state.redispatch_on_retry(a, 1, timed_out=False)  # refused: lb moves on
    assert not state.redispatch_on_retry(a, 1, timed_out=True)  # HAProxy: same server
    state = backend(server("a"), server("b"), redispatch=True)
    assert state.redispatch_on_retry(state.server("a"), 1, timed_out=True)
    hashed = backend(server("a"), server("b"), balance="source", redispatch=True)
    assert not hashed.redispatch_on_retry(hashed.server("a"), 1, timed_out=True)
    assert hashed.redispatch_on_retry(hashed.server("a"), 3, timed_out=True)  # last of 3
