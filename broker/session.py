"""One client session: the state that survives a connection (MQTT 5.0 section 4.1).

A session holds the client's subscriptions, the outgoing QoS 1/2 messages not yet fully
acknowledged (*inflight*, resent with DUP on reconnect, section 4.4), the messages waiting for
an inflight slot or for the client to come back (*queue*, bounded by
``max_queued_messages``: overflow is dropped and counted), the QoS 2 packet identifiers the
client sent and has not released yet (section 4.3.3), and its expiry (section 3.1.2.11.2).

Backpressure (issue 4, "slow consumers"): when routing a QoS 1/2 message takes a connected
session's queue to ``queue_high_water`` (3/4 of ``max_queued_messages``), the publishing
connection stops being read and waits in ``held_publishers``; it is released when the queue
drains to ``queue_low_water`` (1/2), when the session loses its connection, or when the
session ends. An offline session holds nobody: it queues up to ``max_queued_messages`` and
then drops and counts, so a client that never comes back cannot stall its publishers.

Pure state: no I/O, no clock. The connection and the core drive it with explicit times.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker.message import Message
from broker.subscriptions import SubscriptionOptions

if TYPE_CHECKING:
    from broker.connection import ClientConnection

__all__ = ["SESSION_NEVER_EXPIRES", "Outgoing", "Pending", "Session"]

# MQTT 5.0 section 3.1.2.11.2: 0xFFFFFFFF means the session does not expire.
SESSION_NEVER_EXPIRES = 0xFFFFFFFF
# MQTT section 2.2.1: packet identifiers are non-zero 16-bit integers.
MAX_PACKET_ID = 0xFFFF
# Backpressure marks as fractions of max_queued_messages: above HIGH a QoS 1/2 publisher is
# paused, at or below LOW it is resumed. The quarter above HIGH absorbs what publishers not
# yet paused still route (one message each, as a paused connection handles no more packets).
QUEUE_HIGH_WATER_FRACTION = 0.75
QUEUE_LOW_WATER_FRACTION = 0.5


@dataclass(slots=True)
class Pending:
    """A delivery waiting in the session queue."""

    message: Message
    qos: int
    retain: bool
    subscription_identifiers: tuple[int, ...] = ()


@dataclass(slots=True)
class Outgoing:
    """An outgoing QoS 1/2 PUBLISH awaiting PUBACK, PUBREC, or (after PUBREL) PUBCOMP."""

    packet_id: int
    pending: Pending
    # QoS 2: PUBREC received and PUBREL sent; only PUBCOMP is awaited.
    released: bool = False


# eq=False: a session is an identity (hashable, kept in sets of held publishers).
@dataclass(slots=True, eq=False)
class Session:
    client_id: str
    max_queued_messages: int
    subscriptions: dict[str, SubscriptionOptions] = field(default_factory=dict)
    inflight: dict[int, Outgoing] = field(default_factory=dict)
    queue: deque[Pending] = field(default_factory=deque)
    incoming_qos2: set[int] = field(default_factory=set)
    expiry_interval: int = 0
    # Set when the session loses its connection; None while connected or never expiring.
    expires_at: float | None = None
    connection: ClientConnection | None = None
    next_packet_id: int = 1
    # Publishing connections paused until this session's queue drains (see module docstring).
    held_publishers: set[ClientConnection] = field(default_factory=set)
    queue_high_water: int = field(init=False)
    queue_low_water: int = field(init=False)

    def __post_init__(self) -> None:
        self.queue_high_water = max(1, int(self.max_queued_messages * QUEUE_HIGH_WATER_FRACTION))
        self.queue_low_water = int(self.max_queued_messages * QUEUE_LOW_WATER_FRACTION)

    @property
    def connected(self) -> bool:
        return self.connection is not None

    def allocate_packet_id(self) -> int | None:
        """A packet identifier not used by any inflight message, or None when all are."""
        if len(self.inflight) >= MAX_PACKET_ID:
            return None
        packet_id = self.next_packet_id
        while packet_id in self.inflight:
            packet_id = packet_id % MAX_PACKET_ID + 1
        self.next_packet_id = packet_id % MAX_PACKET_ID + 1
        return packet_id

    def enqueue(self, pending: Pending) -> bool:
        """Queue a delivery; False when the queue is full (the caller counts the drop)."""
        if len(self.queue) >= self.max_queued_messages:
            return False
        self.queue.append(pending)
        return True

    def release_publishers(self) -> None:
        """Resume every publisher paused on this session (it drained, went offline or ended)."""
        if not self.held_publishers:
            return
        publishers = self.held_publishers
        self.held_publishers = set()
        for publisher in publishers:
            publisher.session_released(self)

    def discard_expired(self, now: float) -> int:
        """Drop queued messages whose expiry passed; returns how many."""
        if not any(pending.message.expires_at is not None for pending in self.queue):
            return 0
        kept = deque(pending for pending in self.queue if not pending.message.is_expired(now))
        dropped = len(self.queue) - len(kept)
        self.queue = kept
        return dropped
