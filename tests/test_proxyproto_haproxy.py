"""lb.proxyproto against a real HAProxy 2.6 (Debian's /usr/sbin/haproxy).

HAProxy is the sender (``send-proxy``, ``send-proxy-v2``, ``proxy-v2-options``, health
checks) and, with ``accept-proxy``, a strict receiver of our own headers. We capture what it
writes to a Python socket server, decode it, and check that our encoders produce the same
bytes for the same inputs. TLS cases are in the lead's TLS tests.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.ports import free_port
from lb.proxyproto import (
    NEED_DATA,
    ClientFlags,
    Command,
    ProxyHeader,
    ProxyProtocolDecoder,
    ProxyProtocolError,
    SSLInfo,
    encode_v1,
    encode_v2,
)

HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
)

pytestmark = [
    pytest.mark.haproxy,
    pytest.mark.timeout(60),
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed"),
]

PAYLOAD = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c"


class Captured:
    """One connection HAProxy made to the capture server: everything it sent until EOF."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        decoder = ProxyProtocolDecoder(max_v2_length=65535)
        decoder.feed(raw)
        decoder.feed(b"")
        event = decoder.next_event()
        assert event is not NEED_DATA
        self.header: ProxyHeader = event
        self.trailing = decoder.trailing_data
        self.header_bytes = raw[: len(raw) - len(self.trailing)]


class CaptureServer:
    """A plain TCP server on 127.0.0.1 recording the bytes of each connection."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.connections: list[bytes] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._read, args=(connection,), daemon=True).start()

    def _read(self, connection: socket.socket) -> None:
        chunks = []
        connection.settimeout(5)
        with connection, contextlib.suppress(OSError):
            while chunk := connection.recv(65536):
                chunks.append(chunk)
        with self.lock:
            self.connections.append(b"".join(chunks))

    def wait_for(self, predicate: Callable[[Captured], bool], timeout: float = 10) -> Captured:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                raws = list(self.connections)
            for raw in raws:
                if not raw:
                    continue
                captured = Captured(raw)
                if predicate(captured):
                    return captured
            time.sleep(0.02)
        raise AssertionError(f"nothing matching arrived; got {raws!r}")

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()
        self.thread.join(timeout=2)


@pytest.fixture
def capture() -> Iterator[CaptureServer]:
    server = CaptureServer()
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def run_haproxy(
    tmp_path: Path, server_port: int, *, bind: str = "", server: str = "", frontend: str = ""
) -> Iterator[int]:
    """Start HAProxy in the foreground with a one-server TCP proxy; yield its port."""
    assert HAPROXY is not None
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        f"""
global
    pidfile {tmp_path}/haproxy.pid

defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s

frontend fe
    bind 127.0.0.1:{port} {bind}
    {frontend}
    default_backend be

backend be
    server s1 127.0.0.1:{server_port} {server}
"""
    )
    process = subprocess.Popen(
        [HAPROXY, "-db", "-f", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                output = process.stdout.read().decode() if process.stdout else ""
                raise AssertionError(f"haproxy exited {process.returncode}: {output}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        process.kill()
        process.wait(timeout=10)
        if process.stdout:
            process.stdout.close()


def connect_and_send(port: int, data: bytes) -> tuple[str, int]:
    """Connect, send ``data``, half-close, wait for the proxy to close; return our address."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        address = client.getsockname()[:2]
        with contextlib.suppress(OSError):  # a refusing peer may reset us early
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
            while client.recv(4096):
                pass
    return address[0], address[1]


def from_client(client: tuple[str, int]) -> Callable[[Captured], bool]:
    return lambda captured: captured.header.source == client


# --- HAProxy as the sender ------------------------------------------------------------------


def test_send_proxy_v1(tmp_path: Path, capture: CaptureServer) -> None:
    with run_haproxy(tmp_path, capture.port, server="send-proxy") as port:
        client = connect_and_send(port, PAYLOAD)
        captured = capture.wait_for(from_client(client))
    assert captured.header.version == 1
    assert captured.header.destination == ("127.0.0.1", port)
    assert captured.trailing == PAYLOAD
    assert captured.header_bytes == encode_v1(client, ("127.0.0.1", port))


def test_send_proxy_v2(tmp_path: Path, capture: CaptureServer) -> None:
    with run_haproxy(tmp_path, capture.port, server="send-proxy-v2") as port:
        client = connect_and_send(port, PAYLOAD)
        captured = capture.wait_for(from_client(client))
    assert captured.header.version == 2
    assert captured.header.command is Command.PROXY
    assert captured.header.transport == "tcp"
    assert captured.header.tlvs == ()
    assert captured.trailing == PAYLOAD
    assert captured.header_bytes == encode_v2(Command.PROXY, client, ("127.0.0.1", port))


def test_send_proxy_v2_options(tmp_path: Path, capture: CaptureServer) -> None:
    with run_haproxy(
        tmp_path,
        capture.port,
        frontend=r"unique-id-format %{+X}o\ %ci:%cp_%fi:%fp_%Ts_%rt:%pid",
        server="send-proxy-v2 proxy-v2-options crc32c,unique-id,authority,ssl,cert-cn",
    ) as port:
        client = connect_and_send(port, PAYLOAD)
        captured = capture.wait_for(from_client(client))
    header = captured.header
    assert header.unique_id is not None and header.unique_id.startswith(b"7F000001:")
    assert header.authority is None  # no TLS, no received authority: HAProxy omits it
    assert header.ssl == SSLInfo(ClientFlags(0), 0)  # a plain TCP client: empty SSL TLV
    assert [tlv_type for tlv_type, _ in header.tlvs] == [0x03, 0x05, 0x20]
    assert captured.trailing == PAYLOAD
    assert captured.header_bytes == encode_v2(
        Command.PROXY,
        client,
        ("127.0.0.1", port),
        unique_id=header.unique_id,
        ssl=SSLInfo(ClientFlags(0), 0),
        crc32c=True,
    )


@pytest.mark.parametrize(
    ("options", "ssl"),
    [("", None), ("proxy-v2-options crc32c", None), ("proxy-v2-options crc32c,ssl", "empty")],
)
def test_health_check_sends_local(
    tmp_path: Path, capture: CaptureServer, options: str, ssl: str | None
) -> None:
    with run_haproxy(tmp_path, capture.port, server=f"send-proxy-v2 {options} check inter 100"):
        captured = capture.wait_for(lambda captured: captured.header.is_local)
    assert captured.header.source is None
    assert captured.trailing == b""
    expected_ssl = SSLInfo(ClientFlags(0), 0) if ssl else None
    assert captured.header.ssl == expected_ssl
    assert captured.header_bytes == encode_v2(
        Command.LOCAL, None, None, crc32c="crc32c" in options, ssl=expected_ssl
    )


def test_health_check_v1_sends_real_addresses(tmp_path: Path, capture: CaptureServer) -> None:
    with run_haproxy(tmp_path, capture.port, server="send-proxy check inter 100"):
        captured = capture.wait_for(
            lambda captured: captured.header.destination == ("127.0.0.1", capture.port)
        )
    assert captured.header.version == 1
    assert captured.header.source is not None
    assert captured.header_bytes == encode_v1(captured.header.source, ("127.0.0.1", capture.port))


# --- HAProxy as a strict receiver of our headers, relaying them ----------------------------

ADDRESS_PAIRS = [
    (("192.0.2.10", 40000), ("198.51.100.1", 8883)),
    (("192.0.2.10", 0), ("2001:db8::1", 65535)),
    (("2001:db8:0:0:1:0:0:1", 1), ("10.0.0.1", 8883)),
    (("::2", 2), ("::1.2.3.4", 3)),
    (("fe80::1:0:0:0", 4), ("::", 5)),
    (("2001:db8::", 6), ("1:0:0:1:0:0:0:1", 7)),
]


@pytest.mark.parametrize(("source", "destination"), ADDRESS_PAIRS)
def test_relay_our_v2_header_through_accept_proxy(
    tmp_path: Path,
    capture: CaptureServer,
    source: tuple[str, int],
    destination: tuple[str, int],
) -> None:
    ours = encode_v2(Command.PROXY, source, destination, authority="broker.example", crc32c=True)
    with run_haproxy(
        tmp_path,
        capture.port,
        bind="accept-proxy",
        server="send-proxy-v2 proxy-v2-options crc32c,authority",
    ) as port:
        connect_and_send(port, ours + PAYLOAD)
        captured = capture.wait_for(lambda captured: captured.header.authority is not None)
    assert captured.trailing == PAYLOAD
    # HAProxy re-emits what it received: same addresses, same authority, same bytes as ours
    assert captured.header_bytes == ours
    header = ProxyProtocolDecoder()
    header.feed(ours)
    assert captured.header == header.next_event()


@pytest.mark.parametrize(("source", "destination"), ADDRESS_PAIRS)
def test_relay_our_v1_header_as_v1(
    tmp_path: Path,
    capture: CaptureServer,
    source: tuple[str, int],
    destination: tuple[str, int],
) -> None:
    """HAProxy prints addresses with glibc inet_ntop; encode_v1 must print the same."""
    ours = encode_v1(source, destination)
    with run_haproxy(tmp_path, capture.port, bind="accept-proxy", server="send-proxy") as port:
        connect_and_send(port, ours + PAYLOAD)
        captured = capture.wait_for(lambda captured: captured.header.source is not None)
    assert captured.trailing == PAYLOAD
    assert captured.header_bytes == ours


def test_relay_v1_to_v2(tmp_path: Path, capture: CaptureServer) -> None:
    source, destination = ("192.0.2.10", 1234), ("::ffff:198.51.100.1", 8883)
    with run_haproxy(tmp_path, capture.port, bind="accept-proxy", server="send-proxy-v2") as port:
        connect_and_send(port, encode_v1(source, destination) + PAYLOAD)
        captured = capture.wait_for(lambda captured: captured.header.source is not None)
    assert captured.header_bytes == encode_v2(Command.PROXY, source, destination)


def test_haproxy_rejects_what_we_reject(tmp_path: Path, capture: CaptureServer) -> None:
    """A wrong CRC32C: HAProxy closes without connecting to the server; we refuse too."""
    good = encode_v2(Command.PROXY, ("192.0.2.1", 1), ("192.0.2.2", 2), crc32c=True)
    bad = good[:-1] + bytes([good[-1] ^ 0xFF])
    decoder = ProxyProtocolDecoder()
    decoder.feed(bad)
    with pytest.raises(ProxyProtocolError) as info:
        decoder.next_event()
    assert info.value.reason == "crc_mismatch"
    with run_haproxy(tmp_path, capture.port, bind="accept-proxy", server="send-proxy-v2") as port:
        connect_and_send(port, bad + PAYLOAD)
        connect_and_send(port, good + PAYLOAD)
        capture.wait_for(lambda captured: captured.header.source == ("192.0.2.1", 1))
        with capture.lock:
            relayed = [raw for raw in capture.connections if raw]
    assert len(relayed) == 1
