"""``[cluster] partition_handling = "pause_minority"`` (broker.partition), over real
processes: three nodes behind lb, node-3 cut off from both others (its links suspended by the
admin API, as a network split between the brokers while lb still reaches them all).

node-1 is node-3's backup, node-3 is node-2's. With "ignore" (the default) node-3 keeps its
devices, node-1 takes node-3 for lost and publishes their wills although none disconnected,
and node-3, node-2's backup, publishes the wills of node-2's devices (held in its outboxes,
delivered at the heal): every device looks gone (bench/README "A partition"). Paused, node-3
closes its devices' connections and its listeners; they reconnect through lb to node-1 and
node-2 and find their sessions there (node-1's copies); their wills are published once, by
node-1 (true: their connections ended), and node-2's devices' wills not at all.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from broker.config import ConfigError, config_warnings, parse_config
from broker.mqtt import Connect, encode
from tests.cluster_harness import (
    V5,
    V311,
    ClusterNode,
    Device,
    running_cluster,
    running_lb,
    wait_for,
)
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(150)

PAUSE = 'partition_handling = "pause_minority"'


def _partition(node: ClusterNode) -> dict[str, Any]:
    status: dict[str, Any] = node.admin("/api/cluster")["partition"]
    return status


def _cut(node: ClusterNode, others: list[ClusterNode], how: str) -> None:
    """``node``'s links to ``others`` suspended (how="disconnect") or resumed ("connect")."""
    for other in others:
        node.admin(f"/api/cluster/peers/{other.name}/{how}", "POST")


def _accepts(node: ClusterNode) -> bool:
    """Does ``node``'s MQTT listener take a connection (a probe that connects and leaves)?"""
    probe = Device(f"probe-{time.monotonic_ns()}", V5, clean=True)
    try:
        probe.connect(node.mqtt_port, timeout=5)
    except (OSError, AssertionError):
        return False
    probe.stop()
    return True


@pytest.fixture
def devices(pki: TestPKI) -> Iterator[list[Device]]:
    """Nine devices (3.1.1 and 5.0) with persistent sessions subscribed to cmd/<id>, each
    with a will on status/<id>, not yet connected; stopped at the end."""
    certificates = pki.devices(9)
    made = [
        Device(
            f"dev-{index}",
            V5 if index % 2 else V311,
            certificates[index],
            pki.root,
            subscriptions=[(f"cmd/dev-{index}", 1)],
            will=(f"status/dev-{index}", f"dev-{index}-gone"),
        )
        for index in range(9)
    ]
    yield made
    for device in made:
        device.stop()


def test_a_node_cut_off_from_the_others_pauses_and_its_devices_move_with_their_sessions(
    pki: TestPKI, tmp_path: Any, devices: list[Device]
) -> None:
    with (
        running_cluster(pki, tmp_path, cluster=PAUSE) as nodes,
        running_lb(pki, tmp_path, nodes) as front,
    ):
        first, second, cut = nodes
        assert _partition(cut) == {
            "partition_handling": "pause_minority",
            "paused": False,
            "paused_seconds": None,
            "reaches": "3 of 3 nodes (node-1, node-2 and itself)",
            "pauses": 0,
            "clients_closed": 0,
        }
        watcher = Device("watcher", V5, subscriptions=[("status/#", 1)])
        watcher.connect(first.mqtt_port)
        watcher.subscribe([("status/#", 1)])
        for device in devices:
            device.connect(front)
            device.subscribe(device.subscriptions)
        on_cut = {device.client_id for device in devices if device.client_id in cut.clients()}
        on_second = {c for c in second.clients() if c.startswith("dev-")}
        assert on_cut and on_second, (on_cut, on_second)
        # Their wills copied to the backups (node-1 keeps node-3's, node-3 node-2's).
        wait_for(
            lambda: first.copied_wills("node-3") == len(on_cut),
            10,
            "node-3's wills on node-1",
        )
        wait_for(
            lambda: cut.copied_wills("node-2") == len(on_second),
            10,
            "node-2's wills on node-3",
        )

        # Two connections accepted before the pause, their CONNECT sent after it.
        late = [socket.create_connection(("127.0.0.1", cut.mqtt_port), timeout=5) for _ in "ab"]
        _cut(cut, [first, second], "disconnect")
        wait_for(lambda: _partition(cut)["paused"], 10, "node-3 paused")
        for sock, level, code in zip(late, (5, 4), (b"\x9c", b"\x03"), strict=True):
            sock.sendall(encode(Connect("MQTT", level, True, 30, f"late-{level}"), level))
            connack = sock.recv(64)
            assert connack[:1] == b"\x20" and connack[3:4] == code, connack  # refused
            assert sock.recv(64) == b""  # and closed
            sock.close()
        status = _partition(cut)
        assert status["reaches"] == "1 of 3 nodes (itself)"
        assert status["pauses"] == 1 and status["clients_closed"] == len(on_cut)
        metrics = cut.admin("/metrics")
        assert 'broker_cluster_partition_paused_current{node="node-3"} 1' in metrics
        assert f'broker_cluster_partition_clients_closed_total{{node="node-3"}} {len(on_cut)}' in (
            metrics
        )
        assert not _accepts(cut)
        # Its devices are back through lb on node-1 and node-2, with their sessions.
        elsewhere = lambda: set(first.clients()) | set(second.clients())  # noqa: E731
        wait_for(lambda: on_cut <= elsewhere(), 20, "node-3's devices on the others")
        assert cut.clients() == []
        for device in devices:
            if device.client_id in on_cut:
                present, _ = device.connacks.get(timeout=5)
                assert present, f"{device.client_id} found no session"
        commander = Device("commander", V5, clean=True)
        commander.connect(first.mqtt_port)
        for device in devices:
            commander.publish(f"cmd/{device.client_id}", f"split-{device.client_id}", 1)
        wait_for(lambda: len(commander.acked) == len(devices), 10, "commands acknowledged")
        for device in devices:
            assert device.received(want=1) == [f"split-{device.client_id}"]
        assert "the wills of its clients wait until it reaches a majority again" in cut.log_text()

        _cut(cut, [first, second], "connect")
        wait_for(lambda: all(node.all_links_up() for node in nodes), 20, "links up again")
        wait_for(lambda: not _partition(cut)["paused"], 10, "node-3 serving again")
        assert _accepts(cut)
        assert "cluster: node node-3 reaches a majority again (2 of 3 nodes" in cut.log_text()
        for device in devices:
            commander.publish(f"cmd/{device.client_id}", f"healed-{device.client_id}", 1)
        for device in devices:
            assert device.received(want=1) == [f"healed-{device.client_id}"]
        commander.stop()
        # Each of node-3's devices' wills once (published by node-1: their connections did
        # end), none of node-2's devices (node-3 did not take node-2 for lost), none twice.
        got = watcher.received(quiet=3.0, timeout=30)
        watcher.stop()
        assert sorted(got) == sorted(f"{client_id}-gone" for client_id in on_cut)


def test_the_last_node_up_pauses_until_another_comes_back(pki: TestPKI, tmp_path: Any) -> None:
    """node-2 and node-3 stopped: node-1 alone reaches 1 of 3 and pauses (its client
    disconnected, its listener closed); node-2 started again makes a majority and node-1
    serves again. Then all stopped and node-1 started alone: it does not serve until node-2
    is started too. In memory mode: a node restarted on its disk store would also wait
    join_timeout for node-3, stopped for good (the whole-cluster restart's rule, tested in
    test_broker_cluster_durability), which says nothing here."""
    with running_cluster(pki, tmp_path, cluster=PAUSE, store="memory") as nodes:
        first, second, third = nodes
        device = Device("lonely", V5)
        device.connect(first.mqtt_port)
        third.stop()
        assert not _partition(first)["paused"]  # 2 of 3
        second.stop()
        wait_for(lambda: _partition(first)["paused"], 10, "node-1 paused")
        wait_for(lambda: not device.connected.is_set(), 10, "its client disconnected")
        assert not _accepts(first)
        second.start()
        wait_for(lambda: not _partition(first)["paused"], 20, "node-1 serving again")
        assert _accepts(first)
        wait_for(device.connected.is_set, 10, "its client back")
        device.stop()
        assert _partition(first)["pauses"] == 1
        # A node that starts alone does not serve until it reaches a majority.
        for node in nodes:
            node.stop()
        first.start()
        assert _partition(first)["paused"]
        assert not _accepts(first)
        assert "node node-1 does not serve: it reaches 1 of 3 nodes (itself)" in (first.log_text())
        second.start()
        wait_for(lambda: not _partition(first)["paused"], 20, "node-1 serving")
        assert _accepts(first)


def test_partition_handling_is_ignore_unless_said_and_warned_about_when_it_cannot_work() -> None:
    document: dict[str, Any] = {
        "node": {"name": "n1", "cookie": "secret"},
        "listeners": {"tcp": {"a": {"bind": "127.0.0.1:1"}}},
        "cluster": {"peers": ["n2@127.0.0.1:5372"]},
    }
    config = parse_config(document, "c.toml")
    assert config.cluster is not None and config.cluster.partition_handling == "ignore"
    assert config_warnings(config) == []
    with pytest.raises(ConfigError, match=r"c\.toml: 'cluster\.partition_handling': expected"):
        parse_config({**document, "cluster": {"partition_handling": "autoheal"}}, "c.toml")
    two = parse_config(
        {
            **document,
            "cluster": {"peers": ["n2@127.0.0.1:5372"], "partition_handling": "pause_minority"},
        },
        "c.toml",
    )
    assert [w for w in config_warnings(two) if "a node stops serving whenever another" in w]
    peers = [f"n{n}@127.0.0.1:{5370 + n}" for n in (2, 3, 4)]
    four = parse_config(
        {**document, "cluster": {"peers": peers, "partition_handling": "pause_minority"}},
        "c.toml",
    )
    assert [w for w in config_warnings(four) if "a split into two halves stops every" in w]
    three = parse_config(
        {**document, "cluster": {"peers": peers[:2], "partition_handling": "pause_minority"}},
        "c.toml",
    )
    assert three.cluster is not None and three.cluster.partition_handling == "pause_minority"
    assert config_warnings(three) == []
    # One peers list for every node's config (this node in it too): still 3 nodes.
    everyone = ["n1@127.0.0.1:5371", *peers[:2]]
    same = parse_config(
        {**document, "cluster": {"peers": everyone, "partition_handling": "pause_minority"}},
        "c.toml",
    )
    assert config_warnings(same) == []


def test_a_backup_that_lost_only_its_own_link_to_a_node_waits_for_its_wills(
    pki: TestPKI, tmp_path: Any
) -> None:
    """A partial split (partition_handling "ignore", the default): node-3's link to node-1,
    its backup, cut; node-2 reaches both. node-2 tells node-1 it still reaches node-3 (REACH,
    protocol 9), so node-1 does not take node-3 for dead: no will of node-3's client, which
    is connected there all along (before protocol 9, node-1 published it at the cut).
    node-3 then killed: node-2 says it reaches it no more, and node-1 publishes the will,
    once."""
    with running_cluster(pki, tmp_path) as nodes:
        first, second, third = nodes
        watcher = Device("watcher", V5, subscriptions=[("status/#", 1)])
        watcher.connect(second.mqtt_port)
        watcher.subscribe([("status/#", 1)])
        prober = Device("prober", V5, clean=True)
        prober.connect(first.mqtt_port)
        for attempt in range(20):  # the watcher's route reaches node-1 within a second
            prober.publish("status/probe", f"probe-{attempt}", 1)
            if watcher.received(quiet=0.25, timeout=0.5):
                break
        prober.stop()
        watcher.received(quiet=0.5)
        device = Device("reached", V311, clean=True, will=("status/reached", "reached-gone"))
        device.connect(third.mqtt_port)
        wait_for(
            lambda: first.copied_wills("node-3") == 1,
            10,
            "the will copied to node-1",
        )
        wait_for(lambda: first.member("node-3")["reached_by"] == ["node-2"], 10, "node-2's REACH")
        third.admin("/api/cluster/peers/node-1/disconnect", "POST")
        wait_for(lambda: first.link_states()["node-3"] == "down", 10, "node-3 down on node-1")
        assert watcher.received(quiet=3.0, timeout=5) == []
        assert device.connected.is_set()
        assert (
            "our link to node node-3 is down, but node-2 still reaches it: the wills of its "
            "clients wait until no node does" in first.log_text()
        )
        third.kill()
        got = watcher.received(quiet=3.0, timeout=20, want=1)
        device.client.loop_stop()
        watcher.stop()
        assert got == ["reached-gone"]
