"""The application message as the broker routes it (MQTT 5.0 section 3.3).

A :class:`Message` is what a PUBLISH (or a will) becomes once it is accepted: the topic name
(never an alias), the payload, the publisher's QoS and RETAIN flag, and the properties that
travel with it to subscribers (payload format indicator, content type, response topic,
correlation data, user properties). Per-hop properties (Topic Alias, Subscription
Identifiers) are stripped; the Message Expiry Interval becomes an absolute deadline on the
broker's clock so it counts down while the message waits in a queue (section 3.3.2.3.3).

Identity (issue 12): every message a node accepts gets ``(origin_node, seq)``, ``seq`` from
the node's counter, which never repeats across restarts (:class:`MessageIds`). The id travels
over the cluster link and into the store; it is what a node de-duplicates by when the same
message reaches a session twice (a transferred or merged session, a resent link frame).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field

from broker.mqtt import Properties, Publish, record

__all__ = ["Message", "MessageIds"]

# MessageIds: seq starts above the wall clock in microseconds, so a node that restarts without
# its store (memory mode) still never reuses an id it gave before (unless it accepted more
# than a million messages a second for its whole previous life).
SEQ_PER_SECOND = 1_000_000


@record  # frozen to mypy, cheap to build (broker/mqtt/packets.py)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties
    # Absolute time (broker clock, seconds) after which the message must not be delivered.
    expires_at: float | None = None
    publisher_client_id: str | None = None
    # Name of the node where the message entered the cluster.
    origin_node: str | None = None
    # With origin_node, the message's cluster-wide identity (0: not routed, e.g. an answer).
    seq: int = 0
    # The PUBLISH it came in as (Publish.raw) and that packet's protocol level, when the
    # bytes describe this message exactly (no properties, the topic itself, no expiry): a
    # delivery at the same QoS and level forwards them (issue 13). Not __init__ arguments, so
    # that dataclasses.replace, and every message built from another (wills, the cluster
    # link, the store), starts without them.
    raw: bytes | None = field(default=None, init=False, compare=False, repr=False)
    raw_level: int = field(default=0, init=False, compare=False, repr=False)

    @classmethod
    def from_publish(
        cls,
        publish: Publish,
        topic: str,
        now: float,
        publisher_client_id: str | None,
        origin_node: str | None,
        seq: int = 0,
    ) -> Message:
        properties = publish.properties
        interval = properties.message_expiry_interval
        expires_at = None if interval is None else now + interval
        properties = dataclasses.replace(
            properties,
            topic_alias=None,
            subscription_identifiers=(),
            message_expiry_interval=None,
        )
        return cls(
            topic,
            bytes(publish.payload),
            publish.qos,
            publish.retain,
            properties,
            expires_at,
            publisher_client_id,
            origin_node,
            seq,
        )

    @property
    def id(self) -> tuple[str, int]:
        return (self.origin_node or "", self.seq)

    def is_expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def remaining_expiry(self, now: float) -> int | None:
        """Message Expiry Interval to send now: the time left, rounded up, at least 1."""
        if self.expires_at is None:
            return None
        return max(1, math.ceil(self.expires_at - now))


class MessageIds:
    """The node's message sequence: strictly increasing, never reused across restarts.

    ``start`` is the highest seq a previous life of this node may have used (from the store;
    0 without one). The wall clock in microseconds is the floor, so ids stay unique even
    when the store is gone.
    """

    __slots__ = ("last",)

    def __init__(self, start: int, wall_clock_seconds: float) -> None:
        self.last = max(start, int(wall_clock_seconds * SEQ_PER_SECOND))

    def next(self) -> int:
        self.last += 1
        return self.last
