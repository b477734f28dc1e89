"""Certificate, key and CRL files: loading them, and the questions every user of them asks.

A leaf module on `cryptography` alone, shared by lb's TLS code (lb.tls), the broker's TLS
listener and cluster link (broker.tls_listener) and `lb-pki` (lb.pki.certs):

- loaders that name the file in every error (`TLSFileError`): `load_certificates`,
  `load_crls`, `load_private_key`, and `load_pem_bundle` for an HAProxy `crt` file (key,
  certificate and chain in one PEM, or the key in `<file>.key`); `bundle_from_pem` for the
  same text arriving through the runtime API;
- chain questions: `issued_by` (name and signature), `is_self_signed`, `common_name`;
- file hygiene: `file_signature` (what a reload watcher compares) and
  `check_key_permissions` (seed 002: a private key readable by its owner only).

Files are PEM, as HAProxy and EMQX read them. A CRL may also be one DER CRL (what
`openssl ca -gencrl -outform der` writes); `lb-pki` also reads a DER certificate, and asks
for it with `load_certificates(path, der=True)`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


class TLSFileError(Exception):
    """A certificate, key, CA or CRL file that cannot be used; the message names the file."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = Path(path)
        self.reason = message


@dataclass(frozen=True, slots=True)
class PemBundle:
    """A `crt` file: the private key, the certificate it belongs to, then its chain."""

    path: Path
    key: PrivateKey
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]


def read_file(path: Path) -> bytes:
    """The file's bytes; a missing, unreadable or directory path is a TLSFileError."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TLSFileError(path, "no such file") from None
    except IsADirectoryError:
        raise TLSFileError(path, "is a directory, expected a PEM file") from None
    except PermissionError:
        raise TLSFileError(path, "permission denied") from None


def load_certificates(path: Path | str, *, der: bool = False) -> list[x509.Certificate]:
    """Every certificate in a PEM file, in file order; at least one. With `der`, a file
    without a PEM block is read as one DER certificate (lb-pki's inputs; lb's bind files,
    like HAProxy's, are PEM)."""
    path = Path(path)
    data = read_file(path)
    if der and b"-----BEGIN" not in data:
        try:
            return [x509.load_der_x509_certificate(data)]
        except ValueError as error:
            raise TLSFileError(path, f"neither PEM nor a DER certificate: {error}") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as error:
        if b"-----BEGIN CERTIFICATE-----" not in data:
            raise TLSFileError(path, "contains no PEM certificate") from None
        raise TLSFileError(path, f"unreadable certificate: {error}") from None
    return certificates


def load_crls(path: Path | str) -> list[x509.CertificateRevocationList]:
    """Every CRL in a PEM (or single DER) file; at least one."""
    path = Path(path)
    data = read_file(path)
    marker = b"-----BEGIN X509 CRL-----"
    if marker not in data:
        try:
            return [x509.load_der_x509_crl(data)]
        except ValueError:
            raise TLSFileError(path, "contains no CRL (expected PEM 'X509 CRL' blocks)") from None
    crls = []
    for block in data.split(marker)[1:]:
        pem = marker + block.split(b"-----END X509 CRL-----")[0] + b"-----END X509 CRL-----\n"
        try:
            crls.append(x509.load_pem_x509_crl(pem))
        except ValueError as error:
            raise TLSFileError(path, f"unreadable CRL: {error}") from None
    return crls


def _public_bytes(key: object) -> bytes:
    public = key.public_key()  # type: ignore[attr-defined]
    return bytes(
        public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def load_private_key(path: Path | str, password: bytes | None = None) -> PrivateKey:
    path = Path(path)
    data = read_file(path)
    if b"PRIVATE KEY-----" not in data:
        raise TLSFileError(path, "contains no PEM private key")
    try:
        key = serialization.load_pem_private_key(data, password)
    except TypeError as error:  # encrypted without password, or password for a plain key
        raise TLSFileError(path, f"private key: {error}") from None
    except ValueError as error:
        raise TLSFileError(path, f"unreadable private key (wrong password?): {error}") from None
    if not isinstance(key, PrivateKey):
        raise TLSFileError(path, f"unsupported key type {type(key).__name__}")
    return key


def load_pem_bundle(
    path: Path | str, key_path: Path | str | None = None, password: bytes | None = None
) -> PemBundle:
    """Load a `crt` file: key + certificate + chain in one PEM (HAProxy also finds the key in
    `<file>.key` when the PEM has none). The certificate that matches the key is the leaf;
    the others are its chain, ordered from the leaf upwards."""
    path = Path(path)
    certificates = load_certificates(path)
    if key_path is None:
        data = read_file(path)
        if b"PRIVATE KEY-----" in data:
            key_path = path
        elif Path(f"{path}.key").exists():
            key_path = Path(f"{path}.key")
        else:
            raise TLSFileError(path, f"contains no private key (and no {path.name}.key beside it)")
    key = load_private_key(key_path, password)
    key_public = _public_bytes(key)
    leaves = [c for c in certificates if _public_bytes(c) == key_public]
    if not leaves:
        raise TLSFileError(
            path, f"the private key does not match any certificate in the file ({key_path})"
        )
    leaf = leaves[0]
    rest = [c for c in certificates if c is not leaf]
    return PemBundle(path, key, leaf, tuple(_order_chain(leaf, rest)))


def bundle_from_pem(data: bytes, path: Path | str) -> PemBundle:
    """A `crt` bundle from PEM text (the runtime API's `set ssl cert` payload)."""
    path = Path(path)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSFileError(path, "payload contains no PEM certificate") from None
    start = data.find(b"-----BEGIN ")
    key: object = None
    while start >= 0:
        end_marker = data.find(b"-----END ", start)
        line_end = data.find(b"-----", end_marker + 9)
        block = data[start : line_end + 5]
        if b"PRIVATE KEY-----" in block[:40]:
            try:
                key = serialization.load_pem_private_key(block, None)
            except (TypeError, ValueError) as error:
                raise TLSFileError(path, f"payload private key: {error}") from None
            break
        start = data.find(b"-----BEGIN ", line_end + 5)
    if not isinstance(key, PrivateKey):
        raise TLSFileError(path, "payload contains no usable private key")
    key_public = _public_bytes(key)
    leaves = [c for c in certificates if _public_bytes(c) == key_public]
    if not leaves:
        raise TLSFileError(path, "the private key does not match any certificate in the payload")
    leaf = leaves[0]
    rest = [c for c in certificates if c is not leaf]
    return PemBundle(path, key, leaf, tuple(_order_chain(leaf, rest)))


def _order_chain(leaf: x509.Certificate, others: list[x509.Certificate]) -> list[x509.Certificate]:
    """The chain above `leaf` as found in `others`, nearest issuer first; strays at the end."""
    ordered: list[x509.Certificate] = []
    current = leaf
    remaining = list(others)
    while True:
        issuer = next((c for c in remaining if issued_by(current, c)), None)
        if issuer is None or issuer is current:
            break
        ordered.append(issuer)
        remaining.remove(issuer)
        current = issuer
    return ordered + remaining


def issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    if certificate.issuer != issuer.subject:
        return False
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, Exception):  # InvalidSignature and unsupported key types
        return False
    return True


def is_self_signed(certificate: x509.Certificate) -> bool:
    return issued_by(certificate, certificate)


def common_name(name: x509.Name) -> str | None:
    attributes = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attributes:
        return None
    value = attributes[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def check_key_permissions(path: Path | str) -> str | None:
    """Seed 002: key files readable only by their owner. Returns a message when they are not."""
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        return (
            f"private key {path} is readable by group or others (mode {mode:o}); "
            f"fix it with: chmod 600 {path}"
        )
    return None


FileSignature = tuple[tuple[str, int, int], ...]


def file_signature(paths: Iterable[Path | None]) -> FileSignature:
    """What a reload watcher compares to decide that files changed (path, mtime_ns, size)."""
    result = []
    for path in paths:
        if path is None:
            continue
        try:
            stat = os.stat(path)
        except OSError:
            result.append((str(path), -1, -1))
            continue
        result.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(result)
