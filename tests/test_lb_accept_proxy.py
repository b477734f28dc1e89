"""`bind ... accept-proxy`: lb behind another balancer (seed 004's cloud NLB) takes the
device's real address from the PROXY header in front of the TLS handshake and passes it on
to the brokers; a connection without a valid header is refused in HAProxy's words."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from bench.ports import free_port
from lb import proxyproto
from lb.config import load_config_text
from tests.harness import EchoBackend, client_context, run_haproxy, run_lb
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(60)


def config_text(pki: TestPKI, port: int, backend: EchoBackend) -> str:
    tls = f"crt {pki.server_allinone} ca-file {pki.intermediate} ca-verify-file {pki.root}"
    return f"""
global
    log stdout format raw local0
defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 5s
    timeout server 30s
frontend devices
    bind 127.0.0.1:{port} accept-proxy accept-proxy-from 127.0.0.1/32 ssl {tls} verify required
    default_backend brokers
backend brokers
    server broker1 127.0.0.1:{backend.port} send-proxy-v2-ssl-cn
"""


def tls_after(header: bytes, port: int, context: ssl.SSLContext) -> bytes:
    """Send `header` in clear, then speak TLS on the same connection; return the echo."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(header)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"through")
            return tls.recv(100)


def test_real_address_from_the_header_reaches_the_broker(pki: TestPKI, tmp_path: Path) -> None:
    backend = EchoBackend()
    port = free_port()
    device = pki.device(20)
    context = client_context(device.cert, device.key, pki.root)
    with run_lb(config_text(pki, port, backend), tmp_path, port) as lb:
        v2 = proxyproto.encode_v2(
            proxyproto.Command.PROXY, ("198.51.100.7", 40001), ("192.0.2.1", 8883)
        )
        assert tls_after(v2, port, context) == b"through"
        v1 = proxyproto.encode_v1(("198.51.100.8", 40002), ("192.0.2.1", 8883))
        assert tls_after(v1, port, context) == b"through"
        log = lb.wait_output("198.51.100.8:40002", 5, stream="stdout")
    first, second = (c.header for c in backend.wait_connections(2)[:2])
    assert first is not None and second is not None
    assert first.source == ("198.51.100.7", 40001)
    assert first.destination == ("192.0.2.1", 8883)
    assert second.source == ("198.51.100.8", 40002)
    assert first.ssl is not None and first.ssl.cn == device.cn
    assert "198.51.100.7:40001 [" in log  # tcplog shows the device, not the NLB
    backend.close()


def test_local_header_keeps_the_connection_address(pki: TestPKI, tmp_path: Path) -> None:
    backend = EchoBackend()
    port = free_port()
    device = pki.device(21)
    context = client_context(device.cert, device.key, pki.root)
    with run_lb(config_text(pki, port, backend), tmp_path, port):
        local = proxyproto.encode_v2(proxyproto.Command.LOCAL, None, None)
        assert tls_after(local, port, context) == b"through"
    header = backend.wait_connections(1)[0].header
    assert header is not None and header.source is not None
    assert header.source[0] == "127.0.0.1"
    backend.close()


def test_missing_or_bad_header_is_refused_in_haproxy_words(pki: TestPKI, tmp_path: Path) -> None:
    backend = EchoBackend()
    port = free_port()
    device = pki.device(22)
    context = client_context(device.cert, device.key, pki.root)
    with run_lb(config_text(pki, port, backend), tmp_path, port) as lb:
        with pytest.raises((ssl.SSLError, OSError)):
            tls_after(b"", port, context)  # a TLS ClientHello where the header belongs
        lb.wait_output("Received something which does not look like a PROXY protocol header", 5)
        bad_v2 = bytearray(
            proxyproto.encode_v2(proxyproto.Command.PROXY, ("10.1.1.1", 1), ("10.1.1.2", 2))
        )
        bad_v2[13] = 0x41  # an undefined address family
        with pytest.raises((ssl.SSLError, OSError)):
            tls_after(bytes(bad_v2), port, context)
        lb.wait_output("Received an invalid PROXY protocol header", 5)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(proxyproto.encode_v2(proxyproto.Command.PROXY, ("10.1.1.1", 1), None)[:10])
            assert raw.recv(10) == b""  # timeout client (5 s) ends the wait
        lb.wait_output("Timeout while waiting for PROXY protocol header", 10)
    assert backend.connections == []
    backend.close()


@pytest.mark.haproxy
def test_behind_haproxy_sending_proxy_v2(pki: TestPKI, tmp_path: Path) -> None:
    """The seed's topology one level up: a TCP balancer in front (HAProxy standing in for the
    cloud NLB) passes TLS through with send-proxy-v2; lb terminates it and the broker sees
    the device's own address."""
    backend = EchoBackend()
    lb_port, front_port = free_port(), free_port()
    front = f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend nlb
    bind 127.0.0.1:{front_port}
    default_backend lbs
backend lbs
    server lb1 127.0.0.1:{lb_port} send-proxy-v2
"""
    device = pki.device(23)
    context = client_context(device.cert, device.key, pki.root)
    with (
        run_lb(config_text(pki, lb_port, backend), tmp_path, lb_port),
        run_haproxy(front, tmp_path, front_port),
        socket.create_connection(("127.0.0.1", front_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"via nlb")
        assert tls.recv(100) == b"via nlb"
        device_address = tls.getsockname()
    received = [c for c in backend.wait_connections(1) if bytes(c.data) == b"via nlb"]
    assert received and received[0].header is not None
    assert received[0].header.source == (device_address[0], device_address[1])
    assert received[0].header.ssl is not None and received[0].header.ssl.cn == device.cn
    backend.close()


def test_sender_outside_accept_proxy_from_is_refused_before_reading(
    pki: TestPKI, tmp_path: Path
) -> None:
    """Only the networks in accept-proxy-from may set a client's address; anyone else is
    closed before a byte is read, whatever it sends (127.0.0.2 is on loopback too)."""
    backend = EchoBackend()
    port = free_port()
    with run_lb(config_text(pki, port, backend), tmp_path, port) as lb:
        forged = proxyproto.encode_v2(
            proxyproto.Command.PROXY, ("203.0.113.9", 1234), ("192.0.2.1", 8883)
        )
        with socket.socket() as raw:
            raw.bind(("127.0.0.2", 0))
            raw.settimeout(10)
            raw.connect(("127.0.0.1", port))
            try:
                raw.sendall(forged)
                assert raw.recv(10) == b""
            except ConnectionResetError:
                pass
        line = lb.wait_output("source not in accept-proxy-from", 5)
        assert "127.0.0.2:" in line
        assert "203.0.113.9" not in line
    assert backend.connections == []
    backend.close()


def test_check_warns_about_accept_proxy_from_anyone(tmp_path: Path) -> None:
    text = (
        "defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 1s\n"
        "    timeout server 1s\n"
        "frontend fe\n    bind 127.0.0.1:8443 accept-proxy\n    default_backend be\n"
        "backend be\n    server s 127.0.0.1:1883\n"
    )
    warnings = [d.text for d in load_config_text(text, "x.cfg").warnings]
    assert any("accept-proxy-from" in w and "x.cfg:7" in w for w in warnings), warnings
    trusted = text.replace("accept-proxy\n", "accept-proxy accept-proxy-from 10.0.0.0/8\n")
    assert not [d for d in load_config_text(trusted, "x.cfg").warnings if "accept-proxy" in d.text]
    del tmp_path


@pytest.mark.parametrize(
    ("client", "networks"),
    [("127.0.0.1", "127.0.0.0/8"), ("::1", "::1/128")],
    ids=["ipv4-on-dual-stack", "ipv6"],
)
def test_dual_stack_bind_trusts_both_families(
    pki: TestPKI, tmp_path: Path, client: str, networks: str
) -> None:
    """An IPv6 bind (`:::port`) is dual-stack: an IPv4 sender arrives as ::ffff:127.0.0.1
    and `accept-proxy-from 127.0.0.0/8` must still match it (issue 14 item 12); an IPv6
    sender is matched as itself. A sender of the other family is refused."""
    backend = EchoBackend()
    port = free_port()
    device = pki.device(24)
    context = client_context(device.cert, device.key, pki.root)
    text = config_text(pki, port, backend).replace(
        f"bind 127.0.0.1:{port} accept-proxy accept-proxy-from 127.0.0.1/32",
        f"bind :::{port} accept-proxy accept-proxy-from {networks}",
    )
    header = proxyproto.encode_v2(
        proxyproto.Command.PROXY, ("198.51.100.9", 40009), ("192.0.2.1", 8883)
    )
    family = socket.AF_INET6 if ":" in client else socket.AF_INET
    other = "127.0.0.1" if ":" in client else "::1"
    with run_lb(text, tmp_path, port, host="::") as lb:
        with socket.socket(family, socket.SOCK_STREAM) as raw:
            raw.settimeout(10)
            raw.connect((client, port))
            raw.sendall(header)
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"dual")
                assert tls.recv(100) == b"dual"
        with socket.create_connection((other, port), timeout=10) as raw:
            raw.sendall(header)
            try:
                assert raw.recv(10) == b""
            except ConnectionResetError:
                pass
        lb.wait_output("source not in accept-proxy-from", 5)
    received = backend.wait_connections(1)[0]
    assert received.header is not None
    assert received.header.source == ("198.51.100.9", 40009)
    backend.close()
