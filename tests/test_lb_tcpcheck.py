"""tcp-check rules and `option mqtt-chk` (issue 17 part 3): the sans-IO run of lb.tcpcheck
driven by hand, the config keywords, and real checks side by side with HAProxy 2.6 against
the same servers: the same log lines, reason and info, but for the check durations."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.ports import free_port
from broker.authentication import hash_password
from lb.config import load_config_text
from lb.config.model import Backend
from lb.health import CheckStatus
from lb.mqtt_check import MQTT_CHECK_KEEPALIVE, connack_rule, encode_connect
from lb.tcpcheck import Connect, Finished, Receive, Send, TcpCheck, mqtt_check
from tests.broker_harness import BrokerThread, make_config, running_broker
from tests.harness import close_listener, run_haproxy, run_lb

pytestmark = pytest.mark.timeout(120)

BASE = (
    "defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 1s\n"
    "    timeout server 1s\n    timeout check 1s\n"
    "frontend fe\n    bind 127.0.0.1:{port}\n    default_backend be\n"
)


def backend_of(text: str, name: str = "be") -> Backend:
    config = load_config_text(BASE.format(port=8443) + text, "x.cfg").config_or_raise()
    return config.backend(name)


def rules(text: str) -> TcpCheck:
    backend = backend_of("backend be\n    option tcp-check\n" + text + "    server s 127.0.0.1:1\n")
    return TcpCheck(backend.tcp_check_rules)


def finish(run: TcpCheck) -> Finished:
    action = run.next()
    assert isinstance(action, Finished), action
    return action


def connect(run: TcpCheck) -> None:
    assert isinstance(run.next(), Connect)
    run.connected()


def send(run: TcpCheck, data: bytes) -> None:
    action = run.next()
    assert isinstance(action, Send) and action.data == data, action
    run.sent()


PING = "    tcp-check connect\n    tcp-check send PING\\r\\n\n    tcp-check expect string OK\n"


def test_a_passing_ruleset() -> None:
    run = rules(PING)
    connect(run)
    send(run, b"PING\r\n")
    assert isinstance(run.next(), Receive)
    run.received(b"O")
    assert isinstance(run.next(), Receive)  # shorter than the pattern: wait
    run.received(b"K\r\n")
    result = finish(run).result
    assert (result.status, result.info, result.code) == (CheckStatus.L7OK, "(tcp-check)", 0)
    assert result.describe().startswith(
        ', reason: Layer7 check passed, code: 0, info: "(tcp-check)"'
    )


def test_mismatch_waits_until_close_then_says_so() -> None:
    run = rules(PING)
    connect(run)
    send(run, b"PING\r\n")
    run.received(b"NOPE\r\n")
    assert isinstance(run.next(), Receive)  # no match yet, the connection is open: wait
    run.closed()
    result = finish(run).result
    assert result.status is CheckStatus.L7RSP
    assert result.info == "TCPCHK did not match content 'OK' at step 3"


def test_timeout_words_name_the_step() -> None:
    run = rules(PING)
    connect(run)
    send(run, b"PING\r\n")
    assert isinstance(run.next(), Receive)
    run.timed_out()
    result = finish(run).result
    assert result.status is CheckStatus.L7TOUT
    assert result.info == " at step 3 of tcp-check (expect string 'OK')"
    assert "code" not in result.describe()


def test_empty_response_refused_connection_and_implicit_connect() -> None:
    run = rules(PING)
    connect(run)
    send(run, b"PING\r\n")
    run.closed()
    assert finish(run).result.info == "TCPCHK got an empty response at step 3"
    refused = rules(PING)
    assert isinstance(refused.next(), Connect)
    refused.connect_failed("Connection refused")
    result = finish(refused).result
    assert result.status is CheckStatus.L4CON
    assert result.info == "Connection refused at step 1 of tcp-check (connect)"
    implicit = rules("    tcp-check send PING\n    tcp-check expect string OK\n")
    action = implicit.next()
    assert isinstance(action, Connect) and action.rule is None
    implicit.timed_out()
    result = finish(implicit).result
    assert result.status is CheckStatus.L4TOUT
    assert result.info == " at initial connection step of tcp-check"


def test_comments_count_as_steps_and_decorate_messages() -> None:
    run = rules(
        "    tcp-check comment hello\n"
        "    tcp-check send-binary 0102 comment 'say hi'\n"
        "    tcp-check expect binary 0300 comment answer\n"
    )
    assert isinstance(run.next(), Connect)  # implicit
    run.connected()
    send(run, b"\x01\x02")
    assert isinstance(run.next(), Receive)
    run.timed_out()
    assert (
        finish(run).result.info
        == " at step 3 of tcp-check (expect binary '<03>') comment: 'answer'"
    )
    run = rules("    tcp-check send-binary 0102\n    tcp-check expect binary 0300 comment answer\n")
    run.next()
    run.connected()
    send(run, b"\x01\x02")
    run.received(b"\x04\x00")
    run.closed()
    assert (
        finish(run).result.info == "TCPCHK did not match content (binary) at step 2 comment: answer"
    )


def test_inverse_regex_min_recv_and_a_second_connect() -> None:
    run = rules(
        "    tcp-check connect\n"
        "    tcp-check expect rstring ^\\\\+OK\n"
        "    tcp-check expect ! string ERR\n"
        "    tcp-check expect min-recv 6 rbinary 2B4F4B\n"
        "    tcp-check connect port 2\n"
    )
    connect(run)
    run.received(b"+OK")
    assert isinstance(run.next(), Receive)  # min-recv 6 on the third expect
    run.received(b" ERR!")
    result = finish(run).result
    assert result.info == "TCPCHK matched unwanted content 'ERR' at step 3"
    run = rules(
        "    tcp-check connect\n    tcp-check expect min-recv 6 rbinary 2B4F4B\n"
        "    tcp-check connect port 2\n"
    )
    connect(run)
    run.received(b"+OK ok")
    action = run.next()
    assert isinstance(action, Connect) and action.rule is not None and action.rule.port == 2
    run.connect_failed("Connection refused")
    assert finish(run).result.info == "Connection refused at step 3 of tcp-check (connect port 2)"


def test_mqtt_check_runs() -> None:
    check = backend_of(
        "backend be\n    option mqtt-chk 5.0 client-id probe-1\n    server s 127.0.0.1:1\n"
    ).mqtt_check
    assert check is not None and check.version == "5.0" and check.client_id == "probe-1"

    def run_with(answer: bytes, close: bool = False) -> Finished:
        run = mqtt_check(check, "probe-1")
        assert isinstance(run.next(), Connect)
        run.connected()
        action = run.next()
        assert isinstance(action, Send) and action.data[0] == 0x10 and b"probe-1" in action.data
        run.sent()
        if answer:
            run.received(answer)
        if close:
            run.closed()
        return finish(run)

    accepted = run_with(b"\x20\x05\x00\x00\x02\x21\x00")  # properties: receive maximum
    assert accepted.result.status is CheckStatus.L7OK
    assert accepted.result.info == "CONNACK 0x00 Success (MQTT 5.0)"
    assert accepted.farewell == b"\xe0\x00"
    refused = run_with(b"\x20\x03\x00\x87\x00").result
    assert (refused.status, refused.code) == (CheckStatus.L7STS, 0x87)
    assert refused.describe().startswith(
        ', reason: Layer7 wrong status, code: 135, info: "CONNACK 0x87 Not authorized (MQTT 5.0)"'
    )
    garbage = run_with(b"HTTP/1.1 400").result
    assert garbage.status is CheckStatus.L7RSP and "not a CONNACK" in garbage.info
    closed = run_with(b"", close=True).result
    assert closed.status is CheckStatus.L7RSP and "no CONNACK" in closed.info


def test_tcp_check_keywords() -> None:
    def errors(text: str) -> list[str]:
        result = load_config_text(BASE.format(port=8443) + text, "x.cfg")
        return [d.text for d in result.errors]

    [error] = errors(
        "backend be\n    option tcp-check\n    tcp-check send PING\n    tcp-check connect\n"
        "    server s 127.0.0.1:1\n"
    )
    assert "x.cfg:13" in error and "first step MUST also be a 'connect'" in error
    [error] = errors(
        "backend be\n    tcp-check expect string-lf %[src]\n    server s 127.0.0.1:1\n"
    )
    assert "'string-lf' not supported" in error
    [error] = errors("backend be\n    tcp-check send-binary 0g\n    server s 127.0.0.1:1\n")
    assert "hex digits" in error
    [error] = errors("backend be\n    tcp-check expect rstring (\n    server s 127.0.0.1:1\n")
    assert "bad regex" in error
    [error] = errors("backend be\n    tcp-check sned x\n    server s 127.0.0.1:1\n")
    assert "did you mean 'send'" in error
    [error] = errors("backend be\n    option mqtt-chk 3.2\n    server s 127.0.0.1:1\n")
    assert "'option mqtt-chk'" in error
    in_frontend = load_config_text(
        BASE.format(port=8443) + "    tcp-check connect\nbackend be\n    server s 127.0.0.1:1\n",
        "x.cfg",
    )
    [warning] = in_frontend.warnings  # as HAProxy: ignored, the frontend has no backend side
    assert "'tcp-check' : ignored because frontend 'fe' has no backend capability" in warning.text
    result = load_config_text(
        BASE.format(port=8443) + "backend be\n    tcp-check send PING\n    server s 127.0.0.1:1\n",
        "x.cfg",
    )
    [warning] = result.warnings
    assert (
        "uses tcp-check rules without 'option tcp-check', so the rules are ignored" in warning.text
    )


def test_defaults_rules_are_inherited_unless_a_backend_has_its_own() -> None:
    text = (
        "defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 1s\n"
        "    timeout server 1s\n    option tcp-check\n    tcp-check send A\n"
        "frontend fe\n    bind 127.0.0.1:8443\n    default_backend b1\n"
        "backend b1\n    server s 127.0.0.1:1\n"
        "backend b2\n    tcp-check send B\n    tcp-check send C\n    server s 127.0.0.1:1\n"
    )
    config = load_config_text(text, "x.cfg").config_or_raise()
    assert [r.data for r in config.backend("b1").tcp_check_rules] == [b"A"]
    assert [r.data for r in config.backend("b2").tcp_check_rules] == [b"B", b"C"]
    assert [r.index for r in config.backend("b2").tcp_check_rules] == [0, 1]


def test_mqtt_chk_is_explained_as_ours() -> None:
    result = load_config_text(
        BASE.format(port=8443)
        + "backend be\n    option mqtt-chk\n    server s 127.0.0.1:1883 check\n",
        "x.cfg",
    )
    assert not result.errors and not result.warnings
    [notice] = [d.text for d in result.diagnostics]
    assert "x.cfg:11" in notice and "lb's own check (HAProxy 2.6 has no MQTT check)" in notice
    assert "tcp-check expect binary 20020000" in notice and "send-binary 101" in notice


# ------------------------------------------------------------------------------------------
# Side by side with HAProxy 2.6


class Scripted:
    """A TCP server in a thread: reads one chunk, then answers `reply` (None: nothing),
    then closes (`close`) or holds the connection open for a while."""

    def __init__(self, reply: bytes | None, *, close: bool = False, delay: float = 0.0) -> None:
        self.reply = reply
        self.close_after = close
        self.delay = delay
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.stopped = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(connection,), daemon=True).start()

    def _handle(self, connection: socket.socket) -> None:
        with connection:
            try:
                connection.settimeout(5)
                connection.recv(4096)
                time.sleep(self.delay)
                if self.reply is not None:
                    connection.sendall(self.reply)
                if not self.close_after:
                    time.sleep(3)
            except OSError:
                pass

    def stop(self) -> None:
        self.stopped = True
        close_listener(self.sock, self.thread)


@pytest.fixture
def scripted() -> Iterator[dict[str, Scripted]]:
    servers = {
        "good": Scripted(b"OK\r\n"),
        "bad": Scripted(b"NOPE\r\n"),
        "closer": Scripted(None, close=True),
        "wrong": Scripted(b"NOPE\r\n", close=True),
        "hung": Scripted(None),
    }
    yield servers
    for server in servers.values():
        server.stop()


CHECK_LINE = re.compile(
    r"Health check for server (?P<server>\S+) (?P<verdict>succeeded|failed)(?P<rest>.*)"
)


def check_lines(output: str) -> dict[str, str]:
    """server -> its first check line, check duration masked."""
    found: dict[str, str] = {}
    for line in output.splitlines():
        match = CHECK_LINE.search(line)
        if match and match["server"] not in found:
            found[match["server"]] = re.sub(
                r"check duration: \d+ms", "check duration: Nms", match.group(0)
            )
    return found


@pytest.mark.haproxy
def test_tcp_check_lines_are_haproxys(scripted: dict[str, Scripted], tmp_path: Path) -> None:
    refused_port = free_port()
    servers = (
        "".join(
            f"    server {name} 127.0.0.1:{server.port} check inter 500 rise 1 fall 1\n"
            for name, server in scripted.items()
        )
        + f"    server refused 127.0.0.1:{refused_port} check inter 500 rise 1 fall 1\n"
    )
    outputs = {}
    for name, runner in (("haproxy", run_haproxy), ("lb", run_lb)):
        port = free_port()
        config = (
            "global\n    log stdout format raw local0\n"
            + BASE.format(port=port).replace(
                "    timeout check 1s\n",
                "    timeout check 1s\n    log global\n    option log-health-checks\n",
            )
            + "backend be\n    option tcp-check\n"
            + PING.replace("tcp-check send", "tcp-check comment probe\n    tcp-check send")
            + servers
        )
        with runner(config, tmp_path, port, name=name) as process:
            deadline = time.monotonic() + 15
            while len(check_lines(process.output())) < len(scripted) + 1:
                assert time.monotonic() < deadline, process.output()
                time.sleep(0.1)
            outputs[name] = check_lines(process.output())
    assert outputs["lb"] == outputs["haproxy"]
    assert "reason: Layer7 check passed, code: 0" in outputs["lb"]["be/good"]
    assert (
        "Layer7 timeout, info: \" at step 4 of tcp-check (expect string 'OK')\""
        in outputs["lb"]["be/hung"]
    )
    assert "TCPCHK did not match content 'OK' at step 4" in outputs["lb"]["be/wrong"]
    assert "TCPCHK got an empty response at step 4" in outputs["lb"]["be/closer"]
    assert "Connection refused at step 1 of tcp-check (connect)" in outputs["lb"]["be/refused"]


# ------------------------------------------------------------------------------------------
# mqtt-chk against our broker, and HAProxy 2.6's tcp-check binary rules beside it

STATE_LINE = re.compile(r"Server (?P<backend>[^/\s]+)/(?P<server>\S+) is (?P<state>UP|DOWN)")


def transitions(output: str) -> list[tuple[str, str]]:
    return [
        (f"{m['backend']}/{m['server']}", m["state"])
        for line in output.splitlines()
        if (m := STATE_LINE.search(line))
    ]


def stall(node: BrokerThread, seconds: float) -> None:
    """Freeze the broker's event loop: the kernel still accepts, nothing answers."""
    node.loop.call_soon_threadsafe(time.sleep, seconds)


@pytest.mark.haproxy
def test_mqtt_chk_against_the_broker_beside_haproxy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Healthy (3.1.1 and 5.0, after check-send-proxy's LOCAL header), refusing (a listener
    that wants a password: CONNACK 4), hung after accept (the broker frozen 4.5 s), slow
    (frozen 0.4 s at a time, well under `timeout check` 2 s, so that a loaded machine does
    not flap): lb's mqtt-chk and HAProxy's equivalent tcp-check rules go through the same
    state changes; the broker counts the checks and logs no client session for them."""
    caplog.set_level(logging.DEBUG, logger="broker")
    passwords = tmp_path / "passwd"
    passwords.write_text(f"someone:{hash_password('secret')}\n")
    open_config = make_config({"default": {"bind": "127.0.0.1:0", "proxy_protocol": True}})
    locked_config = make_config(
        {"default": {"bind": "127.0.0.1:0", "password_file": str(passwords)}}, node="locked"
    )
    with running_broker(open_config) as node, running_broker(locked_config) as locked:
        servers = (
            f"    server healthy 127.0.0.1:{node.port()} check check-send-proxy send-proxy-v2 "
            "inter 300 rise 1 fall 1\n"
            f"    server locked 127.0.0.1:{locked.port()} check inter 300 rise 1 fall 1\n"
        )
        five = (
            f"    server healthy5 127.0.0.1:{node.port()} check check-send-proxy send-proxy-v2 "
            "inter 300 rise 1 fall 1\n"
        )
        connect4 = encode_connect(4, "haproxy-check", MQTT_CHECK_KEEPALIVE).hex()
        connect5 = encode_connect(5, "haproxy-check5", MQTT_CHECK_KEEPALIVE).hex()
        backends = {
            "lb": (
                f"backend be\n    option mqtt-chk client-id lb-check-1\n{servers}"
                f"backend be5\n    option mqtt-chk 5.0 client-id lb-check-5\n{five}"
            ),
            "haproxy": (
                f"backend be\n    option tcp-check\n    tcp-check send-binary {connect4}\n"
                f"    tcp-check expect {connack_rule(4)}\n{servers}"
                f"backend be5\n    option tcp-check\n    tcp-check send-binary {connect5}\n"
                f"    tcp-check expect {connack_rule(5)}\n{five}"
            ),
        }
        ports = {"lb": free_port(), "haproxy": free_port()}
        configs = {
            name: (
                "global\n    log stdout format raw local0\n"
                + BASE.format(port=ports[name]).replace(
                    "    timeout check 1s\n",
                    "    timeout check 2s\n    log global\n    option log-health-checks\n",
                )
                + "    use_backend be5\n"
                + backends[name]
            )
            for name in ports
        }
        with (
            run_lb(configs["lb"], tmp_path, ports["lb"], name="lb") as lb,
            run_haproxy(configs["haproxy"], tmp_path, ports["haproxy"], name="haproxy") as haproxy,
        ):
            processes = {"lb": lb, "haproxy": haproxy}

            def wait_for_state(server: str, state: str, count: int = 1) -> None:
                deadline = time.monotonic() + 20
                for name, process in processes.items():
                    while transitions(process.stdout).count((server, state)) < count:
                        assert time.monotonic() < deadline, (name, process.output())
                        time.sleep(0.05)

            wait_for_state("be/locked", "DOWN")
            time.sleep(1.5)  # healthy ones stay UP over several checks
            stall(node, 4.5)  # hung after accept, longer than timeout check (2 s)
            wait_for_state("be/healthy", "DOWN")
            wait_for_state("be/healthy", "UP")
            wait_for_state("be5/healthy5", "UP")
            before = {name: transitions(p.stdout) for name, p in processes.items()}
            for _ in range(4):  # slow: answers within timeout check
                stall(node, 0.4)
                time.sleep(0.6)
            after = {name: transitions(p.stdout) for name, p in processes.items()}
            lines = {name: p.stdout for name, p in processes.items()}
        counters = node.counters()
    assert after == before, "a slow broker (0.4 s) went DOWN"
    # Both started UP (rise/fall as HAProxy); the same changes, in the same order per server.
    for server in ("be/locked", "be/healthy", "be5/healthy5"):
        ours = [state for who, state in after["lb"] if who == server]
        theirs = [state for who, state in after["haproxy"] if who == server]
        assert ours == theirs, (server, after)
    assert [s for who, s in after["lb"] if who == "be/locked"] == ["DOWN"]
    assert [s for who, s in after["lb"] if who == "be/healthy"][:2] == ["DOWN", "UP"]
    assert (
        'reason: Layer7 wrong status, code: 4, info: "CONNACK return code 4: Connection '
        'Refused, bad user name or password (MQTT 3.1.1)"' in lines["lb"]
    )
    assert "Health check for server be/healthy failed, reason: Layer7 timeout" in lines["lb"]
    assert 'info: "CONNACK return code 0: Connection Accepted (MQTT 3.1.1)"' in lines["lb"]
    assert 'info: "CONNACK 0x00 Success (MQTT 5.0)"' in lines["lb"]
    assert "Layer7 timeout" in lines["haproxy"]
    # The broker answered the checks as checks: counted, a debug line, no client session.
    assert counters["mqtt_health_checks"] >= 10
    messages = [
        record.getMessage() for record in caplog.records if record.name == "broker.listener"
    ]
    assert any("answered with CONNACK 0" in message for message in messages)
    clients = [
        record.getMessage()
        for record in caplog.records
        if record.getMessage().startswith("client connected") and "check" in record.getMessage()
    ]
    assert clients == []
