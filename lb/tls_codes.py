"""OpenSSL's numbered TLS codes, the names they go by, and what each means for a refusal.

No dependencies (not even `ssl` or pyOpenSSL), so that the config parser (`ssl-min-ver`,
`ca-ignore-err`, `crt-ignore-err`), lb's TLS code, its log lines and counters, and the
broker's TLS listener share one table without importing each other.

A refused handshake is classified once, here, into a `Refusal`: from the X509_V_ERR id of a
failed certificate verification (`refusal_for_verify_error`), or from the OpenSSL reason of
any other failure, by number as lb reads it from OpenSSL's error queue
(`refusal_for_reason_codes`) or by name as Python's `ssl.SSLError.reason` gives it
(`refusal_for_reason`). The words of a log line and the counter's label both follow from it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Literal

TlsVersion = Literal["SSLv3", "TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3"]
#: HAProxy 2.6's names for ssl-min-ver / ssl-max-ver, oldest first, with the protocol
#: version numbers OpenSSL takes for them (SSL3_VERSION .. TLS1_3_VERSION, the record
#: layer's version field: RFC 8446 B.1).
TLS_VERSIONS: dict[TlsVersion, int] = {
    "SSLv3": 0x0300,
    "TLSv1.0": 0x0301,
    "TLSv1.1": 0x0302,
    "TLSv1.2": 0x0303,
    "TLSv1.3": 0x0304,
}


class Refusal(enum.Enum):
    """Why a TLS handshake was refused. `label` is lb's Prometheus `reason` label
    (haproxy_frontend_ssl_handshake_failures_total)."""

    # A certificate the verification refused (the X509_V_ERR ids in X509_V_ERRORS)
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    REVOKED = "revoked"
    UNKNOWN_CA = "unknown_ca"
    SELF_SIGNED = "self_signed"
    SELF_SIGNED_IN_CHAIN = "self_signed_in_chain"
    CRL_MISSING = "crl_missing"
    CRL_NOT_YET_VALID = "crl_invalid"
    CRL_EXPIRED = "crl_expired"
    BAD_PURPOSE = "bad_purpose"
    CHAIN_TOO_LONG = "chain_too_long"
    INVALID_CA = "invalid_ca"
    PATH_LENGTH = "path_length"
    BAD_SIGNATURE = "bad_signature"
    VERIFY_OTHER = "verify_other"
    # Anything else (OpenSSL's SSL reasons in SSL_REASONS, or what lb saw itself)
    NO_CERTIFICATE = "no_certificate"
    PROTOCOL_VERSION = "protocol_version"
    NO_SHARED_CIPHER = "no_shared_cipher"
    NOT_TLS = "not_tls"
    PLAIN_HTTP = "plain_http"
    PEER_UNKNOWN_CA = "peer_unknown_ca"
    PEER_BAD_CERTIFICATE = "peer_bad_certificate"
    PEER_CERTIFICATE_EXPIRED = "peer_certificate_expired"
    PEER_CERTIFICATE_REVOKED = "peer_certificate_revoked"
    TIMEOUT = "timeout"
    CLIENT_CLOSED = "client_closed"
    INTERNAL_ERROR = "internal_error"
    OTHER = "other"

    @property
    def label(self) -> str:
        return _LABELS.get(self, self.value)


#: Refusals counted under another one's label: the label values predate the finer classes
#: (plain HTTP is "not TLS" to a dashboard; a client refusing lb's own certificate, or a
#: callback that failed, is "other").
_LABELS = {
    Refusal.SELF_SIGNED_IN_CHAIN: Refusal.SELF_SIGNED.value,
    Refusal.PLAIN_HTTP: Refusal.NOT_TLS.value,
    Refusal.PEER_UNKNOWN_CA: Refusal.OTHER.value,
    Refusal.PEER_BAD_CERTIFICATE: Refusal.OTHER.value,
    Refusal.PEER_CERTIFICATE_EXPIRED: Refusal.OTHER.value,
    Refusal.PEER_CERTIFICATE_REVOKED: Refusal.OTHER.value,
    Refusal.INTERNAL_ERROR: Refusal.OTHER.value,
}


#: OpenSSL X509_V_ERR_* ids (include/openssl/x509_vfy.h) with their names and the refusal
#: each one means. ca-ignore-err and crt-ignore-err take the id or the name (names as
#: HAProxy 2.8 accepts them; 2.6 takes ids only); lb's refusal log lines give the name.
X509_V_ERRORS: dict[int, tuple[str, Refusal]] = {
    2: ("X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT", Refusal.UNKNOWN_CA),
    3: ("X509_V_ERR_UNABLE_TO_GET_CRL", Refusal.CRL_MISSING),
    4: ("X509_V_ERR_UNABLE_TO_DECRYPT_CERT_SIGNATURE", Refusal.BAD_SIGNATURE),
    5: ("X509_V_ERR_UNABLE_TO_DECRYPT_CRL_SIGNATURE", Refusal.VERIFY_OTHER),
    6: ("X509_V_ERR_UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY", Refusal.VERIFY_OTHER),
    7: ("X509_V_ERR_CERT_SIGNATURE_FAILURE", Refusal.BAD_SIGNATURE),
    8: ("X509_V_ERR_CRL_SIGNATURE_FAILURE", Refusal.VERIFY_OTHER),
    9: ("X509_V_ERR_CERT_NOT_YET_VALID", Refusal.NOT_YET_VALID),
    10: ("X509_V_ERR_CERT_HAS_EXPIRED", Refusal.EXPIRED),
    11: ("X509_V_ERR_CRL_NOT_YET_VALID", Refusal.CRL_NOT_YET_VALID),
    12: ("X509_V_ERR_CRL_HAS_EXPIRED", Refusal.CRL_EXPIRED),
    13: ("X509_V_ERR_ERROR_IN_CERT_NOT_BEFORE_FIELD", Refusal.VERIFY_OTHER),
    14: ("X509_V_ERR_ERROR_IN_CERT_NOT_AFTER_FIELD", Refusal.VERIFY_OTHER),
    15: ("X509_V_ERR_ERROR_IN_CRL_LAST_UPDATE_FIELD", Refusal.VERIFY_OTHER),
    16: ("X509_V_ERR_ERROR_IN_CRL_NEXT_UPDATE_FIELD", Refusal.VERIFY_OTHER),
    17: ("X509_V_ERR_OUT_OF_MEM", Refusal.VERIFY_OTHER),
    18: ("X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT", Refusal.SELF_SIGNED),
    19: ("X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN", Refusal.SELF_SIGNED_IN_CHAIN),
    20: ("X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY", Refusal.UNKNOWN_CA),
    21: ("X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE", Refusal.UNKNOWN_CA),
    22: ("X509_V_ERR_CERT_CHAIN_TOO_LONG", Refusal.CHAIN_TOO_LONG),
    23: ("X509_V_ERR_CERT_REVOKED", Refusal.REVOKED),
    24: ("X509_V_ERR_INVALID_CA", Refusal.INVALID_CA),
    25: ("X509_V_ERR_PATH_LENGTH_EXCEEDED", Refusal.PATH_LENGTH),
    26: ("X509_V_ERR_INVALID_PURPOSE", Refusal.BAD_PURPOSE),
    27: ("X509_V_ERR_CERT_UNTRUSTED", Refusal.VERIFY_OTHER),
    28: ("X509_V_ERR_CERT_REJECTED", Refusal.VERIFY_OTHER),
    29: ("X509_V_ERR_SUBJECT_ISSUER_MISMATCH", Refusal.VERIFY_OTHER),
    30: ("X509_V_ERR_AKID_SKID_MISMATCH", Refusal.VERIFY_OTHER),
    31: ("X509_V_ERR_AKID_ISSUER_SERIAL_MISMATCH", Refusal.VERIFY_OTHER),
    32: ("X509_V_ERR_KEYUSAGE_NO_CERTSIGN", Refusal.VERIFY_OTHER),
    33: ("X509_V_ERR_UNABLE_TO_GET_CRL_ISSUER", Refusal.VERIFY_OTHER),
    34: ("X509_V_ERR_UNHANDLED_CRITICAL_EXTENSION", Refusal.VERIFY_OTHER),
    35: ("X509_V_ERR_KEYUSAGE_NO_CRL_SIGN", Refusal.VERIFY_OTHER),
    36: ("X509_V_ERR_UNHANDLED_CRITICAL_CRL_EXTENSION", Refusal.VERIFY_OTHER),
    37: ("X509_V_ERR_INVALID_NON_CA", Refusal.VERIFY_OTHER),
    41: ("X509_V_ERR_INVALID_EXTENSION", Refusal.VERIFY_OTHER),
    43: ("X509_V_ERR_NO_EXPLICIT_POLICY", Refusal.VERIFY_OTHER),
    44: ("X509_V_ERR_DIFFERENT_CRL_SCOPE", Refusal.VERIFY_OTHER),
    47: ("X509_V_ERR_PERMITTED_VIOLATION", Refusal.VERIFY_OTHER),
    48: ("X509_V_ERR_EXCLUDED_VIOLATION", Refusal.VERIFY_OTHER),
    62: ("X509_V_ERR_HOSTNAME_MISMATCH", Refusal.VERIFY_OTHER),
    79: ("X509_V_ERR_EE_KEY_TOO_SMALL", Refusal.VERIFY_OTHER),
    80: ("X509_V_ERR_CA_KEY_TOO_SMALL", Refusal.VERIFY_OTHER),
    81: ("X509_V_ERR_CA_MD_TOO_WEAK", Refusal.VERIFY_OTHER),
}
X509_V_ERROR_NAMES: dict[int, str] = {code: name for code, (name, _) in X509_V_ERRORS.items()}
X509_V_ERROR_IDS: dict[str, int] = {name: code for code, (name, _) in X509_V_ERRORS.items()}


def refusal_for_verify_error(code: int) -> Refusal:
    """The refusal a failed certificate verification means, by its X509_V_ERR id."""
    entry = X509_V_ERRORS.get(code)
    return entry[1] if entry is not None else Refusal.VERIFY_OTHER


#: ERR_LIB_SSL (include/openssl/err.h): the library of every reason in SSL_REASONS.
ERR_LIB_SSL = 20

#: OpenSSL's SSL_R_* reasons (include/openssl/sslerr.h) that say why a handshake failed, by
#: name (as Python's ssl.SSLError.reason gives it) with their number (what lb reads from
#: OpenSSL's error queue) and refusal. When several are queued, the first row wins. OpenSSL
#: reworded some of them (3.2: "sslv3 alert bad certificate" became "tls alert bad
#: certificate"); the numbers did not change.
SSL_REASONS: dict[str, tuple[int, Refusal]] = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": (199, Refusal.NO_CERTIFICATE),
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": (1116, Refusal.NO_CERTIFICATE),
    "HTTP_REQUEST": (156, Refusal.PLAIN_HTTP),
    "WRONG_VERSION_NUMBER": (267, Refusal.NOT_TLS),
    "PACKET_LENGTH_TOO_LONG": (198, Refusal.NOT_TLS),
    "UNSUPPORTED_PROTOCOL": (258, Refusal.PROTOCOL_VERSION),
    "TLSV1_ALERT_PROTOCOL_VERSION": (1070, Refusal.PROTOCOL_VERSION),
    "VERSION_TOO_LOW": (396, Refusal.PROTOCOL_VERSION),
    "VERSION_TOO_HIGH": (166, Refusal.PROTOCOL_VERSION),
    "WRONG_SSL_VERSION": (266, Refusal.PROTOCOL_VERSION),
    "UNKNOWN_SSL_VERSION": (254, Refusal.PROTOCOL_VERSION),
    "UNSUPPORTED_SSL_VERSION": (259, Refusal.PROTOCOL_VERSION),
    "BAD_PROTOCOL_VERSION_NUMBER": (116, Refusal.PROTOCOL_VERSION),
    "BAD_LEGACY_VERSION": (292, Refusal.PROTOCOL_VERSION),
    "BAD_HRR_VERSION": (263, Refusal.PROTOCOL_VERSION),
    "MISSING_SUPPORTED_VERSIONS_EXTENSION": (420, Refusal.PROTOCOL_VERSION),
    "SSL_SESSION_VERSION_MISMATCH": (210, Refusal.PROTOCOL_VERSION),
    "SSL_CTX_HAS_NO_DEFAULT_SSL_VERSION": (228, Refusal.PROTOCOL_VERSION),
    "NO_SHARED_CIPHER": (193, Refusal.NO_SHARED_CIPHER),
    "TLSV1_ALERT_UNKNOWN_CA": (1048, Refusal.PEER_UNKNOWN_CA),
    "SSLV3_ALERT_BAD_CERTIFICATE": (1042, Refusal.PEER_BAD_CERTIFICATE),
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": (1045, Refusal.PEER_CERTIFICATE_EXPIRED),
    "SSLV3_ALERT_CERTIFICATE_REVOKED": (1044, Refusal.PEER_CERTIFICATE_REVOKED),
}


def refusal_for_reason(name: str) -> Refusal | None:
    """The refusal an SSL reason means, by name (`ssl.SSLError.reason`); None: unknown."""
    entry = SSL_REASONS.get(name)
    return entry[1] if entry is not None else None


def refusal_for_reason_codes(codes: Iterable[tuple[int, int]]) -> Refusal | None:
    """The refusal that queued OpenSSL errors mean, given as (library, reason) numbers;
    None when none of them is in SSL_REASONS."""
    queued = {reason for library, reason in codes if library == ERR_LIB_SSL}
    for number, refusal in SSL_REASONS.values():
        if number in queued:
            return refusal
    return None
