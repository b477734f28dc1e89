"""``[cluster] partition_handling = "pause_minority"``: a node that reaches no more than half
of the cluster stops serving until it reaches a majority again (RabbitMQ's
``cluster_partition_handling = pause_minority``).

Why: a node cut off from the others (a network split between the brokers while the balancer
still reaches them all) cannot tell the others' loss from its own isolation, and neither can
they. With "ignore" (the default) both sides serve: the isolated node's devices stay on it
while its backup, on the other side, takes the node for dead and publishes their wills (so
every device there looks offline to the will's subscribers, although none disconnected), a
device that reconnects to the other side gets its session from the backup's copy or a fresh
one, and the heal merges the two. With "pause_minority" the side that cannot be sure it is
the cluster steps aside:

- its MQTT listeners close their listening sockets (as an evacuation's do): the balancer's
  health checks mark it down, and a new connection is refused, so lb moves on to another
  node at once (HAProxy with ``option redispatch``);
- its clients are disconnected (MQTT 5.0: DISCONNECT 0x9C, Use another server), and a
  connection accepted before the pause is refused at its CONNECT (5.0: CONNACK 0x9C;
  3.1.1: 3, Server unavailable): each
  reconnects through the balancer to the majority, where its session is found in the
  backup's copy (or, when the backup is on the minority's side too, a fresh one that the heal
  merges with this node's). So the wills the backup publishes are true: these connections
  did end. A client's will is published here only when this node still reaches its backup
  (the backup then did not take this node for lost, and publishes none); otherwise the
  backup has published it already, and a second one, held in the outboxes until the heal,
  would reach the will's subscribers long after the device was back;
- while paused it does not act on the loss of its peers: their clients' wills, which it
  would publish as their backup, wait until it reaches a majority again, and are then
  published for the peers still down (cancelled for those back); an ``autoclean`` that
  falls due waits too (a minority forgetting the majority would make itself one).

It serves again (listeners open; an evacuation under way keeps them closed) once it reaches
more than half the nodes that are not forgotten, itself included, each peer linked and
synced. Every node pauses when the cluster splits into halves (an even number of nodes) or
into three; a 2-node cluster pauses the survivor of any loss or restart (the config warns).

No I/O here beyond the listeners' and the broker's own methods; the clock is the loop's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from broker.core import Broker
from broker.evacuation import Accepting
from broker.mqtt import ReasonCode

__all__ = ["MinorityPause"]

logger = logging.getLogger(__name__)


class MinorityPause:
    """Pauses the node (listeners closed, clients disconnected) while :meth:`update` says it
    is in a minority of the cluster, and resumes it when it is not. Updates are applied on
    the next turn of the loop (the cluster calls in the middle of a link's loss, and a flap
    within one turn does nothing)."""

    def __init__(
        self,
        broker: Broker,
        listeners: Sequence[Accepting],
        loop: asyncio.AbstractEventLoop,
        evacuating: Callable[[], bool],
    ) -> None:
        self.broker = broker
        self.listeners = listeners
        self.loop = loop
        self.evacuating = evacuating
        self.paused_since: float | None = None
        self.pauses = 0
        self.clients_closed = 0
        self._minority = False
        self._why = ""
        self._backup_reached: Callable[[], bool] = lambda: False
        self._scheduled: asyncio.Handle | None = None
        self._stopped = False
        # The listeners have opened (the node's start is over): before, a pause only
        # waits, said once at INFO, and its end is the start's to apply.
        self._serving = False

    @property
    def paused(self) -> bool:
        return self.paused_since is not None

    def update(self, minority: bool, why: str, backup_reached: Callable[[], bool]) -> None:
        """The cluster's view changed: ``minority`` (``why`` says what it reaches), and
        whether its backup is reachable (asked when the clients are closed)."""
        self._minority, self._why, self._backup_reached = minority, why, backup_reached
        if self._scheduled is None and not self._stopped:
            self._scheduled = self.loop.call_soon(self._apply)

    def _apply(self) -> None:
        self._scheduled = None
        if self._minority and not self.paused:
            self._pause()
        elif not self._minority and self.paused:
            self._resume()

    def _refuse_clients(self) -> None:
        """Listeners closed, and a client whose handshake was under way when they closed
        refused at its CONNECT."""
        self.broker.refusing_connects = "node paused in a minority of the cluster"
        for listener in self.listeners:
            listener.stop_accepting("paused in a minority of the cluster")

    def _pause(self) -> None:
        self.paused_since = self.loop.time()
        if not self._serving:
            self.broker.refusing_connects = "node paused in a minority of the cluster"
            logger.info(
                "cluster: node %s waits until it reaches a majority before it serves "
                "(partition_handling pause_minority): it reaches %s",
                self.broker.node_name,
                self._why,
            )
            return
        self._refuse_clients()
        # The backup, if this node reaches it, did not lose us: the wills are ours to
        # publish. Otherwise it took us for lost and has published them.
        send_will = self._backup_reached()
        closed = self.broker.disconnect_clients(
            lambda connection: True,
            ReasonCode.USE_ANOTHER_SERVER,
            "node in a minority of the cluster",
            send_will=send_will,
        )
        self.clients_closed += closed
        self.pauses += 1
        logger.warning(
            "cluster: node %s paused (partition_handling pause_minority): it reaches %s; "
            "%d clients disconnected (their wills %s), listeners closed until it reaches a "
            "majority",
            self.broker.node_name,
            self._why,
            closed,
            "published here" if send_will else "left to the backup, which took this node for lost",
        )

    def _resume(self) -> None:
        assert self.paused_since is not None
        seconds = self.loop.time() - self.paused_since
        self.paused_since = None
        self.broker.refusing_connects = None
        if not self._serving:
            logger.info(
                "cluster: node %s reaches a majority (%s)", self.broker.node_name, self._why
            )
            return
        if self.evacuating():
            logger.warning(
                "cluster: node %s reaches a majority again (%s) after %.1fs paused; an "
                "evacuation keeps its listeners closed",
                self.broker.node_name,
                self._why,
                seconds,
            )
            return
        for listener in self.listeners:
            listener.start_accepting()
        logger.warning(
            "cluster: node %s reaches a majority again (%s) after %.1fs paused: serving",
            self.broker.node_name,
            self._why,
            seconds,
        )

    def listening_started(self) -> None:
        """The node's listeners have just opened (at the start, after the join): the
        latest word applies now (an update still scheduled is applied here), closing them
        again at once while the node is in a minority."""
        self._serving = True
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        if not self._minority:
            self.paused_since = None
            self.broker.refusing_connects = None
            return
        if self.paused_since is None:
            self.paused_since = self.loop.time()
        self._refuse_clients()
        logger.warning(
            "cluster: node %s does not serve: it reaches %s (partition_handling "
            "pause_minority); listeners closed until it reaches a majority",
            self.broker.node_name,
            self._why,
        )

    def cancel(self) -> None:
        """The node stops: nothing more is applied (no listener opens again)."""
        self._stopped = True
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None

    def status(self) -> dict[str, Any]:
        return {
            "partition_handling": "pause_minority",
            "paused": self.paused,
            "paused_seconds": round(self.loop.time() - self.paused_since, 1)
            if self.paused_since is not None
            else None,
            "reaches": self._why,
            "pauses": self.pauses,
            "clients_closed": self.clients_closed,
        }
