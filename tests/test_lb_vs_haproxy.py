"""lb and HAProxy 2.6 side by side: the same configuration text, the same certificates, the
same clients; both must accept and refuse exactly the same handshakes and send the same
PROXY v2 header bytes (but for the addresses, which are each balancer's own).

One HAProxy and one lb process run the same haproxy.cfg (ports differ); each frontend is a
variant of seed 004's bind line.
"""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.ports import free_port
from lb import proxyproto
from tests.harness import (
    EchoBackend,
    Process,
    client_context,
    run_haproxy,
    run_lb,
    tls_outcome,
)
from tests.pki import DeviceFiles, TestPKI

pytestmark = [pytest.mark.haproxy, pytest.mark.timeout(120)]

FRONTENDS = ("seed", "crl", "crl_partial", "optional", "root_only", "tls13")


def config_text(pki: TestPKI, ports: dict[str, int], backend_port: int) -> str:
    """One haproxy.cfg for both balancers; only the ports differ."""
    common = f"ssl crt {pki.server_allinone} ca-file {pki.intermediate} ca-verify-file {pki.root}"
    binds = {
        "seed": f"{common} verify required",
        "crl": f"{common} verify required crl-file {pki.crl}",
        "crl_partial": f"{common} verify required crl-file {pki.crl_intermediate_only}",
        "optional": f"{common} verify optional",
        "root_only": f"ssl crt {pki.server_allinone} ca-file {pki.root} verify required",
        "tls13": f"{common} verify required ssl-min-ver TLSv1.3",
    }
    sections = [
        "global\n    maxconn 1000\n    log stdout format raw local0\n",
        "defaults\n    mode tcp\n    log global\n    option tcplog\n"
        "    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n",
    ]
    for name in FRONTENDS:
        sections.append(
            f"frontend {name}\n    bind 127.0.0.1:{ports[name]} {binds[name]}\n"
            "    default_backend echo\n"
        )
    sections.append(
        "backend echo\n    balance roundrobin\n"
        f"    server echo1 127.0.0.1:{backend_port} send-proxy-v2-ssl-cn\n"
    )
    return "\n".join(sections)


@dataclass
class Balancers:
    pki: TestPKI
    backend: EchoBackend
    ports: dict[str, dict[str, int]]  # balancer -> frontend -> port
    processes: dict[str, Process]


@pytest.fixture(scope="module")
def balancers(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancers]:
    directory = tmp_path_factory.mktemp("vs-haproxy")
    backend = EchoBackend()
    ports = {b: {f: free_port() for f in FRONTENDS} for b in ("lb", "haproxy")}
    lb_config = config_text(pki, ports["lb"], backend.port)
    haproxy_config = config_text(pki, ports["haproxy"], backend.port)
    try:
        with (
            run_haproxy(haproxy_config, directory, ports["haproxy"]["seed"]) as haproxy,
            run_lb(lb_config, directory, ports["lb"]["seed"]) as lb,
        ):
            yield Balancers(pki, backend, ports, {"lb": lb, "haproxy": haproxy})
    finally:
        backend.close()


def _context(device: DeviceFiles | None, pki: TestPKI) -> ssl.SSLContext:
    if device is None:
        return client_context(None, None, pki.root)
    return client_context(
        device.chain if device.cn == "device-by-root" else device.cert, device.key, pki.root
    )


Case = tuple[str, str, Callable[[TestPKI], DeviceFiles | None], str]
CASES: list[Case] = [
    ("good device", "seed", lambda p: p.device(1), "ok"),
    ("device signed by the root", "seed", lambda p: p.by_root, "ok"),
    ("expired", "seed", lambda p: p.expired, "refused"),
    ("not yet valid", "seed", lambda p: p.not_yet_valid, "refused"),
    ("rogue CA", "seed", lambda p: p.rogue, "refused"),
    ("self-signed", "seed", lambda p: p.self_signed, "refused"),
    ("server purpose only", "seed", lambda p: p.server_purpose, "refused"),
    ("no certificate, verify required", "seed", lambda p: None, "refused"),
    ("good device, CRL for both levels", "crl", lambda p: p.device(2), "ok"),
    ("revoked device", "crl", lambda p: p.revoked, "refused"),
    ("good device, CRL only for the intermediate", "crl_partial", lambda p: p.device(3), "refused"),
    ("no certificate, verify optional", "optional", lambda p: None, "ok"),
    ("good device, verify optional", "optional", lambda p: p.device(4), "ok"),
    ("expired, verify optional", "optional", lambda p: p.expired, "refused"),
    (
        "intermediate not trusted (root only in ca-file)",
        "root_only",
        lambda p: p.device(5),
        "refused",
    ),
    ("good device, TLS 1.3 only", "tls13", lambda p: p.device(6), "ok"),
]


@pytest.mark.parametrize(
    ("label", "frontend", "device", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_same_verdict_as_haproxy(
    balancers: Balancers,
    label: str,
    frontend: str,
    device: Callable[[TestPKI], DeviceFiles | None],
    expected: str,
) -> None:
    context = _context(device(balancers.pki), balancers.pki)
    outcomes = {
        name: tls_outcome(balancers.ports[name][frontend], context) for name in ("haproxy", "lb")
    }
    verdicts = {name: outcome.split(":")[0] for name, outcome in outcomes.items()}
    assert verdicts["haproxy"] == expected, f"{label}: HAProxy said {outcomes['haproxy']}"
    assert verdicts["lb"] == verdicts["haproxy"], f"{label}: {outcomes}"


def test_tls12_client_refused_by_tls13_only(balancers: Balancers) -> None:
    pki = balancers.pki
    device = pki.device(7)
    context = client_context(device.cert, device.key, pki.root)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    for name in ("haproxy", "lb"):
        assert tls_outcome(balancers.ports[name]["tls13"], context).startswith("refused")
    assert "protocol version" in balancers.processes["lb"].wait_output("protocol version", 5)


def _header_from(
    balancers: Balancers,
    name: str,
    frontend: str,
    device: DeviceFiles | None,
    tls_version: ssl.TLSVersion | None = None,
) -> tuple[proxyproto.ProxyHeader, bytes]:
    pki = balancers.pki
    context = _context(device, pki)
    if tls_version is not None:
        context.minimum_version = context.maximum_version = tls_version
    before = len(balancers.backend.connections)
    assert tls_outcome(balancers.ports[name][frontend], context) == "ok"
    connections = balancers.backend.wait_connections(before + 1)
    received = connections[before]
    assert received.header is not None, received.error
    return received.header, received.raw_header


@pytest.mark.parametrize("tls_version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
@pytest.mark.parametrize("with_certificate", [True, False])
def test_proxy_v2_header_matches_haproxy(
    balancers: Balancers, tls_version: ssl.TLSVersion, with_certificate: bool
) -> None:
    """Field by field, then byte for byte once the addresses are put in."""
    device = balancers.pki.device(8) if with_certificate else None
    theirs, their_bytes = _header_from(balancers, "haproxy", "optional", device, tls_version)
    ours, our_bytes = _header_from(balancers, "lb", "optional", device, tls_version)
    assert theirs.ssl is not None and ours.ssl is not None
    assert ours.ssl.client == theirs.ssl.client
    assert ours.ssl.verify == theirs.ssl.verify == 0
    assert ours.ssl.version == theirs.ssl.version
    assert ours.ssl.cn == theirs.ssl.cn == (device.cn if device else None)
    assert [t for t, _ in ours.tlvs] == [t for t, _ in theirs.tlvs]
    assert ours.source is not None and theirs.source is not None
    assert ours.source[0] == theirs.source[0] == "127.0.0.1"
    assert ours.destination == ("127.0.0.1", balancers.ports["lb"]["optional"])
    assert theirs.destination == ("127.0.0.1", balancers.ports["haproxy"]["optional"])
    # Our header is HAProxy's header with our addresses in it.
    rebuilt = proxyproto.encode_v2(
        proxyproto.Command.PROXY, ours.source, ours.destination, ssl=theirs.ssl
    )
    assert our_bytes == rebuilt
    assert their_bytes == proxyproto.encode_v2(
        proxyproto.Command.PROXY, theirs.source, theirs.destination, ssl=theirs.ssl
    )


def test_refusal_log_lines_explain(balancers: Balancers) -> None:
    """HAProxy says 'SSL handshake failure'; lb says why, with names, depth and subjects."""
    pki = balancers.pki
    lb = balancers.processes["lb"]
    cases = [
        (pki.expired, "seed", "client certificate expired on", "X509_V_ERR_CERT_HAS_EXPIRED"),
        (pki.revoked, "crl", "client certificate revoked on", "X509_V_ERR_CERT_REVOKED"),
        (pki.rogue, "seed", "unknown CA", "X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY"),
        (pki.not_yet_valid, "seed", "not yet valid", "X509_V_ERR_CERT_NOT_YET_VALID"),
        (pki.server_purpose, "seed", "bad purpose", "X509_V_ERR_INVALID_PURPOSE"),
        (pki.self_signed, "seed", "self-signed", "X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT"),
        (pki.device(9), "crl_partial", "no CRL in crl-file", "X509_V_ERR_UNABLE_TO_GET_CRL"),
    ]
    for device, frontend, words, name in cases:
        mark = lb.mark("stdout")
        tls_outcome(balancers.ports["lb"][frontend], _context(device, pki))
        output = lb.wait_output(name, 5, stream="stdout", since=mark)
        line = next(line for line in output.splitlines() if name in line and "handshake" in line)
        assert words in line, line
        assert "depth " in line
        assert f'subject="CN={device.cn}"' in line or name == "X509_V_ERR_UNABLE_TO_GET_CRL"
        assert line.startswith("127.0.0.1:")
    tls_outcome(balancers.ports["lb"]["seed"], client_context(None, None, pki.root))
    lb.wait_output("no client certificate (verify required)", 5)


def test_client_ca_names_announced_are_ca_file_only(balancers: Balancers, tmp_path: Path) -> None:
    """ca-file names are the acceptable CAs in the CertificateRequest; ca-verify-file's are not
    (as HAProxy). Checked with openssl s_client, which prints them."""
    for name in ("haproxy", "lb"):
        result = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{balancers.ports[name]['seed']}",
                "-tls1_2",
            ],
            input=b"",
            capture_output=True,
            timeout=20,
            check=False,
        )
        text = result.stdout.decode(errors="replace")
        section = text.split("Acceptable client certificate CA names")[1].split("Requested")[0]
        assert "Test Intermediate CA" in section, (name, section)
        assert "Test Root CA" not in section, (name, section)
    del tmp_path
