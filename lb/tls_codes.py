"""OpenSSL's numbered TLS codes and the names they go by, for every part that needs them.

No dependencies (not even `ssl` or pyOpenSSL), so that the config parser (`ca-ignore-err`,
`crt-ignore-err`), lb's TLS code and log lines, its counters and the broker's TLS listener
share one table without importing each other.
"""

from __future__ import annotations

#: OpenSSL X509_V_ERR_* ids (include/openssl/x509_vfy.h) with their names. ca-ignore-err and
#: crt-ignore-err take either form (names as HAProxy 2.8 accepts them; 2.6 takes ids only);
#: lb's refusal log lines name the error with it.
X509_V_ERRORS: dict[int, str] = {
    2: "X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT",
    3: "X509_V_ERR_UNABLE_TO_GET_CRL",
    4: "X509_V_ERR_UNABLE_TO_DECRYPT_CERT_SIGNATURE",
    5: "X509_V_ERR_UNABLE_TO_DECRYPT_CRL_SIGNATURE",
    6: "X509_V_ERR_UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY",
    7: "X509_V_ERR_CERT_SIGNATURE_FAILURE",
    8: "X509_V_ERR_CRL_SIGNATURE_FAILURE",
    9: "X509_V_ERR_CERT_NOT_YET_VALID",
    10: "X509_V_ERR_CERT_HAS_EXPIRED",
    11: "X509_V_ERR_CRL_NOT_YET_VALID",
    12: "X509_V_ERR_CRL_HAS_EXPIRED",
    13: "X509_V_ERR_ERROR_IN_CERT_NOT_BEFORE_FIELD",
    14: "X509_V_ERR_ERROR_IN_CERT_NOT_AFTER_FIELD",
    15: "X509_V_ERR_ERROR_IN_CRL_LAST_UPDATE_FIELD",
    16: "X509_V_ERR_ERROR_IN_CRL_NEXT_UPDATE_FIELD",
    17: "X509_V_ERR_OUT_OF_MEM",
    18: "X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT",
    19: "X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN",
    20: "X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
    21: "X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE",
    22: "X509_V_ERR_CERT_CHAIN_TOO_LONG",
    23: "X509_V_ERR_CERT_REVOKED",
    24: "X509_V_ERR_INVALID_CA",
    25: "X509_V_ERR_PATH_LENGTH_EXCEEDED",
    26: "X509_V_ERR_INVALID_PURPOSE",
    27: "X509_V_ERR_CERT_UNTRUSTED",
    28: "X509_V_ERR_CERT_REJECTED",
    29: "X509_V_ERR_SUBJECT_ISSUER_MISMATCH",
    30: "X509_V_ERR_AKID_SKID_MISMATCH",
    31: "X509_V_ERR_AKID_ISSUER_SERIAL_MISMATCH",
    32: "X509_V_ERR_KEYUSAGE_NO_CERTSIGN",
    33: "X509_V_ERR_UNABLE_TO_GET_CRL_ISSUER",
    34: "X509_V_ERR_UNHANDLED_CRITICAL_EXTENSION",
    35: "X509_V_ERR_KEYUSAGE_NO_CRL_SIGN",
    36: "X509_V_ERR_UNHANDLED_CRITICAL_CRL_EXTENSION",
    37: "X509_V_ERR_INVALID_NON_CA",
    41: "X509_V_ERR_INVALID_EXTENSION",
    43: "X509_V_ERR_NO_EXPLICIT_POLICY",
    44: "X509_V_ERR_DIFFERENT_CRL_SCOPE",
    47: "X509_V_ERR_PERMITTED_VIOLATION",
    48: "X509_V_ERR_EXCLUDED_VIOLATION",
    62: "X509_V_ERR_HOSTNAME_MISMATCH",
    79: "X509_V_ERR_EE_KEY_TOO_SMALL",
    80: "X509_V_ERR_CA_KEY_TOO_SMALL",
    81: "X509_V_ERR_CA_MD_TOO_WEAK",
}
X509_V_ERROR_IDS: dict[str, int] = {name: code for code, name in X509_V_ERRORS.items()}
