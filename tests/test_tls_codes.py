"""lb.tls_codes: a refused handshake is classified once, by OpenSSL's numbers, and the
Prometheus label and the log words follow from that class. Real handshakes: lb's engine
(lb.tls_io over a BindContext) against stdlib clients over memory BIOs, and raw bytes.
The TLS version names of the config parser and the numbers of the contexts are one table."""

from __future__ import annotations

import _ssl
import ssl
import warnings

import pytest
from OpenSSL import SSL

from broker.tls_listener import handshake_failure_reason
from lb import tls_io
from lb.config import load_config_text
from lb.tls import BindContext, BindTLS, bind_tls, handshake_refusal
from lb.tls_codes import (
    SSL_REASONS,
    TLS_VERSIONS,
    X509_V_ERROR_IDS,
    X509_V_ERROR_NAMES,
    X509_V_ERRORS,
    Refusal,
    refusal_for_reason,
    refusal_for_reason_codes,
    refusal_for_verify_error,
)
from tests.pki import TestPKI

pytestmark = pytest.mark.timeout(60)

#: The `reason` label values of haproxy_frontend_ssl_handshake_failures_total: dashboards
#: and alerts use them, so the set only grows on purpose.
LABELS = {
    "not_yet_valid", "expired", "revoked", "unknown_ca", "self_signed", "crl_missing",
    "crl_invalid", "crl_expired", "bad_purpose", "chain_too_long", "invalid_ca", "path_length",
    "bad_signature", "verify_other", "no_certificate", "timeout", "client_closed",
    "protocol_version", "no_shared_cipher", "not_tls", "other",
}  # fmt: skip


def test_labels_are_the_known_set() -> None:
    assert {refusal.label for refusal in Refusal} == LABELS


def test_reason_numbers_are_openssls() -> None:
    """The numbers lb reads from OpenSSL's queue name the reasons Python's ssl names; one
    (MISSING_SUPPORTED_VERSIONS_EXTENSION, OpenSSL 3.2) is newer than Python's table."""
    known = {name: codes for name, codes in _ssl.err_names_to_codes.items() if codes[0] == 20}
    checked = [name for name in SSL_REASONS if name in known]
    assert len(checked) >= len(SSL_REASONS) - 1
    for name in checked:
        assert known[name] == (20, SSL_REASONS[name][0]), name
        assert refusal_for_reason(name) is SSL_REASONS[name][1]
        assert refusal_for_reason_codes([(20, SSL_REASONS[name][0])]) is SSL_REASONS[name][1]
    assert refusal_for_reason("SOMETHING_ELSE") is None
    assert refusal_for_reason_codes([(6, 156), (20, 1)]) is None  # another library's 156


def test_first_row_wins_when_several_are_queued() -> None:
    codes = [(20, SSL_REASONS["NO_SHARED_CIPHER"][0]), (20, SSL_REASONS["HTTP_REQUEST"][0])]
    assert refusal_for_reason_codes(codes) is Refusal.PLAIN_HTTP


def test_one_table_for_x509_ids() -> None:
    assert X509_V_ERROR_NAMES[10] == "X509_V_ERR_CERT_HAS_EXPIRED"
    assert X509_V_ERROR_IDS["X509_V_ERR_CERT_REVOKED"] == 23
    assert refusal_for_verify_error(23) is Refusal.REVOKED
    assert refusal_for_verify_error(19).label == "self_signed"
    assert refusal_for_verify_error(4) is refusal_for_verify_error(7) is Refusal.BAD_SIGNATURE
    assert refusal_for_verify_error(10_000) is Refusal.VERIFY_OTHER
    assert len(set(X509_V_ERROR_NAMES.values())) == len(X509_V_ERRORS)


def test_one_table_of_tls_versions_for_the_parser_and_the_contexts() -> None:
    assert TLS_VERSIONS == {
        "SSLv3": SSL.SSL3_VERSION,
        "TLSv1.0": SSL.TLS1_VERSION,
        "TLSv1.1": SSL.TLS1_1_VERSION,
        "TLSv1.2": SSL.TLS1_2_VERSION,
        "TLSv1.3": SSL.TLS1_3_VERSION,
    }

    def diagnostics(options: str) -> list[str]:
        text = (
            "defaults\n    mode tcp\nfrontend f\n"
            f"    bind 127.0.0.1:1 ssl crt /lb.pem {options}\n    default_backend b\n"
            "backend b\n    server s 127.0.0.1:2\n"
        )
        return [d.text for d in load_config_text(text, "/lb.cfg").diagnostics]

    names = ", ".join(f"'{name}'" for name in TLS_VERSIONS)
    assert f"expects one of {names}, got 'TLSv1.4'" in diagnostics("ssl-min-ver TLSv1.4")[0]
    assert (
        "is below 'ssl-min-ver TLSv1.3'"
        in diagnostics("ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.2")[0]
    )
    # no-tlsv13 leaves TLS 1.2 as the highest version the context allows
    result = load_config_text(
        "defaults\n    mode tcp\nfrontend f\n    bind 127.0.0.1:1 ssl crt /lb.pem no-tlsv13\n"
        "    default_backend b\nbackend b\n    server s 127.0.0.1:2\n",
        "/lb.cfg",
    )
    config = result.config_or_raise()
    options = bind_tls(config.frontends[0].binds[0], config.global_, "f")
    assert (options.ssl_min_ver, options.ssl_max_ver) == ("TLSv1.2", "TLSv1.2")


# -- real refusals ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bind(pki: TestPKI) -> BindContext:
    return BindContext(
        BindTLS(
            crt=(pki.server_allinone,),
            ca_file=pki.intermediate,
            ca_verify_file=pki.root,
            verify="required",
        )
    )


def refused(bind: BindContext, first: bytes | None, client: ssl.SSLContext | None) -> SSL.Error:
    """Drive lb's engine (tls_io) with raw bytes or a stdlib client until it refuses."""
    server = SSL.Connection(bind.context, None)
    server.set_accept_state()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    peer = client.wrap_bio(incoming, outgoing, server_hostname="localhost") if client else None
    for _ in range(10):
        if peer is not None:
            try:
                peer.do_handshake()
            except ssl.SSLWantReadError:
                pass
            first = outgoing.read()
        if first:
            tls_io.feed(server, first)
        try:
            tls_io.handshake(server)
        except SSL.Error as error:
            return error
        incoming.write(tls_io.take_output(server))
    raise AssertionError("the handshake was not refused")


def client(version: ssl.TLSVersion | None = None, ciphers: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if ciphers is not None:
        context.set_ciphers(ciphers)
    if version is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 on purpose
            context.minimum_version = context.maximum_version = version
    return context


@pytest.mark.parametrize(
    ("first", "make_client", "refusal", "label", "words"),
    [
        (b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n", None, Refusal.PLAIN_HTTP, "not_tls", "plain HTTP"),
        (
            bytes.fromhex("100d00044d5154540402003c000174"),  # an MQTT CONNECT
            None,
            Refusal.NOT_TLS,
            "not_tls",
            "not a TLS client hello",
        ),
        (None, client, Refusal.NO_CERTIFICATE, "no_certificate", "no client cert"),
        (
            None,
            lambda: client(ssl.TLSVersion.TLSv1_2),
            Refusal.NO_CERTIFICATE,
            "no_certificate",
            "no client certificate (verify required)",
        ),
        (
            None,
            lambda: client(ssl.TLSVersion.TLSv1_1, "DEFAULT:@SECLEVEL=0"),
            Refusal.PROTOCOL_VERSION,
            "protocol_version",
            "protocol version not accepted (unsupported protocol)",
        ),
        (
            None,
            lambda: client(ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-GCM-SHA256"),  # EC server
            Refusal.NO_SHARED_CIPHER,
            "no_shared_cipher",
            "no shared cipher",
        ),
    ],
)
def test_lb_classifies_real_refusals(
    bind: BindContext,
    first: bytes | None,
    make_client: object,
    refusal: Refusal,
    label: str,
    words: str,
) -> None:
    context = make_client() if callable(make_client) else None
    error = refused(bind, first, context)
    assert isinstance(error, tls_io.TLSError)
    classified, text = handshake_refusal(error)
    assert classified is refusal
    assert classified.label == label
    assert text.startswith(words)


def test_the_broker_words_come_from_the_same_classes() -> None:
    def error(reason: str) -> ssl.SSLError:
        failure = ssl.SSLError(1, f"[SSL: {reason}] ...")
        failure.reason = reason
        return failure

    assert handshake_failure_reason(error("HTTP_REQUEST")) == "plain HTTP sent to a TLS port"
    # OpenSSL words differ by version ("tls alert bad certificate" since 3.2); names do not.
    assert handshake_failure_reason(error("SSLV3_ALERT_BAD_CERTIFICATE")) == (
        "the peer rejected our certificate (bad certificate)"
    )
    assert handshake_failure_reason(error("VERSION_TOO_LOW")) == (
        "TLS version not accepted (ssl_options.versions)"
    )
    assert handshake_failure_reason(error("RECORD_LAYER_FAILURE")) == "record layer failure"
