"""Files per worker: what `maxconn` needs, what a process may open, and what lb does about
the difference, in HAProxy 2.6's words.

HAProxy sizes `maxsock`, the descriptors one process may need, at start (haproxy.c): two
per connection (the client's and the server's), one per listener and per checked server,
the stats socket frontend's own maxconn (10), three per thread (the poller and its wake-up
pipe) and 10 more. It raises RLIMIT_NOFILE to that, and when the hard limit is lower:
- with `strict-limits` (the default) it refuses to start, checked with 2.6.12 and
  `maxconn 500000` here:
  `[ALERT]    (17586) : [haproxy.main()] Cannot raise FD limit to 1000017, limit is 20000.`
- with `no strict-limits` it says so as a warning plus an alert ("FD limit (20000) too low
  for maxconn=500000/maxsock=1000028. Please raise 'ulimit-n' to 1000028 or more to avoid
  any trouble.") and runs with the maxconn it cannot serve.
Without a global `maxconn` it takes what the limit allows, (limit - the rest) / 2
(compute_ideal_maxconn: 9,986 here with one listener, a stats socket and two threads).
`haproxy -c` says nothing about any of it.

lb's workers are processes, each with a limit of its own, and the `nbthread` workers share
the global `maxconn` as HAProxy's threads do: one count of all their sessions bounds it
(lb.shared_counts), and each worker may hold as many as its files allow. The kernel spreads
connections over their SO_REUSEPORT sockets by hash (lb.workers), evenly on average, so the
configuration must let each worker hold its even share, ceil(maxconn / nbthread), and
`maxconn 100000` needs 11 workers under a 20,000-file limit; the words say so. What a
worker needs besides its sessions is counted as HAProxy counts it: listeners (every socket
the master gives it), checked servers, log sockets, 10 per stats socket and Prometheus
listener (their clients), and WORKER_BASE for the process itself.

Where lb differs, on purpose:
- `no strict-limits`: lb lowers each worker's maxconn to what fits (and says so) instead of
  keeping one it cannot serve; HAProxy then fails accept() and server connections with
  EMFILE, and its health checks mark healthy servers DOWN ("Too many sockets on the
  process"), seen with 2.6.12 at a 64-file limit.
- `lb -c` warns when the limit it runs under cannot serve the configured maxconn; a
  systemd unit's ExecStartPre runs under the unit's LimitNOFILE, so the check sees what the
  start will see.

`plan()` is pure arithmetic on a Config and a limit; `raise_soft_limit()` is the one call
that changes the process (soft limit up to the hard one, or to `fd-hard-limit`).
"""

from __future__ import annotations

import errno
import math
import resource
from dataclasses import dataclass
from pathlib import Path

from lb.config.errors import Diagnostic
from lb.config.model import Config

#: Descriptors a worker holds whatever its configuration, and room for those that come and
#: go. An idle worker of the demo's configuration holds 17 (stdio and two log files,
#: uvloop's epoll, eventfd, io_uring and five pipes, the control socket, two listeners;
#: Linux 6.18, uvloop 0.21); the rest is room, as HAProxy's 10, for a certificate, CA or
#: CRL file being re-read and the like.
WORKER_BASE = 32
#: Clients of one stats socket or Prometheus listener counted per worker: HAProxy's stats
#: frontend maxconn (10).
SERVICE_CONNECTIONS = 10
#: Each session holds two descriptors: the client's socket and the server's.
PER_SESSION = 2
#: HAProxy 2.6's floor for a computed maxconn: with `fd-hard-limit 200` and no maxconn it
#: refuses to start ("Cannot raise FD limit to 228, limit is 200": 100 sessions).
MIN_AUTO_MAXCONN = 100


#: errno values that mean "this process or the system is out of something", not "this
#: client or server misbehaved": accept() pauses, and a connect is not held against the
#: server (lb.frontend, lb.datapath, lb.checks).
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def resource_words(error_number: int | None) -> str:
    """HAProxy's words for a resource error (conn_err_code_str: CO_ER_PROC_FDLIM,
    CO_ER_SYS_FDLIM, CO_ER_SYS_MEMLIM)."""
    if error_number == errno.EMFILE:
        return "Too many sockets on the process"
    if error_number == errno.ENFILE:
        return "Too many sockets on the system"
    return "Out of system buffers"


@dataclass(frozen=True, slots=True)
class FilePlan:
    """How many sessions each worker takes, and what that needs in files."""

    limit: int  # files one process may open (the soft limit once raised)
    workers: int  # nbthread
    fixed: int  # descriptors a worker needs besides its sessions
    maxconn: int | None  # the global maxconn as configured (None: automatic)
    strict: bool  # strict-limits
    worker_maxconn: int  # sessions one worker may hold (the workers' sum is bounded by maxconn)

    @property
    def share(self) -> int:
        """Sessions one worker must take for the configured maxconn (or what fits)."""
        if self.maxconn is None:
            return self.worker_maxconn
        return math.ceil(self.maxconn / self.workers)

    @property
    def needed(self) -> int:
        """HAProxy's maxsock for one worker: what its share of maxconn needs."""
        return self.fixed + PER_SESSION * self.share

    @property
    def room(self) -> int:
        """Sessions one worker can hold within the limit."""
        return max((self.limit - self.fixed) // PER_SESSION, 0)

    @property
    def fits(self) -> bool:
        return self.needed <= self.limit

    @property
    def total_maxconn(self) -> int:
        """The sessions all workers may hold together."""
        total = self.worker_maxconn * self.workers
        return total if self.maxconn is None else min(self.maxconn, total)

    @property
    def workers_needed(self) -> int:
        """The nbthread at which the configured maxconn fits this limit, if any does."""
        if self.maxconn is None or self.room <= 0:
            return self.workers
        return max(math.ceil(self.maxconn / self.room), self.workers)

    def advice(self) -> str:
        """What to change, in words: the limit, maxconn, or the number of workers."""
        options = [
            f"raise the limit to {self.needed} (LimitNOFILE= in the systemd unit, "
            "'ulimit -n' in the shell that starts lb)"
        ]
        if self.room > 0:
            options.append(f"lower 'maxconn' to {self.room * self.workers}")
            options.append(
                f"spread it over more workers with 'nbthread {self.workers_needed}' "
                f"({math.ceil((self.maxconn or 0) / self.workers_needed)} sessions each)"
            )
        return "; or ".join(options)

    def explain(self) -> str:
        """Where `needed` comes from, and the way out."""
        if self.maxconn is None:
            given = (
                f"with no global 'maxconn', each worker takes what its files allow, and at "
                f"least {MIN_AUTO_MAXCONN} sessions (as HAProxy)"
            )
            advice = f"raise the limit to {self.needed}"
        else:
            given = (
                f"global 'maxconn {self.maxconn}' with 'nbthread {self.workers}' is "
                f"{self.share} sessions for each worker process"
            )
            advice = self.advice()
        return (
            f"{given}, {PER_SESSION} file descriptors each (client and server side) plus "
            f"{self.fixed} for its listeners, health checks and itself: {self.needed} per "
            f"worker, and a process may open {self.limit} here. "
            f"{advice[0].upper()}{advice[1:]}."
        )


def fixed_descriptors(config: Config) -> int:
    """Descriptors one worker needs besides its sessions (HAProxy's maxsock without the
    2 x maxconn)."""
    listeners = 0
    services = len(config.global_.stats_socket)
    for frontend in config.frontends:
        prometheus = frontend.http_request_use_service == "prometheus-exporter"
        if frontend.default_backend is None and not prometheus:
            continue  # not started (lb.process)
        listeners += len(frontend.binds)
        if prometheus:
            services += len(frontend.binds)
    listeners += len(config.global_.stats_socket)
    checks = sum(1 for backend in config.backends for server in backend.servers if server.check)
    logs = sum(
        1
        for target in (
            *config.global_.log,
            *(t for frontend in config.frontends for t in frontend.log.targets),
        )
        if target.kind in ("udp", "unix")
    )
    return WORKER_BASE + listeners + checks + logs + SERVICE_CONNECTIONS * services


def plan(config: Config, limit: int) -> FilePlan:
    """The sessions each worker may hold under `limit` files per process, as lb runs it:
    the configured maxconn within what fits (a start refuses a maxconn whose even share
    does not fit under strict-limits, lb.cli); what fits when maxconn is unset."""
    global_ = config.global_
    if global_.fd_hard_limit is not None:
        limit = min(limit, global_.fd_hard_limit)
    workers = global_.nbthread or 1
    fixed = fixed_descriptors(config)
    room = max((limit - fixed) // PER_SESSION, 0)
    if global_.maxconn is None:
        worker_maxconn = max(room, MIN_AUTO_MAXCONN)
    else:
        # Any worker may take more than its even share (the hash spreads connections
        # evenly only on average); the shared count bounds the sum (lb.shared_counts).
        worker_maxconn = min(global_.maxconn, max(room, 1))
    return FilePlan(limit, workers, fixed, global_.maxconn, global_.strict_limits, worker_maxconn)


def start_report(files: FilePlan, pid: int, program: str = "lb") -> str:
    """What a start (or a reload) says when the limit cannot serve the configured maxconn:
    HAProxy's line, then why and what to change; an ALERT under strict-limits (the start
    is refused), else a WARNING and the maxconn lb runs with."""
    if files.fits:
        return ""
    label = "[ALERT]" if files.strict else "[WARNING]"
    prefix = f"{label:<10} ({pid}) : [{program}.main()] "
    lines = [f"Cannot raise FD limit to {files.needed}, limit is {files.limit}.", files.explain()]
    if not files.strict:
        lines.append(
            f"'no strict-limits': running with maxconn {files.total_maxconn} "
            f"({files.worker_maxconn} per worker)."
        )
    return "".join(prefix + line + "\n" for line in lines)


def check_diagnostics(config: Config, limit: int) -> list[Diagnostic]:
    """`lb -c`: a warning when this limit cannot serve the configured maxconn."""
    files = plan(config, limit)
    if files.fits:
        return []
    origin = config.global_.maxconn_origin or config.global_.origin
    outcome = (
        "lb would refuse to start ('Cannot raise FD limit'; 'no strict-limits' runs with "
        f"maxconn {files.total_maxconn})"
        if files.strict
        else f"lb would run with maxconn {files.total_maxconn} ('no strict-limits')"
    )
    return [
        Diagnostic.warning(
            origin.file,
            origin.line,
            "maxconn",
            f"{files.explain()} With this limit {outcome}.",
            "global",
        )
    ]


def soft_limit() -> int:
    """The files this process may open now."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _nr_open(soft) if soft == resource.RLIM_INFINITY else soft


def hard_limit() -> int:
    """The most files this process could open after raising its soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return _nr_open(soft)
    return hard


def raise_soft_limit(fd_hard_limit: int | None = None) -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (at most `fd-hard-limit`), as
    HAProxy does at start; the limit now in force. Workers inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard_limit()
    if fd_hard_limit is not None:
        target = min(target, fd_hard_limit)
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            pass  # the limit stays; the plan uses what is in force
    return soft_limit()


def _nr_open(fallback: int) -> int:
    """Linux's ceiling for a hard limit of 'unlimited' (fs.nr_open)."""
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return fallback
