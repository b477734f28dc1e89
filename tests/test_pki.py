"""lb.pki.certs, lb.pki.verify and the shared test PKI (tests/pki.py), cross-checked with the
openssl CLI where it is installed."""

from __future__ import annotations

import datetime
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from lb.pki.certs import (
    Issued,
    Names,
    PKIError,
    load_certs,
    load_crls,
    load_issued,
    load_key,
    make_crl,
    make_device,
    make_intermediate,
    make_leaf,
    make_node,
    make_root,
    write_allinone,
    write_certs,
    write_key,
)
from lb.pki.verify import Reason, verify_chain
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(60)

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def openssl_verify(pki: TestPKI, cert: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run(
        [
            OPENSSL,
            "verify",
            "-purpose",
            "sslclient",
            *extra,
            "-CAfile",
            str(pki.root),
            "-untrusted",
            str(pki.intermediate),
            str(cert),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# --- the fixture -------------------------------------------------------------------------------


def test_fixture_files_and_modes(pki: TestPKI) -> None:
    for key in (pki.root_key, pki.intermediate_key, pki.server_key, pki.server_allinone):
        assert mode(key) == 0o600, key
    device = pki.device(1)
    assert device.cn == "device-001"
    assert mode(device.key) == 0o600 and mode(device.pem) == 0o600
    assert [common_name(c) for c in load_certs(device.chain)] == [
        "device-001",
        "Test Intermediate CA",
    ]
    assert load_issued(device.pem).cert == load_certs(device.cert)[0]
    node = pki.node("broker-1")
    cert, key = node
    assert mode(key) == 0o600
    assert len(load_certs(cert)) == 2
    assert [common_name(c) for c in load_certs(pki.ca_bundle)] == [
        "Test Intermediate CA",
        "Test Root CA",
    ]


def common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def test_server_allinone_is_key_cert_intermediate(pki: TestPKI) -> None:
    text = pki.server_allinone.read_text()
    assert text.index("PRIVATE KEY") < text.index("BEGIN CERTIFICATE")
    certs = load_certs(pki.server_allinone)
    assert [common_name(c) for c in certs] == ["lb.local", "Test Intermediate CA"]
    san = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_device_is_cached(pki: TestPKI) -> None:
    assert pki.device(7) is pki.device(7)
    with pytest.raises(ValueError):
        pki.device(31)


def test_crl_files(pki: TestPKI) -> None:
    both = load_crls(pki.crl)
    assert [crl.issuer for crl in both] == [
        load_certs(pki.intermediate)[0].subject,
        load_certs(pki.root)[0].subject,
    ]
    assert both[0].get_revoked_certificate_by_serial_number(pki.revoked.issued.serial_number)
    assert len(load_crls(pki.crl_intermediate_only)) == 1


@needs_openssl
def test_openssl_accepts_good_and_refuses_bad(pki: TestPKI) -> None:
    assert openssl_verify(pki, pki.device(1).cert).returncode == 0
    assert openssl_verify(pki, pki.node("broker-2").cert).returncode == 0
    assert openssl_verify(pki, pki.by_root.cert).returncode == 0
    expected = {
        "expired": "certificate has expired",
        "not_yet_valid": "certificate is not yet valid",
        "rogue": "unable to get local issuer certificate",
        "self_signed": "self-signed certificate",
        "server_purpose": "unsuitable certificate purpose",
    }
    for case, words in expected.items():
        result = openssl_verify(pki, getattr(pki, case).cert)
        assert result.returncode != 0, case
        assert words in result.stdout + result.stderr, (case, result.stdout, result.stderr)
    revoked = openssl_verify(pki, pki.revoked.cert, "-crl_check_all", "-CRLfile", str(pki.crl))
    assert revoked.returncode != 0 and "certificate revoked" in revoked.stdout + revoked.stderr
    good = openssl_verify(pki, pki.device(2).cert, "-crl_check_all", "-CRLfile", str(pki.crl))
    assert good.returncode == 0, good.stdout + good.stderr
    partial = openssl_verify(
        pki, pki.device(2).cert, "-crl_check_all", "-CRLfile", str(pki.crl_intermediate_only)
    )
    assert "unable to get certificate CRL" in partial.stdout + partial.stderr


# --- verify_chain explains ---------------------------------------------------------------------


def trusted(pki: TestPKI) -> list[x509.Certificate]:
    return [*load_certs(pki.intermediate), *load_certs(pki.root)]


@pytest.mark.parametrize(
    ("case", "reason", "words"),
    [
        ("expired", Reason.EXPIRED, "expired on "),
        ("not_yet_valid", Reason.NOT_YET_VALID, "not yet valid"),
        ("rogue", Reason.SIGNATURE_INVALID, "another CA with the same name"),
        ("self_signed", Reason.SELF_SIGNED, "self-signed"),
        ("server_purpose", Reason.WRONG_USAGE, "needs clientAuth"),
    ],
)
def test_verify_chain_explains(pki: TestPKI, case: str, reason: Reason, words: str) -> None:
    result = verify_chain(load_certs(getattr(pki, case).cert)[0], trusted=trusted(pki))
    assert not result.ok
    assert reason in result.reasons
    assert any(words in refusal.message for refusal in result.refusals), result.refusals


def test_verify_chain_accepts_and_checks_crls(pki: TestPKI) -> None:
    good = verify_chain(
        load_certs(pki.device(3).cert)[0], trusted=trusted(pki), crls=load_crls(pki.crl)
    )
    assert good.ok, good.refusals
    assert [common_name(c) for c in good.path] == [
        "device-003",
        "Test Intermediate CA",
        "Test Root CA",
    ]
    revoked = verify_chain(
        load_certs(pki.revoked.cert)[0], trusted=trusted(pki), crls=load_crls(pki.crl)
    )
    assert revoked.reasons == {Reason.REVOKED}
    assert "revoked on " in revoked.refusals[0].message
    partial = verify_chain(
        load_certs(pki.device(3).cert)[0],
        trusted=trusted(pki),
        crls=load_crls(pki.crl_intermediate_only),
    )
    assert partial.reasons == {Reason.NO_CRL}
    leaf_only = verify_chain(
        load_certs(pki.device(3).cert)[0],
        trusted=trusted(pki),
        crls=load_crls(pki.crl_intermediate_only),
        crl_check_all=False,
    )
    assert leaf_only.ok


def test_verify_chain_unknown_ca_and_missing_root(pki: TestPKI) -> None:
    other_root = make_root("Other Root")
    result = verify_chain(load_certs(pki.device(1).cert)[0], trusted=[other_root.cert])
    assert result.reasons == {Reason.UNKNOWN_CA}
    assert "not among the trusted CA files" in result.refusals[0].message
    no_root = verify_chain(load_certs(pki.device(1).cert)[0], trusted=load_certs(pki.intermediate))
    assert no_root.reasons == {Reason.UNKNOWN_CA}
    assert "ca-verify-file" in no_root.refusals[0].message


def test_verify_chain_path_length_exceeded() -> None:
    root = make_root("Root")
    first = make_intermediate(root, "First", path_length=0)
    second = make_intermediate(first, "Second", path_length=0)
    leaf = make_device(second, "deep-device")
    result = verify_chain(leaf.cert, trusted=[root.cert], untrusted=list(leaf.chain))
    assert result.reasons == {Reason.PATH_LENGTH_EXCEEDED}
    assert "pathlen:0" in result.refusals[0].message
    # The seed's max_path_len 1 allows exactly that second level.
    roomy = make_intermediate(root, "Roomy", path_length=1)
    below = make_intermediate(roomy, "Below", path_length=0)
    fine = make_device(below, "fine-device")
    assert verify_chain(fine.cert, trusted=[root.cert], untrusted=list(fine.chain)).ok


def test_verify_chain_leaf_signed_by_a_leaf() -> None:
    root = make_root("Root")
    intermediate = make_intermediate(root, "Intermediate")
    device = make_device(intermediate, "device")
    # Forge: sign a certificate with a leaf's key, as if it were a CA.
    forged_issuer = Issued(cert=device.cert, key=device.key)
    with pytest.raises(PKIError, match="not a CA"):
        make_device(forged_issuer, "child")


# --- certs library -----------------------------------------------------------------------------


def test_profiles_extensions() -> None:
    root = make_root("Root", names=Names(country="CN", organization="emqx"))
    intermediate = make_intermediate(root, "Intermediate")
    constraints = intermediate.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 1
    usage = intermediate.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    device = make_device(intermediate, "device-x")
    assert device.chain == (intermediate.cert,)
    assert intermediate.chain == ()
    extended = device.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(extended) == [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    aki = device.cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = intermediate.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert device.cert.serial_number != make_device(intermediate, "device-x").cert.serial_number
    node = make_node(intermediate, "node-1")
    san = node.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node-1"]
    assert not node.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_rsa_leaf_has_key_encipherment() -> None:
    root = make_root("Root", key_type="rsa2048")
    leaf = make_leaf(root, "rsa-device", extended_key_usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    usage = leaf.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert not usage.key_encipherment  # the leaf's own key is EC
    rsa_leaf = make_device(root, "rsa-device", key_type="rsa2048")
    usage = rsa_leaf.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment


def test_bad_inputs() -> None:
    root = make_root("Root")
    with pytest.raises(PKIError, match="must not be empty"):
        make_device(root, "")
    with pytest.raises(PKIError, match="not an IP address"):
        make_leaf(root, "x", extended_key_usage=[], ip_addresses=["nope"])
    now = datetime.datetime.now(datetime.UTC)
    with pytest.raises(PKIError, match="not after"):
        make_device(root, "x", not_before=now, not_after=now - datetime.timedelta(days=1))
    other = make_root("Other")
    with pytest.raises(PKIError, match="not issued by"):
        make_crl(root, [make_device(other, "y").cert])


def test_key_files_are_0600_and_never_overwritten(tmp_path: Path) -> None:
    root = make_root("Root")
    path = write_key(tmp_path / "k.pem", root.key)
    assert mode(path) == 0o600
    with pytest.raises(PKIError, match="refusing to overwrite"):
        write_key(path, root.key)
    # a symlink planted where the key goes is refused too (O_EXCL)
    (tmp_path / "link.pem").symlink_to(tmp_path / "elsewhere.pem")
    with pytest.raises(PKIError, match="refusing to overwrite"):
        write_key(tmp_path / "link.pem", root.key)
    assert not (tmp_path / "elsewhere.pem").exists()
    other = make_root("Other")
    write_key(path, other.key, force=True)
    assert mode(path) == 0o600
    assert load_key(path).public_key() == other.key.public_key()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_encrypted_key_round_trip(tmp_path: Path) -> None:
    root = make_root("Root")
    path = write_key(tmp_path / "k.pem", root.key, password=b"secret")
    assert b"ENCRYPTED PRIVATE KEY" in path.read_bytes()
    assert load_key(path, b"secret").public_key() == root.key.public_key()
    with pytest.raises(PKIError, match="password is needed"):
        load_key(path)
    with pytest.raises(PKIError, match="wrong password"):
        load_key(path, b"wrong")
    if OPENSSL:
        result = subprocess.run(
            [OPENSSL, "pkey", "-in", str(path), "-passin", "pass:secret", "-noout"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr


def test_load_issued_checks_the_key(tmp_path: Path) -> None:
    root = make_root("Root")
    intermediate = make_intermediate(root, "Intermediate")
    device = make_device(intermediate, "d")
    write_certs(tmp_path / "d.pem", [device.cert, intermediate.cert, root.cert])
    write_key(tmp_path / "d-key.pem", device.key)
    write_key(tmp_path / "other-key.pem", root.key)
    loaded = load_issued(tmp_path / "d.pem", tmp_path / "d-key.pem")
    assert loaded.chain == (intermediate.cert,)  # the root is dropped
    with pytest.raises(PKIError, match="does not belong"):
        load_issued(tmp_path / "d.pem", tmp_path / "other-key.pem")
    write_allinone(tmp_path / "all.pem", device)
    assert load_issued(tmp_path / "all.pem").certs == device.certs
    with pytest.raises(PKIError, match="no such file"):
        load_certs(tmp_path / "missing.pem")


def test_rsa_fixture(pki_rsa: TestPKI) -> None:
    key = load_key(pki_rsa.device(1).key)
    assert key.key_size == 2048  # type: ignore[union-attr]
    assert verify_chain(
        load_certs(pki_rsa.device(1).cert)[0],
        trusted=[*load_certs(pki_rsa.intermediate), *load_certs(pki_rsa.root)],
    ).ok
