"""Runtime state of backends and servers: health, weights, slowstart, slots and queues.

The config model (lb.config.model) is frozen; what changes while lb runs lives here,
beside it (DESIGN.md). A `BackendState` owns its servers, an active and a backup balancer
(as HAProxy keeps two trees), and the backend queue; the data path asks it for a server
slot (`assign`) and gives slots back (`ServerState.connection_ended`); the health checker
(lb.checks) reports each check (`check_done`) and logs the lines it returns.

HAProxy 2.6 semantics (configuration.txt 5.2 and src/server.c, queue.c, backend.c):
- `backup` servers take traffic only when no active server is usable; only the first
  usable one unless `option allbackups`. `disabled` starts a server in maintenance.
- `slowstart`: after a server comes back UP, its effective weight grows from 1/16 of its
  weight to all of it over the period (server_recalc_eweight: weight * (16 * elapsed +
  slowstart) / slowstart sixteenths, dynamic algorithms only) and its maxconn from 1 to all
  of it (srv_dynamic_maxconn: maxconn * percent elapsed, at least 1). Nothing runs per
  connection: both are computed from the clock when read, and `tick()` (called about once
  a second) tells the balancer so that a hash ring can be rebuilt and queues served.
- `maxconn` / `maxqueue` / the backend queue: see lb.queue. A server with nothing free
  whose own queue is full (`maxqueue`) refuses the connection, or with `option redispatch`
  passes it to another server (configuration.txt, maxqueue).
- On DOWN, `option redispatch` moves the server's queued connections elsewhere
  (pendconn_redistribute), `on-marked-down shutdown-sessions` kills its sessions (state
  "D"); on UP, the server takes what waits in the backend queue (pendconn_grab_from_px) and
  `on-marked-up shutdown-backup-sessions` kills the sessions of backup servers (state "U").

The clock is passed in (the event loop's `time`), so this module imports no time.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from lb import health
from lb.balance import WEIGHT_SCALE, Balancer, create_balancer
from lb.config.model import Backend, Server
from lb.health import CheckResult, HealthState
from lb.queue import ConnectionQueue, PendingConnection
from lb.shared_counts import SharedCount

Clock = Callable[[], float]


class Session(Protocol):
    """A live connection through a server, which lb may close (lb.datapath.ClientSide)."""

    def kill(self, cause: str) -> None: ...


class Choice(enum.Enum):
    """Why no server was chosen."""

    ALL_FULL = "every candidate is full: wait in the backend queue"
    NO_SERVER = "no usable server (or every usable one was excluded)"


@dataclass(frozen=True, slots=True)
class QueueFull:
    """`assign` outcome: the chosen server is full and its queue at `maxqueue`."""

    server: ServerState


class ServerState:
    """One server of a backend at run time."""

    __slots__ = (
        "active_connections",
        "backend",
        "backend_name",
        "check_status",
        "config",
        "drain",
        "failed_connections",
        "health",
        "host",
        "last_check",
        "maintenance",
        "name",
        "port",
        "queue",
        "sessions",
        "shared",
        "total_connections",
        "up",
        "up_since",
        "weight",
    )

    def __init__(self, config: Server, backend: BackendState) -> None:
        self.config = config
        self.name = config.name
        self.backend = backend
        self.backend_name = backend.name
        self.host = config.host
        self.port = config.port
        self.weight = config.weight
        # HAProxy starts a server UP at health `rise`; `disabled` starts it in maintenance.
        self.up = True
        self.maintenance = config.disabled
        self.drain = False
        self.health = HealthState(config.rise, config.fall) if config.check else None
        self.check_status: str | None = None  # L4OK, L4CON, L4TOUT of the last check
        self.last_check: CheckResult | None = None
        self.up_since: float | None = None  # set when a slowstart ramp begins
        self.active_connections = 0  # this worker's
        # With several workers, every worker's connections to this server (lb.shared_counts):
        # its maxconn bounds them all, as HAProxy's threads share a server's.
        self.shared: SharedCount | None = None
        self.total_connections = 0
        self.failed_connections = 0
        self.queue = ConnectionQueue(self)
        self.sessions: set[Session] = set()

    # -- weight and room ----------------------------------------------------------------------

    def slowstart_elapsed(self) -> float | None:
        """Seconds since the ramp began, or None once over (HAProxy: STARTING -> RUNNING)."""
        since = self.up_since
        if since is None:
            return None
        elapsed = self.backend.clock() - since
        slowstart = self.config.slowstart
        if elapsed >= slowstart or elapsed < 0:
            self.up_since = None
            return None
        return elapsed

    @property
    def effective_weight(self) -> int:
        """The weight the balancer uses, in sixteenths (HAProxy's eweight)."""
        if self.drain or self.weight <= 0:
            return 0
        full = self.weight * WEIGHT_SCALE
        elapsed = self.slowstart_elapsed()
        if elapsed is None or not self.backend.dynamic:
            return full
        slowstart = self.config.slowstart
        return min(full, int(self.weight * (WEIGHT_SCALE * elapsed + slowstart) / slowstart))

    def maxconn_now(self) -> int | None:
        """maxconn, ramped by slowstart (srv_dynamic_maxconn); None: unlimited."""
        maxconn = self.config.maxconn
        if maxconn is None:
            return None
        elapsed = self.slowstart_elapsed()
        if elapsed is None:
            return maxconn
        percent = int(100 * elapsed / self.config.slowstart)
        return max(1, maxconn * percent // 100)

    @property
    def queued_connections(self) -> int:
        return len(self.queue)

    @property
    def slots_used(self) -> int:
        """Connections counted against maxconn: this worker's, or every worker's."""
        return self.active_connections if self.shared is None else self.shared.total()

    def has_room(self) -> bool:
        """A new connection may start now: a free slot and nobody queued ahead."""
        maxconn = self.maxconn_now()
        return maxconn is None or (not self.queue and self.slots_used < maxconn)

    def accepts_queued(self) -> bool:
        """leastconn may queue here: an explicit maxqueue not reached (lb_fwlc.c)."""
        maxconn = self.maxconn_now()
        maxqueue = self.config.maxqueue
        if maxconn is None or maxqueue <= 0:
            return False
        return self.slots_used + len(self.queue) < maxconn + maxqueue

    # -- connections ----------------------------------------------------------------------------

    def try_start(self, *, queued: bool = False) -> bool:
        """Take a slot for a new connection if there is one (`has_room`; `queued`: a
        connection taken out of a queue, which waits behind nobody), counted at once. With
        workers sharing the count, checking and then counting let two of them take the last
        slot (6 connections under `maxconn 5`): the shared count is reserved first and then
        looked at (SharedCount.try_add), as HAProxy counts a server's connections atomically."""
        maxconn = self.maxconn_now()
        shared = self.shared
        if maxconn is not None:
            if self.queue and not queued:
                return False
            if shared is None:
                if self.active_connections >= maxconn:
                    return False
            elif not shared.try_add(maxconn):
                return False
        elif shared is not None:
            shared.add()
        self.active_connections += 1
        self.total_connections += 1
        return True

    def connection_ended(self, *, failed: bool) -> None:
        """A slot is given back: the next queued connection may take it."""
        self.active_connections -= 1
        if self.shared is not None:
            self.shared.remove()
        if failed:
            self.failed_connections += 1
        self.backend.serve_queues(self)

    def connect_failed(self) -> None:
        """A connect attempt failed; the session keeps its slot for a retry here."""
        self.failed_connections += 1

    # -- state ----------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return self.up and not self.maintenance

    @property
    def admin_state(self) -> str:
        """ready, drain or maint (HAProxy's administrative state)."""
        if self.maintenance:
            return "maint"
        return "drain" if self.drain else "ready"


class BackendState:
    """A backend's servers, its balancers and its queue."""

    def __init__(self, config: Backend, clock: Clock | None = None) -> None:
        self.config = config
        self.name = config.name
        # Without a clock (unit tests of other parts), slowstart ramps are not run.
        self.clock: Clock = clock if clock is not None else _no_clock
        self.has_clock = clock is not None
        self.servers: list[ServerState] = []
        self.balancer: Balancer[ServerState] = create_balancer(
            config.balance, config.hash_type, config.hash_function, config.hash_avalanche
        )
        self.backup_balancer: Balancer[ServerState] = create_balancer(
            config.balance, config.hash_type, config.hash_function, config.hash_avalanche
        )
        self.dynamic = self.balancer.dynamic
        self.hashed = self.balancer.hashed
        self.queue = ConnectionQueue(None)
        self._sequence = 0
        # Called when a connection starts waiting in a queue: with several workers, slots
        # that other workers free are noticed by looking again (lb.process).
        self.on_queued: Callable[[], None] | None = None
        for server_config in config.servers:
            server = ServerState(server_config, self)
            self.servers.append(server)
            self._balancer_of(server).add(server)
            if server.usable:
                self._balancer_of(server).set_up(server)

    def _balancer_of(self, server: ServerState) -> Balancer[ServerState]:
        return self.backup_balancer if server.config.backup else self.balancer

    def server(self, name: str) -> ServerState:
        for server in self.servers:
            if server.name == name:
                return server
        raise KeyError(name)

    # -- counting -------------------------------------------------------------------------------

    def usable_count(self, *, backup: bool) -> int:
        """HAProxy's srv_act / srv_bck: usable servers with a non-zero weight."""
        return sum(
            1
            for server in self.servers
            if server.config.backup == backup and server.usable and server.effective_weight > 0
        )

    @property
    def queued(self) -> int:
        return len(self.queue) + sum(len(server.queue) for server in self.servers)

    @property
    def session_count(self) -> int:
        """HAProxy's beconn: connections on servers plus those waiting in queues."""
        return sum(server.active_connections for server in self.servers) + self.queued

    @property
    def queue_timeout(self) -> float | None:
        """`timeout queue`, or `timeout connect` when unset (configuration.txt)."""
        timeouts = self.config.timeout
        return timeouts.queue if timeouts.queue is not None else timeouts.connect

    def _serving_backups(self) -> list[ServerState]:
        """The backup servers in use now: none while an active server is usable."""
        if self.usable_count(backup=False):
            return []
        backups = [
            server
            for server in self.servers
            if server.config.backup and server.usable and server.effective_weight > 0
        ]
        return backups if self.config.option.allbackups else backups[:1]

    # -- choosing a server --------------------------------------------------------------------

    def _choose(self, key: bytes | None, exclude: frozenset[str]) -> ServerState | Choice:
        """A server, or why there is none."""
        candidates = [
            s for s in self.servers if not s.config.backup and s.usable and s.effective_weight > 0
        ]
        if candidates:  # usable_count(backup=False), counted once with the list
            if exclude and all(s.name in exclude for s in candidates):
                return Choice.NO_SERVER
            return self.balancer.pick(key, exclude) or Choice.ALL_FULL
        backups = [s for s in self._serving_backups() if s.name not in exclude]
        if not backups:
            return Choice.NO_SERVER
        if self.config.option.allbackups:
            return self.backup_balancer.pick(key, exclude) or Choice.ALL_FULL
        first = backups[0]
        return first if first.has_room() or self.hashed else Choice.ALL_FULL

    def pick(
        self, key: bytes | None = b"", exclude: frozenset[str] = frozenset()
    ) -> ServerState | None:
        """The server a new connection would go to now, without taking its slot."""
        choice = self._choose(key, exclude)
        return choice if isinstance(choice, ServerState) else None

    def assign(
        self,
        key: bytes | None,
        exclude: frozenset[str],
        waiter: Callable[[ServerState], None],
    ) -> ServerState | PendingConnection | QueueFull | None:
        """Take a slot for a new connection (HAProxy's assign_server_and_queue).

        A server: its slot is taken. A PendingConnection: queued; `waiter(server)` is called
        with the slot taken when its turn comes. QueueFull: refused (maxqueue). None: no
        server is usable (or every usable one is in `exclude`).
        """
        refused: ServerState | None = None
        for _ in range(len(self.servers) + 1):
            choice = self._choose(key, exclude)
            if choice is Choice.NO_SERVER:
                return QueueFull(refused) if refused is not None else None
            if choice is Choice.ALL_FULL:
                return self._enqueue(self.queue, waiter, key)
            server = choice
            if server.try_start():
                return server
            maxqueue = server.config.maxqueue
            if maxqueue <= 0 or len(server.queue) < maxqueue:
                return self._enqueue(server.queue, waiter, key)
            if not self.config.option.redispatch:
                return QueueFull(server)
            refused = server
            exclude = exclude | {server.name}
        return QueueFull(refused) if refused is not None else None

    def _enqueue(
        self, queue: ConnectionQueue, waiter: Callable[[ServerState], None], key: bytes | None
    ) -> PendingConnection:
        self._sequence += 1
        pending = PendingConnection(waiter, key, self._sequence)
        queue.push(pending)
        if self.on_queued is not None:
            self.on_queued()
        return pending

    def abandon(self, pending: PendingConnection) -> None:
        """The connection stops waiting (timeout queue, client gone)."""
        queue = pending.queue
        if queue is not None:
            queue.remove(pending, served=False)

    def _may_serve_backend_queue(self, server: ServerState) -> bool:
        if not server.usable or server.effective_weight <= 0:
            return False
        if not server.config.backup:
            return True
        return server in self._serving_backups()

    def serve_queues(self, server: ServerState) -> int:
        """Give free slots of `server` to the oldest waiting connections (process_srv_queue).

        Returns how many came from the backend queue."""
        from_backend = 0
        while server.usable:
            own = server.queue.first()
            shared = self.queue.first() if self._may_serve_backend_queue(server) else None
            if own is None and shared is None:
                break
            if not server.try_start(queued=True):
                break  # no free slot (in any worker)
            if own is not None and (shared is None or own.sequence < shared.sequence):
                chosen = own
                server.queue.remove(own, served=True)
            else:
                assert shared is not None
                chosen = shared
                self.queue.remove(shared, served=True)
                from_backend += 1
            self._grant(chosen, server)
        return from_backend

    @staticmethod
    def _grant(pending: PendingConnection, server: ServerState) -> None:
        """`pending` goes to `server`, whose slot it has (try_start)."""
        pending.granted = server
        pending.waiter(server)

    def _place(self, pending: PendingConnection) -> None:
        """Run the choice again for a connection taken out of a queue (redispatch)."""
        choice = self._choose(pending.key, frozenset())
        if isinstance(choice, ServerState):
            if choice.try_start():
                self._grant(pending, choice)
                return
            choice.queue.push(pending)
        else:
            self.queue.push(pending)
        if self.on_queued is not None:
            self.on_queued()

    # -- retries --------------------------------------------------------------------------------

    def redispatch_on_retry(
        self, server: ServerState, retries_done: int, *, timed_out: bool
    ) -> bool:
        """Whether the retry after a failed connect goes to another server.

        HAProxy 2.6 (back_handle_st_cer) retries on the same server unless `option
        redispatch` allows otherwise: when the server is down, every `redispatch <interval>`
        retries (default -1: the last one), or at once for non-hashing algorithms with more
        than one active server. lb also moves on when the server refused the connection
        (an immediate error, nothing to wait for) or is down, with or without the option.
        """
        if not timed_out or not server.usable:
            return True
        option = self.config.option
        if not option.redispatch:
            return False
        if not self.hashed and self.usable_count(backup=False) > 1:
            return True
        interval = option.redispatch_interval
        if interval > 0:
            return retries_done % interval == 0
        if interval < 0:
            period = self.config.retries + 1 + interval
            return period > 0 and retries_done % period == 0
        return False

    # -- state changes --------------------------------------------------------------------------

    def check_done(self, server: ServerState, result: CheckResult) -> list[str]:
        """Count one health check; the log lines it causes (HAProxy's words)."""
        state = server.health
        if state is None:
            return []
        changed, transition = state.record(result.passed)
        status_changed = server.check_status != result.status.name
        server.check_status = result.status.name
        server.last_check = result
        lines: list[str] = []
        log_checks = self.config.option.log_health_checks
        if log_checks and (changed or status_changed):
            lines.append(
                health.check_line(
                    self.name,
                    server.name,
                    backup=server.config.backup,
                    result=result,
                    status=state.status_words(drain=server.drain),
                )
            )
        if transition is not None:
            reason = None if log_checks else result
            lines.extend(self.set_up(server, transition == "UP", result=reason, slowstart=True))
        return lines

    def set_up(
        self,
        server: ServerState,
        up: bool,
        *,
        result: CheckResult | None = None,
        slowstart: bool = False,
    ) -> list[str]:
        """Mark a server UP or DOWN (health), with HAProxy's side effects; the log lines."""
        if server.up == up:
            return []
        had_servers = self.usable_count(backup=False) + self.usable_count(backup=True) > 0
        server.up = up
        if server.maintenance:
            return []  # in maintenance, health moves silently
        if up:
            return self._went_up(server, result, slowstart=slowstart)
        return self._went_down(server, result, had_servers)

    def _went_down(
        self, server: ServerState, result: CheckResult | None, had_servers: bool
    ) -> list[str]:
        server.up_since = None
        self._balancer_of(server).set_down(server)
        sessions = server.active_connections
        requeued = 0
        if self.config.option.redispatch:
            for pending in server.queue:
                server.queue.remove(pending, served=False)
                self._place(pending)
                requeued += 1
        if server.config.on_marked_down == "shutdown-sessions":
            for session in list(server.sessions):
                session.kill("D")
        if not server.config.backup:
            for backup in self._serving_backups():
                self.serve_queues(backup)
        lines = [
            health.down_line(
                self.name,
                server.name,
                backup=server.config.backup,
                result=result,
                active=self.usable_count(backup=False),
                backups=self.usable_count(backup=True),
                sessions=sessions,
                requeued=requeued,
                remaining=len(server.queue),
            )
        ]
        remaining = self.usable_count(backup=False) + self.usable_count(backup=True)
        if had_servers and remaining == 0:
            lines.append(health.no_server_line(self.name))
        return lines

    def _went_up(
        self, server: ServerState, result: CheckResult | None, *, slowstart: bool
    ) -> list[str]:
        if slowstart and server.config.slowstart > 0 and self.has_clock:
            server.up_since = self.clock()
        self._balancer_of(server).set_up(server)
        requeued = self.serve_queues(server)
        if (
            server.config.on_marked_up == "shutdown-backup-sessions"
            and not server.config.backup
            and server.effective_weight > 0
        ):
            for backup in self.servers:
                if backup.config.backup:
                    for session in list(backup.sessions):
                        session.kill("U")
        return [
            health.up_line(
                self.name,
                server.name,
                backup=server.config.backup,
                result=result,
                active=self.usable_count(backup=False),
                backups=self.usable_count(backup=True),
                requeued=requeued,
                queued=len(server.queue),
            )
        ]

    def set_weight(self, server: ServerState, weight: int) -> None:
        server.weight = weight
        self._balancer_of(server).set_weight(server)
        self.serve_queues(server)

    def set_admin_state(self, server: ServerState, state: str) -> None:
        """ready | drain | maint (the runtime API's `set server ... state`)."""
        server.maintenance = state == "maint"
        server.drain = state == "drain"
        balancer = self._balancer_of(server)
        if server.usable:
            balancer.set_up(server)
            balancer.set_weight(server)
            self.serve_queues(server)
        else:
            balancer.set_down(server)

    def ramping(self) -> bool:
        return any(server.up_since is not None for server in self.servers)

    def tick(self) -> None:
        """About once a second during slowstart: recompute ramps, serve what they allow."""
        for server in self.servers:
            if server.up_since is None:
                continue
            server.slowstart_elapsed()  # ends the ramp when it is over
            self._balancer_of(server).set_weight(server)
            self.serve_queues(server)


def _no_clock() -> float:
    return 0.0
