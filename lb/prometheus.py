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
service; with `nbthread` > 1 (lb.workers) the lead worker serves it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from lb.counters import (
    CounterSnapshot,
    Row,
    backend_up,
    check_status,
    merge_snapshots,
    server_state,
)

if TYPE_CHECKING:
    from lb.frontend import FrontendRuntime
    from lb.process import Runtime
    from lb.server import BackendState, ServerState

#: How long an HTTP client may take to send its request.
REQUEST_TIMEOUT = 10.0

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
    """A minimal HTTP/1.1 responder: `GET /metrics` (or `/`) answers the exporter's page."""

    def __init__(self, runtime: Runtime, name: str) -> None:
        self.runtime = runtime
        self.name = name
        self.servers: list[asyncio.AbstractServer] = []

    async def start(self, sockets: list[socket.socket]) -> None:
        for sock in sockets:
            server = await asyncio.start_server(self.handle, sock=sock)
            self.servers.append(server)

    def close(self) -> None:
        for server in self.servers:
            server.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                    return
                request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
                parts = request_line.split()
                headers = head.decode("latin-1").lower()
                keep_alive = "connection: close" not in headers and request_line.endswith("1.1")
                if len(parts) != 3 or parts[0] not in ("GET", "HEAD"):
                    status, body = "405 Method Not Allowed", b"only GET\n"
                elif parts[1].split("?")[0] not in ("/metrics", "/"):
                    status, body = "404 Not Found", b"not found: try /metrics\n"
                else:
                    totals = merge_snapshots(await self.runtime.gather_counters())
                    status, body = "200 OK", render_prometheus(self.runtime, totals).encode()
                content_type = (
                    "text/plain; version=0.0.4" if status.startswith("200") else ("text/plain")
                )
                writer.write(
                    (
                        f"HTTP/1.1 {status}\r\ncache-control: no-cache\r\n"
                        f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
                        f"connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
                    ).encode()
                    + (body if parts and parts[0] != "HEAD" else b"")
                )
                await writer.drain()
                if not keep_alive:
                    return
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()
