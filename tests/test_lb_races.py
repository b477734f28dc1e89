"""Events that meet in one turn of lb's event loop.

- The connect timeout fires after the server connection was made but before the connecting
  task resumed: uvloop then closes that transport without calling `connection_lost`. lb
  adopted the server side in `connection_made`, so the client's first bytes went to a
  closed transport and its EOF raised RuntimeError "the handler is closed" (72 tracebacks
  in the 100,000-device fleet run, when an overloaded loop made connects late), and the
  retry reached a server without the bytes the client had sent. A 1 ms `timeout connect`
  makes that meeting frequent (14 tracebacks and 150 sessions without their data in 1,000
  before the fix).
- The server resets its connection and the client sends in the same turn: lb is stopped
  (SIGSTOP) while both happen, then resumed, so that epoll reports them together.
- A client sends its ClientHello and gives up (FIN) before lb gets to it: lb.datapath's
  HandshakeQueue drops it without computing an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import uvloop

from bench.ports import free_port
from lb.config import load_config_text
from lb.process import Runtime
from tests.harness import EchoBackend, Process, client_context, close_listener, run_lb
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(60)


class ResettingBackend:
    """Accepts, and keeps each connection until told to reset it (SO_LINGER 0 close)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections.append(connection)

    def wait_connection(self, timeout: float = 10.0) -> socket.socket:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.connections:
                    return self.connections.pop(0)
            time.sleep(0.01)
        raise TimeoutError("lb did not connect to the backend")

    @staticmethod
    def reset(connection: socket.socket) -> None:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()

    def close(self) -> None:
        close_listener(self.sock, self.thread)
        with self.lock:
            for connection in self.connections:
                connection.close()


def _config(port: int, backend_port: int) -> str:
    return f"""
global
    maxconn 100
    log stdout format raw local0
defaults
    mode tcp
    log global
    option tcplog
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server s1 127.0.0.1:{backend_port}
"""


def _frozen(lb: Process) -> _Freeze:
    return _Freeze(lb.popen.pid)


class _Freeze:
    """SIGSTOP the process for the `with` body, SIGCONT after (our own child, by pid)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        # The process is stopped once /proc says so (T): only then is the order certain.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "T":
                return
            time.sleep(0.005)
        raise TimeoutError("lb did not stop")

    def __exit__(self, *exc: object) -> None:
        os.kill(self.pid, signal.SIGCONT)


@pytest.mark.parametrize("client_sends", ["eof", "data", "data and eof"])
def test_server_reset_and_client_event_in_one_turn(tmp_path: Path, client_sends: str) -> None:
    backend = ResettingBackend()
    port = free_port()
    try:
        with run_lb(_config(port, backend.port), tmp_path, port) as lb:
            for _ in range(3):
                client = socket.create_connection(("127.0.0.1", port), timeout=10)
                client.sendall(b"hello")
                server = backend.wait_connection()
                assert server.recv(16) == b"hello"  # the session is through, both sides up
                with _frozen(lb):
                    backend.reset(server)
                    time.sleep(0.05)  # the RST is queued on lb's server socket first
                    if "data" in client_sends:
                        client.sendall(b"more")
                    if "eof" in client_sends:
                        client.shutdown(socket.SHUT_WR)
                    time.sleep(0.05)
                client.settimeout(10)
                try:
                    assert client.recv(16) == b""  # lb ends the session
                except ConnectionResetError:
                    pass
                client.close()
            # Three session lines, each ended by the server (SD), and nothing else.
            lb.wait_output(" SD ", 10)
            deadline = time.monotonic() + 10
            while lb.output().count(" fe be/s1 ") < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            output = lb.output()
            assert output.count(" fe be/s1 ") == 3, output
            assert "Traceback" not in output, output
            assert "RuntimeError" not in output, output
    finally:
        backend.close()


def test_connect_timeout_after_connection_made_loses_nothing(tmp_path: Path) -> None:
    backend = EchoBackend(proxy=False)
    port = free_port()
    config = _config(port, backend.port).replace("timeout connect 2s", "timeout connect 1ms")
    config = config.replace("defaults\n", "defaults\n    retries 3\n")
    payload = b"x" * 100

    def session(_: int) -> bytes | None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.sendall(payload)
                client.shutdown(socket.SHUT_WR)
                received = bytearray()
                while chunk := client.recv(65536):
                    received.extend(chunk)
                return bytes(received)
        except OSError:
            return None

    try:
        with run_lb(config, tmp_path, port) as lb:
            with ThreadPoolExecutor(50) as pool:
                results = list(pool.map(session, range(600)))
            deadline = time.monotonic() + 20
            while lb.output().count(" fe be/") < 600 and time.monotonic() < deadline:
                time.sleep(0.1)
            output = lb.output()
    finally:
        backend.close()
    lines = [line for line in output.splitlines() if " fe be/" in line]
    assert len(lines) == 600, output[-3000:]
    assert "Traceback" not in output and "RuntimeError" not in output, output[-3000:]
    # A session is either through with all its bytes, or refused after its retries (sC).
    through = [line for line in lines if " -- " in line]
    assert all(line.split()[5] == "100" for line in through), through[:5]
    assert all(" sC " in line for line in lines if " -- " not in line)
    assert results.count(payload) == len(through)
    assert all(result in (payload, b"", None) for result in results)


#: Clients that send their ClientHello and give up while lb is busy elsewhere.
GAVE_UP = 40


def test_a_client_that_gave_up_before_its_turn_costs_no_handshake(
    pki: TestPKI, tmp_path: Path
) -> None:
    """lb.datapath.HandshakeQueue: a ClientHello waits for its turn, and a client whose
    FIN arrived with it (a device whose connect timeout fired while lb was busy) is dropped
    before lb computes a ServerHello for it. lb is stopped (SIGSTOP: a loop busy with a
    storm, without the timing) while 40 clients connect, send a ClientHello and shut down
    their sending side; then it continues. None of them may receive a byte; a client that
    stayed is answered as usual. (Before the queue lb answered every one: the key
    exchange and the signature of a handshake, written to a socket nobody reads.)"""
    port = free_port()
    backend = EchoBackend(proxy=False)
    config = (
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
        "    timeout server 30s\n"
        f"frontend mqtts\n    bind 127.0.0.1:{port} ssl crt {pki.server_allinone} "
        f"ca-file {pki.intermediate} ca-verify-file {pki.root} verify required\n"
        "    default_backend echo\n"
        f"backend echo\n    server echo1 127.0.0.1:{backend.port}\n"
    )
    device = pki.device(3)
    context = client_context(device.cert, device.key, pki.root)
    gave_up: list[socket.socket] = []
    try:
        with run_lb(config, tmp_path, port) as lb:
            os.kill(lb.popen.pid, signal.SIGSTOP)
            try:
                for _ in range(GAVE_UP):
                    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
                    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
                    with contextlib.suppress(ssl.SSLWantReadError):
                        tls.do_handshake()
                    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
                    conn.sendall(outgoing.read())  # the ClientHello
                    conn.shutdown(socket.SHUT_WR)
                    gave_up.append(conn)
            finally:
                os.kill(lb.popen.pid, signal.SIGCONT)
            for conn in gave_up:
                conn.settimeout(10)
                assert conn.recv(4096) == b"", "lb answered a client that had given up"
            # One that stays is served as ever.
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname="localhost") as stayed,
            ):
                stayed.sendall(b"ping")
                assert stayed.recv(16) == b"ping"
            lb.wait_output("connection closed during the TLS handshake", 10)
    finally:
        for conn in gave_up:
            conn.close()
        backend.close()


def test_a_timeout_the_loop_was_late_for_spares_a_session_whose_bytes_wait() -> None:
    """lb's loop stalls in an I/O callback (a loaded machine) past a session's idle timeout
    while the client sends: libuv then runs the expired timer before it polls again, so the
    session was closed as idle with the client's bytes unread (devices that ping every
    45 s against 60 s timeouts lost their sessions to 15 s stalls). lb asks the sockets first
    (ClientSide._bytes_waiting): the bytes are read and echoed. lb runs in this process,
    on a uvloop in a thread, so that the stall is a callback of its own loop."""
    backend = EchoBackend(proxy=False)
    port = free_port()
    text = _config(port, backend.port).replace("timeout client 30s", "timeout client 2s")
    text = text.replace("timeout server 30s", "timeout server 2s")
    assert "timeout client 2s" in text and "timeout server 2s" in text, text
    result = load_config_text(text)
    assert result.config is not None, result.diagnostics
    loop = uvloop.new_event_loop()
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        runtime = Runtime(result.config, loop)  # type: ignore[arg-type]
        runtime.start()
        started.set()
        loop.run_forever()
        runtime.stop_accepting()
        runtime.close_all_sessions()
        loop.run_until_complete(asyncio.sleep(0.1))

    poke, stall = socket.socketpair()

    def stalled() -> None:
        stall.recv(1)
        time.sleep(2.0)  # as a burst of handshakes in read callbacks would take

    loop.add_reader(stall.fileno(), stalled)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert started.wait(10)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"a")
            assert client.recv(16) == b"a"
            time.sleep(1.5)
            poke.send(b"!")  # the stall, 1.5 s to 3.5 s: an I/O callback's work
            time.sleep(0.3)
            client.sendall(b"b")  # in lb's socket buffer before the 2 s timeout
            assert client.recv(16) == b"b"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        backend.close()
        poke.close()
        stall.close()
