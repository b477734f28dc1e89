"""``lb-pki`` end to end in a temporary folder: the seed's cfssl flow, the file rules (0600,
no overwrite), revocation, ``verify`` in words, and openssl agreeing with all of it."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from lb.pki.certs import load_certs, load_crls, load_key
from lb.pki.cli import PARALLEL_DEVICES, main

pytestmark = pytest.mark.timeout(120)

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")

# The seed's files (004), verbatim.
CONFIG_JSON = (
    '{"signing": {"default": {"expiry": "262800h"},"profiles": {"intermediate": {"usages": '
    '["cert sign", "crl sign"],"expiry": "700800h","ca_constraint": {"is_ca": true,'
    '"max_path_len": 1}},"device": {"usages": ["client auth","signing","digital signing",'
    '"key encipherment","server auth"],"expiry": "262800h"}}}}'
)
ROOT_JSON = (
    '{"CN": "emqx.com","key": {"algo": "rsa","size": 2048},"names": [{"C": "CN","L": "WuHan",'
    '"O": "emqx","OU": "EMQX Root CA","ST": "China"}]\n}'
)
INTERMEDIATE_JSON = (
    '{"CN": "intermediate.emqx.com","key": {"algo": "rsa","size": 2048},"names": [{"C": "CN",'
    '"ST": "WuHan","L": "XS","O": "EMQX intermediate CA","OU": "EMQX intermediate CA"}]\n}'
)
DEVICE_JSON = (
    '{"CN": "DEVICEAXXXXXXXX","key": {"algo": "rsa","size": 2048},"names": [{"C": "CN",'
    '"ST": "WuHan","L": "XS","O": "EMQX DEVICE","OU": "EMQX DEVICE"}]\n}'
)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def openssl_verify(directory: Path, cert: str, *extra: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run(
        [
            OPENSSL,
            "verify",
            *extra,
            "-CAfile",
            str(directory / "CaRoot.pem"),
            "-untrusted",
            str(directory / "CaIntermediate.pem"),
            str(directory / cert),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A root and an intermediate (ECDSA) in tmp_path."""
    assert run(capsys, "root", "--dir", str(tmp_path))[0] == 0
    assert run(capsys, "intermediate", "--dir", str(tmp_path))[0] == 0
    return tmp_path


@needs_openssl
def test_seed_cfssl_flow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, text in (
        ("config.json", CONFIG_JSON),
        ("root.json", ROOT_JSON),
        ("intermediate.json", INTERMEDIATE_JSON),
        ("device-a-csr.json", DEVICE_JSON),
    ):
        (tmp_path / name).write_text(text)
    config = str(tmp_path / "config.json")
    directory = ("--dir", str(tmp_path))
    assert run(capsys, "root", *directory, "--csr", str(tmp_path / "root.json"))[0] == 0
    code, _, err = run(
        capsys,
        "intermediate",
        *directory,
        "--csr",
        str(tmp_path / "intermediate.json"),
        "--profile-file",
        config,
    )
    assert code == 0, err
    code, out, err = run(
        capsys,
        "device",
        *directory,
        "--csr",
        str(tmp_path / "device-a-csr.json"),
        "--profile-file",
        config,
        "--name",
        "device-a",
    )
    assert code == 0, err
    assert "'digital signing' is not a cfssl name" in err
    assert "device-a-key.pem (0600)" in out

    for key in ("CaRoot-key.pem", "CaIntermediate-key.pem", "device-a-key.pem"):
        assert mode(tmp_path / key) == 0o600
        assert load_key(tmp_path / key).key_size == 2048  # type: ignore[union-attr]
    intermediate = load_certs(tmp_path / "CaIntermediate.pem")[0]
    assert intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value == (
        x509.BasicConstraints(ca=True, path_length=1)
    )
    lifetime = intermediate.not_valid_after_utc - intermediate.not_valid_before_utc
    assert 700800 - 1 <= lifetime.total_seconds() / 3600 <= 700800 + 1  # "700800h"
    device = load_certs(tmp_path / "device-a.pem")[0]
    assert device.subject.rfc4514_string() == (
        "CN=DEVICEAXXXXXXXX,OU=EMQX DEVICE,O=EMQX DEVICE,L=XS,ST=WuHan,C=CN"
    )
    usage = device.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment
    assert openssl_verify(tmp_path, "device-a.pem", "-purpose", "sslclient").returncode == 0

    # server via the device profile, as the seed does, then the allinone file
    code, _, err = run(
        capsys,
        "server",
        "emqx.xxx.com",
        *directory,
        "--profile-file",
        config,
        "--profile",
        "device",
        "--name",
        "emqx-server",
        "--dns",
        "localhost",
        "--ip",
        "127.0.0.1",
    )
    assert code == 0, err
    code, _, err = run(
        capsys, "allinone", "emqx-server", *directory, "--out", "server-allinone.pem"
    )
    assert code == 0, err
    allinone = tmp_path / "server-allinone.pem"
    assert mode(allinone) == 0o600
    text = allinone.read_text()
    assert text.index("PRIVATE KEY") < text.index("CERTIFICATE")
    assert [c.subject for c in load_certs(allinone)] == [
        load_certs(tmp_path / "emqx-server.pem")[0].subject,
        intermediate.subject,
    ]


def test_bad_inputs_exit_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = ("--dir", str(tmp_path))
    code, _, err = run(capsys, "device", "d1", *directory)
    assert code == 2 and "issuing CA file" in err and "CaIntermediate" in err
    (tmp_path / "config.json").write_text(CONFIG_JSON)
    assert run(capsys, "root", *directory)[0] == 0
    assert run(capsys, "intermediate", *directory)[0] == 0
    code, _, err = run(
        capsys,
        "device",
        "d1",
        *directory,
        "--profile-file",
        str(tmp_path / "config.json"),
        "--profile",
        "nope",
    )
    assert code == 2 and "unknown profile 'nope'" in err and "device, intermediate" in err
    code, _, err = run(
        capsys,
        "device",
        "d1",
        *directory,
        "--profile-file",
        str(tmp_path / "config.json"),
        "--profile",
        "intermediate",
    )
    assert code == 2 and "makes CA certificates" in err
    code, _, err = run(capsys, "device", "", *directory)
    assert code == 2 and "needs a CN" in err
    code, _, err = run(capsys, "device", *directory)
    assert code == 2 and "needs a CN" in err
    (tmp_path / "bad.json").write_text('{"signing": {"profiles": {"x": {"expiry": "ten"}}}}')
    code, _, err = run(
        capsys, "device", "d1", *directory, "--profile-file", str(tmp_path / "bad.json")
    )
    assert code == 2 and "invalid duration" in err
    code, _, err = run(capsys, "root", *directory)
    assert code == 2 and "refusing to overwrite" in err and "--force" in err
    (tmp_path / "a-file").write_text("")
    code, _, err = run(capsys, "root", "--dir", str(tmp_path / "a-file"))
    assert code == 2 and "not a directory" in err
    code, _, err = run(capsys, "root", "--dir", str(tmp_path / "new" / "pki"))
    assert code == 0 and (tmp_path / "new" / "pki" / "CaRoot.pem").exists()
    # the console script itself: one line, no traceback
    script = Path(sys.executable).parent / "lb-pki"
    if script.exists():
        result = subprocess.run(
            [str(script), "device", "x", "--dir", str(tmp_path), "--ca", "Nope"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().count("\n") == 0, result.stderr


def test_force_overwrites_and_keys_stay_0600(ca: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "device", "d1", "--dir", str(ca))[0] == 0
    before = (ca / "d1-key.pem").read_bytes()
    assert run(capsys, "device", "d1", "--dir", str(ca))[0] == 2
    assert (ca / "d1-key.pem").read_bytes() == before
    assert run(capsys, "device", "d1", "--dir", str(ca), "--force")[0] == 0
    assert (ca / "d1-key.pem").read_bytes() != before
    assert mode(ca / "d1-key.pem") == 0o600


@needs_openssl
def test_fleet_revoke_crl_and_openssl(ca: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = ("--dir", str(ca))
    code, out, _ = run(capsys, "device", "--count", "3", *directory)
    assert code == 0 and out.count("-key.pem (0600)") == 3
    assert run(capsys, "revoke", "device-0002", *directory, "--reason", "keyCompromise")[0] == 0
    assert run(capsys, "revoke", "device-0002", *directory)[0] == 2  # already revoked
    assert (ca / "CaIntermediate-revoked.json").exists()
    code, out, _ = run(capsys, "crl", *directory)
    assert code == 0 and "1 revoked" in out
    crls = load_crls(ca / "crl.pem")
    assert len(crls) == 2  # intermediate and root: every level has one
    check = ("-crl_check_all", "-CRLfile", str(ca / "crl.pem"))
    assert openssl_verify(ca, "device-0001.pem", *check).returncode == 0
    revoked = openssl_verify(ca, "device-0002.pem", *check)
    assert revoked.returncode != 0 and "certificate revoked" in revoked.stdout + revoked.stderr

    code, out, _ = run(
        capsys, "verify", "device-0002.pem", *directory, "--crl", str(ca / "crl.pem")
    )
    assert code == 1
    assert "REFUSED" in out and "revoked on " in out and "keyCompromise" in out
    code, out, _ = run(
        capsys, "verify", str(ca / "device-0003.pem"), *directory, "--crl", str(ca / "crl.pem")
    )
    assert code == 0 and "OK" in out
    # Without --crl, the crl.pem that `lb-pki crl` wrote in --dir is checked.
    code, out, _ = run(capsys, "verify", "device-0002.pem", *directory)
    assert code == 1 and "revoked on " in out and "crl.pem" in out


def test_verify_says_why(
    ca: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = ("--dir", str(ca))
    assert run(capsys, "device", "good", *directory)[0] == 0
    assert run(capsys, "device", "serveronly", *directory, "--usage", "server auth")[0] == 0
    code, out, _ = run(capsys, "verify", "good.pem", *directory)
    assert code == 0 and "OK" in out
    code, out, _ = run(capsys, "verify", "good.pem", *directory, "--at", "2999-01-01")
    assert code == 1 and "expired on " in out
    code, out, _ = run(capsys, "verify", "good.pem", *directory, "--at", "2000-01-01")
    assert code == 1 and "not yet valid" in out
    code, out, _ = run(capsys, "verify", "serveronly.pem", *directory)
    assert code == 1 and "wrong usage" in out and "needs clientAuth" in out
    code, out, _ = run(capsys, "verify", "serveronly.pem", *directory, "--purpose", "server")
    assert code == 0

    rogue = tmp_path_factory.mktemp("rogue")
    assert run(capsys, "root", "--dir", str(rogue), "--cn", "Rogue Root")[0] == 0
    assert run(capsys, "intermediate", "--dir", str(rogue), "--cn", "Rogue Intermediate")[0] == 0
    assert run(capsys, "device", "good", "--dir", str(rogue))[0] == 0
    code, out, _ = run(capsys, "verify", str(rogue / "good.pem"), *directory)
    assert code == 1 and "unknown CA" in out and "Rogue Intermediate" in out

    code, out, _ = run(
        capsys, "verify", "good.pem", *directory, "--ca-file", str(ca / "CaIntermediate.pem")
    )
    assert code == 1 and "ca-verify-file" in out


def test_rsa_and_encrypted_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = ("--dir", str(tmp_path))
    (tmp_path / "pw").write_text("root secret\n")
    code, _, err = run(
        capsys,
        "root",
        *directory,
        "--key-type",
        "rsa2048",
        "--password-file",
        str(tmp_path / "pw"),
    )
    assert code == 0, err
    assert b"ENCRYPTED" in (tmp_path / "CaRoot-key.pem").read_bytes()
    code, _, err = run(capsys, "intermediate", *directory)
    assert code == 2 and "password is needed" in err and "--ca-password" in err
    code, _, err = run(capsys, "intermediate", *directory, "--ca-password", "wrong")
    assert code == 2 and "wrong password" in err
    code, _, err = run(
        capsys,
        "intermediate",
        *directory,
        "--ca-password-file",
        str(tmp_path / "pw"),
        "--key-type",
        "rsa4096",
    )
    assert code == 0, err
    assert load_key(tmp_path / "CaIntermediate-key.pem").key_size == 4096  # type: ignore[union-attr]
    code, out, _ = run(capsys, "show", str(tmp_path / "CaRoot.pem"))
    assert "RSA 2048" in out and "CA:          TRUE" in out


def test_node_and_show(ca: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "node", "node-1", "node-2", "--dir", str(ca), "--ip", "127.0.0.1")
    assert code == 0, err
    certs = load_certs(ca / "node-1.pem")
    assert len(certs) == 2  # node certificate, then the intermediate
    code, out, _ = run(capsys, "show", str(ca / "node-1.pem"))
    assert code == 0
    for words in (
        "CN=node-1",
        "CA:          FALSE",
        "DNS:node-1",
        "IP:127.0.0.1",
        "serverAuth, clientAuth",
        "SHA256:",
        "ECDSA P-256",
    ):
        assert words in out, words
    assert mode(ca / "node-2-key.pem") == 0o600


@needs_openssl
def test_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "demo"
    code, _, err = run(capsys, "demo", "--dir", str(target), "--devices", "3")
    assert code == 0, err
    for name in (
        "CaRoot.pem",
        "CaIntermediate.pem",
        "server-allinone.pem",
        "device-0003.pem",
        "node-3.pem",
        "crl.pem",
        "ca-bundle.pem",
        "rogue-device-0001.pem",
        "device-revoked.pem",
        "device-expired.pem",
    ):
        assert (target / name).exists(), name
    assert all(mode(p) == 0o600 for p in target.glob("*-key.pem"))
    check = ("-crl_check_all", "-CRLfile", str(target / "crl.pem"))
    assert openssl_verify(target, "device-0001.pem", *check).returncode == 0
    assert openssl_verify(target, "device-revoked.pem", *check).returncode != 0
    assert openssl_verify(target, "device-expired.pem").returncode != 0
    assert openssl_verify(target, "rogue-device-0001.pem").returncode != 0
    code, _, err = run(capsys, "demo", "--dir", str(target))
    assert code == 2 and "--force" in err
    assert run(capsys, "demo", "--dir", str(target), "--force", "--devices", "1")[0] == 0


def test_many_devices_are_issued_in_processes(ca: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Past PARALLEL_DEVICES per CPU the devices are issued by forked processes: every file is
    there with its mode, every serial is distinct, the output lists them in order."""
    count = 2 * PARALLEL_DEVICES + 3
    code, out, err = run(capsys, "device", "--count", str(count), "--dir", str(ca))
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 * count
    assert lines[0] == f"wrote {ca / 'device-0001.pem'} (0644)"
    assert lines[-1] == f"wrote {ca / f'device-{count:04d}-key.pem'} (0600)"
    serials = set()
    for number in range(1, count + 1):
        name = f"device-{number:04d}"
        assert mode(ca / f"{name}-key.pem") == 0o600
        (cert,) = load_certs(ca / f"{name}.pem")
        assert cert.subject.rfc4514_string() == f"CN={name}"
        serials.add(cert.serial_number)
    assert len(serials) == count
    key = load_key(ca / f"device-{count:04d}-key.pem")
    (last,) = load_certs(ca / f"device-{count:04d}.pem")
    assert last.public_key() == key.public_key()
    # A second run refuses before writing anything (the files are there).
    code, _, err = run(capsys, "device", "--count", str(count), "--dir", str(ca))
    assert code == 2 and "refusing to overwrite" in err
