"""One client session: the state that survives a connection (MQTT 5.0 section 4.1).

A session holds the client's subscriptions, the outgoing QoS 1/2 messages not yet fully
acknowledged (*inflight*, resent with DUP on reconnect, section 4.4), the messages waiting for
an inflight slot or for the client to come back (*queue*, bounded by ``max_queued_messages``
and ``max_queued_bytes``, and the node by ``max_node_queued_bytes``: overflow is dropped,
counted per client and logged), the QoS 2 packet identifiers the client sent and has not
released yet (section 4.3.3), and its expiry (section 3.1.2.11.2).

Backpressure (issue 4, "slow consumers"): when routing a QoS 1/2 message takes a connected
session's queue to ``queue_high_water`` (3/4 of ``max_queued_messages``, at most 64
messages, so that it stays a few milliseconds long), or its queued and in-flight payload
bytes to 3/4 of ``max_queued_bytes``, the publishing connection stops being read and waits
in ``held_publishers``; it is released when the queue drains to ``queue_low_water`` (half of
the high marks, in messages and in bytes), when the session loses its connection, or when
the session ends. (Without the byte mark a queue of large messages reached its byte bound,
and dropped acknowledged messages, long before the count mark paused anyone.) Released
publishers are served fairly (:class:`HeldPublishers`): they resume in the order they were
paused, as many as the room below high water gives ``RESUME_SHARE`` messages each (the others
wait for the next round), and each may route only its share of that room before it is paused
again. Without the shares the first publishers to run refilled the queue and the rest routed
one message each per round: with 16 publishers, two got 70% of the deliveries and each of the
others' messages waited ~64 rounds (bench/README.md, issue 13 backpressure p99). A connected
session queues the acknowledged messages of publishers it paces past ``max_queued_messages``
(within the byte bounds): what they sent before their pause reached them (across a cluster
link a round trip later, up to ``link_high_water``) is not dropped. An offline
session holds nobody: it queues up to its bounds and then drops and counts, so a client that
never comes back cannot stall its publishers. A cluster peer is a holder too
(:class:`Holder`): its unacknowledged bytes pause the publishers feeding it.

Cluster and store (issue 12): ``version`` is the claim that owns the session
(:mod:`broker.registry`); ``durable`` sessions (persistent ones on a node with a disk store)
are written to :mod:`broker.store`, each queued or in-flight delivery under its ``key``. A
session handed to another node stays here as a forwarding stub (``moved_to``) for a grace
period. ``seen`` remembers the ids of recent deliveries of a session that came from another
node (transfer, merge) so a message reaching it twice is delivered once.

Pure state: no I/O, no clock. The connection and the core drive it with explicit times.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from broker.cluster_codec import Version
from broker.message import Message
from broker.subscriptions import SubscriptionOptions

if TYPE_CHECKING:
    from broker.connection import ClientConnection

__all__ = [
    "SESSION_NEVER_EXPIRES",
    "HeldPublishers",
    "Holder",
    "Outgoing",
    "Pending",
    "Publisher",
    "QueueBudget",
    "SeenIds",
    "Session",
]

# MQTT 5.0 section 3.1.2.11.2: 0xFFFFFFFF means the session does not expire.
SESSION_NEVER_EXPIRES = 0xFFFFFFFF
# MQTT section 2.2.1: packet identifiers are non-zero 16-bit integers.
MAX_PACKET_ID = 0xFFFF
# Backpressure marks as fractions of max_queued_messages: above HIGH a QoS 1/2 publisher is
# paused, at or below LOW it is resumed. The quarter above HIGH absorbs what publishers not
# yet paused still route (one message each, as a paused connection handles no more packets).
QUEUE_HIGH_WATER_FRACTION = 0.75
# ... and at most this many messages beyond the inflight window, so that the queue stays a
# few milliseconds of deliveries long (latency under backpressure, issue 13).
QUEUE_HIGH_WATER_MESSAGES = 64
QUEUE_LOW_WATER_FRACTION = 0.5
# Fair service of held publishers: each one resumed may route at least this many messages
# before it is paused again; when the room below high water is smaller than that times the
# publishers held, only the oldest held are resumed (round robin). Pauses and resumes cost
# CPU: with every publisher resumed each round (16 of them sharing 32 messages) QoS 1 fan-in
# took 9% more CPU per message than before (bench/README.md, issue 13 backpressure).
RESUME_SHARE = 8
# Message ids remembered per session that may see a message twice (see SeenIds): as many as
# the default max_queued_messages.
SEEN_IDS = 1000


class Holder(Protocol):
    """What a publisher can be paused on: a lagging session, or a cluster peer."""

    @property
    def held_publishers(self) -> HeldPublishers: ...

    @property
    def connection(self) -> ClientConnection | None: ...


class Publisher(Protocol):
    """What a holder pauses: a local publishing connection, or (broker.cluster) a publisher on
    another node, paused there with a HOLD frame."""

    def hold_for(self, session: Holder, peer: bool = False) -> None: ...

    def session_released(self, session: Holder, share: int = 0) -> None:
        """``share``: what it may route to ``session`` before it is paused again (0: no
        share, only the mark paces it)."""


class HeldPublishers:
    """The publishers one holder paused, in the order it paused them, and the shares of the
    ones it released last (fair service under backpressure, issue 13).

    ``release(room)`` resumes them oldest first and gives each ``room // released`` (at least
    1) of what the holder can take before its high-water mark; ``spent(publisher, cost)``
    counts what a released publisher routes to the holder and says when its share is used up,
    so that the holder pauses it again although the mark is not reached. Publishers that were
    never paused have no share: only the mark paces them. The shares of a release are
    forgotten at the next one (so at most one entry per publisher released last)."""

    __slots__ = ("shares", "waiting")

    def __init__(self) -> None:
        # dict as an ordered set: iteration is the order publishers were paused.
        self.waiting: dict[Publisher, None] = {}
        self.shares: dict[Publisher, int] = {}

    def __len__(self) -> int:
        return len(self.waiting)

    def __bool__(self) -> bool:
        return bool(self.waiting)

    def __contains__(self, publisher: object) -> bool:
        return publisher in self.waiting

    def __iter__(self) -> Iterator[Publisher]:
        return iter(self.waiting)

    def add(self, publisher: Publisher) -> None:
        self.waiting[publisher] = None
        # Paused again (by the mark, or its share used up): what it had left is forgotten.
        self.shares.pop(publisher, None)

    @property
    def sharing(self) -> bool:
        """Whether some publisher released last still has a share to use."""
        return bool(self.shares)

    def discard(self, publisher: Publisher) -> None:
        """The publisher is gone (closed, taken over): neither held nor paced any more."""
        self.waiting.pop(publisher, None)
        self.shares.pop(publisher, None)

    def release(self, holder: Holder, room: int | None = None, least: int = 1) -> None:
        """Resume paused publishers, oldest first. Without ``room``, all of them. With ``room``
        (what the holder takes before its high-water mark), as many as can have ``least`` of
        it each (at least one publisher), and each may route its share of the room before it
        pauses again; the others stay paused, first in line for the next release. Publishers
        released last that have not used their shares yet will fill the room too: the room
        is divided among them as well (their shares are then forgotten, as before)."""
        waiting = self.waiting
        if not waiting:
            return
        if room is None:
            self.waiting = {}
            self.shares = {}
            share = 0
        else:
            # Before, one publisher resumed alone while the others' shares were on their way
            # (a publisher on a peer uses its share a link's round trip later) took the whole
            # room: 64 deliveries in a row against the others' 8 (issue 13, the cross-link
            # fairness test's tail).
            sharing = sum(1 for publisher in self.shares if publisher not in waiting)
            count = max(1, min(len(waiting), room // least - sharing))
            if count == len(waiting):
                self.waiting = {}
            else:
                resumed = list(waiting)[:count]
                for publisher in resumed:
                    del waiting[publisher]
                waiting = dict.fromkeys(resumed)
            share = max(1, room // (count + sharing))
            self.shares = dict.fromkeys(waiting, share)
        for publisher in waiting:
            publisher.session_released(holder, share)

    def spent(self, publisher: Publisher, cost: int = 1) -> bool:
        """``publisher`` routed ``cost`` more to the holder; True when its share is used up
        (it is then forgotten: the caller pauses it)."""
        shares = self.shares
        if not shares:
            return False
        left = shares.get(publisher)
        if left is None:
            return False
        left -= cost
        if left <= 0:
            del shares[publisher]
            return True
        shares[publisher] = left
        return False


@dataclass(slots=True)
class Pending:
    """A delivery waiting in the session queue."""

    message: Message
    qos: int
    retain: bool
    subscription_identifiers: tuple[int, ...] = ()
    # The store's key for this delivery (0: not stored).
    key: int = 0
    # A QoS 2 delivery of a durable session gets its packet id when it is stored, so the id
    # is on disk before the PUBLISH carrying it is sent (0: given when it is sent).
    packet_id: int = 0


@dataclass(slots=True)
class Outgoing:
    """An outgoing QoS 1/2 PUBLISH awaiting PUBACK, PUBREC, or (after PUBREL) PUBCOMP."""

    packet_id: int
    pending: Pending
    # QoS 2: PUBREC received and PUBREL sent; only PUBCOMP is awaited.
    released: bool = False


class QueueBudget:
    """The node-wide count of payload bytes queued and in flight (max_node_queued_bytes)."""

    __slots__ = ("bytes", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0


class SeenIds:
    """The last ``SEEN_IDS`` message ids delivered to one session: a message that reaches it
    a second time (by its old node's forward and by the new route) is delivered once."""

    __slots__ = ("ids",)

    def __init__(self) -> None:
        self.ids: OrderedDict[tuple[str, int], None] = OrderedDict()

    def first_time(self, message_id: tuple[str, int]) -> bool:
        ids = self.ids
        if message_id in ids:
            return False
        ids[message_id] = None
        if len(ids) > SEEN_IDS:
            ids.popitem(last=False)
        return True


# eq=False: a session is an identity (hashable, kept in sets of held publishers).
@dataclass(slots=True, eq=False)
class Session:
    client_id: str
    max_queued_messages: int
    subscriptions: dict[str, SubscriptionOptions] = field(default_factory=dict)
    inflight: dict[int, Outgoing] = field(default_factory=dict)
    # The queue, the QoS 2 ids and the held publishers are made when first used (the
    # properties below): empty, they cost 760 + 216 + 216 bytes per session, most sessions
    # of a fleet never use them (bench/broker_memory.py).
    _queue: deque[Pending] | None = field(default=None, init=False)
    _incoming_qos2: set[int] | None = field(default=None, init=False)
    expiry_interval: int = 0
    # Set when the session loses its connection; None while connected or never expiring.
    expires_at: float | None = None
    connection: ClientConnection | None = None
    next_packet_id: int = 1
    # Publishing connections paused until this session's queue drains (see module docstring).
    _held_publishers: HeldPublishers | None = field(default=None, init=False)
    queue_high_water: int = field(init=False)
    queue_low_water: int = field(init=False)
    # Payload bytes queued and in flight, and the node's total they are part of.
    queued_bytes: int = 0
    budget: QueueBudget | None = None
    # Acknowledged QoS >= 1 messages this session lost to its bounds (issue 14 item 2).
    dropped: int = 0
    # Issue 12: the claim that owns it, whether it is on disk, where it moved.
    version: Version | None = None
    durable: bool = False
    moved_to: str | None = None
    moved_until: float = 0.0
    seen: SeenIds | None = None
    seen_until: float = 0.0
    # Created fresh while a node that may hold its older copy was unreachable.
    diverged: bool = False
    # Its connection's will is with our backup (WILL_SET sent: WILL_CLEAR when it ends).
    will_copied: bool = False
    # ... and in the node's store (Store.set_will: cleared when the connection ends).
    will_stored: bool = False
    # Packet ids given to stored QoS 2 deliveries still in the queue (see Pending).
    reserved: set[int] | None = None

    def __post_init__(self) -> None:
        # Short queues: a message waits in a connected session's queue for about
        # high water / delivery rate; at 3/4 of 1,000 that was ~100 ms (bench/README.md).
        self.queue_high_water = max(
            1,
            min(
                int(self.max_queued_messages * QUEUE_HIGH_WATER_FRACTION),
                QUEUE_HIGH_WATER_MESSAGES,
            ),
        )
        self.queue_low_water = min(
            int(self.max_queued_messages * QUEUE_LOW_WATER_FRACTION), self.queue_high_water // 2
        )

    @property
    def connected(self) -> bool:
        return self.connection is not None

    @property
    def queue(self) -> deque[Pending]:
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        return queue

    @queue.setter
    def queue(self, queue: deque[Pending]) -> None:
        self._queue = queue

    @property
    def incoming_qos2(self) -> set[int]:
        incoming = self._incoming_qos2
        if incoming is None:
            incoming = self._incoming_qos2 = set()
        return incoming

    @incoming_qos2.setter
    def incoming_qos2(self, incoming: set[int]) -> None:
        self._incoming_qos2 = incoming

    @property
    def held_publishers(self) -> HeldPublishers:
        held = self._held_publishers
        if held is None:
            held = self._held_publishers = HeldPublishers()
        return held

    def queued(self) -> deque[Pending] | tuple[()]:
        """The queue, read without making one (an empty session costs no deque)."""
        return self._queue or ()

    def incoming_ids(self) -> set[int] | tuple[()]:
        """The QoS 2 packet ids not released yet, read without making the set."""
        return self._incoming_qos2 or ()

    @property
    def idle(self) -> bool:
        """Nothing queued and no publisher held (read without making either)."""
        return not self._queue and not self._held_publishers

    def allocate_packet_id(self) -> int | None:
        """A packet identifier not used by any inflight message, or None when all are."""
        reserved = self.reserved
        if len(self.inflight) + (len(reserved) if reserved else 0) >= MAX_PACKET_ID:
            return None
        packet_id = self.next_packet_id
        while packet_id in self.inflight or (reserved and packet_id in reserved):
            packet_id = packet_id % MAX_PACKET_ID + 1
        self.next_packet_id = packet_id % MAX_PACKET_ID + 1
        return packet_id

    def add_bytes(self, size: int) -> None:
        self.queued_bytes += size
        budget = self.budget
        if budget is not None:
            budget.bytes += size

    def remove_bytes(self, size: int) -> None:
        self.queued_bytes -= size
        budget = self.budget
        if budget is not None:
            budget.bytes -= size

    def has_room(self, size: int, max_bytes: int, counted: bool = True) -> bool:
        """Whether one more delivery of ``size`` payload bytes fits every bound (without
        ``counted``, the byte bounds only)."""
        if counted and self._queue is not None and len(self._queue) >= self.max_queued_messages:
            return False
        if self.queued_bytes + size > max_bytes and self.queued_bytes:
            return False
        budget = self.budget
        return budget is None or budget.bytes + size <= budget.limit or not budget.bytes

    def above_high_water(self, max_bytes: int) -> bool:
        """Whether a publisher feeding this connected session should pause."""
        return (
            self._queue is not None and len(self._queue) >= self.queue_high_water
        ) or self.queued_bytes >= max_bytes * QUEUE_HIGH_WATER_FRACTION

    def share_spent(self, publisher: Publisher) -> bool:
        """``publisher``, released with a share (HeldPublishers), routed one more message
        here; True when that used the share up."""
        held = self._held_publishers
        return held is not None and held.spent(publisher)

    def forget_share(self, publisher: Publisher) -> None:
        """``publisher`` will not use the share this session resumed it with."""
        held = self._held_publishers
        if held is not None:
            held.shares.pop(publisher, None)

    def below_low_water(self, max_bytes: int) -> bool:
        """Whether the publishers paused on this session may resume."""
        return (
            self._queue is None or len(self._queue) <= self.queue_low_water
        ) and self.queued_bytes <= max_bytes * QUEUE_LOW_WATER_FRACTION

    def enqueue(self, pending: Pending, max_bytes: int = 1 << 62, counted: bool = True) -> bool:
        """Queue a delivery; False when a bound is reached (the caller counts the drop).
        Without ``counted`` only the byte bounds apply: for an acknowledged message of a
        publisher this session paces (broker.core.deliver_to_session)."""
        size = len(pending.message.payload)
        if not self.has_room(size, max_bytes, counted):
            return False
        self.queue.append(pending)
        self.add_bytes(size)
        return True

    def release_publishers(self, drained: bool = False) -> None:
        """Resume every publisher paused on this session: it went offline or ended, or
        (``drained``) its queue drained to low water, and then each gets its share of the
        room up to high water (HeldPublishers)."""
        held = self._held_publishers
        if held is None:
            return
        if not drained:
            # Offline or ended: nothing paces its publishers any more.
            self._held_publishers = None
            held.release(self)
            return
        queued = len(self._queue) if self._queue is not None else 0
        if queued and held.sharing:
            # The publishers released last have not used their shares yet (they run on the
            # next loop turn): the rest wait for the next round, or until the queue is empty.
            return
        held.release(self, self.queue_high_water - queued, RESUME_SHARE)

    def discard_expired(self, now: float) -> list[Pending]:
        """Drop queued messages whose expiry passed; returns them (the caller unstores)."""
        if not self._queue or not any(
            pending.message.expires_at is not None for pending in self._queue
        ):
            return []
        kept: deque[Pending] = deque()
        dropped: list[Pending] = []
        for pending in self.queue:
            if pending.message.is_expired(now):
                dropped.append(pending)
                self.remove_bytes(len(pending.message.payload))
            else:
                kept.append(pending)
        self.queue = kept
        return dropped
