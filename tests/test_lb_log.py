"""lb's log lines against HAProxy 2.6's: the same config text, the same TLS client, both
sending syslog over UDP to receivers on 127.0.0.1; the lines are compared field by field
(but for the ports, timings and pids, which are each process's own). Plus the formats and
the refused-handshake rate limit on their own.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bench.ports import free_port
from lb.log import (
    ERROR_LINE_BURST,
    ERROR_LINE_RATE,
    TCPLOG,
    LogFormat,
    RateLimiter,
    SessionRecord,
    TrafficLog,
    connection_error_log,
    frame,
)
from lb.log_format import LogFormatError
from lb.ratelimit import Burst
from tests.harness import (
    EchoBackend,
    client_context,
    run_haproxy,
    run_lb,
    tls_outcome,
    tls_roundtrip,
)
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(120)


class SyslogReceiver:
    """A UDP syslog receiver on 127.0.0.1 port 0, in a thread."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.messages: list[bytes] = []
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.closed:
            try:
                self.messages.append(self.sock.recv(65536))
            except TimeoutError:
                continue
            except OSError:
                return

    def wait_for(self, pattern: str, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in list(self.messages):
                if re.search(pattern.encode(), message):
                    return message
            time.sleep(0.02)
        raise TimeoutError(f"{pattern!r} not received; got {self.messages!r}")

    def close(self) -> None:
        self.closed = True
        self.sock.close()


@pytest.fixture
def receivers() -> Iterator[dict[str, SyslogReceiver]]:
    made = {name: SyslogReceiver() for name in ("lb", "haproxy", "lb5424", "haproxy5424")}
    yield made
    for receiver in made.values():
        receiver.close()


LOG_FORMAT = (
    "%ci:%cp [%t] %ft %b/%s %Tw/%Tc/%Tt %B %U %ts %ac/%fc/%bc/%sc/%rc %sq/%bq "
    "%fi:%fp %si:%sp %f "
    "cn=%[ssl_c_s_dn(cn)] proto=%[ssl_fc_protocol] verify=%[ssl_c_verify] "
    "cipher=%[ssl_fc_cipher] used=%[ssl_c_used]"
)


def _config(
    pki: TestPKI, port: int, backend_port: int, syslog: int, syslog5424: int, custom: bool
) -> str:
    log_format = f'    log-format "{LOG_FORMAT}"\n' if custom else ""
    return (
        "global\n"
        f"    log 127.0.0.1:{syslog} local0\n"
        f"    log 127.0.0.1:{syslog5424} format rfc5424 local1\n"
        "defaults\n    mode tcp\n    log global\n    option tcplog\n"
        "    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n"
        "frontend mqtts\n"
        f"    bind 127.0.0.1:{port} ssl crt {pki.server_allinone} ca-file {pki.intermediate} "
        f"ca-verify-file {pki.root} verify required\n"
        f"{log_format}"
        "    default_backend brokers\n"
        "backend brokers\n"
        f"    server broker1 127.0.0.1:{backend_port}\n"
    )


def _strip_header(message: bytes) -> tuple[str, str]:
    """(the syslog header with pid and time masked, the log line)."""
    text = message.decode().rstrip("\n")
    rfc3164 = re.match(r"(<\d+>)\w{3} [ \d]\d \d\d:\d\d:\d\d haproxy\[\d+\]: (.*)", text)
    if rfc3164:
        return rfc3164.group(1) + "MMM DD HH:MM:SS haproxy[PID]: ", rfc3164.group(2)
    rfc5424 = re.match(r"(<\d+>1) \S+ (- haproxy) \d+ - - (.*)", text)
    assert rfc5424, text
    return f"{rfc5424.group(1)} TIME {rfc5424.group(2)} PID - - ", rfc5424.group(3)


def _fields(line: str) -> list[str]:
    masked = []
    for index, word in enumerate(line.split(" ")):
        if index == 0:
            masked.append(word.rsplit(":", 1)[0])  # client port differs
        elif word.startswith("[") and word.endswith("]"):
            masked.append("[DATE]")
        elif re.fullmatch(r"-?\d+/-?\d+/-?\d+", word) and index < 5:
            masked.append("Tw/Tc/Tt")  # timings differ from run to run
        elif re.fullmatch(r"127\.0\.0\.1:\d+", word):
            masked.append("127.0.0.1:PORT")
        else:
            masked.append(word)
    return masked


@pytest.mark.haproxy
@pytest.mark.parametrize("custom", [False, True], ids=["tcplog", "log-format"])
def test_log_lines_match_haproxy(
    pki: TestPKI, tmp_path: Path, receivers: dict[str, SyslogReceiver], custom: bool
) -> None:
    backend = EchoBackend(proxy=False)
    ports = {"lb": free_port(), "haproxy": free_port()}
    device = pki.device(7)
    context = client_context(device.cert, device.key, pki.root)
    try:
        with (
            run_haproxy(
                _config(
                    pki,
                    ports["haproxy"],
                    backend.port,
                    receivers["haproxy"].port,
                    receivers["haproxy5424"].port,
                    custom,
                ),
                tmp_path,
                ports["haproxy"],
            ),
            run_lb(
                _config(
                    pki,
                    ports["lb"],
                    backend.port,
                    receivers["lb"].port,
                    receivers["lb5424"].port,
                    custom,
                ),
                tmp_path,
                ports["lb"],
            ),
        ):
            for name in ("lb", "haproxy"):
                assert tls_roundtrip(ports[name], context, b"x" * 100) == b"x" * 100
            lines = {
                name: receivers[name].wait_for(r"mqtts~ brokers/broker1")
                for name in ("lb", "haproxy", "lb5424", "haproxy5424")
            }
    finally:
        backend.close()
    parsed = {name: _strip_header(message) for name, message in lines.items()}
    assert parsed["lb"][0] == parsed["haproxy"][0]
    assert parsed["lb5424"][0] == parsed["haproxy5424"][0]
    lb_fields = _fields(parsed["lb"][1])
    haproxy_fields = _fields(parsed["haproxy"][1])
    assert lb_fields == haproxy_fields, (parsed["lb"][1], parsed["haproxy"][1])
    assert parsed["lb5424"][1] == parsed["lb"][1]
    if custom:
        assert f"cn={device.cn}" in parsed["lb"][1]
        assert "verify=0" in parsed["lb"][1] and "used=1" in parsed["lb"][1]


@pytest.mark.haproxy
def test_termination_codes_match_haproxy(
    pki: TestPKI, tmp_path: Path, receivers: dict[str, SyslogReceiver]
) -> None:
    """SC (server refused) and CD (client reset during data), as HAProxy reports them."""
    dead_port = free_port()
    backend = EchoBackend(proxy=False)
    results: dict[str, dict[str, str]] = {}
    for name in ("lb", "haproxy"):
        port, refused_port = free_port(), free_port()
        config = (
            "global\n"
            f"    log 127.0.0.1:{receivers[name].port} local0\n"
            "defaults\n    mode tcp\n    log global\n    option tcplog\n    retries 0\n"
            "    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n"
            f"frontend data\n    bind 127.0.0.1:{port}\n    default_backend live\n"
            f"frontend refused\n    bind 127.0.0.1:{refused_port}\n    default_backend dead\n"
            f"backend live\n    server echo 127.0.0.1:{backend.port}\n"
            f"backend dead\n    server nothing 127.0.0.1:{dead_port}\n"
        )
        runner = run_lb if name == "lb" else run_haproxy
        with runner(config, tmp_path, port, name=f"{name}-ts"):
            with socket.create_connection(("127.0.0.1", refused_port), timeout=5) as sock:
                sock.settimeout(5)
                assert sock.recv(10) == b""
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"hello")
            assert sock.recv(10) == b"hello"
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            sock.close()  # RST
            refused = _strip_header(receivers[name].wait_for(r" refused dead/"))[1]
            # Only the session that carried "hello": HAProxy's readiness probe is one too.
            reset = _strip_header(receivers[name].wait_for(r" data live/\S+ \S+ 5 "))[1]
        results[name] = {"refused": refused.split()[6], "reset": reset.split()[6]}
    backend.close()
    assert results["haproxy"] == {"refused": "SC", "reset": "CD"}
    assert results["lb"] == results["haproxy"]


def _client_hello() -> bytes:
    """A real ClientHello, taken from the standard library's TLS engine."""
    context = client_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    engine = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        engine.do_handshake()
    return outgoing.read()


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.haproxy
def test_reset_during_the_handshake_is_logged_as_haproxy(
    pki: TestPKI, tmp_path: Path, receivers: dict[str, SyslogReceiver]
) -> None:
    """A client that resets during the TLS handshake (before its ClientHello, after it,
    halfway through it) gets HAProxy 2.6's line `fe/1: SSL handshake failure`, lb's with the
    reason in words (issue 14 item 9: lb logged nothing)."""
    hello = _client_hello()
    lines: dict[str, list[str]] = {}
    for name in ("lb", "haproxy"):
        port = free_port()
        config = (
            "global\n"
            f"    log 127.0.0.1:{receivers[name].port} local0\n"
            "defaults\n    mode tcp\n    log global\n    option tcplog\n"
            "    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n"
            f"frontend fe\n    bind 127.0.0.1:{port} ssl crt {pki.server_allinone}\n"
            "    default_backend be\n"
            f"backend be\n    server s 127.0.0.1:{free_port()}\n"
        )
        runner = run_lb if name == "lb" else run_haproxy
        with runner(config, tmp_path, port, name=f"{name}-reset"):
            sources = []
            for sent in (b"", hello, hello[:20]):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sources.append(f"127.0.0.1:{sock.getsockname()[1]} ")
                if sent:
                    sock.sendall(sent)
                    time.sleep(0.2)  # let the balancer read it (and answer a whole hello)
                _reset(sock)
            found = [
                _strip_header(receivers[name].wait_for(re.escape(source)))[1] for source in sources
            ]
        lines[name] = found
    for theirs, ours in zip(lines["haproxy"], lines["lb"], strict=True):
        # HAProxy says which it saw first: OpenSSL's failure, or (seen once in CI, on a
        # loaded machine) the reset itself as "Connection error during SSL handshake"
        # (CO_ER_SSL_ABORT).
        assert theirs.endswith(
            ("] fe/1: SSL handshake failure", "] fe/1: Connection error during SSL handshake")
        ), theirs
        assert "] fe/1: SSL handshake failure: connection reset by the client during the " in ours
        assert ours.endswith("TLS handshake (Connection reset by peer)"), ours


def test_refused_handshakes_are_rate_limited(pki: TestPKI, tmp_path: Path) -> None:
    """A flood of refused clients gives at most the burst of lines, each explained."""
    port = free_port()
    backend = EchoBackend(proxy=False)
    config = (
        "global\n    log stdout format raw local0\n"
        "defaults\n    mode tcp\n    log global\n    option tcplog\n"
        "    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n"
        f"frontend mqtts\n    bind 127.0.0.1:{port} ssl crt {pki.server_allinone} "
        f"ca-file {pki.intermediate} ca-verify-file {pki.root} verify required\n"
        "    default_backend brokers\n"
        f"backend brokers\n    server broker1 127.0.0.1:{backend.port}\n"
    )
    expired = client_context(pki.expired.cert, pki.expired.key, pki.root)
    try:
        with run_lb(config, tmp_path, port) as lb:
            started = time.monotonic()
            for _ in range(60):
                assert tls_outcome(port, expired).startswith("refused")
            elapsed = time.monotonic() - started
            lb.wait_output("SSL handshake failure", stream="stdout")
            time.sleep(0.5)
            refusals = [line for line in lb.stdout.splitlines() if "SSL handshake failure" in line]
    finally:
        backend.close()
    # The bucket: a burst, then ERROR_LINE_RATE per second of the flood (a bound, not a time).
    assert 1 <= len(refusals) <= ERROR_LINE_BURST + ERROR_LINE_RATE * (elapsed + 0.5) + 1
    assert "expired" in refusals[0] and pki.expired.cn in refusals[0]
    assert refusals[0].startswith("127.0.0.1:")


# ------------------------------------------------------------------------------------------
# Without processes


def _record(**changes: object) -> SessionRecord:
    values: dict[str, object] = dict(
        client_ip="10.0.0.1",
        client_port=40000,
        accept_date=1_700_000_000.123,
        frontend="mqtts",
        ssl=True,
        backend="brokers",
        server="broker1",
        queue_ms=0,
        connect_ms=1,
        total_ms=25,
        bytes_read=44,
        termination="--",
        process_connections=3,
        frontend_connections=2,
        backend_connections=1,
        server_connections=1,
        retries=0,
        server_queue=0,
        backend_queue=0,
        ssl_protocol="TLSv1.3",
        ssl_verify=0,
        ssl_client_used=True,
        ssl_client_subject=(("C", "CN"), ("O", "emqx"), ("CN", "device-001")),
    )
    values.update(changes)
    return SessionRecord(**values)  # type: ignore[arg-type]


def test_tcplog_format() -> None:
    line = TCPLOG.render(_record())
    assert re.fullmatch(
        r"10\.0\.0\.1:40000 \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d\.123\] mqtts~ brokers/broker1 "
        r"0/1/25 44 -- 3/2/1/1/0 0/0",
        line,
    )
    assert "<NOSRV>" in TCPLOG.render(_record(server=None))


def test_log_format_samples() -> None:
    compiled = LogFormat("%[ssl_c_s_dn(cn)] %[ssl_c_s_dn] %{+Q}o%ts %%x %[ssl_c_verify]")
    assert compiled.render(_record()) == "device-001 /C=CN/O=emqx/CN=device-001 -- %x 0"
    assert compiled.render(_record(ssl_client_subject=(), ssl_verify=None)) == "- - -- %x -"
    with pytest.raises(ValueError, match="unsupported"):
        LogFormat("%[req.len]")


def _render_part_by_part(compiled: LogFormat, record: SessionRecord) -> str:
    """sess_build_logline's way, one part after the other (what LogFormat.render did before
    it compiled a template): a separator prints one space unless nothing was printed yet or
    what was printed last ends with a space."""
    out: list[str] = []
    for part in compiled.parts:
        if part == " ":  # a separator: a run of spaces in the format (literals have none)
            if out and not out[-1].endswith(" "):
                out.append(" ")
        elif isinstance(part, str):
            out.append(part)
        else:
            out.append(part(record))
    return "".join(out)


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(
        st.sampled_from(
            [
                " ",
                "  ",
                "%ci",
                "%cp",
                "%ts",
                "%t",
                "%ID",
                "%b",
                "%s",
                "%[ssl_c_s_dn(cn)]",
                "%[ssl_c_s_dn]",
                "%[ssl_c_used]",
                "{",
                "}",
                "{}",
                "x",
                "%%",
                "%{+X}o",
                "%Tt",
            ]
        ),
        max_size=12,
    ),
    cn=st.sampled_from(["device-001", "", " ", "a b ", "{0}", "tail "]),
    unique_id=st.sampled_from([None, "", "id ", "abc"]),
)
def test_a_compiled_format_prints_what_the_parts_print(
    pieces: list[str], cn: str, unique_id: str | None
) -> None:
    try:
        compiled = LogFormat("".join(pieces))
    except LogFormatError:
        assume(False)  # "%ci" + "x" reads as the unknown variable %cix
    record = _record(
        ssl_client_subject=(("O", "emqx"), ("CN", cn)), unique_id=unique_id, server="s "
    )
    assert compiled.render(record) == _render_part_by_part(compiled, record)


def test_only_a_format_that_shows_names_reads_them() -> None:
    assert LogFormat("%[ssl_c_s_dn(cn)]").uses_peer_names
    assert LogFormat("%ci %[ssl_c_i_dn]").uses_peer_names
    assert not LogFormat("%ci %[ssl_c_used] %ID").uses_peer_names
    assert not TCPLOG.uses_peer_names


def test_syslog_framing() -> None:
    moment = time.mktime((2026, 11, 6, 0, 1, 6, 0, 0, -1)) + 0.5
    assert (
        frame("x", framing="rfc3164", facility="local0", level="info", now=moment, pid=7)
        == "<134>Nov  6 00:01:06 haproxy[7]: x\n"
    )
    rfc5424 = frame("x", framing="rfc5424", facility="local1", level="notice", now=moment, pid=7)
    assert re.fullmatch(
        r"<141>1 2026-11-06T00:01:06\.500000[+-]\d\d:\d\d - haproxy 7 - - x\n", rfc5424
    )
    assert frame("x", framing="raw", facility="local0", level="info", now=moment, pid=7) == "x\n"


def test_rate_limiter_and_suppressed_report() -> None:
    now = [0.0]
    scheduled: list[tuple[float, object]] = []
    log = TrafficLog(())
    emitted: list[str] = []
    log.emit = lambda line, level="info": emitted.append(line)  # type: ignore[method-assign]
    log.sinks = [object()]  # type: ignore[list-item]  # "enabled"
    errors = connection_error_log(
        log, "mqtts", lambda: now[0], lambda d, c: scheduled.append((d, c)), rate=1.0, burst=3
    )
    for index in range(10):
        errors.emit(f"line {index}")
    assert emitted == ["line 0", "line 1", "line 2"]
    assert len(scheduled) == 1
    now[0] = 2.0
    errors.emit("line 10")
    scheduled[0][1]()  # type: ignore[operator]
    assert emitted[-2:] == [
        "line 10",
        "frontend mqtts: 7 similar lines suppressed (refused TLS handshakes over 1/s)",
    ]
    limiter = RateLimiter(2.0, 1, lambda: now[0])
    assert limiter.allow() and not limiter.allow()
    assert limiter.take_suppressed() == 1


def test_burst_is_told_when_it_begins_and_when_it_is_over() -> None:
    """A run of events: `add` says which began it; the end is told once none came for
    `quiet` seconds (looked at again when one came meanwhile), or at `end`, with the count
    and the span; a new run then begins afresh."""

    class Handle:
        def __init__(self, delay: float, callback: Callable[[], None]) -> None:
            self.delay, self.callback, self.cancelled = delay, callback, False

        def cancel(self) -> None:
            self.cancelled = True

    now = [100.0]
    handles: list[Handle] = []
    told: list[tuple[int, float]] = []

    def schedule(delay: float, callback: Callable[[], None]) -> Handle:
        handles.append(Handle(delay, callback))
        return handles[-1]

    burst = Burst(10.0, lambda: now[0], schedule, lambda count, span: told.append((count, span)))
    assert burst.add() and not burst.add()
    now[0] = 104.0
    assert not burst.add()
    now[0] = 110.0
    handles[-1].callback()  # 6 s since the last: not over, looked at 4 s later
    assert told == [] and handles[-1].delay == 4.0
    now[0] = 114.0
    handles[-1].callback()
    assert told == [(3, 4.0)]
    assert burst.add()  # a new run
    burst.end()  # at stop: told now, its look cancelled
    assert told[-1] == (1, 0.0) and handles[-1].cancelled
    burst.end()
    assert len(told) == 2
