"""The Prometheus exporter: its page, as a table of metric descriptions, and its endpoint.

HAProxy's `http-request use-service prometheus-exporter` (addons/promex): the exporter's
metric names (`haproxy_frontend_current_sessions`, `haproxy_server_status{state="UP"}`, ...)
plus ours for TLS: `haproxy_frontend_ssl_handshakes_total` and
`haproxy_frontend_ssl_handshake_failures_total{reason="expired"}`, in the text exposition
format 0.0.4. As promex's `promex_st_metric_desc[]`, each scope (process, frontend, backend,
server) has a table whose rows give a family's name, type and help and where its samples
come from; `render_prometheus` writes every family of a table, each over every object of
its scope. Counters are every worker's, summed (lb.counters); states come from this
process, which every worker shares (lb.control).

`PrometheusEndpoint` answers `GET /metrics` on the binds of a frontend that names the
service, over HTTP/1.1 parsed by h11, behind HAProxy's basic auth against a `userlist` when
the frontend says `http-request auth`; with `nbthread` > 1 (lb.workers) the lead worker
serves it.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hmac
import logging
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import h11

from lb import http11
from lb.config.model import Global, Userlist
from lb.counters import (
    CounterSnapshot,
    Row,
    backend_up,
    check_status,
    merge_snapshots,
    server_state,
)
from lb.ratelimit import SuppressedLines

if TYPE_CHECKING:
    from lb.frontend import FrontendRuntime
    from lb.process import Runtime
    from lb.server import BackendState, ServerState

logger = logging.getLogger(__name__)

#: How long an HTTP client may take to send its request.
REQUEST_TIMEOUT = 10.0
#: A scraper's request is a few hundred bytes; HAProxy's tune.bufsize is 16 KiB.
MAX_REQUEST_HEAD = 8192
MAX_REQUEST_BODY = 4096

#: HAProxy's check status names (include/haproxy/check-t.h), the promex label values.
CHECK_STATUSES = (
    "HANA", "SOCKERR", "L4OK", "L4TOUT", "L4CON", "L6OK", "L6TOUT", "L6RSP", "L7TOUT",
    "L7RSP", "L7OK", "L7OKC", "L7STS", "PROCERR", "PROCTOUT", "PROCOK",
)  # fmt: skip
SERVER_STATES = ("DOWN", "UP", "MAINT", "DRAIN", "NOLB")
SERVICE_STATES = ("DOWN", "UP")

Labels = dict[str, str]
Number = float | int
Sample = tuple[Labels, Number]
#: What a metric is about: a frontend, a backend, a (backend, server) pair, or the process.
Subject = TypeVar("Subject")


@dataclass(frozen=True, slots=True)
class Page:
    """What one rendering reads: this process's runtime, and every worker's counters."""

    runtime: Runtime
    totals: CounterSnapshot


#: A metric's samples for one subject, given the subject's summed counters: each sample's
#: own labels (beside the subject's) and its value.
Samples = Callable[[Page, Subject, Row], Iterable[Sample]]


@dataclass(frozen=True, slots=True)
class MetricDesc(Generic[Subject]):
    """One row of a scope's table: `haproxy_<scope>_<name>`, its type and help text, and its
    samples for one subject of the scope."""

    name: str
    kind: Literal["gauge", "counter"]
    help: str
    samples: Samples[Subject]


def counter(field: str) -> Samples[object]:
    """The subject's counter `field`, summed over the workers (lb.counters)."""

    def samples(_page: Page, _subject: object, row: Row) -> Iterable[Sample]:
        return (({}, row[field]),)

    return samples


def value(compute: Callable[[Page, Subject], Number]) -> Samples[Subject]:
    """A value computed from this process's runtime objects."""

    def samples(page: Page, subject: Subject, _row: Row) -> Iterable[Sample]:
        return (({}, compute(page, subject)),)

    return samples


def state(current: Callable[[Subject], str | None], states: tuple[str, ...]) -> Samples[Subject]:
    """One sample per `state` label value, 1 for the subject's current state (none at all
    when it has no state, e.g. a server without checks)."""

    def samples(_page: Page, subject: Subject, _row: Row) -> Iterable[Sample]:
        now = current(subject)
        if now is None:
            return ()
        return (({"state": name}, int(name == now)) for name in states)

    return samples


def breakdown(label: str, counts: Callable[[Page, Subject], Mapping[str, int]]) -> Samples[Subject]:
    """One sample per non-zero count, labelled by its key, in key order."""

    def samples(page: Page, subject: Subject, _row: Row) -> Iterable[Sample]:
        return (
            ({label: key}, count) for key, count in sorted(counts(page, subject).items()) if count
        )

    return samples


SESSIONS_HELP = "Number of current sessions on the frontend, backend or server"
MAX_SESSIONS_HELP = "Highest value of current sessions encountered since process started"
SESSIONS_TOTAL_HELP = "Total number of sessions since process started"
BYTES_IN_HELP = "Total number of request bytes since process started"
BYTES_OUT_HELP = "Total number of response bytes since process started"
STATUS_HELP = "Current status of the service, per state label value."
QUEUE_HELP = "Number of current queued connections"
CONNECTION_ERRORS_HELP = (
    "Total number of failed connections to server since the worker process started"
)


def _rate_metrics(
    kind: str, what: str, row: str, limit: Callable[[Global], int | None]
) -> tuple[MetricDesc[None], ...]:
    """HAProxy's current/limit/max rows of one process rate (`row` in the counters)."""
    return (
        MetricDesc(
            f"current_{kind}_rate",
            "gauge",
            f"Current number of {what} per second over last elapsed second",
            counter(row),
        ),
        MetricDesc(
            f"limit_{kind}_rate",
            "gauge",
            f"Configured maximum number of {what} per second",
            value(lambda page, _: limit(page.runtime.config.global_) or 0),
        ),
        MetricDesc(
            f"max_{kind}_rate",
            "gauge",
            f"Maximum observed number of {what} per second",
            counter(f"{row}_max"),
        ),
    )


PROCESS_METRICS: tuple[MetricDesc[None], ...] = (
    MetricDesc(
        "nbthread",
        "gauge",
        "Number of started threads (global.nbthread)",
        value(lambda page, _: page.runtime.config.global_.nbthread or 1),
    ),
    MetricDesc(
        "start_time_seconds",
        "gauge",
        "Start time in seconds",
        value(lambda page, _: int(page.runtime.counters.started)),
    ),
    MetricDesc("current_connections", "gauge", "Number of active sessions", counter("current")),
    MetricDesc(
        "connections_total", "counter", "Total number of created sessions", counter("total")
    ),
    MetricDesc(
        "dropped_logs_total", "counter", "Total number of dropped logs", counter("dropped_logs")
    ),
    MetricDesc("stopping", "gauge", "Non zero means stopping in progress", counter("stopping")),
    # Every connection lb accepts is a session: the connection and session rates are one
    # count (lb.event_rate), their limits maxconnrate and maxsessrate.
    *_rate_metrics("connection", "connections", "conn_rate", lambda g: g.maxconnrate),
    *_rate_metrics("session", "sessions", "conn_rate", lambda g: g.maxsessrate),
    *_rate_metrics("ssl", "SSL sessions", "ssl_rate", lambda g: g.maxsslrate),
)

FRONTEND_METRICS: tuple[MetricDesc[FrontendRuntime], ...] = (
    MetricDesc(
        "status",
        "gauge",
        STATUS_HELP,
        state(lambda f: "UP" if f.accepting_enabled else "DOWN", SERVICE_STATES),
    ),
    MetricDesc("current_sessions", "gauge", SESSIONS_HELP, counter("current")),
    MetricDesc("max_sessions", "gauge", MAX_SESSIONS_HELP, counter("max_sessions")),
    MetricDesc(
        "limit_sessions",
        "gauge",
        "Frontend/listener/server's maxconn, backend's fullconn",
        value(lambda page, f: f.maxconn or page.runtime.config.global_.maxconn or 0),
    ),
    MetricDesc("sessions_total", "counter", SESSIONS_TOTAL_HELP, counter("total")),
    MetricDesc(
        "current_session_rate",
        "gauge",
        "Current number of sessions per second over last elapsed second",
        counter("rate"),
    ),
    MetricDesc(
        "limit_session_rate",
        "gauge",
        "Configured limit on new sessions per second",
        value(lambda _, f: f.config.rate_limit_sessions or 0),
    ),
    MetricDesc(
        "max_session_rate",
        "gauge",
        "Maximum observed number of sessions per second",
        counter("rate_max"),
    ),
    MetricDesc("bytes_in_total", "counter", BYTES_IN_HELP, counter("bytes_in")),
    MetricDesc("bytes_out_total", "counter", BYTES_OUT_HELP, counter("bytes_out")),
    MetricDesc(
        "connections_total",
        "counter",
        "Total number of new connections accepted since the worker process started",
        counter("connections_total"),
    ),
    MetricDesc(
        "ssl_handshakes_total",
        "counter",
        "Total number of completed TLS handshakes (lb)",
        counter("handshakes"),
    ),
    MetricDesc(
        "ssl_handshake_failures_total",
        "counter",
        "Total number of refused TLS handshakes, per reason (lb)",
        breakdown("reason", lambda page, f: page.totals.failures.get(f.name, {})),
    ),
    MetricDesc(
        "revoked_sessions_closed_total",
        "counter",
        "Sessions closed because a reloaded CRL revoked their certificate (lb)",
        counter("revoked_closed"),
    ),
)

#: The rows backends and servers share, from their summed counters (lb.counters.TrafficCounters
#: and the live connection and queue counts).
TRAFFIC_METRICS: tuple[MetricDesc[Any], ...] = (
    MetricDesc("current_queue", "gauge", QUEUE_HELP, counter("queue")),
    MetricDesc("current_sessions", "gauge", SESSIONS_HELP, counter("current")),
    MetricDesc("max_sessions", "gauge", MAX_SESSIONS_HELP, counter("max_sessions")),
    MetricDesc("sessions_total", "counter", SESSIONS_TOTAL_HELP, counter("sessions_total")),
    MetricDesc("bytes_in_total", "counter", BYTES_IN_HELP, counter("bytes_in")),
    MetricDesc("bytes_out_total", "counter", BYTES_OUT_HELP, counter("bytes_out")),
    MetricDesc("connection_errors_total", "counter", CONNECTION_ERRORS_HELP, counter("failed")),
)

BACKEND_METRICS: tuple[MetricDesc[BackendState], ...] = (
    MetricDesc(
        "status",
        "gauge",
        STATUS_HELP,
        state(lambda b: "UP" if backend_up(b) else "DOWN", SERVICE_STATES),
    ),
    *TRAFFIC_METRICS,
    MetricDesc(
        "active_servers",
        "gauge",
        "Total number of active UP servers with a non-zero weight",
        value(
            lambda _, b: sum(
                1 for s in b.servers if server_state(s) == "UP" and s.effective_weight > 0
            )
        ),
    ),
)

SERVER_METRICS: tuple[MetricDesc[tuple[BackendState, ServerState]], ...] = (
    MetricDesc(
        "status",
        "gauge",
        STATUS_HELP,
        state(lambda pair: server_state(pair[1]), SERVER_STATES),
    ),
    *TRAFFIC_METRICS,
    MetricDesc(
        "weight",
        "gauge",
        "Server's effective weight, or sum of active servers' effective weights for a backend",
        value(lambda _, pair: pair[1].effective_weight),
    ),
    MetricDesc(
        "check_status",
        "gauge",
        "Status of last health check, per state label value.",
        state(lambda pair: check_status(pair[1]), CHECK_STATUSES),
    ),
)


def render_prometheus(runtime: Runtime, totals: CounterSnapshot) -> str:
    """The exporter's page: the process, frontend, backend and server tables, each family
    over every subject of its scope."""
    page = Page(runtime, totals)
    backends = list(runtime.backends.values())
    lines: list[str] = []
    _scope(lines, page, "process", PROCESS_METRICS, [({}, totals.process, None)])
    _scope(
        lines,
        page,
        "frontend",
        FRONTEND_METRICS,
        [({"proxy": f.name}, totals.frontend(f.name), f) for f in runtime.frontends],
    )
    _scope(
        lines,
        page,
        "backend",
        BACKEND_METRICS,
        [({"proxy": b.name}, totals.backend(b.name), b) for b in backends],
    )
    _scope(
        lines,
        page,
        "server",
        SERVER_METRICS,
        [
            ({"proxy": b.name, "server": s.name}, totals.server(b.name, s.name), (b, s))
            for b in backends
            for s in b.servers
        ],
    )
    return "\n".join(lines) + "\n"


def _scope(
    lines: list[str],
    page: Page,
    scope: str,
    metrics: Sequence[MetricDesc[Subject]],
    subjects: Sequence[tuple[Labels, Row, Subject]],
) -> None:
    for metric in metrics:
        name = f"haproxy_{scope}_{metric.name}"
        lines.append(f"# HELP {name} {metric.help}")
        lines.append(f"# TYPE {name} {metric.kind}")
        for labels, row, subject in subjects:
            for extra, number in metric.samples(page, subject, row):
                lines.append(f"{name}{_labels({**labels, **extra})} {_number(number)}")


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    escaped = (
        f'{key}="{value.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for key, value in labels.items()
    )
    return "{" + ",".join(escaped) + "}"


def _number(value: Number) -> str:
    if isinstance(value, float) and not value.is_integer():
        return repr(value)
    return str(int(value))


# --------------------------------------------------------------------------------------------
# The endpoint


class PrometheusEndpoint:
    """`GET /metrics` (or `/`) answers the exporter's page, over HTTP/1.1 parsed by h11
    (lb.http11) with keep-alive. A head over MAX_REQUEST_HEAD gets 431, a body 413, garbage
    400. With `http-request auth [realm R] unless { http_auth(L) }` on the frontend every
    request needs the basic credentials of a user of userlist L (HAProxy's way to protect
    its exporter): 401 with `WWW-Authenticate: Basic realm="R"` otherwise; `password` is a
    crypt(3) hash checked by the C library's crypt(), as HAProxy does, `insecure-password`
    plain text. lb.config refuses an exporter bound off loopback without it."""

    def __init__(self, runtime: Runtime, name: str) -> None:
        self.runtime = runtime
        self.name = name
        self.servers: list[asyncio.AbstractServer] = []
        self.realm: str | None = None
        self.userlist: Userlist | None = None
        frontend = runtime.config.frontend(name)
        if frontend.http_request_auth is not None:
            self.realm, userlist = frontend.http_request_auth
            self.userlist = runtime.config.userlist(userlist)
        loop = asyncio.get_running_loop()
        self.refusals = SuppressedLines(
            logger.warning, f"frontend {name}", "refused requests", loop.time, loop.call_later
        )

    async def start(self, sockets: list[socket.socket]) -> None:
        for sock in sockets:
            server = await asyncio.start_server(self.handle, sock=sock)
            self.servers.append(server)

    def close(self) -> None:
        for server in self.servers:
            server.close()
        self.refusals.flush()

    def authorized(self, headers: http11.Headers) -> bool:
        userlist = self.userlist
        if userlist is None:
            return True
        credentials = http11.basic_credentials(headers)
        if credentials is None:
            return False
        name, password = credentials
        user = userlist.user(name)
        if user is None:
            return False
        if user.insecure:
            return hmac.compare_digest(password, user.password.encode())
        return crypt_matches(password, user.password)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        try:
            while True:
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT):
                        request = await http11.read_request(
                            reader, connection, MAX_REQUEST_HEAD, MAX_REQUEST_BODY
                        )
                except h11.RemoteProtocolError as error:
                    self.refusals.emit(
                        f"{peer} frontend {self.name}: {error.error_status_hint} {error}"
                    )
                    await http11.respond_error(writer, connection, error)
                    return
                if request is None:
                    return
                method = request.method.decode("ascii", "replace")
                path = request.target.decode("ascii", "replace").split("?", 1)[0]
                headers: list[tuple[str, str]] = []
                content_type = "text/plain"
                if not self.authorized(request.headers):
                    userlist = self.userlist.name if self.userlist is not None else "-"
                    self.refusals.emit(
                        f"{peer} frontend {self.name}: 401 for {method} {path} "
                        f"(http-request auth, userlist {userlist})"
                    )
                    status, body = 401, b"401 Unauthorized\n"
                    headers.append(("www-authenticate", f'Basic realm="{self.realm}"'))
                elif method not in ("GET", "HEAD"):
                    status, body = 405, b"only GET\n"
                    headers.append(("allow", "GET, HEAD"))
                elif path not in ("/metrics", "/"):
                    status, body = 404, b"not found: try /metrics\n"
                else:
                    totals = merge_snapshots(await self.runtime.gather_counters())
                    status, body = 200, render_prometheus(self.runtime, totals).encode()
                    content_type = "text/plain; version=0.0.4"
                await http11.respond(
                    writer,
                    connection,
                    status,
                    content_type,
                    body,
                    headers,
                    send_body=method != "HEAD",
                )
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    return
                connection.start_next_cycle()
        except (ConnectionError, OSError, TimeoutError, h11.LocalProtocolError):
            return
        finally:
            writer.close()


def _load_crypt() -> Callable[[bytes, bytes], bytes | None] | None:
    """The C library's crypt(3) (libcrypt / libxcrypt), which HAProxy checks `password`
    hashes with: every scheme it knows ($y$, $6$, $5$, $2b$, ...) works the same here."""
    name = ctypes.util.find_library("crypt")
    if name is None:
        return None
    try:
        library = ctypes.CDLL(name)
    except OSError:
        return None
    function = library.crypt
    function.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    function.restype = ctypes.c_char_p

    def crypt(password: bytes, setting: bytes) -> bytes | None:
        result: bytes | None = function(password, setting)
        return result

    return crypt


_CRYPT = _load_crypt()


def crypt_matches(password: bytes, hashed: str) -> bool:
    """Whether ``password`` hashes to ``hashed`` with crypt(3); False without libcrypt."""
    if _CRYPT is None or b"\0" in password:
        return False
    result = _CRYPT(password, hashed.encode())
    # Failures are NULL or a string starting with "*" (libxcrypt's failure tokens).
    return (
        result is not None
        and not result.startswith(b"*")
        and hmac.compare_digest(result, hashed.encode())
    )
