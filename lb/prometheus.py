"""Prometheus text rendering of the exporter's page.

HAProxy's `http-request use-service prometheus-exporter` (addons/promex): the exporter's
metric names (`haproxy_frontend_current_sessions`, `haproxy_server_status{state="UP"}`, ...)
plus ours for TLS: `haproxy_frontend_ssl_handshakes_total` and
`haproxy_frontend_ssl_handshake_failures_total{reason="expired"}`, in the text exposition
format 0.0.4. The page is served by lb.stats (`PrometheusEndpoint`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from lb.counters import CounterSnapshot, backend_up, check_status, server_state

if TYPE_CHECKING:
    from lb.process import Runtime

#: HAProxy's check status names (include/haproxy/check-t.h), the promex label values.
CHECK_STATUSES = (
    "HANA", "SOCKERR", "L4OK", "L4TOUT", "L4CON", "L6OK", "L6TOUT", "L6RSP", "L7TOUT",
    "L7RSP", "L7OK", "L7OKC", "L7STS", "PROCERR", "PROCTOUT", "PROCOK",
)  # fmt: skip
SERVER_STATES = ("DOWN", "UP", "MAINT", "DRAIN", "NOLB")


class MetricWriter:
    """Accumulates Prometheus text exposition (format 0.0.4)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[dict[str, str], float | int]],
    ) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (
        f'{key}="{value.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for key, value in labels.items()
    )
    return "{" + ",".join(escaped) + "}"


def _number(value: float | int) -> str:
    if isinstance(value, float) and not value.is_integer():
        return repr(value)
    return str(int(value))


def render_prometheus(runtime: Runtime, totals: CounterSnapshot) -> str:
    """The exporter's page: process, frontend, backend and server families. Counters come
    from `totals` (every worker's, summed); states from this process, which every worker
    shares (lb.control)."""
    out = MetricWriter()
    frontends = runtime.frontends
    backends = list(runtime.backends.values())
    counters = runtime.counters
    process = totals.process
    out.family(
        "haproxy_process_nbthread",
        "gauge",
        "Number of started threads (global.nbthread)",
        [({}, runtime.config.global_.nbthread or 1)],
    )
    out.family(
        "haproxy_process_start_time_seconds",
        "gauge",
        "Start time in seconds",
        [({}, int(counters.started))],
    )
    out.family(
        "haproxy_process_current_connections",
        "gauge",
        "Number of active sessions",
        [({}, process["current"])],
    )
    out.family(
        "haproxy_process_connections_total",
        "counter",
        "Total number of created sessions",
        [({}, process["total"])],
    )
    out.family(
        "haproxy_process_dropped_logs_total",
        "counter",
        "Total number of dropped logs",
        [({}, process["dropped_logs"])],
    )
    out.family(
        "haproxy_process_stopping",
        "gauge",
        "Non zero means stopping in progress",
        [({}, process["stopping"])],
    )

    def per_frontend(field: str) -> list[tuple[dict[str, str], float | int]]:
        return [({"proxy": f.name}, totals.frontend(f.name)[field]) for f in frontends]

    out.family(
        "haproxy_frontend_status",
        "gauge",
        "Current status of the service, per state label value.",
        [
            ({"proxy": f.name, "state": state}, int((state == "UP") == f.accepting_enabled))
            for f in frontends
            for state in ("DOWN", "UP")
        ],
    )
    out.family(
        "haproxy_frontend_current_sessions",
        "gauge",
        "Number of current sessions on the frontend, backend or server",
        per_frontend("current"),
    )
    out.family(
        "haproxy_frontend_max_sessions",
        "gauge",
        "Highest value of current sessions encountered since process started",
        per_frontend("max_sessions"),
    )
    out.family(
        "haproxy_frontend_limit_sessions",
        "gauge",
        "Frontend/listener/server's maxconn, backend's fullconn",
        [({"proxy": f.name}, f.maxconn or runtime.config.global_.maxconn or 0) for f in frontends],
    )
    out.family(
        "haproxy_frontend_sessions_total",
        "counter",
        "Total number of sessions since process started",
        per_frontend("total"),
    )
    out.family(
        "haproxy_frontend_bytes_in_total",
        "counter",
        "Total number of request bytes since process started",
        per_frontend("bytes_in"),
    )
    out.family(
        "haproxy_frontend_bytes_out_total",
        "counter",
        "Total number of response bytes since process started",
        per_frontend("bytes_out"),
    )
    out.family(
        "haproxy_frontend_connections_total",
        "counter",
        "Total number of new connections accepted since the worker process started",
        per_frontend("connections_total"),
    )
    out.family(
        "haproxy_frontend_ssl_handshakes_total",
        "counter",
        "Total number of completed TLS handshakes (lb)",
        per_frontend("handshakes"),
    )
    out.family(
        "haproxy_frontend_ssl_handshake_failures_total",
        "counter",
        "Total number of refused TLS handshakes, per reason (lb)",
        [
            ({"proxy": f.name, "reason": reason}, count)
            for f in frontends
            for reason, count in sorted(totals.failures.get(f.name, Counter()).items())
            if count
        ],
    )
    out.family(
        "haproxy_frontend_revoked_sessions_closed_total",
        "counter",
        "Sessions closed because a reloaded CRL revoked their certificate (lb)",
        per_frontend("revoked_closed"),
    )

    def per_backend(field: str) -> list[tuple[dict[str, str], float | int]]:
        return [({"proxy": b.name}, totals.backend(b.name)[field]) for b in backends]

    out.family(
        "haproxy_backend_status",
        "gauge",
        "Current status of the service, per state label value.",
        [
            ({"proxy": b.name, "state": state}, int((state == "UP") == backend_up(b)))
            for b in backends
            for state in ("DOWN", "UP")
        ],
    )
    out.family(
        "haproxy_backend_current_queue",
        "gauge",
        "Number of current queued connections",
        per_backend("queue"),
    )
    out.family(
        "haproxy_backend_current_sessions",
        "gauge",
        "Number of current sessions on the frontend, backend or server",
        per_backend("current"),
    )
    out.family(
        "haproxy_backend_max_sessions",
        "gauge",
        "Highest value of current sessions encountered since process started",
        per_backend("max_sessions"),
    )
    out.family(
        "haproxy_backend_sessions_total",
        "counter",
        "Total number of sessions since process started",
        per_backend("sessions_total"),
    )
    out.family(
        "haproxy_backend_bytes_in_total",
        "counter",
        "Total number of request bytes since process started",
        per_backend("bytes_in"),
    )
    out.family(
        "haproxy_backend_bytes_out_total",
        "counter",
        "Total number of response bytes since process started",
        per_backend("bytes_out"),
    )
    out.family(
        "haproxy_backend_connection_errors_total",
        "counter",
        "Total number of failed connections to server since the worker process started",
        per_backend("failed"),
    )
    out.family(
        "haproxy_backend_active_servers",
        "gauge",
        "Total number of active UP servers with a non-zero weight",
        [
            (
                {"proxy": b.name},
                sum(1 for s in b.servers if server_state(s) == "UP" and s.effective_weight > 0),
            )
            for b in backends
        ],
    )

    servers = [(b, s) for b in backends for s in b.servers]

    def per_server(field: str) -> list[tuple[dict[str, str], float | int]]:
        return [
            ({"proxy": b.name, "server": s.name}, totals.server(b.name, s.name)[field])
            for b, s in servers
        ]

    out.family(
        "haproxy_server_status",
        "gauge",
        "Current status of the service, per state label value.",
        [
            ({"proxy": b.name, "server": s.name, "state": state}, int(server_state(s) == state))
            for b, s in servers
            for state in SERVER_STATES
        ],
    )
    out.family(
        "haproxy_server_current_queue",
        "gauge",
        "Number of current queued connections",
        per_server("queue"),
    )
    out.family(
        "haproxy_server_current_sessions",
        "gauge",
        "Number of current sessions on the frontend, backend or server",
        per_server("current"),
    )
    out.family(
        "haproxy_server_max_sessions",
        "gauge",
        "Highest value of current sessions encountered since process started",
        per_server("max_sessions"),
    )
    out.family(
        "haproxy_server_sessions_total",
        "counter",
        "Total number of sessions since process started",
        per_server("sessions_total"),
    )
    out.family(
        "haproxy_server_bytes_in_total",
        "counter",
        "Total number of request bytes since process started",
        per_server("bytes_in"),
    )
    out.family(
        "haproxy_server_bytes_out_total",
        "counter",
        "Total number of response bytes since process started",
        per_server("bytes_out"),
    )
    out.family(
        "haproxy_server_connection_errors_total",
        "counter",
        "Total number of failed connections to server since the worker process started",
        per_server("failed"),
    )
    out.family(
        "haproxy_server_weight",
        "gauge",
        "Server's effective weight, or sum of active servers' effective weights for a backend",
        [({"proxy": b.name, "server": s.name}, s.effective_weight) for b, s in servers],
    )
    checked = [(b, s, status) for b, s in servers if (status := check_status(s)) is not None]
    out.family(
        "haproxy_server_check_status",
        "gauge",
        "Status of last health check, per state label value.",
        [
            ({"proxy": b.name, "server": s.name, "state": state}, int(status == state))
            for b, s, status in checked
            for state in CHECK_STATUSES
        ],
    )
    return out.text()
