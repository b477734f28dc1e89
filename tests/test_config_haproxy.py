"""Our `-c` verdict against the real `haproxy -c` (Debian's HAProxy 2.6).

Each configs/bad/*.cfg says `# haproxy: rejects` or `# haproxy: accepts`
(lb is stricter in places: mode http, unset variables, server TLS, ACLs).
Where HAProxy rejects a file, the lines it complains about must be among the
lines we complain about.
"""

from __future__ import annotations

import datetime
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from lb.config import load_config

ROOT = Path(__file__).resolve().parent.parent
HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
)
BAD = sorted((ROOT / "configs" / "bad").glob("*.cfg"))

pytestmark = [
    pytest.mark.haproxy,
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed"),
    pytest.mark.timeout(30),
]


def haproxy_check(path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert HAPROXY is not None
    return subprocess.run(
        [HAPROXY, "-c", "-f", str(path)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize("path", BAD, ids=lambda path: path.name)
def test_bad_configs_against_haproxy(path: Path) -> None:
    (verdict,) = re.findall(r"^# haproxy: (rejects|accepts)$", path.read_text(), re.MULTILINE)
    relative = path.relative_to(ROOT)
    completed = haproxy_check(relative, ROOT)
    assert completed.returncode == (1 if verdict == "rejects" else 0), completed.stderr
    ours = load_config([path], environ={})
    assert ours.config is None  # lb rejects every one of them
    if verdict == "rejects":
        theirs = {
            int(n) for n in re.findall(rf"\[{re.escape(str(relative))}:(\d+)\]", completed.stderr)
        }
        assert theirs <= {d.line for d in ours.errors}


def empty_crl(ca: Any) -> bytes:
    """A CRL revoking nothing, signed by a trustme CA."""
    cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    now = datetime.datetime.now(datetime.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(cert.subject)
        .last_update(now)
        .next_update(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return crl.public_bytes(serialization.Encoding.PEM)


def test_seed_config_with_real_certificates(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    root = trustme.CA()
    intermediate = root.create_child_ca()
    server = intermediate.issue_cert("localhost")
    certs = tmp_path / "certs"
    certs.mkdir()
    allinone = server.private_key_pem.bytes() + b"".join(
        blob.bytes() for blob in server.cert_chain_pems
    )
    (certs / "server-allinone.pem").write_bytes(allinone)
    intermediate.cert_pem.write_to_path(str(certs / "CaIntermediate.pem"))
    root.cert_pem.write_to_path(str(certs / "CaRoot.pem"))
    # The bind line's crl-file: one CRL per CA of the chain (HAProxy checks every level).
    (certs / "crl.pem").write_bytes(empty_crl(intermediate) + empty_crl(root))
    config = tmp_path / "haproxy.cfg"
    shutil.copy(ROOT / "configs" / "haproxy.cfg", config)
    # HAProxy resolves relative paths against its working directory, lb against the file's.
    completed = haproxy_check(config, tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert "Configuration file is valid" in completed.stdout
    ours = load_config([config], environ={})
    assert ours.diagnostics == ()
    assert ours.config is not None
    (frontend,) = [f for f in ours.config.frontends if f.name == "emqx-tls"]
    assert frontend.binds[0].crt == (str(certs / "server-allinone.pem"),)
