"""Real processes and sockets for integration tests: free ports, lb and HAProxy subprocesses,
and backends that decode the PROXY header they receive and report it.

Everything listens on 127.0.0.1, on ports the OS hands out; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lb.proxyproto import NEED_DATA, ProxyHeader, ProxyProtocolDecoder, ProxyProtocolError

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
APT_TIMEOUT = 600.0


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)


def apt_install(*packages: str) -> str | None:
    """Install Debian packages as ./dev setup does; None when done, else why not."""
    if os.geteuid() != 0:
        return f"not root: cannot apt-get install {' '.join(packages)}"
    if shutil.which("apt-get") is None:
        return f"no apt-get to install {' '.join(packages)}"
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    for command in (
        ["apt-get", *lock, "update", "-q"],
        ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *packages],
    ):
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                check=False,
                timeout=APT_TIMEOUT,
                env=environment,
            )
        except subprocess.TimeoutExpired:
            return f"{' '.join(command)}: no result after {APT_TIMEOUT:.0f}s"
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-3:])
            return f"{' '.join(command)} failed: {tail}"
    return None


def haproxy_available() -> bool:
    return Path(HAPROXY).exists()


@dataclass
class Received:
    """What one backend connection received: the PROXY header (if any) and the payload."""

    header: ProxyHeader | None
    error: ProxyProtocolError | None
    data: bytearray = field(default_factory=bytearray)
    raw_header: bytes = b""
    peer: tuple[str, int] = ("", 0)


class EchoBackend:
    """A TCP server in a thread: optionally decodes a PROXY header, then echoes every byte
    back (prefixed with nothing), and records what it saw per connection."""

    def __init__(
        self,
        *,
        proxy: bool = True,
        name: str = "backend",
        greeting: bytes = b"",
        farewell: bytes = b"",
    ) -> None:
        self.proxy = proxy
        self.name = name
        self.greeting = greeting
        self.farewell = farewell
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = int(self.sock.getsockname()[1])
        self.connections: list[Received] = []
        self.lock = threading.Lock()
        self.closed = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.closed:
            try:
                connection, peer = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(connection, peer), daemon=True).start()

    def _handle(self, connection: socket.socket, peer: tuple[str, int]) -> None:
        record = Received(None, None, peer=peer)
        with self.lock:
            self.connections.append(record)
        connection.settimeout(30)
        with connection:
            decoder = ProxyProtocolDecoder() if self.proxy else None
            seen = bytearray()
            try:
                if self.greeting:
                    connection.sendall(self.greeting)
                while True:
                    chunk = connection.recv(65536)
                    if not chunk:
                        if self.farewell:
                            connection.sendall(self.farewell)
                        connection.shutdown(socket.SHUT_WR)
                        return
                    if decoder is not None:
                        seen.extend(chunk)
                        decoder.feed(chunk)
                        event = decoder.next_event()
                        if event is NEED_DATA:
                            continue
                        assert isinstance(event, ProxyHeader)
                        record.header = event
                        chunk = decoder.trailing_data
                        record.raw_header = bytes(seen[: len(seen) - len(chunk)])
                        decoder = None
                        if not chunk:
                            continue
                    record.data.extend(chunk)
                    connection.sendall(chunk)
            except ProxyProtocolError as error:
                record.error = error
            except OSError:
                return

    def wait_connections(self, count: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.connections) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {len(self.connections)} of {count} connections")
            time.sleep(0.01)
        return self.connections

    def close(self) -> None:
        self.closed = True
        close_listener(self.sock, self.thread)


def close_listener(sock: socket.socket, thread: threading.Thread) -> None:
    """Stop a test server's accept thread, then free its socket. Closed at once, the
    descriptor could be reused by the next test's server while the thread was about to call
    accept() on that number: the old server then took the new one's connections (a test saw
    "1 of 2 connections" at its backend while its data had been echoed, by the previous
    test's backend). shutdown() makes a waiting accept() fail; the descriptor is closed once
    the thread is gone."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    thread.join(5)
    sock.close()


def running_from(directory: Path) -> list[str]:
    """Command lines of live processes that name a file under `directory` (what a test that
    starts processes there checks is gone when it is done)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(directory) in command:
            found.append(command)
    return found


def run_bench(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run bench/`script` with `args` to its end (a bench smoke test); it must succeed."""
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-4000:]
    return completed


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for pid {pid}")


@dataclass
class Process:
    """A started subprocess with its output captured to files."""

    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_output(
        self, text: str, timeout: float = 10.0, stream: str = "both", since: int = 0
    ) -> str:
        """Wait until `text` appears in the output after character `since` (see `mark`)."""
        deadline = time.monotonic() + timeout
        while True:
            output = self.output(stream)[since:]
            if text in output:
                return output
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not in output after {timeout}s:\n{output}")
            time.sleep(0.02)

    def mark(self, stream: str = "both") -> int:
        """Where the output ends now, for wait_output(since=...)."""
        return len(self.output(stream))

    def output(self, stream: str = "both") -> str:
        if stream == "stdout":
            return self.stdout
        if stream == "stderr":
            return self.stderr
        return self.stdout + self.stderr

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return int(self.popen.returncode)


def start_process(args: list[str], directory: Path, name: str, **kwargs: object) -> Process:
    stdout_path = directory / f"{name}.stdout"
    stderr_path = directory / f"{name}.stderr"
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    popen = subprocess.Popen(
        args,
        stdout=stdout_path.open("wb"),
        stderr=stderr_path.open("wb"),
        stdin=subprocess.DEVNULL,
        env=env,
        **kwargs,  # type: ignore[call-overload]
    )
    return Process(popen, stdout_path, stderr_path)


@contextlib.contextmanager
def run_lb(
    config: str, directory: Path, port: int, name: str = "lb", host: str = "127.0.0.1"
) -> Iterator[Process]:
    """Write `config` to a file, start `lb -f` on it and wait until it listens on
    `host`:`port` (as lb's log prints the bind address: "::" for an IPv6 wildcard)."""
    path = directory / f"{name}.cfg"
    path.write_text(config)
    process = start_process([str(VENV_BIN / "lb"), "-db", "-f", str(path)], directory, name)
    try:
        try:
            # lb says when it listens; a probe connection would be a session of its own.
            process.wait_output(f"listening on {host}:{port}", 15, stream="stderr")
        except TimeoutError:
            process.stop()
            raise AssertionError(f"lb did not start:\n{process.stderr}") from None
        yield process
    finally:
        process.stop()


@contextlib.contextmanager
def run_haproxy(
    config: str, directory: Path, port: int, name: str = "haproxy"
) -> Iterator[Process]:
    path = directory / f"{name}.cfg"
    path.write_text(config)
    process = start_process([HAPROXY, "-db", "-f", str(path)], directory, name)
    try:
        try:
            wait_port(port, 15)
        except TimeoutError:
            process.stop()
            raise AssertionError(f"haproxy did not start:\n{process.stderr}") from None
        yield process
    finally:
        process.stop()


def socat(path: Path, command: str) -> str:
    """One command to lb's runtime API over its unix socket, with socat as operators do."""
    return subprocess.run(
        ["socat", "-t", "5", "-", f"UNIX-CONNECT:{path}"],
        input=command + "\n",
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout


def client_context(
    cert: Path | None = None, key: Path | None = None, ca: Path | None = None
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    if ca is not None:
        context.load_verify_locations(str(ca))
    else:
        context.verify_mode = ssl.CERT_NONE
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


def tls_roundtrip(
    port: int, context: ssl.SSLContext, payload: bytes = b"ping", timeout: float = 10.0
) -> bytes:
    """Connect with TLS, send `payload`, read the echo back (len(payload) bytes)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(payload)
        received = bytearray()
        while len(received) < len(payload):
            chunk = tls.recv(65536)
            if not chunk:
                break
            received.extend(chunk)
        return bytes(received)


def tls_outcome(port: int, context: ssl.SSLContext, timeout: float = 10.0) -> str:
    """'ok' if a TLS session through the balancer echoes a message, else the error text.

    With TLS 1.3 the server verifies the client certificate after the client considers the
    handshake done, so a refusal shows up on the first read, as an alert or an EOF."""
    try:
        echoed = tls_roundtrip(port, context, b"hello", timeout)
    except (ssl.SSLError, OSError) as error:
        return f"refused: {error}"
    return "ok" if echoed == b"hello" else f"refused: got {echoed!r}"
