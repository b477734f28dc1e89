"""EMQX's ``max_conn_rate`` on the broker's MQTT listeners, over real sockets.

A burst against a limited listener is served whole, late rather than refused: 5 at once,
then 5 a second (lb.event_rate's sliding second), every client gets its CONNACK and none is
reset; one WARNING when the run of pauses starts and one when it is over; the pauses are
counted per listener and for the node (/api/listeners, /api/stats, /metrics). Another
listener of the node without the option is not limited, a TLS listener is limited the same
way (counted at accept, before the handshake), and the rate wait keeps apart from the
descriptor wait and the owner's hold. The config takes EMQX's value forms and names the
file, the table and the key of a bad one.

Timing is asserted only as a lower bound that follows from the limit (15 accepts at 5 a
second cannot all happen within one second), never as an upper bound.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from broker import accept
from broker.accept import Accepted, AcceptLoop, open_listening_socket
from broker.config import ConfigError, load_config, parse_config
from broker.mqtt import Connack, Connect
from tests.broker_harness import RawClient, running_broker, wait_for
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(60)

REACHED = (
    r"max_conn_rate (\d+) reached: accepts pause until the rate falls below it; "
    r"connections wait in the kernel's queue"
)
OVER = r"max_conn_rate (\d+): accepts paused (\d+) times over [\d.]+s, none in the last"


def rate_warnings(caplog: pytest.LogCaptureFixture, pattern: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno >= logging.WARNING and re.search(pattern, record.getMessage())
    ]


# --- config ------------------------------------------------------------------------------------


def listener_document(kind: str, value: object) -> dict[str, Any]:
    table: dict[str, Any] = {"bind": "127.0.0.1:0", "max_conn_rate": value}
    if kind == "ssl":
        table["ssl_options"] = {"certfile": "server.pem", "keyfile": "server.key"}
    return {"listeners": {kind: {"edge": table}}}


@pytest.mark.parametrize("kind", ["tcp", "ssl"])
@pytest.mark.parametrize(
    ("value", "expected"),
    [(5, 5), ("5/s", 5), ("1000/s", 1000), (" 7 / 1s ", 7), ("infinity", None), (1, 1)],
)
def test_max_conn_rate_values(kind: str, value: object, expected: int | None) -> None:
    config = parse_config(listener_document(kind, value), "<test>")
    assert config.listeners[0].max_conn_rate == expected


def test_max_conn_rate_unset_is_no_limit() -> None:
    document = {"listeners": {"tcp": {"default": {"bind": "127.0.0.1:0"}}}}
    assert parse_config(document, "<test>").listeners[0].max_conn_rate is None


@pytest.mark.parametrize("kind", ["tcp", "ssl"])
@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("0", "expected connections per second, an integer from 1"),
        ("-3", "expected connections per second"),
        ("2.5", "got 2.5"),
        ("true", "got True"),
        ('"0/s"', "got '0/s'"),
        ('"fast"', "got 'fast'"),
        ('"5/x"', "got '5/x'"),
        ('"5/0s"', "got '5/0s'"),
        ("2147483648", "got 2147483648"),
        ('"600/m"', "'600/m' is 600 connections per 1m, a period EMQX accepts but this broker"),
        ('"1000/10s"', 'write a rate per second such as "100/s"'),
    ],
)
def test_bad_max_conn_rate_names_file_table_and_key(
    tmp_path: Path, kind: str, text: str, words: str
) -> None:
    path = tmp_path / "node.toml"
    ssl_lines = (
        '[listeners.ssl.edge.ssl_options]\ncertfile = "s.pem"\nkeyfile = "s.key"\n'
        if kind == "ssl"
        else ""
    )
    path.write_text(
        f'[listeners.{kind}.edge]\nbind = "127.0.0.1:0"\nmax_conn_rate = {text}\n{ssl_lines}'
    )
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: 'listeners.{kind}.edge.max_conn_rate': "), message
    assert words in message, message


# --- a burst against a plain listener ----------------------------------------------------------


def two_listeners(rate: int) -> Any:
    document = {
        "node": {"name": "rate-node"},
        "listeners": {
            "tcp": {
                "limited": {"bind": "127.0.0.1:0", "max_conn_rate": f"{rate}/s"},
                "open": {"bind": "127.0.0.1:0"},
            }
        },
        "admin": {"bind": "127.0.0.1:0"},
    }
    return parse_config(document, "<test>")


def connack_all(port: int, count: int, prefix: str) -> list[RawClient]:
    """``count`` clients connect and send CONNECT at once (the kernel queues them); each
    must get a CONNACK 0 (a refusal or a reset fails the test)."""
    clients = []
    try:
        for index in range(count):
            client = RawClient(port, level=4)
            clients.append(client)
            client.send(Connect("MQTT", 4, True, 60, f"{prefix}{index}"))
        for client in clients:
            connack = client.receive(timeout=15)
            assert isinstance(connack, Connack) and connack.reason_code == 0, connack
    except BaseException:
        for client in clients:
            client.close()
        raise
    return clients


def test_burst_of_15_at_max_conn_rate_5_all_served_none_refused(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING)
    # The run is over after this long without a pause (10 s in production).
    monkeypatch.setattr(accept, "BURST_QUIET", 1.5)
    with running_broker(two_listeners(5)) as node:
        started = time.monotonic()
        limited = connack_all(node.port("limited"), 15, "limited-")
        last_connack = time.monotonic()
        # 15 accepts at 5 a second need three seconds of the clock (5 at most in each).
        assert last_connack - started >= 1.0
        # The other listener has no limit: nothing counted, never paused.
        unlimited = connack_all(node.port("open"), 15, "open-")
        for client in limited + unlimited:
            client.close()

        records = {
            entry["listener"]: entry for entry in node.admin_get("/api/listeners")["listeners"]
        }
        assert records["tcp:limited"]["max_conn_rate"] == 5
        pauses = records["tcp:limited"]["accepts_paused_max_conn_rate"]
        assert pauses > 0
        assert isinstance(records["tcp:limited"]["conn_rate_current"], int)
        assert records["tcp:open"]["max_conn_rate"] is None
        assert records["tcp:open"]["accepts_paused_max_conn_rate"] == 0
        assert records["tcp:open"]["conn_rate_current"] is None
        assert node.admin_get("/api/stats")["accepts_paused_max_conn_rate"] == pauses
        metrics = node.admin_get("/metrics")
        assert (
            "broker_listener_accepts_paused_max_conn_rate_total"
            f'{{node="rate-node",listener="tcp:limited"}} {pauses}\n' in metrics
        )
        assert (
            "broker_listener_accepts_paused_max_conn_rate_total"
            '{node="rate-node",listener="tcp:open"} 0\n' in metrics
        )
        assert metrics.count("# TYPE broker_listener_accepts_paused_max_conn_rate_total ") == 1
        assert (
            f'broker_accepts_paused_max_conn_rate_total{{node="rate-node"}} {pauses}\n' in metrics
        )

        # One line when the run began; one when it was over, with the count of pauses.
        wait_for(lambda: bool(rate_warnings(caplog, OVER)), timeout=10)
        reached = rate_warnings(caplog, REACHED)
        assert reached == [
            "listener tcp:limited: max_conn_rate 5 reached: accepts pause until the rate "
            "falls below it; connections wait in the kernel's queue"
        ]
        (over,) = rate_warnings(caplog, OVER)
        assert over.startswith(
            f"listener tcp:limited: max_conn_rate 5: accepts paused {pauses} times"
        )


# --- a TLS listener ----------------------------------------------------------------------------


def tls_client(port: int, context: ssl.SSLContext, client_id: str) -> bytes:
    """A TLS client's CONNECT (MQTT 3.1.1) and the first bytes of the answer."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=15) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        name = client_id.encode()
        body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(name).to_bytes(2, "big") + name
        tls.sendall(bytes([0x10, len(body)]) + body)
        return tls.recv(4)


def test_tls_listener_limited_the_same_way(pki: TestPKI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    document = {
        "node": {"name": "tls-rate-node"},
        "listeners": {
            "ssl": {
                "default": {
                    "bind": "127.0.0.1:0",
                    "max_conn_rate": 3,
                    "ssl_options": {
                        "certfile": str(pki.server_chain),
                        "keyfile": str(pki.server_key),
                    },
                }
            }
        },
        "admin": {"bind": "127.0.0.1:0"},
    }
    context = ssl.create_default_context(cafile=str(pki.root))
    with running_broker(parse_config(document, "<test>")) as node:
        port = node.port()
        started = time.monotonic()
        with ThreadPoolExecutor(7) as pool:
            answers = list(
                pool.map(lambda index: tls_client(port, context, f"tls-{index}"), range(7))
            )
        finished = time.monotonic()
        assert answers == [b"\x20\x02\x00\x00"] * 7  # CONNACK, accepted, every one
        assert finished - started >= 1.0  # 7 at 3 a second: three seconds of the clock
        (record,) = node.admin_get("/api/listeners")["listeners"]
        assert record["listener"] == "ssl:default" and record["max_conn_rate"] == 3
        assert record["accepts_paused_max_conn_rate"] > 0
    assert len(rate_warnings(caplog, REACHED)) == 1
    # The node's stop ends the run: its closing line is written then.
    assert len(rate_warnings(caplog, OVER)) == 1


# --- the rate wait beside the descriptor wait and the owner's hold ----------------------------


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


def test_rate_wait_is_kept_apart_from_resume_and_hold(caplog: pytest.LogCaptureFixture) -> None:
    """A freed descriptor (``resume``) or the end of the owner's hold (``release``) does not
    end a rate wait; the end of a rate wait does not end a hold; ``close`` cancels the wait."""
    caplog.set_level(logging.WARNING)

    async def scenario() -> None:
        listening = open_listening_socket("127.0.0.1", 0)
        port = listening.getsockname()[1]
        accepted: list[object] = []

        def on_socket(connection: Accepted, address: object) -> None:
            accepted.append(address)
            connection.close()

        acceptor = AcceptLoop(listening, on_socket, "listener test", max_conn_rate=2)
        acceptor.start()
        clients: list[socket.socket] = []
        try:
            # Three at once against 2 a second: two are taken, the third waits.
            clients += [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
            await until(lambda: acceptor.rate_paused)
            assert len(accepted) == 2 and not acceptor.accepting
            acceptor.resume()  # a connection closed: the rate wait goes on
            assert acceptor.rate_paused and not acceptor.accepting
            acceptor.hold()
            acceptor.release()  # the owner's hold is over: the rate wait goes on
            assert acceptor.rate_paused and not acceptor.accepting
            await until(lambda: len(accepted) == 3)

            # Held while the rate wait runs out: still held; released, it accepts again.
            clients += [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
            await until(lambda: acceptor.rate_paused)
            acceptor.hold()
            await until(lambda: not acceptor.rate_paused)
            await asyncio.sleep(0.05)
            assert not acceptor.accepting and len(accepted) < 6
            acceptor.release()
            await until(lambda: len(accepted) == 6)
            pauses = acceptor.rate_pauses
            assert pauses >= 2

            # close() cancels a rate wait and ends the run with its line.
            clients += [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
            await until(lambda: acceptor.rate_paused)
            acceptor.close()
            assert not acceptor.rate_paused and not acceptor.accepting
            await asyncio.sleep(0.05)
        finally:
            acceptor.close()
            for client in clients:
                client.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert len(rate_warnings(caplog, REACHED)) == 1
    assert len(rate_warnings(caplog, OVER)) == 1


def test_unlimited_accept_loop_counts_nothing() -> None:
    async def scenario() -> None:
        listening = open_listening_socket("127.0.0.1", 0)
        acceptor = AcceptLoop(listening, lambda connection, address: connection.close(), "t")
        try:
            assert acceptor.conn_rate is None and acceptor.rate() is None
        finally:
            acceptor.close()

    asyncio.run(scenario())
