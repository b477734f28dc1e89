"""Counters, and server states as HAProxy names them.

Owns what the data path counts and how an operator reads it (lb.prometheus, lb.runtime_api):

- **Counters** that the data path bumps (`FrontendCounters`, `TrafficCounters` for backends
  and servers); current values (sessions, connections) are read from the runtime objects.
- **Counters of every worker**: with `nbthread` > 1 (lb.workers) each worker's counters are
  gathered through the master (`CounterSnapshot`, summed; maxima are the largest of any
  worker). Counters start again from zero on a reload, as HAProxy's do.
- **Server states** as HAProxy's `show stat` status column and promex labels name them
  (management.txt 9.1).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lb.process import Runtime
    from lb.server import BackendState, ServerState

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
    handshake_failures: dict[str, int] = field(default_factory=dict)  # by Refusal.label
    revoked_closed: int = 0
    proxy_headers_oversize: int = 0  # PROXY v2 headers built over a server's proxy-v2-max-size

    @property
    def handshake_failures_total(self) -> int:
        return sum(self.handshake_failures.values())


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
MAX_FIELDS = frozenset(
    {
        "max_sessions",
        "accepting",
        "stopping",
        "listeners",
        # Rates every worker reads over all of them (lb.event_rate): the same number each.
        "conn_rate",
        "conn_rate_max",
        "ssl_rate",
        "ssl_rate_max",
        "rate",
        "rate_max",
    }
)


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
        resource_errors=runtime.process.resource_errors,
        rate_pauses=runtime.process.rate_pauses,
    )
    for name, rate in (
        ("conn_rate", runtime.process.conn_rate),
        ("ssl_rate", runtime.process.ssl_rate),
    ):
        if rate is not None:
            snapshot.process[name] = rate.rate()
            snapshot.process[f"{name}_max"] = rate.seen_max
    for f in frontends:
        snapshot.frontends[f.name] = Counter(
            current=f.current,
            max_sessions=f.counters.max_sessions,
            total=f.counters.connections_total,
            bytes_in=f.counters.bytes_in,
            bytes_out=f.counters.bytes_out,
            connections_total=f.counters.connections_total,
            handshakes=f.counters.handshakes_total,
            handshake_failures=f.counters.handshake_failures_total,
            revoked_closed=f.counters.revoked_closed,
            dropped_logs=f.log.dropped,
            accepting=int(f.accepting_enabled),
            rate=f.session_rate.rate(),
            rate_max=f.session_rate.seen_max,
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


def backend_up(backend: BackendState) -> bool:
    return any(server_state(s) in ("UP", "DRAIN") for s in backend.servers)
