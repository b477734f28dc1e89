"""The broker's listener limits over real sockets: max_connections counts MQTT clients, the
sockets that are not clients yet are bounded apart (count and bytes, oldest evicted), floods
of refusals are rate limited, a stalled event loop does not turn into timeouts, descriptor
exhaustion pauses the listener (one line per burst), the file limit is raised and checked at
start, and ``broker -p`` listens on loopback only.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.ports import free_port
from broker.accept import FILE_RESERVE, Accepted, plan_file_limit
from broker.config import ConfigError, parse_config
from broker.listener import reachable_from_network
from broker.mqtt import Connack, Connect, MQTTDecoder, ReasonCode, encode
from lb.proxyproto import Command, encode_v2
from tests.broker_harness import BrokerThread, RawClient, make_config, running_broker, wait_for

pytestmark = pytest.mark.timeout(60)

CLIENT = ("203.0.113.7", 50123)
BROKER = ("10.0.0.5", 1883)


def connect(client_id: str, level: int = 5) -> Connect:
    return Connect("MQTT", level, True, 60, client_id)


def listener_value(node: BrokerThread, read: Callable[[Any], Any]) -> Any:
    return node.call(lambda: read(node.server.listeners[0]))  # type: ignore[union-attr]


def warnings_matching(caplog: pytest.LogCaptureFixture, pattern: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno >= logging.WARNING and re.search(pattern, record.getMessage())
    ]


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def open_socket(port: int, opened: list[socket.socket]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    opened.append(sock)
    return sock


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


# --- max_connections counts clients -----------------------------------------------------------


def test_200_clients_at_once_against_max_connections_50(sockets: list[socket.socket]) -> None:
    """200 devices through a balancer (PROXY listener), all sockets open before any header
    or CONNECT: max_connections = 50 lets exactly 50 in. It counted open sockets, so every
    device was refused (the probe saw 23 in one run and none in another)."""
    config = make_config(
        {"default": {"bind": "127.0.0.1:0", "proxy_protocol": True, "max_connections": 50}}
    )
    with running_broker(config) as node:
        port = node.port()
        clients = [open_socket(port, sockets) for _ in range(200)]
        wait_for(lambda: node.counters()["connections_accepted"] == 200)
        for index, sock in enumerate(clients):
            level = 5 if index % 2 else 4
            header = encode_v2(Command.PROXY, (CLIENT[0], 10_000 + index), BROKER)
            sock.sendall(header + encode(connect(f"c{index}", level), level))
        codes: list[int] = []
        for index, sock in enumerate(clients):
            raw = RawClient.__new__(RawClient)
            raw.sock, raw.level = sock, 5 if index % 2 else 4
            raw.decoder = MQTTDecoder(protocol_level=raw.level)
            connack = raw.receive()
            assert isinstance(connack, Connack)
            codes.append(connack.reason_code)
        assert codes.count(0) == 50
        # 0x89 Server busy (5.0), return code 3 Server unavailable (3.1.1).
        assert sorted(set(codes) - {0}) == [3, ReasonCode.SERVER_BUSY]
        counters = node.counters()
        assert counters["connections_refused_max_connections"] == 150
        assert listener_value(node, lambda listener: listener.clients) == 50
        # A client that leaves frees its slot for the next one.
        accepted = [sock for sock, code in zip(clients, codes, strict=True) if code == 0]
        accepted[0].close()
        wait_for(lambda: listener_value(node, lambda listener: listener.clients) == 49)
        late = RawClient(port, prefix=encode_v2(Command.PROXY, CLIENT, BROKER))
        connack = late.connect(connect("late"))
        assert isinstance(connack, Connack) and connack.reason_code == 0


def test_silent_sockets_do_not_take_client_slots(sockets: list[socket.socket]) -> None:
    """Sockets still waiting for their PROXY header are pending, not clients: 30 of them do
    not lock five real clients out of max_connections = 5."""
    config = make_config(
        {"default": {"bind": "127.0.0.1:0", "proxy_protocol": True, "max_connections": 5}}
    )
    with running_broker(config) as node:
        port = node.port()
        for _ in range(30):
            open_socket(port, sockets)
        wait_for(lambda: node.counters()["connections_accepted"] == 30)
        header = encode_v2(Command.PROXY, CLIENT, BROKER)
        clients = [RawClient(port, prefix=header) for _ in range(5)]
        for index, client in enumerate(clients):
            connack = client.connect(connect(f"device-{index}"))
            assert isinstance(connack, Connack) and connack.reason_code == 0, index
        sixth = RawClient(port, prefix=header)
        refused = sixth.connect(connect("device-6"))
        assert isinstance(refused, Connack) and refused.reason_code == ReasonCode.SERVER_BUSY


def test_pending_sockets_bounded_in_count_oldest_closed(
    sockets: list[socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config({"default": {"bind": "127.0.0.1:0", "max_pending_connections": 10}})
    with running_broker(config) as node:
        port = node.port()
        silent = []
        for index in range(25):
            silent.append(open_socket(port, sockets))
            wait_for(lambda index=index: node.counters()["connections_accepted"] == index + 1)
        assert listener_value(node, lambda listener: len(listener.pending)) == 10
        assert node.counters()["pending_connections_evicted"] == 15
        assert all(closed_by_peer(sock) for sock in silent[:15])
        assert not any(closed_by_peer(sock, timeout=0.05) for sock in silent[15:])
        client = RawClient(port)
        connack = client.connect(connect("prompt"))
        assert isinstance(connack, Connack) and connack.reason_code == 0
        assert node.counters()["pending_connections_evicted"] == 16
        assert warnings_matching(caplog, r"closed before CONNECT to make room: 10 sockets")


def test_pending_sockets_bounded_in_bytes(sockets: list[socket.socket]) -> None:
    """Half a CONNECT of 1,000 bytes from each of 100 sockets is 90,000 bytes: past
    max_pending_bytes (its minimum, max_packet_size + 64 KiB) the oldest go."""
    config = make_config(
        {"default": {"bind": "127.0.0.1:0", "max_pending_bytes": 1024 + 65536}},
        mqtt={"max_packet_size": 1024},
    )
    with running_broker(config) as node:
        port = node.port()
        partial = b"\x10" + bytes([0xE8, 0x07]) + b"\x00" * 897  # remaining length 1000
        for _ in range(100):
            open_socket(port, sockets).sendall(partial)
        wait_for(
            lambda: (
                node.counters()["pending_connections_evicted"]
                + listener_value(node, lambda listener: len(listener.pending))
                == 100
            )
        )
        assert listener_value(node, lambda listener: listener.pending.bytes) <= 1024 + 65536
        assert node.counters()["pending_connections_evicted"] >= 100 - (1024 + 65536) // 900
        client = RawClient(port)
        connack = client.connect(connect("prompt"))
        assert isinstance(connack, Connack) and connack.reason_code == 0


def test_max_pending_bytes_must_hold_one_connect() -> None:
    document = {
        "mqtt": {"max_packet_size": 100_000},
        "listeners": {"tcp": {"a": {"bind": "127.0.0.1:1", "max_pending_bytes": 100_000}}},
    }
    with pytest.raises(ConfigError, match=r"'listeners\.tcp\.a\.max_pending_bytes'.*165536"):
        parse_config(document, "x.toml")


# --- refusal floods are rate limited ----------------------------------------------------------


def test_proxy_timeouts_are_rate_limited(
    sockets: list[socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    """60 silent sockets on a PROXY listener: a burst of lines, then "N similar lines
    suppressed" (the probe saw one WARNING per socket: 2,002 lines for 2,000 sockets)."""
    config = make_config(
        {
            "default": {
                "bind": "127.0.0.1:0",
                "proxy_protocol": True,
                "proxy_protocol_timeout": "200ms",
            }
        }
    )
    with running_broker(config) as node:
        for _ in range(60):
            open_socket(node.port(), sockets)
        wait_for(lambda: node.counters()["proxy_header_timeouts"] == 60)
    lines = warnings_matching(caplog, r"timeout waiting for the PROXY header")
    [report] = warnings_matching(caplog, r"similar lines suppressed")
    suppressed = int(re.search(r": (\d+) similar lines suppressed", report).group(1))  # type: ignore[union-attr]
    assert 20 <= len(lines) < 60
    assert len(lines) + suppressed == 60
    assert "connections refused before CONNECT over 10/s" in report


def test_untrusted_sources_are_rate_limited(
    sockets: list[socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(
        {
            "default": {
                "bind": "127.0.0.1:0",
                "proxy_protocol": True,
                "proxy_protocol_trusted": ["10.0.0.0/8"],
            }
        }
    )
    with running_broker(config) as node:
        for _ in range(60):
            open_socket(node.port(), sockets)
        wait_for(lambda: node.counters()["proxy_untrusted_sources"] == 60)
    lines = warnings_matching(caplog, r"address not in proxy_protocol_trusted")
    [report] = warnings_matching(caplog, r"similar lines suppressed")
    suppressed = int(re.search(r": (\d+) similar lines suppressed", report).group(1))  # type: ignore[union-attr]
    assert 20 <= len(lines) < 60 and len(lines) + suppressed == 60


# --- a stalled event loop ---------------------------------------------------------------------


def stall_in_io_callback(node: BrokerThread, seconds: float) -> socket.socket:
    """A reader on the broker's loop that blocks it for ``seconds`` when poked: a stall in
    the I/O phase, as a burst of thousands of CONNECTs read in one turn makes. (A stall in a
    plain callback runs before the next poll and hides the problem.) Returns the poke end."""
    reader, poke = socket.socketpair()

    def stall() -> None:
        reader.recv(1)
        time.sleep(seconds)

    node.call(lambda: node.loop.add_reader(reader.fileno(), stall))
    node.stall_sockets = (reader, poke)  # type: ignore[attr-defined]  # kept open until the end
    return poke


def test_header_that_arrived_in_time_survives_a_stalled_loop(sockets: list[socket.socket]) -> None:
    """The PROXY header arrives within the timeout, but the broker's loop is blocked past
    the deadline. uvloop runs due timers before it polls the sockets, so the timeout fired
    with the header unread in the socket; the deadline is now extended by the lag.
    """
    config = make_config(
        {"default": {"bind": "127.0.0.1:0", "proxy_protocol": True, "proxy_protocol_timeout": 1}}
    )
    with running_broker(config) as node:
        poke = stall_in_io_callback(node, 1.6)
        sock = open_socket(node.port(), sockets)
        wait_for(lambda: node.counters()["connections_accepted"] == 1)
        poke.send(b"!")  # the loop stalls past the deadline
        time.sleep(0.2)
        sock.sendall(encode_v2(Command.PROXY, CLIENT, BROKER) + encode(connect("lagged"), 5))
        raw = RawClient.__new__(RawClient)
        raw.sock, raw.level, raw.decoder = sock, 5, MQTTDecoder(protocol_level=5)
        connack = raw.receive(timeout=5)
        assert isinstance(connack, Connack) and connack.reason_code == 0
        counters = node.counters()
        assert counters["proxy_header_timeouts"] == 0
        assert counters["timers_late"] == 1


def test_a_silent_socket_still_times_out_when_the_loop_stalls(
    sockets: list[socket.socket],
) -> None:
    config = make_config(
        {"default": {"bind": "127.0.0.1:0", "proxy_protocol": True, "proxy_protocol_timeout": 1}}
    )
    with running_broker(config) as node:
        poke = stall_in_io_callback(node, 1.6)
        sock = open_socket(node.port(), sockets)
        wait_for(lambda: node.counters()["connections_accepted"] == 1)
        poke.send(b"!")
        assert closed_by_peer(sock)
        assert node.counters()["proxy_header_timeouts"] == 1


# --- the process: file limit, descriptor exhaustion, local only mode --------------------------


def start_broker(
    arguments: list[str], nofile: tuple[int, int] | None = None
) -> subprocess.Popen[str]:
    # prlimit(1) (util-linux) sets the limits of the command it runs.
    prefix = [] if nofile is None else ["prlimit", f"--nofile={nofile[0]}:{nofile[1]}"]
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "broker", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_listening(port: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"broker exited: {process.communicate()[1]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("broker did not start listening")


def stop_broker(process: subprocess.Popen[str]) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
    return stderr


def write_config(path: Path, port: int, extra: str = "") -> Path:
    path.write_text(f'[listeners.tcp.default]\nbind = "127.0.0.1:{port}"\n{extra}')
    return path


@pytest.mark.parametrize("rate", ["", "max_conn_rate = 100000\n"])
def test_out_of_descriptors_pauses_accepts_with_one_line(tmp_path: Path, rate: str) -> None:
    """With 64 descriptors and max_connections 1000, 100 clients: those past the limit wait
    in the backlog (libuv used to accept and close them without a word) and get in as others
    leave; one WARNING for the whole burst, no busy loop. The same with a max_conn_rate that
    counts every accept but is not reached (the two pauses are apart)."""
    port = free_port()
    config = write_config(tmp_path / "b.toml", port, "max_connections = 1000\n" + rate)
    process = start_broker(["-c", str(config)], (64, 64))
    clients: list[RawClient] = []
    try:
        wait_listening(port, process)
        for index in range(100):
            clients.append(RawClient(port, level=4))
            clients[-1].send(connect(f"c{index}", 4))
        answered = []
        for client in clients:
            try:
                answered.append(isinstance(client.receive(timeout=0.5), Connack))
            except TimeoutError:
                answered.append(False)
        served = answered.count(True)
        assert 10 < served < 64
        waiting = [client for client, ok in zip(clients, answered, strict=True) if not ok]
        # Nobody was closed: they wait in the backlog.
        assert not any(client.closed_by_server(timeout=0.05) for client in waiting)
        for client, ok in zip(clients, answered, strict=True):
            if ok:
                client.close()
        for client in waiting[:20]:
            connack = client.receive(timeout=5)
            assert isinstance(connack, Connack) and connack.reason_code == 0
    finally:
        for client in clients:
            client.close()
        stderr = stop_broker(process)
    assert len(re.findall(r"accept failed: Too many open files", stderr)) == 1, stderr
    assert "file limit 64" in stderr
    assert re.search(r"burst over: \d+ accepts failed for lack of file descriptors", stderr)


def test_file_limit_raised_and_max_connections_checked(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "b.toml", port, "max_connections = 100000\n")
    process = start_broker(["-c", str(config)], (256, 1024))
    try:
        wait_listening(port, process)
    finally:
        stderr = stop_broker(process)
    assert "file limit (RLIMIT_NOFILE) raised from 256 to 1024 (the hard limit)" in stderr
    assert (
        f"max_connections (tcp:default 100,000) needs about {100_000 + FILE_RESERVE:,} file "
        "descriptors"
    ) in stderr
    assert "the file limit is 1,024" in stderr and "LimitNOFILE=" in stderr


def test_unset_max_connections_comes_from_the_file_limit(tmp_path: Path) -> None:
    port = free_port()
    process = start_broker(["-c", str(write_config(tmp_path / "b.toml", port))], (512, 512))
    try:
        wait_listening(port, process)
    finally:
        stderr = stop_broker(process)
    assert f"listener tcp:default: max_connections not set: {512 - 128}" in stderr
    assert "needs about" not in stderr


def test_plan_shares_what_the_limit_leaves() -> None:
    plan = plan_file_limit([("tcp:a", 1000), ("tcp:b", None), ("ssl:c", None)], 20_000)
    share = (20_000 - FILE_RESERVE - 1000) // 2
    assert plan.max_connections == {"tcp:a": 1000, "tcp:b": share, "ssl:c": share}
    assert not plan.problems
    over = plan_file_limit([("tcp:a", 500_000)], 20_000)
    assert over.max_connections == {"tcp:a": 500_000}
    [problem] = over.problems
    assert "needs about 500,128 file descriptors" in problem
    unlimited = plan_file_limit([("tcp:a", None)], resource.RLIM_INFINITY)
    assert unlimited.max_connections == {"tcp:a": None}


def test_port_option_is_local_only_mode() -> None:
    port = free_port()
    process = start_broker(["-p", str(port)])
    try:
        wait_listening(port, process)
        client = RawClient(port)
        connack = client.connect(connect("local"))
        assert isinstance(connack, Connack) and connack.reason_code == 0
        client.close()
    finally:
        stderr = stop_broker(process)
    assert "Starting in local only mode" in stderr
    assert f"listener tcp:default on 127.0.0.1:{port}" in stderr
    assert "ANONYMOUS" not in stderr


def test_anonymous_listener_reachable_from_the_network_is_loud(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "b.toml"
    config.write_text(f'[listeners.tcp.default]\nbind = "0.0.0.0:{port}"\n')
    process = start_broker(["-c", str(config)])
    try:
        wait_listening(port, process)
    finally:
        stderr = stop_broker(process)
    assert re.search(
        rf"WARNING .*listener tcp:default on 0\.0\.0\.0:{port} accepts ANONYMOUS clients", stderr
    ), stderr


@pytest.mark.parametrize(
    ("listener", "reachable"),
    [
        ({"bind": "127.0.0.1:1883"}, False),
        ({"bind": "[::1]:1883"}, False),
        ({"bind": "localhost:1883"}, False),
        ({"bind": "0.0.0.0:1883"}, True),
        ({"bind": "[::]:1883"}, True),
        ({"bind": "10.1.2.3:1883"}, True),
        ({"bind": "0.0.0.0:1883", "proxy_protocol": True}, False),  # default: loopback senders
        (
            {
                "bind": "0.0.0.0:1883",
                "proxy_protocol": True,
                "proxy_protocol_trusted": "10.0.0.0/8",
            },
            True,
        ),
    ],
)
def test_reachable_from_network(listener: dict[str, Any], reachable: bool) -> None:
    config = parse_config({"listeners": {"tcp": {"a": listener}}}, "x.toml")
    assert reachable_from_network(config.listeners[0]) is reachable


def _accepted_descriptor() -> tuple[Accepted, socket.socket, socket.socket]:
    listening = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listening.getsockname()[:2], timeout=5)
    fd, _address = listening._accept()  # type: ignore[attr-defined]
    accepted = Accepted(fd, int(listening.family), int(listening.type), listening.proto)
    return accepted, listening, client


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_an_accepted_descriptor_is_closed_by_its_owner_until_a_transport_adopts_it() -> None:
    # Not adopted (connect_accepted_socket failed before the transport opened it): close()
    # closes the descriptor, once.
    accepted, listening, client = _accepted_descriptor()
    fd = accepted.fileno()
    accepted.close()
    assert not _is_open(fd)
    accepted.close()  # nothing left to close: no error, no other descriptor touched
    client.close()
    # Adopted: the transport closes it (and then calls close(), when the number may already
    # be another connection's), so close() leaves it alone.
    accepted, listening2, client2 = _accepted_descriptor()
    fd = accepted.fileno()
    accepted.adopted()
    accepted.close()
    assert _is_open(fd)
    os.close(fd)
    # A socket object takes it over (the TLS handshake's path): the socket owns it.
    accepted, listening3, client3 = _accepted_descriptor()
    connection = accepted.socket()
    assert not connection.getblocking() and connection.fileno() == accepted.fileno()
    accepted.close()
    assert _is_open(connection.fileno())
    connection.close()
    for sock in (listening, listening2, client2, listening3, client3):
        sock.close()
