"""MQTT listeners: one ``asyncio.Protocol`` per connection, PROXY protocol trust, limits.

A :class:`Listener` is one ``[listeners.tcp.NAME]`` (or ``ssl``) of the config. Each accepted
connection gets a :class:`MQTTServerProtocol`, which:

- with ``proxy_protocol = true`` (EMQX's name, seed 004) checks the peer address against
  ``proxy_protocol_trusted`` *before reading any byte* (untrusted: closed, one log line),
  then reads a PROXY v1/v2 header (lb.proxyproto) within ``proxy_protocol_timeout``. The
  header's source address becomes the client's address; the PP2_TYPE_SSL CN, when the
  balancer verified the certificate, becomes the certificate CN (and the username with
  ``peer_cert_as_username = "cn"``). A header longer than ``proxy_protocol_max_size`` is
  refused; with ``proxy_protocol_hmac_keys`` so is one without lb's valid, fresh, new HMAC
  TLV (lb.proxy_hmac), before any MQTT byte is read. A LOCAL command is a balancer health
  check: accepted, counted, logged at debug level only; a CONNECT after it (lb's ``option
  mqtt-chk``) is answered here with a CONNACK and never becomes a client session. MQTT bytes
  where a header is required, or a header where none is expected, are reported in words;
- names each connection: the header's PP2_TYPE_UNIQUE_ID (lb's or HAProxy's %ID) or an id
  of its own (the listener's 64 random bits and a count), in every log line about it
  (``connection_id=``);
- counts connected MQTT clients against ``max_connections`` (CONNACK 0x89 / 3.1.1 return
  code 3 past it, decided when the CONNECT is accepted, :meth:`MQTTServerProtocol.admit`),
  and bounds the sockets that are not clients yet separately, in count and bytes
  (``max_pending_connections``, ``max_pending_bytes``; broker.accept.PendingConnections):
  silent sockets cost pending slots, never client slots, and the oldest makes room;
- accepts with :class:`broker.accept.AcceptLoop` (paused, not spinning and not dropping,
  when the process is out of file descriptors, and at ``max_conn_rate`` accepts per second;
  one log line per burst);
- closes gracefully after it has spoken (a CONNACK refusal, a DISCONNECT): the write side is
  shut, and what the client still sends is read and discarded for up to ``LINGER_TIME`` or
  ``LINGER_MAX_BYTES`` (HAProxy's and nginx's lingering close), so a client that is still
  writing reads our last packet instead of a reset; after the client's own DISCONNECT it
  closes at once (nothing is left to say either way);
- rate limits the lines a flood can cause (untrusted sources, PROXY timeouts and errors,
  refused TLS handshakes, evictions) with lb.ratelimit: "N similar lines suppressed";
- implements :class:`broker.connection.ConnectionIO` for the sans-IO connection: writes with
  backpressure (``pause_reading`` while the transport's buffer is above its high-water mark,
  the connection's outgoing queue takes over), and one ``call_later`` timer for the PROXY
  header deadline, the CONNECT deadline and the keep alive;
- reads only while nothing holds it: the socket is read iff the client's write buffer is
  below its high-water mark (``writing_paused``), no subscriber session holds this publisher
  (``input_paused``, broker.session) and no packets wait from the last read (the connection
  handles ``PACKETS_PER_TURN`` a call, the rest on the next loop turn, ``_backlog_handle``).
  ``_update_reading`` is the one place that calls pause_reading/resume_reading.

PROXY protocol: HAProxy doc/proxy-protocol.txt sections 2.1 (v1), 2.2 (v2), 2.2.6 (SSL TLV),
and section 3 ("the receiver ... must only accept it from known sources").
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

from broker import coalesce
from broker.accept import Accepted, AcceptLoop, PendingConnections, open_listening_socket
from broker.config import ListenerConfig, is_loopback_host
from broker.connection import ClientConnection
from broker.core import Broker
from broker.hooks import PeerIdentity
from broker.mqtt import (
    NEED_DATA as MQTT_NEED_DATA,
)
from broker.mqtt import (
    Connack,
    Connect,
    MQTTDecoder,
    MQTTProtocolError,
    ReasonCode,
    connack_code_for,
    encode,
)
from broker.tls_listener import ReloadingContext, TLSServer, address_text, serve_tls
from lb.proxy_hmac import HeaderAuthenticator
from lb.proxyproto import (
    NEED_DATA,
    V2_HEADER_LENGTH,
    ProxyHeader,
    ProxyProtocolDecoder,
    ProxyProtocolError,
    is_trusted_source,
)
from lb.ratelimit import SuppressedLines
from lb.timerwheel import RESOLUTION as WHEEL_RESOLUTION
from lb.timerwheel import TimerWheel

__all__ = ["Listener", "MQTTServerProtocol"]

logger = logging.getLogger(__name__)

# Write buffer marks: above HIGH the transport pauses us; messages then wait in the
# session's bounded queue instead of this buffer.
#: Addresses whose PROXY trust a listener remembers (Listener.trusted_source).
TRUSTED_SOURCES = 1024
WRITE_BUFFER_HIGH = 256 * 1024
WRITE_BUFFER_LOW = 64 * 1024
# First byte of a PROXY v1 ("PROXY ...") or v2 ("\r\n\r\n\0\r\nQUIT\n") header. No MQTT
# packet starts with either: 0x50 is a PUBREC with reserved flags, 0x0D a PINGREQ with flags.
PROXY_FIRST_BYTES = (ord("P"), 0x0D)
# Lingering close (HAProxy's and nginx's): after our last packet, read and discard what the
# client still sends for this long or this many bytes, so it reads that packet, not a reset.
LINGER_TIME = 2.0
LINGER_MAX_BYTES = 16 * 1024 * 1024
# A deadline timer that runs this late ran after a stalled loop: uvloop (libuv) runs due
# timers before it polls the sockets, and a busy loop reads a burst of sockets a batch at a
# time, so bytes that arrived in time may wait unread. Such a timer is extended by the time
# the loop was late (at most its own delay, at most LAG_EXTENSIONS times): deadlines count
# time the loop had to read, not time it spent elsewhere. A silent socket still times out.
LAG_TOLERANCE = 0.05
LAG_EXTENSIONS = 3


def reachable_from_network(config: ListenerConfig) -> bool:
    """Whether clients on other machines can reach this listener: its bind address is not a
    loopback one and, with proxy_protocol, some trusted sender is not on this machine."""
    if is_loopback_host(config.host):
        return False
    if config.proxy_protocol:
        return not all(network.is_loopback for network in config.proxy_protocol_trusted)
    return True


class Listener:
    """One listening socket and its live connections."""

    def __init__(
        self,
        config: ListenerConfig,
        broker: Broker,
        ssl_context: ssl.SSLContext | None = None,
        tls: ReloadingContext | None = None,
        authenticator: HeaderAuthenticator | None = None,
    ) -> None:
        self.config = config
        self.broker = broker
        # proxy_protocol_hmac_keys: every PROXY header's HMAC TLV is checked (lb.proxy_hmac).
        self.authenticator = authenticator
        self.ssl_context = ssl_context
        # TLS listener (seed 000): handshakes run per connection so refusals are logged,
        # with the context reloaded from disk every ssl_options.reload_interval.
        self.tls = tls
        self.server: TLSServer | None = None
        self.acceptor: AcceptLoop | None = None
        self.protocols: set[MQTTServerProtocol] = set()
        self.loop = asyncio.get_running_loop()
        # The PROXY header, CONNECT and keep alive timeouts of every connection.
        self.wheel: TimerWheel[MQTTServerProtocol] = TimerWheel(self.loop)
        # Connected MQTT clients, what max_connections counts (None: no count limit).
        self.clients = 0
        self.max_connections = config.max_connections
        self.pending = PendingConnections(
            config.max_pending_connections, config.max_pending_bytes, self._evicted
        )
        # The bound port, once listening (kept while an evacuation closes the socket).
        self._port = 0
        # Set by stop() while it waits for the lingering closes.
        self._all_closed: asyncio.Event | None = None
        # Connections being adopted by the event loop (accepted, connection_made not yet
        # run): connect_accepted_socket's coroutine -> the descriptor or socket it was given.
        self._adopting: dict[Coroutine[Any, Any, object], socket.socket] = {}
        # PROXY header senders' addresses -> trusted (see trusted_source).
        self._trusted_sources: dict[str, bool] = {}
        # Connection ids: this listener's random prefix and a count (see next_connection_id).
        self._id_prefix = os.urandom(8).hex()
        self._id_count = itertools.count()
        # uvloop adopts a descriptor without a socket object (broker.accept.Accepted);
        # asyncio's own loop needs the socket.
        self._uvloop = type(self.loop).__module__.startswith("uvloop")
        self.refusals = SuppressedLines(
            logger.warning,
            f"listener {config.label}",
            "connections refused before CONNECT",
            self.loop.time,
            self.loop.call_later,
        )

    @property
    def active(self) -> int:
        """Open connections: clients, pending sockets and lingering closes."""
        return len(self.protocols)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._port:
            return self._port
        if self.acceptor is not None:
            sockname = self.acceptor.socket.getsockname()
        else:
            assert self.server is not None
            sockname = self.server.sockets[0].getsockname()
        return int(sockname[1])

    def refused(self, line: str) -> None:
        """A refusal before CONNECT, logged as a WARNING within the rate limit."""
        self.refusals.emit(line)

    async def start(self) -> None:
        config = self.config
        label = f"listener {config.label}"
        if self.tls is not None:
            self.server = await serve_tls(
                self.tls,
                self._protocol,
                label,
                config.host,
                config.port,
                on_refused=self._tls_refused,
                pending=self.pending,
                on_accept_failed=self._accept_failed,
                max_conn_rate=config.max_conn_rate,
                on_rate_paused=self._rate_paused,
            )
            self.tls.start()
        else:
            self._accept_on(open_listening_socket(config.host, config.port))
        self._port = self.port
        logger.info(
            "listener %s on %s:%d%s",
            config.label,
            config.host,
            self.port,
            " (proxy_protocol)" if config.proxy_protocol else "",
        )
        if not config.authentication and reachable_from_network(config):
            logger.warning(
                "listener %s on %s:%d accepts ANONYMOUS clients from the network (no "
                "password_file, no client certificates): anyone who reaches this port may "
                "connect, publish and subscribe. Set password_file; or make it an ssl "
                'listener with verify = "verify_peer" and fail_if_no_peer_cert = true; or '
                'put it behind lb with proxy_protocol = true and peer_cert_as_username = "cn"; '
                "or bind it to 127.0.0.1",
                config.label,
                config.host,
                self.port,
            )

    def _accept_on(self, listening: socket.socket) -> None:
        config = self.config
        self.acceptor = AcceptLoop(
            listening,
            self._accepted,
            f"listener {config.label}",
            self._accept_failed,
            config.max_conn_rate,
            self._rate_paused,
        )
        self.acceptor.start()

    @property
    def accepting(self) -> bool:
        """False while an evacuation keeps the listening socket closed."""
        acceptor = self.accept_loop
        return acceptor is not None and not acceptor.closed

    def stop_accepting(self, why: str = "evacuation") -> None:
        """Close the listening socket (an evacuation, broker.evacuation; a node paused in a
        minority, broker.partition): a new connection is refused, so a balancer sends it to
        another node at once and its health checks mark this one down; the connections here
        stay."""
        if not self.accepting:
            return
        if self.server is not None:
            self.server.stop_accepting()
        elif self.acceptor is not None:
            self.acceptor.close()
        logger.info(
            "listener %s on %s:%d: not accepting (%s)",
            self.config.label,
            self.config.host,
            self._port,
            why,
        )

    def start_accepting(self) -> None:
        """Listen again on the same port (the evacuation ended)."""
        if self.accepting:
            return
        try:
            listening = open_listening_socket(self.config.host, self._port)
        except OSError as error:
            logger.error(
                "listener %s: cannot listen on %s:%d again: %s (restart the node)",
                self.config.label,
                self.config.host,
                self._port,
                error.strerror or error,
            )
            return
        if self.server is not None:
            self.server.listen(listening)
        else:
            self._accept_on(listening)
        logger.info(
            "listener %s on %s:%d: accepting again", self.config.label, self.config.host, self._port
        )

    def trusted_source(self, host: str) -> bool:
        """May ``host`` send this listener a PROXY header (proxy_protocol_trusted)? Kept per
        address: the balancers in front are few, and parsing the address each time was ~200
        Python opcodes per connection. Bounded: forgotten at TRUSTED_SOURCES entries."""
        trusted = self._trusted_sources.get(host)
        if trusted is None:
            if len(self._trusted_sources) >= TRUSTED_SOURCES:
                self._trusted_sources.clear()
            trusted = is_trusted_source(host, self.config.proxy_protocol_trusted)
            self._trusted_sources[host] = trusted
        return trusted

    def next_connection_id(self) -> str:
        """A new connection's id, 32 hex digits: unique across nodes and restarts
        by the random half, in this listener by the count (os.urandom per connection was a
        getrandom syscall each)."""
        return f"{self._id_prefix}{next(self._id_count):016x}"

    def _protocol(self) -> asyncio.Protocol:
        return MQTTServerProtocol(self)

    def _accepted(self, accepted: Accepted, address: object) -> None:
        # The event loop makes a transport for an accepted socket only in a coroutine,
        # connect_accepted_socket: it builds the transport and schedules connection_made at
        # once, then waits for it. The coroutine is stepped here, from its waiter's done
        # callback, as a Task would step it, without the Task (its object, two call_soon and
        # a done callback: ~7 µs of ~120 per connection, bench/README.md issue 13). It gets
        # the descriptor without a socket object (broker.accept.Accepted says why).
        # The peer's address is accept()'s: asking the transport for it costs a
        # getsockname, a getpeername and a socket object.
        connection = cast(socket.socket, accepted) if self._uvloop else accepted.socket()
        adopting = self.loop.connect_accepted_socket(
            functools.partial(MQTTServerProtocol, self, address),
            connection,
            ssl=self.ssl_context,
        )
        self._adopting[adopting] = connection
        self._adopt_step(adopting)
        # Once that first step is through, the transport holds the descriptor and closes it
        # (uvloop stores it only once open): Accepted.close() leaves it alone from now on (a
        # socket object's second close is harmless). A first step that failed closed it.
        accepted.adopted()

    def _adopt_step(self, adopting: Coroutine[Any, Any, object], _done: object = None) -> None:
        connection = self._adopting.get(adopting)
        if connection is None:
            return  # closed by stop()
        try:
            waiter = adopting.send(None)
        except StopIteration:
            del self._adopting[adopting]
            return
        except BaseException as error:
            del self._adopting[adopting]
            connection.close()  # ours only before the first step is through (see _accepted)
            if isinstance(error, OSError):
                logger.debug("listener %s: accepted connection lost: %s", self.config.label, error)
                return
            raise
        # A future (`await waiter`); only the event loop's futures are awaited in there.
        cast(asyncio.Future[object], waiter).add_done_callback(
            functools.partial(self._adopt_step, adopting)
        )

    def _tls_refused(self, address: tuple[str, int], reason: str) -> None:
        self.refused(
            f"TLS handshake from {address_text(address)} refused on listener "
            f"{self.config.label}: {reason}"
        )

    def _accept_failed(self) -> None:
        self.broker.counters.accepts_failed += 1

    def _rate_paused(self) -> None:
        self.broker.counters.accepts_paused_max_conn_rate += 1

    @property
    def accept_loop(self) -> AcceptLoop | None:
        """The loop accepting this listener's connections (plain or TLS)."""
        if self.acceptor is not None:
            return self.acceptor
        return None if self.server is None else self.server.acceptor

    def status(self) -> dict[str, Any]:
        """What the admin API shows of this listener (/api/listeners, /metrics)."""
        config = self.config
        acceptor = self.accept_loop
        return {
            "listener": config.label,
            "bind": f"{config.host}:{self.port}",
            "clients_current": self.clients,
            "max_connections": self.max_connections,
            "pending_connections_current": len(self.pending),
            "max_conn_rate": config.max_conn_rate,
            # Accepts over the last second; counted only under max_conn_rate (None without).
            "conn_rate_current": None if acceptor is None else acceptor.rate(),
            "accepts_paused_max_conn_rate": 0 if acceptor is None else acceptor.rate_pauses,
            "accepts_failed": 0 if acceptor is None else acceptor.failed_accepts,
            # 0 while an evacuation keeps the listening socket closed.
            "accepting_current": int(self.accepting),
        }

    def _evicted(self) -> None:
        self.broker.counters.pending_connections_evicted += 1

    def connection_closed(self) -> None:
        """A descriptor is free: accepts paused for lack of them go on."""
        if self._all_closed is not None and not self.protocols:
            self._all_closed.set()
        if self.acceptor is not None:
            self.acceptor.resume()
        elif self.server is not None:
            self.server.resume()

    async def stop(self) -> None:
        if self.tls is not None:
            self.tls.stop()
        if self.acceptor is not None:
            self.acceptor.close()
        if self.server is not None:
            self.server.close()
        adopting = list(self._adopting)
        self._adopting.clear()
        for coroutine in adopting:
            coroutine.close()  # its transport is closed (GeneratorExit at its await)
        for protocol in list(self.protocols):
            protocol.shutdown()
        # Lingering closes end by themselves within LINGER_TIME; what is left is cut.
        if self.protocols:
            self._all_closed = asyncio.Event()
            try:
                async with asyncio.timeout(LINGER_TIME):
                    await self._all_closed.wait()
            except TimeoutError:
                pass
        for protocol in list(self.protocols):
            protocol.abort()
        self.wheel.close()
        if self.server is not None:
            await self.server.wait_closed()
        self.refusals.flush()


class MQTTServerProtocol(asyncio.Protocol):
    __slots__ = (
        "_backlog_handle",
        "_deadline",
        "_delay",
        "_extensions",
        "_flush_handle",
        "_out",
        "_out_bytes",
        "_timer",
        "_timer_callback",
        "admitted",
        "closed",
        "connection",
        "connection_id",
        "connection_id_source",
        "first_data_pending",
        "health_answered",
        "health_decoder",
        "idle_timeout",
        "input_paused",
        "last_activity",
        "linger_bytes",
        "lingering",
        "listener",
        "loop",
        "peer",
        "proxy_decoder",
        "reading_paused",
        "socket_address",
        "transport",
        "wheel_slot",
        "writing_paused",
    )

    def __init__(self, listener: Listener, peer: Any = None) -> None:
        self.listener = listener
        self.loop = listener.loop
        # accept()'s address of the peer, when the listener accepted the socket itself.
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.connection: ClientConnection | None = None
        self.proxy_decoder: ProxyProtocolDecoder | None = None
        self.socket_address: tuple[str, int] = ("", 0)
        # Our own id until a PROXY header brings the balancer's (PP2_TYPE_UNIQUE_ID): every
        # log line about the connection carries one, so lines always correlate.
        self.connection_id = listener.next_connection_id()
        self.connection_id_source = "broker"
        # The lingering close's timer; every other timeout is an entry in listener.wheel.
        self._timer: asyncio.TimerHandle | None = None
        self.wheel_slot: int | None = None
        self._timer_callback: Callable[[], None] | None = None
        self._deadline = 0.0
        self._delay = 0.0
        self._extensions = 0
        self.idle_timeout: float | None = None
        self.last_activity = 0.0
        self.writing_paused = False
        self.input_paused = False
        # Set while received packets wait for the next loop turn (handle_buffered).
        self._backlog_handle: asyncio.Handle | None = None
        # Whether the transport is paused now: the result of _update_reading, nothing else.
        self.reading_paused = False
        self.closed = False
        # One of the listener's max_connections slots is ours (admit) until we close.
        self.admitted = False
        self.lingering = False
        self.linger_bytes = 0
        self.first_data_pending = False
        # A PROXY LOCAL connection (a balancer's health check): its MQTT, if any, is
        # answered here and never becomes a client session (_health_data).
        self.health_decoder: MQTTDecoder | None = None
        self.health_answered = False
        # Writes coalesced until the end of this loop iteration (see write()).
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_handle: asyncio.Handle | None = None

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        listener = self.listener
        config = listener.config
        counters = listener.broker.counters
        peer = self.peer
        if peer is None:
            peer = transport.get_extra_info("peername")
        else:
            self.peer = None
        listener.protocols.add(self)
        counters.connections_accepted += 1
        if not peer:
            # Reset before we could look (HAProxy's L4 checks close with RST at once):
            # nothing to serve and nothing worth a warning.
            logger.debug("connection on %s reset before it was accepted", config.label)
            self._close_transport(linger=False)
            return
        # Pending until its CONNECT is accepted; the oldest pending socket makes room.
        listener.pending.add(self, self._evicted)
        self.socket_address = (str(peer[0]), int(peer[1]))
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)
        self.last_activity = self.loop.time()
        if listener.tls is not None and self._chain_too_deep(listener.tls):
            return
        if config.proxy_protocol:
            if not listener.trusted_source(self.socket_address[0]):
                # Decided on the address alone, before any byte is read (proxy-protocol.txt
                # section 3): whatever this peer sends is never parsed.
                counters.proxy_untrusted_sources += 1
                listener.refused(
                    f"connection from {self._peer_text()} refused on PROXY "
                    f"listener {config.label}: address not in proxy_protocol_trusted"
                )
                self._close_transport(linger=False)
                return
            self.proxy_decoder = ProxyProtocolDecoder(
                max_v2_length=config.proxy_protocol_max_size - V2_HEADER_LENGTH
            )
            self._arm(config.proxy_protocol_timeout, self._proxy_timeout)
            return
        self._start_mqtt(self._socket_identity())

    def data_received(self, data: bytes) -> None:
        if self.closed:
            if self.lingering:
                # Lingering close: read and discard, within LINGER_MAX_BYTES.
                self.linger_bytes += len(data)
                if self.linger_bytes > LINGER_MAX_BYTES:
                    self.abort()
            return
        if not self.admitted and not self.listener.pending.grow(self, len(data)):
            return  # evicted: pending sockets over max_pending_bytes
        self.last_activity = self.loop.time()
        try:
            connection = self.connection
            if connection is not None:
                if self.first_data_pending:
                    self.first_data_pending = False
                    if self._unexpected_proxy_header(data):
                        return
                if connection.data_received(data):
                    self._schedule_backlog()
                return
            if self.health_decoder is not None:
                self._health_data(data)
            elif self.proxy_decoder is not None:
                self._proxy_data(data)
        except Exception:
            self._internal_error()

    def _internal_error(self) -> None:
        # A bug must cost one connection, never the node.
        logger.exception(
            "internal error on connection from %s; closing it",
            self._peer_text(),
        )
        if self.connection is not None:
            self.connection.connection_lost("internal error")
        self._close_transport(linger=False)

    def eof_received(self) -> bool | None:
        # MQTT has no half-close: a client that stops sending is gone (and its will is due).
        # While lingering, the client has read our last packet and closed: done.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        coalesce.drop_unwritten(self)
        if self._backlog_handle is not None:
            self._backlog_handle.cancel()
            self._backlog_handle = None
        listener = self.listener
        listener.protocols.discard(self)
        listener.pending.remove(self)
        self._release_client()
        listener.broker.counters.connections_closed += 1
        listener.connection_closed()
        was_closed = self.closed
        self.closed = True
        self.lingering = False
        connection = self.connection
        if connection is not None:
            connection.connection_lost(None if exc is None else f"connection error: {exc}")
            # The connection refers to us (its io): without this cycle, a closed connection
            # and what it holds (session, decoder, identity: 13 objects) are freed by their
            # reference counts at once instead of by the cyclic GC, whose collections were
            # ~8% of the CPU per connection (bench/README.md issue 13).
            self.connection = None
        elif self.proxy_decoder is not None and not was_closed:
            logger.debug(
                "connection from %s closed while waiting for the PROXY header",
                self._peer_text(),
            )
        self.transport = None

    def pause_writing(self) -> None:
        # Symmetric flow control: while this client does not read, stop reading from it.
        self.writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._update_reading()
        if self.connection is not None:
            self.connection.writable()

    # --- reading: one decision, three reasons ------------------------------------------------

    def _update_reading(self) -> None:
        """Pause or resume the transport so that it reads iff no reason to wait is left."""
        transport = self.transport
        if transport is None or self.closed:
            return
        wait = self.writing_paused or self.input_paused or self._backlog_handle is not None
        if wait == self.reading_paused:
            return
        self.reading_paused = wait
        if wait:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _schedule_backlog(self) -> None:
        if self._backlog_handle is None and not self.closed:
            self._backlog_handle = self.loop.call_soon(self._handle_backlog)
            self._update_reading()

    def _handle_backlog(self) -> None:
        """Next loop turn: handle the next PACKETS_PER_TURN packets already received."""
        self._backlog_handle = None
        connection = self.connection
        if connection is None or self.closed:
            return
        self.last_activity = self.loop.time()
        try:
            more = connection.handle_buffered()
        except Exception:
            self._internal_error()
            return
        if more and not self.closed:
            self._backlog_handle = self.loop.call_soon(self._handle_backlog)
        self._update_reading()

    # --- ConnectionIO -----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        # Coalesced: one transport.write (one send syscall) per connection per loop turn
        # instead of one per packet; bench/README.md (broker section) has the effect.
        if self.transport is None or self.closed:
            return
        out = self._out
        out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes >= WRITE_BUFFER_HIGH:
            # Bounded: past the high-water mark hand it to the transport now, which may
            # pause_writing() (write_congested() turns true as before).
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)

    #: The turn's packets in one write (broker.coalesce, shared with the cluster links).
    _flush = coalesce.flush

    def close(self, linger: bool = True) -> None:
        self._close_transport(linger)

    def admit(self) -> bool:
        """Take one of the listener's max_connections slots; False when none is left."""
        listener = self.listener
        limit = listener.max_connections
        if limit is not None and listener.clients >= limit:
            return False
        listener.clients += 1
        self.admitted = True
        listener.pending.remove(self)
        return True

    def _release_client(self) -> None:
        if self.admitted:
            self.admitted = False
            self.listener.clients -= 1

    def write_congested(self) -> bool:
        return self.writing_paused

    def set_idle_timeout(self, seconds: float | None) -> None:
        self.idle_timeout = seconds
        if seconds:
            self._arm(seconds, self._idle_check)  # replaces the timer armed before
        else:
            self._cancel_timer()

    def pause_input(self) -> None:
        self.input_paused = True
        self._update_reading()

    def resume_input(self) -> None:
        self.input_paused = False
        # The keep alive counts from now: the client's silence was ours.
        self.last_activity = self.loop.time()
        # Packets received before the pause wait in the decoder: the next turn handles them
        # and resumes reading once none is left.
        self._schedule_backlog()
        self._update_reading()

    # --- internals --------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Server stop: 5.0 clients get DISCONNECT 0x8B, then everything closes."""
        if self.connection is not None and self.connection.connected:
            self.connection.disconnect(ReasonCode.SERVER_SHUTTING_DOWN, "server shutting down")
        self._close_transport()

    def abort(self) -> None:
        """Close now, without lingering or flushing (node stop, eviction, a lingering client
        that keeps sending)."""
        self.closed = True
        self.lingering = False
        self._release_client()
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    def _evicted(self, why: str) -> None:
        """PendingConnections makes room: this is the oldest socket that is not a client."""
        self.listener.refused(
            f"connection from {address_text(self.socket_address)} on listener "
            f"{self.listener.config.label} closed before CONNECT to make room: {why}"
        )
        if self.connection is not None:
            self.connection.connection_lost("closed before CONNECT to make room")
        self.abort()

    def _close_transport(self, linger: bool = True) -> None:
        if self.closed:
            return
        self._flush()  # what was written before close() still goes out
        self.closed = True
        self._release_client()
        self._cancel_timer()
        transport = self.transport
        if transport is None:
            return
        # Lingering close once the MQTT conversation started (a CONNACK or DISCONNECT may be
        # on its way): shut our write side, read and drop the rest. TLS transports cannot
        # half-close; their close() sends close_notify and reads until the peer's.
        if linger and self.connection is not None and transport.can_write_eof():
            self.lingering = True
            transport.write_eof()
            if self.reading_paused:
                self.reading_paused = False
                transport.resume_reading()
            self._timer = self.loop.call_later(LINGER_TIME, self._linger_over)
            return
        transport.close()

    def _linger_over(self) -> None:
        self._timer = None
        if self.transport is not None:
            self.transport.close()

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        """This connection's one timeout from now on (the wheel moves its entry)."""
        if self._timer is not None:  # the lingering close's
            self._timer.cancel()
            self._timer = None
        self._timer_callback = callback
        self._deadline = self.loop.time() + delay
        self._delay = delay
        self._extensions = 0
        # In the listener's wheel, not a call_later per connection (lb/timerwheel.py).
        self.listener.wheel.add(self, self._deadline)

    def wheel_fired(self) -> None:
        callback = self._timer_callback
        if callback is None or self.closed:
            return
        now = self.loop.time()
        # The wheel fires up to one slot after the deadline by design; later is lag.
        late = now - self._deadline - WHEEL_RESOLUTION
        if late > LAG_TOLERANCE and self._extensions < LAG_EXTENSIONS:
            # The loop was busy elsewhere past the deadline (see LAG_TOLERANCE).
            self._extensions += 1
            self.listener.broker.counters.timers_late += 1
            extension = min(late, self._delay)
            self._deadline = now + extension
            self.listener.wheel.add(self, self._deadline)
            return
        self._timer_callback = None
        callback()

    def _cancel_timer(self) -> None:
        if self._timer is not None:  # the lingering close's
            self._timer.cancel()
            self._timer = None
        if self.wheel_slot is not None:
            self.listener.wheel.discard(self)
        self._timer_callback = None

    def _idle_check(self) -> None:
        # One timer per connection, re-armed for the remainder instead of being cancelled
        # and recreated on every packet.
        timeout = self.idle_timeout
        if self.closed or timeout is None:
            return
        now = self.loop.time()
        if self.input_paused:
            # We stopped reading this client (backpressure): its PINGREQs wait unread in
            # the socket, so its silence does not count.
            self.last_activity = now
        elapsed = now - self.last_activity
        if elapsed < timeout:
            self._arm(timeout - elapsed, self._idle_check)
            return
        self._connection_timed_out()

    def _connection_timed_out(self) -> None:
        if self.connection is not None:
            self.connection.timed_out()
        self._close_transport()

    def _proxy_timeout(self) -> None:
        counters = self.listener.broker.counters
        counters.proxy_header_timeouts += 1
        self.listener.refused(
            f"timeout waiting for the PROXY header from {self._peer_text()} "
            f"on listener {self.listener.config.label} "
            f"({self.listener.config.proxy_protocol_timeout:g}s)"
        )
        self._close_transport(linger=False)

    def _chain_too_deep(self, tls: ReloadingContext) -> bool:
        """ssl_options.depth (seed 000), checked on the verified chain before any byte is
        read: the standard library has no verify depth setting to give OpenSSL."""
        transport = self.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
            return False
        try:
            problem = tls.depth_problem(ssl_object)
        except RuntimeError as error:
            problem = str(error)
        if problem is None:
            return False
        self.listener.broker.counters.tls_chain_too_deep += 1
        self.listener.refused(
            f"TLS client {address_text(self.socket_address)} refused on listener "
            f"{self.listener.config.label}: {problem}"
        )
        self._close_transport(linger=False)
        return True

    def _socket_identity(self) -> PeerIdentity:
        listener = self.listener
        if listener.tls is None and listener.ssl_context is None:
            return PeerIdentity(
                self.socket_address,
                self.socket_address,
                listener.config.label,
                connection_id=self.connection_id,
                connection_id_source=self.connection_id_source,
            )
        transport = self.transport
        cn: str | None = None
        verified = False
        tls_version: str | None = None
        chain_subjects: tuple[bytes, ...] = ()
        ssl_object = None
        if transport is not None and (self.listener.tls or self.listener.ssl_context):
            ssl_object = transport.get_extra_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
            tls_version = ssl_object.version()
            certificate = ssl_object.getpeercert()
            if certificate:
                # The handshake only completes with a peer certificate when it verified.
                verified = True
                for relative_name in certificate.get("subject", ()):
                    for attribute in relative_name:
                        if attribute[0] == "commonName":
                            cn = str(attribute[1])
                if self.listener.tls is not None:
                    chain_subjects = self.listener.tls.chain_subjects(ssl_object)
        return PeerIdentity(
            address=self.socket_address,
            socket_address=self.socket_address,
            listener=self.listener.config.label,
            tls=tls_version is not None,
            tls_version=tls_version,
            certificate_cn=cn,
            certificate_verified=verified,
            chain_subjects=chain_subjects,
            connection_id=self.connection_id,
            connection_id_source=self.connection_id_source,
        )

    def _proxy_data(self, data: bytes) -> None:
        decoder = self.proxy_decoder
        assert decoder is not None
        config = self.listener.config
        counters = self.listener.broker.counters
        source = self._peer_text()
        try:
            decoder.feed(data)
            event = decoder.next_event()
        except ProxyProtocolError as error:
            if error.looks_like == "mqtt-connect":
                counters.proxy_missing_header += 1
                self.listener.refused(
                    f"MQTT CONNECT received without PROXY header from {source}: is "
                    "send-proxy-v2 set on the balancer? (listener "
                    f"{config.label} has proxy_protocol = true)"
                )
            elif error.looks_like == "tls-client-hello":
                counters.proxy_missing_header += 1
                self.listener.refused(
                    f"TLS ClientHello received without PROXY header from {source}: the "
                    f"balancer must terminate TLS and send-proxy-v2 to listener {config.label}"
                )
            elif error.reason == "too_long":
                counters.proxy_header_errors += 1
                logger.warning(
                    "PROXY header from %s refused on listener %s: %s (proxy_protocol_max_size); "
                    "a balancer sending chain-subjects of long certificate chains needs a "
                    "larger one",
                    source,
                    config.label,
                    error,
                )
            else:
                counters.proxy_header_errors += 1
                self.listener.refused(
                    f"invalid PROXY header from {source} on listener {config.label}: "
                    f"{error} ({error.reason})"
                )
            self._close_transport(linger=False)
            return
        if event is NEED_DATA:
            return
        assert isinstance(event, ProxyHeader)
        self._cancel_timer()
        if not self._header_authentic(event, source):
            self._close_transport()
            return
        if event.unique_id:
            self.connection_id = _printable(event.unique_id)
            self.connection_id_source = "proxy"
        trailing = decoder.trailing_data
        self.proxy_decoder = None
        if event.is_local:
            counters.proxy_health_checks += 1
            logger.debug("PROXY LOCAL (health check) from %s on %s", source, config.label)
            self.health_decoder = MQTTDecoder(
                max_packet_size=self.listener.broker.settings.max_packet_size
            )
            self._arm(self.listener.broker.settings.connect_timeout, self._close_transport)
            if trailing:
                self._health_data(trailing)
            return
        counters.proxy_headers_accepted += 1
        self._start_mqtt(self._proxy_identity(event))
        if (
            trailing
            and self.connection is not None
            and not self.closed
            and self.connection.data_received(trailing)
        ):
            self._schedule_backlog()

    def _health_data(self, data: bytes) -> None:
        """A balancer's health check after PROXY LOCAL (lb's `option mqtt-chk`, HAProxy's
        tcp-check send-binary): a CONNECT is answered with a CONNACK that accepts (or, as
        for a client, 0x89 Server busy / 3 Server unavailable past max_connections), then
        DISCONNECT or anything else closes. No session, no cluster message, no client line:
        a debug line and a counter."""
        decoder = self.health_decoder
        assert decoder is not None
        listener = self.listener
        decoder.feed(data)
        while not self.closed:
            try:
                packet = decoder.next_event()
            except MQTTProtocolError as error:
                logger.debug("health check from %s: %s; closed", self._peer_text(), error)
                self._close_transport()
                return
            if packet is MQTT_NEED_DATA:
                return
            if isinstance(packet, Connect) and not self.health_answered:
                self.health_answered = True
                level = packet.protocol_level
                # Busy when admit() would refuse a client now (None: no count limit).
                limit = listener.max_connections
                busy = limit is not None and listener.clients >= limit
                code = connack_code_for(level, ReasonCode.SERVER_BUSY) if busy else 0
                self.write(encode(Connack(False, code), level))
                listener.broker.counters.mqtt_health_checks += 1
                logger.debug(
                    "health check from %s on %s: CONNECT (client_id=%s, protocol level %d) "
                    "answered with CONNACK %d",
                    self._peer_text(),
                    listener.config.label,
                    packet.client_id or "-",
                    level,
                    code,
                )
                continue
            self._close_transport()  # DISCONNECT, or what a health check has no need for
            return

    def _header_authentic(self, header: ProxyHeader, source: str) -> bool:
        """proxy_protocol_hmac_keys: refuse a header without a valid, fresh, new HMAC (LOCAL
        health checks too), before any MQTT byte is read; say which check failed."""
        listener = self.listener
        counters = listener.broker.counters
        authenticator = listener.authenticator
        if authenticator is None:
            if header.mac is not None:
                counters.proxy_hmac_unchecked += 1
                if counters.proxy_hmac_unchecked == 1:
                    logger.warning(
                        "PROXY headers from %s on listener %s carry an HMAC (key '%s') that "
                        "nothing checks: set proxy_protocol_hmac_keys to the balancer's key "
                        "file (said once)",
                        source,
                        listener.config.label,
                        header.mac.key_id,
                    )
            return True
        refusal = authenticator.check(header, time.time())
        if refusal is None:
            counters.proxy_hmac_verified += 1
            return True
        match refusal.reason:
            case "missing":
                counters.proxy_hmac_missing += 1
            case "unknown_key":
                counters.proxy_hmac_unknown_key += 1
            case "bad_mac":
                counters.proxy_hmac_bad_mac += 1
            case "stale":
                counters.proxy_hmac_stale += 1
            case "replayed":
                counters.proxy_hmac_replayed += 1
        logger.warning(
            "PROXY header from %s refused on listener %s: %s",
            source,
            listener.config.label,
            refusal.text,
        )
        return False

    def _proxy_identity(self, header: ProxyHeader) -> PeerIdentity:
        ssl_info = header.ssl
        verified = ssl_info is not None and ssl_info.cert_verified
        return PeerIdentity(
            address=header.source or self.socket_address,
            socket_address=self.socket_address,
            listener=self.listener.config.label,
            via_proxy=True,
            tls=ssl_info is not None and ssl_info.over_tls,
            tls_version=None if ssl_info is None else ssl_info.version,
            certificate_cn=ssl_info.cn if ssl_info is not None and verified else None,
            certificate_verified=verified,
            chain_subjects=header.chain_subjects if verified else (),
            authority=header.authority,
            connection_id=self.connection_id,
            connection_id_source=self.connection_id_source,
        )

    def _peer_text(self) -> str:
        """The socket's peer and the connection's id, as this module's log lines name it."""
        return f"{address_text(self.socket_address)} (connection_id={self.connection_id})"

    def _start_mqtt(self, identity: PeerIdentity) -> None:
        listener = self.listener
        broker = listener.broker
        # max_connections is decided when the CONNECT is accepted (admit), not here.
        self.connection = ClientConnection(broker, self, identity, listener.config)
        self.first_data_pending = not listener.config.proxy_protocol
        self._arm(broker.settings.connect_timeout, self._connection_timed_out)

    def _unexpected_proxy_header(self, data: bytes) -> bool:
        """First bytes on a listener without proxy_protocol: a PROXY header is a misconfig."""
        connection = self.connection
        assert connection is not None
        if (
            data
            and data[0] in PROXY_FIRST_BYTES
            and (data.startswith(b"PROXY") or data.startswith(b"\r\n\r\n"))
        ):
            self.listener.broker.counters.proxy_header_unexpected += 1
            self.listener.refused(
                "PROXY protocol header received on a listener without proxy_protocol = true "
                f"from {self._peer_text()} (listener "
                f"{self.listener.config.label}): set proxy_protocol = true or remove "
                "send-proxy on the balancer"
            )
            connection.connection_lost("PROXY header on a plain listener")
            self._close_transport(linger=False)
            return True
        return False


#: The control characters _printable replaces: one str.translate, not a generator over the
#: id's characters (~640 Python opcodes per connection behind lb).
_CONTROL_CHARACTERS = {code: "?" for code in (*range(0x20), 0x7F)}


def _printable(unique_id: bytes) -> str:
    """A PP2_TYPE_UNIQUE_ID for log lines: UTF-8, control characters as '?'."""
    return unique_id.decode("utf-8", "replace").translate(_CONTROL_CHARACTERS)
