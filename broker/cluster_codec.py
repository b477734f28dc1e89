"""Sans-IO codec of the node-to-node cluster link (seed 002: cluster RPC over mutual TLS).

The link carries length-prefixed frames over one TLS connection per pair of nodes::

    frame   = length:u32 (big-endian, counts type + body) | type:u8 | body
    string  = length:u16 | UTF-8 bytes (MQTT's UTF-8 Encoded String, section 1.5.4)
    binary  = length:u16 | bytes          blob = length:u32 | bytes
    version = counter:u64 | node:string   (a claim on a client id, compared as a tuple)

Frame types and bodies (protocol version :data:`PROTOCOL_VERSION`):

A node speaks versions :data:`MIN_PROTOCOL_VERSION` to :data:`PROTOCOL_VERSION` and announces
one of them in its HELLO (``[cluster] protocol_version``); each link speaks the lower of the
two announced (:func:`link_version`), as Kafka's inter.broker.protocol.version does, so a
cluster is upgraded node by node: every node first announces the old version, then the new.
Version 2 is version 3 without HOLD's share; version 3 is version 4 without the REPLICA
frames (a link of version 3 carries no session replication); version 4 is version 5 without
REPLICA_SHARED and the WILL ops; version 5 is version 6 without REPLICA_DELIVER; version 6 is
version 7 without REPLICA_TRANSFER; version 7 is version 8 without FORGET; version 8 is
version 9 without REACH; version 9 is version 10 without the HELLO's boot and wills_taken.

``HELLO``        version:u8, node:string, cluster:string, cookie:binary, incarnation:u64,
                 peer_incarnation:u64, last_applied:u64, version 10: boot:u64,
                 wills_taken:u64. Sent by both ends first; the cookie is compared in constant
                 time (EMQX's node.cookie). ``last_applied`` is the last reliable seq the
                 sender applied from the receiver's incarnation ``peer_incarnation``: the
                 receiver resends what came after it. ``boot`` is random per start of the
                 sender's process (its incarnation survives a restart on its store; the boot
                 does not); ``wills_taken`` is the receiver's boot whose connected clients'
                 wills the sender published, as its backup, when their link dropped (0: none).
``CLOSE``        reason:string. The sender closes the link after it (a refusal, in words).
``PING/PONG``    empty. Keepalive of an idle link.
``SYNC``         flags:u8 (bit 0 reset), then strings up to the end: the sender's complete
                 list of non-shared routed filters (a reset frame, then continuation frames).
``SUBSCRIBE``    filter:string. The first local subscriber took this filter.
``UNSUBSCRIBE``  filter:string. The last local subscriber dropped it.
``PUBLISH``      flags:u8 (bit 0: deliver to plain subscribers), count:u16, count x
                 (shared filter:string, client id:string), message. The receiver delivers to
                 its non-shared subscribers when bit 0 is set, and to each named shared
                 member; it never forwards again.
``RETAIN``       changed_at:f64 (wall clock), flags:u8 (bit 0 message present),
                 topic:string, [message]. The retained message of a topic changed.
``RELIABLE``     seq:u64, then one whole inner frame. Kept by the sender until ACKed, resent
                 after a reconnect; the receiver applies each seq once, in order.
``ACK``          seq:u64. Every reliable frame up to seq is applied (and committed).
``CLAIM``        version, flags:u8 (bit 0 clean start), client_id:string. A client with
                 this id is connecting on the sender (replaces version 1's TAKEOVER).
``CLAIM_REPLY``  version, outcome:u8 (0 none here, 1 rejected: a newer claim holds it),
                 client_id:string. The answer to a CLAIM when no TRANSFER is due.
``TRANSFER``     version, flags:u8 (bit 0 merge), session record. The session of a client,
                 handed to the claimer (or, merge, to the newer owner after a split).
``DELIVER``      client_id:string, delivery record. A delivery for a session that moved to
                 the receiver (its old node still had the route).
``OWNED``        count:u16, count x (client_id:string, version). Sessions the sender owns,
                 sent once a link is up; the older owner of a client id merges into the newer.
``MEMBERS``      flags:u8 (bit 0 reset), count:u16, count x (state:u8 (0 gone, 1 offline,
                 2 online), shared filter:string, client_id:string): shared subscription
                 members on the sender.
``STATE``        version, key:binary, flags:u8 (bit 0 value present), [value:blob,
                 expires_at:f64 wall clock, 0 = never]. A state store write (seed 003).
``HOLD``         flags:u8 (bit 0 pause, bit 1 share), client_id:string, [share:u32]. A
                 session on the sender is past its high-water mark with messages of this
                 publisher (on the receiver): pause reading it; without bit 0: resume
                 (issue 14 item 2, the single-node backpressure across the link). A resume
                 with a share (version 3, issue 13) lets the publisher send that many more
                 QoS 1/2 messages to the sender before the receiver pauses it again itself
                 (the sender counts the same messages; broker.session.HeldPublishers).
``REPLICA``      seq:u64, flags:u8 (bit 0 reset), count:u32 x op. Version 4: the sender's
                 persistent sessions as its store writes them, to its backup node
                 (:mod:`broker.replica`). An op is kind:u8, client_id:string, then by kind:
                 1 SAVE session record:blob (no deliveries); 2 DELETE nothing; 3/4 INCOMING
                 add/remove packet_id:u16; 5 DELIVERY_ADD key:u64, delivery record:blob;
                 6 DELIVERY_UPDATE key:u64, packet_id:u16, flags:u8 (bit 0 in flight, bit 1
                 PUBREL sent); 7 DELIVERY_REMOVE key:u64; version 5: 8 WILL_SET will:blob
                 (the will of a connected client, any session: a live will below); 9
                 WILL_CLEAR nothing (its connection ended: the owner published or kept it).
                 Reset: forget every replica of the sender first (the first REPLICA after a
                 link comes up, before its snapshot).
``REPLICA_ACK``  seq:u64. Every REPLICA frame up to seq is applied.
``REPLICA_PUBLISH`` origin:string, message. Reliable. Version 4: a QoS 1/2 message for the
                 plain subscribers of ``origin``, a node the sender cannot reach; the
                 receiver is its backup and queues it for the replicas of its sessions.
``REPLICA_SHARED`` origin:string, count:u16, count x (shared filter:string, client id:string),
                 message. Reliable. Version 5: the same for members of shared subscriptions
                 on ``origin``: queued for the replica of each named member's session; a
                 member without one (its session ended with its node) has the message sent
                 to another member of its group (MQTT 5.0 section 4.8.2).
``REPLICA_DELIVER`` origin:string, client_id:string, delivery record. Reliable. Version 6: a
                 DELIVER for ``origin`` (a delivery for a session that moved there, passed
                 on by its old node) while the sender cannot reach it, or one it had not
                 acknowledged when the link dropped: the receiver is its backup and queues it
                 for its copy of the session (or sends it on, when it handed the copy over).
``REPLICA_TRANSFER`` origin:string, session record. Reliable. Version 7: a TRANSFER to
                 ``origin`` (a session handed over for a claim, or migrated) that ``origin``
                 had not acknowledged when the sender's link to it dropped: it may have died
                 with the session. The receiver is its backup and keeps the session as a copy
                 of ``origin``'s (unless it has one already), as if ``origin`` had installed
                 and replicated it; while the receiver still reaches ``origin`` it only holds
                 it a while, in case its own link drops too.
``FORGET``       node:string. Version 8: the sender has forgotten ``node`` (an operator's
                 force-leave, or autoclean: lost for good; broker.cluster.Cluster.forget).
                 Sent when it does, and at each link up for every node it has forgotten; the
                 receiver forgets it too unless its own link to it is up (it is not lost).
``REACH``        flags:u8 (bit 0: up), node:string. Version 9: the sender's link to ``node``
                 is up (linked and synced) or not. Sent on every link when one of the
                 sender's links comes up or drops, and at each link up for every node it
                 reaches. A node that lost its own link to a node whose backup it is does
                 not take it for dead (publish its clients' wills) while another node
                 reaches it: only their link broke.

A message is flags:u8 (bits 0-1 QoS, bit 2 RETAIN, bit 3 publisher present, bit 4 expiry
present), seq:u64, topic:string, origin node:string, [publisher client id:string],
[milliseconds left before it expires:u32], the MQTT 5.0 PUBLISH properties exactly as in a
PUBLISH packet (section 3.3.2.3, reusing the MQTT codec, without the Message Expiry Interval),
then payload:blob. Expiry travels in milliseconds rounded down, so it never grows from hop to
hop (version 1 sent whole seconds rounded up: 60 arrived as 61).

A delivery record is flags:u8 (bits 0-1 QoS, bit 2 RETAIN, bit 3 in flight, bit 4 PUBREL
sent), packet_id:u16 (0: none yet), count:u8, count x subscription identifier:u32, message.

A live will (WILL_SET) is delay:u32 (the Will Delay Interval, at most the session's expiry),
expiry:u32 (0xFFFFFFFF none), message. The owner copies only a will its client may publish
(authorized when copied, as it would be when published).

A session record (TRANSFER, and the store's session rows) is client_id:string,
expiry_interval:u32, expires_at:f64 (wall clock, 0 = none), version, next_packet_id:u16,
flags:u8 (bit 0 will present, bit 1 diverged), count:u16 x subscription (filter:string,
options:u8 (bits 0-1 QoS, bit 2 No Local, bit 3 Retain As Published, bits 4-5 Retain
Handling, bit 6 identifier present), [identifier:u32]), count:u16 x incoming QoS 2 packet
id:u16, [will: publish_at:f64 (wall clock), expiry:u32 (0xFFFFFFFF none), message],
count:u32 x delivery:blob.

Shape (STYLE.md rule 2): :class:`ClusterDecoder` has ``feed``, ``next_event`` (a frame or
:data:`NEED_DATA`) and ``trailing_data``; :func:`encode` is a pure function. A declared
length above the decoder's limit is refused before its bytes are buffered, and a decoder
that has raised :class:`ClusterProtocolError` accepts no more input.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

from broker.message import Message
from broker.mqtt import MQTTProtocolError, PacketType, Properties
from broker.mqtt.properties import decode_properties, encode_properties
from broker.mqtt.wire import Reader, encode_binary, encode_string
from broker.subscriptions import SubscriptionOptions

__all__ = [
    "BOOT_VERSION",
    "DEFAULT_MAX_FRAME_SIZE",
    "DELIVER_FAILOVER_VERSION",
    "FAILOVER_VERSION",
    "FORGET_VERSION",
    "MIN_PROTOCOL_VERSION",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "REACH_VERSION",
    "REPLICA_VERSION",
    "SHARE_VERSION",
    "TRANSFER_FAILOVER_VERSION",
    "Ack",
    "Claim",
    "ClaimReply",
    "Close",
    "ClusterDecoder",
    "ClusterProtocolError",
    "Deliver",
    "DeliveryRecord",
    "Forget",
    "Frame",
    "FrameType",
    "Hello",
    "Hold",
    "LiveWill",
    "Members",
    "NeedData",
    "Owned",
    "Ping",
    "Pong",
    "Publish",
    "Reach",
    "Reliable",
    "Replica",
    "ReplicaAck",
    "ReplicaDeliver",
    "ReplicaOp",
    "ReplicaOpKind",
    "ReplicaPublish",
    "ReplicaShared",
    "ReplicaTransfer",
    "Retain",
    "SessionRecord",
    "StateWrite",
    "Subscribe",
    "Sync",
    "Transfer",
    "Unsubscribe",
    "Version",
    "WillRecord",
    "WireMessage",
    "decode_delivery",
    "decode_live_will",
    "decode_message",
    "decode_session",
    "encode",
    "encode_delivery",
    "encode_live_will",
    "encode_message",
    "encode_session",
    "encode_sync",
    "link_version",
]

#: The highest version this node speaks. 3: HOLD's share (a node of version 2 would refuse
#: the flag mid-link, so a link of version 2 never carries it). 4: REPLICA, REPLICA_ACK and
#: REPLICA_PUBLISH (session replication; a node of version 3 refuses the frame types). 5:
#: REPLICA_SHARED (shared subscriptions' messages for a node that is down) and the WILL ops.
#: 6: REPLICA_DELIVER (a DELIVER for a node that is down, to its backup). 7: REPLICA_TRANSFER
#: (a TRANSFER that a node lost did not acknowledge, to its backup). 8: FORGET (a node
#: forgotten on one node is forgotten on all). 9: REACH (what each node's links reach). 10:
#: the HELLO's boot and wills_taken (a node restarted on its store learns whether its backup
#: published the wills of the clients connected at its crash).
PROTOCOL_VERSION: Final = 10
#: The lowest it speaks: 2 has the same HELLO and frames, less HOLD's share. Version 1 had
#: TAKEOVER instead of CLAIM and no reliable frames: a node of version 1 is refused.
MIN_PROTOCOL_VERSION: Final = 2
#: The first version whose HOLD(resume) may carry a share.
SHARE_VERSION: Final = 3
#: The first version with session replication (REPLICA, REPLICA_ACK, REPLICA_PUBLISH).
REPLICA_VERSION: Final = 4
#: The first version with REPLICA_SHARED and the WILL_SET and WILL_CLEAR replica ops: a
#: backup takes a lost node's shared members' messages and publishes its clients' wills.
FAILOVER_VERSION: Final = 5
#: The first version with REPLICA_DELIVER: a DELIVER for a node that is down goes to its
#: backup too.
DELIVER_FAILOVER_VERSION: Final = 6
#: The first version with REPLICA_TRANSFER: a TRANSFER unacknowledged by a node whose link
#: dropped goes to its backup.
TRANSFER_FAILOVER_VERSION: Final = 7
#: The first version with FORGET.
FORGET_VERSION: Final = 8
#: The first version with REACH.
REACH_VERSION: Final = 9
#: The first version whose HELLO carries the sender's boot and wills_taken.
BOOT_VERSION: Final = 10
#: length:u32 + type:u8.
FRAME_HEADER_SIZE: Final = 5
#: A PUBLISH frame is at most an MQTT packet (max_packet_size) plus the node names; the
#: link passes its own limit, derived from the node's max_packet_size.
DEFAULT_MAX_FRAME_SIZE: Final = 1_048_576 + 4 * 65_536
#: SYNC, OWNED and MEMBERS frames are split so that each stays far below any frame limit.
SYNC_CHUNK_BYTES: Final = 32_768
#: The Message Expiry Interval is a four byte integer of seconds (MQTT 5.0 section 3.3.2.3.3);
#: in milliseconds the link carries at most this, about 49.7 days (longer is sent as this).
MAX_EXPIRY_MS: Final = 0xFFFFFFFF
NO_WILL_EXPIRY: Final = 0xFFFFFFFF

_LENGTH: Final = struct.Struct(">I")
_STAMP: Final = struct.Struct(">d")
_U64: Final = struct.Struct(">Q")
_U32: Final = struct.Struct(">I")
_HOLD_PAUSE: Final = 0x01
_HOLD_SHARE: Final = 0x02
_REACH_UP: Final = 0x01
_U16: Final = struct.Struct(">H")
_QOS_MASK: Final = 0x03
_RETAIN_FLAG: Final = 0x04
_PUBLISHER_FLAG: Final = 0x08
_EXPIRY_FLAG: Final = 0x10
_INFLIGHT_FLAG: Final = 0x08
_RELEASED_FLAG: Final = 0x10
_RESET_FLAG: Final = 0x01
_PRESENT_FLAG: Final = 0x01
_PLAIN_FLAG: Final = 0x01
_CLEAN_START_FLAG: Final = 0x01
_MERGE_FLAG: Final = 0x01
_WILL_FLAG: Final = 0x01
_OP_INFLIGHT: Final = 0x01
_OP_RELEASED: Final = 0x02
_DIVERGED_FLAG: Final = 0x02


class FrameType(IntEnum):
    HELLO = 1
    CLOSE = 2
    PING = 3
    PONG = 4
    SYNC = 5
    SUBSCRIBE = 6
    UNSUBSCRIBE = 7
    PUBLISH = 8
    RETAIN = 9
    # 10 was version 1's TAKEOVER.
    RELIABLE = 11
    ACK = 12
    CLAIM = 13
    CLAIM_REPLY = 14
    TRANSFER = 15
    DELIVER = 16
    OWNED = 17
    MEMBERS = 18
    STATE = 19
    HOLD = 20
    REPLICA = 21
    REPLICA_ACK = 22
    REPLICA_PUBLISH = 23
    REPLICA_SHARED = 24
    REPLICA_DELIVER = 25
    REPLICA_TRANSFER = 26
    FORGET = 27
    REACH = 28


class ReplicaOpKind(IntEnum):
    """What a REPLICA op does to the backup's copy (the store's session writes)."""

    SAVE = 1
    DELETE = 2
    INCOMING_ADD = 3
    INCOMING_REMOVE = 4
    DELIVERY_ADD = 5
    DELIVERY_UPDATE = 6
    DELIVERY_REMOVE = 7
    WILL_SET = 8
    WILL_CLEAR = 9


class ClusterProtocolError(Exception):
    """The peer sent bytes that break the link protocol; the link is closed."""


class NeedData:
    """The decoder needs more bytes before the next frame is complete."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True, order=True)
class Version:
    """A claim on a client id: (Lamport counter, node name), compared as a tuple."""

    counter: int
    node: str


@dataclass(frozen=True, slots=True)
class WireMessage:
    """A :class:`~broker.message.Message` as it crosses the link: expiry is time left."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties
    origin_node: str
    publisher_client_id: str | None = None
    seq: int = 0
    # Milliseconds left before the message expires, rounded down; None: it never expires.
    expiry_ms: int | None = None

    @classmethod
    def from_message(cls, message: Message, now: float, origin_node: str) -> WireMessage:
        """``now`` is the sender's broker clock, against which ``expires_at`` counts."""
        expiry_ms: int | None = None
        if message.expires_at is not None:
            expiry_ms = min(MAX_EXPIRY_MS, max(0, math.floor((message.expires_at - now) * 1000)))
        return cls(
            message.topic,
            message.payload,
            message.qos,
            message.retain,
            message.properties,
            message.origin_node or origin_node,
            message.publisher_client_id,
            message.seq,
            expiry_ms,
        )

    def to_message(self, now: float) -> Message:
        """The message on the receiver's clock ``now``."""
        return Message(
            self.topic,
            self.payload,
            self.qos,
            self.retain,
            self.properties,
            None if self.expiry_ms is None else now + self.expiry_ms / 1000,
            self.publisher_client_id,
            self.origin_node,
            self.seq,
        )


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """One queued or in-flight delivery of a session (``broker.session.Pending``)."""

    message: WireMessage
    qos: int
    retain: bool
    subscription_identifiers: tuple[int, ...] = ()
    packet_id: int = 0
    inflight: bool = False
    released: bool = False


@dataclass(frozen=True, slots=True)
class WillRecord:
    """A will waiting for its delay (MQTT 5.0 section 3.1.3.2.2), on the wall clock."""

    publish_at: float
    expiry_interval: int | None
    message: WireMessage


@dataclass(frozen=True, slots=True)
class LiveWill:
    """The will of a connected client (MQTT 5.0 section 3.1.3.2), kept by its node's backup,
    which publishes it if the node is lost while the client is connected (WILL_SET)."""

    delay: int
    expiry_interval: int | None
    message: WireMessage


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """Everything of a session that outlives its connection (MQTT 5.0 section 4.1)."""

    client_id: str
    expiry_interval: int
    expires_at: float | None  # wall clock
    version: Version
    next_packet_id: int = 1
    subscriptions: tuple[tuple[str, SubscriptionOptions], ...] = ()
    incoming_qos2: tuple[int, ...] = ()
    will: WillRecord | None = None
    diverged: bool = False
    deliveries: tuple[DeliveryRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    node: str
    cluster: str
    cookie: bytes
    incarnation: int = 0
    peer_incarnation: int = 0
    last_applied: int = 0
    # Random per start of the sender's process (0: a HELLO of version 9 or lower has none):
    # the incarnation survives a restart on the store, the boot does not.
    boot: int = 0
    # The receiver's boot whose connected clients' wills the sender published (0: none).
    wills_taken: int = 0

    def __repr__(self) -> str:
        # The cookie is a secret: never in a log line.
        return f"Hello(version={self.version}, node={self.node!r}, cluster={self.cluster!r})"


def link_version(announced: int, theirs: int) -> int | None:
    """The version a link speaks: the lower of the two HELLOs' (this node announces
    ``announced``); None when the peer's is one this node does not speak."""
    if not MIN_PROTOCOL_VERSION <= theirs <= PROTOCOL_VERSION:
        return None
    return min(announced, theirs)


@dataclass(frozen=True, slots=True)
class Close:
    reason: str


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Pong:
    pass


@dataclass(frozen=True, slots=True)
class Sync:
    reset: bool
    filters: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Subscribe:
    topic_filter: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    topic_filter: str


@dataclass(frozen=True, slots=True)
class Publish:
    message: WireMessage
    plain: bool = True
    # (shared filter with its $share/group/ prefix, client id) to deliver to on the receiver.
    targets: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Retain:
    topic: str
    message: WireMessage | None
    changed_at: float


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int


@dataclass(frozen=True, slots=True)
class Claim:
    client_id: str
    version: Version
    clean_start: bool


@dataclass(frozen=True, slots=True)
class ClaimReply:
    client_id: str
    version: Version
    rejected: bool


@dataclass(frozen=True, slots=True)
class Transfer:
    version: Version
    merge: bool
    session: SessionRecord


@dataclass(frozen=True, slots=True)
class Deliver:
    client_id: str
    delivery: DeliveryRecord


@dataclass(frozen=True, slots=True)
class Owned:
    entries: tuple[tuple[str, Version], ...]


@dataclass(frozen=True, slots=True)
class Members:
    reset: bool
    # (state: 0 gone, 1 offline, 2 online; shared filter; client id)
    entries: tuple[tuple[int, str, str], ...]


@dataclass(frozen=True, slots=True)
class StateWrite:
    version: Version
    key: bytes
    value: bytes | None
    expires_at: float | None  # wall clock


@dataclass(frozen=True, slots=True)
class Hold:
    client_id: str
    pause: bool
    # Resume only: QoS 1/2 messages the publisher may send before it pauses again (0: no
    # share, it runs until the next pause).
    share: int = 0


@dataclass(frozen=True, slots=True)
class ReplicaOp:
    """One write to a replicated session. ``data`` is the encoded session record (SAVE, no
    deliveries) or delivery record (DELIVERY_ADD), kept as bytes by the backup. The owner may
    give the delivery as ``record`` instead, encoded only if the op is sent (a delivery
    acknowledged before its op left is never encoded; broker.replica.Replicator)."""

    kind: ReplicaOpKind
    client_id: str
    key: int = 0
    packet_id: int = 0
    inflight: bool = False
    released: bool = False
    data: bytes = b""
    record: DeliveryRecord | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Replica:
    seq: int
    reset: bool
    ops: tuple[ReplicaOp, ...]


@dataclass(frozen=True, slots=True)
class ReplicaAck:
    seq: int


@dataclass(frozen=True, slots=True)
class ReplicaPublish:
    origin: str
    message: WireMessage


@dataclass(frozen=True, slots=True)
class ReplicaShared:
    origin: str
    # (shared filter with its $share/group/ prefix, client id) of members on ``origin``.
    targets: tuple[tuple[str, str], ...]
    message: WireMessage


@dataclass(frozen=True, slots=True)
class ReplicaDeliver:
    origin: str
    client_id: str
    delivery: DeliveryRecord


@dataclass(frozen=True, slots=True)
class ReplicaTransfer:
    origin: str
    session: SessionRecord


@dataclass(frozen=True, slots=True)
class Forget:
    node: str


@dataclass(frozen=True, slots=True)
class Reach:
    """The sender's link to ``node`` is ``up`` (linked and synced), or not."""

    node: str
    up: bool


@dataclass(frozen=True, slots=True)
class Reliable:
    seq: int
    frame: Frame


Frame = (
    Hello
    | Close
    | Ping
    | Pong
    | Sync
    | Subscribe
    | Unsubscribe
    | Publish
    | Retain
    | Reliable
    | Ack
    | Claim
    | ClaimReply
    | Transfer
    | Deliver
    | Owned
    | Members
    | StateWrite
    | Hold
    | Replica
    | ReplicaAck
    | ReplicaPublish
    | ReplicaShared
    | ReplicaDeliver
    | ReplicaTransfer
    | Forget
    | Reach
)


# --- encoding ------------------------------------------------------------------------------


def _u64(value: int) -> bytes:
    if not 0 <= value <= 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"u64 out of range: {value}")
    return _U64.pack(value)


def _blob(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def _version(version: Version) -> bytes:
    return _u64(version.counter) + encode_string(version.node)


def _stamp(value: float) -> bytes:
    if not math.isfinite(value):
        raise ValueError(f"timestamp must be finite, got {value}")
    return _STAMP.pack(value)


def encode_message(message: WireMessage) -> bytes:
    if message.qos not in (0, 1, 2):
        raise ValueError(f"QoS out of range: {message.qos}")
    flags = message.qos
    if message.retain:
        flags |= _RETAIN_FLAG
    parts = [bytes((0,)), _u64(message.seq), encode_string(message.topic)]
    parts.append(encode_string(message.origin_node))
    if message.publisher_client_id is not None:
        flags |= _PUBLISHER_FLAG
        parts.append(encode_string(message.publisher_client_id))
    if message.expiry_ms is not None:
        flags |= _EXPIRY_FLAG
        parts.append(_U32.pack(min(MAX_EXPIRY_MS, message.expiry_ms)))
    properties = message.properties
    if properties.message_expiry_interval is not None:
        raise ValueError("the Message Expiry Interval travels as expiry_ms")
    parts.append(encode_properties(properties, PacketType.PUBLISH))
    parts.append(_blob(message.payload))
    parts[0] = bytes((flags,))
    return b"".join(parts)


def _options(options: SubscriptionOptions) -> bytes:
    bits = options.qos | (options.retain_handling << 4)
    if options.no_local:
        bits |= 0x04
    if options.retain_as_published:
        bits |= 0x08
    if options.subscription_identifier is None:
        return bytes((bits,))
    return bytes((bits | 0x40,)) + _U32.pack(options.subscription_identifier)


def encode_delivery(delivery: DeliveryRecord) -> bytes:
    flags = delivery.qos
    if delivery.retain:
        flags |= _RETAIN_FLAG
    if delivery.inflight:
        flags |= _INFLIGHT_FLAG
    if delivery.released:
        flags |= _RELEASED_FLAG
    identifiers = delivery.subscription_identifiers
    if len(identifiers) > 0xFF:
        raise ValueError("more than 255 subscription identifiers")
    return (
        bytes((flags,))
        + _U16.pack(delivery.packet_id)
        + bytes((len(identifiers),))
        + b"".join(_U32.pack(identifier) for identifier in identifiers)
        + encode_message(delivery.message)
    )


def encode_session(session: SessionRecord) -> bytes:
    flags = 0
    if session.will is not None:
        flags |= _WILL_FLAG
    if session.diverged:
        flags |= _DIVERGED_FLAG
    parts = [
        encode_string(session.client_id),
        _U32.pack(session.expiry_interval),
        _stamp(session.expires_at or 0.0),
        _version(session.version),
        _U16.pack(session.next_packet_id),
        bytes((flags,)),
        _U16.pack(len(session.subscriptions)),
    ]
    for topic_filter, options in session.subscriptions:
        parts.append(encode_string(topic_filter))
        parts.append(_options(options))
    parts.append(_U16.pack(len(session.incoming_qos2)))
    parts.extend(_U16.pack(packet_id) for packet_id in session.incoming_qos2)
    will = session.will
    if will is not None:
        parts.append(_stamp(will.publish_at))
        parts.append(
            _U32.pack(NO_WILL_EXPIRY if will.expiry_interval is None else will.expiry_interval)
        )
        parts.append(_blob(encode_message(will.message)))
    parts.append(_U32.pack(len(session.deliveries)))
    parts.extend(_blob(encode_delivery(delivery)) for delivery in session.deliveries)
    return b"".join(parts)


def encode_live_will(will: LiveWill) -> bytes:
    expiry = NO_WILL_EXPIRY if will.expiry_interval is None else will.expiry_interval
    return _U32.pack(will.delay) + _U32.pack(expiry) + encode_message(will.message)


def _read_live_will(reader: Reader) -> LiveWill:
    delay = reader.u32("the will delay")
    expiry = reader.u32("the will expiry")
    return LiveWill(delay, None if expiry == NO_WILL_EXPIRY else expiry, _read_message(reader))


def decode_live_will(data: bytes) -> LiveWill:
    value = _whole(data, _read_live_will)
    assert isinstance(value, LiveWill)
    return value


def _targets(targets: tuple[tuple[str, str], ...]) -> bytes:
    """count:u16, count x (shared filter, client id): PUBLISH's and REPLICA_SHARED's."""
    if len(targets) > 0xFFFF:
        raise ValueError("more than 65535 shared targets")
    return _U16.pack(len(targets)) + b"".join(
        encode_string(topic_filter) + encode_string(client_id)
        for topic_filter, client_id in targets
    )


def _read_targets(reader: Reader) -> tuple[tuple[str, str], ...]:
    return tuple(
        (reader.string("a shared filter"), reader.string("a client id"))
        for _ in range(reader.u16("the target count"))
    )


def _strings(values: tuple[str, ...]) -> bytes:
    return b"".join(encode_string(value) for value in values)


def _body(frame: Frame) -> tuple[FrameType, bytes]:
    if isinstance(frame, Reliable):
        return FrameType.RELIABLE, _u64(frame.seq) + encode(frame.frame)
    if isinstance(frame, Publish):
        return FrameType.PUBLISH, (
            bytes((_PLAIN_FLAG if frame.plain else 0,))
            + _targets(frame.targets)
            + encode_message(frame.message)
        )
    if isinstance(frame, Ack):
        return FrameType.ACK, _u64(frame.seq)
    if isinstance(frame, Hold):
        if not frame.share:
            flags = _HOLD_PAUSE if frame.pause else 0
            return FrameType.HOLD, bytes((flags,)) + encode_string(frame.client_id)
        if frame.pause or not 0 < frame.share <= 0xFFFFFFFF:
            raise ValueError(f"a HOLD share is for a resume, 1..2**32-1: {frame!r}")
        return FrameType.HOLD, (
            bytes((_HOLD_SHARE,)) + encode_string(frame.client_id) + _U32.pack(frame.share)
        )
    if isinstance(frame, Subscribe):
        return FrameType.SUBSCRIBE, encode_string(frame.topic_filter)
    if isinstance(frame, Unsubscribe):
        return FrameType.UNSUBSCRIBE, encode_string(frame.topic_filter)
    if isinstance(frame, Ping):
        return FrameType.PING, b""
    if isinstance(frame, Pong):
        return FrameType.PONG, b""
    if isinstance(frame, Hello):
        if not 0 <= frame.version <= 0xFF:
            raise ValueError(f"protocol version out of range: {frame.version}")
        common = (
            bytes((frame.version,))
            + encode_string(frame.node)
            + encode_string(frame.cluster)
            + encode_binary(frame.cookie)
        )
        if not MIN_PROTOCOL_VERSION <= frame.version <= PROTOCOL_VERSION:
            # The fields every version has, as the decoder reads another version's HELLO.
            return FrameType.HELLO, common
        return FrameType.HELLO, (
            common
            + _u64(frame.incarnation)
            + _u64(frame.peer_incarnation)
            + _u64(frame.last_applied)
            + (_u64(frame.boot) + _u64(frame.wills_taken) if frame.version >= BOOT_VERSION else b"")
        )
    if isinstance(frame, Close):
        return FrameType.CLOSE, encode_string(frame.reason)
    if isinstance(frame, Forget):
        return FrameType.FORGET, encode_string(frame.node)
    if isinstance(frame, Reach):
        return FrameType.REACH, bytes((_REACH_UP if frame.up else 0,)) + encode_string(frame.node)
    if isinstance(frame, Sync):
        flags = _RESET_FLAG if frame.reset else 0
        return FrameType.SYNC, bytes((flags,)) + _strings(frame.filters)
    if isinstance(frame, Retain):
        head = _stamp(frame.changed_at)
        if frame.message is None:
            return FrameType.RETAIN, head + b"\x00" + encode_string(frame.topic)
        return FrameType.RETAIN, (
            head
            + bytes((_PRESENT_FLAG,))
            + encode_string(frame.topic)
            + encode_message(frame.message)
        )
    if isinstance(frame, Claim):
        return FrameType.CLAIM, (
            _version(frame.version)
            + bytes((_CLEAN_START_FLAG if frame.clean_start else 0,))
            + encode_string(frame.client_id)
        )
    if isinstance(frame, ClaimReply):
        return FrameType.CLAIM_REPLY, (
            _version(frame.version)
            + bytes((1 if frame.rejected else 0,))
            + encode_string(frame.client_id)
        )
    if isinstance(frame, Transfer):
        return FrameType.TRANSFER, (
            _version(frame.version)
            + bytes((_MERGE_FLAG if frame.merge else 0,))
            + encode_session(frame.session)
        )
    if isinstance(frame, Deliver):
        return FrameType.DELIVER, encode_string(frame.client_id) + encode_delivery(frame.delivery)
    if isinstance(frame, Owned):
        if len(frame.entries) > 0xFFFF:
            raise ValueError("more than 65535 entries in one OWNED frame")
        return FrameType.OWNED, _U16.pack(len(frame.entries)) + b"".join(
            encode_string(client_id) + _version(version) for client_id, version in frame.entries
        )
    if isinstance(frame, Members):
        if len(frame.entries) > 0xFFFF:
            raise ValueError("more than 65535 entries in one MEMBERS frame")
        return FrameType.MEMBERS, (
            bytes((_RESET_FLAG if frame.reset else 0,))
            + _U16.pack(len(frame.entries))
            + b"".join(
                bytes((state,)) + encode_string(topic_filter) + encode_string(client_id)
                for state, topic_filter, client_id in frame.entries
            )
        )
    if isinstance(frame, StateWrite):
        body = _version(frame.version) + encode_binary(frame.key)
        if frame.value is None:
            return FrameType.STATE, body + b"\x00"
        return FrameType.STATE, (
            body + bytes((_PRESENT_FLAG,)) + _blob(frame.value) + _stamp(frame.expires_at or 0.0)
        )
    if isinstance(frame, Replica):
        return FrameType.REPLICA, (
            _u64(frame.seq)
            + bytes((_RESET_FLAG if frame.reset else 0,))
            + _U32.pack(len(frame.ops))
            + b"".join(_replica_op(op) for op in frame.ops)
        )
    if isinstance(frame, ReplicaAck):
        return FrameType.REPLICA_ACK, _u64(frame.seq)
    if isinstance(frame, ReplicaPublish):
        return FrameType.REPLICA_PUBLISH, (
            encode_string(frame.origin) + encode_message(frame.message)
        )
    if isinstance(frame, ReplicaShared):
        if not frame.targets:
            raise ValueError("REPLICA_SHARED without a member")
        return FrameType.REPLICA_SHARED, (
            encode_string(frame.origin) + _targets(frame.targets) + encode_message(frame.message)
        )
    if isinstance(frame, ReplicaDeliver):
        return FrameType.REPLICA_DELIVER, (
            encode_string(frame.origin)
            + encode_string(frame.client_id)
            + encode_delivery(frame.delivery)
        )
    if isinstance(frame, ReplicaTransfer):
        return FrameType.REPLICA_TRANSFER, (
            encode_string(frame.origin) + encode_session(frame.session)
        )
    raise TypeError(f"not a cluster frame: {frame!r}")


def _replica_op(op: ReplicaOp) -> bytes:
    head = bytes((op.kind,)) + encode_string(op.client_id)
    kind = op.kind
    if kind == ReplicaOpKind.SAVE:
        return head + _blob(op.data)
    if kind in (ReplicaOpKind.DELETE, ReplicaOpKind.WILL_CLEAR):
        return head
    if kind == ReplicaOpKind.WILL_SET:
        return head + _blob(op.data)
    if kind in (ReplicaOpKind.INCOMING_ADD, ReplicaOpKind.INCOMING_REMOVE):
        return head + _U16.pack(op.packet_id)
    if kind == ReplicaOpKind.DELIVERY_ADD:
        data = op.data if op.record is None else encode_delivery(op.record)
        return head + _u64(op.key) + _blob(data)
    if kind == ReplicaOpKind.DELIVERY_UPDATE:
        flags = (_OP_INFLIGHT if op.inflight else 0) | (_OP_RELEASED if op.released else 0)
        return head + _u64(op.key) + _U16.pack(op.packet_id) + bytes((flags,))
    if kind == ReplicaOpKind.DELIVERY_REMOVE:
        return head + _u64(op.key)
    raise ValueError(f"unknown replica op kind {kind!r}")


def encode(frame: Frame) -> bytes:
    """The bytes of one frame, length prefix included."""
    frame_type, body = _body(frame)
    return _LENGTH.pack(len(body) + 1) + bytes((frame_type,)) + body


def encode_sync(filters: list[str] | tuple[str, ...]) -> list[bytes]:
    """A full filter list as SYNC frames: one reset frame, then continuations."""
    frames: list[bytes] = []
    chunk: list[str] = []
    size = 0
    for topic_filter in filters:
        length = len(topic_filter.encode("utf-8")) + 2
        if chunk and size + length > SYNC_CHUNK_BYTES:
            frames.append(encode(Sync(not frames, tuple(chunk))))
            chunk, size = [], 0
        chunk.append(topic_filter)
        size += length
    frames.append(encode(Sync(not frames, tuple(chunk))))
    return frames


def encode_owned(entries: list[tuple[str, Version]]) -> list[bytes]:
    """Owned client ids as OWNED frames of bounded size (none when there are none)."""
    frames: list[bytes] = []
    chunk: list[tuple[str, Version]] = []
    size = 0
    for client_id, version in entries:
        length = len(client_id.encode("utf-8")) + len(version.node.encode("utf-8")) + 12
        if chunk and (size + length > SYNC_CHUNK_BYTES or len(chunk) == 0xFFFF):
            frames.append(encode(Owned(tuple(chunk))))
            chunk, size = [], 0
        chunk.append((client_id, version))
        size += length
    if chunk:
        frames.append(encode(Owned(tuple(chunk))))
    return frames


def encode_members(entries: list[tuple[int, str, str]]) -> list[bytes]:
    """Every shared member as MEMBERS frames: one reset frame, then continuations."""
    frames: list[bytes] = []
    chunk: list[tuple[int, str, str]] = []
    size = 0
    for state, topic_filter, client_id in entries:
        length = len(topic_filter.encode("utf-8")) + len(client_id.encode("utf-8")) + 5
        if chunk and (size + length > SYNC_CHUNK_BYTES or len(chunk) == 0xFFFF):
            frames.append(encode(Members(not frames, tuple(chunk))))
            chunk, size = [], 0
        chunk.append((state, topic_filter, client_id))
        size += length
    frames.append(encode(Members(not frames, tuple(chunk))))
    return frames


# --- decoding ------------------------------------------------------------------------------


def _read_u64(reader: Reader, what: str) -> int:
    start = reader.pos
    if start + 8 > reader.end:
        raise ClusterProtocolError(f"frame ends inside {what}")
    reader.pos = start + 8
    value: int = _U64.unpack_from(reader.view, start)[0]
    return value


def _read_stamp(reader: Reader, what: str) -> float:
    start = reader.pos
    if start + 8 > reader.end:
        raise ClusterProtocolError(f"frame ends inside {what}")
    reader.pos = start + 8
    value: float = _STAMP.unpack_from(reader.view, start)[0]
    if not math.isfinite(value):
        raise ClusterProtocolError(f"{what} is not a finite number")
    return value


def _read_blob(reader: Reader, what: str) -> bytes:
    size = reader.u32(what)
    start = reader.pos
    if start + size > reader.end:
        raise ClusterProtocolError(f"frame ends inside {what}")
    reader.pos = start + size
    return bytes(reader.view[start : start + size])


def _read_version(reader: Reader) -> Version:
    return Version(_read_u64(reader, "the claim counter"), reader.string("the claim node"))


def _read_message(reader: Reader) -> WireMessage:
    flags = reader.u8("message flags")
    qos = flags & _QOS_MASK
    if qos == 3:
        raise ClusterProtocolError("message QoS 3")
    if flags & ~(_QOS_MASK | _RETAIN_FLAG | _PUBLISHER_FLAG | _EXPIRY_FLAG):
        raise ClusterProtocolError(f"reserved message flags set: 0x{flags:02X}")
    seq = _read_u64(reader, "the message seq")
    topic = reader.string("the topic")
    origin_node = reader.string("the origin node")
    publisher = reader.string("the publisher client id") if flags & _PUBLISHER_FLAG else None
    expiry_ms = reader.u32("the expiry") if flags & _EXPIRY_FLAG else None
    properties = decode_properties(reader, PacketType.PUBLISH)
    if (
        properties.topic_alias is not None
        or properties.subscription_identifiers
        or properties.message_expiry_interval is not None
    ):
        raise ClusterProtocolError(
            "per-hop properties (topic alias, subscription id, expiry interval) in message"
        )
    payload = _read_blob(reader, "the payload")
    return WireMessage(
        topic,
        payload,
        qos,
        bool(flags & _RETAIN_FLAG),
        properties,
        origin_node,
        publisher,
        seq,
        expiry_ms,
    )


def _read_options(reader: Reader) -> SubscriptionOptions:
    bits = reader.u8("subscription options")
    if bits & 0x80 or bits & _QOS_MASK == 3 or (bits >> 4) & 0x03 == 3:
        raise ClusterProtocolError(f"bad subscription options 0x{bits:02X}")
    identifier = reader.u32("the subscription identifier") if bits & 0x40 else None
    return SubscriptionOptions(
        bits & _QOS_MASK, bool(bits & 0x04), bool(bits & 0x08), (bits >> 4) & 0x03, identifier
    )


def _read_delivery(reader: Reader) -> DeliveryRecord:
    flags = reader.u8("delivery flags")
    qos = flags & _QOS_MASK
    if qos == 3 or flags & ~(_QOS_MASK | _RETAIN_FLAG | _INFLIGHT_FLAG | _RELEASED_FLAG):
        raise ClusterProtocolError(f"bad delivery flags 0x{flags:02X}")
    packet_id = reader.u16("the packet id")
    count = reader.u8("the identifier count")
    identifiers = tuple(reader.u32("a subscription identifier") for _ in range(count))
    message = _read_message(reader)
    return DeliveryRecord(
        message,
        qos,
        bool(flags & _RETAIN_FLAG),
        identifiers,
        packet_id,
        bool(flags & _INFLIGHT_FLAG),
        bool(flags & _RELEASED_FLAG),
    )


def _read_session(reader: Reader) -> SessionRecord:
    client_id = reader.string("the client id")
    expiry_interval = reader.u32("the session expiry")
    expires_at = _read_stamp(reader, "the session deadline")
    version = _read_version(reader)
    next_packet_id = reader.u16("the next packet id")
    flags = reader.u8("session flags")
    if flags & ~(_WILL_FLAG | _DIVERGED_FLAG):
        raise ClusterProtocolError(f"reserved session flags set: 0x{flags:02X}")
    subscriptions = []
    for _ in range(reader.u16("the subscription count")):
        topic_filter = reader.string("a topic filter")
        subscriptions.append((topic_filter, _read_options(reader)))
    incoming = tuple(reader.u16("a packet id") for _ in range(reader.u16("the QoS 2 count")))
    will = None
    if flags & _WILL_FLAG:
        publish_at = _read_stamp(reader, "the will time")
        expiry = reader.u32("the will expiry")
        message = decode_message(_read_blob(reader, "the will"))
        will = WillRecord(publish_at, None if expiry == NO_WILL_EXPIRY else expiry, message)
    deliveries = tuple(
        decode_delivery(_read_blob(reader, "a delivery"))
        for _ in range(reader.u32("the delivery count"))
    )
    return SessionRecord(
        client_id,
        expiry_interval,
        expires_at or None,
        version,
        next_packet_id,
        tuple(subscriptions),
        incoming,
        will,
        bool(flags & _DIVERGED_FLAG),
        deliveries,
    )


#: The frames that came with a version after the lowest, each with its type and the first
#: version that carries it: a link of a lower version refuses it as a node of that version
#: does (an unknown type).
_SINCE: Final[dict[type, tuple[FrameType, int]]] = {
    Replica: (FrameType.REPLICA, REPLICA_VERSION),
    ReplicaAck: (FrameType.REPLICA_ACK, REPLICA_VERSION),
    ReplicaPublish: (FrameType.REPLICA_PUBLISH, REPLICA_VERSION),
    ReplicaShared: (FrameType.REPLICA_SHARED, FAILOVER_VERSION),
    ReplicaDeliver: (FrameType.REPLICA_DELIVER, DELIVER_FAILOVER_VERSION),
    ReplicaTransfer: (FrameType.REPLICA_TRANSFER, TRANSFER_FAILOVER_VERSION),
    Forget: (FrameType.FORGET, FORGET_VERSION),
    Reach: (FrameType.REACH, REACH_VERSION),
}


def _read_replica_op(reader: Reader) -> ReplicaOp:
    kind = reader.u8("the op kind")
    if not ReplicaOpKind.SAVE <= kind <= ReplicaOpKind.WILL_CLEAR:
        raise ClusterProtocolError(f"unknown replica op kind {kind}")
    op_kind = ReplicaOpKind(kind)
    client_id = reader.string("the client id")
    if op_kind == ReplicaOpKind.SAVE:
        data = _read_blob(reader, "a session record")
        record = decode_session(data)  # checked here: a bad record closes the link now
        if record.client_id != client_id or record.deliveries:
            raise ClusterProtocolError("a replicated session record of another client id")
        return ReplicaOp(op_kind, client_id, data=data)
    if op_kind in (ReplicaOpKind.DELETE, ReplicaOpKind.WILL_CLEAR):
        return ReplicaOp(op_kind, client_id)
    if op_kind == ReplicaOpKind.WILL_SET:
        data = _read_blob(reader, "a live will")
        decode_live_will(data)  # checked here: a bad will closes the link now
        return ReplicaOp(op_kind, client_id, data=data)
    if op_kind in (ReplicaOpKind.INCOMING_ADD, ReplicaOpKind.INCOMING_REMOVE):
        return ReplicaOp(op_kind, client_id, packet_id=reader.u16("the packet id"))
    key = _read_u64(reader, "the delivery key")
    if op_kind == ReplicaOpKind.DELIVERY_ADD:
        # Kept as bytes and decoded when used (a handover): one per message, so not here
        # (20 us each); broker.replica drops one that does not decode then, and counts it.
        return ReplicaOp(op_kind, client_id, key, data=_read_blob(reader, "a delivery record"))
    if op_kind == ReplicaOpKind.DELIVERY_UPDATE:
        packet_id = reader.u16("the packet id")
        flags = reader.u8("the delivery flags")
        if flags & ~(_OP_INFLIGHT | _OP_RELEASED):
            raise ClusterProtocolError(f"reserved delivery update flags set: 0x{flags:02X}")
        return ReplicaOp(
            op_kind,
            client_id,
            key,
            packet_id,
            bool(flags & _OP_INFLIGHT),
            bool(flags & _OP_RELEASED),
        )
    return ReplicaOp(op_kind, client_id, key)


def _whole(data: bytes, read: object) -> object:
    view = memoryview(data)
    reader = Reader(view, 0, len(view))
    try:
        value = read(reader)  # type: ignore[operator]
    except MQTTProtocolError as error:
        raise ClusterProtocolError(f"malformed record: {error}") from None
    if reader.remaining():
        raise ClusterProtocolError(f"{reader.remaining()} unexpected bytes after a record")
    return value


def decode_message(data: bytes) -> WireMessage:
    value = _whole(data, _read_message)
    assert isinstance(value, WireMessage)
    return value


def decode_delivery(data: bytes) -> DeliveryRecord:
    value = _whole(data, _read_delivery)
    assert isinstance(value, DeliveryRecord)
    return value


def decode_session(data: bytes) -> SessionRecord:
    value = _whole(data, _read_session)
    assert isinstance(value, SessionRecord)
    return value


def _decode_body(frame_type: int, view: memoryview) -> Frame:
    reader = Reader(view, 0, len(view))
    frame: Frame
    if frame_type == FrameType.RELIABLE:
        seq = _read_u64(reader, "the seq")
        inner = view[reader.pos :]
        if len(inner) < FRAME_HEADER_SIZE:
            raise ClusterProtocolError("RELIABLE frame without an inner frame")
        (length,) = _LENGTH.unpack_from(inner, 0)
        if length + _LENGTH.size != len(inner):
            raise ClusterProtocolError("RELIABLE inner frame length does not match")
        if inner[_LENGTH.size] == FrameType.RELIABLE:
            raise ClusterProtocolError("RELIABLE inside RELIABLE")
        return Reliable(seq, _decode_body(inner[_LENGTH.size], inner[FRAME_HEADER_SIZE:]))
    if frame_type == FrameType.PUBLISH:
        flags = reader.u8("publish flags")
        if flags & ~_PLAIN_FLAG:
            raise ClusterProtocolError(f"reserved publish flags set: 0x{flags:02X}")
        targets = _read_targets(reader)
        frame = Publish(_read_message(reader), bool(flags & _PLAIN_FLAG), targets)
    elif frame_type == FrameType.ACK:
        frame = Ack(_read_u64(reader, "the seq"))
    elif frame_type == FrameType.HOLD:
        flags = reader.u8("hold flags")
        if flags & ~(_HOLD_PAUSE | _HOLD_SHARE):
            raise ClusterProtocolError(f"reserved hold flags set: 0x{flags:02X}")
        if flags == _HOLD_PAUSE | _HOLD_SHARE:
            raise ClusterProtocolError("a HOLD pause with a share")
        client_id = reader.string("the client id")
        if flags & _HOLD_SHARE:
            share = reader.u32("the hold share")
            if not share:
                raise ClusterProtocolError("a HOLD share of 0")
            frame = Hold(client_id, False, share)
        else:
            frame = Hold(client_id, bool(flags))
    elif frame_type == FrameType.SUBSCRIBE:
        frame = Subscribe(reader.string("the topic filter"))
    elif frame_type == FrameType.UNSUBSCRIBE:
        frame = Unsubscribe(reader.string("the topic filter"))
    elif frame_type == FrameType.PING:
        frame = Ping()
    elif frame_type == FrameType.PONG:
        frame = Pong()
    elif frame_type == FrameType.HELLO:
        version = reader.u8("the protocol version")
        node = reader.string("the node name")
        cluster = reader.string("the cluster name")
        cookie = reader.binary("the cookie")
        if not MIN_PROTOCOL_VERSION <= version <= PROTOCOL_VERSION:
            # A node of a version we do not speak: its HELLO is read only as far as the
            # fields every version has, so the refusal can say which version it speaks.
            return Hello(version, node, cluster, cookie)
        frame = Hello(
            version,
            node,
            cluster,
            cookie,
            _read_u64(reader, "the incarnation"),
            _read_u64(reader, "the peer incarnation"),
            _read_u64(reader, "the last applied seq"),
            _read_u64(reader, "the boot") if version >= BOOT_VERSION else 0,
            _read_u64(reader, "wills_taken") if version >= BOOT_VERSION else 0,
        )
    elif frame_type == FrameType.CLOSE:
        frame = Close(reader.string("the reason"))
    elif frame_type == FrameType.SYNC:
        flags = reader.u8("sync flags")
        if flags & ~_RESET_FLAG:
            raise ClusterProtocolError(f"reserved sync flags set: 0x{flags:02X}")
        filters: list[str] = []
        while reader.remaining():
            filters.append(reader.string("a topic filter"))
        frame = Sync(bool(flags & _RESET_FLAG), tuple(filters))
    elif frame_type == FrameType.RETAIN:
        changed_at = _read_stamp(reader, "the RETAIN timestamp")
        flags = reader.u8("retain flags")
        if flags & ~_PRESENT_FLAG:
            raise ClusterProtocolError(f"reserved retain flags set: 0x{flags:02X}")
        topic = reader.string("the topic")
        message = _read_message(reader) if flags & _PRESENT_FLAG else None
        frame = Retain(topic, message, changed_at)
    elif frame_type == FrameType.CLAIM:
        claim_version = _read_version(reader)
        flags = reader.u8("claim flags")
        if flags & ~_CLEAN_START_FLAG:
            raise ClusterProtocolError(f"reserved claim flags set: 0x{flags:02X}")
        frame = Claim(reader.string("the client id"), claim_version, bool(flags))
    elif frame_type == FrameType.CLAIM_REPLY:
        claim_version = _read_version(reader)
        outcome = reader.u8("the claim outcome")
        if outcome > 1:
            raise ClusterProtocolError(f"unknown claim outcome {outcome}")
        frame = ClaimReply(reader.string("the client id"), claim_version, bool(outcome))
    elif frame_type == FrameType.TRANSFER:
        claim_version = _read_version(reader)
        flags = reader.u8("transfer flags")
        if flags & ~_MERGE_FLAG:
            raise ClusterProtocolError(f"reserved transfer flags set: 0x{flags:02X}")
        frame = Transfer(claim_version, bool(flags), _read_session(reader))
    elif frame_type == FrameType.DELIVER:
        frame = Deliver(reader.string("the client id"), _read_delivery(reader))
    elif frame_type == FrameType.OWNED:
        entries = []
        for _ in range(reader.u16("the entry count")):
            client_id = reader.string("a client id")
            entries.append((client_id, _read_version(reader)))
        frame = Owned(tuple(entries))
    elif frame_type == FrameType.MEMBERS:
        flags = reader.u8("members flags")
        if flags & ~_RESET_FLAG:
            raise ClusterProtocolError(f"reserved members flags set: 0x{flags:02X}")
        members = []
        for _ in range(reader.u16("the member count")):
            state = reader.u8("a member state")
            if state > 2:
                raise ClusterProtocolError(f"unknown member state {state}")
            members.append((state, reader.string("a shared filter"), reader.string("a client id")))
        frame = Members(bool(flags), tuple(members))
    elif frame_type == FrameType.STATE:
        claim_version = _read_version(reader)
        key = reader.binary("the key")
        flags = reader.u8("state flags")
        if flags & ~_PRESENT_FLAG:
            raise ClusterProtocolError(f"reserved state flags set: 0x{flags:02X}")
        if flags:
            value = _read_blob(reader, "the value")
            expires_at = _read_stamp(reader, "the key's deadline")
            frame = StateWrite(claim_version, key, value, expires_at or None)
        else:
            frame = StateWrite(claim_version, key, None, None)
    elif frame_type == FrameType.REPLICA:
        seq = _read_u64(reader, "the replica seq")
        flags = reader.u8("replica flags")
        if flags & ~_RESET_FLAG:
            raise ClusterProtocolError(f"reserved replica flags set: 0x{flags:02X}")
        ops = tuple(_read_replica_op(reader) for _ in range(reader.u32("the op count")))
        frame = Replica(seq, bool(flags), ops)
    elif frame_type == FrameType.REPLICA_ACK:
        frame = ReplicaAck(_read_u64(reader, "the replica seq"))
    elif frame_type == FrameType.REPLICA_PUBLISH:
        frame = ReplicaPublish(reader.string("the origin node"), _read_message(reader))
    elif frame_type == FrameType.REPLICA_SHARED:
        origin = reader.string("the origin node")
        targets = _read_targets(reader)
        if not targets:
            raise ClusterProtocolError("REPLICA_SHARED without a member")
        frame = ReplicaShared(origin, targets, _read_message(reader))
    elif frame_type == FrameType.REPLICA_DELIVER:
        origin = reader.string("the origin node")
        frame = ReplicaDeliver(origin, reader.string("the client id"), _read_delivery(reader))
    elif frame_type == FrameType.REPLICA_TRANSFER:
        frame = ReplicaTransfer(reader.string("the origin node"), _read_session(reader))
    elif frame_type == FrameType.FORGET:
        frame = Forget(reader.string("the node"))
    elif frame_type == FrameType.REACH:
        flags = reader.u8("the flags")
        if flags & ~_REACH_UP:
            raise ClusterProtocolError(f"REACH with unknown flags {flags:#04x}")
        frame = Reach(reader.string("the node"), bool(flags & _REACH_UP))
    else:
        raise ClusterProtocolError(f"unknown frame type {frame_type}")
    if reader.remaining():
        raise ClusterProtocolError(
            f"{reader.remaining()} unexpected bytes after a {FrameType(frame_type).name} frame"
        )
    return frame


class ClusterDecoder:
    """Bytes in, frames out. ``max_frame_size`` bounds ``length`` (type + body)."""

    __slots__ = ("_buffer", "_failed", "frame_size", "max_frame_size", "version")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        # The link's version once both HELLOs are known (link_version): a frame that version
        # does not have is refused as a node of that version refuses it.
        self.version: int = PROTOCOL_VERSION
        self._buffer = bytearray()
        self._failed = False
        # The bytes of the frame next_event() returned last (length field included).
        self.frame_size = 0

    @property
    def trailing_data(self) -> bytes:
        """Bytes received and not yet part of a returned frame."""
        return bytes(self._buffer)

    def feed(self, data: bytes) -> None:
        if self._failed:
            raise ClusterProtocolError("the decoder failed earlier and accepts no more input")
        self._buffer += data

    def next_event(self) -> Frame | NeedData:
        if self._failed:
            raise ClusterProtocolError("the decoder failed earlier and accepts no more input")
        buffer = self._buffer
        if len(buffer) < FRAME_HEADER_SIZE:
            # Check a declared length as soon as its four bytes are here.
            if len(buffer) >= _LENGTH.size:
                self._check_length(_LENGTH.unpack_from(buffer, 0)[0])
            return NEED_DATA
        (length,) = _LENGTH.unpack_from(buffer, 0)
        self._check_length(length)
        end = _LENGTH.size + length
        if len(buffer) < end:
            return NEED_DATA
        frame_type = buffer[_LENGTH.size]
        body = bytes(buffer[FRAME_HEADER_SIZE:end])
        del buffer[:end]
        self.frame_size = end
        try:
            frame = _decode_body(frame_type, memoryview(body))
            if self.version < SHARE_VERSION and isinstance(frame, Hold) and frame.share:
                raise ClusterProtocolError(
                    f"reserved hold flags set: 0x{_HOLD_SHARE:02X} (a share on a link of "
                    f"protocol version {self.version})"
                )
            if self.version < PROTOCOL_VERSION:
                inner = frame.frame if isinstance(frame, Reliable) else frame
                since = _SINCE.get(type(inner))
                if since is not None and self.version < since[1]:
                    # As a node of that version reads it.
                    raise ClusterProtocolError(f"unknown frame type {int(since[0])}")
                if isinstance(inner, Replica) and self.version < FAILOVER_VERSION:
                    for op in inner.ops:
                        if op.kind >= ReplicaOpKind.WILL_SET:
                            raise ClusterProtocolError(f"unknown replica op kind {int(op.kind)}")
            return frame
        except MQTTProtocolError as error:
            self._failed = True
            raise ClusterProtocolError(f"malformed frame: {error}") from None
        except ClusterProtocolError:
            self._failed = True
            raise

    def _check_length(self, length: int) -> None:
        if length == 0:
            self._failed = True
            raise ClusterProtocolError("frame of length 0 (no type byte)")
        if length > self.max_frame_size:
            self._failed = True
            raise ClusterProtocolError(
                f"frame of {length} bytes exceeds the limit of {self.max_frame_size}"
            )
