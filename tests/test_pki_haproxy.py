"""HAProxy (Debian's 2.6) accepts the test PKI exactly as the seed (004) configures it.

``bind ... ssl crt server-allinone.pem ca-file CaIntermediate.pem ca-verify-file CaRoot.pem
verify required`` in front of a local echo socket; Python ssl clients present device
certificates. A good device gets its bytes echoed, a bad one is refused during the handshake.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.ports import free_port
from tests.harness import close_listener
from tests.pki import DeviceFiles, TestPKI

HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
)

pytestmark = [
    pytest.mark.haproxy,
    pytest.mark.timeout(60),
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (./dev setup as root)"),
]


class EchoServer:
    """A threaded TCP echo server on 127.0.0.1, the backend behind HAProxy."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(connection,), daemon=True).start()

    @staticmethod
    def _echo(connection: socket.socket) -> None:
        with connection:
            connection.settimeout(10)
            try:
                while data := connection.recv(65536):
                    connection.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        close_listener(self.listener, self._thread)


@dataclass
class HAProxy:
    port: int
    process: subprocess.Popen[bytes]


def start_haproxy(directory: Path, bind_options: str, backend_port: int) -> HAProxy:
    port = free_port()
    config = directory / f"haproxy-{port}.cfg"
    config.write_text(
        f"""\
global
    maxconn 100

defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s

frontend device_tls
    bind 127.0.0.1:{port} {bind_options}
    default_backend echo

backend echo
    server echo-1 127.0.0.1:{backend_port}
"""
    )
    assert HAPROXY is not None
    process = subprocess.Popen(
        [HAPROXY, "-db", "-f", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read().decode() if process.stdout else ""
            raise AssertionError(f"haproxy exited {process.returncode}:\n{output}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return HAProxy(port=port, process=process)
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError("haproxy did not start listening within 10 s")


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def seed_bind(pki: TestPKI, crl: Path | None = None) -> str:
    options = (
        f"ssl crt {pki.server_allinone} ca-file {pki.intermediate} "
        f"ca-verify-file {pki.root} verify required"
    )
    return options + (f" crl-file {crl}" if crl else "")


@pytest.fixture(scope="module")
def haproxy_seed(pki: TestPKI, echo: EchoServer) -> Iterator[HAProxy]:
    proxy = start_haproxy(pki.directory, seed_bind(pki), echo.port)
    try:
        yield proxy
    finally:
        proxy.process.kill()
        proxy.process.wait(timeout=10)


@pytest.fixture(scope="module")
def haproxy_crl(pki: TestPKI, echo: EchoServer) -> Iterator[HAProxy]:
    proxy = start_haproxy(pki.directory, seed_bind(pki, pki.crl), echo.port)
    try:
        yield proxy
    finally:
        proxy.process.kill()
        proxy.process.wait(timeout=10)


def exchange(pki: TestPKI, port: int, device: DeviceFiles | None) -> bytes:
    """Connect as ``device`` (verifying the server against the root), send, read the echo.

    Returns the echoed bytes, or b"" when the server refused (alert or close).
    """
    context = ssl.create_default_context(cafile=str(pki.root))
    if device is not None:
        context.load_cert_chain(str(device.cert), str(device.key))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"hello from a device\n")
                received = b""
                while len(received) < 20:
                    chunk = tls.recv(100)
                    if not chunk:
                        break
                    received += chunk
                return received
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return b""


def test_good_devices_get_through(pki: TestPKI, haproxy_seed: HAProxy) -> None:
    for number in (1, 2, 3):
        assert exchange(pki, haproxy_seed.port, pki.device(number)) == b"hello from a device\n"


@pytest.mark.parametrize(
    "case", ["rogue", "self_signed", "expired", "not_yet_valid", "server_purpose"]
)
def test_bad_devices_are_refused(pki: TestPKI, haproxy_seed: HAProxy, case: str) -> None:
    assert exchange(pki, haproxy_seed.port, getattr(pki, case)) == b""


def test_no_client_certificate_is_refused(pki: TestPKI, haproxy_seed: HAProxy) -> None:
    assert exchange(pki, haproxy_seed.port, None) == b""


def test_device_signed_by_root_is_accepted_too(pki: TestPKI, haproxy_seed: HAProxy) -> None:
    # Measured on HAProxy 2.6: ca-verify-file certificates join the verify store as trust
    # anchors (they are only left out of the CA names sent in the CertificateRequest), so a
    # device signed directly by the root passes as well. lb must behave the same.
    assert exchange(pki, haproxy_seed.port, pki.by_root) == b"hello from a device\n"


def test_revoked_device_is_refused_with_crl(pki: TestPKI, haproxy_crl: HAProxy) -> None:
    assert exchange(pki, haproxy_crl.port, pki.device(4)) == b"hello from a device\n"
    assert exchange(pki, haproxy_crl.port, pki.revoked) == b""


def test_revoked_device_passes_without_crl(pki: TestPKI, haproxy_seed: HAProxy) -> None:
    assert exchange(pki, haproxy_seed.port, pki.revoked) == b"hello from a device\n"


def test_crl_for_intermediate_only_refuses_everyone(pki: TestPKI, echo: EchoServer) -> None:
    proxy = start_haproxy(pki.directory, seed_bind(pki, pki.crl_intermediate_only), echo.port)
    try:
        assert exchange(pki, proxy.port, pki.device(5)) == b""
    finally:
        proxy.process.kill()
        proxy.process.wait(timeout=10)


def test_rsa_pki_good_and_rogue(pki_rsa: TestPKI, echo: EchoServer) -> None:
    proxy = start_haproxy(pki_rsa.directory, seed_bind(pki_rsa), echo.port)
    try:
        assert exchange(pki_rsa, proxy.port, pki_rsa.device(1)) == b"hello from a device\n"
        assert exchange(pki_rsa, proxy.port, pki_rsa.rogue) == b""
    finally:
        proxy.process.kill()
        proxy.process.wait(timeout=10)
