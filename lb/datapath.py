"""The data path: one client connection, its TLS engine, and its server connection.

Two `asyncio.Protocol`s per session (uvicorn's shape, no streams): `ClientSide` owns the
accepted socket and, on `bind ... ssl` lines, a pyOpenSSL connection over memory BIOs;
`ServerSide` owns the connection to the chosen server. Flow control is symmetric (STYLE.md
rule 7): when one transport's write buffer passes its high-water mark the other side stops
reading, and resumes when it drains; bytes that arrive before the server is connected are
held up to one buffer, then the client is paused. Half-close is passed on: EOF (or a TLS
close_notify) from the client becomes `write_eof` to the server, which may still answer;
the server's EOF becomes EOF to a plain client, and close_notify then the end of the session
to a TLS client.

The TLS engine is pyOpenSSL rather than the `ssl` module so that a refused handshake can be
explained (see lb.tls); it is driven through lb.tls_io, which holds every use of pyOpenSSL's
internals. Once a TLS 1.3 handshake is done, lb.tls_io.take_over frees OpenSSL's connection
and the session's records go through lb.tls_records (`tls` is then a tls_io.Session).
The steady relay of such a session, a record from the client and the server's answer, has a
short path: `ClientSide.data_received` and `ServerSide.data_received` each do the whole of
their direction when the server is connected and reading the record made nothing else to do
(a KeyUpdate to answer, close_notify), and hand everything else to the general path.
Timeouts are lazy: activity only stamps the time, and a
`TimerWheel` per frontend (one loop timer for the earliest slot of TIMER_RESOLUTION seconds)
checks a session's deadline when its slot comes; a session that was active meanwhile goes
back into a later slot.

Memory per idle session (bench/idle_memory.py) was mostly OpenSSL's (~27 KiB of 35): a
TLS 1.3 session keeps none of it after the handshake (~1 KiB of records state instead). A
session OpenSSL keeps (TLS 1.2) drops what only the handshake needed
(`tls_io.release_handshake_state`), and its memory BIOs are fed and drained one TLS record
(`tls_io.TLS_CHUNK`) at a time.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import select
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from OpenSSL import SSL

from lb import proxyproto, timerwheel, tls_io, tls_records
from lb.limits import RESOURCE_ERRNOS, resource_words
from lb.queue import PendingConnection
from lb.server import QueueFull
from lb.tls import BindContext, VerifyFailure, VerifyState, describe_name, handshake_refusal
from lb.tls_codes import Refusal

if TYPE_CHECKING:
    from lb.frontend import FrontendRuntime
    from lb.heap import HeapTrimmer
    from lb.server import BackendState, ServerState

logger = logging.getLogger(__name__)

#: Bytes handed to the TLS engine at a time, either way (see lb.tls_io).
TLS_CHUNK = tls_io.TLS_CHUNK
#: Granularity of idle timeouts (seconds): a timeout fires at most this late.
TIMER_RESOLUTION = timerwheel.RESOLUTION
#: A timeout that came due while bytes waited unread looks again this much later, once the
#: loop has read them (ClientSide._bytes_waiting).
LATE_GRACE = 1.0


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-frontend settings the data path needs, taken from the config once."""

    timeout_client: float | None
    timeout_server: float | None
    timeout_connect: float | None
    timeout_tunnel: float | None
    retries: int
    buffer_size: int  # 2 x tune.bufsize: write buffer high-water mark and pre-connect hold
    timeout_client_fin: float | None = None  # once a side is half-closed (HAProxy *-fin)
    timeout_server_fin: float | None = None

    # Worked out once (the timeouts of a session's phases, asked at every timer move):
    # timeout tunnel when set, else the shorter of timeout client and timeout server, once
    # both sides are connected; the shorter *-fin timeout once a side is half-closed.
    data_timeout: float | None = field(init=False, default=None)
    fin_timeout: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        data = [t for t in (self.timeout_client, self.timeout_server) if t is not None]
        if self.timeout_tunnel is not None:
            data = [self.timeout_tunnel]
        fin = [t for t in (self.timeout_client_fin, self.timeout_server_fin) if t]
        object.__setattr__(self, "data_timeout", min(data) if data else None)
        object.__setattr__(self, "fin_timeout", min(fin) if fin else None)


#: CPU time per event loop turn given to TLS handshakes (the server's key exchange and
#: signature, the client certificate's verification) when more wait than one turn can take.
HANDSHAKE_TURN_BUDGET = 0.004
#: Bytes a client may send before its handshake's turn comes; past them it goes first.
HELLO_HOLD = TLS_CHUNK


class HandshakeQueue:
    """Where the steps of TLS handshakes wait for their turn, one process's: those of
    handshakes under way first, then new ones, each first come first served, within
    HANDSHAKE_TURN_BUDGET of CPU per loop turn.

    In a reconnect storm thousands of handshakes arrive at once. Run as their bytes came,
    they made loop turns of seconds (uvloop calls every ready socket's callback in one
    turn): a session whose server connection was made in such a turn sent its PROXY
    header seconds later, the broker's 3 s header timeout closed it ("closed before
    CONNACK" on the device, only behind lb), every MQTT CONNECT already through waited as
    long, the devices' timeouts fired and the work was done again (the 20,000-device
    storm: 56,011 handshakes completed and 98,509 attempts, 4.1x HAProxy's time to bring
    them back). Here a turn's I/O callbacks only buffer handshake bytes; the handshakes
    then take at most the budget, so the relaying of established sessions and the
    connects to servers are never held behind them, and a client that gave up while
    waiting (its FIN is read first) costs no handshake. HAProxy does the same with its
    "heavy" tasklet class (TLS handshakes get a bounded share of each turn) and its
    maxpollevents (200 events per poll)."""

    __slots__ = ("due_new", "due_started", "new", "scheduled", "started", "trimmer")

    def __init__(self, trimmer: HeapTrimmer | None = None) -> None:
        self.started: deque[ClientSide] = deque()  # the client's later flights
        self.new: deque[ClientSide] = deque()  # ClientHellos
        self.due_started = 0  # how many at each front have seen one more poll since they came
        self.due_new = 0
        self.scheduled = False
        self.trimmer = trimmer  # told how many steps each turn ran (lb.heap)

    def __len__(self) -> int:
        return len(self.started) + len(self.new)

    def add(self, session: ClientSide, *, new: bool) -> None:
        (self.new if new else self.started).append(session)
        if not self.scheduled:
            self.scheduled = True
            session.loop.call_soon(self._mark, session.loop)

    def _mark(self, loop: asyncio.AbstractEventLoop) -> None:
        # A callback that call_soon schedules from a callback runs in the next turn, after
        # that turn's poll. uvloop reads a ClientHello and the FIN behind it in two polls
        # (a short read ends one), so each step waits for one more poll before its turn:
        # the FIN of a client that gave up closes the session first.
        self.due_started = len(self.started)
        self.due_new = len(self.new)
        loop.call_soon(self._run, loop)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        deadline = time.perf_counter() + HANDSHAKE_TURN_BUDGET
        out_of_time = False
        steps = 0
        for waiting, due in ((self.started, "due_started"), (self.new, "due_new")):
            count = getattr(self, due)
            while count and waiting and not out_of_time:
                count -= 1
                session = waiting.popleft()
                if session.closed:
                    continue
                session.handshake_turn()
                steps += 1
                out_of_time = time.perf_counter() >= deadline
            setattr(self, due, count)
        if steps and self.trimmer is not None:
            self.trimmer.busy(steps)
        if self.started or self.new:
            loop.call_soon(self._mark, loop)
        else:
            self.scheduled = False


class TimerWheel(timerwheel.TimerWheel["ClientSide"]):
    """The idle timeouts of a frontend's sessions (lb.timerwheel: slots of RESOLUTION
    seconds, one loop timer instead of a TimerHandle per session; about 540 B per session
    saved, bench/idle_memory.py). When a slot comes, each of its sessions checks its own
    deadline (`ClientSide.wheel_fired`) and either times out or takes a later slot."""

    __slots__ = ()

    def failed(self, owner: ClientSide) -> None:
        # One session's failure must not stop every later timeout of the frontend.
        logger.exception("%s:%d: idle timeout handling failed", *owner.peer)
        owner.kill("P")


class ClientSide(asyncio.Protocol):
    """One accepted client connection and everything the session logs about it."""

    __slots__ = (
        "accept_date",
        "accept_time",
        "attempt",
        "backend_queue_position",
        "bind_index",
        "bind_name",
        "bytes_in",
        "bytes_out",
        "bytes_received",
        "client_eof",
        "client_write_blocked",
        "closed",
        "connect_task",
        "connect_time",
        "frontend",
        "handshake_done",
        "hello",
        "hello_started",
        "last_activity",
        "limits",
        "loop",
        "paused_by_server",
        "paused_for_pending",
        "peer",
        "pending",
        "pending_size",
        "proxy_decoder",
        "queue_time",
        "queued",
        "reading_paused",
        "retries_done",
        "server",
        "server_eof",
        "server_queue_position",
        "server_side",
        "session_number",
        "slot_server",
        "sock",
        "ssl_info",
        "termination",
        "timers",
        "tls",
        "tls_context",
        "transport",
        "unique_id",
        "verify_state",
        "wheel_slot",
    )

    def __init__(
        self,
        frontend: FrontendRuntime,
        tls_context: BindContext | None,
        bind_name: str,
        bind_index: int,
        accepted_from: tuple[str, int] | None = None,
    ) -> None:
        self.frontend = frontend
        self.bind_name = bind_name
        self.bind_index = bind_index
        self.limits = frontend.limits
        self.loop = frontend.loop
        self.tls_context = tls_context
        # OpenSSL's connection during the handshake (and after it, for TLS 1.2), then a
        # tls_io.Session (TLS 1.3, lb.tls_records); None without TLS.
        self.tls: SSL.Connection | tls_io.Session | None = None
        self.verify_state: VerifyState | None = None
        self.proxy_decoder: proxyproto.ProxyProtocolDecoder | None = None
        self.transport: asyncio.Transport | None = None
        self.server_side: ServerSide | None = None
        self.server: ServerState | None = None
        self.connect_task: asyncio.Task[None] | None = None
        # accept()'s address: a client that resets before connection_made is still named.
        self.peer: tuple[str, int] = (
            (accepted_from[0], accepted_from[1]) if accepted_from else ("-", 0)
        )
        self.sock: tuple[str, int] = ("-", 0)
        # Made when needed (most sessions never do): plaintext held for a server not yet
        # connected (views of decrypted records, lb.tls_records).
        self.pending: list[bytes | memoryview] | None = None
        self.pending_size = 0
        self.paused_by_server = False  # the server's write buffer is full
        self.paused_for_pending = False  # held bytes wait for the server connection
        self.reading_paused = False  # what the client transport was last told
        self.client_write_blocked = False  # the client's write buffer is full
        self.handshake_done = tls_context is None
        self.hello: bytearray | None = None  # handshake bytes waiting for their turn
        self.hello_started = tls_context is None  # the ClientHello was answered
        self.client_eof = False
        self.server_eof = False
        self.closed = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.bytes_received = 0  # raw bytes from the client, TLS records included
        self.retries_done = 0
        self.accept_time = self.loop.time()
        self.accept_date = time.time()
        self.last_activity = self.accept_time
        self.connect_time: float | None = None
        self.queue_time: float | None = 0.0  # None: refused by a full queue (%Tw -1)
        self.queued: PendingConnection | None = None
        self.server_queue_position = 0
        self.backend_queue_position = 0
        self.slot_server: ServerState | None = None  # whose connection slot this holds
        self.attempt = 0  # connect attempts: a late answer to an old one is dropped
        self.termination = "--"
        self.timers = frontend.timers
        self.wheel_slot: int | None = None  # TimerWheel's
        self.ssl_info: proxyproto.SSLInfo | None = None
        self.unique_id: str | None = None  # made when first asked for (FrontendRuntime)
        self.session_number = 0  # %rt

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        if isinstance(peer, tuple):
            self.peer = (peer[0], peer[1])
        if isinstance(sock, tuple):
            self.sock = (sock[0], sock[1])
        transport.set_write_buffer_limits(high=self.limits.buffer_size)
        self.frontend.session_started(self)
        if self.frontend.binds[self.bind_index].accept_proxy:
            if not self.frontend.proxy_sender_trusted(self.bind_index, self.peer[0]):
                # accept-proxy-from: decided before any byte is read, as the brokers do.
                self.frontend.proxy_header_failed(
                    self, "Connection refused: source not in accept-proxy-from"
                )
                self.termination = "PR"
                self._close()
                return
            # The balancer in front (a cloud NLB, another lb) speaks first; TLS comes after.
            self.proxy_decoder = proxyproto.ProxyProtocolDecoder()
        else:
            self._begin()
        self._arm_timer()

    def _begin(self) -> None:
        """Start the client's TLS handshake, or (plain TCP) the connection to a server."""
        if self.tls_context is not None:
            tls = SSL.Connection(self.tls_context.context, None)
            self.verify_state = VerifyState()
            tls.set_app_data(self.verify_state)
            tls.set_accept_state()
            self.tls = tls
        else:
            self._start_connect()

    def _read_proxy_header(self, data: bytes) -> bytes:
        """`bind ... accept-proxy`: take the PROXY header off the front of the stream; its
        addresses become the client's (a LOCAL header keeps the real ones, as HAProxy).
        Returns what followed the header, b"" while it is incomplete."""
        decoder = self.proxy_decoder
        assert decoder is not None
        decoder.feed(data)
        try:
            event = decoder.next_event()
        except proxyproto.ProxyProtocolError as error:
            self.proxy_decoder = None
            message = (
                "Truncated PROXY protocol header received"
                if error.reason == "truncated"
                else "Received something which does not look like a PROXY protocol header"
                if error.reason == "not_proxy"
                else "Received an invalid PROXY protocol header"
            )
            self.frontend.proxy_header_failed(self, f"{message} ({error.message})")
            self.termination = "PR"
            self._close()
            return b""
        if event is proxyproto.NEED_DATA:
            return b""
        assert isinstance(event, proxyproto.ProxyHeader)
        self.proxy_decoder = None
        if not event.is_local and event.source is not None and event.destination is not None:
            self.peer = event.source
            self.sock = event.destination
        self._begin()
        return decoder.trailing_data

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        self.bytes_received += len(data)
        tls = self.tls
        if tls.__class__ is not tls_io.Session:
            self._received(data)
            return
        # The steady relay's short path (a TLS 1.3 session's record from the client, the
        # server connected): `_open` and `_to_server` written out, 4 Python calls a message
        # echoed fewer (bench/README.md). A session past the PROXY header and the handshake
        # (a Session only comes after both), so neither is looked at; whatever else `_open`
        # does is taken from there: no server yet, a KeyUpdate's answer, close_notify.
        try:
            plaintext = tls.open(data)
        except tls_records.TLSRecordError as error:
            self._records_refused(tls, error)
            return
        if plaintext:
            server = self.server_side
            if server is not None and server.transport is not None:
                self.bytes_in += len(plaintext)
                server.transport.write(plaintext)  # may pause us at once (pause_writing)
            else:
                self._to_server(plaintext)
        if tls.output is not None or tls.state:  # state: 0 (OPEN) until close_notify
            self._records_read(tls)

    def _received(self, data: bytes) -> None:
        """`data_received` off the short path: the PROXY header, plain TCP, the TLS
        handshake, and sessions OpenSSL keeps (TLS 1.2)."""
        if self.proxy_decoder is not None:
            data = self._read_proxy_header(data)
            if not data or self.closed:
                return
        tls = self.tls
        if tls is None:
            self._to_server(data)
            return
        if isinstance(tls, tls_io.Session):
            self._open(tls, data)
            return
        if not self.handshake_done:
            held = self.hello
            if held is None:
                self.hello = bytearray(data)
                self.frontend.process.handshakes.add(self, new=not self.hello_started)
            else:
                held += data
                if len(held) > HELLO_HOLD:
                    self.handshake_turn()
            return
        self._tls_received(data)

    def handshake_turn(self) -> None:
        """This handshake's turn (HandshakeQueue): go on with what the client sent."""
        data = self.hello
        self.hello = None
        self.hello_started = True
        if data is not None and not self.closed:
            self._tls_received(bytes(data))

    def _tls_received(self, data: bytes) -> None:
        tls = self.tls
        if isinstance(tls, tls_io.Session):  # taken over while the bytes waited their turn
            self._open(tls, data)
            return
        if tls is None:
            return
        if len(data) <= TLS_CHUNK:
            self._decrypt(tls, data)
            return
        view = memoryview(data)
        for start in range(0, len(data), TLS_CHUNK):
            # TLS_CHUNK at a time: the incoming BIO never grows past it.
            if self.closed:
                return
            if self.tls is not tls:  # taken over (tls_io.take_over): the rest is records
                assert isinstance(self.tls, tls_io.Session)
                self._open(self.tls, view[start:])
                return
            self._decrypt(tls, view[start : start + TLS_CHUNK])

    def _open(self, tls: tls_io.Session, data: bytes | memoryview) -> None:
        """Records from the client once OpenSSL is gone (lb.tls_records)."""
        try:
            plaintext = tls.open(data)
        except tls_records.TLSRecordError as error:
            self._records_refused(tls, error)
            return
        if plaintext:
            self._to_server(plaintext)
        self._records_read(tls)

    def _records_refused(self, tls: tls_io.Session, error: tls_records.TLSRecordError) -> None:
        """The client's records failed (lb.tls_records): what came before the bad one goes
        on, the client gets our alert unless it sent one, and the session ends."""
        if error.plaintext:  # authenticated records before the bad one
            self._to_server(error.plaintext)
        transport = self.transport
        if not error.received and transport is not None and not self.closed:
            transport.write(tls.alert(error.alert))
        self._abort("CD", f"TLS error from client: {error.message}")

    def _records_read(self, tls: tls_io.Session) -> None:
        """After the client's records: what reading them made to send, and close_notify."""
        output = tls.take_output()  # the answer to a KeyUpdate that asked for one
        if output and self.transport is not None:
            self.transport.write(output)
        if tls.peer_closed and not self.client_eof:  # close_notify
            self._client_done()

    def _decrypt(self, tls: SSL.Connection, data: bytes | memoryview) -> None:
        tls_io.feed(tls, data)
        if not self.handshake_done:
            try:
                done = tls_io.handshake(tls)
            except SSL.Error as error:
                self._flush_tls()
                self._handshake_failed(error)
                return
            except Exception as error:
                # A verify, SNI, ALPN or OCSP callback raised (pyOpenSSL re-raises it here):
                # this session is refused and explained, the others go on.
                logger.exception("%s:%d: TLS handshake callback failed", *self.peer)
                self.frontend.handshake_failed(
                    self, Refusal.INTERNAL_ERROR, f"internal error in the TLS handshake ({error!r})"
                )
                self.termination = "PR"
                self._close()
                return
            if not done:
                self._flush_tls()
                return
            self._handshake_complete(tls)
            if self.closed or self.tls is not tls:  # refused after all, or taken over
                return
        while True:
            try:
                plaintext = tls_io.read(tls)
            except SSL.ZeroReturnError:  # close_notify: the client is done sending
                self._client_done()
                break
            except SSL.Error as error:
                self._abort("CD", f"TLS error from client: {handshake_refusal(error)[1]}")
                return
            if not plaintext:
                break
            self._to_server(plaintext)
        self._flush_tls()

    def eof_received(self) -> bool:
        self.last_activity = self.loop.time()
        if self.proxy_decoder is not None:
            self.frontend.proxy_header_failed(
                self, "Connection closed while waiting for PROXY protocol header"
            )
            self.termination = "CR"
            self._close()
            return False
        if not self.handshake_done:
            self._handshake_failed(None)
            return False
        self._client_done()
        return True

    def pause_writing(self) -> None:
        self.client_write_blocked = True
        server = self.server_side
        if server is not None and server.transport is not None:
            server.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client_write_blocked = False
        server = self.server_side
        if server is not None and server.transport is not None and not server.closed:
            server.transport.resume_reading()

    def update_reading(self) -> None:
        """Read from the client unless the server is congested or bytes are held for a
        server not yet connected (STYLE rule 7: one place decides, both reasons count)."""
        transport = self.transport
        if transport is None or self.closed:
            return
        pause = self.paused_by_server or self.paused_for_pending
        if pause != self.reading_paused:
            self.reading_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        if exc is not None and self.termination == "--":
            self.termination = "CD" if self.handshake_done else "CR"
        if self.tls is not None and not self.handshake_done:
            # A client that resets (or whose FIN races our ServerHello into EPIPE) during
            # the handshake: HAProxy 2.6 logs "fe/1: SSL handshake failure"; so do we, in words.
            self._handshake_failed(None, lost=exc)
            return
        self._finish()

    # -- TLS -------------------------------------------------------------------------------

    def _flush_tls(self) -> None:
        tls = self.tls
        transport = self.transport
        if tls is None or transport is None:
            return
        output = tls.take_output() if isinstance(tls, tls_io.Session) else tls_io.take_output(tls)
        if output:
            transport.write(output)

    def _handshake_complete(self, tls: SSL.Connection) -> None:
        self.handshake_done = True
        # What the completing step wrote: the NewSessionTickets, sealed with the server's
        # application secret (take_over counts them).
        tickets = tls_io.take_output(tls)
        if tickets and self.transport is not None:
            self.transport.write(tickets)
        info = self.ssl_info = tls_io.session_info(tls)
        context = self.tls_context
        if (
            info.certificate_resumed
            and context is not None
            and context.crls
            and self._refuse_revoked_resumption(tls)
        ):
            return
        session = self._release_handshake_state(tls, tickets)
        self.frontend.handshake_completed(self)
        self._start_connect()
        if session is not None:
            session_records, unread = session
            if unread:  # what the client sent right behind its Finished
                self._open(session_records, unread)

    def _refuse_revoked_resumption(self, tls: SSL.Connection) -> bool:
        """A resumed session skips certificate verification: a device revoked by a CRL loaded
        since its first handshake must not come back with its ticket or session id.
        (Stricter than HAProxy, which does not look again.)"""
        context = self.tls_context
        certificate = tls.get_peer_certificate(as_cryptography=True)
        if context is None or certificate is None:
            return False
        failure = context.revoked_leaf_failure(certificate)
        if failure is None:
            return False
        self._refuse_certificate(failure, " (resumed session)")
        return True

    def _release_handshake_state(
        self, tls: SSL.Connection, tickets: bytes
    ) -> tuple[tls_io.Session, bytes] | None:
        """Drop what only the handshake needed: the verify record here, and OpenSSL's whole
        connection for TLS 1.3 (tls_io.take_over: `tls` becomes a Session, returned with the
        client's bytes OpenSSL had not read), or else the engine's handshake state
        (tls_io.release_handshake_state); an idle session keeps the rest for days."""
        state = self.verify_state
        self.verify_state = None
        tls.set_app_data(None)
        context = self.tls_context
        taken = None
        if state is not None and context is not None:
            taken = tls_io.take_over(
                tls,
                tickets,
                state.client_secret,
                state.server_secret,
                context.served_algorithms(tls),
            )
        if taken is None:
            tls_io.release_handshake_state(tls)
            return None
        self.tls = taken[0]  # the last reference to `tls` goes with this call: SSL_free
        return taken

    def _handshake_failed(self, error: SSL.Error | None, lost: Exception | None = None) -> None:
        """Refuse and explain: the certificate's failure if the verification found one, else
        the TLS error, else how the client left (`lost`: the error that ended the socket)."""
        state = self.verify_state
        failure = state.failure if state is not None else None
        if failure is not None:
            self._refuse_certificate(failure)
            return
        if error is None and lost is not None:
            refusal = Refusal.CLIENT_CLOSED
            words = lost.strerror if isinstance(lost, OSError) and lost.strerror else str(lost)
            reason = f"connection reset by the client during the TLS handshake ({words})"
        elif error is None:
            refusal, reason = Refusal.CLIENT_CLOSED, "connection closed during the TLS handshake"
        else:
            refusal, reason = handshake_refusal(error)
        self.frontend.handshake_failed(self, refusal, reason)
        self.termination = "CR"
        self._close()

    def _refuse_certificate(self, failure: VerifyFailure, note: str = "") -> None:
        """Refuse the handshake for a certificate: its refusal, explained, with its names."""
        assert self.tls_context is not None
        reason = self.tls_context.explain(failure)
        detail = (
            f' subject="{describe_name(failure.subject)}" issuer="{describe_name(failure.issuer)}"'
        )
        self.frontend.handshake_failed(self, failure.refusal, f"{reason}{note}{detail}")
        self.termination = "CR"
        self._close()

    # -- towards the server ------------------------------------------------------------

    def _to_server(self, data: bytes | memoryview) -> None:
        self.bytes_in += len(data)
        server = self.server_side
        if server is not None and server.transport is not None:
            server.transport.write(data)
            return
        if self.pending is None:
            self.pending = []
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size >= self.limits.buffer_size and not self.paused_for_pending:
            self.paused_for_pending = True
            self.update_reading()

    def _client_done(self) -> None:
        self.client_eof = True
        self._rearm_timer()
        server = self.server_side
        if server is not None and server.transport is not None:
            if not server.transport.is_closing():  # closing: its connection_lost follows
                server.transport.write_eof()
            if self.server_eof:
                self._close()

    def _start_connect(self) -> None:
        self.connect_task = self.loop.create_task(self._connect_then_forget())

    async def _connect_then_forget(self) -> None:
        try:
            await self._connect()
        finally:
            # A finished task and its coroutine kept for the session's life: ~640 B.
            self.connect_task = None

    async def _connect(self) -> None:
        """Choose a server, wait for a slot when it is full, connect, retry on failure.

        Retries (`retries`) follow BackendState.redispatch_on_retry: after a timeout the same
        server again (HAProxy), after a refusal or when the server is down another one (lb),
        and as `option redispatch` allows. The session keeps its slot while it retries the
        same server; a server that failed is not chosen again while another one can be.
        """
        limits = self.limits
        backend = self.frontend.backend
        key = self._balance_key(backend)
        failed: set[str] = set()
        retries_left = limits.retries
        server: ServerState | None = None
        last_error = "no server available"
        resource_deadline: float | None = None  # waiting for a file, until this time
        while True:
            if server is None:
                server = await self._take_slot(backend, key, failed)
                if server is None:
                    return
            self.server = server
            self.attempt += 1
            started = self.loop.time()
            try:
                # asyncio.timeout cancels this task at the deadline; wait_for ran the
                # connect in a task of its own (one task and one future less per session).
                async with asyncio.timeout(limits.timeout_connect):
                    _, server_side = await self.loop.create_connection(
                        functools.partial(ServerSide, self, server, self.attempt),
                        server.host,
                        server.port or self.sock[1],
                    )
            except (OSError, TimeoutError) as error:
                self.attempt += 1  # whatever this attempt still produces is stale
                if isinstance(error, OSError) and error.errno in RESOURCE_ERRNOS:
                    # Out of files or memory here: no server is to blame and none would do
                    # better. Accepts pause (lb.frontend) and this session, its handshake
                    # done, waits for a session to end and tries the same server again.
                    process = self.frontend.process
                    process.out_of_resources(
                        error,
                        f"backend {backend.name}: connect to {server.name}",
                        session_held=True,
                    )
                    if resource_deadline is None:
                        resource_deadline = started + (limits.timeout_connect or 5.0)
                    remaining = resource_deadline - self.loop.time()
                    if remaining > 0:
                        await process.files_freed(remaining)
                        if not self.closed:
                            continue
                    if self.closed:
                        return
                    self._release_slot(failed=False)
                    last_error = resource_words(error.errno)
                    self.termination = "SC"
                    break
                timed_out = isinstance(error, TimeoutError)
                last_error = "connection timeout" if timed_out else _error_words(error)
                self.termination = "sC" if timed_out else "SC"
                failed.add(server.name)
                if retries_left == 0:
                    self._release_slot(failed=True)
                    break
                retries_left -= 1
                self.retries_done += 1
                if backend.redispatch_on_retry(server, self.retries_done, timed_out=timed_out):
                    self._release_slot(failed=True)
                    server = None
                else:
                    server.connect_failed()
                continue
            if self.closed:  # the client left (or the server hung up) while we were connecting
                if server_side.transport is not None:
                    server_side.transport.close()
                return
            # Adopted only now, not in ServerSide.connection_made: the timeout can still
            # cancel this task after connection_made and before it resumes, and uvloop then
            # closes that transport without a connection_lost; a server side adopted there
            # held the client's first bytes and was written to once closed ("the handler is
            # closed", seen at EMFILE in the fleet run; tests/test_lb_races.py).
            self.server_connected(server_side)
            self.connect_time = self.loop.time() - started
            self.termination = "--"
            return
        if self.closed:
            return
        self.server = None
        if self.termination == "--":
            self.termination = "SC"
        self.frontend.no_server(self, last_error)
        self._close()

    def _balance_key(self, backend: BackendState) -> bytes | None:
        """The key of hashing algorithms: the packed client address (`balance source`,
        `balance hash src`: the sample as binary, 4 or 16 bytes), the client certificate's
        first CN (`balance hash ssl_c_s_dn(cn)`: its UTF-8 bytes). None when the session
        has no such sample (no TLS or no certificate): the next server in turn, as HAProxy."""
        if not backend.hashed:
            return b""
        if backend.config.hash_expr == "ssl_c_s_dn(cn)":
            cn = self.ssl_info.cn if self.ssl_info is not None else None
            return cn.encode() if cn is not None else None
        address = self.peer[0]
        try:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            return socket.inet_pton(family, address)
        except OSError:
            return b""

    async def _take_slot(
        self, backend: BackendState, key: bytes | None, failed: set[str]
    ) -> ServerState | None:
        """A server whose slot this session now holds, after waiting in a queue if need be;
        None when the session was closed instead (no server, full queue, timeout queue)."""
        loop = self.loop
        future: asyncio.Future[ServerState] = loop.create_future()

        def granted(server: ServerState) -> None:
            self.slot_server = server
            if not future.done():
                future.set_result(server)

        outcome = backend.assign(key, frozenset(failed), granted)
        if outcome is None and failed:
            # Every server failed once: like HAProxy, try again from the start.
            failed.clear()
            outcome = backend.assign(key, frozenset(), granted)
        if outcome is None:
            if self.termination == "--":
                self.termination = "SC"
            self.frontend.no_server(self, "no server available")
            self._close()
            return None
        if isinstance(outcome, QueueFull):
            self.server = outcome.server
            self.queue_time = None
            self.termination = "SQ"
            self._close()
            return None
        if not isinstance(outcome, PendingConnection):
            self.slot_server = outcome
            return outcome
        self.queued = outcome
        outcome.enqueued_at = loop.time()
        queue_server = outcome.server
        try:
            server = await asyncio.wait_for(future, backend.queue_timeout)
        except TimeoutError:
            if outcome.granted is None:
                backend.abandon(outcome)
                self._left_queue(outcome)
                self.server = queue_server
                self.termination = "sQ"
                self._close()
                return None
            server = outcome.granted
        except asyncio.CancelledError:
            if outcome.granted is None:
                backend.abandon(outcome)
            self._left_queue(outcome)
            raise
        self._left_queue(outcome)
        return server

    def _left_queue(self, pending: PendingConnection) -> None:
        if self.queued is not pending:
            return
        self.queued = None
        self.queue_time = (self.queue_time or 0.0) + self.loop.time() - pending.enqueued_at
        self.server_queue_position = pending.server_queue_position
        self.backend_queue_position = pending.backend_queue_position

    def _release_slot(self, *, failed: bool) -> None:
        """Give the server slot back (once), which may let a queued connection in."""
        server = self.slot_server
        if server is not None:
            self.slot_server = None
            server.sessions.discard(self)
            server.connection_ended(failed=failed)

    def server_connected(self, server_side: ServerSide) -> None:
        """The server accepted: send the PROXY header and what the client sent meanwhile."""
        self.server_side = server_side
        transport = server_side.transport
        assert transport is not None
        server = server_side.server
        server.sessions.add(self)  # for on-marked-down shutdown-sessions and the like
        head = self.frontend.proxy_header_for(self, server)
        parts: list[bytes | memoryview] = [head] if head else []
        if self.pending:
            parts.extend(self.pending)
        self.pending = None
        self.pending_size = 0
        if self.client_write_blocked:  # the client was not reading before the server came
            transport.pause_reading()
        if parts:
            transport.write(b"".join(parts))  # may pause us at once (pause_writing)
        self.paused_for_pending = False
        self.update_reading()
        if self.client_eof and transport.can_write_eof():
            transport.write_eof()
        self._rearm_timer()  # the data phase has timeouts of its own

    # -- from the server -----------------------------------------------------------------

    def from_server(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        self.bytes_out += len(data)
        tls = self.tls
        transport = self.transport
        if transport is None or self.closed:
            return
        if tls is None:
            transport.write(data)
            return
        if isinstance(tls, tls_io.Session):
            transport.write(tls.seal(data))
            return
        output = tls_io.encrypt(tls, data)  # one transport write for all of it
        if output:
            transport.write(output)

    def server_done(self) -> None:
        """The server sent EOF: pass it on; close when both directions are done. A TLS
        client gets close_notify and the session ends (no TLS half-close towards devices)."""
        self.server_eof = True
        self._rearm_timer()
        transport = self.transport
        if transport is None or self.closed:
            return
        tls = self.tls
        if isinstance(tls, tls_io.Session):
            transport.write(tls.close_notify())
        elif tls is not None:
            try:
                tls.shutdown()
            except SSL.Error:
                pass
            self._flush_tls()
        if self.client_eof or tls is not None:
            self._close()
        elif transport.can_write_eof():
            transport.write_eof()

    def server_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.termination == "--":
            self.termination = "SD"
        if not self.closed:
            self.server_eof = True
            self._close()

    # -- timers and the end ----------------------------------------------------------------

    def _idle_timeout(self) -> float | None:
        limits = self.limits
        if not self.handshake_done or self.server_side is None:
            return limits.timeout_client
        if (self.client_eof or self.server_eof) and limits.fin_timeout is not None:
            return limits.fin_timeout
        return limits.data_timeout

    def _since(self) -> float:
        """Where the current timeout counts from. A handshake (the PROXY header, the TLS
        handshake) must be over within timeout client of the accept, as in HAProxy 2.6: a
        peer that trickles a byte now and then does not hold it open. After the handshake
        the timeouts are inactivity timeouts."""
        if not self.handshake_done or self.proxy_decoder is not None:
            return self.accept_time
        return self.last_activity

    def _arm_timer(self) -> None:
        """Put the session in the wheel at its phase's timeout (moving its entry), or take
        it out when the phase has none."""
        timeout = self._idle_timeout()
        if timeout is None:
            self.timers.discard(self)
        else:
            self.timers.add(self, self._since() + timeout)

    def _rearm_timer(self) -> None:
        """The session entered a phase with another timeout (data, half-closed)."""
        if not self.closed:
            self._arm_timer()

    def wheel_fired(self) -> None:
        """This session's slot of the TimerWheel came: time out, or take a later slot."""
        if self.closed:
            return
        timeout = self._idle_timeout()
        if timeout is None:
            return
        deadline = self._since() + timeout
        now = self.loop.time()
        if now < deadline:
            self.timers.add(self, deadline)
            return
        if self.server_side is not None and self._bytes_waiting():
            # Late, not idle: the loop ran this timer before it read what came meanwhile.
            self.timers.add(self, now + LATE_GRACE)
            return
        limits = self.limits
        if self.proxy_decoder is not None:
            self.frontend.proxy_header_failed(
                self, "Timeout while waiting for PROXY protocol header"
            )
            self.termination = "cR"
        elif not self.handshake_done:
            self.frontend.handshake_failed(
                self, Refusal.TIMEOUT, "timeout during the TLS handshake"
            )
            self.termination = "cR"
        elif self.server_side is None:
            self.termination = "cC"
        elif limits.timeout_server is not None and timeout == limits.timeout_server:
            self.termination = "sD"
        else:
            self.termination = "cD"
        self._close()

    def _bytes_waiting(self) -> bool:
        """Either side's socket has bytes (or an EOF) that lb has not read yet.

        libuv runs expired timers before it polls for I/O, so after a stall of the loop in
        an I/O callback (a loaded machine) a session whose peer spoke in time would be
        closed as idle, its bytes unread (tests/test_lb_races.py): a device sending PINGREQ
        every 45 s against 60 s timeouts lost its session to a 15 s stall. Asked only when
        a timeout is due (one poll). A side lb does not read now (the other side is
        congested) or whose EOF it has read does not count: what it has waits for the other
        side, which is what the timeout is about."""
        server = self.server_side
        sides = (
            self.transport if not (self.reading_paused or self.client_eof) else None,
            server.transport
            if server is not None and not (self.client_write_blocked or self.server_eof)
            else None,
        )
        poller = select.poll()  # not select(): a worker's descriptors pass 1024
        for side in sides:
            sock = side.get_extra_info("socket") if side is not None else None
            if sock is not None and sock.fileno() >= 0:
                poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    def kill(self, cause: str) -> None:
        """Close the session from inside lb (cause "K": killed, e.g. hard stop or a revoked
        certificate); the second letter of the termination state says where it was."""
        if self.closed:
            return
        phase = "D" if self.server_side is not None else "C" if self.handshake_done else "R"
        self.termination = cause + phase
        self._close()

    def _abort(self, termination: str, reason: str) -> None:
        self.termination = termination
        logger.info("%s:%d %s", self.peer[0], self.peer[1], reason)
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        if self.transport is not None:
            self.transport.close()
        server = self.server_side
        if server is not None and server.transport is not None:
            server.transport.close()
        self._finish()

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.timers.discard(self)
        if isinstance(self.tls, tls_io.Session):
            self.tls.release()  # its cipher objects now, not when they age out
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        queued = self.queued
        if queued is not None:
            if queued.granted is None:
                # Now, before a slot can be granted to it; logged as a client abort ("CQ").
                self.frontend.backend.abandon(queued)
                if self.termination == "--":
                    self.termination = "CQ"
            self._left_queue(queued)
        server = self.server_side
        if server is not None and server.transport is not None:
            server.transport.close()
        self.frontend.session_ended(self)
        self._release_slot(failed=False)


class ServerSide(asyncio.Protocol):
    """The connection to the chosen server; relays to its ClientSide."""

    __slots__ = ("attempt", "client", "closed", "server", "stale", "transport")

    def __init__(self, client: ClientSide, server: ServerState, attempt: int = 0) -> None:
        self.client = client
        self.server = server
        self.attempt = attempt
        self.stale = False  # the connect attempt it answers was given up (timeout)
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=self.client.limits.buffer_size)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self.attempt != self.client.attempt:
            self.stale = True
            transport.close()
            return
        if self.client.closed:
            transport.close()
            return

    def data_received(self, data: bytes) -> None:
        client = self.client
        tls = client.tls
        if tls.__class__ is not tls_io.Session:
            client.from_server(data)
            return
        # The steady relay's short path, a TLS 1.3 session: ClientSide.from_server written
        # out (one Python call a message fewer), in its order.
        client.last_activity = client.loop.time()
        client.bytes_out += len(data)
        transport = client.transport
        if transport is not None and not client.closed:
            transport.write(tls.seal(data))  # may pause this side (ClientSide.pause_writing)

    def eof_received(self) -> bool:
        self.client.server_done()
        return True

    def pause_writing(self) -> None:
        self.client.paused_by_server = True
        self.client.update_reading()

    def resume_writing(self) -> None:
        self.client.paused_by_server = False
        self.client.update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.stale or self.attempt != self.client.attempt:
            return  # an attempt the session gave up (timeout): it holds nothing
        self.client._release_slot(failed=False)
        self.client.server_lost(exc)


def _error_words(error: OSError) -> str:
    """'Connection refused' rather than asyncio's 'Connect call failed (...)'."""
    return os.strerror(error.errno) if error.errno else str(error)
