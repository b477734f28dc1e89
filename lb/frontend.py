"""Frontends at run time: listening sockets, the accept loop and maxconn, session bookkeeping.

A `Listener` accepts by itself (a reader callback on the listening socket) instead of
`loop.create_server`, so that it can stop accepting when `maxconn` is reached: connections
beyond it wait in the kernel's accept backlog, as with HAProxy, and none is refused. Each
accepted socket gets a `ClientSide` (lb.datapath). The `FrontendRuntime` answers what the data
path asks once per session: the PROXY header for a server, the SSL details of a handshake,
and where log lines go.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import secrets
import socket
import time
from typing import TYPE_CHECKING

from lb import proxyproto, tls_io
from lb.config.model import Bind, Frontend, Global, Server
from lb.counters import FrontendCounters, ProcessCounters
from lb.datapath import ClientSide, HandshakeQueue, Limits, TimerWheel
from lb.event_rate import EventRate, RateWindow, own_windows
from lb.heap import HeapTrimmer
from lb.limits import RESOURCE_ERRNOS, resource_words
from lb.log import (
    ERROR_LINE_BURST,
    ERROR_LINE_RATE,
    TCPLOG,
    LogFormat,
    RateLimiter,
    SessionRecord,
    TrafficLog,
    connection_error_log,
    format_connection_error,
)
from lb.proxy_hmac import HeaderKeys
from lb.ratelimit import Burst, SuppressedLines
from lb.shared_counts import POLL_INTERVAL, SharedCount
from lb.tls import BindContext, bind_tls
from lb.tls_codes import Refusal

if TYPE_CHECKING:
    from lb.server import BackendState, ServerState

logger = logging.getLogger(__name__)

#: Connections accepted per readiness callback before yielding to the loop.
ACCEPT_BATCH = 32
#: listen(2) backlog: HAProxy uses the frontend maxconn; the kernel caps it at somaxconn.
DEFAULT_BACKLOG = 4096
#: After EMFILE/ENFILE (or no buffer memory), how long the process holds no more sessions
#: than it had when it ran out; a later error renews it (HAProxy retries its listeners
#: after 100 ms; lb takes that long to probe again, one session each time).
RESOURCE_BACKOFF = 1.0
#: A run of pauses for an accept rate limit (`maxsslrate`...) is over after this long
#: without one: its closing log line then says how many there were.
RATE_BURST_QUIET = 10.0
#: While a listener accepts, its rates are read (for their maxima) at most this often.
RATE_SAMPLE_INTERVAL = 0.1


class ProcessLimit:
    """Global `maxconn`: every listener of the process stops accepting at the limit, and
    while the process is out of files or memory. `maxconn` here is what this process may
    hold (lb.limits: the configured maxconn within what its files allow); with several
    workers, `shared` is the count of every worker's sessions that the configured maxconn
    bounds (lb.shared_counts).

    Out of files (EMFILE/ENFILE at accept or at a server connect, which lb.limits' sizing
    makes rare: files held by what is not a session, a system-wide limit), the process
    learns what it can hold: no more sessions than it had then (one fewer when a session
    failed for want of its server-side socket), for RESOURCE_BACKOFF after the last such
    error. Accepts pause and resume as sessions end under that cap, so a session is
    accepted only when the files it needs are free (accepting at once, the freed file went
    to a session that then failed to reach its server, over and over), with no spinning;
    a session whose server connect found no file waits for one (`files_freed`, within
    `timeout connect`) rather than being dropped after its handshake. One line when such a
    burst starts and one when it is over, with the count (the fleet run logged 80,835 lines
    in 180 s)."""

    def __init__(self, maxconn: int | None, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.maxconn = maxconn
        self.loop = loop
        self.shared: SharedCount | None = None
        self.polling: asyncio.TimerHandle | None = None  # looking at shared counts again
        self.current = 0
        self.total = 0
        self.listeners: list[Listener] = []
        self.cap: int | None = None  # sessions this process can hold now (out of files)
        self.cap_until = 0.0
        self.expiry: asyncio.TimerHandle | None = None
        self.burst_errors = 0  # resource errors since the burst began
        self.burst_started = 0.0
        self.resource_errors = 0  # all of them, counted (show activity)
        self.file_waiters: list[asyncio.Future[None]] = []  # connects waiting for a file
        # TLS handshake steps waiting for their turn; after a burst of them, the heap trim.
        self.handshakes = HandshakeQueue(HeapTrimmer(loop) if loop is not None else None)
        # Accepts per second of every listener (maxconnrate/maxsessrate) and of the SSL
        # ones (maxsslrate), over every worker: lb.process.Runtime sets them.
        self.conn_rate: EventRate | None = None
        self.ssl_rate: EventRate | None = None
        self.rate_pauses = 0  # listener pauses for an accept rate limit, counted
        # A run of such pauses per limit (by its label).
        self.rate_bursts: dict[str, Burst] = {}

    def _own_room(self) -> bool:
        """Room in this process: below its maxconn and, out of files, below its cap."""
        if self.cap is not None and self.current >= self.cap:
            return False
        return self.maxconn is None or self.current < self.maxconn

    def has_room(self) -> bool:
        return self._own_room() and (self.shared is None or self.shared.has_room())

    def try_acquire(self) -> bool:
        """Take a place for a connection about to be accepted, if there is one."""
        if not self._own_room():
            return False
        if self.shared is not None and not self.shared.try_add():
            return False
        self.current += 1
        self.total += 1
        return True

    def cancel(self) -> None:
        """Give back a place taken for an accept that brought no connection."""
        self.current -= 1
        self.total -= 1
        if self.shared is not None:
            self.shared.remove()

    def release(self) -> None:
        self.current -= 1
        if self.shared is not None:
            self.shared.remove()
        waiters, self.file_waiters = self.file_waiters, []
        for waiter in waiters:  # a session's files are free: the waiting connects try again
            if not waiter.done():
                waiter.set_result(None)
        self._resume_all()

    async def files_freed(self, seconds: float) -> None:
        """Wait until a session ends (freeing its files), at most `seconds`."""
        assert self.loop is not None
        waiter = self.loop.create_future()
        self.file_waiters.append(waiter)
        try:
            async with asyncio.timeout(seconds):
                await waiter
        except TimeoutError:
            pass
        finally:
            if waiter in self.file_waiters:
                self.file_waiters.remove(waiter)

    def _resume_all(self) -> None:
        for listener in self.listeners:
            listener.maybe_resume()

    def poll_shared(self) -> None:
        """A listener paused: with counts shared with other workers, whose sessions end
        without telling this one, look again every POLL_INTERVAL while any listener waits."""
        if self.polling is not None or self.loop is None:
            return
        if self.shared is None and not any(listener.frontend.shared for listener in self.listeners):
            return
        self.polling = self.loop.call_later(POLL_INTERVAL, self._poll)

    def _poll(self) -> None:
        self.polling = None
        self._resume_all()
        if any(not listener.accepting and not listener.closed for listener in self.listeners):
            self.poll_shared()

    def _now(self) -> float:
        return self.loop.time() if self.loop is not None else 0.0

    def out_of_resources(self, error: OSError, where: str, *, session_held: bool) -> None:
        """accept() (`session_held` False) or a session's server connect (True: that
        session is still counted) failed for want of files or memory: hold no more
        sessions than now, count it, say so once per burst."""
        self.resource_errors += 1
        self.burst_errors += 1
        cap = max(self.current - (1 if session_held else 0), 0)
        self.cap = cap if self.cap is None else min(self.cap, cap)
        self.cap_until = self._now() + RESOURCE_BACKOFF
        if self.burst_errors == 1:
            self.burst_started = self._now()
            logger.warning(
                "%s: %s (%s) with %d sessions (maxconn %s): no new session until one "
                "ends, for %.0fs after the last such error; connections wait in the "
                "kernel's queue",
                where,
                resource_words(error.errno),
                error.strerror,
                self.current,
                self.maxconn if self.maxconn is not None else "unset",
                RESOURCE_BACKOFF,
            )
        for listener in self.listeners:
            listener.pause()
        if self.expiry is None and self.loop is not None:
            self.expiry = self.loop.call_at(self.cap_until, self._expire)

    def rate_paused(self, limit: EventRate) -> None:
        """A listener paused for an accept rate limit: counted, and one line when a run of
        such pauses begins and one when it is over (none for RATE_BURST_QUIET), however
        long the storm."""
        self.rate_pauses += 1
        burst = self.rate_bursts.get(limit.label)
        if burst is None:
            label = limit.label

            def over(pauses: int, seconds: float) -> None:
                logger.warning(
                    "%s: accepts paused %d times over %.1fs, none in the last %.0fs",
                    label,
                    pauses,
                    seconds,
                    RATE_BURST_QUIET,
                )

            burst = self.rate_bursts[label] = Burst(
                RATE_BURST_QUIET,
                self._now,
                None if self.loop is None else self.loop.call_later,
                over,
            )
        if burst.add():
            logger.warning(
                "%s reached: accepts pause until the rate falls below it; connections wait "
                "in the kernel's queue",
                limit.label,
            )

    def _expire(self) -> None:
        self.expiry = None
        assert self.loop is not None
        if self._now() < self.cap_until:  # renewed meanwhile
            self.expiry = self.loop.call_at(self.cap_until, self._expire)
            return
        logger.warning(
            "%d accepts or connects failed for want of files or memory over %.1fs, none in "
            "the last %.0fs (%d sessions now): accepting up to maxconn again",
            self.burst_errors,
            self.cap_until - RESOURCE_BACKOFF - self.burst_started,
            RESOURCE_BACKOFF,
            self.current,
        )
        self.cap = None
        self.burst_errors = 0
        self._resume_all()


class Listener:
    """One bind line's listening socket and its accept loop."""

    def __init__(
        self,
        frontend: FrontendRuntime,
        bind: Bind,
        context: BindContext | None,
        *,
        reuse_port: bool = False,
        sock: socket.socket | None = None,
    ) -> None:
        self.frontend = frontend
        self.bind = bind
        self.context = context
        self.loop = frontend.loop
        self.accepting = False
        self.closed = False
        if sock is None:
            sock = open_listening_socket(bind, reuse_port=reuse_port)
        self.sock = sock
        self.address = sock.getsockname()
        self.index = frontend.binds.index(bind)
        self.name = bind.name or str(self.index + 1)
        # This listener's accepts per second, and the rate limits that apply to it.
        self.window: RateWindow = frontend.bind_windows[self.index]
        self.rates = frontend.rates(self.index)
        self.rate_limits = tuple(rate for rate in self.rates if rate.limit is not None)
        self.rate_wait: asyncio.TimerHandle | None = None  # paused for a rate limit
        self.sample_at = 0.0  # when the rates are next read for their maxima

    def start(self) -> None:
        self.maybe_resume()

    def maybe_resume(self) -> None:
        if self.closed or self.accepting or self.rate_wait is not None:
            return
        if not self.frontend.has_room():
            return
        self.accepting = True
        self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def pause(self) -> None:
        if self.accepting:
            self.accepting = False
            self.loop.remove_reader(self.sock.fileno())

    def close(self) -> None:
        self.pause()
        self.closed = True
        if self.rate_wait is not None:
            self.rate_wait.cancel()
            self.rate_wait = None
        self.sock.close()

    def _rate_budget(self) -> int:
        """How many connections the accept rate limits let this listener take now (HAProxy's
        listener_accept: max_accept lowered to what each limit leaves). At 0 the listener
        pauses until the rate has fallen enough (lb.event_rate.EventRate.delay): the
        connections wait in the kernel's queue, none is refused."""
        now = time.monotonic()
        budget = ACCEPT_BATCH
        for limit in self.rate_limits:
            remain = limit.remain(now)
            if remain == 0:
                self.pause()
                self.rate_wait = self.loop.call_later(limit.delay(now), self._rate_waited)
                self.frontend.process.rate_paused(limit)
                return 0
            budget = min(budget, remain)
        return budget

    def _rate_waited(self) -> None:
        self.rate_wait = None
        self.maybe_resume()

    def _on_readable(self) -> None:
        frontend = self.frontend
        batch = self._rate_budget() if self.rate_limits else ACCEPT_BATCH
        window = self.window
        now = 0.0
        for _ in range(batch):
            # A place first, then accept() (HAProxy's listener_accept): with workers
            # sharing maxconn, checking and then counting would let two of them take the
            # last place.
            if not frontend.try_reserve():
                self.pause()
                frontend.process.poll_shared()
                return
            try:
                connection, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                frontend.cancel_reserve()
                return
            except OSError as error:
                frontend.cancel_reserve()
                if error.errno in RESOURCE_ERRNOS:
                    self.frontend.process.out_of_resources(
                        error, f"frontend {self.frontend.name}: accept", session_held=False
                    )
                    return
                if error.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            now = time.monotonic()
            window.add(now)
            connection.setblocking(False)
            self.loop.create_task(self._adopt(connection, address))
        if now >= self.sample_at:  # (and something was accepted)
            self.sample_at = now + RATE_SAMPLE_INTERVAL
            for rate in self.rates:
                rate.rate(now)  # keeps its largest reading (MaxConnRate, rate_max)

    async def _adopt(self, connection: socket.socket, address: tuple[str, int]) -> None:
        context = self.context
        frontend = self.frontend
        name, index = self.name, self.index
        try:
            await self.loop.connect_accepted_socket(
                lambda: ClientSide(frontend, context, name, index, address), connection
            )
        except OSError as error:
            logger.info("frontend %s: accepted connection lost: %s", frontend.name, error)
            frontend.unreserve()
            connection.close()


def open_listening_socket(bind: Bind, *, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if bind.family == "ipv6" else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((bind.host, bind.port))
        sock.listen(min(bind.maxconn or DEFAULT_BACKLOG, DEFAULT_BACKLOG))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class FrontendRuntime:
    """A frontend while lb runs: its listeners, counters and per-session decisions."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        config: Frontend,
        global_: Global,
        backend: BackendState,
        process: ProcessLimit,
        log: TrafficLog,
        retries: int,
        counters: ProcessCounters | None = None,
        key_files: HeaderKeys | None = None,
    ) -> None:
        self.loop = loop
        self.config: Frontend = config
        self.name: str = config.name
        self.binds = config.binds
        self.backend = backend
        self.process = process
        self.log = log
        self.tcplog = config.option.tcplog
        # log-format wins over option tcplog, as in HAProxy; neither: no session lines.
        self.log_format: LogFormat | None = (
            LogFormat(config.log.format) if config.log.format else TCPLOG if self.tcplog else None
        )
        self.unique_id_format = (
            LogFormat(config.unique_id_format) if config.unique_id_format else None
        )
        self.logs_unique_id = self.log_format is not None and "ID" in self.log_format.variables
        self.error_log = connection_error_log(log, config.name, loop.time, loop.call_later)
        self.oversize_lines: RateLimiter | None = None  # made at the first oversize header
        # Every server down (a blackout of the brokers): each device's retry would add a
        # warning to its session's log line; a burst, then a rate, and the count.
        self.no_server_lines = SuppressedLines(
            logger.warning,
            f"frontend {config.name}",
            "connections no server could take",
            loop.time,
            loop.call_later,
        )
        self.key_files = key_files if key_files is not None else HeaderKeys(loop.time)
        self.counters = FrontendCounters()
        self.process_counters = counters if counters is not None else ProcessCounters()
        self.sessions: set[ClientSide] = set()
        self.timers = TimerWheel(loop)  # every session's idle timeout
        self.accepting_enabled: bool = True
        timeouts = config.timeout
        backend_timeouts = backend.config.timeout
        self.limits = Limits(
            timeout_client=timeouts.client,
            timeout_server=backend_timeouts.server,
            timeout_connect=backend_timeouts.connect,
            timeout_tunnel=backend_timeouts.tunnel,
            retries=retries,
            timeout_client_fin=timeouts.client_fin,
            timeout_server_fin=backend_timeouts.server_fin,
            buffer_size=global_.tune_bufsize * 2,
        )
        self.proxy_senders = {
            index: tuple(ipaddress.ip_network(n) for n in bind.accept_proxy_from)
            for index, bind in enumerate(config.binds)
        }
        self.contexts: dict[int, BindContext | None] = {
            index: BindContext(bind_tls(bind, global_, config.name)) if bind.ssl else None
            for index, bind in enumerate(config.binds)
        }
        self.has_ssl = any(context is not None for context in self.contexts.values())
        # Accepts per second of each bind line, this worker's own until lb.process.Runtime
        # gives it the windows every worker shares (use_rate_windows).
        self.bind_windows: list[RateWindow] = own_windows(len(self.binds))
        self.session_rate: EventRate
        self.use_rate_windows(self.bind_windows)
        self.listeners: list[Listener] = []
        self.current = 0
        self.maxconn: int | None = config.maxconn
        # With several workers, the sessions of all of them (lb.shared_counts).
        self.shared: SharedCount | None = None
        # Counted from accept (not from connection_made) so that maxconn is exact.
        self.reserved = 0

    # -- listening -------------------------------------------------------------------------

    def use_rate_windows(self, windows: list[RateWindow]) -> None:
        """Count accepts in `windows` (one per bind line), before the listeners start."""
        self.bind_windows = windows
        limit = self.config.rate_limit_sessions
        self.session_rate = EventRate(
            windows, limit, f"frontend {self.name}: 'rate-limit sessions {limit}'"
        )

    def rates(self, index: int) -> tuple[EventRate, ...]:
        """The rates the `index`-th bind line's accepts count in, with their limits: the
        process's (maxconnrate, maxsessrate; maxsslrate for an SSL bind) and this
        frontend's (rate-limit sessions)."""
        process = self.process
        candidates = (
            process.conn_rate,
            process.ssl_rate if self.contexts[index] is not None else None,
            self.session_rate,
        )
        return tuple(rate for rate in candidates if rate is not None)

    def start(
        self, sockets: dict[int, socket.socket] | None = None, reuse_port: bool = False
    ) -> None:
        for index, bind in enumerate(self.binds):
            sock = sockets.get(index) if sockets else None
            listener = Listener(self, bind, self.contexts[index], reuse_port=reuse_port, sock=sock)
            self.listeners.append(listener)
            self.process.listeners.append(listener)
            listener.start()

    def stop_accepting(self) -> None:
        self.accepting_enabled = False
        self.no_server_lines.flush()
        self.error_log.flush()
        for listener in self.listeners:
            listener.close()
            if listener in self.process.listeners:
                self.process.listeners.remove(listener)

    def _own_room(self) -> bool:
        return self.maxconn is None or self.reserved < self.maxconn

    def has_room(self) -> bool:
        if not self._own_room() or (self.shared is not None and not self.shared.has_room()):
            return False
        return self.process.has_room()

    def try_reserve(self) -> bool:
        """A place in this frontend and in the process for a connection about to be
        accepted; False (nothing taken) when either is full."""
        if not self._own_room():
            return False
        shared = self.shared
        if shared is not None and not shared.try_add():
            return False
        if not self.process.try_acquire():
            if shared is not None:
                shared.remove()
            return False
        self.reserved += 1
        return True

    def cancel_reserve(self) -> None:
        """accept() brought no connection: give the place back, waking nobody."""
        self.reserved -= 1
        if self.shared is not None:
            self.shared.remove()
        self.process.cancel()

    def unreserve(self) -> None:
        self.reserved -= 1
        if self.shared is not None:
            self.shared.remove()
        self.process.release()
        for listener in self.listeners:
            listener.maybe_resume()

    # -- sessions ----------------------------------------------------------------------------

    def session_started(self, client: ClientSide) -> None:
        client.session_number = self.process.total
        self.current += 1
        self.sessions.add(client)
        counters = self.counters
        counters.connections_total += 1
        counters.max_sessions = max(counters.max_sessions, self.current)

    def session_ended(self, client: ClientSide) -> None:
        self.sessions.discard(client)
        self._count_traffic(client)
        if client.handshake_done and self.log_format is not None and self.log.enabled:
            log_format = self.log_format
            self.log.emit(log_format.render(self._record(client, log_format)))
        self.current -= 1
        self.unreserve()

    def handshake_completed(self, client: ClientSide) -> None:
        del client
        self.counters.handshakes_total += 1

    def _count_traffic(self, client: ClientSide) -> None:
        self.counters.bytes_in += client.bytes_in
        self.counters.bytes_out += client.bytes_out
        server = client.server
        # server_side: connected, though a client that left at once may end the session
        # before the connect coroutine has resumed to set connect_time.
        if server is None or (client.connect_time is None and client.server_side is None):
            return
        now = self.loop.time()
        backend_counters = self.process_counters.backend(self.backend.name)
        server_counters = self.process_counters.server(self.backend.name, server.name)
        for counters in (backend_counters, server_counters):
            counters.sessions_total += 1
            counters.bytes_in += client.bytes_in
            counters.bytes_out += client.bytes_out
            counters.last_session = now
        backend_counters.max_sessions = max(
            backend_counters.max_sessions,
            sum(s.active_connections for s in self.backend.servers),
        )
        server_counters.max_sessions = max(
            server_counters.max_sessions, server.active_connections + 1
        )

    def unique_id(self, client: ClientSide) -> str:
        """The session's connection id (%ID, PP2_TYPE_UNIQUE_ID), made once when first asked
        for: `unique-id-format` rendered then, as HAProxy's stream_generate_unique_id, cut to
        the TLV's 128 bytes; without one, 128 random bits in hex (ours: HAProxy leaves it
        empty), so that every session has an id the brokers can log."""
        unique_id = client.unique_id
        if unique_id is None:
            if self.unique_id_format is None:
                unique_id = secrets.token_hex(16)
            else:
                unique_id_format = self.unique_id_format
                text = unique_id_format.render(
                    self._record(client, unique_id_format, with_unique_id=False)
                )
                unique_id = text.encode("utf-8")[: proxyproto.UNIQUE_ID_MAX_LENGTH].decode(
                    "utf-8", "ignore"
                )
            client.unique_id = unique_id
        return unique_id

    def _record(
        self, client: ClientSide, log_format: LogFormat, *, with_unique_id: bool = True
    ) -> SessionRecord:
        """The session's fields for `log_format`; the client certificate's names only when it
        shows them (reading them parsed the certificate again, ~40 us a session)."""
        now = self.loop.time()
        server = client.server
        connected = server is not None and client.connect_time is not None
        # HAProxy logs after its server connection is released; ours may still be closing.
        server_side = client.server_side
        own = 1 if server_side is not None and not server_side.closed else 0
        tls = client.tls
        info = client.ssl_info
        subject, issuer = (
            tls_io.peer_name_parts(tls)
            if tls is not None and log_format.uses_peer_names
            else ((), ())
        )
        return SessionRecord(
            client_ip=client.peer[0],
            client_port=client.peer[1],
            accept_date=client.accept_date,
            frontend=self.name,
            ssl=client.tls is not None,
            backend=self.backend.name,
            server=server.name if server is not None else None,
            queue_ms=int(client.queue_time * 1000) if client.queue_time is not None else -1,
            connect_ms=int(client.connect_time * 1000) if client.connect_time is not None else -1,
            total_ms=int((now - client.accept_time) * 1000),
            bytes_read=client.bytes_out,
            termination=client.termination,
            process_connections=self.process.current,
            frontend_connections=self.current,
            backend_connections=self.backend.session_count - own,  # queued ones included
            server_connections=server.active_connections - own if server is not None else 0,
            retries=client.retries_done,
            server_queue=client.server_queue_position,
            backend_queue=client.backend_queue_position,
            frontend_ip=client.sock[0],
            frontend_port=client.sock[1],
            server_ip=server.host if server is not None and connected else None,
            server_port=server.port if server is not None and connected else None,
            bytes_uploaded=client.bytes_in,
            bind_name=client.bind_name,
            ssl_protocol=info.version if info is not None else None,
            ssl_cipher=info.cipher if info is not None else None,
            ssl_verify=info.verify if info is not None else None,
            # ssl_c_used: a client certificate, this connection's or its resumed session's.
            ssl_client_used=info is not None and info.certificate_used,
            ssl_client_subject=subject,
            ssl_client_issuer=issuer,
            unique_id=(
                self.unique_id(client)
                if with_unique_id and (self.logs_unique_id or client.unique_id is not None)
                else None
            ),
            session_number=client.session_number,
        )

    def handshake_failed(self, client: ClientSide, refusal: Refusal, reason: str) -> None:
        """A refused handshake: counted under its refusal's label, and one log line (the
        reason in words) unless it is a probe that said nothing (option dontlognull)."""
        label = refusal.label
        failures = self.counters.handshake_failures
        failures[label] = failures.get(label, 0) + 1
        if client.bytes_received == 0 and self.config.option.dontlognull:
            return  # a probe that connected and said nothing (option dontlognull)
        line = format_connection_error(
            client.peer[0],
            client.peer[1],
            client.accept_date,
            self.name,
            client.bind_name,
            f"SSL handshake failure: {reason}",
        )
        self.error_log.emit(line)

    def proxy_sender_trusted(self, bind_index: int, address: str) -> bool:
        """`accept-proxy-from`: may this peer send the PROXY header (no list: anyone)."""
        networks = self.proxy_senders[bind_index]
        return not networks or proxyproto.is_trusted_source(address, networks)

    def proxy_header_failed(self, client: ClientSide, message: str) -> None:
        """`accept-proxy`: the PROXY header from the balancer in front was bad or missing;
        one line in HAProxy's words (conn_err_code_str), rate-limited like TLS refusals."""
        if client.bytes_received == 0 and self.config.option.dontlognull:
            return
        self.error_log.emit(
            format_connection_error(
                client.peer[0],
                client.peer[1],
                client.accept_date,
                self.name,
                client.bind_name,
                message,
            )
        )

    def no_server(self, client: ClientSide, reason: str) -> None:
        """Said beside the session's own log line (termination SC), rate limited."""
        self.no_server_lines.emit(
            f"{client.peer[0]}:{client.peer[1]} frontend {self.name}: no server of backend "
            f"{self.backend.name} could take the connection ({reason})"
        )

    # -- per-session answers for the data path -------------------------------------------------

    def proxy_header_for(self, client: ClientSide, server: ServerState) -> bytes | None:
        config = server.config
        if config.send_proxy_v2:
            header = self._proxy_v2(client, config)
            if len(header) > config.proxy_v2_max_size:
                self._oversize_header(client, server, len(header))
            return header
        if config.send_proxy:
            return proxyproto.encode_v1(client.peer, client.sock)
        return None

    def _oversize_header(self, client: ClientSide, server: ServerState, size: int) -> None:
        """Sent all the same (the broker decides), but said: a broker whose
        proxy_protocol_max_size is smaller refuses it and the device only sees a close."""
        self.counters.proxy_headers_oversize += 1
        if self.oversize_lines is None:
            self.oversize_lines = RateLimiter(ERROR_LINE_RATE, ERROR_LINE_BURST, self.loop.time)
        if not self.oversize_lines.allow():
            return
        info = client.ssl_info
        logger.warning(
            "%s:%d frontend %s: PROXY v2 header of %d bytes for server %s/%s is over its "
            "proxy-v2-max-size (%d bytes)%s; a broker whose proxy_protocol_max_size is smaller "
            "refuses it (%d such header(s) so far)",
            client.peer[0],
            client.peer[1],
            self.name,
            size,
            self.backend.name,
            server.name,
            server.config.proxy_v2_max_size,
            f" (client CN={info.cn})" if info is not None and info.cn else "",
            self.counters.proxy_headers_oversize,
        )

    def _proxy_v2(self, client: ClientSide, server: Server) -> bytes:
        options = server.proxy_v2_options
        tls = client.tls
        ssl_info = None
        alpn = None
        authority = None
        chain: tuple[bytes, ...] = ()
        if tls is not None:
            alpn = tls_io.alpn(tls)
            if "authority" in options:
                server_name = tls_io.servername(tls)
                authority = server_name.decode("ascii", "replace") if server_name else None
            if "ssl" in options and client.ssl_info is not None:
                info = client.ssl_info
                key_alg = sig_alg = None
                context = client.tls_context
                if context is not None and ("cert-key" in options or "cert-sig" in options):
                    key_alg, sig_alg = context.served_algorithms(tls)
                ssl_info = proxyproto.SSLInfo(
                    client=info.client,
                    verify=info.verify,
                    version=info.version,
                    cn=info.cn if "cert-cn" in options else None,
                    cipher=info.cipher if "ssl-cipher" in options else None,
                    sig_alg=sig_alg if "cert-sig" in options else None,
                    key_alg=key_alg if "cert-key" in options else None,
                )
            if "chain-subjects" in options:
                chain = tls_io.verified_chain_subjects(tls)
        return proxyproto.encode_v2(
            proxyproto.Command.PROXY,
            client.peer,
            client.sock,
            alpn=alpn,
            authority=authority,
            ssl=ssl_info,
            unique_id=self.unique_id(client).encode("utf-8") if "unique-id" in options else None,
            crc32c="crc32c" in options,
            chain_subjects=chain,
            mac=self.key_files.mac_key(server),
        )
