"""The broker's own TLS: handshakes that explain refusals, and certificate/CRL reload.

Seed 000 ("enable SSL/TLS", the first deployment mode: TLS on the broker itself) gives the
``[listeners.ssl.NAME] ssl_options``: cacertfile, certfile (leaf then intermediates),
keyfile with password, verify = verify_peer | verify_none, fail_if_no_peer_cert, versions
(default tlsv1.3 + tlsv1.2), depth (default 10) and a CRL check; and it says that the broker
rereads its certificates every 120 s so they rotate without a restart. Seed 002 uses the same
options for the cluster link. The contexts themselves are built by :mod:`lb.tls`, the one
TLS module of the project (STYLE.md rule 12); this module owns what happens around them:

- :class:`ReloadingContext` keeps the current :class:`ssl.SSLContext` of one ssl_options
  table and rebuilds it when a file's mtime or size changes (checked every
  ``reload_interval`` seconds). New connections get the new context, connections already
  open keep theirs. A file that fails to load keeps the old context and logs why.
- :class:`TLSAcceptProtocol` accepts the TCP connection, runs the handshake with
  ``loop.start_tls`` (so a refused handshake is ours to log: one line with the address and
  the reason, e.g. "certificate has expired"), then hands the TLS transport to the real
  protocol (:class:`broker.listener.MQTTServerProtocol` or the cluster link).
- :func:`key_permission_problems` is seed 002's rule that private keys are readable only by
  their owner (mode 600), checked before a node starts.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import cast

from cryptography import x509

from broker.config import BrokerConfig, SSLOptions
from lb import tls

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "ReloadingContext",
    "TLSAcceptProtocol",
    "handshake_failure_reason",
    "key_permission_problems",
    "lb_ssl_options",
    "tls_protocol_factory",
]

logger = logging.getLogger(__name__)

#: Seconds a client has to finish the TLS handshake (EMQX's handshake_timeout is 15 s).
HANDSHAKE_TIMEOUT = 15.0
#: Longest chain walked for chain_subjects; EMQX's depth default is 10 (seed 000).
MAX_CHAIN_LENGTH = 16

#: OpenSSL reason codes of handshake failures, in the words an operator reads.
_REASON_WORDS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no client certificate (fail_if_no_peer_cert = true)",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no client certificate (fail_if_no_peer_cert = true)",
    "UNSUPPORTED_PROTOCOL": "TLS version not accepted (ssl_options.versions)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "TLS version not accepted (ssl_options.versions)",
    "NO_SHARED_CIPHER": "no shared cipher",
    "HTTP_REQUEST": "plain HTTP sent to a TLS port",
    "WRONG_VERSION_NUMBER": "not a TLS client hello (plain MQTT sent to a TLS port?)",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust our certificate (unknown CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer rejected our certificate (bad certificate)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer says our certificate has expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the peer says our certificate is revoked",
}


def lb_ssl_options(options: SSLOptions) -> tls.SSLOptions:
    """The broker config's ssl_options as :mod:`lb.tls` takes them."""
    return tls.SSLOptions(
        certfile=options.certfile,
        keyfile=options.keyfile,
        cacertfile=options.cacertfile,
        password=options.password,
        verify=options.verify,
        fail_if_no_peer_cert=options.fail_if_no_peer_cert,
        versions=options.versions,
        depth=options.depth,
        crl_file=options.crl_file,
    )


def key_permission_problems(config: BrokerConfig) -> list[str]:
    """One message per private key that group or others can read (seed 002: mode 600)."""
    keys: list[Path] = []
    if config.cluster is not None and config.cluster.ssl_options is not None:
        keys.append(config.cluster.ssl_options.keyfile)
    for listener in config.listeners:
        if listener.ssl_options is not None:
            keys.append(listener.ssl_options.keyfile)
    problems: list[str] = []
    for key in dict.fromkeys(keys):
        try:
            problem = tls.check_key_permissions(key)
        except FileNotFoundError:
            problem = f"private key {key}: no such file"
        except OSError as error:
            problem = f"private key {key}: {error.strerror}"
        if problem is not None:
            problems.append(problem)
    return problems


def handshake_failure_reason(error: BaseException) -> str:
    """Why a TLS handshake failed, in words (the verify message when a certificate failed)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        message = error.verify_message or "certificate verify failed"
        return f"{message} (X509_V_ERR {error.verify_code})"
    if isinstance(error, ssl.SSLError):
        reason = getattr(error, "reason", None)
        if isinstance(reason, str) and reason in _REASON_WORDS:
            return _REASON_WORDS[reason]
        if isinstance(reason, str) and reason:
            return reason.lower().replace("_", " ")
        return str(error)
    if isinstance(error, TimeoutError):
        return f"handshake not finished within {HANDSHAKE_TIMEOUT:g}s"
    if isinstance(error, ConnectionError | EOFError):
        return "connection closed during the handshake"
    return f"{type(error).__name__}: {error}"


def _address_text(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ReloadingContext:
    """The current SSLContext of one ssl_options table, rebuilt when its files change."""

    def __init__(
        self,
        label: str,
        options: SSLOptions,
        build: Callable[[SSLOptions], ssl.SSLContext],
    ) -> None:
        self.label = label
        self.options = options
        self.build = build
        self.reloads = 0
        self.reload_failures = 0
        self.last_error: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Raises TLSFileError / ssl.SSLError at start: a node does not start on bad files.
        self.context = build(options)
        self.signature = tls.file_signature(self.paths())
        self.trusted = self._load_trusted()

    def paths(self) -> list[Path | None]:
        options = self.options
        return [options.certfile, options.keyfile, options.cacertfile, options.crl_file]

    def _load_trusted(self) -> list[x509.Certificate]:
        if self.options.cacertfile is None:
            return []
        try:
            return tls.load_certificates(self.options.cacertfile)
        except tls.TLSFileError:
            return []

    def check(self) -> bool:
        """Rebuild the context if a file changed; True when a new context is in use."""
        signature = tls.file_signature(self.paths())
        if signature == self.signature:
            return False
        try:
            context = self.build(self.options)
        except (tls.TLSFileError, ssl.SSLError, OSError, ValueError) as error:
            self.reload_failures += 1
            message = str(error)
            if message != self.last_error:
                logger.warning(
                    "%s: certificate reload failed, keeping the previous certificates: %s",
                    self.label,
                    message,
                )
            self.last_error = message
            # Not remembered as loaded: the next check tries again (a half-written file).
            return False
        self.context = context
        self.signature = signature
        self.trusted = self._load_trusted()
        self.reloads += 1
        self.last_error = None
        logger.info(
            "%s: reloaded certificates (%s)",
            self.label,
            ", ".join(str(path) for path in self.paths() if path is not None),
        )
        return True

    def start(self) -> None:
        """Check every ``reload_interval`` seconds (EMQX: 120 s) on the running loop."""
        self.stop()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.options.reload_interval, self._tick)

    def _tick(self) -> None:
        try:
            self.check()
        except Exception:
            logger.exception("%s: certificate reload check failed", self.label)
        self._timer = asyncio.get_running_loop().call_later(
            self.options.reload_interval, self._tick
        )

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def chain_subjects(self, ssl_object: ssl.SSLObject | ssl.SSLSocket) -> tuple[bytes, ...]:
        """DER subjects of the verified chain, leaf first (PeerIdentity.chain_subjects).

        Python 3.11's ssl module only exposes the leaf, so the issuers are found in the
        trusted CA file the handshake verified against (by name and signature).
        """
        leaf_der = ssl_object.getpeercert(binary_form=True)
        if not leaf_der:
            return ()
        try:
            current = x509.load_der_x509_certificate(leaf_der)
        except ValueError:
            return ()
        subjects = [current.subject.public_bytes()]
        for _ in range(MAX_CHAIN_LENGTH):
            if current.issuer == current.subject:
                break
            issuer = next((ca for ca in self.trusted if _issued_by(current, ca)), None)
            if issuer is None:
                break
            subjects.append(issuer.subject.public_bytes())
            current = issuer
        return tuple(subjects)

    def status(self) -> dict[str, object]:
        return {
            "reloads": self.reloads,
            "reload_failures": self.reload_failures,
            "last_error": self.last_error,
            "reload_interval": self.options.reload_interval,
        }


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    if certificate.issuer != issuer.subject:
        return False
    try:
        certificate.verify_directly_issued_by(issuer)
    except Exception:  # InvalidSignature, unsupported key types
        return False
    return True


class TLSAcceptProtocol(asyncio.Protocol):
    """A plain TCP connection until its TLS handshake is done, then the real protocol's.

    ``context`` is called per connection (the reloaded context serves new connections).
    ``on_refused(address, reason)`` is called once when the handshake fails; the default
    logs one line naming ``label``, the address and the reason.
    """

    __slots__ = (
        "_early_data",
        "_early_eof",
        "_handed_off",
        "_lost",
        "_task",
        "address",
        "context",
        "factory",
        "handshake_timeout",
        "label",
        "on_refused",
    )

    def __init__(
        self,
        context: Callable[[], ssl.SSLContext],
        factory: Callable[[], asyncio.Protocol],
        label: str,
        on_refused: Callable[[tuple[str, int], str], None] | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.context = context
        self.factory = factory
        self.label = label
        self.on_refused = on_refused
        self.handshake_timeout = handshake_timeout
        self.address: tuple[str, int] = ("?", 0)
        self._task: asyncio.Task[None] | None = None
        self._early_data: list[bytes] = []
        self._early_eof = False
        self._handed_off = False
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        if peer:
            self.address = (str(peer[0]), int(peer[1]))
        # The ClientHello must reach the TLS layer, not this protocol: stop reading until
        # start_tls has taken over the transport (it resumes reading itself).
        cast(asyncio.Transport, transport).pause_reading()
        self._task = asyncio.get_running_loop().create_task(
            self._handshake(cast(asyncio.Transport, transport))
        )

    async def _handshake(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            tls_transport = await loop.start_tls(
                transport,
                self,
                self.context(),
                server_side=True,
                ssl_handshake_timeout=self.handshake_timeout,
            )
        except asyncio.CancelledError:
            transport.abort()
            raise
        except Exception as error:
            transport.abort()
            self._refused(handshake_failure_reason(error))
            return
        if tls_transport is None or self._lost:
            return
        inner = self.factory()
        self._handed_off = True
        tls_transport.set_protocol(inner)
        inner.connection_made(tls_transport)
        # Application bytes that arrived between the handshake and the hand-off.
        for data in self._early_data:
            inner.data_received(data)
        self._early_data.clear()
        if self._early_eof and not inner.eof_received():
            tls_transport.close()

    def _refused(self, reason: str) -> None:
        if self.on_refused is not None:
            self.on_refused(self.address, reason)
        else:
            logger.warning(
                "TLS handshake from %s refused on %s: %s",
                _address_text(self.address),
                self.label,
                reason,
            )

    def data_received(self, data: bytes) -> None:
        self._early_data.append(data)

    def eof_received(self) -> bool | None:
        self._early_eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True

    def cancel(self) -> None:
        """Server stop: abandon a handshake in progress."""
        if self._task is not None and not self._task.done():
            self._task.cancel()


def tls_protocol_factory(
    contexts: ReloadingContext,
    factory: Callable[[], asyncio.Protocol],
    label: str,
    on_refused: Callable[[tuple[str, int], str], None] | None = None,
) -> Callable[[], TLSAcceptProtocol]:
    """What ``loop.create_server`` takes for a TLS port served by ``factory``'s protocols."""

    def current() -> ssl.SSLContext:
        return contexts.context

    def make() -> TLSAcceptProtocol:
        return TLSAcceptProtocol(current, factory, label, on_refused)

    return make
