"""The application message as the broker routes it (MQTT 5.0 section 3.3).

A :class:`Message` is what a PUBLISH (or a will) becomes once it is accepted: the topic name
(never an alias), the payload, the publisher's QoS and RETAIN flag, and the properties that
travel with it to subscribers (payload format indicator, content type, response topic,
correlation data, user properties). Per-hop properties (Topic Alias, Subscription
Identifiers) are stripped; the Message Expiry Interval becomes an absolute deadline on the
broker's clock so it counts down while the message waits in a queue (section 3.3.2.3.3).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from broker.mqtt import Properties, Publish

__all__ = ["Message"]


@dataclass(frozen=True, slots=True)
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

    @classmethod
    def from_publish(
        cls,
        publish: Publish,
        topic: str,
        now: float,
        publisher_client_id: str | None,
        origin_node: str | None,
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
        )

    def is_expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def remaining_expiry(self, now: float) -> int | None:
        """Message Expiry Interval to send now: the time left, rounded up, at least 1."""
        if self.expires_at is None:
            return None
        return max(1, math.ceil(self.expires_at - now))
