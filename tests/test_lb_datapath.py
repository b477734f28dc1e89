"""lb's data path over real sockets: round robin and weights, half-close, flow control with
bounded memory, timeouts, retries, no server, and global maxconn holding connections in the
accept backlog."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from bench.ports import free_port
from lb.datapath import TimerWheel
from tests.harness import EchoBackend, rss_kib, run_lb, wait_port

pytestmark = pytest.mark.timeout(90)


def plain_config(
    port: int, servers: str, *, extra_global: str = "", extra_defaults: str = ""
) -> str:
    return f"""
global
    maxconn 1000
    log stdout format raw local0
{extra_global}
defaults
    mode tcp
    log global
    option tcplog
    timeout connect 2s
    timeout client 30s
    timeout server 30s
{extra_defaults}
frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    balance roundrobin
{servers}
"""


def roundtrip(port: int, payload: bytes = b"x") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := sock.recv(65536):
            received.extend(chunk)
        return bytes(received)


def answer_before_close(port: int, payload: bytes) -> bytes:
    """What lb sends before it closes a connection it cannot serve. With no server at all it
    may close (a reset, the client's bytes unread) before our shutdown: that is a close too."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                received.extend(chunk)
        except TimeoutError:
            raise  # left hanging: the failure this helper is for
        except OSError:
            pass  # reset, or no longer connected at our shutdown: closed
    return bytes(received)


def test_round_robin_follows_weights_smoothly(tmp_path: Path) -> None:
    backends = [EchoBackend(name=f"b{i}") for i in range(3)]
    port = free_port()
    servers = "\n".join(
        f"    server s{i} 127.0.0.1:{b.port} send-proxy-v2 weight {w}"
        for i, (b, w) in enumerate(zip(backends, (3, 1, 1), strict=True))
    )
    with run_lb(plain_config(port, servers), tmp_path, port) as lb:
        for _ in range(50):
            assert roundtrip(port, b"hello") == b"hello"
        log = lb.wait_output("be/s2", 5)
    order = re.findall(r" be/(s\d) ", log)
    assert Counter(order) == {"s0": 30, "s1": 10, "s2": 10}
    # Smooth: a heavy server is never picked more than 3 times in a row.
    assert "s0 s0 s0 s0" not in " ".join(order)
    assert order[:5].count("s0") == 3
    for backend in backends:
        backend.close()


def test_weight_zero_takes_no_connection(tmp_path: Path) -> None:
    used, unused = EchoBackend(name="used"), EchoBackend(name="unused")
    port = free_port()
    servers = (
        f"    server a 127.0.0.1:{used.port} send-proxy-v2 weight 10\n"
        f"    server b 127.0.0.1:{unused.port} send-proxy-v2 weight 0"
    )
    with run_lb(plain_config(port, servers), tmp_path, port):
        for _ in range(10):
            assert roundtrip(port) == b"x"
    assert len(used.connections) == 10
    assert unused.connections == []


def test_proxy_v1_and_no_header(tmp_path: Path) -> None:
    v1, bare = EchoBackend(name="v1"), EchoBackend(name="bare", proxy=False)
    port = free_port()
    servers = f"    server a 127.0.0.1:{v1.port} send-proxy\n    server b 127.0.0.1:{bare.port}"
    with run_lb(plain_config(port, servers), tmp_path, port):
        assert roundtrip(port, b"one") == b"one"
        assert roundtrip(port, b"two") == b"two"
    header = v1.wait_connections(1)[0].header
    assert header is not None and header.version == 1
    assert header.source is not None and header.source[0] == "127.0.0.1"
    assert header.destination == ("127.0.0.1", port)
    assert bytes(bare.wait_connections(1)[0].data) == b"two"


def test_half_close_passes_eof_and_server_can_still_answer(tmp_path: Path) -> None:
    backend = EchoBackend(farewell=b" and goodbye")
    port = free_port()
    servers = f"    server a 127.0.0.1:{backend.port} send-proxy-v2"
    with run_lb(plain_config(port, servers), tmp_path, port):
        # roundtrip() shuts its write side first, then reads until the server closes.
        assert roundtrip(port, b"question") == b"question and goodbye"


def _lb_pid(lb_process: object) -> int:
    return int(lb_process.popen.pid)  # type: ignore[attr-defined]


def test_slow_client_does_not_grow_memory(tmp_path: Path) -> None:
    """A backend floods 64 MiB to a client that does not read: lb must pause the backend
    instead of buffering, so its RSS grows by a few buffers at most."""
    total = 64 * 1024 * 1024
    flood_port = free_port()
    listener = socket.create_server(("127.0.0.1", flood_port))
    sent = {"bytes": 0}

    def flood() -> None:
        connection, _ = listener.accept()
        connection.settimeout(20)
        chunk = b"z" * 65536
        try:
            while sent["bytes"] < total:
                connection.sendall(chunk)
                sent["bytes"] += len(chunk)
        except OSError:
            pass
        finally:
            connection.close()

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    port = free_port()
    with run_lb(plain_config(port, f"    server a 127.0.0.1:{flood_port}"), tmp_path, port) as lb:
        pid = _lb_pid(lb)
        before = rss_kib(pid)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            time.sleep(2.0)  # not reading: the pipe fills up and must stall
            stalled_at = sent["bytes"]
            grown = rss_kib(pid) - before
            assert stalled_at < total, "the backend was never paused"
            assert grown < 16 * 1024, f"lb grew by {grown} KiB while the client did not read"
            received = 0
            while received < total:
                chunk = client.recv(1 << 20)
                if not chunk:
                    break
                received += len(chunk)
        assert received == total
    thread.join(10)
    listener.close()


def test_slow_server_does_not_grow_memory(tmp_path: Path) -> None:
    """The other direction: a client uploads into a server that does not read."""
    sink_port = free_port()
    listener = socket.create_server(("127.0.0.1", sink_port))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    port = free_port()
    with run_lb(plain_config(port, f"    server a 127.0.0.1:{sink_port}"), tmp_path, port) as lb:
        pid = _lb_pid(lb)
        before = rss_kib(pid)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
            client.setblocking(False)
            pushed = 0
            deadline = time.monotonic() + 3
            chunk = b"u" * 65536
            while time.monotonic() < deadline and pushed < 256 * 1024 * 1024:
                try:
                    pushed += client.send(chunk)
                except BlockingIOError:
                    time.sleep(0.01)
            grown = rss_kib(pid) - before
            assert pushed < 256 * 1024 * 1024, "lb accepted everything: no backpressure"
            assert grown < 16 * 1024, f"lb grew by {grown} KiB"
    for connection in accepted:
        connection.close()
    listener.close()


def test_timeout_client_closes_idle_session(tmp_path: Path) -> None:
    backend = EchoBackend(proxy=False)
    port = free_port()
    config = plain_config(port, f"    server a 127.0.0.1:{backend.port}").replace(
        "timeout client 30s", "timeout client 300ms"
    )
    with run_lb(config, tmp_path, port) as lb:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"hi")
            assert client.recv(10) == b"hi"
            assert client.recv(10) == b""  # closed by lb within the socket's 10 s, not by us
        line = lb.wait_output(" cD ", 5)
        assert "fe be/a" in line


def test_refused_server_is_retried_on_the_next(tmp_path: Path) -> None:
    backend = EchoBackend(proxy=False)
    dead = free_port()  # nothing listens there
    port = free_port()
    servers = f"    server dead 127.0.0.1:{dead}\n    server alive 127.0.0.1:{backend.port}"
    with run_lb(plain_config(port, servers), tmp_path, port) as lb:
        for _ in range(4):
            assert roundtrip(port, b"ok") == b"ok"
        output = lb.wait_output("be/alive", 5)
    assert "be/dead" not in output
    retried = [line for line in output.splitlines() if "be/alive" in line and "/1 0/0" in line]
    assert retried, output


def test_no_server_closes_client_promptly_and_logs(tmp_path: Path) -> None:
    port = free_port()
    servers = f"    server dead 127.0.0.1:{free_port()}"
    config = plain_config(port, servers).replace("timeout connect 2s", "timeout connect 1s")
    with run_lb(config, tmp_path, port) as lb:
        assert answer_before_close(port, b"anyone?") == b""  # not left hanging (10 s)
        lb.wait_output("no server of backend be could take the connection", 5)
        lb.wait_output("be/<NOSRV>", 5)


def test_no_server_warnings_do_not_flood_while_every_server_is_down(tmp_path: Path) -> None:
    """A blackout of the brokers: every device's retry gets its session line (SC, as
    HAProxy's), but the warning beside it only in a burst, then the count at stop."""
    port = free_port()
    servers = f"    server dead 127.0.0.1:{free_port()}"
    tries = 200
    with run_lb(plain_config(port, servers), tmp_path, port) as lb:
        for _ in range(tries):
            assert answer_before_close(port, b"anyone?") == b""
        lb.wait_output("be/<NOSRV>", 5)
        deadline = time.monotonic() + 10
        while lb.output().count("be/<NOSRV>") < tries and time.monotonic() < deadline:
            time.sleep(0.05)
        lb.stop()
    output = lb.output()
    assert output.count("be/<NOSRV>") == tries, output
    warned = output.count("no server of backend be could take the connection")
    assert 20 <= warned < tries, output
    suppressed = re.search(
        r"frontend fe: (\d+) similar lines suppressed \(connections no server could take", output
    )
    assert suppressed is not None, output
    assert warned + int(suppressed.group(1)) == tries, output


def test_global_maxconn_keeps_extra_connections_in_the_backlog(tmp_path: Path) -> None:
    backend = EchoBackend(proxy=False)
    port = free_port()
    config = plain_config(port, f"    server a 127.0.0.1:{backend.port}").replace(
        "maxconn 1000", "maxconn 2"
    )
    with run_lb(config, tmp_path, port):
        holders = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        for holder in holders:
            holder.sendall(b"h")
            assert holder.recv(1) == b"h"
        waiting = socket.create_connection(("127.0.0.1", port), timeout=10)
        waiting.sendall(b"w")
        waiting.settimeout(0.5)
        with pytest.raises(TimeoutError):
            waiting.recv(1)  # accepted by the kernel, not yet by lb
        holders[0].close()
        waiting.settimeout(10)
        assert waiting.recv(1) == b"w"  # served as soon as a slot freed, nothing lost
        waiting.close()
        holders[1].close()
    backend.close()


def test_many_concurrent_sessions(tmp_path: Path) -> None:
    backend = EchoBackend()
    port = free_port()
    with run_lb(
        plain_config(port, f"    server a 127.0.0.1:{backend.port} send-proxy-v2"), tmp_path, port
    ):
        wait_port(port)
        results: list[bytes] = []

        def one(index: int) -> None:
            results.append(roundtrip(port, f"message {index}".encode() * 100))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert sorted(results) == sorted(f"message {i}".encode() * 100 for i in range(100))


def test_timer_wheel_survives_a_failing_session() -> None:
    """One session whose timeout handler raises is killed; the others still time out, and
    the wheel keeps firing for later deadlines."""

    class Session:
        def __init__(self, fail: bool) -> None:
            self.fail = fail
            self.wheel_slot: int | None = None
            self.peer = ("127.0.0.1", 1)
            self.fired = 0
            self.killed: str | None = None

        def wheel_fired(self) -> None:
            self.fired += 1
            if self.fail:
                raise RuntimeError("boom")

        def kill(self, cause: str) -> None:
            self.killed = cause

    async def run() -> list[Session]:
        loop = asyncio.get_running_loop()
        wheel = TimerWheel(loop)
        sessions = [Session(fail=i == 0) for i in range(3)]
        for session in sessions:
            wheel.add(session, loop.time() + 0.06)  # type: ignore[arg-type]
        later = Session(fail=False)
        wheel.add(later, loop.time() + 0.2)  # type: ignore[arg-type]
        await asyncio.sleep(0.5)
        wheel.close()
        return [*sessions, later]

    failing, first, second, later = asyncio.run(run())
    assert failing.killed == "P"
    assert first.fired == second.fired == later.fired == 1


def test_data_phase_uses_the_shorter_server_timeout(tmp_path: Path) -> None:
    """Once connected, an idle session ends at `timeout server` even when `timeout client`
    is much longer (the timeout is re-armed when the session changes phase)."""
    backend = EchoBackend(proxy=False)
    port = free_port()
    config = plain_config(port, f"    server a 127.0.0.1:{backend.port}").replace(
        "timeout server 30s", "timeout server 300ms"
    )
    with run_lb(config, tmp_path, port) as lb:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"hi")
            assert client.recv(10) == b"hi"
            assert client.recv(10) == b""  # not after timeout client's 30 s: recv would fail
        assert " sD " in lb.wait_output(" sD ", 5)
    backend.close()


def test_client_fin_timeout_ends_a_half_closed_session(tmp_path: Path) -> None:
    """`timeout client-fin`: the client shut its side; a server that never answers nor
    closes does not keep the session for the whole idle timeout."""
    silent_port = free_port()
    listener = socket.create_server(("127.0.0.1", silent_port))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(listener.accept()[0]), daemon=True).start()
    port = free_port()
    config = plain_config(port, f"    server a 127.0.0.1:{silent_port}").replace(
        "timeout client 30s", "timeout client 30s\n    timeout client-fin 300ms"
    )
    with (
        run_lb(config, tmp_path, port),
        socket.create_connection(("127.0.0.1", port), timeout=10) as client,
    ):
        client.sendall(b"bye")
        client.shutdown(socket.SHUT_WR)
        assert client.recv(10) == b""  # closed by lb within the socket's 10 s
    for connection in held:
        connection.close()
    listener.close()
