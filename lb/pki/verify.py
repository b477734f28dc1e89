"""Explain, in words, whether a certificate chain would be accepted and why not.

This is the ``lb-pki verify`` engine: it builds the path from a leaf to a self-signed trust
anchor the way OpenSSL does (issuer name, then signature), then checks what RFC 5280
section 6.1 and a TLS server check: validity periods, CA:TRUE and certificate signing on
every issuer, path length constraints, the leaf's extended key usage for the purpose, and
CRLs. HAProxy's ``crl-file`` checks every level of the chain (OpenSSL's
X509_V_FLAG_CRL_CHECK_ALL), so by default a CA level without a CRL is a refusal too.

Unlike OpenSSL, which stops at the first error, every problem found is reported.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lb.pki.certs import fingerprint_sha256, is_self_signed

__all__ = [
    "MAX_DEPTH",
    "Purpose",
    "Reason",
    "Refusal",
    "Verification",
    "eku_name",
    "verify_chain",
]

# OpenSSL's default verify depth is 100; EMQX's default intermediate depth is 10 (seed 000).
MAX_DEPTH = 10

Purpose = Literal["client", "server", "any"]


class Reason(StrEnum):
    """Why a certificate is refused; values are short tokens for logs and tests."""

    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    UNKNOWN_CA = "unknown_ca"
    SELF_SIGNED = "self_signed"
    SIGNATURE_INVALID = "signature_invalid"
    NOT_A_CA = "not_a_ca"
    PATH_LENGTH_EXCEEDED = "path_length_exceeded"
    WRONG_USAGE = "wrong_usage"
    REVOKED = "revoked"
    NO_CRL = "no_crl"
    CRL_EXPIRED = "crl_expired"
    CHAIN_TOO_LONG = "chain_too_long"


@dataclass(frozen=True, slots=True)
class Refusal:
    """One reason to refuse, about the certificate at ``depth`` (0 = the leaf)."""

    depth: int
    subject: str
    reason: Reason
    message: str

    def __str__(self) -> str:
        return f"depth {self.depth} {self.subject!r}: {self.message}"


@dataclass(frozen=True, slots=True)
class Verification:
    """The path that was built (leaf first) and every refusal found on it."""

    path: tuple[x509.Certificate, ...]
    refusals: tuple[Refusal, ...]

    @property
    def ok(self) -> bool:
        """True when nothing was refused and the path ends at a trusted root."""
        return not self.refusals

    @property
    def reasons(self) -> set[Reason]:
        """The set of refusal reasons (handy in tests)."""
        return {refusal.reason for refusal in self.refusals}


def _name(cert: x509.Certificate) -> str:
    attributes = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if attributes:
        value = attributes[0].value
        return value if isinstance(value, str) else value.decode(errors="replace")
    return cert.subject.rfc4514_string()


def _issuer_name(cert: x509.Certificate) -> str:
    attributes = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    if attributes:
        value = attributes[0].value
        return value if isinstance(value, str) else value.decode(errors="replace")
    return cert.issuer.rfc4514_string()


def _date(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


ExtensionValue = TypeVar("ExtensionValue", bound=x509.ExtensionType)


def _extension(cert: x509.Certificate, kind: type[ExtensionValue]) -> ExtensionValue | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _build_path(
    leaf: x509.Certificate,
    trusted: Sequence[x509.Certificate],
    untrusted: Sequence[x509.Certificate],
    refusals: list[Refusal],
) -> list[x509.Certificate]:
    trusted_fingerprints = {fingerprint_sha256(cert) for cert in trusted}
    pool: dict[str, x509.Certificate] = {}
    for cert in (*trusted, *untrusted):
        pool.setdefault(fingerprint_sha256(cert), cert)
    path = [leaf]
    current = leaf
    while True:
        depth = len(path) - 1
        current_fingerprint = fingerprint_sha256(current)
        if is_self_signed(current):
            if current_fingerprint not in trusted_fingerprints:
                message = (
                    "self-signed certificate: no CA vouches for it"
                    if depth == 0
                    else "self-signed CA that is not among the trusted CA files (unknown CA)"
                )
                refusals.append(Refusal(depth, _name(current), Reason.SELF_SIGNED, message))
            return path
        if depth >= MAX_DEPTH:
            refusals.append(
                Refusal(
                    depth,
                    _name(current),
                    Reason.CHAIN_TOO_LONG,
                    f"chain longer than {MAX_DEPTH} certificates",
                )
            )
            return path
        candidates = [
            cert
            for fingerprint, cert in pool.items()
            if cert.subject == current.issuer and fingerprint != current_fingerprint
        ]
        if not candidates:
            if current_fingerprint in trusted_fingerprints:
                message = (
                    f"unknown CA: this trusted CA's issuer {_issuer_name(current)!r} is not in "
                    "the CA files, so the chain cannot reach a root (HAProxy: add the root "
                    "with ca-verify-file)"
                )
            else:
                message = (
                    f"unknown CA: its issuer {_issuer_name(current)!r} is not among the "
                    "trusted CA files (wrong issuer)"
                )
            refusals.append(Refusal(depth, _name(current), Reason.UNKNOWN_CA, message))
            return path
        signer = next((cert for cert in candidates if _signed_by(current, cert)), None)
        if signer is None:
            refusals.append(
                Refusal(
                    depth,
                    _name(current),
                    Reason.SIGNATURE_INVALID,
                    f"signature invalid: a CA named {_issuer_name(current)!r} is trusted, but "
                    "its key did not sign this certificate (another CA with the same name: "
                    "a rogue or re-keyed CA)",
                )
            )
            return path
        path.append(signer)
        current = signer


def _check_validity(
    path: Sequence[x509.Certificate], at: datetime.datetime, refusals: list[Refusal]
) -> None:
    for depth, cert in enumerate(path):
        if at > cert.not_valid_after_utc:
            refusals.append(
                Refusal(
                    depth,
                    _name(cert),
                    Reason.EXPIRED,
                    f"expired on {_date(cert.not_valid_after_utc)}",
                )
            )
        if at < cert.not_valid_before_utc:
            refusals.append(
                Refusal(
                    depth,
                    _name(cert),
                    Reason.NOT_YET_VALID,
                    f"not yet valid: valid from {_date(cert.not_valid_before_utc)}",
                )
            )


def _check_issuers(path: Sequence[x509.Certificate], refusals: list[Refusal]) -> None:
    for depth, cert in enumerate(path[1:], start=1):
        constraints = _extension(cert, x509.BasicConstraints)
        if constraints is None or not constraints.ca:
            refusals.append(
                Refusal(
                    depth,
                    _name(cert),
                    Reason.NOT_A_CA,
                    f"not a CA (basicConstraints CA:FALSE or missing) but it signed "
                    f"{_name(path[depth - 1])!r}",
                )
            )
            continue
        key_usage = _extension(cert, x509.KeyUsage)
        if key_usage is not None and not key_usage.key_cert_sign:
            refusals.append(
                Refusal(
                    depth,
                    _name(cert),
                    Reason.WRONG_USAGE,
                    "wrong usage: its key usage does not allow certificate signing",
                )
            )
        # RFC 5280 4.2.1.9: pathLenConstraint counts the non-self-issued CA certificates
        # that may follow this one in the path; here those are depths 1 .. depth-1.
        below = depth - 1
        if constraints.path_length is not None and below > constraints.path_length:
            refusals.append(
                Refusal(
                    depth,
                    _name(cert),
                    Reason.PATH_LENGTH_EXCEEDED,
                    f"path length exceeded: pathlen:{constraints.path_length} allows "
                    f"{constraints.path_length} CA certificate(s) below it, this chain has "
                    f"{below}",
                )
            )


_PURPOSE_EKU: dict[str, x509.ObjectIdentifier] = {
    "client": ExtendedKeyUsageOID.CLIENT_AUTH,
    "server": ExtendedKeyUsageOID.SERVER_AUTH,
}
_EKU_NAMES: dict[x509.ObjectIdentifier, str] = {
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}


def eku_name(oid: x509.ObjectIdentifier) -> str:
    """OpenSSL's short name for an extended key usage, else the dotted OID."""
    return _EKU_NAMES.get(oid, oid.dotted_string)


def _check_leaf_usage(leaf: x509.Certificate, purpose: Purpose, refusals: list[Refusal]) -> None:
    if purpose == "any":
        return
    wanted = _PURPOSE_EKU[purpose]
    extended = _extension(leaf, x509.ExtendedKeyUsage)
    if extended is not None:
        usages = list(extended)
        if wanted not in usages and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usages:
            has = ", ".join(eku_name(oid) for oid in usages) or "nothing"
            refusals.append(
                Refusal(
                    0,
                    _name(leaf),
                    Reason.WRONG_USAGE,
                    f"wrong usage: extended key usage is {has}; a {purpose} certificate "
                    f"needs {eku_name(wanted)}",
                )
            )
    key_usage = _extension(leaf, x509.KeyUsage)
    if key_usage is not None and not (key_usage.digital_signature or key_usage.key_agreement):
        if purpose == "server" and key_usage.key_encipherment:
            return
        refusals.append(
            Refusal(
                0,
                _name(leaf),
                Reason.WRONG_USAGE,
                "wrong usage: key usage allows neither digitalSignature nor keyAgreement",
            )
        )


def _check_crls(
    path: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList],
    at: datetime.datetime,
    check_all: bool,
    refusals: list[Refusal],
) -> None:
    last = len(path) - 1 if check_all else min(1, len(path) - 1)
    for depth in range(last):
        cert, issuer = path[depth], path[depth + 1]
        named = [crl for crl in crls if crl.issuer == issuer.subject]
        issuer_key = issuer.public_key()
        signed = (
            [crl for crl in named if crl.is_signature_valid(issuer_key)]
            if isinstance(issuer_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
            else []
        )
        if not signed:
            detail = (
                "a CRL with that issuer name is there, but its signature does not verify"
                if named
                else "none in the CRL files"
            )
            refusals.append(
                Refusal(
                    depth,
                    _name(cert),
                    Reason.NO_CRL,
                    f"no CRL from its issuer {_name(issuer)!r} ({detail}); with CRL checks "
                    "every CA level needs a CRL, as HAProxy's crl-file does",
                )
            )
            continue
        crl = max(signed, key=lambda item: item.last_update_utc)
        if crl.next_update_utc is not None and at > crl.next_update_utc:
            refusals.append(
                Refusal(
                    depth,
                    _name(cert),
                    Reason.CRL_EXPIRED,
                    f"the CRL from {_name(issuer)!r} expired on {_date(crl.next_update_utc)} "
                    "(nextUpdate): issue a new one with `lb-pki crl`",
                )
            )
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if entry is not None:
            reason = ""
            try:
                reason_value = entry.extensions.get_extension_for_class(x509.CRLReason).value
                reason = f" (reason: {reason_value.reason.value})"
            except x509.ExtensionNotFound:
                pass
            refusals.append(
                Refusal(
                    depth,
                    _name(cert),
                    Reason.REVOKED,
                    f"revoked on {_date(entry.revocation_date_utc)}{reason} by {_name(issuer)!r}",
                )
            )


def verify_chain(
    leaf: x509.Certificate,
    *,
    trusted: Sequence[x509.Certificate],
    untrusted: Sequence[x509.Certificate] = (),
    crls: Sequence[x509.CertificateRevocationList] = (),
    purpose: Purpose = "client",
    at: datetime.datetime | None = None,
    crl_check_all: bool = True,
) -> Verification:
    """Verify ``leaf`` against ``trusted`` CA certificates and say why it would be refused.

    ``trusted`` plays HAProxy's ca-file plus ca-verify-file; ``untrusted`` are intermediates
    the peer sent. CRLs are checked when any are given: every level of the chain when
    ``crl_check_all`` (HAProxy), else the leaf only (``openssl verify -crl_check``).
    """
    moment = at if at is not None else datetime.datetime.now(datetime.UTC)
    refusals: list[Refusal] = []
    path = _build_path(leaf, trusted, untrusted, refusals)
    _check_validity(path, moment, refusals)
    _check_issuers(path, refusals)
    _check_leaf_usage(leaf, purpose, refusals)
    if crls:
        _check_crls(path, crls, moment, crl_check_all, refusals)
    refusals.sort(key=lambda refusal: refusal.depth)
    return Verification(path=tuple(path), refusals=tuple(refusals))
