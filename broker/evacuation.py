"""Node evacuation: move a node's devices to the other nodes before maintenance, at a bounded
rate (EMQX's ``emqx ctl rebalance start --evacuation``; HAProxy's side of it is ``set server
... state drain``). ``POST /api/evacuation?rate=N`` on the admin API starts it.

1. The MQTT listeners close their listening sockets (broker.listener.Listener.stop_accepting):
   a new connection is refused, so the balancer sends it to another node at once (lb moves
   on after a refusal; HAProxy with ``option redispatch``) and its health checks mark this
   node down.
2. Connected clients are disconnected, at most ``rate`` per second (MQTT 5.0: DISCONNECT
   0x9C, Use another server). Each device reconnects through the balancer to another node,
   whose claim takes its session from this node, which is alive: a live hand-over (TRANSFER
   and a forwarding stub, broker.cluster), not the backup's failover, and no storm of
   reconnections at once as when the node stops. A client's will is due as at any
   disconnection by the server (MQTT 5.0 section 3.1.2.5): one with a Will Delay Interval
   that reconnects within it has none published.
3. When no client is left, the evacuation waits (state "waiting_takeover", at most
   ``wait_takeover`` seconds, EMQX's default 60) until the persistent sessions of the clients
   it moved off have been taken to other nodes by their devices.
4. In a cluster, the persistent sessions still here (devices that did not come back, and
   those offline before the evacuation began) are then migrated to the other nodes that are
   up (or those of ``migrate_to``), in turn, at most ``session_rate`` per second (state
   "migrating_sessions"; EMQX's --migrate-to and --sess-evict-rate, default 500): each goes
   as a TRANSFER with its queue and delayed will (broker.cluster.Cluster.migrate_session),
   as if its device had come back there, and a forwarding stub stays here for what is still
   on its way. Once the nodes have acknowledged them the node is done: a stop now takes no
   session with it, and none depends on this node's backup. (A client whose TLS handshake or
   CONNECT was under way when the listeners closed is moved off when it connects, done or
   not.) The listeners stay closed until the evacuation is ended (``DELETE
   /api/evacuation``) or the node stops.

No I/O here beyond the listeners' and connections' own methods; the clock is the loop's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from broker.core import Broker
from broker.mqtt import ReasonCode

__all__ = [
    "MAX_RATE",
    "MAX_WAIT_TAKEOVER",
    "SESSION_RATE",
    "TICK",
    "WAIT_TAKEOVER",
    "Evacuation",
    "SessionMover",
]

logger = logging.getLogger(__name__)

#: Clients are disconnected in batches this often (seconds): rate x TICK each, at least one.
TICK = 0.1
#: The highest rate accepted (clients per second).
MAX_RATE = 100_000.0
#: How long the sessions of the clients moved off wait, at most, for their devices to take
#: them to another node before the evacuation is done (EMQX's --wait-takeover: 60 s).
WAIT_TAKEOVER = 60.0
#: The longest wait_takeover accepted (seconds).
MAX_WAIT_TAKEOVER = 3600.0
#: Sessions per second migrated to other nodes unless told (EMQX's --sess-evict-rate: 500).
SESSION_RATE = 500.0


def _refill(budget: float, elapsed: float, rate: float) -> float:
    """A token bucket of clients (or sessions) to move: ``budget`` after ``elapsed`` seconds
    at ``rate`` per second, a burst of at most one tick's worth (at least one)."""
    return min(budget + elapsed * rate, max(1.0, rate * TICK))


class Accepting(Protocol):
    """What the evacuation needs of a listener."""

    def stop_accepting(self, why: str = ...) -> None: ...

    def start_accepting(self) -> None: ...


class SessionMover(Protocol):
    """What the evacuation needs of the cluster to migrate sessions (broker.cluster)."""

    def migration_targets(self) -> list[str]: ...

    def migrate_session(self, client_id: str, node: str) -> bool: ...

    def migrations_acknowledged(self) -> bool: ...


class Evacuation:
    """One evacuation of this node: started at construction; "evacuating" until no client is
    connected, "waiting_takeover" until their persistent sessions have gone to other nodes
    (or ``wait_takeover`` passed), "migrating_sessions" while the sessions still here are
    given to other nodes (with a ``mover``: in a cluster), then "done"; "ended" by
    :meth:`end`."""

    def __init__(
        self,
        broker: Broker,
        listeners: Iterable[Accepting],
        rate: float,
        loop: asyncio.AbstractEventLoop,
        wait_takeover: float = WAIT_TAKEOVER,
        mover: SessionMover | None = None,
        session_rate: float = SESSION_RATE,
        migrate_to: Sequence[str] = (),
    ) -> None:
        self.broker = broker
        self.listeners = list(listeners)
        self.rate = rate
        self.wait_takeover = wait_takeover
        self.mover = mover
        self.session_rate = session_rate
        self.migrate_to = list(migrate_to)
        self.loop = loop
        self.state = "evacuating"
        # Client ids moved off whose session may still be here (not yet taken elsewhere).
        self.waiting: set[str] = set()
        # The sessions to migrate (migrating_sessions), the last one first.
        self.to_migrate: list[str] = []
        self.migrated = 0
        self.evicted_at: float | None = None  # when the last connected client was moved off
        self.started = loop.time()
        self.finished: float | None = None
        self.clients_at_start = len(list(broker.connected_clients()))
        self.evicted = 0
        self.sessions_left = 0  # once done
        self._budget = 0.0
        self._session_budget = 0.0
        self._last = self.started
        for listener in self.listeners:
            listener.stop_accepting()
        logger.info(
            "evacuation of node %s: %d clients to move to other nodes at %s per second; "
            "listeners closed",
            broker.node_name,
            self.clients_at_start,
            f"{rate:g}",
        )
        self._timer: asyncio.Handle | None = loop.call_soon(self._tick)

    def set_rate(
        self,
        rate: float,
        wait_takeover: float | None = None,
        session_rate: float | None = None,
        migrate_to: Sequence[str] | None = None,
    ) -> None:
        self.rate = rate
        if wait_takeover is not None:
            self.wait_takeover = wait_takeover
        if session_rate is not None:
            self.session_rate = session_rate
        if migrate_to is not None:
            self.migrate_to = list(migrate_to)

    def _sessions_left(self) -> int:
        """How many of the clients moved off still have their session here (not taken by
        another node: no device came back for it yet); forgets the others."""
        sessions = self.broker.sessions
        for client_id in list(self.waiting):
            session = sessions.get(client_id)
            if session is None or session.moved_to is not None:
                self.waiting.discard(client_id)
        return len(self.waiting)

    def _offline_sessions(self) -> list[str]:
        """The persistent sessions here whose client is not connected (stubs excluded)."""
        return [
            client_id
            for client_id, session in self.broker.sessions.items()
            if session.moved_to is None
            and session.connection is None
            and session.expiry_interval > 0
        ]

    def _tick(self) -> None:
        self._timer = None
        now = self.loop.time()
        elapsed = now - self._last
        self._last = now
        self._budget = _refill(self._budget, elapsed, self.rate)
        connected = list(self.broker.connected_clients())
        batch = connected[: int(self._budget)]
        for connection in batch:
            if connection.client_id:
                self.waiting.add(connection.client_id)
            connection.disconnect(ReasonCode.USE_ANOTHER_SERVER, "evacuation: use another server")
        self._budget -= len(batch)
        self.evicted += len(batch)
        self.broker.counters.clients_evacuated += len(batch)
        if self.state == "evacuating" and len(batch) == len(connected):
            self.state = "waiting_takeover"
            self.evicted_at = now
            logger.info(
                "evacuation of node %s: %d clients moved off in %.1fs; waiting at most %gs "
                "for their devices to take their sessions to other nodes",
                self.broker.node_name,
                self.evicted,
                now - self.started,
                self.wait_takeover,
            )
        if self.state == "waiting_takeover":
            assert self.evicted_at is not None
            left = self._sessions_left()
            if not left or now - self.evicted_at >= self.wait_takeover:
                self._start_migration(now)
        if self.state == "migrating_sessions":
            self._migrate(elapsed, now)
        # Done, it goes on ticking: a client whose TLS handshake or CONNECT was under way
        # when the listeners closed is moved off too.
        self._timer = self.loop.call_later(TICK, self._tick)

    def _start_migration(self, now: float) -> None:
        if self.mover is None:
            self._done(now)
            return
        self.to_migrate = self._offline_sessions()
        self.to_migrate.reverse()
        self.state = "migrating_sessions"
        logger.info(
            "evacuation of node %s: %d persistent sessions here (%d of clients moved off whose "
            "devices did not come back) to migrate to %s at %s per second",
            self.broker.node_name,
            len(self.to_migrate),
            len(self.waiting),
            ", ".join(self.migrate_to) or "the other nodes",
            f"{self.session_rate:g}",
        )

    def _targets(self) -> list[str]:
        assert self.mover is not None
        targets = self.mover.migration_targets()
        if self.migrate_to:
            targets = [name for name in targets if name in self.migrate_to]
        return targets

    def _migrate(self, elapsed: float, now: float) -> None:
        """One tick's worth of sessions to the target nodes in turn; done once none is left
        and the targets acknowledged them."""
        assert self.mover is not None
        self._session_budget = _refill(self._session_budget, elapsed, self.session_rate)
        targets = self._targets() if self.to_migrate else []
        if self.to_migrate and not targets:
            logger.warning(
                "evacuation of node %s: no node to migrate its %d sessions to (%s up): they "
                "stay here",
                self.broker.node_name,
                len(self.to_migrate),
                ", ".join(self.migrate_to) or "no other node",
            )
            self.to_migrate = []
        while self.to_migrate and self._session_budget >= 1.0:
            client_id = self.to_migrate.pop()
            # Not one to move now (its device is back here, or a claim takes it): skipped.
            if self.mover.migrate_session(client_id, targets[self.migrated % len(targets)]):
                self.migrated += 1
                self._session_budget -= 1.0
        if not self.to_migrate and self.mover.migrations_acknowledged():
            self._done(now)

    def _done(self, now: float) -> None:
        self.state = "done"
        self.finished = now
        self.sessions_left = (
            len(self._offline_sessions()) if self.mover is not None else len(self.waiting)
        )
        logger.info(
            "evacuation of node %s done in %.1fs: %d clients moved off, %d sessions migrated, "
            "%d sessions left here%s; listeners stay closed until DELETE /api/evacuation or "
            "the node stops",
            self.broker.node_name,
            now - self.started,
            self.evicted,
            self.migrated,
            self.sessions_left,
            (" (its backup keeps them once the node stops)" if self.sessions_left else ""),
        )

    def end(self, listen: bool = True) -> None:
        """Stop evacuating (if still at it) and, with ``listen``, listen again (not when the
        node stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.state not in ("done", "ended"):
            self.finished = self.loop.time()
        self.state = "ended"
        if not listen:
            return
        for listener in self.listeners:
            listener.start_accepting()
        logger.info(
            "evacuation of node %s ended after %d clients and %d sessions: listeners open",
            self.broker.node_name,
            self.evicted,
            self.migrated,
        )

    def status(self) -> dict[str, Any]:
        end = self.finished if self.finished is not None else self.loop.time()
        if self.state in ("evacuating", "waiting_takeover"):
            # Sessions of clients moved off not yet taken to another node by their device.
            left = len(self.waiting)
        elif self.state == "migrating_sessions":
            left = len(self.to_migrate)
        else:
            left = self.sessions_left
        return {
            "node": self.broker.node_name,
            "state": self.state,
            "rate": self.rate,
            "clients_at_start": self.clients_at_start,
            "evicted": self.evicted,
            "clients_left": len(list(self.broker.connected_clients())),
            "wait_takeover": self.wait_takeover,
            "session_rate": self.session_rate,
            "migrate_to": self.migrate_to,
            "sessions_migrated": self.migrated,
            "sessions_left": left,
            "seconds": round(end - self.started, 3),
        }
