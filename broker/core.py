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
Every drop of a QoS >= 1 message is counted per client and logged, rate-limited
(:class:`DropLog`, issue 14 item 2).

Durability (issue 12, :mod:`broker.store`): a *durable* session (persistent, on a node with a
disk store) has its record, its QoS 1/2 deliveries and its incoming QoS 2 ids written to the
store. Such a delivery is queued and stored, and sent only once the store has committed it
(``Store.after_commit``), so a packet id the client sees is always on disk; a QoS 2 delivery
gets its packet id when it is stored (``Pending.packet_id``). The publisher's PUBACK/PUBREC
waits for the same commit (:mod:`broker.connection`). Sessions that are not durable take the
unchanged in-memory path. :meth:`Broker.restore` rebuilds everything at start.

Cluster (issue 12): a connect first *claims* its client id cluster-wide
(:meth:`Broker.connect`, :mod:`broker.registry`); a session handed to another node leaves a
forwarding stub here (``Session.moved_to``) that passes what still arrives for it to the new
owner, and is removed after ``MOVED_GRACE`` seconds, once every node has the new routes.

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

from broker import cluster_codec as codec
from broker.config import MQTTSettings
from broker.hooks import (
    AllowAll,
    AuthorizationHook,
    ClaimOutcome,
    ClusterHook,
    LocalOnlyCluster,
    Principal,
)
from broker.message import Message, MessageIds
from broker.registry import LamportClock, Version
from broker.session import (
    SESSION_NEVER_EXPIRES,
    Outgoing,
    Pending,
    Publisher,
    QueueBudget,
    SeenIds,
    Session,
)
from broker.stats import Counters
from broker.store import MemoryStore, Store, StoredState
from broker.subscriptions import RetainedStore, SubscriptionOptions, SubscriptionTrie

if TYPE_CHECKING:
    from broker.connection import ClientConnection

__all__ = ["Broker", "DropLog", "PendingWill"]

logger = logging.getLogger(__name__)

# Message ids are reserved in blocks in the store, so a restart never reuses one.
SEQ_BLOCK = 10_000
# A session handed to another node forwards what still reaches it here this long: routes
# travel in a round trip, so this is generous on a LAN.
MOVED_GRACE = 30.0
# Issue 14 item 1: once this many queued payload bytes are gone again (clients left, queues
# drained) and at most a quarter of the peak is left, the node asks the allocator to give
# the freed heap back (release_memory: malloc_trim); bench/queue_memory.py has the effect.
RELEASE_MEMORY_AFTER = 32 * 1024 * 1024
# Drops of QoS >= 1 messages are summed and logged at most this often.
DROP_LOG_INTERVAL = 5.0
# Clients named per drop log line (the rest are summed).
DROP_LOG_CLIENTS = 10


@dataclass(slots=True)
class PendingWill:
    """A will waiting for its Will Delay Interval (MQTT 5.0 section 3.1.3.2.2).

    Authorized when its connection ended: a will the client may not publish is not kept, so
    none is written to the store or copied to a backup. ``principal`` is that connection's,
    asked again when the will is published (a policy reload in between may change the
    answer); None for a will this node did not see set (read back from the store, or a lost
    node's), which the node that recorded it authorized then."""

    publish_at: float
    message: Message
    client_id: str
    principal: Principal | None
    # Message Expiry Interval of the will, counted from when it is published.
    expiry_interval: int | None = None


class DropLog:
    """QoS >= 1 messages lost to a bound, per client: one log line per interval at most."""

    __slots__ = ("by_reason", "last")

    def __init__(self) -> None:
        self.by_reason: dict[str, dict[str, int]] = {}
        self.last = 0.0

    def record(self, client_id: str, reason: str) -> None:
        clients = self.by_reason.get(reason)
        if clients is None:
            clients = self.by_reason[reason] = {}
        clients[client_id] = clients.get(client_id, 0) + 1

    def flush(self, now: float, force: bool = False) -> None:
        if not self.by_reason or (not force and now - self.last < DROP_LOG_INTERVAL):
            return
        self.last = now
        for reason, clients in self.by_reason.items():
            named = sorted(clients.items(), key=lambda item: -item[1])
            shown = ", ".join(f"{client} {count}" for client, count in named[:DROP_LOG_CLIENTS])
            more = len(named) - DROP_LOG_CLIENTS
            logger.warning(
                "dropped %d QoS 1/2 messages (%s): %s%s",
                sum(clients.values()),
                reason,
                shown,
                f" and {more} more clients" if more > 0 else "",
            )
        self.by_reason.clear()


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
        store: Store | None = None,
    ) -> None:
        self.settings = settings
        self.node_name = node_name
        self.clock = clock
        self.wall_clock = wall_clock
        self.cluster: ClusterHook = cluster if cluster is not None else LocalOnlyCluster(self)
        self.authorization: AuthorizationHook = (
            authorization if authorization is not None else AllowAll()
        )
        self.store: Store = store if store is not None else MemoryStore()
        self.counters = Counters()
        self.sessions: dict[str, Session] = {}
        self.subscriptions = SubscriptionTrie(settings.shared_subscription_strategy)
        self.retained: RetainedStore[Message] = RetainedStore()
        # Wall-clock time each retained topic last changed (the cluster's newest-wins rule).
        self.retained_changed_at: dict[str, float] = {}
        self.pending_wills: dict[str, PendingWill] = {}
        # Read back at start (restore): the wills of the clients connected when the node
        # stopped without ending their connections (encoded codec.LiveWill), until
        # settle_wills_at_crash.
        self.wills_at_crash: dict[str, bytes] = {}
        # ... and the client ids whose delayed will (an offline session's) was read back.
        self.restored_wills: set[str] = set()
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
        # Issue 12: message ids, claim versions, store keys of deliveries.
        self.ids = MessageIds(0, wall_clock())
        self.seq_reserved = 0
        self.lamport = LamportClock(node_name)
        self.next_delivery_key = 1
        # Issue 14 item 1: payload bytes queued and in flight in every session.
        self.budget = QueueBudget(settings.max_node_queued_bytes)
        self.drops = DropLog()
        # When broker.connection last logged a publisher paused for its acknowledgements.
        self.acks_pause_logged = float("-inf")
        self.queued_peak = 0
        # Set by the net layer where the C library has malloc_trim.
        self.release_memory: Callable[[], object] | None = None
        # Why a CONNECT is refused now (5.0: CONNACK 0x9C, Use another server; 3.1.1: 3,
        # Server unavailable), or None: a node paused in a minority (broker.partition).
        self.refusing_connects: str | None = None
        # CONNACKs that accept and say nothing about one client (the 5.0 properties come
        # from the settings alone), encoded once: (protocol level, session present) -> bytes.
        self.connack_memo: dict[tuple[int, bool], bytes] = {}

    # --- identity ---------------------------------------------------------------------------

    def next_seq(self) -> int:
        ids = self.ids
        seq = ids.last = ids.last + 1  # MessageIds.next, inlined: once per message
        if seq > self.seq_reserved:
            self.seq_reserved = seq + SEQ_BLOCK
            self.store.set_meta("seq_reserved", str(self.seq_reserved).encode())
        return seq

    def claim_version(self) -> Version:
        return self.lamport.claim(int(self.wall_clock() * 1000))

    # --- connections and sessions ----------------------------------------------------------

    def connect(
        self,
        connection: ClientConnection,
        clean_start: bool,
        done: Callable[[ClaimOutcome], None],
    ) -> None:
        """Claim the connection's client id cluster-wide; ``done`` is called when it is ours
        (maybe later: the session may be coming from another node)."""
        client_id = connection.client_id
        session = self._take_over_locally(client_id)
        local = session is not None and not session.diverged
        self.cluster.claim(client_id, clean_start, local, done)

    def _close_connection(self, session: Session) -> Session | None:
        """Close the connection holding ``session``, if any (a takeover; 5.0 gets
        DISCONNECT 0x8E); the session afterwards, or None if it ended with its connection
        (expiry 0)."""
        if session.connection is None:
            return session
        self.counters.takeovers += 1
        session.connection.take_over()
        return self.sessions.get(session.client_id)

    def _take_over_locally(self, client_id: str) -> Session | None:
        """This node's session of ``client_id`` once no connection holds it: a connection
        with this id is closed first (MQTT 5.0 section 3.1.4-3; 5.0 gets DISCONNECT 0x8E),
        and a forwarding stub (the session itself is elsewhere) is dropped."""
        session = self.sessions.get(client_id)
        if session is not None:
            session = self._close_connection(session)
        if session is not None and session.moved_to is not None:
            self._drop_stub(session)
            session = None
        return session

    def attach(
        self,
        connection: ClientConnection,
        clean_start: bool,
        expiry_interval: int,
        outcome: ClaimOutcome,
    ) -> tuple[Session, bool]:
        """Bind ``connection`` to the session of its client id; returns (session, present).

        A connection already holding that client id is closed first (takeover; 5.0 sends
        DISCONNECT 0x8E, MQTT 5.0 section 3.1.4-3).
        """
        client_id = connection.client_id
        session = self._take_over_locally(client_id)
        will = self.pending_wills.pop(client_id, None)
        if will is not None and clean_start:
            # The old session ends now, so its delayed will is due (section 3.1.2.5).
            self._publish_will(will)
        session_present = False
        if session is not None and clean_start:
            self._destroy_session(session)
            session = None
        if session is None:
            session = self._new_session(client_id)
            session.diverged = outcome.diverged and not clean_start
            if session.diverged:
                session.seen = SeenIds()
        else:
            session_present = True
        session.version = outcome.version
        session.connection = connection
        session.expiry_interval = expiry_interval
        session.expires_at = None
        durable = self.store.durable and expiry_interval > 0
        if durable and not session.durable:
            session.durable = True
            self._store_everything(session)
        elif session.durable and not durable:
            self._unstore_everything(session)
            session.durable = False
        elif durable:
            self._save_session(session)
        live = self.live_will(session)
        if live is not None and self.store.keeps_wills:
            self.store.set_will(client_id, live)
            session.will_stored = True
        self.cluster.client_connected(client_id, outcome.version, live)
        chain = connection.identity.chain_subjects
        if chain:
            check = getattr(self.cluster, "check_client_chain", None)
            if check is not None:
                check(client_id, chain)
        return session, session_present

    def _new_session(self, client_id: str) -> Session:
        session = Session(client_id, self.settings.max_queued_messages, budget=self.budget)
        self.sessions[client_id] = session
        return session

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
        client_id = session.client_id
        if (
            will is not None
            and principal is not None
            and self._will_authorized(client_id, principal, will)
        ):
            delay = min(will_delay, expiry)
            # A delayed will is asked again when it is published; one due now was just asked.
            pending = PendingWill(
                now + delay, will, client_id, principal if delay > 0 else None, will_expiry
            )
            if delay <= 0:
                self._publish_will(pending)
            else:
                self.pending_wills[client_id] = pending
        if session.will_stored:
            # Published, scheduled or dropped by now: not due again after a crash.
            session.will_stored = False
            self.store.clear_will(client_id)
        self.cluster.client_disconnected(client_id)
        if expiry == 0:
            self._destroy_session(session)
            return
        if expiry != SESSION_NEVER_EXPIRES:
            session.expires_at = now + expiry
        if session.durable:
            self._save_session(session)

    def _destroy_session(self, session: Session) -> None:
        session.release_publishers()
        for topic_filter in list(session.subscriptions):
            self.unsubscribe(session, topic_filter)
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        if session.durable:
            self._unstore_everything(session)
            session.durable = False
        self._forget_bytes(session)
        pending = self.pending_wills.pop(session.client_id, None)
        if pending is not None:
            self._publish_will(pending)
        if session.moved_to is None:
            self.cluster.session_ended(session.client_id)

    def _forget_bytes(self, session: Session) -> None:
        session.remove_bytes(session.queued_bytes)
        if session.queued():
            session.queue.clear()
        session.inflight.clear()

    def _drop_stub(self, session: Session) -> None:
        """Remove a forwarding stub: its routes go, nothing else (the session lives on)."""
        for topic_filter in list(session.subscriptions):
            self.unsubscribe(session, topic_filter)
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]

    def take_over(self, client_id: str) -> bool:
        """Close the local connection using ``client_id`` (another node took it over)."""
        session = self.sessions.get(client_id)
        if session is None or session.connection is None:
            return False
        self.counters.takeovers += 1
        session.connection.take_over()
        return True

    def end_session(self, client_id: str, reason: str) -> bool:
        """A clean start elsewhere ends the session here (its will is due)."""
        session = self.sessions.get(client_id)
        if session is None or session.moved_to is not None:
            return False
        session = self._close_connection(session)
        if session is not None:
            logger.info("session ended: client_id=%s: %s", client_id, reason)
            self._destroy_session(session)
        return True

    def hand_over(
        self, client_id: str, node: str, with_will: bool = False
    ) -> codec.SessionRecord | None:
        """Give the session to ``node`` (it claimed the client id with clean start 0).

        The connection here is closed (5.0: DISCONNECT 0x8E), its delayed will dropped (the
        client is back, section 3.1.2.5), and the session becomes a forwarding stub. With
        ``with_will`` (a migration: the client is not back) the delayed will goes with the
        record instead, for ``node`` to publish at its time.
        """
        session = self.sessions.get(client_id)
        if session is None or session.moved_to is not None:
            return None
        session = self._close_connection(session)
        if session is None:
            return None  # it ended with its connection (expiry 0)
        record = self.session_record(session, deliveries=True)
        self.pending_wills.pop(client_id, None)
        if not with_will:
            record = dataclasses.replace(record, will=None)
        if session.durable:
            self._unstore_everything(session)
            session.durable = False
        self._forget_bytes(session)
        session.release_publishers()
        if session.incoming_ids():
            session.incoming_qos2.clear()
        session.moved_to = node
        session.moved_until = self.clock() + MOVED_GRACE
        self.counters.sessions_transferred_out += 1
        return record

    def disconnect_clients(
        self,
        predicate: Callable[[ClientConnection], bool],
        reason_code: int,
        reason: str,
        send_will: bool = True,
    ) -> int:
        """Close every connected client matching ``predicate`` (5.0: DISCONNECT reason),
        their wills due unless ``send_will`` is False."""
        selected = [
            connection
            for connection in list(self.connections)
            if connection.connected and predicate(connection)
        ]
        for connection in selected:
            connection.disconnect(reason_code, reason, send_will)
        return len(selected)

    def tick(self) -> None:
        """Fire due delayed wills and expire sessions; call about once a second."""
        now = self.clock()
        for client_id, pending in list(self.pending_wills.items()):
            if pending.publish_at <= now:
                del self.pending_wills[client_id]
                self._publish_will(pending)
                session = self.sessions.get(client_id)
                if session is not None and session.durable:
                    self._save_session(session)
        for session in list(self.sessions.values()):
            if session.moved_to is not None:
                if session.moved_until <= now:
                    self._drop_stub(session)
                continue
            if session.seen is not None and not session.diverged and session.seen_until <= now:
                session.seen = None  # the grace after a transfer is over
            if session.expires_at is not None and session.expires_at <= now:
                self.counters.sessions_expired += 1
                logger.info("session expired: client_id=%s", session.client_id)
                self._destroy_session(session)
            elif session.connection is None and session.queued():
                expired = session.discard_expired(now)
                if expired:
                    self.counters.messages_expired += len(expired)
                    if session.durable:
                        for delivery in expired:
                            self.unstore_pending(session, delivery)
        self.drops.flush(now)
        self._maybe_release_memory()

    def _maybe_release_memory(self) -> None:
        queued = self.budget.bytes
        if queued > self.queued_peak:
            self.queued_peak = queued
            return
        peak = self.queued_peak
        if peak - queued >= RELEASE_MEMORY_AFTER and queued <= peak // 4:
            self.queued_peak = queued
            if self.release_memory is not None:
                self.release_memory()
                self.counters.memory_releases += 1
                logger.info(
                    "queued payloads fell from %d to %d bytes: freed heap given back",
                    peak,
                    queued,
                )

    def live_will(self, session: Session) -> bytes | None:
        """The will of ``session``'s connection as kept while it is connected (in the store,
        and by our backup: WILL_SET), encoded, when it has one its client may publish."""
        connection = session.connection
        if connection is None or connection.will is None or connection.principal is None:
            return None
        will = connection.will
        if not self.authorization.authorize_publish(
            connection.principal, will.topic, will.qos, will.retain
        ):
            return None  # not published at its time either
        return codec.encode_live_will(
            codec.LiveWill(
                min(connection.will_delay, session.expiry_interval),
                connection.will_expiry,
                codec.WireMessage.from_message(will, self.clock(), self.node_name),
            )
        )

    def settle_wills_at_crash(self, holder: tuple[str, float] | None) -> None:
        """The wills of the clients connected when this node last stopped without ending
        their connections (a crash: its store still has them): due now, or after their Will
        Delay Interval unless the client comes back first, as if their connections had
        ended at this start; or left to the backup that says it took them over when its link
        to us dropped (``holder``: its name, and until when (clock) the delayed wills of our
        offline sessions were its to publish: broker.cluster.Cluster.crash_wills_holder).
        Those of the delayed wills read back that fell due by then are dropped here: it
        published them."""
        restored, self.restored_wills = self.restored_wills, set()
        if holder is not None and restored:
            name, until = holder
            dropped = 0
            for client_id in restored:
                pending = self.pending_wills.get(client_id)
                if pending is not None and pending.publish_at <= until:
                    del self.pending_wills[client_id]
                    dropped += 1
                    session = self.sessions.get(client_id)
                    if session is not None and session.durable:
                        self._save_session(session)
            if dropped:
                logger.info(
                    "%d delayed wills of offline sessions fell due while this node was down: "
                    "left to node %s, which published them",
                    dropped,
                    name,
                )
        wills, self.wills_at_crash = self.wills_at_crash, {}
        if not wills:
            return
        for client_id in wills:
            session = self.sessions.get(client_id)
            if session is None or not session.will_stored:
                self.store.clear_will(client_id)
        if holder is not None:
            logger.info(
                "%d wills of clients connected when this node stopped: left to node %s, our "
                "backup then, which published them when our link dropped",
                len(wills),
                holder[0],
            )
            return
        now = self.clock()
        before = self.counters.wills_published
        waiting = 0
        for client_id, data in wills.items():
            try:
                live = codec.decode_live_will(data)
            except codec.ClusterProtocolError as error:
                logger.warning(
                    "will of client_id=%s in the store does not decode, dropped: %s",
                    client_id,
                    error,
                )
                continue
            session = self.sessions.get(client_id)
            if live.delay > 0 and session is not None and session.connection is not None:
                continue  # the client is back (here) within its Will Delay Interval
            message = live.message.to_message(now)
            if self.schedule_will(client_id, message, live.delay, live.expiry_interval):
                waiting += 1
        logger.info(
            "%d wills of clients connected when this node stopped (their connections ended "
            "with it): %d published, %d to be published after their delay unless the client "
            "comes back",
            len(wills),
            self.counters.wills_published - before,
            waiting,
        )

    def schedule_will(
        self, client_id: str, message: Message, delay: float, expiry_interval: int | None
    ) -> PendingWill | None:
        """A will this node publishes for another (broker.cluster: a lost node whose backup
        we are; the owner authorized it): now when ``delay`` is 0, else then unless the
        client comes back first. None when published now, or when a will of this node's own
        session for ``client_id`` waits already (it wins)."""
        if client_id in self.pending_wills:
            return None
        pending = PendingWill(self.clock() + delay, message, client_id, None, expiry_interval)
        if delay <= 0:
            self._publish_will(pending)
            return None
        self.pending_wills[client_id] = pending
        return pending

    def claimed_elsewhere(self, client_id: str, clean_start: bool) -> None:
        """``client_id`` connected on another node and has no session here: a will waiting
        here for it (schedule_will) is dropped, the client is back, or published now when
        the new connection ends its session (clean start, section 3.1.2.5)."""
        pending = self.pending_wills.pop(client_id, None)
        if pending is not None and clean_start:
            self._publish_will(pending)

    def _will_authorized(
        self, client_id: str, principal: Principal | None, message: Message
    ) -> bool:
        """May ``principal`` publish its will? True without a principal (the will's node
        authorized it; see PendingWill)."""
        if principal is None or self.authorization.authorize_publish(
            principal, message.topic, message.qos, message.retain
        ):
            return True
        self.counters.authorization_denied += 1
        logger.info(
            "will not published: client_id=%s topic=%s: not authorized", client_id, message.topic
        )
        return False

    def _publish_will(self, pending: PendingWill) -> None:
        message = pending.message
        if not self._will_authorized(pending.client_id, pending.principal, message):
            return
        message = dataclasses.replace(
            message,
            expires_at=None
            if pending.expiry_interval is None
            else self.clock() + pending.expiry_interval,
            # It enters the cluster here now (a will restored from another node's record
            # would otherwise carry that node's name with our seq: another message's id).
            origin_node=self.node_name,
            seq=self.next_seq(),
        )
        self.counters.wills_published += 1
        logger.info("will published: client_id=%s topic=%s", pending.client_id, message.topic)
        self.publish(message)

    # --- subscriptions ----------------------------------------------------------------------

    def subscribe(self, session: Session, topic_filter: str, options: SubscriptionOptions) -> bool:
        """Add or replace a subscription; returns True when it already existed."""
        existed = self.subscriptions.subscribe(session.client_id, topic_filter, options)
        session.subscriptions[topic_filter] = options
        if not existed and self.subscriptions.count_for(topic_filter) == 1:
            self.cluster.subscription_added(topic_filter)
        if not existed:
            self.cluster.member_changed(topic_filter, session.client_id, session.connected)
        if session.durable:
            self._save_session(session)
        return existed

    def unsubscribe(self, session: Session, topic_filter: str) -> bool:
        session.subscriptions.pop(topic_filter, None)
        removed = self.subscriptions.unsubscribe(session.client_id, topic_filter)
        if removed:
            self.cluster.member_changed(topic_filter, session.client_id, None)
            if self.subscriptions.count_for(topic_filter) == 0:
                self.cluster.subscription_removed(topic_filter)
        if session.durable:
            self._save_session(session)
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
            changed_at = self.retained_changed(message.topic)
            self.cluster.retained_changed(
                message.topic, message if message.payload else None, changed_at
            )
        delivered = self.cluster.route(message, publisher)
        if not delivered:
            self.counters.messages_no_subscribers += 1
        return delivered

    def retained_changed(self, topic: str) -> float:
        """Stamp a local retained change with the wall clock (strictly after the last one)."""
        changed_at = self.wall_clock()
        previous = self.retained_changed_at.get(topic)
        if previous is not None and changed_at <= previous:
            changed_at = previous + 1e-6
        self.retained_changed_at[topic] = changed_at
        message = self.retained.get(topic)
        self.store.set_retained(
            topic,
            None
            if message is None
            else codec.WireMessage.from_message(message, self.clock(), self.node_name),
            changed_at,
        )
        return changed_at

    def deliver_from_cluster(
        self,
        message: Message,
        plain: bool = True,
        targets: Iterable[tuple[str, str]] = (),
        publisher: Publisher | None = None,
    ) -> int:
        """A message another node accepted: deliver to local subscribers only (non-shared
        ones when ``plain``, and the named shared members). ``publisher`` stands for the
        publisher on that node: a session past its high-water mark pauses it there."""
        count = self.deliver_local(message, publisher, shared=False) if plain else 0
        for shared_filter, client_id in targets:
            count += self.deliver_shared(shared_filter, client_id, message, publisher)
        return count

    def set_retained_from_cluster(
        self, topic: str, message: Message | None, changed_at: float
    ) -> None:
        if message is None:
            self.retained.remove(topic)
        else:
            self.retained.set(topic, message)
        self.retained_changed_at[topic] = changed_at
        self.store.set_retained(
            topic,
            None
            if message is None
            else codec.WireMessage.from_message(message, self.clock(), self.node_name),
            changed_at,
        )

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

    def deliver_local(
        self, message: Message, publisher: Publisher | None = None, shared: bool = True
    ) -> int:
        sessions = self.sessions
        deliveries = self.subscriptions.match(
            message.topic, message.publisher_client_id, self._session_connected, shared
        )
        count = 0
        # Once per message rather than per delivery (fan-in: one delivery per message).
        qos = message.qos
        retain = message.retain
        deliver_to_session = self.deliver_to_session
        # A QoS 0 message with its received bytes: a plain delivery to a connected session
        # here writes them at once, without a Pending (ClientConnection.forward).
        raw = message.raw if not qos else None
        for delivery in deliveries:
            session = sessions.get(delivery.client_id)
            if session is None:
                continue
            identifiers = delivery.subscription_identifiers
            if (
                raw is not None
                and not identifiers
                and session.moved_to is None
                and session.seen is None
            ):
                connection = session.connection
                if connection is not None and connection.forward(
                    message, retain and delivery.retain_as_published
                ):
                    count += 1
                    continue
            granted = delivery.qos
            pending = Pending(
                message,
                granted if granted < qos else qos,
                retain and delivery.retain_as_published,
                tuple(identifiers) if identifiers else (),
            )
            deliver_to_session(session, pending, publisher)
            count += 1
        return count

    def deliver_shared(
        self,
        shared_filter: str,
        client_id: str,
        message: Message,
        publisher: Publisher | None,
    ) -> int:
        """One delivery to the member of a shared group the cluster picked; when it left
        meanwhile, to another local member of the group (never dropped silently)."""
        session = self.sessions.get(client_id)
        options = None if session is None else session.subscriptions.get(shared_filter)
        if session is None or options is None:
            picked = self.subscriptions.pick_member(shared_filter, message.publisher_client_id)
            if picked is None:
                self.counters.messages_dropped_no_member += 1
                if message.qos:
                    self.drops.record(f"{shared_filter} (group left)", "no shared member left")
                return 0
            client_id, options = picked
            session = self.sessions.get(client_id)
            if session is None:
                return 0
        pending = Pending(
            message,
            min(message.qos, options.qos),
            message.retain and options.retain_as_published,
            () if options.subscription_identifier is None else (options.subscription_identifier,),
        )
        self.deliver_to_session(session, pending, publisher)
        return 1

    def _session_connected(self, client_id: str) -> bool:
        session = self.sessions.get(client_id)
        return session is not None and session.connection is not None

    def deliver_to_session(
        self, session: Session, pending: Pending, publisher: Publisher | None = None
    ) -> None:
        if session.moved_to is not None:
            self.cluster.forward_delivery(session.moved_to, session.client_id, pending)
            return
        seen = session.seen
        if seen is not None and pending.message.seq and not seen.first_time(pending.message.id):
            self.counters.messages_duplicates_dropped += 1
            return
        connection = session.connection
        if session.durable and pending.qos:
            self._deliver_durable(session, pending, publisher)
            return
        if connection is not None:
            connection.deliver(pending, self._counted(session, pending, publisher))
            if (
                publisher is not None
                and pending.qos
                and (
                    session.above_high_water(self.settings.max_queued_bytes)
                    or session.share_spent(publisher)
                )
            ):
                publisher.hold_for(session)
        elif pending.qos == 0:
            self.counters.messages_dropped_qos0_offline += 1
        elif not session.enqueue(pending, self.settings.max_queued_bytes):
            self.dropped(session, pending)

    @staticmethod
    def _counted(session: Session, pending: Pending, publisher: Publisher | None) -> bool:
        """Whether max_queued_messages bounds this delivery (the byte bounds always do). Not
        for a QoS 1/2 message of a publisher a connected session paces (it pauses it at high
        water): acknowledged already, what the publisher sent before the pause reached it (a
        round trip later across a cluster link, up to link_high_water; a share in flight when
        it was resumed) is queued rather than dropped (issue 13: 100-900 of 1,600 were, at
        the default link_high_water). A local publisher's pause is immediate."""
        return publisher is None or not pending.qos or session.connection is None

    def dropped(self, session: Session, pending: Pending) -> None:
        """A delivery did not fit the session's or the node's bounds: counted and logged."""
        self.counters.messages_dropped_queue_full += 1
        if pending.qos:
            session.dropped += 1
            self.counters.messages_dropped_acknowledged += 1
            if len(session.queue) >= session.max_queued_messages:
                reason = f"queue full: max_queued_messages {session.max_queued_messages}"
            elif self.budget.bytes + len(pending.message.payload) > self.budget.limit:
                reason = f"node budget full: max_node_queued_bytes {self.budget.limit}"
            else:
                reason = f"queue full: max_queued_bytes {self.settings.max_queued_bytes}"
            self.drops.record(session.client_id, reason)

    def _deliver_durable(
        self, session: Session, pending: Pending, publisher: Publisher | None
    ) -> None:
        """Queue and store; the connection sends it once the store has committed it."""
        counted = self._counted(session, pending, publisher)
        if not session.enqueue(pending, self.settings.max_queued_bytes, counted):
            self.dropped(session, pending)
            return
        if pending.qos == 2:
            packet_id = session.allocate_packet_id()
            if packet_id is None:
                session.queue.pop()
                session.remove_bytes(len(pending.message.payload))
                self.dropped(session, pending)
                return
            pending.packet_id = packet_id
            if session.reserved is None:
                session.reserved = set()
            session.reserved.add(packet_id)
        self.store_pending(session, pending)
        connection = session.connection
        if connection is not None:
            connection.pump_after_commit()
            if publisher is not None and (
                session.above_high_water(self.settings.max_queued_bytes)
                or session.share_spent(publisher)
            ):
                publisher.hold_for(session)

    # --- the store --------------------------------------------------------------------------

    def store_pending(self, session: Session, pending: Pending, inflight: bool = False) -> None:
        key = self.next_delivery_key
        self.next_delivery_key = key + 1
        pending.key = key
        self.store.add_delivery(
            session.client_id, key, self.delivery_record(pending, pending.packet_id, inflight)
        )

    def unstore_pending(self, session: Session, pending: Pending) -> None:
        if pending.key:
            message = pending.message
            self.store.remove_delivery(
                session.client_id, pending.key, f"{message.origin_node or ''}:{message.seq}"
            )
            pending.key = 0

    def delivery_record(
        self, pending: Pending, packet_id: int = 0, inflight: bool = False, released: bool = False
    ) -> codec.DeliveryRecord:
        return codec.DeliveryRecord(
            codec.WireMessage.from_message(pending.message, self.clock(), self.node_name),
            pending.qos,
            pending.retain,
            pending.subscription_identifiers,
            packet_id,
            inflight,
            released,
        )

    def session_record(self, session: Session, deliveries: bool) -> codec.SessionRecord:
        now = self.clock()
        expires_at = None
        if session.expires_at is not None:
            expires_at = self.wall_clock() + (session.expires_at - now)
        will = None
        pending_will = self.pending_wills.get(session.client_id)
        if pending_will is not None:
            will = codec.WillRecord(
                self.wall_clock() + (pending_will.publish_at - now),
                pending_will.expiry_interval,
                codec.WireMessage.from_message(pending_will.message, now, self.node_name),
            )
        records: tuple[codec.DeliveryRecord, ...] = ()
        if deliveries:
            records = tuple(
                [
                    self.delivery_record(o.pending, o.packet_id, True, o.released)
                    for o in session.inflight.values()
                ]
                + [self.delivery_record(p, p.packet_id) for p in session.queued()]
            )
        return codec.SessionRecord(
            session.client_id,
            session.expiry_interval,
            expires_at,
            session.version or Version(0, self.node_name),
            session.next_packet_id,
            tuple(session.subscriptions.items()),
            tuple(sorted(session.incoming_ids())),
            will,
            session.diverged,
            records,
        )

    def _save_session(self, session: Session) -> None:
        self.store.save_session(self.session_record(session, deliveries=False))

    def _store_everything(self, session: Session) -> None:
        """A session became durable (or arrived): write its record and all it holds."""
        self._save_session(session)
        for packet_id in session.incoming_ids():
            self.store.add_incoming(session.client_id, packet_id)
        for outgoing in session.inflight.values():
            pending = outgoing.pending
            key = self.next_delivery_key
            self.next_delivery_key = key + 1
            pending.key = key
            self.store.add_delivery(
                session.client_id,
                key,
                self.delivery_record(pending, outgoing.packet_id, True, outgoing.released),
            )
        for pending in session.queued():
            self.store_pending(session, pending)

    def _unstore_everything(self, session: Session) -> None:
        for outgoing in session.inflight.values():
            self.unstore_pending(session, outgoing.pending)
        for pending in session.queued():
            self.unstore_pending(session, pending)
        self.store.delete_session(session.client_id)

    def install_session(
        self, record: codec.SessionRecord, merge: bool, with_will: bool = False
    ) -> Session | None:
        """A session from another node (TRANSFER) or from a stale copy (merge).

        A transfer replaces what is here; a merge adds the deliveries the session has not
        seen (by message id) to the session it is merged into, if it still is here. With
        ``with_will`` (a migration: the client is offline) the record's delayed will is
        published here at its time unless the client comes back first.
        """
        client_id = record.client_id
        self.lamport.observe(record.version)
        now = self.clock()
        session = self.sessions.get(client_id)
        if session is not None and session.moved_to is not None:
            self._drop_stub(session)
            session = None
        if merge or session is not None:
            if session is None:
                logger.info(
                    "stale copy of client_id=%s from a split dropped: no session here", client_id
                )
                return None
            self._merge_deliveries(session, record, now)
            self.counters.sessions_merged += 1
            return session
        session = self._new_session(client_id)
        session.version = record.version
        session.expiry_interval = record.expiry_interval
        session.next_packet_id = record.next_packet_id or 1
        if record.incoming_qos2:
            session.incoming_qos2 = set(record.incoming_qos2)
        session.seen = SeenIds()
        session.seen_until = now + MOVED_GRACE
        for topic_filter, options in record.subscriptions:
            self.subscribe(session, topic_filter, options)
        if record.expires_at is not None:
            session.expires_at = now + (record.expires_at - self.wall_clock())
        for delivery in record.deliveries:
            self._install_delivery(session, delivery, now)
        will = record.will
        if with_will and will is not None:
            delay = max(0.0, will.publish_at - self.wall_clock())
            self.schedule_will(client_id, will.message.to_message(now), delay, will.expiry_interval)
        session.durable = self.store.durable and session.expiry_interval > 0
        if session.durable:
            self._store_everything(session)
        self.counters.sessions_transferred_in += 1
        return session

    def _install_delivery(
        self, session: Session, delivery: codec.DeliveryRecord, now: float
    ) -> Pending:
        message = delivery.message.to_message(now)
        if session.seen is not None:
            session.seen.first_time(message.id)
        pending = Pending(message, delivery.qos, delivery.retain, delivery.subscription_identifiers)
        size = len(message.payload)
        if delivery.inflight and delivery.packet_id and delivery.packet_id not in session.inflight:
            session.inflight[delivery.packet_id] = Outgoing(
                delivery.packet_id, pending, delivery.released
            )
        else:
            if delivery.packet_id:
                pending.packet_id = delivery.packet_id
                if session.reserved is None:
                    session.reserved = set()
                session.reserved.add(delivery.packet_id)
            session.queue.append(pending)
        session.add_bytes(size)
        return pending

    def _merge_deliveries(self, session: Session, record: codec.SessionRecord, now: float) -> None:
        seen = session.seen
        for delivery in record.deliveries:
            if delivery.released:
                # The client had PUBREL for it: it has the message, only PUBCOMP is missing.
                continue
            message = delivery.message.to_message(now)
            if seen is not None and message.seq and not seen.first_time(message.id):
                self.counters.messages_duplicates_dropped += 1
                continue
            # Merged deliveries are new to this session: new packet ids (the client never
            # saw the old node's ids in this session).
            pending = Pending(
                message, delivery.qos, delivery.retain, delivery.subscription_identifiers
            )
            if session.durable and pending.qos:
                self._deliver_durable(session, pending, None)
            elif session.connection is not None:
                session.connection.deliver(pending)
            elif pending.qos and not session.enqueue(pending, self.settings.max_queued_bytes):
                self.dropped(session, pending)

    def restore(self, state: StoredState) -> None:
        """Rebuild sessions (all offline), their deliveries and retained messages at start."""
        meta = state.meta
        reserved = int(meta.get("seq_reserved", b"0") or 0)
        self.ids = MessageIds(reserved, self.wall_clock())
        now = self.clock()
        wall = self.wall_clock()
        max_key = 0
        for stored in state.sessions:
            record = stored.record
            self.lamport.observe(record.version)
            session = self._new_session(record.client_id)
            session.version = record.version
            session.expiry_interval = record.expiry_interval
            session.next_packet_id = record.next_packet_id or 1
            session.diverged = record.diverged
            if record.diverged:
                session.seen = SeenIds()
            if stored.incoming:
                session.incoming_qos2 = set(stored.incoming)
            session.durable = True
            if record.expires_at is not None:
                session.expires_at = now + (record.expires_at - wall)
            elif record.expiry_interval != SESSION_NEVER_EXPIRES:
                # It was connected when the node stopped: expiry counts from now.
                session.expires_at = now + record.expiry_interval
            for topic_filter, options in record.subscriptions:
                self.subscriptions.subscribe(session.client_id, topic_filter, options)
                session.subscriptions[topic_filter] = options
            for delivery in stored.deliveries:
                pending = self._install_delivery(session, delivery.record, now)
                pending.key = delivery.key
                max_key = max(max_key, delivery.key)
            if record.will is not None:
                will = record.will
                self.restored_wills.add(record.client_id)
                self.pending_wills[record.client_id] = PendingWill(
                    now + max(0.0, will.publish_at - wall),
                    will.message.to_message(now),
                    record.client_id,
                    None,
                    will.expiry_interval,
                )
        self.next_delivery_key = max_key + 1
        self.wills_at_crash = dict(state.wills)
        # What was read back is on disk, of course.
        self.store.committed_key = max(self.store.committed_key, max_key)
        for topic, wire, changed_at in state.retained:
            message = wire.to_message(now)
            if not message.is_expired(now):
                self.retained.set(topic, message)
                self.retained_changed_at[topic] = changed_at
        if state.sessions or state.retained:
            logger.info(
                "restored from the store: %d sessions (%d queued or in-flight messages), "
                "%d retained messages",
                len(state.sessions),
                sum(len(s.deliveries) for s in state.sessions),
                len(self.retained),
            )

    # --- admin ------------------------------------------------------------------------------

    def connected_clients(self) -> Iterable[ClientConnection]:
        return [connection for connection in self.connections if connection.connected]
