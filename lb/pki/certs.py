"""Certificate authority primitives: keys, certificates, CRLs and the files that hold them.

This module owns the PKI the seed (004) builds with cfssl and the cluster PKI seed 002 builds
with openssl: a root CA, an intermediate CA signed by it (``ca_constraint`` ``is_ca`` with
``max_path_len`` 1), device certificates (CN = device id), server certificates with DNS/IP
subject alternative names, cluster node certificates (``basicConstraints=CA:FALSE``, SAN DNS),
CRLs, and the PEM files: ``NAME.pem`` + ``NAME-key.pem`` (cfssljson ``-bare`` naming) and
``server-allinone.pem`` (key, certificate, then the intermediates).

Everything here is pure ``cryptography`` (RFC 5280 profiles); no subprocess, no openssl CLI.
Private keys are written with mode 0600 and are never overwritten unless asked to.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lb import pem as pem_files
from lb.pem import is_self_signed

__all__ = [
    "CA_KEY_USAGE",
    "CLIENT_AUTH",
    "DEFAULT_CA_DAYS",
    "DEFAULT_CRL_DAYS",
    "DEFAULT_INTERMEDIATE_PATH_LENGTH",
    "DEFAULT_LEAF_DAYS",
    "KEY_TYPES",
    "NOT_BEFORE_BACKDATE",
    "SERVER_AUTH",
    "Issued",
    "KeyPasswordError",
    "KeyType",
    "KeyUsage",
    "Names",
    "PKIError",
    "PrivateKey",
    "Revocation",
    "common_name",
    "default_leaf_key_usage",
    "fingerprint_sha256",
    "generate_key",
    "is_self_signed",
    "key_description",
    "load_certs",
    "load_crls",
    "load_issued",
    "load_key",
    "make_crl",
    "make_device",
    "make_intermediate",
    "make_leaf",
    "make_node",
    "make_root",
    "make_server",
    "write_allinone",
    "write_certs",
    "write_crls",
    "write_file",
    "write_key",
]

KeyType = Literal["ec", "rsa2048", "rsa4096"]
KEY_TYPES: tuple[KeyType, ...] = get_args(KeyType)
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# cfssl backdates notBefore by 5 minutes so that clients with a slightly slow clock accept a
# certificate issued "now"; we do the same.
NOT_BEFORE_BACKDATE = datetime.timedelta(minutes=5)
DEFAULT_CA_DAYS = 3650
DEFAULT_LEAF_DAYS = 825
DEFAULT_CRL_DAYS = 30
# The seed's intermediate profile: "ca_constraint": {"is_ca": true, "max_path_len": 1}.
DEFAULT_INTERMEDIATE_PATH_LENGTH = 1

CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH


class PKIError(Exception):
    """The one error family of lb.pki: bad input, a refused overwrite, an unreadable file."""


class KeyPasswordError(PKIError):
    """A key file needs a password that was not given, or the password is wrong."""


@dataclass(frozen=True, slots=True)
class Names:
    """Subject name fields, as cfssl's CSR JSON ``names`` entry (C, ST, L, O, OU)."""

    country: str | None = None
    state: str | None = None
    locality: str | None = None
    organization: str | None = None
    organizational_unit: str | None = None

    @classmethod
    def from_cfssl(cls, entry: dict[str, str]) -> Names:
        """Read one element of a cfssl ``names`` list (keys C, ST, L, O, OU)."""
        return cls(
            country=entry.get("C"),
            state=entry.get("ST"),
            locality=entry.get("L"),
            organization=entry.get("O"),
            organizational_unit=entry.get("OU"),
        )

    def subject(self, common_name: str) -> x509.Name:
        """The distinguished name: C, ST, L, O, OU (those that are set), then CN."""
        attributes = [
            (NameOID.COUNTRY_NAME, self.country),
            (NameOID.STATE_OR_PROVINCE_NAME, self.state),
            (NameOID.LOCALITY_NAME, self.locality),
            (NameOID.ORGANIZATION_NAME, self.organization),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, self.organizational_unit),
            (NameOID.COMMON_NAME, common_name),
        ]
        return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes if value])


@dataclass(frozen=True, slots=True)
class KeyUsage:
    """The X.509 keyUsage bits we set (RFC 5280 section 4.2.1.3); all others stay off."""

    digital_signature: bool = False
    content_commitment: bool = False
    key_encipherment: bool = False
    data_encipherment: bool = False
    key_agreement: bool = False
    key_cert_sign: bool = False
    crl_sign: bool = False

    def extension(self) -> x509.KeyUsage:
        """The cryptography extension value."""
        return x509.KeyUsage(
            digital_signature=self.digital_signature,
            content_commitment=self.content_commitment,
            key_encipherment=self.key_encipherment,
            data_encipherment=self.data_encipherment,
            key_agreement=self.key_agreement,
            key_cert_sign=self.key_cert_sign,
            crl_sign=self.crl_sign,
            encipher_only=False,
            decipher_only=False,
        )


# The seed's intermediate profile: "usages": ["cert sign", "crl sign"].
CA_KEY_USAGE = KeyUsage(key_cert_sign=True, crl_sign=True)


def default_leaf_key_usage(key: PrivateKey) -> KeyUsage:
    """digitalSignature for ECDSA; RSA adds keyEncipherment (RSA key transport, TLS <= 1.2)."""
    return KeyUsage(digital_signature=True, key_encipherment=isinstance(key, rsa.RSAPrivateKey))


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate, its private key, and the CA certificates between it and the root.

    ``chain`` runs from the nearest issuer upwards and stops before the root: for a device
    signed by the intermediate it is ``(intermediate,)``; for the intermediate and the root
    it is empty. That is what a TLS peer sends after its own certificate.
    """

    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def common_name(self) -> str:
        """The subject's first CN, or "" when it has none."""
        return common_name(self.cert)

    @property
    def serial_number(self) -> int:
        """The certificate's serial number."""
        return self.cert.serial_number

    @property
    def certs(self) -> tuple[x509.Certificate, ...]:
        """The certificate followed by its chain: what a TLS peer presents."""
        return (self.cert, *self.chain)

    @property
    def is_ca(self) -> bool:
        """True when basicConstraints says CA:TRUE."""
        return _is_ca(self.cert)


@dataclass(frozen=True, slots=True)
class Revocation:
    """One revoked certificate as a CRL lists it (RFC 5280 section 5.3)."""

    serial_number: int
    revocation_date: datetime.datetime
    reason: x509.ReasonFlags | None = None


# --- keys ------------------------------------------------------------------------------------


def generate_key(key_type: KeyType = "ec") -> PrivateKey:
    """A new private key: ECDSA P-256 (fast, the default), RSA 2048 or RSA 4096."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "rsa4096":
        return rsa.generate_private_key(public_exponent=65537, key_size=4096)
    raise PKIError(f"unknown key type {key_type!r}: expected one of {', '.join(KEY_TYPES)}")


def key_description(key: PrivateKey | x509.Certificate) -> str:
    """Human words for a key: "ECDSA P-256 (secp256r1)", "RSA 2048"."""
    public = key.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        curve = public.curve.name
        pretty = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}.get(curve)
        return f"ECDSA {pretty} ({curve})" if pretty else f"ECDSA {curve}"
    if isinstance(public, rsa.RSAPublicKey):
        return f"RSA {public.key_size}"
    return type(public).__name__


# --- certificates ----------------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _validity(
    days: int,
    not_before: datetime.datetime | None,
    not_after: datetime.datetime | None,
) -> tuple[datetime.datetime, datetime.datetime]:
    now = _now()
    start = not_before if not_before is not None else now - NOT_BEFORE_BACKDATE
    end = not_after if not_after is not None else now + datetime.timedelta(days=days)
    if end <= start:
        raise PKIError(f"not_after ({end:%Y-%m-%d %H:%M:%S}Z) is not after not_before")
    return start, end


def _serial_number() -> int:
    # RFC 5280 4.1.2.2: positive, at most 20 octets; 159 random bits keep the top bit clear.
    return secrets.randbits(159) | 1


def _hash_for(key: PrivateKey) -> hashes.SHA256:
    # SHA-256 for both key types: what cfssl and openssl sign with by default.
    return hashes.SHA256()


def common_name(cert: x509.Certificate) -> str:
    """The subject's first CN, or "" when it has none."""
    return pem_files.common_name(cert.subject) or ""


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return constraints.ca


def _check_common_name(value: str) -> str:
    if not value or not value.strip():
        raise PKIError("the common name (CN) must not be empty")
    if len(value) > 64:
        # RFC 5280 appendix A: ub-common-name 64.
        raise PKIError(f"the common name {value!r} is longer than 64 characters (RFC 5280)")
    return value


def _issuer_aki(issuer: Issued) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _check_issuer(issuer: Issued) -> None:
    if not issuer.is_ca:
        raise PKIError(
            f"{issuer.common_name!r} is not a CA certificate (basicConstraints CA:FALSE)"
        )


def _build(
    *,
    subject: x509.Name,
    key: PrivateKey,
    issuer: Issued | None,
    validity: tuple[datetime.datetime, datetime.datetime],
    ca: bool,
    path_length: int | None,
    key_usage: KeyUsage,
    extended_key_usage: Sequence[x509.ObjectIdentifier],
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
) -> x509.Certificate:
    signing_key = key if issuer is None else issuer.key
    issuer_name = subject if issuer is None else issuer.cert.subject
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(key_usage.extension(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
    else:
        builder = builder.add_extension(_issuer_aki(issuer), critical=False)
    if extended_key_usage:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(list(extended_key_usage)), critical=False
        )
    alternative_names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    for address in ip_addresses:
        try:
            alternative_names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError as error:
            raise PKIError(f"not an IP address: {address!r}") from error
    if alternative_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(alternative_names), critical=False
        )
    return builder.sign(signing_key, _hash_for(signing_key))


def _chain_below(issuer: Issued) -> tuple[x509.Certificate, ...]:
    """The chain a certificate signed by ``issuer`` carries: issuer plus its chain, no root."""
    if is_self_signed(issuer.cert):
        return issuer.chain
    return (issuer.cert, *issuer.chain)


def make_root(
    common_name: str,
    *,
    key_type: KeyType = "ec",
    key: PrivateKey | None = None,
    days: int = DEFAULT_CA_DAYS,
    names: Names = Names(),
    path_length: int | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """A self-signed root CA (``cfssl gencert -initca``): CA:TRUE, cert sign + CRL sign."""
    key = key if key is not None else generate_key(key_type)
    cert = _build(
        subject=names.subject(_check_common_name(common_name)),
        key=key,
        issuer=None,
        validity=_validity(days, not_before, not_after),
        ca=True,
        path_length=path_length,
        key_usage=CA_KEY_USAGE,
        extended_key_usage=(),
        dns_names=(),
        ip_addresses=(),
    )
    return Issued(cert=cert, key=key)


def make_intermediate(
    issuer: Issued,
    common_name: str,
    *,
    key_type: KeyType = "ec",
    key: PrivateKey | None = None,
    days: int = DEFAULT_CA_DAYS,
    names: Names = Names(),
    path_length: int | None = DEFAULT_INTERMEDIATE_PATH_LENGTH,
    key_usage: KeyUsage = CA_KEY_USAGE,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """An intermediate CA signed by ``issuer`` (the seed's ``intermediate`` profile).

    ``path_length`` 1 is the seed's ``max_path_len``: one more CA may sit below this one.
    """
    _check_issuer(issuer)
    key = key if key is not None else generate_key(key_type)
    cert = _build(
        subject=names.subject(_check_common_name(common_name)),
        key=key,
        issuer=issuer,
        validity=_validity(days, not_before, not_after),
        ca=True,
        path_length=path_length,
        key_usage=key_usage,
        extended_key_usage=(),
        dns_names=(),
        ip_addresses=(),
    )
    return Issued(cert=cert, key=key, chain=_chain_below(issuer))


def make_leaf(
    issuer: Issued,
    common_name: str,
    *,
    extended_key_usage: Sequence[x509.ObjectIdentifier],
    key_type: KeyType = "ec",
    key: PrivateKey | None = None,
    days: int = DEFAULT_LEAF_DAYS,
    names: Names = Names(),
    key_usage: KeyUsage | None = None,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """An end-entity certificate (CA:FALSE) signed by ``issuer``; the other makers wrap it."""
    _check_issuer(issuer)
    key = key if key is not None else generate_key(key_type)
    cert = _build(
        subject=names.subject(_check_common_name(common_name)),
        key=key,
        issuer=issuer,
        validity=_validity(days, not_before, not_after),
        ca=False,
        path_length=None,
        key_usage=key_usage if key_usage is not None else default_leaf_key_usage(key),
        extended_key_usage=extended_key_usage,
        dns_names=dns_names,
        ip_addresses=ip_addresses,
    )
    return Issued(cert=cert, key=key, chain=_chain_below(issuer))


def make_device(
    issuer: Issued,
    common_name: str,
    *,
    extended_key_usage: Sequence[x509.ObjectIdentifier] = (CLIENT_AUTH, SERVER_AUTH),
    key_type: KeyType = "ec",
    key: PrivateKey | None = None,
    days: int = DEFAULT_LEAF_DAYS,
    names: Names = Names(),
    key_usage: KeyUsage | None = None,
    dns_names: Sequence[str] = (),
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """A device certificate, CN = device id (the seed's ``device`` profile).

    The seed's profile has both client auth and server auth, so that is the default; pass
    ``extended_key_usage=(SERVER_AUTH,)`` to make a device a TLS server must refuse.
    """
    return make_leaf(
        issuer,
        common_name,
        extended_key_usage=extended_key_usage,
        key_type=key_type,
        key=key,
        days=days,
        names=names,
        key_usage=key_usage,
        dns_names=dns_names,
        not_before=not_before,
        not_after=not_after,
    )


def make_server(
    issuer: Issued,
    common_name: str,
    *,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    extended_key_usage: Sequence[x509.ObjectIdentifier] = (SERVER_AUTH,),
    key_type: KeyType = "ec",
    key: PrivateKey | None = None,
    days: int = DEFAULT_LEAF_DAYS,
    names: Names = Names(),
    key_usage: KeyUsage | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """A TLS server certificate (serverAuth) with DNS and IP subject alternative names."""
    return make_leaf(
        issuer,
        common_name,
        extended_key_usage=extended_key_usage,
        key_type=key_type,
        key=key,
        days=days,
        names=names,
        key_usage=key_usage,
        dns_names=dns_names,
        ip_addresses=ip_addresses,
        not_before=not_before,
        not_after=not_after,
    )


def make_node(
    issuer: Issued,
    name: str,
    *,
    dns_names: Sequence[str] | None = None,
    ip_addresses: Sequence[str] = (),
    key_type: KeyType = "ec",
    key: PrivateKey | None = None,
    days: int = DEFAULT_LEAF_DAYS,
    names: Names = Names(),
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """A cluster node certificate (seed 002): CA:FALSE, SAN DNS, serverAuth + clientAuth.

    Both usages because each node is a TLS server for its peers and a client of them.
    ``dns_names`` defaults to ``[name]``.
    """
    return make_leaf(
        issuer,
        name,
        extended_key_usage=(SERVER_AUTH, CLIENT_AUTH),
        key_type=key_type,
        key=key,
        days=days,
        names=names,
        dns_names=[name] if dns_names is None else dns_names,
        ip_addresses=ip_addresses,
        not_before=not_before,
        not_after=not_after,
    )


def make_crl(
    issuer: Issued,
    revoked: Iterable[x509.Certificate | Revocation] = (),
    *,
    next_update_days: int = DEFAULT_CRL_DAYS,
    crl_number: int | None = None,
    last_update: datetime.datetime | None = None,
) -> x509.CertificateRevocationList:
    """A CRL signed by ``issuer`` listing ``revoked`` (certificates or serial records).

    ``crl_number`` defaults to the current Unix time, so a re-issued CRL always counts up.
    """
    _check_issuer(issuer)
    now = _now()
    this_update = last_update if last_update is not None else now - NOT_BEFORE_BACKDATE
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(this_update)
        .next_update(now + datetime.timedelta(days=next_update_days))
        .add_extension(_issuer_aki(issuer), critical=False)
        .add_extension(
            x509.CRLNumber(crl_number if crl_number is not None else int(now.timestamp())),
            critical=False,
        )
    )
    for item in revoked:
        if isinstance(item, x509.Certificate):
            if item.issuer != issuer.cert.subject:
                raise PKIError(
                    f"{common_name(item)!r} was not issued by {issuer.common_name!r}: "
                    "a CRL can only revoke its issuer's certificates"
                )
            entry = Revocation(serial_number=item.serial_number, revocation_date=this_update)
        else:
            entry = item
        revoked_builder = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial_number)
            .revocation_date(entry.revocation_date)
        )
        if entry.reason is not None:
            revoked_builder = revoked_builder.add_extension(
                x509.CRLReason(entry.reason), critical=False
            )
        builder = builder.add_revoked_certificate(revoked_builder.build())
    return builder.sign(issuer.key, _hash_for(issuer.key))


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """The SHA-256 fingerprint as openssl prints it: upper-case hex pairs joined by colons."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


# --- files -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pem:
    parts: list[bytes] = field(default_factory=list)

    def key(self, key: PrivateKey, password: bytes | None) -> None:
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        self.parts.append(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
            )
        )

    def certs(self, certs: Iterable[x509.Certificate]) -> None:
        self.parts.extend(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)

    def data(self) -> bytes:
        return b"".join(self.parts)


def write_file(path: Path, data: bytes, *, mode: int, force: bool, sync: bool = True) -> None:
    """Write ``data`` to ``path`` with ``mode``, never visible with wider permissions.

    Without ``force`` the file is created with O_CREAT|O_EXCL, so an existing file (or a
    symlink planted in its place) is refused. With ``force`` a temporary file beside it is
    created the same way and renamed over the old one. ``sync`` False skips the fsync: a
    caller writing thousands of files syncs once at the end (an fsync per file made 100,000
    devices take minutes).
    """
    target = path if not force else path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(target, flags, mode)
    except FileExistsError as error:
        raise PKIError(f"refusing to overwrite existing file {path} (use --force)") from error
    except OSError as error:
        raise PKIError(f"cannot create {path}: {error.strerror}") from error
    try:
        with os.fdopen(descriptor, "wb") as stream:
            # os.open's mode passes through the umask; set it exactly as asked.
            os.fchmod(stream.fileno(), mode)
            stream.write(data)
            stream.flush()
            if sync:
                os.fsync(stream.fileno())
        if force:
            os.replace(target, path)
    except BaseException:
        if force:
            target.unlink(missing_ok=True)
        raise


def write_key(
    path: Path | str,
    key: PrivateKey,
    *,
    password: bytes | None = None,
    force: bool = False,
    sync: bool = True,
) -> Path:
    """Write a PKCS#8 PEM private key with mode 0600, encrypted when ``password`` is given."""
    pem = _Pem()
    pem.key(key, password)
    write_file(Path(path), pem.data(), mode=0o600, force=force, sync=sync)
    return Path(path)


def write_certs(
    path: Path | str,
    certs: Iterable[x509.Certificate],
    *,
    force: bool = True,
    sync: bool = True,
) -> Path:
    """Write certificates as concatenated PEM (mode 0644; public, overwritten by default)."""
    pem = _Pem()
    pem.certs(certs)
    write_file(Path(path), pem.data(), mode=0o644, force=force, sync=sync)
    return Path(path)


def write_crls(
    path: Path | str, crls: Iterable[x509.CertificateRevocationList], *, force: bool = True
) -> Path:
    """Write CRLs as concatenated PEM, the form HAProxy's ``crl-file`` reads."""
    data = b"".join(crl.public_bytes(serialization.Encoding.PEM) for crl in crls)
    write_file(Path(path), data, mode=0o644, force=force)
    return Path(path)


def write_allinone(
    path: Path | str, issued: Issued, *, password: bytes | None = None, force: bool = False
) -> Path:
    """Key, certificate, then the intermediates in one PEM, mode 0600 (``crt`` for HAProxy).

    The seed does ``cat emqx-server-key.pem emqx-server.pem``; adding the chain lets clients
    that only trust the root verify the server.
    """
    pem = _Pem()
    pem.key(issued.key, password)
    pem.certs(issued.certs)
    write_file(Path(path), pem.data(), mode=0o600, force=force)
    return Path(path)


@contextmanager
def _pki_errors() -> Iterator[None]:
    """lb.pem's file errors (which name the file) as lb-pki's one error family."""
    try:
        yield
    except pem_files.TLSFileError as error:
        raise PKIError(str(error)) from None


def _read(path: Path) -> bytes:
    with _pki_errors():
        return pem_files.read_file(path)


def load_certs(path: Path | str) -> list[x509.Certificate]:
    """Every certificate in a PEM file, in file order, or the one certificate of a DER file."""
    with _pki_errors():
        return pem_files.load_certificates(path, der=True)


def load_crls(path: Path | str) -> list[x509.CertificateRevocationList]:
    """Every CRL in a PEM file (or the single CRL of a DER file)."""
    with _pki_errors():
        return pem_files.load_crls(path)


def _pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    """(label, whole block) for each PEM block, in file order (RFC 7468)."""
    return [(match.group(1).decode(), match.group(0)) for match in _PEM_BLOCK.finditer(data)]


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)


def load_key(path: Path | str, password: bytes | None = None) -> PrivateKey:
    """The first private key in a PEM file (possibly an allinone file with certificates)."""
    path = Path(path)
    for label, block in _pem_blocks(_read(path)):
        if not label.endswith("PRIVATE KEY"):
            continue
        try:
            key = serialization.load_pem_private_key(block, password=password)
        except TypeError as error:
            if password is None:
                raise KeyPasswordError(
                    f"{path}: the key is encrypted: a password is needed"
                ) from error
            raise PKIError(f"{path}: the key is not encrypted but a password was given") from error
        except ValueError as error:
            if password is not None and b"ENCRYPTED" in block[:40]:
                raise KeyPasswordError(f"{path}: wrong password for the key") from error
            raise PKIError(f"{path}: cannot parse the key ({error})") from error
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise PKIError(f"{path}: unsupported key type {type(key).__name__}")
        return key
    raise PKIError(f"{path}: no private key in this file")


def load_issued(
    cert_path: Path | str, key_path: Path | str | None = None, password: bytes | None = None
) -> Issued:
    """Read a certificate (first in the file), its chain (the rest) and its key.

    ``key_path`` None reads the key from ``cert_path`` (an allinone file). Self-signed
    certificates after the first are dropped from ``chain`` (a chain excludes the root).
    The key must belong to the certificate.
    """
    certs = load_certs(cert_path)
    key = load_key(key_path if key_path is not None else cert_path, password)
    cert, rest = certs[0], certs[1:]
    if cert.public_key() != key.public_key():
        raise PKIError(
            f"{key_path if key_path is not None else cert_path}: this key does not belong to "
            f"the certificate {common_name(cert)!r} in {cert_path}"
        )
    chain = tuple(other for other in rest if not is_self_signed(other))
    return Issued(cert=cert, key=key, chain=chain)
