"""Sans-IO codec of the node-to-node cluster link (seed 002: cluster RPC over mutual TLS).

The link carries length-prefixed frames over one TLS connection per pair of nodes::

    frame   = length:u32 (big-endian, counts type + body) | type:u8 | body
    string  = length:u16 | UTF-8 bytes (MQTT's UTF-8 Encoded String, section 1.5.4)
    binary  = length:u16 | bytes

Frame types and bodies (protocol version :data:`PROTOCOL_VERSION`):

``HELLO``        version:u8, node:string, cluster:string, cookie:binary. Sent by both ends
                 first; the cookie is compared in constant time (EMQX's node.cookie).
``CLOSE``        reason:string. The sender closes the link after it (a refusal, in words).
``PING/PONG``    empty. Keepalive of an idle link.
``SYNC``         flags:u8 (bit 0 reset), then strings up to the end: the sender's complete
                 list of topic filters (a reset frame, then continuation frames).
``SUBSCRIBE``    filter:string. The first local subscriber took this filter.
``UNSUBSCRIBE``  filter:string. The last local subscriber dropped it.
``PUBLISH``      message (below): deliver to local subscribers, never forward again.
``RETAIN``       changed_at:f64 (wall clock), flags:u8 (bit 0 message present),
                 topic:string, [message]. The retained message of a topic changed.
``TAKEOVER``     client_id:string. A client with this id connected on the sender.

A message is flags:u8 (bits 0-1 QoS, bit 2 RETAIN, bit 3 publisher present),
topic:string, origin node:string, [publisher client id:string], the MQTT 5.0 PUBLISH
properties exactly as in a PUBLISH packet (section 3.3.2.3, reusing the MQTT codec; the
Message Expiry Interval carries the time left), then the payload up to the end of the frame.

Shape (STYLE.md rule 2): :class:`ClusterDecoder` has ``feed``, ``next_event`` (a frame or
:data:`NEED_DATA`) and ``trailing_data``; :func:`encode` is a pure function. A declared
length above the decoder's limit is refused before its bytes are buffered, and a decoder
that has raised :class:`ClusterProtocolError` accepts no more input.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from broker.message import Message
from broker.mqtt import MQTTProtocolError, PacketType, Properties
from broker.mqtt.properties import decode_properties, encode_properties
from broker.mqtt.wire import Reader, encode_binary, encode_string

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "Close",
    "ClusterDecoder",
    "ClusterProtocolError",
    "Frame",
    "FrameType",
    "Hello",
    "NeedData",
    "Ping",
    "Pong",
    "Publish",
    "Retain",
    "Subscribe",
    "Sync",
    "Takeover",
    "Unsubscribe",
    "WireMessage",
    "encode",
    "encode_sync",
]

PROTOCOL_VERSION: Final = 1
#: length:u32 + type:u8.
FRAME_HEADER_SIZE: Final = 5
#: A PUBLISH frame is at most an MQTT packet (max_packet_size) plus the node names; the
#: link passes its own limit, derived from the node's max_packet_size.
DEFAULT_MAX_FRAME_SIZE: Final = 1_048_576 + 4 * 65_536
#: SYNC frames are split so that each stays far below any frame limit.
SYNC_CHUNK_BYTES: Final = 32_768

_LENGTH: Final = struct.Struct(">I")
_STAMP: Final = struct.Struct(">d")
_QOS_MASK: Final = 0x03
_RETAIN_FLAG: Final = 0x04
_PUBLISHER_FLAG: Final = 0x08
_RESET_FLAG: Final = 0x01
_PRESENT_FLAG: Final = 0x01


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
    TAKEOVER = 10


class ClusterProtocolError(Exception):
    """The peer sent bytes that break the link protocol; the link is closed."""


class NeedData:
    """The decoder needs more bytes before the next frame is complete."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


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

    @classmethod
    def from_message(cls, message: Message, now: float, origin_node: str) -> WireMessage:
        """``now`` is the sender's broker clock, against which ``expires_at`` counts."""
        return cls(
            message.topic,
            message.payload,
            message.qos,
            message.retain,
            dataclasses.replace(
                message.properties, message_expiry_interval=message.remaining_expiry(now)
            ),
            message.origin_node or origin_node,
            message.publisher_client_id,
        )

    def to_message(self, now: float) -> Message:
        """The message on the receiver's clock ``now``."""
        interval = self.properties.message_expiry_interval
        return Message(
            self.topic,
            self.payload,
            self.qos,
            self.retain,
            dataclasses.replace(self.properties, message_expiry_interval=None),
            None if interval is None else now + interval,
            self.publisher_client_id,
            self.origin_node,
        )


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    node: str
    cluster: str
    cookie: bytes

    def __repr__(self) -> str:
        # The cookie is a secret: never in a log line.
        return f"Hello(version={self.version}, node={self.node!r}, cluster={self.cluster!r})"


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


@dataclass(frozen=True, slots=True)
class Retain:
    topic: str
    message: WireMessage | None
    changed_at: float


@dataclass(frozen=True, slots=True)
class Takeover:
    client_id: str


Frame = Hello | Close | Ping | Pong | Sync | Subscribe | Unsubscribe | Publish | Retain | Takeover


# --- encoding ------------------------------------------------------------------------------


def _encode_message(message: WireMessage) -> bytes:
    if message.qos not in (0, 1, 2):
        raise ValueError(f"QoS out of range: {message.qos}")
    flags = message.qos
    if message.retain:
        flags |= _RETAIN_FLAG
    parts = [encode_string(message.topic), encode_string(message.origin_node)]
    if message.publisher_client_id is not None:
        flags |= _PUBLISHER_FLAG
        parts.append(encode_string(message.publisher_client_id))
    parts.append(encode_properties(message.properties, PacketType.PUBLISH))
    parts.append(message.payload)
    return bytes((flags,)) + b"".join(parts)


def _body(frame: Frame) -> tuple[FrameType, bytes]:
    if isinstance(frame, Publish):
        return FrameType.PUBLISH, _encode_message(frame.message)
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
        return FrameType.HELLO, (
            bytes((frame.version,))
            + encode_string(frame.node)
            + encode_string(frame.cluster)
            + encode_binary(frame.cookie)
        )
    if isinstance(frame, Close):
        return FrameType.CLOSE, encode_string(frame.reason)
    if isinstance(frame, Sync):
        flags = _RESET_FLAG if frame.reset else 0
        return FrameType.SYNC, bytes((flags,)) + b"".join(
            encode_string(topic_filter) for topic_filter in frame.filters
        )
    if isinstance(frame, Retain):
        if not math.isfinite(frame.changed_at):
            raise ValueError(f"changed_at must be finite, got {frame.changed_at}")
        head = _STAMP.pack(frame.changed_at)
        if frame.message is None:
            return FrameType.RETAIN, head + b"\x00" + encode_string(frame.topic)
        return FrameType.RETAIN, (
            head
            + bytes((_PRESENT_FLAG,))
            + encode_string(frame.topic)
            + _encode_message(frame.message)
        )
    if isinstance(frame, Takeover):
        return FrameType.TAKEOVER, encode_string(frame.client_id)
    raise TypeError(f"not a cluster frame: {frame!r}")


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


# --- decoding ------------------------------------------------------------------------------


def _decode_message(reader: Reader) -> WireMessage:
    flags = reader.u8("message flags")
    qos = flags & _QOS_MASK
    if qos == 3:
        raise ClusterProtocolError("message QoS 3")
    if flags & ~(_QOS_MASK | _RETAIN_FLAG | _PUBLISHER_FLAG):
        raise ClusterProtocolError(f"reserved message flags set: 0x{flags:02X}")
    topic = reader.string("the topic")
    origin_node = reader.string("the origin node")
    publisher = reader.string("the publisher client id") if flags & _PUBLISHER_FLAG else None
    properties = decode_properties(reader, PacketType.PUBLISH)
    if properties.topic_alias is not None or properties.subscription_identifiers:
        raise ClusterProtocolError("per-hop properties (topic alias, subscription id) in message")
    payload = reader.rest()
    return WireMessage(
        topic, payload, qos, bool(flags & _RETAIN_FLAG), properties, origin_node, publisher
    )


def _decode_body(frame_type: int, view: memoryview) -> Frame:
    reader = Reader(view, 0, len(view))
    frame: Frame
    if frame_type == FrameType.PUBLISH:
        return Publish(_decode_message(reader))
    if frame_type == FrameType.SUBSCRIBE:
        frame = Subscribe(reader.string("the topic filter"))
    elif frame_type == FrameType.UNSUBSCRIBE:
        frame = Unsubscribe(reader.string("the topic filter"))
    elif frame_type == FrameType.PING:
        frame = Ping()
    elif frame_type == FrameType.PONG:
        frame = Pong()
    elif frame_type == FrameType.HELLO:
        version = reader.u8("the protocol version")
        frame = Hello(
            version,
            reader.string("the node name"),
            reader.string("the cluster name"),
            reader.binary("the cookie"),
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
        if reader.remaining() < _STAMP.size:
            raise ClusterProtocolError("RETAIN frame shorter than its timestamp")
        (changed_at,) = _STAMP.unpack_from(view, 0)
        reader.pos = _STAMP.size
        if not math.isfinite(changed_at):
            raise ClusterProtocolError("RETAIN timestamp is not a finite number")
        flags = reader.u8("retain flags")
        if flags & ~_PRESENT_FLAG:
            raise ClusterProtocolError(f"reserved retain flags set: 0x{flags:02X}")
        topic = reader.string("the topic")
        if flags & _PRESENT_FLAG:
            return Retain(topic, _decode_message(reader), changed_at)
        frame = Retain(topic, None, changed_at)
    elif frame_type == FrameType.TAKEOVER:
        frame = Takeover(reader.string("the client id"))
    else:
        raise ClusterProtocolError(f"unknown frame type {frame_type}")
    if reader.remaining():
        raise ClusterProtocolError(
            f"{reader.remaining()} unexpected bytes after a {FrameType(frame_type).name} frame"
        )
    return frame


class ClusterDecoder:
    """Bytes in, frames out. ``max_frame_size`` bounds ``length`` (type + body)."""

    __slots__ = ("_buffer", "_failed", "max_frame_size")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._failed = False

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
        try:
            return _decode_body(frame_type, memoryview(body))
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
