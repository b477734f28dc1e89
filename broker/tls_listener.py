"""The broker's own TLS: handshakes that explain refusals, and certificate/CRL reload.

Seed 000 ("enable SSL/TLS", the first deployment mode: TLS on the broker itself) gives the
``[listeners.ssl.NAME] ssl_options``: cacertfile, certfile (leaf then intermediates),
keyfile with password, verify = verify_peer | verify_none, fail_if_no_peer_cert, versions
(default tlsv1.3 + tlsv1.2), depth (default 10) and a CRL check; and it says that the broker
rereads its certificates every 120 s so they rotate without a restart. Seed 002 uses the same
options for the cluster link. This module builds the broker's standard-library contexts
(asyncio's TLS on uvloop is the fast path; the files are read by :mod:`lb.pem`, which lb
shares) and owns what happens around them:

- :func:`build_server_ssl_context` / :func:`build_client_ssl_context` turn one ssl_options
  table into a server context (listeners, the cluster's accepting side) or a client context
  (the cluster's dialling side).
- :class:`ReloadingContext` keeps the current :class:`ssl.SSLContext` of one ssl_options
  table and rebuilds it when a file's mtime or size changes (checked every
  ``reload_interval`` seconds). New connections get the new context, connections already
  open keep theirs. A file that fails to load keeps the old context and logs why.
- :class:`TLSServer` accepts TCP connections and runs each handshake with
  ``loop.connect_accepted_socket(ssl=...)``, so a refused handshake is ours to log (one line
  with the address and the reason, e.g. "certificate has expired"); the real protocol
  (:class:`broker.listener.MQTTServerProtocol` or the cluster link) starts once it is done.
- :func:`key_permission_problems` is seed 002's rule that private keys are readable only by
  their owner (mode 600), checked before a node starts.
"""

from __future__ import annotations

import _ssl
import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from broker.accept import (
    BACKLOG,
    Accepted,
    AcceptLoop,
    PendingConnections,
    open_listening_socket,
)
from broker.config import BrokerConfig, SSLOptions
from lb import pem
from lb.tls_codes import Refusal, refusal_for_reason

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "ReloadingContext",
    "TLSServer",
    "build_client_ssl_context",
    "build_server_ssl_context",
    "handshake_failure_reason",
    "key_permission_problems",
    "serve_tls",
]

logger = logging.getLogger(__name__)

#: Seconds a client has to finish the TLS handshake (EMQX's handshake_timeout is 15 s).
HANDSHAKE_TIMEOUT = 15.0

#: Refused handshakes (classified by lb.tls_codes from OpenSSL's reason) in the words an
#: operator of the broker reads.
_REASON_WORDS = {
    Refusal.NO_CERTIFICATE: "no client certificate (fail_if_no_peer_cert = true)",
    Refusal.PROTOCOL_VERSION: "TLS version not accepted (ssl_options.versions)",
    Refusal.NO_SHARED_CIPHER: "no shared cipher",
    Refusal.PLAIN_HTTP: "plain HTTP sent to a TLS port",
    Refusal.NOT_TLS: "not a TLS client hello (plain MQTT sent to a TLS port?)",
    Refusal.PEER_UNKNOWN_CA: "the peer does not trust our certificate (unknown CA)",
    Refusal.PEER_BAD_CERTIFICATE: "the peer rejected our certificate (bad certificate)",
    Refusal.PEER_CERTIFICATE_EXPIRED: "the peer says our certificate has expired",
    Refusal.PEER_CERTIFICATE_REVOKED: "the peer says our certificate is revoked",
}


#: ssl_options.versions as the standard library names them.
_STDLIB_VERSIONS = {
    "tlsv1.2": ssl.TLSVersion.TLSv1_2,
    "tlsv1.3": ssl.TLSVersion.TLSv1_3,
    "tlsv1.1": ssl.TLSVersion.TLSv1_1,
    "tlsv1": ssl.TLSVersion.TLSv1,
}


def _apply_common(context: ssl.SSLContext, options: SSLOptions) -> None:
    versions = sorted(_STDLIB_VERSIONS[v] for v in options.versions)
    context.minimum_version = versions[0]
    context.maximum_version = versions[-1]
    password = options.password.encode() if options.password else None
    # Validate first so that a bad file is reported with its name, not as an ssl.SSLError.
    pem.load_pem_bundle(options.certfile, options.keyfile, password)
    context.load_cert_chain(str(options.certfile), str(options.keyfile), password)
    if options.cacertfile:
        pem.load_certificates(options.cacertfile)
        context.load_verify_locations(str(options.cacertfile))
    if options.crl_file:
        pem.load_crls(options.crl_file)
        context.load_verify_locations(str(options.crl_file))
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN


def build_server_ssl_context(options: SSLOptions) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_common(context, options)
    if options.verify == "verify_peer":
        context.verify_mode = (
            ssl.CERT_REQUIRED if options.fail_if_no_peer_cert else ssl.CERT_OPTIONAL
        )
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def build_client_ssl_context(options: SSLOptions, check_hostname: bool = True) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = check_hostname and options.verify == "verify_peer"
    _apply_common(context, options)
    context.verify_mode = ssl.CERT_REQUIRED if options.verify == "verify_peer" else ssl.CERT_NONE
    return context


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
            problem = pem.check_key_permissions(key)
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
        refusal = refusal_for_reason(reason) if isinstance(reason, str) else None
        if refusal is not None and refusal in _REASON_WORDS:
            return _REASON_WORDS[refusal]
        if isinstance(reason, str) and reason:
            return reason.lower().replace("_", " ")
        return str(error)
    if isinstance(error, TimeoutError):
        return f"handshake not finished within {HANDSHAKE_TIMEOUT:g}s"
    if isinstance(error, ConnectionError | EOFError):
        return "connection closed during the handshake"
    return f"{type(error).__name__}: {error}"


def verified_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    """The chain OpenSSL verified for the peer, leaf first and the trust anchor last, in DER
    (empty without a verified peer certificate).

    ssl.SSLObject.get_verified_chain is public from Python 3.13; 3.10 to 3.12 have the same
    method on the private _ssl object underneath (returning _ssl.Certificate objects), which
    is what ssl_options.depth is enforced with on 3.11 (the ssl module has no verify depth).
    """
    getter = getattr(ssl_object, "get_verified_chain", None)
    if getter is None:
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_verified_chain", None)
    if getter is None:
        # Never parse-and-ignore ssl_options.depth: without the chain, refuse the client.
        raise RuntimeError("this Python's ssl module does not show the verified chain")
    return [
        item if isinstance(item, bytes) else item.public_bytes(_ssl.ENCODING_DER)
        for item in getter() or ()
    ]


def address_text(address: tuple[str, int]) -> str:
    """host:port, with IPv6 hosts in brackets, for log lines."""
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
        self.signature = pem.file_signature(self.paths())

    def paths(self) -> list[Path | None]:
        options = self.options
        return [options.certfile, options.keyfile, options.cacertfile, options.crl_file]

    def check(self) -> bool:
        """Rebuild the context if a file changed; True when a new context is in use."""
        signature = pem.file_signature(self.paths())
        if signature == self.signature:
            return False
        try:
            context = self.build(self.options)
        except (pem.TLSFileError, ssl.SSLError, OSError, ValueError) as error:
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
        """DER subjects of the verified chain, leaf first (PeerIdentity.chain_subjects),
        intermediates the client sent included."""
        subjects = []
        for der in verified_chain(ssl_object):
            try:
                subjects.append(x509.load_der_x509_certificate(der).subject.public_bytes())
            except ValueError:
                break
        return tuple(subjects)

    def depth_problem(self, ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
        """Why the client's verified chain is longer than ``ssl_options.depth`` allows, or
        None. The depth counts the CA certificates between the client's certificate and the
        trust anchor, as OpenSSL's verify depth and EMQX's ``depth`` do (0: signed by the
        root itself)."""
        chain = verified_chain(ssl_object)
        if len(chain) < 2:
            return None
        intermediates = len(chain) - 2
        if intermediates <= self.options.depth:
            return None
        return (
            f"certificate chain has {intermediates} intermediate CA certificates, more than "
            f"ssl_options.depth = {self.options.depth}"
        )

    def status(self) -> dict[str, object]:
        return {
            "reloads": self.reloads,
            "reload_failures": self.reload_failures,
            "last_error": self.last_error,
            "reload_interval": self.options.reload_interval,
        }


class TLSServer:
    """A listening socket whose connections get a TLS handshake each, with the current context.

    Each accepted socket is handed to ``loop.connect_accepted_socket(ssl=...)``, which
    returns once the handshake is done (the protocol from ``factory`` then sees a TLS
    transport in ``connection_made``) or raises why it failed. That exception is what makes
    a refusal explainable: ``create_server(ssl=...)`` drops it silently, and ``start_tls``
    on an accepted transport races with uvloop, which starts reading right after
    ``connection_made`` (the ClientHello could reach the wrong protocol). Quacks like
    :class:`asyncio.Server` where the listeners use it (``sockets``, ``close``,
    ``wait_closed``).
    """

    def __init__(
        self,
        context: Callable[[], ssl.SSLContext],
        factory: Callable[[], asyncio.Protocol],
        label: str,
        on_refused: Callable[[tuple[str, int], str], None] | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_handshakes: int | None = None,
        pending: PendingConnections | None = None,
        on_accept_failed: Callable[[], None] | None = None,
        max_conn_rate: int | None = None,
        on_rate_paused: Callable[[], None] | None = None,
    ) -> None:
        self.context = context
        self.on_accept_failed = on_accept_failed
        # An MQTT listener's max_conn_rate (broker.accept); the cluster's server has none.
        self.max_conn_rate = max_conn_rate
        self.on_rate_paused = on_rate_paused
        # Handshakes in flight at most: beyond it connections wait in the kernel's backlog,
        # so a ClientHello flood cannot make unbounded tasks and SSL objects (lb's Listener
        # does the same at maxconn).
        self.max_handshakes = max_handshakes
        # Or, for an MQTT listener, its pending sockets (broker.accept.PendingConnections):
        # a handshake in flight is one of them, and the oldest makes room for a new one.
        self.pending = pending
        self.factory = factory
        self.label = label
        self.on_refused = on_refused
        self.handshake_timeout = handshake_timeout
        self.sockets: list[socket.socket] = []
        self.handshakes_refused = 0
        self.acceptor: AcceptLoop | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int, backlog: int = BACKLOG) -> None:
        self.listen(open_listening_socket(host, port, backlog))

    def listen(self, listening: socket.socket) -> None:
        """Accept on ``listening`` (at start, or again after :meth:`stop_accepting`)."""
        self.sockets = [listening]
        # Accepts pause at descriptor exhaustion and resume as handshakes end (broker.accept).
        self.acceptor = AcceptLoop(
            listening,
            self._accepted,
            self.label,
            self.on_accept_failed,
            self.max_conn_rate,
            self.on_rate_paused,
        )
        self.acceptor.start()

    def _accepted(self, accepted: Accepted, address: object) -> None:
        connection = accepted.socket()
        task = asyncio.get_running_loop().create_task(self._handshake(connection, address))
        self._handshakes.add(task)
        task.add_done_callback(self._handshake_done)
        if self.pending is not None:

            def evict(why: str) -> None:
                peer = address if isinstance(address, tuple) else ("?", 0)
                self._refused(
                    (str(peer[0]), int(peer[1])),
                    f"closed during the TLS handshake to make room: {why}",
                )
                task.cancel()

            self.pending.add(task, evict)
        if self.max_handshakes is not None and len(self._handshakes) >= self.max_handshakes:
            assert self.acceptor is not None
            self.acceptor.hold()

    def _handshake_done(self, task: asyncio.Task[None]) -> None:
        self._handshakes.discard(task)
        if self.pending is not None:
            self.pending.remove(task)
        acceptor = self.acceptor
        if acceptor is not None:
            # A descriptor may have been freed (a refused handshake).
            acceptor.resume()
            if acceptor.held and (
                self.max_handshakes is None or len(self._handshakes) < self.max_handshakes
            ):
                acceptor.release()

    def resume(self) -> None:
        """One of the served connections closed: accepts paused for descriptors go on."""
        if self.acceptor is not None:
            self.acceptor.resume()

    async def _handshake(self, connection: socket.socket, address: object) -> None:
        loop = asyncio.get_running_loop()
        peer = (str(address[0]), int(address[1])) if isinstance(address, tuple) else ("?", 0)
        try:
            await loop.connect_accepted_socket(
                self.factory,
                connection,
                ssl=self.context(),
                ssl_handshake_timeout=self.handshake_timeout,
            )
        except asyncio.CancelledError:
            connection.close()
            raise
        except Exception as error:
            connection.close()
            self.handshakes_refused += 1
            self._refused(peer, handshake_failure_reason(error))

    def _refused(self, address: tuple[str, int], reason: str) -> None:
        if self.on_refused is not None:
            self.on_refused(address, reason)
        else:
            logger.warning(
                "TLS handshake from %s refused on %s: %s",
                address_text(address),
                self.label,
                reason,
            )

    def stop_accepting(self) -> None:
        """Close the listening socket; the handshakes in progress go on."""
        if self.acceptor is not None:
            self.acceptor.close()

    def close(self) -> None:
        if self.acceptor is not None:
            self.acceptor.close()  # closes the listening socket
        for task in list(self._handshakes):
            task.cancel()

    async def wait_closed(self) -> None:
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)


async def serve_tls(
    contexts: ReloadingContext,
    factory: Callable[[], asyncio.Protocol],
    label: str,
    host: str,
    port: int,
    on_refused: Callable[[tuple[str, int], str], None] | None = None,
    max_handshakes: int | None = None,
    pending: PendingConnections | None = None,
    on_accept_failed: Callable[[], None] | None = None,
    max_conn_rate: int | None = None,
    on_rate_paused: Callable[[], None] | None = None,
) -> TLSServer:
    """Listen on ``host:port``; every connection gets the current context of ``contexts``."""

    def current() -> ssl.SSLContext:
        return contexts.context

    server = TLSServer(
        current,
        factory,
        label,
        on_refused,
        max_handshakes=max_handshakes,
        pending=pending,
        on_accept_failed=on_accept_failed,
        max_conn_rate=max_conn_rate,
        on_rate_paused=on_rate_paused,
    )
    await server.start(host, port)
    return server
