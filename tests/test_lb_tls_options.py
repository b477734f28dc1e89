"""crt-ignore-err, ca-ignore-err and verify-depth on real handshakes.

lb and HAProxy 2.6 run the same configuration text (only the ports differ) and must let
through and refuse exactly the same devices. Where HAProxy 2.6 has no such keyword (our
`verify-depth`, error names in the ignore lists) lb is tested alone and the difference is
pinned by a `haproxy -c` that refuses the keyword.

Differences from HAProxy 2.6 found here (documented, tested):

- `verify-depth` is an lb bind keyword (EMQX's `depth`, default 10); HAProxy 2.6 has none
  ("unknown keyword 'verify-depth'; did you mean 'verify' maybe ?") and always uses
  OpenSSL's default of 100.
- lb's ignore lists take OpenSSL's names (`X509_V_ERR_CERT_HAS_EXPIRED`) as well as ids, as
  HAProxy 2.8 does; HAProxy 2.6 takes ids only ("ID '0' out of range (1..94)").
"""

from __future__ import annotations

import datetime
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.ports import free_port
from lb.pki.certs import Issued, make_device, make_intermediate, write_certs, write_key
from tests.harness import (
    HAPROXY,
    VENV_BIN,
    EchoBackend,
    Process,
    client_context,
    run_haproxy,
    run_lb,
    tls_outcome,
)
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(120)


@dataclass(frozen=True, slots=True)
class ExpiredCA:
    """An intermediate CA past its notAfter, its file, and a (valid) device it signed."""

    ca_file: Path
    device_cert: Path
    device_key: Path


@pytest.fixture(scope="module")
def expired_ca(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory) -> ExpiredCA:
    directory = tmp_path_factory.mktemp("expired-ca")
    now = datetime.datetime.now(datetime.UTC)
    intermediate = make_intermediate(
        pki.root_issued,
        "Expired Intermediate CA",
        not_before=now - datetime.timedelta(days=60),
        not_after=now - datetime.timedelta(days=1),
    )
    device: Issued = make_device(intermediate, "device-under-expired-ca")
    return ExpiredCA(
        ca_file=write_certs(directory / "ExpiredIntermediate.pem", [intermediate.cert]),
        device_cert=write_certs(directory / "device.pem", [device.cert]),
        device_key=write_key(directory / "device-key.pem", device.key),
    )


# frontend name -> what its bind line adds to `bind ADDRESS ssl crt SERVER`
def side_by_side_binds(pki: TestPKI, expired_ca: ExpiredCA) -> dict[str, str]:
    seed = f"ca-file {pki.intermediate} ca-verify-file {pki.root} verify required"
    old_ca = f"ca-file {expired_ca.ca_file} ca-verify-file {pki.root} verify required"
    return {
        "seed": seed,
        "crt_expired": f"{seed} crt-ignore-err 10",
        "crt_all": f"{seed} crt-ignore-err all",
        "crt_other": f"{seed} crt-ignore-err 23,26",
        "ca_expired_for_leaf": f"{seed} ca-ignore-err 10",
        "old_ca": old_ca,
        "old_ca_ca_ignore": f"{old_ca} ca-ignore-err 10",
        "old_ca_ca_all": f"{old_ca} ca-ignore-err all",
        "old_ca_crt_ignore": f"{old_ca} crt-ignore-err 10",
    }


def config_text(
    pki: TestPKI, binds: dict[str, str], ports: dict[str, int], backend_port: int
) -> str:
    sections = [
        "global\n    log stdout format raw local0\n",
        "defaults\n    mode tcp\n    log global\n    option tcplog\n"
        "    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n",
    ]
    for name, options in binds.items():
        sections.append(
            f"frontend {name}\n"
            f"    bind 127.0.0.1:{ports[name]} ssl crt {pki.server_allinone} {options}\n"
            "    default_backend echo\n"
        )
    sections.append(f"backend echo\n    server echo1 127.0.0.1:{backend_port}\n")
    return "\n".join(sections)


@dataclass
class Balancers:
    ports: dict[str, dict[str, int]]  # balancer -> frontend -> port
    processes: dict[str, Process]


@pytest.fixture(scope="module")
def balancers(
    pki: TestPKI, expired_ca: ExpiredCA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Balancers]:
    directory = tmp_path_factory.mktemp("tls-options")
    backend = EchoBackend(proxy=False)
    binds = side_by_side_binds(pki, expired_ca)
    ports = {b: {name: free_port() for name in binds} for b in ("lb", "haproxy")}
    try:
        with (
            run_haproxy(
                config_text(pki, binds, ports["haproxy"], backend.port),
                directory,
                ports["haproxy"]["seed"],
            ) as haproxy,
            run_lb(
                config_text(pki, binds, ports["lb"], backend.port), directory, ports["lb"]["seed"]
            ) as lb,
        ):
            yield Balancers(ports, {"lb": lb, "haproxy": haproxy})
    finally:
        backend.close()


def _client(pki: TestPKI, expired_ca: ExpiredCA, who: str) -> ssl.SSLContext:
    if who == "old_ca_device":
        return client_context(expired_ca.device_cert, expired_ca.device_key, pki.root)
    device = {"good": pki.device(21), "expired": pki.expired, "revoked": pki.revoked}[who]
    return client_context(device.cert, device.key, pki.root)


# (frontend, client, expected verdict of both balancers)
CASES = [
    ("seed", "good", "ok"),
    ("seed", "expired", "refused"),
    ("crt_expired", "expired", "ok"),
    ("crt_expired", "good", "ok"),
    ("crt_all", "expired", "ok"),
    # Other ids listed: the expiry (10) is still fatal.
    ("crt_other", "expired", "refused"),
    # ca-ignore-err is for depth > 0 only: an expired leaf is still refused.
    ("ca_expired_for_leaf", "expired", "refused"),
    # An intermediate past its notAfter: its devices are refused...
    ("old_ca", "old_ca_device", "refused"),
    # ...unless ca-ignore-err lists the expiry (or all),
    ("old_ca_ca_ignore", "old_ca_device", "ok"),
    ("old_ca_ca_all", "old_ca_device", "ok"),
    # ...and crt-ignore-err, which is for depth 0, does not help.
    ("old_ca_crt_ignore", "old_ca_device", "refused"),
]


@pytest.mark.haproxy
@pytest.mark.parametrize(
    ("frontend", "client", "expected"), CASES, ids=[f"{f}-{c}" for f, c, _ in CASES]
)
def test_ignore_err_same_verdict_as_haproxy(
    balancers: Balancers,
    pki: TestPKI,
    expired_ca: ExpiredCA,
    frontend: str,
    client: str,
    expected: str,
) -> None:
    context = _client(pki, expired_ca, client)
    outcomes = {
        name: tls_outcome(balancers.ports[name][frontend], context) for name in ("haproxy", "lb")
    }
    verdicts = {name: outcome.split(":")[0] for name, outcome in outcomes.items()}
    assert verdicts["haproxy"] == expected, f"HAProxy said {outcomes['haproxy']}"
    assert verdicts["lb"] == verdicts["haproxy"], outcomes


@pytest.mark.haproxy
def test_refusal_names_the_ca_level(
    balancers: Balancers, pki: TestPKI, expired_ca: ExpiredCA
) -> None:
    """crt-ignore-err does not cover the CA: lb's log line says the CA at depth 1 expired."""
    lb = balancers.processes["lb"]
    mark = lb.mark("stdout")
    context = _client(pki, expired_ca, "old_ca_device")
    assert tls_outcome(balancers.ports["lb"]["old_ca_crt_ignore"], context).startswith("refused")
    output = lb.wait_output("X509_V_ERR_CERT_HAS_EXPIRED", 5, stream="stdout", since=mark)
    line = next(line for line in output.splitlines() if "X509_V_ERR_CERT_HAS_EXPIRED" in line)
    assert "CA certificate at depth 1 expired on" in line, line
    assert "depth 1" in line


# --- lb alone: what HAProxy 2.6 does not have ------------------------------------------------


def _check(executable: str, config: str, directory: Path) -> subprocess.CompletedProcess[str]:
    path = directory / "check.cfg"
    path.write_text(config)
    return subprocess.run(
        [executable, "-c", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _one_bind_config(pki: TestPKI, port: int, options: str, backend_port: int = 1) -> str:
    return (
        "global\n    log stdout format raw local0\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
        "    timeout server 30s\n"
        f"frontend mqtts\n    bind 127.0.0.1:{port} ssl crt {pki.server_allinone} "
        f"ca-file {pki.intermediate} ca-verify-file {pki.root} verify required {options}\n"
        "    default_backend echo\n"
        f"backend echo\n    server echo1 127.0.0.1:{backend_port}\n"
    )


@pytest.mark.haproxy
@pytest.mark.parametrize(
    ("options", "haproxy_says"),
    [
        ("verify-depth 0", "unknown keyword 'verify-depth'"),
        ("crt-ignore-err X509_V_ERR_CERT_HAS_EXPIRED", "out of range (1..94)"),
        ("ca-ignore-err 10,X509_V_ERR_CERT_HAS_EXPIRED", "out of range (1..94)"),
    ],
)
def test_lb_extensions_haproxy_26_refuses(
    pki: TestPKI, tmp_path: Path, options: str, haproxy_says: str
) -> None:
    config = _one_bind_config(pki, free_port(), options)
    theirs = _check(HAPROXY, config, tmp_path)
    assert theirs.returncode == 1 and haproxy_says in theirs.stderr, theirs.stderr
    ours = _check(str(VENV_BIN / "lb"), config, tmp_path)
    assert ours.returncode == 0, ours.stderr
    assert "Configuration file is valid" in ours.stdout


@pytest.mark.haproxy
@pytest.mark.parametrize(
    ("options", "ours_says"),
    [
        ("crt-ignore-err 0", "'crt-ignore-err' : expects an integer from 1 to 94, got '0'"),
        ("ca-ignore-err 95", "'ca-ignore-err' : expects an integer from 1 to 94, got '95'"),
        (
            "crt-ignore-err X509_V_ERR_CERT_HAS_EXPIRD",
            "unknown verify error name 'X509_V_ERR_CERT_HAS_EXPIRD'; "
            "did you mean 'X509_V_ERR_CERT_HAS_EXPIRED'?",
        ),
    ],
)
def test_bad_ignore_lists_refused_by_both(
    pki: TestPKI, tmp_path: Path, options: str, ours_says: str
) -> None:
    config = _one_bind_config(pki, free_port(), options)
    assert _check(HAPROXY, config, tmp_path).returncode == 1
    ours = _check(str(VENV_BIN / "lb"), config, tmp_path)
    assert ours.returncode == 1
    assert ours_says in ours.stderr, ours.stderr


def test_ignore_err_by_name(pki: TestPKI, tmp_path: Path) -> None:
    """lb takes OpenSSL's error names where HAProxy 2.6 wants ids: same effect as `10`."""
    backend = EchoBackend(proxy=False)
    port = free_port()
    config = _one_bind_config(
        pki,
        port,
        "crt-ignore-err X509_V_ERR_CERT_HAS_EXPIRED,X509_V_ERR_CERT_REVOKED",
        backend.port,
    )
    try:
        with run_lb(config, tmp_path, port):
            expired = client_context(pki.expired.cert, pki.expired.key, pki.root)
            assert tls_outcome(port, expired) == "ok"
            rogue = client_context(pki.rogue.cert, pki.rogue.key, pki.root)
            assert tls_outcome(port, rogue).startswith("refused")
    finally:
        backend.close()


def test_verify_depth(pki: TestPKI, tmp_path: Path) -> None:
    """OpenSSL's depth counts the CAs above the leaf that may be used, the trust anchor
    included at depth+1: with `verify-depth 0` only a device signed by the root itself
    verifies; a device under the intermediate (leaf, intermediate, root) is refused as
    X509_V_ERR_CERT_CHAIN_TOO_LONG (reported at depth 1, on the intermediate);
    `verify-depth 1` and the default (10) let it in."""
    backend = EchoBackend(proxy=False)
    ports = {name: free_port() for name in ("depth0", "depth1", "default")}
    options = {"depth0": "verify-depth 0", "depth1": "verify-depth 1", "default": ""}
    config = (
        "global\n    log stdout format raw local0\n"
        "defaults\n    mode tcp\n    log global\n    option tcplog\n"
        "    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n"
    )
    for name, port in ports.items():
        config += (
            f"frontend {name}\n    bind 127.0.0.1:{port} ssl crt {pki.server_allinone} "
            f"ca-file {pki.ca_bundle} verify required {options[name]}\n"
            "    default_backend echo\n"
        )
    config += f"backend echo\n    server echo1 127.0.0.1:{backend.port}\n"
    device = client_context(pki.device(22).cert, pki.device(22).key, pki.root)
    by_root = client_context(pki.by_root.cert, pki.by_root.key, pki.root)
    try:
        with run_lb(config, tmp_path, ports["depth0"]) as lb:
            mark = lb.mark("stdout")
            assert tls_outcome(ports["depth0"], device).startswith("refused")
            output = lb.wait_output("X509_V_ERR_CERT_CHAIN_TOO_LONG", 5, "stdout", mark)
            line = next(
                line for line in output.splitlines() if "X509_V_ERR_CERT_CHAIN_TOO_LONG" in line
            )
            assert "certificate chain too long (verify depth)" in line, line
            # OpenSSL reports it on the first CA beyond the limit, with its subject.
            assert 'depth 1) subject="CN=Test Intermediate CA"' in line, line
            assert tls_outcome(ports["depth0"], by_root) == "ok"
            assert tls_outcome(ports["depth1"], device) == "ok"
            assert tls_outcome(ports["default"], device) == "ok"
    finally:
        backend.close()
