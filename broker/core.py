"""The broker node's state: sessions, subscriptions, retained messages, wills, routing.

:class:`Broker` owns everything that outlives one connection (MQTT 5.0 sections 4.1 session
state, 4.5 message delivery, 3.1.2.5 will messages, 3.3.1.3 retained messages) and routes
each accepted :class:`~broker.message.Message` to the sessions whose subscriptions match.
Per-connection protocol handling lives in :mod:`broker.connection`; sockets and timers in
:mod:`broker.listener` and :mod:`broker.node`.

Backpressure (issue 4, "slow consumers"): a QoS 1/2 message that takes a connected
subscriber session's queue past its high-water mark pauses the connection that published it
until the queue drains (:mod:`broker.session` has the marks and the rules; QoS 0 never
pauses anyone, it drops and counts). Messages with no publishing connection (wills, the
cluster link, retained messages on subscribe) are never paced and drop when a queue is full.

Time comes from the ``clock`` passed in (monotonic seconds); :meth:`Broker.tick` is called
about once a second by the net layer to fire delayed wills and expire sessions. No I/O here.

Extension points (see :mod:`broker.hooks` for the exact contracts): ``cluster`` is told about
local publishes, subscriptions, connects and retained changes; ``authorization`` decides on
connect, publish and subscribe.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.config import MQTTSettings
from broker.hooks import AllowAll, AuthorizationHook, ClusterHook, LocalOnlyCluster, Principal
from broker.message import Message
from broker.session import SESSION_NEVER_EXPIRES, Pending, Session
from broker.stats import Counters
from broker.subscriptions import RetainedStore, SubscriptionOptions, SubscriptionTrie

if TYPE_CHECKING:
    from broker.connection import ClientConnection

__all__ = ["Broker", "PendingWill"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PendingWill:
    """A will waiting for its Will Delay Interval (MQTT 5.0 section 3.1.3.2.2)."""

    publish_at: float
    message: Message
    principal: Principal
    # Message Expiry Interval of the will, counted from when it is published.
    expiry_interval: int | None = None


class Broker:
    """One node's MQTT state. All methods run on the event loop thread."""

    def __init__(
        self,
        settings: MQTTSettings,
        node_name: str,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        cluster: ClusterHook | None = None,
        authorization: AuthorizationHook | None = None,
    ) -> None:
        self.settings = settings
        self.node_name = node_name
        self.clock = clock
        self.wall_clock = wall_clock
        self.cluster: ClusterHook = cluster if cluster is not None else LocalOnlyCluster()
        self.authorization: AuthorizationHook = (
            authorization if authorization is not None else AllowAll()
        )
        self.counters = Counters()
        self.sessions: dict[str, Session] = {}
        self.subscriptions = SubscriptionTrie()
        self.retained: RetainedStore[Message] = RetainedStore()
        self.pending_wills: dict[str, PendingWill] = {}
        # Every open connection, CONNECT received or not, for the admin API and shutdown.
        self.connections: set[ClientConnection] = set()
        # Topics a service of this node answers itself (the state store, seed 003): a
        # message published there goes to the handler, never to subscribers or the cluster;
        # the handler returns how many deliveries it made.
        self.request_handlers: dict[str, Callable[[Message], int]] = {}
        # Username/password authentication per listener label (``password_file``):
        # check(username, password) -> bool; a refusal is CONNACK 0x86 / 4.
        self.password_checks: dict[str, Callable[[str | None, bytes | None], bool]] = {}
        # The PUBLISH bytes of the message being delivered, per (protocol level, QoS,
        # RETAIN), split around the packet identifier: encoded once, shared by every
        # subscriber (ClientConnection._send_shared_publish). Reset when the message changes.
        self.publish_memo_message: Message | None = None
        self.publish_memo: dict[tuple[int, int, bool], tuple[bytes, bytes]] = {}

    # --- connections and sessions ----------------------------------------------------------

    def attach(
        self, connection: ClientConnection, clean_start: bool, expiry_interval: int
    ) -> tuple[Session, bool]:
        """Bind ``connection`` to the session of its client id; returns (session, present).

        A connection already holding that client id is closed first (takeover; 5.0 sends
        DISCONNECT 0x8E, MQTT 5.0 section 3.1.4-3).
        """
        client_id = connection.client_id
        session = self.sessions.get(client_id)
        if session is not None and session.connection is not None:
            self.counters.takeovers += 1
            session.connection.take_over()
            # Detaching the old connection may have ended its session (expiry 0).
            session = self.sessions.get(client_id)
        will = self.pending_wills.pop(client_id, None)
        if will is not None and clean_start:
            # The old session ends now, so its delayed will is due (section 3.1.2.5).
            self._publish_will(will)
        session_present = False
        if session is not None and clean_start:
            self._destroy_session(session)
            session = None
        if session is None:
            session = Session(client_id, self.settings.max_queued_messages)
            self.sessions[client_id] = session
        else:
            session_present = True
        session.connection = connection
        session.expiry_interval = expiry_interval
        session.expires_at = None
        self.cluster.client_connected(client_id)
        return session, session_present

    def detach(
        self,
        connection: ClientConnection,
        will: Message | None,
        will_delay: int,
        will_expiry: int | None,
        principal: Principal | None,
    ) -> None:
        """The connection of a session ended; publish or schedule the will, start expiry."""
        session = connection.session
        if session is None or session.connection is not connection:
            return
        session.connection = None
        # Offline sessions hold no publisher: what they cannot queue is dropped and counted.
        session.release_publishers()
        now = self.clock()
        expiry = session.expiry_interval
        if will is not None and principal is not None:
            delay = min(will_delay, expiry)
            pending = PendingWill(now + delay, will, principal, will_expiry)
            if delay <= 0:
                self._publish_will(pending)
            else:
                self.pending_wills[session.client_id] = pending
        if expiry == 0:
            self._destroy_session(session)
        elif expiry != SESSION_NEVER_EXPIRES:
            session.expires_at = now + expiry

    def _destroy_session(self, session: Session) -> None:
        session.release_publishers()
        for topic_filter in list(session.subscriptions):
            self.unsubscribe(session, topic_filter)
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        pending = self.pending_wills.pop(session.client_id, None)
        if pending is not None:
            self._publish_will(pending)

    def take_over(self, client_id: str) -> bool:
        """Close the local connection using ``client_id`` (another node took it over)."""
        session = self.sessions.get(client_id)
        if session is None or session.connection is None:
            return False
        self.counters.takeovers += 1
        session.connection.take_over()
        return True

    def disconnect_clients(
        self, predicate: Callable[[ClientConnection], bool], reason_code: int, reason: str
    ) -> int:
        """Close every connected client matching ``predicate`` (5.0: DISCONNECT reason)."""
        selected = [
            connection
            for connection in list(self.connections)
            if connection.connected and predicate(connection)
        ]
        for connection in selected:
            connection.disconnect(reason_code, reason)
        return len(selected)

    def tick(self) -> None:
        """Fire due delayed wills and expire sessions; call about once a second."""
        now = self.clock()
        for client_id, pending in list(self.pending_wills.items()):
            if pending.publish_at <= now:
                del self.pending_wills[client_id]
                self._publish_will(pending)
        for session in list(self.sessions.values()):
            if session.expires_at is not None and session.expires_at <= now:
                self.counters.sessions_expired += 1
                logger.info("session expired: client_id=%s", session.client_id)
                self._destroy_session(session)
            elif session.connection is None and session.queue:
                self.counters.messages_expired += session.discard_expired(now)

    def _publish_will(self, pending: PendingWill) -> None:
        message = pending.message
        if not self.authorization.authorize_publish(
            pending.principal, message.topic, message.qos, message.retain
        ):
            self.counters.authorization_denied += 1
            logger.info(
                "will not published: client_id=%s topic=%s: not authorized",
                pending.principal.client_id,
                message.topic,
            )
            return
        if pending.expiry_interval is not None:
            message = dataclasses.replace(
                message, expires_at=self.clock() + pending.expiry_interval
            )
        self.counters.wills_published += 1
        logger.info(
            "will published: client_id=%s topic=%s", pending.principal.client_id, message.topic
        )
        self.publish(message)

    # --- subscriptions ----------------------------------------------------------------------

    def subscribe(self, session: Session, topic_filter: str, options: SubscriptionOptions) -> bool:
        """Add or replace a subscription; returns True when it already existed."""
        existed = self.subscriptions.subscribe(session.client_id, topic_filter, options)
        session.subscriptions[topic_filter] = options
        if not existed and self.subscriptions.count_for(topic_filter) == 1:
            self.cluster.subscription_added(topic_filter)
        return existed

    def unsubscribe(self, session: Session, topic_filter: str) -> bool:
        session.subscriptions.pop(topic_filter, None)
        removed = self.subscriptions.unsubscribe(session.client_id, topic_filter)
        if removed and self.subscriptions.count_for(topic_filter) == 0:
            self.cluster.subscription_removed(topic_filter)
        return removed

    def local_filters(self) -> list[str]:
        return self.subscriptions.filters()

    # --- messages ---------------------------------------------------------------------------

    def publish(self, message: Message, publisher: ClientConnection | None = None) -> int:
        """Route a message accepted on this node; returns local deliveries + remote nodes.

        ``publisher`` is the connection it came from, paused when a subscriber falls behind.
        """
        self.counters.messages_received += 1
        handler = self.request_handlers.get(message.topic)
        if handler is not None:
            return handler(message)
        if message.retain and self.settings.retain_available:
            self._store_retained(message)
            self.cluster.retained_changed(message.topic, message if message.payload else None)
        delivered = self.deliver_local(message, publisher)
        delivered += self.cluster.publish_forwarded(message)
        if not delivered:
            self.counters.messages_no_subscribers += 1
        return delivered

    def deliver_from_cluster(self, message: Message) -> int:
        """A message another node accepted: deliver to local subscribers only."""
        return self.deliver_local(message)

    def set_retained_from_cluster(self, topic: str, message: Message | None) -> None:
        if message is None:
            self.retained.remove(topic)
        else:
            self.retained.set(topic, message)

    def _store_retained(self, message: Message) -> None:
        if message.payload:
            self.retained.set(message.topic, message)
            self.counters.messages_retained += 1
        else:
            self.retained.remove(message.topic)

    def retained_for(self, topic_filter: str) -> list[Message]:
        now = self.clock()
        messages = []
        for message in self.retained.matching(topic_filter):
            if message.is_expired(now):
                self.retained.remove(message.topic)
                self.counters.messages_expired += 1
            else:
                messages.append(message)
        return messages

    def deliver_local(self, message: Message, publisher: ClientConnection | None = None) -> int:
        sessions = self.sessions

        def connected(client_id: str) -> bool:
            session = sessions.get(client_id)
            return session is not None and session.connection is not None

        deliveries = self.subscriptions.match(message.topic, message.publisher_client_id, connected)
        count = 0
        for delivery in deliveries:
            session = sessions.get(delivery.client_id)
            if session is None:
                continue
            pending = Pending(
                message,
                min(message.qos, delivery.qos),
                message.retain and delivery.retain_as_published,
                tuple(delivery.subscription_identifiers),
            )
            self.deliver_to_session(session, pending, publisher)
            count += 1
        return count

    def deliver_to_session(
        self, session: Session, pending: Pending, publisher: ClientConnection | None = None
    ) -> None:
        connection = session.connection
        if connection is not None:
            connection.deliver(pending)
            if (
                publisher is not None
                and pending.qos
                and len(session.queue) >= session.queue_high_water
            ):
                publisher.hold_for(session)
        elif pending.qos == 0:
            self.counters.messages_dropped_qos0_offline += 1
        elif not session.enqueue(pending):
            self.counters.messages_dropped_queue_full += 1

    # --- admin ------------------------------------------------------------------------------

    def connected_clients(self) -> Iterable[ClientConnection]:
        return [connection for connection in self.connections if connection.connected]
