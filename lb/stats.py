"""Counters, the Prometheus endpoint and the runtime API (`stats socket`).

Owns what an operator reads and changes while lb runs:

- **Counters** that the data path bumps (`FrontendCounters`, `TrafficCounters` for backends
  and servers); current values (sessions, connections) are read from the runtime objects.
- **Prometheus** (HAProxy's `http-request use-service prometheus-exporter`,
  addons/promex): `GET /metrics` on the binds of a frontend that names the service, with
  the exporter's metric names (`haproxy_frontend_current_sessions`,
  `haproxy_server_status{state="UP"}`, ...) plus ours for TLS:
  `haproxy_frontend_ssl_handshakes_total` and
  `haproxy_frontend_ssl_handshake_failures_total{reason="expired"}`.
- **The runtime API** on `stats socket <path> mode 600 level admin` (management.txt 9.3):
  one command line per connection (or `prompt` for an interactive session), commands
  separated by `;`, a payload after `<<` ending with an empty line, each answer followed
  by an empty line, so `echo "show stat" | socat - UNIX:/path/lb.sock` works as it does
  with HAProxy. `show stat` prints HAProxy 2.6's CSV columns; server state changes go
  through the backend's balancer.

With `nbthread` > 1 (lb.workers), one worker, the lead, serves both; every answer covers
the whole process tree: counters are every worker's, gathered through the master
(`CounterSnapshot`, summed; maxima are the largest of any worker), `show sess` lists every
worker's sessions, and each change (`set server`, `commit ssl cert`, `reload ssl`) is made
here and then relayed to every other worker and kept for the workers of the next reload
(lb.control). Counters start again from zero on a reload, as HAProxy's do.

Every served socket is handed in already bound (the master opens them; see lb.workers), or
opened here when lb runs without a master.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lb import __version__
from lb.config.model import Bind, StatsSocket

if TYPE_CHECKING:
    from lb.process import Runtime
    from lb.server import BackendState, ServerState
    from lb.tls import VerifyFailure

logger = logging.getLogger(__name__)

#: A runtime API command line, or an HTTP request head, longer than this is refused.
MAX_COMMAND_LINE = 64 * 1024
#: A `set ssl cert` payload larger than this is refused.
MAX_PAYLOAD = 1024 * 1024
#: How long a non-interactive runtime API client may take to send its command.
COMMAND_TIMEOUT = 10.0
#: Idle timeout of an interactive (`prompt`) session, as HAProxy's `stats timeout` default.
PROMPT_TIMEOUT = 10.0

#: HAProxy 2.6 `show stat` columns (management.txt 9.1), in order.
STAT_COLUMNS: tuple[str, ...] = tuple(
    """
pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,
eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,
qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,
check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,
hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,
comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,
ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,
check_fall,check_health,agent_rise,agent_fall,agent_health,addr,cookie,mode,algo,
conn_rate,conn_rate_max,conn_tot,intercepted,dcon,dses,wrew,connect,reuse,
cache_lookups,cache_hits,srv_icur,src_ilim,qtime_max,ctime_max,rtime_max,ttime_max,
eint,idle_conn_cur,safe_conn_cur,used_conn_cur,need_conn_est,uweight,
agg_server_status,agg_server_check_status,agg_check_status,-,ssl_sess,
ssl_reused_sess,ssl_failed_handshake,h2_headers_rcvd,h2_data_rcvd,h2_settings_rcvd,
h2_rst_stream_rcvd,h2_goaway_rcvd,h2_detected_conn_protocol_errors,
h2_detected_strm_protocol_errors,h2_rst_stream_resp,h2_goaway_resp,h2_open_connections,
h2_backend_open_streams,h2_total_connections,h2_backend_total_streams,
h1_open_connections,h1_open_streams,h1_total_connections,h1_total_streams,h1_bytes_in,
h1_bytes_out,h1_spliced_bytes_in,h1_spliced_bytes_out
""".replace("\n", "").split(",")
)  # fmt: skip

#: HAProxy's check status names (include/haproxy/check-t.h), the promex label values.
CHECK_STATUSES = (
    "HANA", "SOCKERR", "L4OK", "L4TOUT", "L4CON", "L6OK", "L6TOUT", "L6RSP", "L7TOUT",
    "L7RSP", "L7OK", "L7OKC", "L7STS", "PROCERR", "PROCTOUT", "PROCOK",
)  # fmt: skip
#: Codes of `show servers state` srv_check_status (HCHK_STATUS_*).
CHECK_STATUS_CODES = {
    "UNK": 0, "INI": 1, "START": 2, "HANA": 3, "SOCKERR": 4, "L4OK": 5, "L4TOUT": 6,
    "L4CON": 7, "L6OK": 8, "L6TOUT": 9, "L6RSP": 10, "L7TOUT": 11, "L7RSP": 12, "L7OK": 13,
    "L7OKC": 14, "L7STS": 15, "PROCERR": 16, "PROCTOUT": 17, "PROCOK": 18,
}  # fmt: skip
SERVER_STATES = ("DOWN", "UP", "MAINT", "DRAIN", "NOLB")


# --------------------------------------------------------------------------------------------
# Counters


@dataclass(slots=True)
class TrafficCounters:
    """Cumulative counters of a backend or a server."""

    sessions_total: int = 0
    max_sessions: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    client_aborts: int = 0
    server_aborts: int = 0
    last_session: float = 0.0


@dataclass(slots=True)
class FrontendCounters:
    """Cumulative counters of a frontend."""

    connections_total: int = 0
    max_sessions: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    handshakes_total: int = 0
    handshake_failures: dict[str, int] = field(default_factory=dict)
    revoked_closed: int = 0

    @property
    def handshake_failures_total(self) -> int:
        return sum(self.handshake_failures.values())


#: Reason labels of refused handshakes by OpenSSL X509_V_ERR id.
FAILURE_LABELS = {
    9: "not_yet_valid",
    10: "expired",
    23: "revoked",
    2: "unknown_ca",
    20: "unknown_ca",
    21: "unknown_ca",
    18: "self_signed",
    19: "self_signed",
    3: "crl_missing",
    11: "crl_invalid",
    12: "crl_expired",
    26: "bad_purpose",
    22: "chain_too_long",
    24: "invalid_ca",
    25: "path_length",
    7: "bad_signature",
}


def failure_label(reason: str, failure: VerifyFailure | None) -> str:
    """A short, bounded label for a refused handshake (a Prometheus label value)."""
    if failure is not None:
        return FAILURE_LABELS.get(failure.code, "verify_other")
    lowered = reason.lower()
    if "no client certificate" in lowered:
        return "no_certificate"
    if "timeout" in lowered:
        return "timeout"
    if "closed during" in lowered:
        return "client_closed"
    if "protocol version" in lowered:
        return "protocol_version"
    if "no shared cipher" in lowered:
        return "no_shared_cipher"
    if "not a tls" in lowered or "plain http" in lowered:
        return "not_tls"
    return "other"


class ProcessCounters:
    """The counters of one process, for the backends and servers its frontends use."""

    def __init__(self) -> None:
        self.backends: dict[str, TrafficCounters] = {}
        self.servers: dict[tuple[str, str], TrafficCounters] = {}
        self.started = time.time()

    def backend(self, name: str) -> TrafficCounters:
        counters = self.backends.get(name)
        if counters is None:
            counters = self.backends[name] = TrafficCounters()
        return counters

    def server(self, backend: str, server: str) -> TrafficCounters:
        key = (backend, server)
        counters = self.servers.get(key)
        if counters is None:
            counters = self.servers[key] = TrafficCounters()
        return counters


# --------------------------------------------------------------------------------------------
# Counters of every worker

Row = Counter[str]

#: Fields whose merge across workers is the largest value, not the sum: a maximum seen by
#: one worker (so `smax` is a lower bound of the true maximum), and flags.
MAX_FIELDS = frozenset({"max_sessions", "accepting", "stopping", "listeners"})


@dataclass(slots=True)
class CounterSnapshot:
    """The counters of one worker, or the sum of several (`merge_snapshots`), in a shape
    that crosses the control channel as JSON (lb.control). Reading a missing field gives 0."""

    worker: int = 0
    pid: int = 0
    process: Row = field(default_factory=Counter)
    frontends: dict[str, Row] = field(default_factory=dict)
    failures: dict[str, Row] = field(default_factory=dict)  # frontend -> reason -> count
    backends: dict[str, Row] = field(default_factory=dict)
    servers: dict[str, Row] = field(default_factory=dict)  # "backend/server"

    def frontend(self, name: str) -> Row:
        return self.frontends.get(name) or Counter()

    def backend(self, name: str) -> Row:
        return self.backends.get(name) or Counter()

    def server(self, backend: str, server: str) -> Row:
        return self.servers.get(f"{backend}/{server}") or Counter()

    def to_json(self) -> dict[str, object]:
        return {
            "worker": self.worker,
            "pid": self.pid,
            "process": dict(self.process),
            "frontends": {k: dict(v) for k, v in self.frontends.items()},
            "failures": {k: dict(v) for k, v in self.failures.items()},
            "backends": {k: dict(v) for k, v in self.backends.items()},
            "servers": {k: dict(v) for k, v in self.servers.items()},
        }

    @classmethod
    def from_json(cls, data: object) -> CounterSnapshot:
        if not isinstance(data, dict):
            raise ValueError("a counter snapshot is an object")

        def rows(name: str) -> dict[str, Row]:
            value = data.get(name) or {}
            return {
                str(k): Counter({str(f): int(n) for f, n in v.items()}) for k, v in value.items()
            }

        return cls(
            worker=int(data.get("worker", 0)),
            pid=int(data.get("pid", 0)),
            process=Counter({str(f): int(n) for f, n in (data.get("process") or {}).items()}),
            frontends=rows("frontends"),
            failures=rows("failures"),
            backends=rows("backends"),
            servers=rows("servers"),
        )


def take_snapshot(runtime: Runtime) -> CounterSnapshot:
    """This process's counters."""
    counters = runtime.counters
    snapshot = CounterSnapshot(worker=runtime.worker_number, pid=os.getpid())
    frontends = runtime.frontends
    snapshot.process.update(
        current=runtime.process.current,
        total=runtime.process.total,
        ssl_current=sum(f.current for f in frontends if f.has_ssl),
        handshakes=sum(f.counters.handshakes_total for f in frontends),
        handshake_failures=sum(f.counters.handshake_failures_total for f in frontends),
        dropped_logs=sum(f.log.dropped for f in frontends),
        listeners=sum(len(f.listeners) for f in frontends),
        stopping=int(runtime.stopping),
    )
    for f in frontends:
        snapshot.frontends[f.name] = Counter(
            current=f.current,
            max_sessions=f.counters.max_sessions,
            total=f.total,
            bytes_in=f.counters.bytes_in,
            bytes_out=f.counters.bytes_out,
            connections_total=f.counters.connections_total,
            handshakes=f.counters.handshakes_total,
            handshake_failures=f.counters.handshake_failures_total,
            revoked_closed=f.counters.revoked_closed,
            dropped_logs=f.log.dropped,
            accepting=int(f.accepting_enabled),
        )
        snapshot.failures[f.name] = Counter(f.counters.handshake_failures)
    for backend in runtime.backends.values():
        total = counters.backend(backend.name)
        snapshot.backends[backend.name] = Counter(
            current=sum(s.active_connections for s in backend.servers),
            queue=backend.queued,
            max_sessions=total.max_sessions,
            sessions_total=total.sessions_total,
            bytes_in=total.bytes_in,
            bytes_out=total.bytes_out,
            failed=sum(s.failed_connections for s in backend.servers),
            lbtot=sum(s.total_connections for s in backend.servers),
        )
        for server in backend.servers:
            per = counters.server(backend.name, server.name)
            snapshot.servers[f"{backend.name}/{server.name}"] = Counter(
                current=server.active_connections,
                queue=len(server.queue),
                max_sessions=per.max_sessions,
                sessions_total=per.sessions_total,
                bytes_in=per.bytes_in,
                bytes_out=per.bytes_out,
                failed=server.failed_connections,
                lbtot=server.total_connections,
            )
    return snapshot


def _merge_rows(into: Row, row: Row) -> None:
    for name, value in row.items():
        into[name] = max(into[name], value) if name in MAX_FIELDS else into[name] + value


def merge_snapshots(snapshots: Iterable[CounterSnapshot]) -> CounterSnapshot:
    """The sum of every worker's counters (the largest value for MAX_FIELDS)."""
    merged = CounterSnapshot()
    for snapshot in snapshots:
        _merge_rows(merged.process, snapshot.process)
        for mine, theirs in (
            (merged.frontends, snapshot.frontends),
            (merged.failures, snapshot.failures),
            (merged.backends, snapshot.backends),
            (merged.servers, snapshot.servers),
        ):
            for name, row in theirs.items():
                _merge_rows(mine.setdefault(name, Counter()), row)
    return merged


# --------------------------------------------------------------------------------------------
# Server states as HAProxy names them


def server_state(server: ServerState) -> str:
    """UP, DOWN, MAINT, DRAIN or NOLB, as HAProxy's `status` column and promex labels."""
    admin = admin_state(server)
    if admin == "maint":
        return "MAINT"
    if not server.up:
        return "DOWN"
    if admin == "drain":
        return "DRAIN"
    return "UP"


def admin_state(server: ServerState) -> str:
    """ready, drain or maint (HAProxy's administrative state)."""
    return server.admin_state


def check_status(server: ServerState) -> str | None:
    """The last health check status (L4OK, L4CON, ...) when checks run, else None."""
    return server.check_status


# --------------------------------------------------------------------------------------------
# Prometheus text format


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
            ({"proxy": b.name, "state": state}, int((state == "UP") == _backend_up(b)))
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


def _backend_up(backend: BackendState) -> bool:
    return any(server_state(s) in ("UP", "DRAIN") for s in backend.servers)


# --------------------------------------------------------------------------------------------
# Served sockets


def open_stats_socket(config: StatsSocket) -> socket.socket:
    """Bind the unix socket of `stats socket <path> mode <octal>` (replacing a stale one)."""
    path = config.path
    if path.startswith("unix@"):
        path = path[len("unix@") :]
    if path.startswith("ipv4@") or (":" in path and not path.startswith("/")):
        host, _, port = path.removeprefix("ipv4@").rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host or "127.0.0.1", int(port)))
    else:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Created with the final mode: no window in which another user can connect.
        old_umask = os.umask(0o777 & ~(config.mode if config.mode is not None else 0o600))
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        if config.mode is not None:
            os.chmod(path, config.mode)
    sock.listen(64)
    sock.setblocking(False)
    return sock


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


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
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), COMMAND_TIMEOUT)
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


# --------------------------------------------------------------------------------------------
# The runtime API


class CommandError(Exception):
    """A runtime API command that cannot be done; the message is the answer."""


@dataclass(slots=True)
class CertificateTransaction:
    """`set ssl cert` staged a new PEM for a file; `commit ssl cert` makes it live."""

    path: str
    payload: bytes


HELP = """The following commands are valid at this level:
  help                                    : this message
  prompt                                  : toggle interactive mode with prompt
  quit                                    : disconnect
  show info                               : report information about the running process
  show stat                               : report counters for each proxy and server (CSV)
  show servers state [<backend>]          : dump volatile server information
  show sess                               : report the list of current sessions
  show activity                           : report accepted connections per worker
  show ssl cert [<certfile>]              : display the SSL certificates used in memory
  set ssl cert <certfile> <payload>       : replace a certificate file (then commit)
  commit ssl cert <certfile>              : commit a certificate file
  abort ssl cert <certfile>               : abort a transaction for a certificate file
  reload ssl [files]                      : re-read every crt, ca-file and crl-file now (lb)
  set server <bk>/<srv> state ready|drain|maint : change a server's state
  set server <bk>/<srv> weight <w>        : change a server's weight
  set weight <bk>/<srv> <w>               : change a server's weight
  get weight <bk>/<srv>                   : report a server's current weight
  disable server <bk>/<srv>               : put a server in maintenance
  enable server <bk>/<srv>                : take a server out of maintenance
"""

ADMIN_COMMANDS = ("set", "commit", "abort", "disable", "enable", "reload")


class RuntimeAPI:
    """The commands of `stats socket`, answered from one process's runtime objects."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.transactions: dict[str, CertificateTransaction] = {}
        self.servers: list[asyncio.AbstractServer] = []

    async def start(self, sockets: list[tuple[StatsSocket, socket.socket]]) -> None:
        for config, sock in sockets:

            async def handle(
                reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter,
                level: str = config.level,
            ) -> None:
                await self.session(reader, writer, level)

            if sock.family == socket.AF_UNIX:
                server = await asyncio.start_unix_server(handle, sock=sock, limit=MAX_PAYLOAD)
            else:
                server = await asyncio.start_server(handle, sock=sock, limit=MAX_PAYLOAD)
            self.servers.append(server)

    def close(self) -> None:
        for server in self.servers:
            server.close()

    async def session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, level: str
    ) -> None:
        interactive = False
        try:
            while True:
                timeout = PROMPT_TIMEOUT if interactive else COMMAND_TIMEOUT
                try:
                    raw = await asyncio.wait_for(reader.readline(), timeout)
                except (TimeoutError, ValueError, asyncio.LimitOverrunError):
                    return
                if not raw:
                    return
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                payload: bytes | None = None
                if line.rstrip().endswith("<<"):
                    line = line.rstrip()[:-2].rstrip()
                    payload = await self._read_payload(reader)
                answers: list[str] = []
                for command in (c.strip() for c in line.split(";")):
                    if not command:
                        continue
                    if command == "prompt":
                        interactive = not interactive
                        continue
                    if command == "quit":
                        writer.write("".join(answers).encode())
                        await writer.drain()
                        return
                    answers.append(await self.answer(command, payload, level))
                out = "".join(answers)
                if interactive:
                    out += "> "
                writer.write(out.encode())
                await writer.drain()
                if not interactive:
                    return
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()

    async def _read_payload(self, reader: asyncio.StreamReader) -> bytes:
        lines: list[bytes] = []
        size = 0
        while True:
            raw = await asyncio.wait_for(reader.readline(), COMMAND_TIMEOUT)
            if not raw or raw in (b"\n", b"\r\n"):
                return b"".join(lines)
            size += len(raw)
            if size > MAX_PAYLOAD:
                raise CommandError("payload too large")
            lines.append(raw)

    async def answer(self, command: str, payload: bytes | None, level: str) -> str:
        words = command.split()
        if words[0] in ADMIN_COMMANDS and level != "admin":
            return "Permission denied\n\n"
        try:
            text = await self.dispatch(words, payload)
        except CommandError as error:
            text = f"{error}\n"
        except Exception as error:  # an operator's command must never kill the worker
            logger.exception("runtime API command %r failed", command)
            text = f"Internal error: {error}\n"
        if text and not text.endswith("\n"):
            text += "\n"
        return text + "\n"

    async def dispatch(self, words: list[str], payload: bytes | None) -> str:
        match words:
            case ["help"]:
                return HELP
            case ["show", "info", *_]:
                return self.show_info(merge_snapshots(await self.runtime.gather_counters()))
            case ["show", "stat", *_]:
                return self.show_stat(merge_snapshots(await self.runtime.gather_counters()))
            case ["show", "activity", *_]:
                return self.show_activity(await self.runtime.gather_counters())
            case ["show", "servers", "state", *rest]:
                return self.show_servers_state(rest[0] if rest else None)
            case ["show", "sess", *_]:
                lines = await self.runtime.gather_sessions()
                return "".join(f"{line}\n" for line in lines)
            case ["show", "ssl", "cert", *rest]:
                return self.show_ssl_cert(rest[0] if rest else None)
            case ["set", "ssl", "cert", path]:
                return self.set_ssl_cert(path, payload)
            case ["commit", "ssl", "cert", path]:
                return self.commit_ssl_cert(path)
            case ["abort", "ssl", "cert", path]:
                if self.transactions.pop(path, None) is None:
                    raise CommandError("No ongoing transaction!")
                return f"Transaction aborted for certificate '{path}'!\n"
            case ["reload", "ssl", *_]:
                return self.runtime.reload_tls_everywhere()
            case ["set", "server", name, "state", state]:
                return self.set_server_state(name, state)
            case ["set", "server", name, "weight", weight]:
                return self.set_server_weight(name, weight)
            case ["set", "weight", name, weight]:
                return self.set_server_weight(name, weight)
            case ["get", "weight", name]:
                _backend, server = self.find_server(name)
                return f"{server.weight} (initial {server.config.weight})\n"
            case ["disable", "server", name]:
                return self.set_server_state(name, "maint")
            case ["enable", "server", name]:
                return self.set_server_state(name, "ready")
        raise CommandError(
            "Unknown command. Please enter one of the following commands only :\n" + HELP
        )

    # -- servers -------------------------------------------------------------------------------

    def find_server(self, name: str) -> tuple[BackendState, ServerState]:
        backend_name, _, server_name = name.partition("/")
        if not server_name:
            raise CommandError("Require 'backend/server'.")
        backend = self.runtime.backends.get(backend_name)
        if backend is None:
            raise CommandError("No such backend.")
        for server in backend.servers:
            if server.name == server_name:
                return backend, server
        raise CommandError("No such server.")

    def set_server_state(self, name: str, state: str) -> str:
        if state not in ("ready", "drain", "maint"):
            raise CommandError("'set server <srv> state' expects 'ready', 'drain' and 'maint'.")
        backend, server = self.find_server(name)
        before = server_state(server)
        backend.set_admin_state(server, state)
        self.runtime.publish_server(backend, server)
        after = server_state(server)
        if before != after:
            logging.getLogger("lb.server").warning(
                "Server %s/%s is %s (runtime API, was %s).",
                backend.name,
                server.name,
                after,
                before,
            )
        return ""

    def set_server_weight(self, name: str, value: str) -> str:
        backend, server = self.find_server(name)
        text = value.rstrip("%")
        if not text.isdigit():
            raise CommandError("Require <weight> or <weight%>.")
        weight = int(text)
        if value.endswith("%"):
            weight = server.config.weight * weight // 100
        if not 0 <= weight <= 256:
            raise CommandError("Weight must be between 0 and 256.")
        backend.set_weight(server, weight)
        self.runtime.publish_server(backend, server)
        return ""

    def show_servers_state(self, only: str | None) -> str:
        columns = (
            "be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
            "srv_iweight srv_time_since_last_change srv_check_status srv_check_result "
            "srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id "
            "srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr "
            "srv_agent_addr srv_agent_port"
        )
        lines = ["1", f"# {columns}"]
        backend_ids = self.runtime.proxy_ids()
        for backend in self.runtime.backends.values():
            if only is not None and backend.name != only:
                continue
            for index, server in enumerate(backend.servers, start=1):
                admin = {"ready": 0, "maint": 0x01, "drain": 0x08}[admin_state(server)]
                status = check_status(server)
                check_code = CHECK_STATUS_CODES.get(status or "", 0) if status else 0
                config = server.config
                lines.append(
                    " ".join(
                        str(v)
                        for v in (
                            backend_ids.get(("backend", backend.name), 0),
                            backend.name,
                            index,
                            server.name,
                            server.host,
                            2 if server.up else 0,
                            admin,
                            server.weight,
                            config.weight,
                            int(time.time() - self.runtime.counters.started),
                            check_code,
                            0,
                            config.rise if server.up else 0,
                            6 if config.check else 0,
                            0,
                            0,
                            0,
                            "-",
                            server.port or 0,
                            "-",
                            0,
                            config.check_port or 0,
                            config.check_addr or "-",
                            "-",
                            0,
                        )
                    )
                )
        return "\n".join(lines) + "\n"

    # -- statistics ------------------------------------------------------------------------------

    def show_info(self, totals: CounterSnapshot) -> str:
        runtime = self.runtime
        process = totals.process
        started = runtime.counters.started
        uptime = int(time.time() - started)
        days, rest = divmod(uptime, 86400)
        hours, rest = divmod(rest, 3600)
        minutes, seconds = divmod(rest, 60)
        fields = [
            ("Name", "lb"),
            ("Version", __version__),
            ("Nbthread", runtime.config.global_.nbthread or 1),
            ("Nbproc", 1),
            ("Process_num", runtime.worker_number),
            ("Pid", os.getpid()),
            ("Uptime", f"{days}d {hours}h{minutes:02d}m{seconds:02d}s"),
            ("Uptime_sec", uptime),
            ("Maxconn", runtime.config.global_.maxconn or 0),
            ("Hard_maxconn", runtime.config.global_.maxconn or 0),
            ("CurrConns", process["current"]),
            ("CumConns", process["total"]),
            ("CurrSslConns", process["ssl_current"]),
            ("CumSslConns", process["handshakes"]),
            ("SslFrontendHandshakeFailures", process["handshake_failures"]),
            ("Stopping", process["stopping"]),
            ("Listeners", process["listeners"]),
            ("DroppedLogs", process["dropped_logs"]),
            ("node", socket.gethostname()),
            ("Start_time_sec", int(started)),
        ]
        return "".join(f"{name}: {value}\n" for name, value in fields)

    def show_activity(self, snapshots: list[CounterSnapshot]) -> str:
        """HAProxy's `show activity` rows that lb has, one column per worker (HAProxy's
        columns are threads): `accepted: total [ worker1 worker2 ... ]`."""
        workers = sorted(snapshots, key=lambda snapshot: snapshot.worker)
        now = time.time()

        def row(name: str, values: list[int]) -> str:
            return f"{name}: {sum(values)} [ {' '.join(str(v) for v in values)} ]\n"

        return (
            f"thread_id: {self.runtime.worker_number} (1..{len(workers)})\n"
            f"date_now: {now:.6f}\n"
            f"uptime_now: {now - self.runtime.counters.started:.6f}\n"
            f"pid: {' '.join(str(s.pid) for s in workers)}\n"
            + row("accepted", [s.process["total"] for s in workers])
            + row("curr_conns", [s.process["current"] for s in workers])
        )

    def show_stat(self, totals: CounterSnapshot) -> str:
        runtime = self.runtime
        ids = runtime.proxy_ids()
        pid = runtime.worker_number
        rows: list[dict[str, object]] = []
        frontends = {f.name: f for f in runtime.frontends}
        for kind, name in sorted(ids, key=lambda key: ids[key]):
            if kind == "frontend" and name in frontends:
                f = frontends[name]
                fe = totals.frontend(name)
                rows.append(
                    {
                        "pxname": name,
                        "svname": "FRONTEND",
                        "scur": fe["current"],
                        "smax": fe["max_sessions"],
                        "slim": f.maxconn or runtime.config.global_.maxconn or "",
                        "stot": fe["total"],
                        "bin": fe["bytes_in"],
                        "bout": fe["bytes_out"],
                        "dreq": 0,
                        "dresp": 0,
                        "ereq": 0,
                        "status": "OPEN" if f.accepting_enabled else "STOP",
                        "pid": pid,
                        "iid": ids[(kind, name)],
                        "sid": 0,
                        "type": 0,
                        "mode": "tcp",
                        "conn_tot": fe["connections_total"],
                        "ssl_sess": fe["handshakes"] if f.has_ssl else "",
                        "ssl_failed_handshake": (fe["handshake_failures"] if f.has_ssl else ""),
                    }
                )
            elif kind == "backend" and name in runtime.backends:
                backend = runtime.backends[name]
                total = totals.backend(name)
                for index, server in enumerate(backend.servers, start=1):
                    per = totals.server(name, server.name)
                    status = check_status(server)
                    state = server_state(server)
                    rows.append(
                        {
                            "pxname": name,
                            "svname": server.name,
                            "qcur": per["queue"],
                            "qmax": 0,
                            "scur": per["current"],
                            "smax": per["max_sessions"],
                            "slim": server.config.maxconn or "",
                            "stot": per["sessions_total"],
                            "bin": per["bytes_in"],
                            "bout": per["bytes_out"],
                            "dresp": 0,
                            "econ": per["failed"],
                            "eresp": 0,
                            "wretr": 0,
                            "wredis": 0,
                            "status": state if server.config.check or state != "UP" else "no check",
                            "weight": server.effective_weight,
                            "act": 0 if server.config.backup else 1,
                            "bck": 1 if server.config.backup else 0,
                            "pid": pid,
                            "iid": ids[(kind, name)],
                            "sid": index,
                            "lbtot": per["lbtot"],
                            "type": 2,
                            "check_status": status or "",
                            "check_rise": server.config.rise if server.config.check else "",
                            "check_fall": server.config.fall if server.config.check else "",
                            "addr": f"{server.host}:{server.port or ''}",
                            "mode": "tcp",
                            "uweight": server.weight,
                        }
                    )
                rows.append(
                    {
                        "pxname": name,
                        "svname": "BACKEND",
                        "qcur": total["queue"],
                        "qmax": 0,
                        "scur": total["current"],
                        "smax": total["max_sessions"],
                        "slim": backend.config.fullconn or "",
                        "stot": total["sessions_total"],
                        "bin": total["bytes_in"],
                        "bout": total["bytes_out"],
                        "dreq": 0,
                        "dresp": 0,
                        "econ": total["failed"],
                        "eresp": 0,
                        "wretr": 0,
                        "wredis": 0,
                        "status": "UP" if _backend_up(backend) else "DOWN",
                        "weight": sum(s.effective_weight for s in backend.servers if s.usable),
                        "act": sum(1 for s in backend.servers if s.usable and not s.config.backup),
                        "bck": sum(1 for s in backend.servers if s.usable and s.config.backup),
                        "pid": pid,
                        "iid": ids[(kind, name)],
                        "sid": 0,
                        "lbtot": total["lbtot"],
                        "type": 1,
                        "mode": "tcp",
                        "algo": backend.config.balance,
                    }
                )
        lines = ["# " + ",".join(STAT_COLUMNS) + ","]
        for row in rows:
            lines.append(",".join(_csv(row.get(column, "")) for column in STAT_COLUMNS) + ",")
        return "\n".join(lines) + "\n"

    # -- certificates ------------------------------------------------------------------------

    def show_ssl_cert(self, path: str | None) -> str:
        contexts = self.runtime.bind_contexts()
        if path is None:
            lines = ["# transaction"]
            lines.extend(f"*{p}" for p in self.transactions)
            lines.append("# filename")
            seen: set[str] = set()
            for context in contexts:
                for bundle in context.bundles:
                    name = str(bundle.path)
                    if name not in seen:
                        seen.add(name)
                        lines.append(name)
            return "\n".join(lines) + "\n"
        from lb.tls import bundle_from_pem, describe_certificate

        transaction = self.transactions.get(path.lstrip("*"))
        if path.startswith("*"):
            if transaction is None:
                raise CommandError("No ongoing transaction!")
            bundle = bundle_from_pem(transaction.payload, transaction.path)
            return f"Filename: *{transaction.path}\nStatus: Uncommitted\n" + describe_certificate(
                bundle
            )
        for context in contexts:
            for bundle in context.bundles:
                if str(bundle.path) == path:
                    return f"Filename: {path}\nStatus: Used\n" + describe_certificate(bundle)
        raise CommandError(
            "Can't display the certificate: Not found or the certificate is a bundle!"
        )

    def set_ssl_cert(self, path: str, payload: bytes | None) -> str:
        from lb.tls import TLSFileError, bundle_from_pem

        if not payload:
            raise CommandError("'set ssl cert' expects a filename and a certificate as a payload")
        if not any(
            str(bundle.path) == path
            for context in self.runtime.bind_contexts()
            for bundle in context.bundles
        ):
            unknown = "Can't replace a certificate which is not referenced by the configuration!"
            raise CommandError(f"{unknown} ({path})")
        try:
            bundle_from_pem(payload, path)
        except TLSFileError as error:
            raise CommandError(f"Can't update {path}: {error.reason}") from None
        self.transactions[path] = CertificateTransaction(path, payload)
        return f"Transaction created for certificate {path}!\n"

    def commit_ssl_cert(self, path: str) -> str:
        from lb.tls import bundle_from_pem

        transaction = self.transactions.pop(path, None)
        if transaction is None:
            raise CommandError("No ongoing transaction!")
        from lb.control import CertRecord, apply_cert
        from lb.tls import file_signature

        record = CertRecord(path, transaction.payload, file_signature([Path(path)]))
        bundle_from_pem(record.pem, path)  # validated by `set ssl cert`; raises if not
        updated = apply_cert(self.runtime.bind_contexts(), record, at_start=False)
        self.runtime.publish_cert(record)
        logger.warning("runtime API: certificate %s replaced on %d bind line(s)", path, updated)
        return f"Committing {path}\nSuccess!\n"


def session_lines(runtime: Runtime) -> list[str]:
    """`show sess`: one line per session of this process."""
    lines = []
    now = runtime.loop.time()
    for frontend in runtime.frontends:
        for client in list(frontend.sessions):
            server = client.server
            lines.append(
                f"0x{id(client):x}: proto=tcpv4 src={client.peer[0]}:{client.peer[1]} "
                f"fe={frontend.name} be={frontend.backend.name} "
                f"srv={server.name if server is not None else '<none>'} "
                f"age={int(now - client.accept_time)}s "
                f"ssl={'1' if client.tls is not None else '0'} "
                f"cn={(client.ssl_info.cn if client.ssl_info else None) or '-'} "
                f"bytes_in={client.bytes_in} bytes_out={client.bytes_out} "
                f"pid={os.getpid()}"
            )
    return lines


def _csv(value: object) -> str:
    text = str(value)
    if "," in text or '"' in text:
        return '"' + text.replace('"', '""') + '"'
    return text


def stats_binds(binds: Iterable[Bind]) -> list[Bind]:
    return list(binds)
