"""lb's TLS: the pyOpenSSL context of a `bind ... ssl` line, and its refusals in words.

- `BindContext` makes the pyOpenSSL context of an lb `bind ... ssl` line (`bind_tls` takes
  its options from the config model). lb uses pyOpenSSL rather than the standard `ssl`
  module because only it exposes what HAProxy's bind options mean: a verify callback
  (per-depth error codes for `ca-ignore-err` and `crt-ignore-err`, and the failing
  certificate for the refusal log line), the list of acceptable client CA names sent in the
  CertificateRequest (`ca-file` is announced, `ca-verify-file` is not), and OCSP stapling.
  It also reloads its files (lb.reload) and takes a committed certificate (lb.runtime_api).
- `explain_verify_failure`, `handshake_refusal`: why a handshake was refused, in words, beside
  its `Refusal` (lb.tls_codes), from which the counters take their label.
- `check_bind_files` loads and lints certificate, CA and CRL files, so that `lb -c` reports
  a missing file, a key that does not match its certificate, an incomplete chain or a CRL
  that does not cover every CA level before anything starts.

The files themselves are read by lb.pem; the broker's standard-library contexts are built
in broker.tls_listener.

HAProxy 2.6 semantics (configuration.txt, section 5.1): `verify` defaults to none; a failed
verification aborts the handshake whatever `verify` says unless the error id is listed in
`ca-ignore-err` (depth > 0) or `crt-ignore-err` (depth 0); `crl-file` checks every level of
the chain (X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL); ssl-min-ver defaults to TLSv1.2.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from OpenSSL import SSL, crypto

from lb import tls_io
from lb.pem import (
    PemBundle,
    TLSFileError,
    common_name,
    is_self_signed,
    issued_by,
    load_certificates,
    load_crls,
    load_pem_bundle,
    read_file,
)
from lb.tls_codes import (
    TLS_VERSIONS,
    X509_V_ERROR_IDS,
    X509_V_ERROR_NAMES,
    Refusal,
    TlsVersion,
    refusal_for_reason_codes,
    refusal_for_verify_error,
)

if TYPE_CHECKING:
    from lb.config.model import Bind, Global

logger = logging.getLogger(__name__)

Verify = Literal["none", "optional", "required"]

#: HAProxy 2.6 default range (configuration.txt, ssl-min-ver).
DEFAULT_MIN_VERSION: TlsVersion = "TLSv1.2"
DEFAULT_MAX_VERSION: TlsVersion = "TLSv1.3"
#: EMQX's default intermediate certificate depth (seed 000); OpenSSL's own default is 100.
DEFAULT_VERIFY_DEPTH = 10
#: A server certificate that expires sooner than this draws a warning from `lb -c`.
EXPIRY_WARNING = dt.timedelta(days=30)

#: OpenSSL short names of certificate signature algorithms (PP2_SUBTYPE_SSL_SIG_ALG).
SIGNATURE_SHORT_NAMES = {
    "1.2.840.113549.1.1.11": "RSA-SHA256",
    "1.2.840.113549.1.1.12": "RSA-SHA384",
    "1.2.840.113549.1.1.13": "RSA-SHA512",
    "1.2.840.113549.1.1.5": "RSA-SHA1",
    "1.2.840.10045.4.3.2": "ecdsa-with-SHA256",
    "1.2.840.10045.4.3.3": "ecdsa-with-SHA384",
    "1.2.840.10045.4.3.4": "ecdsa-with-SHA512",
    "1.3.101.112": "ED25519",
}

#: A served certificate's key and signature algorithms, as HAProxy names them.
Algorithms = tuple[str | None, str | None]


def utc_text(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


# --------------------------------------------------------------------------------------------
# lb bind contexts (pyOpenSSL)


@dataclass(frozen=True, slots=True)
class BindTLS:
    """The TLS options of one bind line, independent of the config parser."""

    crt: tuple[Path, ...]
    ca_file: Path | None = None
    ca_verify_file: Path | None = None
    verify: Verify = "none"
    crl_file: Path | None = None
    ssl_min_ver: TlsVersion = DEFAULT_MIN_VERSION
    ssl_max_ver: TlsVersion = DEFAULT_MAX_VERSION
    ciphers: str | None = None
    ciphersuites: str | None = None
    alpn: tuple[str, ...] = ()
    verify_depth: int = DEFAULT_VERIFY_DEPTH
    ca_ignore_err: frozenset[int] | Literal["all"] = frozenset()
    crt_ignore_err: frozenset[int] | Literal["all"] = frozenset()
    session_id_context: bytes = b"lb"
    no_tls_tickets: bool = False
    # tune.ssl.cachesize (0 disables the session cache) and tune.ssl.lifetime (seconds)
    session_cache_size: int = 20000
    session_lifetime: int = 300
    tls_ticket_keys: Path | None = None


@dataclass(slots=True)
class VerifyFailure:
    """The first certificate verification error of a handshake, as the verify callback saw it."""

    code: int
    depth: int
    subject: x509.Name
    issuer: x509.Name
    not_before: dt.datetime
    not_after: dt.datetime
    serial_number: int
    ignored: bool = False

    @property
    def name(self) -> str:
        return X509_V_ERROR_NAMES.get(self.code, f"X509_V_ERR_{self.code}")

    @property
    def refusal(self) -> Refusal:
        return refusal_for_verify_error(self.code)


@dataclass(slots=True)
class VerifyState:
    """Per-connection handshake record (the app data of a pyOpenSSL Connection): the first
    verification failure, and the TLS 1.3 application traffic secrets the keylog callback
    gives, which lb.tls_io.take_over needs."""

    failure: VerifyFailure | None = None
    client_secret: bytes | None = None
    server_secret: bytes | None = None


#: The keylog lines lb keeps (RFC 8446 7.1's application traffic secrets).
TRAFFIC_SECRET_LABELS = (b"CLIENT_TRAFFIC_SECRET_0", b"SERVER_TRAFFIC_SECRET_0")


def _keep_traffic_secrets(connection: SSL.Connection, line: bytes) -> None:
    """SSL_CTX_set_keylog_callback: OpenSSL hands each secret of a handshake over as an NSS
    key log line ("LABEL <client random> <secret>", hex). The two application traffic
    secrets (the lines lb.tls_io.set_keylog passes on) go to the connection's VerifyState,
    for lb.tls_io.take_over. Nothing is written anywhere."""
    label, _, rest = line.partition(b" ")
    if label == b"CLIENT_TRAFFIC_SECRET_0":
        client = True
    elif label == b"SERVER_TRAFFIC_SECRET_0":
        client = False
    else:
        return
    state = connection.get_app_data()
    if not isinstance(state, VerifyState):
        return
    secret = bytes.fromhex(rest.rpartition(b" ")[2].decode("ascii"))
    if client:
        state.client_secret = secret
    else:
        state.server_secret = secret


class BindContext:
    """A pyOpenSSL server context plus what is needed to explain its refusals."""

    def __init__(self, options: BindTLS) -> None:
        self.options = options
        self.bundles = [load_pem_bundle(path) for path in options.crt]
        self.crls: list[x509.CertificateRevocationList] = (
            load_crls(options.crl_file) if options.crl_file else []
        )
        self.client_cas = load_certificates(options.ca_file) if options.ca_file else []
        self.verify_cas = (
            load_certificates(options.ca_verify_file) if options.ca_verify_file else []
        )
        self.ocsp_responses = load_ocsp_responses(self.bundles)
        # What each context (the default one, and those SNI switches to) serves.
        self.served: dict[SSL.Context, Algorithms] = {}
        self.context = self._build(self.served)

    def _build(
        self, served: dict[SSL.Context, Algorithms], bundle: PemBundle | None = None
    ) -> SSL.Context:
        """The context for the first `crt` (and the SNI selector when there are several),
        or, with `bundle`, the context SNI switches to for that certificate: the same in
        every other respect, since OpenSSL verifies the client with the context the
        connection has switched to (SSL_set_SSL_CTX). Each one built is noted in `served`."""
        options = self.options
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        served[context] = certificate_algorithms((bundle or self.bundles[0]).certificate)
        context.set_min_proto_version(TLS_VERSIONS[options.ssl_min_ver])
        context.set_max_proto_version(TLS_VERSIONS[options.ssl_max_ver])
        ssl_options = (
            SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION
        )
        if options.no_tls_tickets:
            ssl_options |= SSL.OP_NO_TICKET
        context.set_options(ssl_options)
        # Idle connections give their read/write buffers back (about 34 KiB each): devices
        # hold connections open for days and mostly send nothing.
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
        if options.ciphers:
            context.set_cipher_list(options.ciphers.encode())
        if options.ciphersuites:
            context.set_tls13_ciphersuites(options.ciphersuites.encode())
        _use_bundle(context, bundle or self.bundles[0])
        if bundle is None and len(self.bundles) > 1:
            self._install_sni(context, served)
        # Session resumption needs a session id context when client certificates are verified.
        context.set_session_id(options.session_id_context)
        _apply_session_settings(context, options)
        if options.alpn:
            offered = [p.encode() for p in options.alpn]

            def select_alpn(_connection: SSL.Connection, client: list[bytes]) -> bytes:
                for protocol in offered:
                    if protocol in client:
                        return protocol
                return SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]

            context.set_alpn_select_callback(select_alpn)
        if options.verify != "none" or options.ca_file:
            store = context.get_cert_store()
            assert store is not None
            for certificate in [*self.client_cas, *self.verify_cas]:
                store.add_cert(crypto.X509.from_cryptography(certificate))
            if self.crls:
                for crl in self.crls:
                    store.add_crl(crl)
                store.set_flags(
                    crypto.X509StoreFlags.CRL_CHECK | crypto.X509StoreFlags.CRL_CHECK_ALL
                )
            # Only ca-file names are announced as acceptable CAs, never ca-verify-file's.
            for certificate in self.client_cas:
                context.add_client_ca(certificate)
        mode = {
            "none": SSL.VERIFY_NONE,
            "optional": SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE,
            "required": SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
        }[options.verify]
        tls_io.set_verify(context, mode, self._verify_failed)
        context.set_verify_depth(options.verify_depth)
        if self.ocsp_responses:
            context.set_ocsp_server_callback(self._staple)
        # The TLS 1.3 traffic secrets, so that lb.tls_io.take_over can free each connection's
        # OpenSSL state once its handshake is done (lb.tls_records).
        tls_io.set_keylog(context, TRAFFIC_SECRET_LABELS, _keep_traffic_secrets)
        return context

    # -- OCSP stapling and hot reload (lb.reload, the runtime API) ----------------------------

    def _staple(self, connection: SSL.Connection, _data: object) -> bytes:
        """The `.ocsp` response of the certificate this connection serves (b"": none)."""
        certificate = connection.get_certificate()
        if certificate is None:
            return b""
        return self.ocsp_responses.get(certificate.get_serial_number(), b"")

    def watched_files(self) -> list[Path]:
        """Every file this context was built from, for the reload watcher."""
        options = self.options
        paths: list[Path] = []
        for path in options.crt:
            paths.extend([path, Path(f"{path}.key"), Path(f"{path}.ocsp")])
        paths.extend(p for p in (options.ca_file, options.ca_verify_file, options.crl_file) if p)
        return paths

    def reload_files(self) -> None:
        """Re-read every file and rebuild the context for new handshakes. All or nothing: on
        a file that fails to load (TLSFileError, SSL.Error) the old material stays in force."""
        options = self.options
        bundles = [load_pem_bundle(path) for path in options.crt]
        crls = load_crls(options.crl_file) if options.crl_file else []
        client_cas = load_certificates(options.ca_file) if options.ca_file else []
        verify_cas = load_certificates(options.ca_verify_file) if options.ca_verify_file else []
        self._swap(bundles, crls, client_cas, verify_cas)

    def replace_bundle(self, bundle: PemBundle) -> bool:
        """`commit ssl cert`: serve `bundle` instead of the loaded file of the same path."""
        if not any(b.path == bundle.path for b in self.bundles):
            return False
        bundles = [bundle if b.path == bundle.path else b for b in self.bundles]
        self._swap(bundles, self.crls, self.client_cas, self.verify_cas)
        return True

    def _swap(
        self,
        bundles: list[PemBundle],
        crls: list[x509.CertificateRevocationList],
        client_cas: list[x509.Certificate],
        verify_cas: list[x509.Certificate],
    ) -> None:
        saved = (self.bundles, self.crls, self.client_cas, self.verify_cas, self.ocsp_responses)
        try:
            self.bundles, self.crls, self.client_cas, self.verify_cas = (
                bundles,
                crls,
                client_cas,
                verify_cas,
            )
            self.ocsp_responses = load_ocsp_responses(bundles)
            served: dict[SSL.Context, Algorithms] = {}
            context = self._build(served)
        except BaseException:
            (
                self.bundles,
                self.crls,
                self.client_cas,
                self.verify_cas,
                self.ocsp_responses,
            ) = saved
            raise
        self.context, self.served = context, served

    def revoked(self, chain: Sequence[x509.Certificate]) -> x509.Certificate | None:
        """The first certificate of `chain` that a loaded CRL revokes, or None."""
        for certificate in chain:
            for crl in self.crls:
                if crl.issuer != certificate.issuer:
                    continue
                if crl.get_revoked_certificate_by_serial_number(certificate.serial_number):
                    return certificate
        return None

    def revoked_leaf_failure(self, certificate: x509.Certificate) -> VerifyFailure | None:
        """The refusal of a client certificate that the CRLs now loaded revoke, or None: for
        resumed sessions, which OpenSSL does not verify again."""
        if self.revoked([certificate]) is None:
            return None
        return VerifyFailure(
            code=X509_V_ERROR_IDS["X509_V_ERR_CERT_REVOKED"],
            depth=0,
            subject=certificate.subject,
            issuer=certificate.issuer,
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            serial_number=certificate.serial_number,
        )

    def served_algorithms(self, connection: SSL.Connection | tls_io.Session) -> Algorithms:
        """cert-key and cert-sig of the certificate this connection was served: the one of
        the context it ended with (the default, or the one its SNI chose); for a session that
        began before a reload or `commit ssl cert`, its own certificate's. A Session was told
        at its handshake (lb.tls_io.take_over)."""
        if isinstance(connection, tls_io.Session):
            return connection.algorithms
        known = self.served.get(connection.get_context())
        if known is not None:
            return known
        certificate = connection.get_certificate()
        if certificate is None:
            return None, None
        return certificate_algorithms(certificate.to_cryptography())

    def _install_sni(self, context: SSL.Context, served: dict[SSL.Context, Algorithms]) -> None:
        """Several `crt`: the first is the default; a client's SNI picks the one whose names
        match (exact, then wildcard), as HAProxy's crt lists do."""
        by_name: dict[str, SSL.Context] = {}
        for bundle in self.bundles:
            certificate_context = self._build(served, bundle)
            for name in _certificate_names(bundle.certificate):
                by_name.setdefault(name.lower(), certificate_context)

        def select_certificate(connection: SSL.Connection) -> None:
            server_name = connection.get_servername()
            if not server_name:
                return
            name = server_name.decode("ascii", "replace").lower()
            chosen = by_name.get(name) or by_name.get("*." + name.partition(".")[2])
            if chosen is not None:
                # SSL_set_SSL_CTX swaps the certificate and its chain; the verification
                # settings stay those of the connection, taken from the main context.
                connection.set_context(chosen)

        context.set_tlsext_servername_callback(select_certificate)

    def _verify_failed(
        self, connection: SSL.Connection, certificate: crypto.X509, code: int, depth: int
    ) -> bool:
        """A certificate of the chain did not verify: note the first failure, and go on only
        when crt-ignore-err (the leaf) or ca-ignore-err (a CA) ignores its error."""
        state = connection.get_app_data()
        cert = certificate.to_cryptography()
        ignore = self.options.crt_ignore_err if depth == 0 else self.options.ca_ignore_err
        ignored = ignore == "all" or code in ignore
        failure = VerifyFailure(
            code=code,
            depth=depth,
            subject=cert.subject,
            issuer=cert.issuer,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            serial_number=cert.serial_number,
            ignored=ignored,
        )
        if isinstance(state, VerifyState) and state.failure is None and not ignored:
            state.failure = failure
        return ignored

    def revocation_date(self, failure: VerifyFailure) -> dt.datetime | None:
        for crl in self.crls:
            if crl.issuer != failure.issuer:
                continue
            revoked = crl.get_revoked_certificate_by_serial_number(failure.serial_number)
            if revoked is not None:
                return revoked.revocation_date_utc
        return None

    def explain(self, failure: VerifyFailure) -> str:
        """The refusal in words, e.g. 'certificate expired on 2026-01-01 00:00:00 UTC'."""
        return explain_verify_failure(failure, self.revocation_date(failure))


def load_ocsp_responses(bundles: Sequence[PemBundle]) -> dict[int, bytes]:
    """HAProxy's `<crt>.ocsp` files (DER OCSPResponse beside the certificate), by the serial
    number of the certificate they answer for. A response that is unreadable, not
    successful, for another certificate or outside its validity is not stapled (logged)."""
    responses: dict[int, bytes] = {}
    now = dt.datetime.now(dt.UTC)
    for bundle in bundles:
        path = Path(f"{bundle.path}.ocsp")
        if not path.exists():
            continue
        data = read_file(path)
        problem = ocsp_response_problem(bundle, data, now)
        if problem is not None:
            logger.warning("%s: %s: not stapled", path, problem)
            continue
        responses[bundle.certificate.serial_number] = data
    return responses


#: HAProxy (OCSP_check_validity with OCSP_MAX_RESPONSE_TIME_SKEW) tolerates 5 minutes.
OCSP_TIME_SKEW = dt.timedelta(minutes=5)


def ocsp_response_problem(bundle: PemBundle, data: bytes, now: dt.datetime) -> str | None:
    """Why a `.ocsp` response cannot be stapled for `bundle`'s certificate, or None. Checks
    what HAProxy 2.6 checks when it loads one (ssl_sock_load_ocsp_response): a successful
    response whose certificate id (serial, issuer name and key hashes) is this certificate's,
    inside its thisUpdate..nextUpdate window."""
    try:
        response = ocsp.load_der_ocsp_response(data)
    except ValueError as error:
        return f"not a DER OCSP response ({error})"
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return f"OCSP response status {response.response_status.name}"
    certificate = bundle.certificate
    if response.serial_number != certificate.serial_number:
        return (
            f"OCSP response is for serial {response.serial_number:x}, the certificate's is "
            f"{certificate.serial_number:x}"
        )
    issuer = next((c for c in bundle.chain if issued_by(certificate, c)), None)
    if issuer is not None:
        try:
            expected = (
                ocsp.OCSPRequestBuilder()
                .add_certificate(certificate, issuer, response.hash_algorithm)
                .build()
            )
        except (UnsupportedAlgorithm, ValueError) as error:
            return f"OCSP response's certificate id cannot be checked ({error})"
        if (response.issuer_key_hash, response.issuer_name_hash) != (
            expected.issuer_key_hash,
            expected.issuer_name_hash,
        ):
            return (
                "OCSP response's certificate id names another issuer than "
                f"'{describe_name(issuer.subject)}'"
            )
    this_update = response.this_update_utc
    if this_update - OCSP_TIME_SKEW > now:
        return f"OCSP response is not yet valid (thisUpdate {utc_text(this_update)})"
    next_update = response.next_update_utc
    if next_update is not None and next_update + OCSP_TIME_SKEW < now:
        return f"OCSP response expired on {utc_text(next_update)} (nextUpdate)"
    return None


def _one_line(name: x509.Name) -> str:
    return "".join(f"/{attribute.rfc4514_attribute_name}={attribute.value!s}" for attribute in name)


def describe_certificate(bundle: PemBundle) -> str:
    """`show ssl cert <file>`, in HAProxy's words."""
    certificate = bundle.certificate
    lines = [
        f"Serial: {certificate.serial_number:X}",
        f"notBefore: {utc_text(certificate.not_valid_before_utc)}",
        f"notAfter: {utc_text(certificate.not_valid_after_utc)}",
    ]
    names = _certificate_names(certificate)
    if names:
        lines.append("Subject Alternative Name: " + ", ".join(f"DNS:{n}" for n in names))
    lines.append(f"SHA1 FingerPrint: {certificate.fingerprint(hashes.SHA1()).hex().upper()}")
    lines.append(f"Subject: {_one_line(certificate.subject)}")
    lines.append(f"Issuer: {_one_line(certificate.issuer)}")
    for chained in bundle.chain:
        lines.append(f"Chain Subject: {_one_line(chained.subject)}")
        lines.append(f"Chain Issuer: {_one_line(chained.issuer)}")
    return "\n".join(lines) + "\n"


def bind_tls(bind: Bind, global_: Global, frontend: str) -> BindTLS:
    """The TLS options of a bind line, with the global ssl-default-bind-* applied."""
    min_version: TlsVersion = bind.ssl_min_ver
    max_version: TlsVersion = bind.ssl_max_ver or DEFAULT_MAX_VERSION
    disabled = {
        "SSLv3": bind.no_sslv3,
        "TLSv1.0": bind.no_tlsv10,
        "TLSv1.1": bind.no_tlsv11,
        "TLSv1.2": bind.no_tlsv12,
        "TLSv1.3": bind.no_tlsv13,
    }
    order = list(TLS_VERSIONS)
    allowed = [
        v for v in order[order.index(min_version) : order.index(max_version) + 1] if not disabled[v]
    ]
    if allowed:
        min_version, max_version = allowed[0], allowed[-1]
    return BindTLS(
        crt=tuple(Path(p) for p in bind.crt),
        ca_file=Path(bind.ca_file) if bind.ca_file else None,
        ca_verify_file=Path(bind.ca_verify_file) if bind.ca_verify_file else None,
        verify=bind.verify,
        crl_file=Path(bind.crl_file) if bind.crl_file else None,
        ssl_min_ver=min_version,
        ssl_max_ver=max_version,
        ciphers=bind.ciphers or global_.ssl_default_bind_ciphers,
        ciphersuites=bind.ciphersuites or global_.ssl_default_bind_ciphersuites,
        alpn=bind.alpn,
        verify_depth=bind.verify_depth if bind.verify_depth is not None else DEFAULT_VERIFY_DEPTH,
        ca_ignore_err=bind.ca_ignore_err,
        crt_ignore_err=bind.crt_ignore_err,
        session_id_context=frontend.encode()[:32] or b"lb",
        no_tls_tickets=bind.no_tls_tickets or "no-tls-tickets" in global_.ssl_default_bind_options,
        session_cache_size=global_.tune_ssl_cachesize,
        session_lifetime=max(1, int(global_.tune_ssl_lifetime)),
        tls_ticket_keys=Path(bind.tls_ticket_keys) if bind.tls_ticket_keys else None,
    )


#: The TLS ticket key the worker processes share when no tls-ticket-keys file is given: the
#: master of lb.workers makes it before it forks, so a device's ticket from one worker
#: resumes on any other, and on the workers after a reload (HAProxy's threads share one
#: SSL_CTX to the same effect). None in a single process, where OpenSSL's own key serves.
_shared_ticket_key: bytes | None = None


def share_ticket_key(key: bytes) -> None:
    global _shared_ticket_key
    _shared_ticket_key = key


def _apply_session_settings(context: SSL.Context, options: BindTLS) -> None:
    """Session cache size and lifetime, and shared ticket keys (lb.tls_io says how)."""
    # SSL_CTX_set_timeout: both the cache's expiry and the ticket lifetime hint.
    context.set_timeout(options.session_lifetime)
    if options.session_cache_size == 0:
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    else:
        context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        if not tls_io.set_session_cache_size(context, options.session_cache_size):
            logger.warning(
                "tune.ssl.cachesize %d not applied: SSL_CTX_ctrl is not reachable in this "
                "OpenSSL build; the session cache keeps OpenSSL's default size",
                options.session_cache_size,
            )
    if options.tls_ticket_keys is not None and not options.no_tls_tickets:
        try:
            key = tls_io.load_ticket_keys(options.tls_ticket_keys)
        except tls_io.TicketKeyError as error:
            raise TLSFileError(options.tls_ticket_keys, error.reason) from None
        if not tls_io.set_ticket_key(context, key):
            raise TLSFileError(
                options.tls_ticket_keys,
                "tls-ticket-keys cannot be applied: SSL_CTX_ctrl is not reachable in this "
                "OpenSSL build",
            )
    elif (
        _shared_ticket_key is not None
        and not options.no_tls_tickets
        and not tls_io.set_ticket_key(context, _shared_ticket_key)
    ):
        logger.warning(
            "the workers' shared TLS ticket key cannot be applied (SSL_CTX_ctrl is not reachable "
            "in this OpenSSL build): a ticket resumes only on the worker that issued it"
        )


def _use_bundle(context: SSL.Context, bundle: PemBundle) -> None:
    context.use_certificate(bundle.certificate)
    context.use_privatekey(bundle.key)
    for certificate in bundle.chain:
        if not is_self_signed(certificate):  # HAProxy also leaves a root out of the sent chain
            context.add_extra_chain_cert(certificate)
    context.check_privatekey()


def _certificate_names(certificate: x509.Certificate) -> list[str]:
    names: list[str] = []
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names.extend(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    cn = common_name(certificate.subject)
    if cn and not names:
        names.append(cn)
    return names


def explain_verify_failure(failure: VerifyFailure, revoked_on: dt.datetime | None = None) -> str:
    what = (
        "client certificate" if failure.depth == 0 else f"CA certificate at depth {failure.depth}"
    )
    match failure.refusal:
        case Refusal.EXPIRED:
            words = f"{what} expired on {utc_text(failure.not_after)}"
        case Refusal.NOT_YET_VALID:
            words = f"{what} is not yet valid (valid from {utc_text(failure.not_before)})"
        case Refusal.REVOKED:
            when = f" on {utc_text(revoked_on)}" if revoked_on else ""
            words = f"{what} revoked{when}"
        case Refusal.SELF_SIGNED:
            words = f"{what} is self-signed and not trusted"
        case Refusal.SELF_SIGNED_IN_CHAIN:
            words = "the chain ends in a self-signed certificate that is not trusted"
        case Refusal.UNKNOWN_CA:
            words = f"{what} was issued by an unknown CA (not in ca-file or ca-verify-file)"
        case Refusal.CRL_MISSING:
            words = (
                f"no CRL in crl-file for the issuer of the {what} "
                "(crl-file needs a CRL for every CA level of the chain)"
            )
        case Refusal.CRL_EXPIRED:
            words = f"the CRL for the issuer of the {what} has expired"
        case Refusal.CRL_NOT_YET_VALID:
            words = f"the CRL for the issuer of the {what} is not yet valid"
        case Refusal.BAD_PURPOSE:
            words = f"{what} has a bad purpose: it is not for TLS client authentication"
        case Refusal.INVALID_CA:
            words = f"{what} is not a valid CA"
        case Refusal.PATH_LENGTH:
            words = f"{what}: path length constraint exceeded"
        case Refusal.CHAIN_TOO_LONG:
            words = "certificate chain too long (verify depth)"
        case Refusal.BAD_SIGNATURE:
            words = f"{what} has an invalid signature"
        case _:
            words = f"{what}: {tls_io.verify_error_string(failure.code)}"
    return f"{words} ({failure.name}, depth {failure.depth})"


def describe_name(name: x509.Name) -> str:
    return name.rfc4514_string()


def handshake_refusal(error: SSL.Error) -> tuple[Refusal, str]:
    """What a handshake that failed outside certificate verification was refused for, and
    the words for the log line: classified by OpenSSL's reason number (lb.tls_codes), told
    with OpenSSL's words where they help."""
    reasons: list[str] = []
    for entry in error.args[0] if error.args and isinstance(error.args[0], list) else []:
        if isinstance(entry, tuple) and len(entry) == 3:
            reasons.append(str(entry[2]))
    text = ", ".join(reasons) or str(error)
    numbers = error.reasons if isinstance(error, tls_io.TLSError) else ()
    refusal = refusal_for_reason_codes(numbers) or Refusal.OTHER
    match refusal:
        case Refusal.NO_CERTIFICATE:
            words = "no client certificate (verify required)"
        case Refusal.PLAIN_HTTP:
            words = "plain HTTP sent to a TLS port"
        case Refusal.NOT_TLS:
            words = f"not a TLS client hello: plain TCP sent to a TLS port? ({text})"
        case Refusal.PROTOCOL_VERSION:
            words = f"protocol version not accepted ({text})"
        case Refusal.NO_SHARED_CIPHER:
            words = "no shared cipher"
        case _:
            words = text
    return refusal, words


# --------------------------------------------------------------------------------------------
# `lb -c` checks of TLS files


@dataclass(frozen=True, slots=True)
class FileFinding:
    severity: Literal["error", "warning"]
    option: str
    message: str


def check_bind_files(options: BindTLS, now: dt.datetime | None = None) -> list[FileFinding]:
    """Load every file of a bind line and report the traps HAProxy users fall into."""
    now = now or dt.datetime.now(dt.UTC)
    findings: list[FileFinding] = []
    bundles: list[PemBundle] = []
    for path in options.crt:
        try:
            bundles.append(load_pem_bundle(path))
        except TLSFileError as error:
            findings.append(FileFinding("error", "crt", str(error)))
    loaded: dict[str, list[x509.Certificate]] = {}
    for option, ca_path in (
        ("ca-file", options.ca_file),
        ("ca-verify-file", options.ca_verify_file),
    ):
        if ca_path is None:
            continue
        try:
            loaded[option] = load_certificates(ca_path)
        except TLSFileError as error:
            findings.append(FileFinding("error", option, str(error)))
    crls: list[x509.CertificateRevocationList] = []
    if options.crl_file is not None:
        try:
            crls = load_crls(options.crl_file)
        except TLSFileError as error:
            findings.append(FileFinding("error", "crl-file", str(error)))
    if options.tls_ticket_keys is not None:
        try:
            tls_io.load_ticket_keys(options.tls_ticket_keys)
        except tls_io.TicketKeyError as error:
            findings.append(FileFinding("error", "tls-ticket-keys", str(error)))
    client_cas = loaded.get("ca-file", [])
    trusted = client_cas + loaded.get("ca-verify-file", [])
    for bundle in bundles:
        findings.extend(_check_server_chain(bundle, trusted, now))
        ocsp_path = Path(f"{bundle.path}.ocsp")
        if ocsp_path.exists():
            # HAProxy -c: "Loading: OCSP single response: no longer valid.. Content will be
            # ignored." lb says which check failed.
            problem = ocsp_response_problem(bundle, read_file(ocsp_path), now)
            if problem is not None:
                findings.append(
                    FileFinding("warning", "crt", f"{ocsp_path}: {problem}: it will not be stapled")
                )
    for ca in client_cas:
        chain = _chain_to_root(ca, trusted)
        if chain is None:
            findings.append(
                FileFinding(
                    "warning",
                    "ca-file",
                    f"{options.ca_file}: CA '{describe_name(ca.subject)}' cannot be chained to a "
                    f"self-signed root in ca-file or ca-verify-file (issuer "
                    f"'{describe_name(ca.issuer)}' missing): every client it signed would be "
                    "refused with 'unable to get issuer certificate'",
                )
            )
        if ca.not_valid_after_utc < now:
            findings.append(
                FileFinding(
                    "warning",
                    "ca-file",
                    f"{options.ca_file}: CA '{describe_name(ca.subject)}' expired on "
                    f"{utc_text(ca.not_valid_after_utc)}",
                )
            )
    if crls and trusted:
        crl_issuers = {crl.issuer for crl in crls}
        levels = {c.subject: c for c in trusted}
        for subject in levels:
            if subject not in crl_issuers:
                findings.append(
                    FileFinding(
                        "warning",
                        "crl-file",
                        f"{options.crl_file}: no CRL for CA '{describe_name(subject)}': with "
                        "crl-file every CA level of the chain needs a CRL, so every client whose "
                        "chain includes this CA would be refused (X509_V_ERR_UNABLE_TO_GET_CRL)",
                    )
                )
        for crl in crls:
            if crl.next_update_utc is not None and crl.next_update_utc < now:
                findings.append(
                    FileFinding(
                        "warning",
                        "crl-file",
                        f"{options.crl_file}: CRL of '{describe_name(crl.issuer)}' expired on "
                        f"{utc_text(crl.next_update_utc)} (nextUpdate): every client would be "
                        "refused",
                    )
                )
    return findings


def _chain_to_root(
    certificate: x509.Certificate, pool: Sequence[x509.Certificate]
) -> list[x509.Certificate] | None:
    chain = [certificate]
    current = certificate
    for _ in range(16):
        if is_self_signed(current):
            return chain
        issuer = next((c for c in pool if c is not current and issued_by(current, c)), None)
        if issuer is None:
            return None
        chain.append(issuer)
        current = issuer
    return None


def _check_server_chain(
    bundle: PemBundle, trusted: Sequence[x509.Certificate], now: dt.datetime
) -> list[FileFinding]:
    findings: list[FileFinding] = []
    leaf = bundle.certificate
    subject = describe_name(leaf.subject)
    if leaf.not_valid_after_utc < now:
        findings.append(
            FileFinding(
                "error",
                "crt",
                f"{bundle.path}: certificate '{subject}' expired on "
                f"{utc_text(leaf.not_valid_after_utc)}",
            )
        )
    elif leaf.not_valid_after_utc - now < EXPIRY_WARNING:
        findings.append(
            FileFinding(
                "warning",
                "crt",
                f"{bundle.path}: certificate '{subject}' expires soon, on "
                f"{utc_text(leaf.not_valid_after_utc)}",
            )
        )
    # Walk up the chain the file provides; it is complete when it reaches a root, or a
    # certificate issued by a root. An intermediate that is known (from the CA files) but
    # missing from the crt file is the classic incomplete chain.
    top = leaf
    for certificate in bundle.chain:
        if issued_by(top, certificate):
            top = certificate
    if is_self_signed(top):
        return findings
    issuer = next((c for c in trusted if issued_by(top, c)), None)
    if issuer is not None and not is_self_signed(issuer):
        findings.append(
            FileFinding(
                "warning",
                "crt",
                f"{bundle.path}: chain is incomplete: '{describe_name(top.subject)}' is issued by "
                f"the intermediate CA '{describe_name(issuer.subject)}', which is not in the "
                "file; clients that only hold the root cannot verify this server",
            )
        )
    return findings


def certificate_algorithms(certificate: x509.Certificate) -> Algorithms:
    """HAProxy's cert-key (e.g. EC256, RSA2048) and cert-sig (e.g. ecdsa-with-SHA256) of a
    certificate lb serves (PP2_SUBTYPE_SSL_KEY_ALG, PP2_SUBTYPE_SSL_SIG_ALG)."""
    key = certificate.public_key()
    key_alg: str | None
    if isinstance(key, rsa.RSAPublicKey):
        key_alg = f"RSA{key.key_size}"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        key_alg = f"EC{key.curve.key_size}"
    else:
        key_alg = None
    sig_alg = SIGNATURE_SHORT_NAMES.get(certificate.signature_algorithm_oid.dotted_string)
    return key_alg, sig_alg
