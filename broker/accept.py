"""Listening sockets, their accept loops, and the process's file limit.

What the event loop's own servers do when the process runs out of file descriptors is
wrong both ways: uvloop (libuv's "EMFILE trick") accepts and closes the waiting connections
without a word, and asyncio's selector loop logs a traceback per attempt, every second, while
it lasts. HAProxy pauses the listener instead (the connections wait in the kernel's backlog)
and resumes it when a connection closes. :class:`AcceptLoop` does that here, for the MQTT
listeners (plain and TLS) and the cluster's TLS server:

- the listening socket is read with ``add_reader``, up to ``ACCEPT_BATCH`` accepts per
  readiness callback;
- at EMFILE/ENFILE/ENOBUFS/ENOMEM it stops reading the socket and tries again when a
  connection of the listener closes (``resume``) or after ``ACCEPT_RETRY_DELAY``, whichever
  comes first: at most one failed accept per retry, so no busy loop;
- a run of such failures (a "burst") is one WARNING when it starts and one line when it is
  over (no failure for ``BURST_QUIET`` seconds), with the count and the limit, however long
  it lasts: no flood;
- with ``max_conn_rate`` (EMQX's listener option; the MQTT listeners, never the cluster's
  server) it counts its accepts over a sliding second (lb.event_rate, HAProxy's freq_ctr, in
  a window of its own: a node is one process) and takes no more per readiness callback than
  the limit leaves; at the limit it stops reading the socket until the rate is below it
  (``EventRate.delay``, an exact wait), so connections wait in the kernel's backlog and
  none is refused. A run of such pauses is one WARNING when it starts and one when it is
  over (none for ``BURST_QUIET`` seconds), with the count; every pause is counted. The
  rate wait and the descriptor wait are apart: neither's end resumes accepts while the
  other (or the owner's ``hold``) still stands.

:func:`raise_file_limit` raises the soft RLIMIT_NOFILE to the hard limit at start, as
HAProxy does, and :func:`plan_file_limit` says what the listeners' ``max_connections`` need
of it (HAProxy's "Cannot raise FD limit to N, limit is L").
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import logging
import os
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from lb.event_rate import EventRate, RateWindow, own_windows
from lb.ratelimit import Burst

__all__ = [
    "ACCEPT_BATCH",
    "FILE_RESERVE",
    "AcceptLoop",
    "Accepted",
    "AcceptedSocket",
    "FileLimitPlan",
    "PendingConnections",
    "open_listening_socket",
    "plan_file_limit",
    "raise_file_limit",
]

logger = logging.getLogger(__name__)

#: Connections accepted per readiness callback before yielding to the loop (lb's value).
ACCEPT_BATCH = 32
#: listen(2) backlog (the kernel caps it at net.core.somaxconn).
BACKLOG = 4096
#: After a failed accept (out of descriptors), try again after this long at the latest.
ACCEPT_RETRY_DELAY = 0.5
#: A burst of failed accepts is over after this long without one.
BURST_QUIET = 10.0
#: accept(2) errors that mean "out of resources": pause, do not close the listener.
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept(2) errors about one connection that went away before we took it: skip it.
TRANSIENT_ERRORS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
#: Descriptors a node keeps for itself beside its clients: the listening sockets, cluster
#: links, admin connections, log and certificate files (HAProxy's maxsock adds the same kind);
#: a quarter of the limit when that is less.
FILE_RESERVE = 128


class AcceptedSocket(socket.socket):
    """An accepted socket whose ``family`` and ``type`` read as the kernel's numbers.

    The event loop reads both of every socket it adopts (connect_accepted_socket), and
    socket.socket turns each into an IntEnum on every read: ~1.7 µs a connection here
    (bench/README.md issue 13). The numbers compare equal to the enums.
    """

    __slots__ = ()
    family = _socket.socket.family  # type: ignore[assignment]
    type = _socket.socket.type  # type: ignore[assignment]


class Accepted:
    """One accepted connection's descriptor, before anything adopted it.

    What :class:`AcceptLoop` hands its owner. Who needs a socket object (a TLS handshake)
    calls :meth:`socket`. The plain MQTT listener gives this object itself to uvloop's
    ``connect_accepted_socket``, which reads ``family``, ``type`` and ``fileno()`` and, when
    its transport closes the descriptor, calls ``close()``: a socket object would cost a
    ``getsockname`` (CPython checks every descriptor it wraps), an ``ioctl`` (setblocking,
    which libuv's ``uv_tcp_open`` does again) and its construction, ~5 µs of ~80 per
    connection (bench/README.md issue 13).

    Until :meth:`adopted` it owns the descriptor and :meth:`close` closes it; after, the
    transport owns it and :meth:`close` does nothing: the transport calls it after its own
    close, when the number may already belong to another connection.
    """

    __slots__ = ("_fd", "family", "owned", "proto", "type")

    def __init__(self, fd: int, family: int, kind: int, proto: int) -> None:
        self._fd = fd
        self.family = family
        self.type = kind
        self.proto = proto
        #: Whether the descriptor is still ours to close.
        self.owned = True

    def fileno(self) -> int:
        return self._fd

    def adopted(self) -> None:
        """A transport took the descriptor (it closes it from now on)."""
        self.owned = False

    def close(self) -> None:
        if self.owned:
            self.owned = False
            os.close(self._fd)

    def socket(self) -> socket.socket:
        """A non-blocking socket object that owns the descriptor from now on."""
        self.owned = False
        connection = AcceptedSocket(self.family, self.type, self.proto, self._fd)
        connection.setblocking(False)
        return connection


def open_listening_socket(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """A bound, listening, non-blocking TCP socket (IPv6 hosts accept IPv4 too)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    listening = socket.socket(family, kind, proto)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listening.bind(address)
        listening.listen(backlog)
        listening.setblocking(False)
    except OSError:
        listening.close()
        raise
    return listening


class AcceptLoop:
    """Accepts connections on one listening socket and hands each to ``on_socket``.

    ``on_socket(accepted, address)`` takes ownership of the descriptor (:class:`Accepted`).
    The loop pauses at descriptor exhaustion (see the module docstring); the owner calls
    :meth:`resume` when one of its connections closes, so the pause lasts no longer than
    needed.
    """

    __slots__ = (
        "_accept",
        "_identity",
        "_rate_wait",
        "_retry",
        "_window",
        "accepting",
        "batch_time",
        "closed",
        "conn_rate",
        "failed_accepts",
        "failures",
        "held",
        "label",
        "loop",
        "on_failed",
        "on_rate_paused",
        "on_socket",
        "rate_pauses",
        "rate_runs",
        "socket",
    )

    def __init__(
        self,
        listening: socket.socket,
        on_socket: Callable[[Accepted, object], None],
        label: str,
        on_failed: Callable[[], None] | None = None,
        max_conn_rate: int | None = None,
        on_rate_paused: Callable[[], None] | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.socket = listening
        # socket.accept() is _accept() and a socket built from the listening socket's family
        # and type, which it reads back as IntEnums each time (two enum conversions, ~1.7 µs
        # a connection, bench/README.md issue 13); these numbers do not change.
        self._accept = cast(Callable[[], tuple[int, Any]], listening._accept)  # type: ignore[attr-defined]
        self._identity = (int(listening.family), int(listening.type), listening.proto)
        self.on_socket = on_socket
        #: Called on every accept that failed for lack of descriptors (the node's counter).
        self.on_failed = on_failed
        self.label = label
        self.accepting = False
        self.closed = False
        #: Set by the owner while it takes no more connections (hold/release).
        self.held = False
        #: Failed accepts (out of descriptors) since start; the listener's counter.
        self.failed_accepts = 0
        # A run of failed accepts (one line when it starts, one when it is over).
        self.failures = Burst(
            BURST_QUIET, self.loop.time, self.loop.call_later, self._failures_over
        )
        self._retry: asyncio.TimerHandle | None = None
        # max_conn_rate: this listener's accepts per second (None: no limit, and nothing is
        # counted, so an unlimited listener pays nothing per connection for it).
        self.conn_rate: EventRate | None = None
        self._window: RateWindow | None = None
        self.batch_time = 0.0  # when the current accept batch began (max_conn_rate)
        if max_conn_rate is not None:
            [self._window] = own_windows(1)
            self.conn_rate = EventRate(
                (self._window,), max_conn_rate, f"max_conn_rate {max_conn_rate}"
            )
        #: Called on every pause for max_conn_rate (the node's counter).
        self.on_rate_paused = on_rate_paused
        #: Pauses for max_conn_rate since start; the listener's counter.
        self.rate_pauses = 0
        # A run of such pauses (told as the failures are).
        self.rate_runs = Burst(BURST_QUIET, self.loop.time, self.loop.call_later, self._rate_over)
        self._rate_wait: asyncio.TimerHandle | None = None

    @property
    def paused(self) -> bool:
        """True while accepts wait for a descriptor to be freed."""
        return self._retry is not None

    @property
    def rate_paused(self) -> bool:
        """True while accepts wait for the rate to fall below max_conn_rate."""
        return self._rate_wait is not None

    def rate(self) -> int | None:
        """Accepts over the last second (None without max_conn_rate: not counted)."""
        return None if self.conn_rate is None else self.conn_rate.rate(time.monotonic())

    def start(self) -> None:
        if (
            self.closed
            or self.accepting
            or self.held
            or self._retry is not None
            or self._rate_wait is not None
        ):
            return
        self.accepting = True
        self.loop.add_reader(self.socket.fileno(), self._on_readable)

    def hold(self) -> None:
        """Stop accepting until :meth:`release` (the owner is at a limit of its own)."""
        self.held = True
        self._pause()

    def release(self) -> None:
        self.held = False
        self.start()

    def resume(self) -> None:
        """A connection closed: if accepts are paused for descriptors, try again now (unless
        they also wait for max_conn_rate: that wait goes on)."""
        if self._retry is None or self.closed:
            return
        self._retry.cancel()
        self._retry = None
        self.start()

    def _retry_now(self) -> None:
        self._retry = None
        self.start()

    def _pause(self) -> None:
        if self.accepting:
            self.accepting = False
            self.loop.remove_reader(self.socket.fileno())

    def close(self) -> None:
        self._pause()
        self.closed = True
        for handle in (self._retry, self._rate_wait):
            if handle is not None:
                handle.cancel()
        self._retry = self._rate_wait = None
        self.failures.end()
        self.rate_runs.end()
        self.socket.close()

    def _rate_budget(self) -> int:
        """How many connections max_conn_rate lets this listener take now (HAProxy's
        listener_accept: the batch lowered to what the limit leaves). At 0 the listener stops
        reading its socket until the rate has fallen below the limit."""
        conn_rate = self.conn_rate
        assert conn_rate is not None
        # One clock reading per batch (its accepts are microseconds apart), which counts them.
        now = self.batch_time = time.monotonic()
        remain = conn_rate.remain(now)
        if remain > 0:
            return min(remain, ACCEPT_BATCH)
        self._pause()
        self._rate_wait = self.loop.call_later(conn_rate.delay(now), self._rate_waited)
        self._rate_paused(conn_rate)
        return 0

    def _rate_waited(self) -> None:
        self._rate_wait = None
        self.start()

    def _rate_paused(self, conn_rate: EventRate) -> None:
        self.rate_pauses += 1
        if self.on_rate_paused is not None:
            self.on_rate_paused()
        if self.rate_runs.add():
            logger.warning(
                "%s: %s reached: accepts pause until the rate falls below it; connections "
                "wait in the kernel's queue",
                self.label,
                conn_rate.label,
            )

    def _rate_over(self, pauses: int, seconds: float) -> None:
        assert self.conn_rate is not None
        logger.warning(
            "%s: %s: accepts paused %d times over %.1fs, none in the last %.0fs",
            self.label,
            self.conn_rate.label,
            pauses,
            seconds,
            self.rate_runs.quiet,
        )

    def _on_readable(self) -> None:
        accept = self._accept
        family, kind, proto = self._identity
        window = self._window
        batch = ACCEPT_BATCH if window is None else self._rate_budget()
        for _ in range(batch):
            if not self.accepting:
                return  # on_socket held us
            try:
                descriptor, address = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in RESOURCE_ERRORS:
                    self._out_of_resources(error)
                    return
                if error.errno in TRANSIENT_ERRORS:
                    continue
                # Anything else is a listening socket that cannot serve (closed under us):
                # say so once and stop, rather than spin on it.
                logger.error("%s: accept failed, listener stopped: %s", self.label, error)
                self._pause()
                return
            if window is not None:
                window.add(self.batch_time)
            self.on_socket(Accepted(descriptor, family, kind, proto), address)

    def _out_of_resources(self, error: OSError) -> None:
        self._pause()
        self.failed_accepts += 1
        if self.on_failed is not None:
            self.on_failed()
        if self.failures.add():
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            logger.warning(
                "%s: accept failed: %s (file limit %s, hard %s): accepts paused until a "
                "connection closes (retried every %gs); new clients wait in the backlog. "
                "Raise LimitNOFILE= (systemd) or ulimit -n, or lower max_connections",
                self.label,
                error.strerror or error,
                _limit_text(soft),
                _limit_text(hard),
                ACCEPT_RETRY_DELAY,
            )
        self._retry = self.loop.call_later(ACCEPT_RETRY_DELAY, self._retry_now)

    def _failures_over(self, failures: int, seconds: float) -> None:
        logger.warning(
            "%s: burst over: %d accepts failed for lack of file descriptors in %.1fs",
            self.label,
            failures,
            seconds,
        )


class PendingConnections:
    """Accepted sockets that are not MQTT clients (yet), bounded in count and in bytes.

    A socket is pending from accept until its CONNECT is accepted: during the TLS handshake,
    while it waits for its PROXY header or its CONNECT, and while it is being refused. What a
    pending socket sent is counted until then (a PROXY header, a CONNECT of up to
    max_packet_size). Past either bound the oldest pending socket is closed to make room
    (its deadline is the nearest anyway): silent sockets cannot hold the listener, and the
    clients that speak promptly get in. nginx frees its oldest idle keep-alive connections
    the same way when it runs out of worker_connections.
    """

    __slots__ = ("bytes", "entries", "evicted", "max_bytes", "max_count", "on_evicted")

    def __init__(
        self, max_count: int, max_bytes: int, on_evicted: Callable[[], None] | None = None
    ) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        #: Called on every eviction (the node's counter).
        self.on_evicted = on_evicted
        #: key -> [bytes received, evict()]; insertion order is age order.
        self.entries: dict[object, list[Any]] = {}
        self.bytes = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, key: object, evict: Callable[[str], None]) -> None:
        """A new pending socket; ``evict(why)`` closes it when it must make room."""
        while self.entries and len(self.entries) >= self.max_count:
            self._evict_oldest(f"{len(self.entries):,} sockets pending (max_pending_connections)")
        self.entries[key] = [0, evict]

    def grow(self, key: object, size: int) -> bool:
        """``key`` received ``size`` more bytes; False when that evicted ``key`` itself."""
        entry = self.entries.get(key)
        if entry is None:
            return True
        entry[0] += size
        self.bytes += size
        while self.bytes > self.max_bytes and self.entries:
            self._evict_oldest(
                f"{self.bytes:,} bytes received by pending sockets (max_pending_bytes)"
            )
        return key in self.entries

    def remove(self, key: object) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[0]

    def _evict_oldest(self, why: str) -> None:
        key = next(iter(self.entries))
        size, evict = self.entries.pop(key)
        self.bytes -= size
        self.evicted += 1
        if self.on_evicted is not None:
            self.on_evicted()
        evict(why)


def _limit_text(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def raise_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; (soft limit before, soft limit now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        # Linux refuses an infinite RLIMIT_NOFILE; nr_open is the real ceiling.
        try:
            with open("/proc/sys/fs/nr_open", encoding="ascii") as nr_open:
                target = int(nr_open.read())
        except (OSError, ValueError):
            target = soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as error:
            logger.warning(
                "cannot raise the file limit from %d to the hard limit %s: %s",
                soft,
                _limit_text(hard),
                error,
            )
            return soft, soft
        return soft, target
    return soft, soft


@dataclass(frozen=True, slots=True)
class FileLimitPlan:
    """What the listeners' max_connections need of the file limit."""

    #: Effective max_connections per listener label (None: no count limit).
    max_connections: dict[str, int | None]
    #: Descriptors the configured max_connections need (with FILE_RESERVE).
    needed: int
    limit: int
    #: One message per problem, in words, with the numbers and what to change.
    problems: tuple[str, ...]
    #: Informational lines (limits derived from the file limit).
    notes: tuple[str, ...]


def plan_file_limit(
    listeners: list[tuple[str, int | None]], limit: int, reserve: int = FILE_RESERVE
) -> FileLimitPlan:
    """``listeners`` is (label, configured max_connections or None) for each listener.

    A listener without max_connections gets what the file limit leaves, shared with the
    other such listeners (HAProxy derives maxconn from ulimit -n the same way); configured
    ones are kept, and when they add up past the limit that is said once, with the numbers.
    """
    unlimited = limit == resource.RLIM_INFINITY
    if not unlimited:
        # A small limit (a test, a container's 1,024) keeps most of itself for clients.
        reserve = min(reserve, limit // 4)
    configured = sum(value for _, value in listeners if value is not None)
    unset = [label for label, value in listeners if value is None]
    needed = configured + reserve
    effective: dict[str, int | None] = {
        label: value for label, value in listeners if value is not None
    }
    problems: list[str] = []
    notes: list[str] = []
    if configured and not unlimited and needed > limit:
        detail = ", ".join(f"{label} {value:,}" for label, value in listeners if value is not None)
        problems.append(
            f"max_connections ({detail}) needs about {needed:,} file descriptors "
            f"({reserve} for the node itself), but the file limit is {limit:,}: past about "
            f"{max(limit - reserve, 0):,} clients, accepts pause (clients wait in the "
            "backlog). Raise LimitNOFILE= in the service unit (packaging/broker@.service) "
            "or the hard limit (ulimit -Hn, /etc/security/limits.conf), or lower "
            "max_connections"
        )
    if unset:
        if unlimited:
            share: int | None = None
        else:
            share = max((limit - reserve - configured) // len(unset), 1)
        for label in unset:
            effective[label] = share
            if share is not None:
                notes.append(
                    f"listener {label}: max_connections not set: {share:,} (what the file "
                    f"limit {limit:,} leaves after {reserve} for the node"
                    + (f" and {configured:,} for the other listeners" if configured else "")
                    + (f", shared by {len(unset)} listeners" if len(unset) > 1 else "")
                    + ")"
                )
    return FileLimitPlan(effective, needed, limit, tuple(problems), tuple(notes))
