"""lb's TLS bind options over real handshakes: several crt picked by SNI (with the right
chain), ALPN selection and its PROXY v2 TLV, the cert-key/cert-sig TLVs of the certificate
each connection was served (SNI, `commit ssl cert`), TLS 1.2 resumption with the client
certificate remembered by the session (PP2_CLIENT_CERT_SESS without CERT_CONN), and openssl
s_client as a second, independent client."""

from __future__ import annotations

import select
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from bench.ports import free_port
from lb import proxyproto
from lb.pki.certs import make_server, write_allinone
from tests.harness import EchoBackend, client_context, run_lb
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(60)


def tls_config(
    port: int, bind: str, backend: EchoBackend, options: str = "ssl,cert-cn", global_: str = ""
) -> str:
    return f"""
global
    maxconn 100
    log stdout format raw local0
{global_}defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:{port} {bind}
    default_backend be
backend be
    server echo 127.0.0.1:{backend.port} send-proxy-v2 proxy-v2-options {options}
"""


def _peer_subject(port: int, server_name: str, ca: Path) -> str:
    context = client_context(None, None, ca)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        certificate = tls.getpeercert()
        assert certificate is not None
        return dict(item[0] for item in certificate["subject"])["commonName"]


def test_sni_picks_the_certificate_and_its_chain(pki: TestPKI, tmp_path: Path) -> None:
    other = make_server(
        pki.intermediate_issued, "broker.example", dns_names=["broker.example"], ip_addresses=[]
    )
    other_pem = write_allinone(tmp_path / "other.pem", other)
    backend = EchoBackend()
    port = free_port()
    bind = f"ssl crt {pki.server_allinone} crt {other_pem}"
    with run_lb(tls_config(port, bind, backend), tmp_path, port):
        # Verification against the root alone proves that the intermediate was sent too.
        assert _peer_subject(port, "broker.example", pki.root) == "broker.example"
        assert _peer_subject(port, "localhost", pki.root) == "lb.local"
        assert _peer_subject(port, "unknown.example", pki.root) == "lb.local"  # the default
    backend.close()


def test_sni_with_client_verification_uses_the_same_trust(pki: TestPKI, tmp_path: Path) -> None:
    """With several crt, the context SNI switches to verifies clients like the default one:
    same CAs, CRLs and acceptable CA names (a device sending SNI is not refused)."""
    other = make_server(
        pki.intermediate_issued, "broker.example", dns_names=["broker.example"], ip_addresses=[]
    )
    other_pem = write_allinone(tmp_path / "other.pem", other)
    backend = EchoBackend()
    port = free_port()
    bind = (
        f"ssl crt {pki.server_allinone} crt {other_pem} ca-file {pki.intermediate} "
        f"ca-verify-file {pki.root} verify required crl-file {pki.crl}"
    )
    device = pki.device(24)
    with run_lb(tls_config(port, bind, backend), tmp_path, port):
        for server_name in ("broker.example", "localhost", "unknown.example"):
            context = client_context(device.cert, device.key, pki.root)
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname=server_name) as tls,
            ):
                tls.sendall(b"sni")
                assert tls.recv(3) == b"sni", server_name
        revoked = client_context(pki.revoked.cert, pki.revoked.key, pki.root)
        with (
            pytest.raises((ssl.SSLError, OSError)),
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            revoked.wrap_socket(raw, server_hostname="broker.example") as tls,
        ):
            tls.sendall(b"sni")
            if not tls.recv(3):
                raise ConnectionResetError("closed")
    backend.close()


def _ssl_tlv(backend: EchoBackend, port: int, server_name: str, ca: Path) -> tuple[str, str]:
    """One round trip with `server_name` as SNI; the cert-key and cert-sig lb sent along."""
    seen = len(backend.connections)
    context = client_context(None, None, ca)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        tls.sendall(b"k")
        assert tls.recv(1) == b"k"
    header = backend.wait_connections(seen + 1)[seen].header
    assert header is not None and header.ssl is not None
    assert header.ssl.key_alg is not None and header.ssl.sig_alg is not None
    return header.ssl.key_alg, header.ssl.sig_alg


def _runtime_api(path: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(command.encode() + b"\n")
        answer = bytearray()
        while chunk := sock.recv(65536):
            answer.extend(chunk)
    return answer.decode()


def test_cert_key_and_sig_describe_the_certificate_served(pki: TestPKI, tmp_path: Path) -> None:
    """proxy-v2-options cert-key,cert-sig describe the certificate this connection got: the
    one its SNI picked, and after `commit ssl cert` the new one (they were worked out once
    per bind line, from its first crt)."""
    rsa_other = make_server(
        pki.intermediate_issued,
        "broker.example",
        dns_names=["broker.example"],
        ip_addresses=[],
        key_type="rsa2048",
    )
    other_pem = write_allinone(tmp_path / "other.pem", rsa_other)
    default = tmp_path / "default.pem"
    default.write_bytes(pki.server_allinone.read_bytes())
    rsa_default = make_server(
        pki.intermediate_issued, "lb.local", dns_names=["localhost"], key_type="rsa2048"
    )
    payload = write_allinone(tmp_path / "rsa-default.pem", rsa_default).read_text()
    backend = EchoBackend()
    port = free_port()
    sock = tmp_path / "lb.sock"
    config = tls_config(
        port,
        f"ssl crt {default} crt {other_pem}",
        backend,
        "ssl,cert-key,cert-sig",
        global_=f"    stats socket {sock} mode 600 level admin\n",
    )
    with run_lb(config, tmp_path, port) as lb:
        lb.wait_output("stats socket listening", stream="stderr")
        assert _ssl_tlv(backend, port, "localhost", pki.root) == ("EC256", "ecdsa-with-SHA256")
        assert _ssl_tlv(backend, port, "broker.example", pki.root)[0] == "RSA2048"
        answer = _runtime_api(sock, f"set ssl cert {default} <<\n{payload}\n")
        assert "Transaction created" in answer
        assert "Success!" in _runtime_api(sock, f"commit ssl cert {default}")
        assert _ssl_tlv(backend, port, "localhost", pki.root) == ("RSA2048", "ecdsa-with-SHA256")
        assert _ssl_tlv(backend, port, "broker.example", pki.root)[0] == "RSA2048"
    backend.close()


def test_alpn_selected_and_sent_in_proxy_header(pki: TestPKI, tmp_path: Path) -> None:
    backend = EchoBackend()
    port = free_port()
    bind = f"ssl crt {pki.server_allinone} alpn mqtt,x-other"
    with run_lb(tls_config(port, bind, backend), tmp_path, port):
        context = client_context(None, None, pki.root)
        context.set_alpn_protocols(["x-unknown", "mqtt"])
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.selected_alpn_protocol() == "mqtt"
            tls.sendall(b"x")
            assert tls.recv(1) == b"x"
    header = backend.wait_connections(1)[0].header
    assert header is not None
    assert header.alpn == b"mqtt"
    assert header.ssl is not None and header.ssl.client == proxyproto.ClientFlags.SSL
    backend.close()


def test_tls12_resumption_keeps_the_client_certificate(pki: TestPKI, tmp_path: Path) -> None:
    backend = EchoBackend()
    port = free_port()
    bind = (
        f"ssl crt {pki.server_allinone} ca-file {pki.intermediate} "
        f"ca-verify-file {pki.root} verify required ssl-max-ver TLSv1.2"
    )
    device = pki.device(10)
    with run_lb(tls_config(port, bind, backend), tmp_path, port):
        context = client_context(device.cert, device.key, pki.root)
        session = None
        for _ in range(2):
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
            ):
                tls.sendall(b"r")
                assert tls.recv(1) == b"r"
                reused = tls.session_reused
                session = tls.session
        assert reused, "the second handshake was not resumed"
    first, second = (c.header for c in backend.wait_connections(2)[:2])
    assert first is not None and second is not None
    assert first.ssl is not None and second.ssl is not None
    flags = proxyproto.ClientFlags
    assert first.ssl.client == flags.SSL | flags.CERT_CONN | flags.CERT_SESS
    # Resumed: the certificate comes from the session, not from this connection (HAProxy).
    assert second.ssl.client == flags.SSL | flags.CERT_SESS
    assert second.ssl.cn == device.cn and second.ssl.verify == 0
    backend.close()


def test_openssl_s_client_with_device_certificate(pki: TestPKI, tmp_path: Path) -> None:
    backend = EchoBackend()
    port = free_port()
    bind = (
        f"ssl crt {pki.server_allinone} ca-file {pki.intermediate} "
        f"ca-verify-file {pki.root} verify required"
    )
    device = pki.device(11)
    with run_lb(tls_config(port, bind, backend), tmp_path, port):
        command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}"]
        command += ["-CAfile", str(pki.root), "-cert", str(device.cert), "-key", str(device.key)]
        command += ["-verify_return_error", "-quiet", "-no_ign_eof"]
        client = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write(b"through openssl\n")
            client.stdin.flush()
            ready, _, _ = select.select([client.stdout], [], [], 20)
            assert ready, "no echo from lb"
            assert client.stdout.readline() == b"through openssl\n"
            client.stdin.close()  # s_client sends close_notify; lb passes the EOF on
            assert client.wait(20) == 0
        finally:
            client.kill()
            client.wait(5)
    header = backend.wait_connections(1)[0].header
    assert header is not None and header.ssl is not None
    assert header.ssl.cn == device.cn
    backend.close()


def test_plain_tcp_to_a_tls_port_is_refused_and_explained(pki: TestPKI, tmp_path: Path) -> None:
    backend = EchoBackend()
    port = free_port()
    with run_lb(tls_config(port, f"ssl crt {pki.server_allinone}", backend), tmp_path, port) as lb:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c")  # an MQTT CONNECT, no TLS
            raw.recv(100)  # an alert, or the close
        output = lb.wait_output("SSL handshake failure", 5)
    line = next(line for line in output.splitlines() if "SSL handshake failure" in line)
    assert "not a TLS client hello" in line, line
    assert backend.connections == []
    backend.close()
