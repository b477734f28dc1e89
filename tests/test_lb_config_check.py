"""`lb -c -f FILE`: certificate, CA and CRL files are loaded at check time, and the traps of
chains and CRLs are reported with the file and the bind line (config.txt 'haproxy -c')."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from lb.pki.certs import generate_key
from tests.harness import VENV_BIN
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(60)


def lb_check(config: str, directory: Path) -> subprocess.CompletedProcess[str]:
    path = directory / "check.cfg"
    path.write_text(config)
    return subprocess.run(
        [str(VENV_BIN / "lb"), "-c", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def tls_config(bind_options: str) -> str:
    return f"""
global
    maxconn 5000
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:8091 {bind_options}
    default_backend be
backend be
    server a 127.0.0.1:1883
"""


def seed_bind(pki: TestPKI, extra: str = "") -> str:
    return (
        f"ssl crt {pki.server_allinone} ca-file {pki.intermediate} "
        f"ca-verify-file {pki.root} verify required {extra}"
    )


def test_seed_bind_line_is_valid(pki: TestPKI, tmp_path: Path) -> None:
    result = lb_check(tls_config(seed_bind(pki)), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Configuration file is valid\n"
    assert result.stderr == ""


def test_missing_certificate_file_is_an_error_naming_it(pki: TestPKI, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "server-allinone.pem"
    config = tls_config(
        f"ssl crt {missing} ca-file {pki.intermediate} ca-verify-file {pki.root} verify required"
    )
    result = lb_check(config, tmp_path)
    assert result.returncode == 1
    assert f"{missing}: no such file" in result.stderr
    assert "check.cfg:10] : 'bind' : crt:" in result.stderr
    assert "Fatal errors found in configuration." in result.stderr


def test_key_that_does_not_match_and_pem_without_key(pki: TestPKI, tmp_path: Path) -> None:
    mismatched = tmp_path / "mismatched.pem"
    stranger = generate_key("ec").private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    mismatched.write_bytes(stranger + Path(pki.server_cert).read_bytes())
    no_key = tmp_path / "nokey.pem"
    shutil.copy(pki.server_cert, no_key)
    config = tls_config(
        f"ssl crt {mismatched} crt {no_key} ca-file {pki.intermediate} verify required"
    )
    result = lb_check(config, tmp_path)
    assert result.returncode == 1
    assert "the private key does not match any certificate in the file" in result.stderr
    assert f"{no_key}: contains no private key" in result.stderr


def test_both_errors_reported_not_only_the_first(pki: TestPKI, tmp_path: Path) -> None:
    config = tls_config(
        f"ssl crt {tmp_path / 'a.pem'} ca-file {tmp_path / 'b.pem'} verify required"
    )
    result = lb_check(config, tmp_path)
    assert result.returncode == 1
    assert f"{tmp_path / 'a.pem'}: no such file" in result.stderr
    assert f"{tmp_path / 'b.pem'}: no such file" in result.stderr


def test_crl_without_root_level_is_warned(pki: TestPKI, tmp_path: Path) -> None:
    result = lb_check(tls_config(seed_bind(pki, f"crl-file {pki.crl_intermediate_only}")), tmp_path)
    assert result.returncode == 0
    assert "Warnings were found." in result.stdout
    assert "no CRL for CA 'CN=Test Root CA" in result.stderr
    assert "every client whose chain includes this CA would be refused" in result.stderr
    full = lb_check(tls_config(seed_bind(pki, f"crl-file {pki.crl}")), tmp_path)
    assert full.returncode == 0 and full.stderr == "", full.stderr


def test_intermediate_without_its_root_is_warned(pki: TestPKI, tmp_path: Path) -> None:
    config = tls_config(f"ssl crt {pki.server_allinone} ca-file {pki.intermediate} verify required")
    result = lb_check(config, tmp_path)
    assert result.returncode == 0
    assert "cannot be chained to a self-signed root" in result.stderr
    assert "'CN=Test Root CA" in result.stderr


def test_incomplete_server_chain_and_expiry(pki: TestPKI, tmp_path: Path) -> None:
    leaf_only = tmp_path / "leaf-only.pem"
    leaf_only.write_bytes(Path(pki.server_key).read_bytes() + Path(pki.server_cert).read_bytes())
    result = lb_check(
        tls_config(seed_bind(pki).replace(str(pki.server_allinone), str(leaf_only))), tmp_path
    )
    assert result.returncode == 0
    assert "chain is incomplete" in result.stderr
    assert "CN=Test Intermediate CA" in result.stderr


def test_verify_without_ca_file_is_an_error(pki: TestPKI, tmp_path: Path) -> None:
    result = lb_check(tls_config(f"ssl crt {pki.server_allinone} verify required"), tmp_path)
    assert result.returncode == 1
    assert "'bind' : 'verify required' needs 'ca-file'" in result.stderr


def test_zero_warning_flag_turns_warnings_into_failure(pki: TestPKI, tmp_path: Path) -> None:
    path = tmp_path / "w.cfg"
    path.write_text(tls_config(seed_bind(pki, f"crl-file {pki.crl_intermediate_only}")))
    result = subprocess.run(
        [str(VENV_BIN / "lb"), "-c", "-dW", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "zero-warning" in result.stderr


def test_every_error_in_one_run_as_haproxy(tmp_path: Path) -> None:
    """A typo, a bad time unit and a missing crt: three errors in one run, in line order
    (issue 14 item 11). HAProxy 2.6 loads the crt while it parses, so it reports all three
    too; lb used to stop at the parse errors and leave the certificate for the next run."""
    config = """
defaults
    mode tcp
    timeout connect 5x
    timeout client 5s
    timeout server 5s
frontend fe
    bind 127.0.0.1:8443 ssl crt missing.pem
    tiemout client 5s
    default_backend be
backend be
    server s 127.0.0.1:1883
"""
    result = lb_check(config, tmp_path)
    assert result.returncode == 1
    alerts = [line for line in result.stderr.splitlines() if "parsing [" in line]
    assert [line.split("check.cfg:")[1].split("]")[0] for line in alerts] == ["4", "8", "9"]
    assert "'timeout connect' : expects a time" in alerts[0]
    assert "missing.pem" in alerts[1] and "no such file" in alerts[1]
    assert "unknown keyword 'tiemout'" in alerts[2]
    if shutil.which("haproxy") is None:
        return
    haproxy = subprocess.run(
        ["haproxy", "-c", "-f", str(tmp_path / "check.cfg")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=tmp_path,
    )
    assert haproxy.returncode == 1
    theirs = [line for line in haproxy.stderr.splitlines() if "parsing [" in line]
    assert [line.split("check.cfg:")[1].split("]")[0] for line in theirs] == ["4", "8", "9"]


def test_a_bind_line_with_an_error_is_not_loaded_again(pki: TestPKI, tmp_path: Path) -> None:
    """The files of a bind line that failed to parse are not read (its own error says
    enough); the other lines' files are, in the same run."""
    config = tls_config(f"ssl crt {pki.server_allinone} verify required")  # no ca-file
    config = config.replace("timeout client 30s", "timeout client 30x")
    result = lb_check(config, tmp_path)
    assert result.returncode == 1
    alerts = [line for line in result.stderr.splitlines() if "parsing [" in line]
    assert len(alerts) == 2, result.stderr
    assert "'timeout client'" in alerts[0] and "needs 'ca-file'" in alerts[1]
