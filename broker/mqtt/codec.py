"""Sans-IO MQTT 3.1, 3.1.1 and 5.0 codec: `MQTTDecoder` (bytes in, packets out) and `encode`.

One codec for every level, keyed by the Protocol Level byte (3, 4 or 5). The decoder starts
at `protocol_level=None` on the server side and takes the level from the CONNECT it decodes;
a client-side decoder is given the level. Everything a peer can get wrong raises
`MQTTProtocolError` with the reason code the spec asks for; nothing else escapes `next_event`.

Spec sections: fixed header and reserved flag bits (3.1.1 section 2.2, 5.0 section 2.1.3),
Remaining Length (3.1.1 section 2.2.3, 5.0 section 2.1.4), Packet Identifier (5.0 section
2.2.1), then each packet's variable header and payload (both specs, chapter 3).
"""

from __future__ import annotations

from enum import Enum
from typing import Final, Literal

from .packets import (
    EMPTY_PROPERTIES,
    Auth,
    Connack,
    ConnackReturnCode311,
    Connect,
    Disconnect,
    MQTTProtocolError,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Properties,
    ProtocolLevel,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
    connack_code_for,
)
from .properties import WILL_PROPERTIES, decode_properties, encode_properties
from .topics import SHARED_SUBSCRIPTION_PREFIX, check_no_wildcards
from .wire import (
    MAX_VARIABLE_BYTE_INTEGER,
    VARIABLE_BYTE_INTEGER_MAX_BYTES,
    Reader,
    encode_binary,
    encode_string,
    encode_u16,
    encode_variable_byte_integer,
    malformed,
    protocol_error,
)

__all__ = [
    "MAX_PACKET_SIZE",
    "MAX_REMAINING_LENGTH",
    "NEED_DATA",
    "RAW_PUBLISH_MAX",
    "REMAINING_LENGTH_MAX_BYTES",
    "MQTTDecoder",
    "NeedData",
    "encode",
    "publish_forward_parts",
]

# 3.1.1 section 2.2.3 / 5.0 section 2.1.4: Remaining Length is a Variable Byte Integer of at
# most four bytes, so a packet is at most 1 + 4 + 268,435,455 bytes.
REMAINING_LENGTH_MAX_BYTES: Final = VARIABLE_BYTE_INTEGER_MAX_BYTES
MAX_REMAINING_LENGTH: Final = MAX_VARIABLE_BYTE_INTEGER
MAX_PACKET_SIZE: Final = 1 + REMAINING_LENGTH_MAX_BYTES + MAX_REMAINING_LENGTH

# A PUBLISH of at most this many bytes is decoded from a copy of its own bytes, which it keeps
# (Publish.raw) so that the broker can forward them without encoding the packet again
# (bench/README.md, issue 13). A message queued or retained holds both its payload and these
# bytes, hence the bound; larger packets decode from the buffer, without `raw`.
RAW_PUBLISH_MAX: Final = 16_384

# Topic names the PUBLISH fast path decoded and checked, by their bytes: a device publishes
# to the same few topics again and again, and one str per name is decoded and scanned for
# wildcards once, and hashed once for every dict it is looked up in after (the trie's match
# cache, the retained store). Shared by every decoder of the process (a memo: the result is
# the same with or without it); names up to 128 bytes, 4,096 of them (about 1.5 MiB at most),
# all forgotten when it is full.
TOPIC_NAME_CACHE_ENTRIES: Final = 4096
TOPIC_NAME_CACHE_BYTES: Final = 128
_TOPIC_NAMES: dict[bytes, str] = {}

# Consumed bytes are dropped from the front of the buffer once they pass this size and half
# the buffer, so feeding a byte at a time stays linear and a long stream stays bounded.
_COMPACT_AFTER: Final = 65_536


class NeedData(Enum):
    """The type of `NEED_DATA`: `next_event` has no whole packet yet."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA

_MQTT_5: Final = ProtocolLevel.MQTT_5
_PROTOCOL_NAMES: Final[dict[int, str]] = {
    ProtocolLevel.MQTT_3_1: "MQIsdp",
    ProtocolLevel.MQTT_3_1_1: "MQTT",
    ProtocolLevel.MQTT_5: "MQTT",
}

# Required fixed-header flags (3.1.1 Table 2.2, 5.0 Table 2-2); PUBLISH carries DUP/QoS/RETAIN.
_FLAGS: Final = {
    PacketType.PUBREL: 0b0010,
    PacketType.SUBSCRIBE: 0b0010,
    PacketType.UNSUBSCRIBE: 0b0010,
}

# Reason codes each 5.0 packet may carry (sections 3.2.2.2, 3.4.2.1, ..., 3.15.2.1).
_REASONS: Final[dict[PacketType, frozenset[int]]] = {
    PacketType.CONNACK: frozenset(
        {0x00, *range(0x80, 0x8B), 0x8C, 0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F}
    ),
    PacketType.PUBACK: frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99}),
    PacketType.PUBREC: frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99}),
    PacketType.PUBREL: frozenset({0x00, 0x92}),
    PacketType.PUBCOMP: frozenset({0x00, 0x92}),
    PacketType.SUBACK: frozenset(
        {0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2}
    ),
    PacketType.UNSUBACK: frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91}),
    PacketType.DISCONNECT: frozenset(
        {0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90}
        | set(range(0x93, 0xA3))
    ),
    PacketType.AUTH: frozenset({0x00, 0x18, 0x19}),
}
_SUBACK_311: Final = frozenset({0x00, 0x01, 0x02, 0x80})
# Indexed by the first byte's high nibble (0 is reserved, rejected before the lookup); a
# tuple index is cheaper than calling the enum once per packet.
_PACKET_TYPES: Final[tuple[PacketType, ...]] = (PacketType.CONNECT, *PacketType)
# Packets that are two bytes, the first and a Remaining Length of 0, at every protocol level
# once CONNECT is in: the keep alive's PINGREQ/PINGRESP and the usual DISCONNECT (5.0 section
# 3.14.2.1: reason 0x00, no properties). Made without the Reader and the checks of
# _check_first_byte, which such a first byte passes anyway.
_BODILESS: Final[dict[int, type[Pingreq | Pingresp | Disconnect]]] = {
    PacketType.PINGREQ << 4: Pingreq,
    PacketType.PINGRESP << 4: Pingresp,
    PacketType.DISCONNECT << 4: Disconnect,
}


def _check_reason(packet_type: PacketType, code: int) -> None:
    if code not in _REASONS[packet_type]:
        raise protocol_error(f"reason code 0x{code:02X} is not valid in {packet_type.name}")


def _check_packet_id(packet_id: int) -> int:
    # 5.0 section 2.2.1 / 3.1.1 section 2.3.1: Packet Identifiers are non-zero.
    if packet_id == 0:
        raise protocol_error("packet identifier 0")
    return packet_id


def _done(reader: Reader, packet_type: PacketType) -> None:
    if reader.pos != reader.end:
        raise malformed(
            f"{reader.end - reader.pos} unexpected bytes at the end of {packet_type.name}"
        )


# --- decoding ------------------------------------------------------------------------------


def _decode_connect(reader: Reader) -> Connect:
    name = reader.string("the protocol name")
    level = reader.u8("the protocol level")
    try:
        if _PROTOCOL_NAMES.get(level) != name:
            raise MQTTProtocolError(
                ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
                f"unsupported protocol {name!r} level {level}",
            )
        return _decode_connect_rest(reader, name, level)
    except MQTTProtocolError as error:
        if error.protocol_level is None:
            error.protocol_level = level
        raise


def _decode_connect_rest(reader: Reader, name: str, level: int) -> Connect:
    v5 = level >= _MQTT_5
    flags = reader.u8("the connect flags")
    # 3.1.1 section 3.1.2.3 / 5.0 section 3.1.2.3: the reserved bit is 0.
    if flags & 0x01:
        raise malformed("reserved connect flag is set")
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    password_flag = bool(flags & 0x40)
    username_flag = bool(flags & 0x80)
    if will_qos == 3:
        raise malformed("will QoS 3")
    if not will_flag and (will_qos or will_retain):
        raise malformed("will QoS or will retain set without the will flag")
    if password_flag and not username_flag and not v5:
        raise malformed("password flag without user name flag")  # [MQTT-3.1.2-22]
    keep_alive = reader.u16("keep alive")
    properties = decode_properties(reader, PacketType.CONNECT) if v5 else EMPTY_PROPERTIES
    client_id = reader.string("the client identifier")
    clean_start = bool(flags & 0x02)
    if not client_id and (level == ProtocolLevel.MQTT_3_1 or not (v5 or clean_start)):
        # 3.1.1 section 3.1.3.1 [MQTT-3.1.3-8]; 3.1 requires 1 to 23 characters.
        raise MQTTProtocolError(
            ReasonCode.CLIENT_IDENTIFIER_NOT_VALID, "empty client identifier without clean session"
        )
    will = None
    if will_flag:
        will_properties = decode_properties(reader, WILL_PROPERTIES) if v5 else EMPTY_PROPERTIES
        will_topic = reader.string("the will topic")
        if not will_topic:
            raise MQTTProtocolError(ReasonCode.TOPIC_NAME_INVALID, "empty will topic")
        check_no_wildcards(will_topic)
        will_payload = reader.binary("the will payload")
        will = Will(will_topic, will_payload, will_qos, will_retain, will_properties)
    username = reader.string("the user name") if username_flag else None
    password = reader.binary("the password") if password_flag else None
    _done(reader, PacketType.CONNECT)
    return Connect(
        name, level, clean_start, keep_alive, client_id, username, password, will, properties
    )


#: A CONNECT's variable header up to the level: the protocol name "MQTT" (3.1.1 and 5.0).
_MQTT_NAME: Final = b"\x00\x04MQTT"


def _binary_at(packet: bytes, index: int) -> tuple[bytes, int] | None:
    """The length-prefixed bytes at ``index`` and the index after them; None when the packet
    ends first (the general path then raises the right error)."""
    if index + 2 > len(packet):
        return None
    stop = index + 2 + ((packet[index] << 8) | packet[index + 1])
    if stop > len(packet):
        return None
    return packet[index + 2 : stop], stop


def _string_at(packet: bytes, index: int) -> tuple[str, int] | None:
    """The UTF-8 string at ``index`` and the index after it; None for anything wrong (short,
    not UTF-8, U+0000): the general path then raises the right error."""
    found = _binary_at(packet, index)
    if found is None:
        return None
    try:
        text = found[0].decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\x00" in text:
        return None
    return text, found[1]


def _decode_connect_fast(packet: bytes, pos: int) -> Connect | None:
    """The usual CONNECT (3.1.1 or 5.0) straight from its bytes, without a Reader, as
    :func:`_decode_publish_fast` does for PUBLISH: the Reader's calls were two thirds of a
    CONNECT's decode (bench/README.md issue 13). `packet` is the whole packet, its body starts
    at `pos`. None for anything unusual (MQTT 3.1, a flag or string the general decoder would
    refuse, will properties): the general path decodes it and raises the right error. A 5.0
    property list is the general decoder's, on this packet, in the same order."""
    end = len(packet)
    if pos + 10 > end or packet[pos : pos + 6] != _MQTT_NAME:
        return None
    level = packet[pos + 6]
    flags = packet[pos + 7]
    if level not in (4, 5) or flags & 0x01:
        return None
    will_flag = flags & 0x04
    will_qos = (flags >> 3) & 0x03
    if will_qos == 3 or (not will_flag and flags & 0x38):
        return None
    if level == 4 and flags & 0xC0 == 0x40:
        return None  # a password without a user name [MQTT-3.1.2-22]
    keep_alive = (packet[pos + 8] << 8) | packet[pos + 9]
    index = pos + 10
    properties = EMPTY_PROPERTIES
    if level == 5:
        if index >= end:
            return None
        if packet[index]:
            with memoryview(packet) as view:
                reader = Reader(view, index, end)
                try:
                    properties = decode_properties(reader, PacketType.CONNECT)
                except MQTTProtocolError as error:
                    if error.protocol_level is None:
                        error.protocol_level = level  # as _decode_connect says it
                    raise
                finally:
                    reader.view = memoryview(b"")
                index = reader.pos
        else:
            index += 1
    found = _string_at(packet, index)
    if found is None:
        return None
    client_id, index = found
    clean_start = bool(flags & 0x02)
    if not client_id and level == 4 and not clean_start:
        return None  # [MQTT-3.1.3-8]
    will = None
    if will_flag:
        if level == 5:
            if index >= end or packet[index]:
                return None  # will properties: the general path
            index += 1
        found = _string_at(packet, index)
        if found is None:
            return None
        topic, index = found
        if not topic or "+" in topic or "#" in topic:
            return None
        payload = _binary_at(packet, index)
        if payload is None:
            return None
        will = Will(topic, payload[0], will_qos, bool(flags & 0x20), EMPTY_PROPERTIES)
        index = payload[1]
    username = None
    if flags & 0x80:
        found = _string_at(packet, index)
        if found is None:
            return None
        username, index = found
    password = None
    if flags & 0x40:
        secret = _binary_at(packet, index)
        if secret is None:
            return None
        password, index = secret
    if index != end:
        return None
    return Connect(
        "MQTT", level, clean_start, keep_alive, client_id, username, password, will, properties
    )


def _decode_connack(reader: Reader, v5: bool) -> Connack:
    flags = reader.u8("the connect acknowledge flags")
    if flags & 0xFE:
        raise malformed("reserved connect acknowledge flags are set")
    code = reader.u8("the connect reason code")
    if v5:
        _check_reason(PacketType.CONNACK, code)
        properties = decode_properties(reader, PacketType.CONNACK)
    else:
        if code > max(ConnackReturnCode311):
            raise malformed(f"unknown CONNACK return code {code}")
        properties = EMPTY_PROPERTIES
    _done(reader, PacketType.CONNACK)
    if flags and code:
        # [MQTT-3.2.2-4] (3.1.1) / [MQTT-3.2.2-6] (5.0)
        raise protocol_error("session present with a refusing CONNACK")
    return Connack(bool(flags), code, properties)


def _decode_publish(reader: Reader, flags: int, v5: bool) -> Publish:
    qos = (flags >> 1) & 0x03
    dup = bool(flags & 0x08)
    if qos == 3:
        raise malformed("PUBLISH with QoS 3")  # [MQTT-3.3.1-4]
    if dup and not qos:
        raise malformed("PUBLISH with DUP set at QoS 0")  # [MQTT-3.3.1-2]
    topic = reader.string("the topic name")
    packet_id = _check_packet_id(reader.u16("the packet identifier")) if qos else None
    properties = decode_properties(reader, PacketType.PUBLISH) if v5 else EMPTY_PROPERTIES
    if not topic:
        if not v5:
            raise MQTTProtocolError(ReasonCode.TOPIC_NAME_INVALID, "empty topic name")
        if properties.topic_alias is None:
            raise protocol_error("empty topic name without a topic alias")  # 3.3.2.1
    check_no_wildcards(topic)
    return Publish(topic, reader.rest(), qos, bool(flags & 0x01), dup, packet_id, properties)


def _decode_publish_fast(packet: bytes, pos: int, v5: bool) -> Publish | None:
    """The common PUBLISH straight from its bytes, without a Reader: about a third of the
    decode cost (bench/README.md, broker section). `packet` is the whole packet, its body
    starts at `pos`. In 5.0 only with an empty property list (one zero byte), the usual case.
    None for anything unusual (bad flags, short or invalid topic, properties): the general
    path decodes it and raises the right error. The record keeps `packet` as its `raw`."""
    flags = packet[0] & 0x0F
    end = len(packet)
    qos = (flags >> 1) & 0x03
    if qos == 3 or (flags & 0x08 and not qos) or pos + 2 > end:
        return None
    topic_end = pos + 2 + ((packet[pos] << 8) | packet[pos + 1])
    body = topic_end + 2 if qos else topic_end
    if v5:
        if body >= end or packet[body]:
            return None
        body += 1
    if body > end or topic_end == pos + 2:
        return None
    name = packet[pos + 2 : topic_end]
    topic = _TOPIC_NAMES.get(name)
    if topic is None:
        try:
            topic = name.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if "\x00" in topic or "+" in topic or "#" in topic:
            return None
        if len(name) <= TOPIC_NAME_CACHE_BYTES:
            if len(_TOPIC_NAMES) >= TOPIC_NAME_CACHE_ENTRIES:
                _TOPIC_NAMES.clear()
            _TOPIC_NAMES[name] = topic
    packet_id = None
    if qos:
        packet_id = (packet[topic_end] << 8) | packet[topic_end + 1]
        if not packet_id:
            return None
    publish = Publish(
        topic,
        packet[body:],
        qos,
        bool(flags & 0x01),
        bool(flags & 0x08),
        packet_id,
        EMPTY_PROPERTIES,
    )
    # Not an __init__ argument (see Publish.raw); the record is frozen to mypy only.
    publish.raw = packet  # type: ignore[misc]
    return publish


def publish_forward_parts(raw: bytes, retain: bool) -> tuple[bytes, bytes]:
    """A received PUBLISH (`Publish.raw`) as it is forwarded at its own QoS and protocol level:
    DUP cleared (a first delivery, [MQTT-3.3.1-3]), RETAIN as given; at QoS > 0 in two parts,
    the new packet identifier goes between them (section 3.3.2). At QoS 0 the second part is
    empty and the first is `raw` itself when nothing changed."""
    first = raw[0]
    wanted = (first & 0xF6) | int(retain)
    if not first & 0x06:
        return (raw if first == wanted else bytes((wanted,)) + raw[1:]), b""
    index = 1
    while raw[index] & 0x80:
        index += 1
    split = index + 3 + ((raw[index + 1] << 8) | raw[index + 2])
    return bytes((wanted,)) + raw[1:split], raw[split + 2 :]


_ACK_CLASSES: Final[dict[PacketType, type[Puback | Pubrec | Pubrel | Pubcomp]]] = {
    PacketType.PUBACK: Puback,
    PacketType.PUBREC: Pubrec,
    PacketType.PUBREL: Pubrel,
    PacketType.PUBCOMP: Pubcomp,
}


def _optional_reason(reader: Reader, packet_type: PacketType, v5: bool) -> tuple[int, Properties]:
    """A 5.0 reason code and properties that may be left out (0x00 and none when absent)."""
    code = 0
    properties = EMPTY_PROPERTIES
    if v5 and reader.remaining():
        code = reader.u8("the reason code")
        _check_reason(packet_type, code)
        if reader.remaining():
            properties = decode_properties(reader, packet_type)
    return code, properties


def _decode_ack(
    reader: Reader, packet_type: PacketType, v5: bool
) -> Puback | Pubrec | Pubrel | Pubcomp:
    packet_id = _check_packet_id(reader.u16("the packet identifier"))
    # 5.0 section 3.4.2.1: the reason code and properties may be left out.
    code, properties = _optional_reason(reader, packet_type, v5)
    _done(reader, packet_type)
    return _ACK_CLASSES[packet_type](packet_id, code, properties)


def _decode_subscribe(reader: Reader, v5: bool) -> Subscribe:
    packet_id = _check_packet_id(reader.u16("the packet identifier"))
    properties = decode_properties(reader, PacketType.SUBSCRIBE) if v5 else EMPTY_PROPERTIES
    subscriptions = []
    reserved = 0xC0 if v5 else 0xFC
    while reader.remaining():
        topic_filter = reader.string("a topic filter")
        options = reader.u8("the subscription options")
        if options & reserved:
            raise malformed("reserved subscription option bits are set")  # [MQTT-3.8.3-5]
        qos = options & 0x03
        if qos == 3:
            raise malformed("subscription with QoS 3")
        no_local = bool(options & 0x04)
        retain_handling = (options >> 4) & 0x03
        if retain_handling == 3:
            raise protocol_error("retain handling 3")  # 5.0 section 3.8.3.1
        if no_local and topic_filter.startswith(SHARED_SUBSCRIPTION_PREFIX):
            raise protocol_error("no local on a shared subscription")  # [MQTT-3.8.3-4]
        subscriptions.append(
            Subscription(topic_filter, qos, no_local, bool(options & 0x08), retain_handling)
        )
    if not subscriptions:
        raise protocol_error("SUBSCRIBE without subscriptions")  # [MQTT-3.8.3-2]
    return Subscribe(packet_id, tuple(subscriptions), properties)


def _decode_suback(reader: Reader, v5: bool) -> Suback:
    packet_id = _check_packet_id(reader.u16("the packet identifier"))
    properties = decode_properties(reader, PacketType.SUBACK) if v5 else EMPTY_PROPERTIES
    codes = tuple(reader.rest())
    if not codes:
        raise protocol_error("SUBACK without reason codes")
    allowed = _REASONS[PacketType.SUBACK] if v5 else _SUBACK_311
    for code in codes:
        if code not in allowed:
            raise protocol_error(f"reason code 0x{code:02X} is not valid in SUBACK")
    return Suback(packet_id, codes, properties)


def _decode_unsubscribe(reader: Reader, v5: bool) -> Unsubscribe:
    packet_id = _check_packet_id(reader.u16("the packet identifier"))
    properties = decode_properties(reader, PacketType.UNSUBSCRIBE) if v5 else EMPTY_PROPERTIES
    topic_filters = []
    while reader.remaining():
        topic_filters.append(reader.string("a topic filter"))
    if not topic_filters:
        raise protocol_error("UNSUBSCRIBE without topic filters")  # [MQTT-3.10.3-2]
    return Unsubscribe(packet_id, tuple(topic_filters), properties)


def _decode_unsuback(reader: Reader, v5: bool) -> Unsuback:
    packet_id = _check_packet_id(reader.u16("the packet identifier"))
    if not v5:
        _done(reader, PacketType.UNSUBACK)
        return Unsuback(packet_id)
    properties = decode_properties(reader, PacketType.UNSUBACK)
    codes = tuple(reader.rest())
    if not codes:
        raise protocol_error("UNSUBACK without reason codes")
    for code in codes:
        _check_reason(PacketType.UNSUBACK, code)
    return Unsuback(packet_id, codes, properties)


def _decode_disconnect_or_auth(
    reader: Reader, packet_type: PacketType, v5: bool
) -> Disconnect | Auth:
    # 5.0 sections 3.14.2.1 and 3.15.2.1: with Remaining Length 0 the reason code is 0x00.
    code, properties = _optional_reason(reader, packet_type, v5)
    _done(reader, packet_type)
    if packet_type == PacketType.AUTH:
        return Auth(code, properties)
    return Disconnect(code, properties)


class MQTTDecoder:
    """Turns a byte stream into MQTT packets: `feed` bytes, then call `next_event` until it
    returns `NEED_DATA`. A decoder that has raised keeps raising the same error."""

    __slots__ = (
        "_buffer",
        "_connect_seen",
        "_error",
        "_offset",
        "max_packet_size",
        "protocol_level",
    )

    def __init__(
        self, max_packet_size: int = MAX_PACKET_SIZE, protocol_level: int | None = None
    ) -> None:
        if protocol_level is not None and protocol_level not in _PROTOCOL_NAMES:
            raise ValueError(f"unsupported protocol level {protocol_level}")
        self.max_packet_size = max_packet_size
        self.protocol_level = protocol_level
        self._buffer = bytearray()
        self._offset = 0
        self._error: MQTTProtocolError | None = None
        self._connect_seen = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        if self._offset > _COMPACT_AFTER and self._offset * 2 > len(buffer):
            del buffer[: self._offset]
            self._offset = 0
        buffer += data

    @property
    def trailing_data(self) -> bytes:
        """Bytes received but not yet returned as a packet."""
        return bytes(self._buffer[self._offset :])

    def next_event(self) -> Packet | Literal[NeedData.NEED_DATA]:
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except MQTTProtocolError as error:
            if error.protocol_level is None:
                error.protocol_level = self.protocol_level
            self._error = error
            raise

    def _next_event(self) -> Packet | Literal[NeedData.NEED_DATA]:
        buffer = self._buffer
        start = self._offset
        available = len(buffer) - start
        if available == 0:
            return NEED_DATA
        first = buffer[start]
        # PUBLISH after CONNECT, the common packet, needs none of _check_first_byte's checks
        # (any flags are allowed there; the PUBLISH decoders check them).
        if first >> 4 == 3 and self.protocol_level is not None:
            packet_type = PacketType.PUBLISH
        else:
            if available >= 2 and buffer[start + 1] == 0 and self.protocol_level is not None:
                bodiless = _BODILESS.get(first)
                if bodiless is not None:
                    if available == 2:
                        buffer.clear()
                        self._offset = 0
                    else:
                        self._offset = start + 2
                    return bodiless()
            packet_type = self._check_first_byte(first)
        if available < 2:
            return NEED_DATA
        # Remaining Length: one byte up to 127 (most packets, without the loop); otherwise
        # read only the bytes that are here, and a fifth byte is an error.
        length = buffer[start + 1]
        index = 2
        if length & 0x80:
            length &= 0x7F
            while True:
                if index >= available:
                    return NEED_DATA
                byte = buffer[start + index]
                length |= (byte & 0x7F) << (7 * (index - 1))
                index += 1
                if not byte & 0x80:
                    if byte == 0:
                        raise malformed("remaining length is not in its shortest form")
                    break
                if index > REMAINING_LENGTH_MAX_BYTES:
                    raise malformed(
                        f"remaining length longer than {REMAINING_LENGTH_MAX_BYTES} bytes"
                    )
        total = index + length
        if total > self.max_packet_size:
            raise MQTTProtocolError(
                ReasonCode.PACKET_TOO_LARGE,
                f"{packet_type.name} of {total} bytes exceeds {self.max_packet_size}",
            )
        if available < total:
            return NEED_DATA
        packet: Packet | None = None
        if total <= RAW_PUBLISH_MAX:
            # The usual PUBLISH and CONNECT straight from one copy of the packet (bounded);
            # a PUBLISH keeps it as Publish.raw, its payload sliced from it. None: unusual,
            # the general path below decodes it (and raises the right error).
            if packet_type is PacketType.PUBLISH and self.protocol_level is not None:
                packet = _decode_publish_fast(
                    bytes(buffer[start : start + total]), index, self.protocol_level >= _MQTT_5
                )
            elif packet_type is PacketType.CONNECT:
                packet = _decode_connect_fast(bytes(buffer[start : start + total]), index)
        if packet is None:
            with memoryview(buffer) as view:
                reader = Reader(view, start + index, start + total)
                try:
                    packet = self._decode(reader, packet_type, first & 0x0F)
                finally:
                    reader.view = memoryview(b"")
        if packet_type is PacketType.CONNECT and isinstance(packet, Connect):
            self._connect_seen = True
            self.protocol_level = packet.protocol_level
        if start + total == len(buffer):
            buffer.clear()
            self._offset = 0
        else:
            self._offset = start + total
        return packet

    def _check_first_byte(self, first: int) -> PacketType:
        type_value, flags = first >> 4, first & 0x0F
        if type_value == 0 or (
            type_value == PacketType.AUTH
            and self.protocol_level is not None
            and self.protocol_level < _MQTT_5
        ):
            raise malformed(f"reserved packet type {type_value}")
        packet_type = _PACKET_TYPES[type_value]
        if packet_type != PacketType.PUBLISH and flags != _FLAGS.get(packet_type, 0):
            raise malformed(f"invalid fixed header flags 0x{flags:X} for {packet_type.name}")
        if packet_type == PacketType.CONNECT:
            if self._connect_seen:
                raise protocol_error("second CONNECT")  # [MQTT-3.1.0-2]
        elif self.protocol_level is None:
            raise protocol_error(f"{packet_type.name} before CONNECT")  # [MQTT-3.1.0-1]
        return packet_type

    def _decode(self, reader: Reader, packet_type: PacketType, flags: int) -> Packet:
        if packet_type == PacketType.CONNECT:
            return _decode_connect(reader)  # _next_event takes its level
        v5 = self.protocol_level is not None and self.protocol_level >= _MQTT_5
        if packet_type == PacketType.PUBLISH:
            return _decode_publish(reader, flags, v5)
        if packet_type in _ACK_CLASSES:
            return _decode_ack(reader, packet_type, v5)
        if packet_type == PacketType.CONNACK:
            return _decode_connack(reader, v5)
        if packet_type == PacketType.SUBSCRIBE:
            return _decode_subscribe(reader, v5)
        if packet_type == PacketType.SUBACK:
            return _decode_suback(reader, v5)
        if packet_type == PacketType.UNSUBSCRIBE:
            return _decode_unsubscribe(reader, v5)
        if packet_type == PacketType.UNSUBACK:
            return _decode_unsuback(reader, v5)
        if packet_type in (PacketType.PINGREQ, PacketType.PINGRESP):
            _done(reader, packet_type)
            return Pingreq() if packet_type == PacketType.PINGREQ else Pingresp()
        return _decode_disconnect_or_auth(reader, packet_type, v5)


# --- encoding ------------------------------------------------------------------------------


def encode(packet: Packet, protocol_level: int) -> bytes:
    """The wire bytes of `packet` at `protocol_level` (3, 4 or 5).

    For levels 3 and 4, properties and reason codes that have no place on that wire are
    dropped, SUBACK failures become 0x80 and a 5.0 CONNACK refusal becomes its 3.1.1 return
    code. Misuse (a value the wire cannot carry) raises ValueError.
    """
    if protocol_level not in _PROTOCOL_NAMES:
        raise ValueError(f"unsupported protocol level {protocol_level}")
    v5 = protocol_level >= _MQTT_5
    if type(packet) is Publish:
        return _encode_publish_direct(packet, v5)
    flags = 0
    parts: list[bytes]
    if isinstance(packet, Publish):
        flags, parts = _encode_publish(packet, v5)
    elif isinstance(packet, Puback | Pubrec | Pubrel | Pubcomp):
        flags = _FLAGS.get(packet.packet_type, 0)
        parts = [encode_u16(_packet_id(packet.packet_id))]
        if v5 and (packet.reason_code or packet.properties != EMPTY_PROPERTIES):
            parts.append(bytes((packet.reason_code,)))
            if packet.properties != EMPTY_PROPERTIES:
                parts.append(encode_properties(packet.properties, packet.packet_type))
    elif isinstance(packet, Connect):
        parts = _encode_connect(packet, protocol_level)
    elif isinstance(packet, Connack):
        code = packet.reason_code
        if not v5 and code > max(ConnackReturnCode311):
            code = connack_code_for(protocol_level, code)
        parts = [bytes((int(packet.session_present), code))]
        if v5:
            parts.append(encode_properties(packet.properties, PacketType.CONNACK))
    elif isinstance(packet, Subscribe):
        flags = _FLAGS[PacketType.SUBSCRIBE]
        parts = [encode_u16(_packet_id(packet.packet_id))]
        if v5:
            parts.append(encode_properties(packet.properties, PacketType.SUBSCRIBE))
        if not packet.subscriptions:
            raise ValueError("SUBSCRIBE needs at least one subscription")
        for subscription in packet.subscriptions:
            parts.append(encode_string(subscription.topic_filter))
            parts.append(bytes((_subscription_options(subscription, v5),)))
    elif isinstance(packet, Suback):
        parts = [encode_u16(_packet_id(packet.packet_id))]
        if v5:
            parts.append(encode_properties(packet.properties, PacketType.SUBACK))
            parts.append(bytes(packet.reason_codes))
        else:
            parts.append(bytes(code if code < 0x80 else 0x80 for code in packet.reason_codes))
    elif isinstance(packet, Unsubscribe):
        flags = _FLAGS[PacketType.UNSUBSCRIBE]
        parts = [encode_u16(_packet_id(packet.packet_id))]
        if v5:
            parts.append(encode_properties(packet.properties, PacketType.UNSUBSCRIBE))
        if not packet.topic_filters:
            raise ValueError("UNSUBSCRIBE needs at least one topic filter")
        parts.extend(encode_string(topic_filter) for topic_filter in packet.topic_filters)
    elif isinstance(packet, Unsuback):
        parts = [encode_u16(_packet_id(packet.packet_id))]
        if v5:
            parts.append(encode_properties(packet.properties, PacketType.UNSUBACK))
            parts.append(bytes(packet.reason_codes))
    elif isinstance(packet, Pingreq | Pingresp):
        parts = []
    elif isinstance(packet, Disconnect | Auth):
        if isinstance(packet, Auth) and not v5:
            raise ValueError("AUTH exists only in MQTT 5.0")
        parts = []
        if v5 and (packet.reason_code or packet.properties != EMPTY_PROPERTIES):
            parts.append(bytes((packet.reason_code,)))
            if packet.properties != EMPTY_PROPERTIES:
                parts.append(encode_properties(packet.properties, packet.packet_type))
    else:
        raise TypeError(f"not an MQTT packet: {packet!r}")
    length = sum(len(part) for part in parts)
    if length > MAX_REMAINING_LENGTH:
        raise ValueError(f"packet body of {length} bytes exceeds {MAX_REMAINING_LENGTH}")
    header = bytes(((packet.packet_type << 4) | flags,)) + encode_variable_byte_integer(length)
    return b"".join((header, *parts))


def _packet_id(packet_id: int) -> int:
    if not 1 <= packet_id <= 0xFFFF:
        raise ValueError(f"packet identifier out of range: {packet_id}")
    return packet_id


def _check_qos(qos: int) -> int:
    if qos not in (0, 1, 2):
        raise ValueError(f"invalid QoS {qos}")
    return qos


def _encode_publish(packet: Publish, v5: bool) -> tuple[int, list[bytes]]:
    qos = _check_qos(packet.qos)
    if (packet.packet_id is None) != (qos == 0):
        raise ValueError("PUBLISH needs a packet identifier exactly when QoS > 0")
    if packet.dup and not qos:
        raise ValueError("DUP must be 0 at QoS 0")
    flags = (packet.dup << 3) | (qos << 1) | int(packet.retain)
    parts = [encode_string(packet.topic)]
    if packet.packet_id is not None:
        parts.append(encode_u16(_packet_id(packet.packet_id)))
    if v5:
        parts.append(encode_properties(packet.properties, PacketType.PUBLISH))
    parts.append(packet.payload)
    return flags, parts


def _encode_publish_direct(packet: Publish, v5: bool) -> bytes:
    """PUBLISH in one join, without the generic part list: every routed message is encoded
    at least once (bench/README.md, broker section). Same bytes and errors as the general
    path, which it uses for the checks that fail."""
    qos = packet.qos
    packet_id = packet.packet_id
    if qos not in (0, 1, 2) or (packet_id is None) != (qos == 0) or (packet.dup and not qos):
        _encode_publish(packet, v5)  # raises the ValueError that names the problem
    topic = encode_string(packet.topic)
    ident = b"" if packet_id is None else encode_u16(_packet_id(packet_id))
    properties = packet.properties
    if not v5:
        encoded_properties = b""
    elif properties is EMPTY_PROPERTIES:
        encoded_properties = b"\x00"
    else:
        encoded_properties = encode_properties(properties, PacketType.PUBLISH)
    payload = packet.payload
    length = len(topic) + len(ident) + len(encoded_properties) + len(payload)
    first = 0x30 | (packet.dup << 3) | (qos << 1) | int(packet.retain)
    if length < 0x80:
        header = bytes((first, length))
    elif length > MAX_REMAINING_LENGTH:
        raise ValueError(f"packet body of {length} bytes exceeds {MAX_REMAINING_LENGTH}")
    else:
        header = bytes((first,)) + encode_variable_byte_integer(length)
    return b"".join((header, topic, ident, encoded_properties, payload))


def _subscription_options(subscription: Subscription, v5: bool) -> int:
    options = _check_qos(subscription.qos)
    if v5:
        if not 0 <= subscription.retain_handling <= 2:
            raise ValueError(f"invalid retain handling {subscription.retain_handling}")
        options |= (
            (subscription.no_local << 2)
            | (subscription.retain_as_published << 3)
            | (subscription.retain_handling << 4)
        )
    return options


def _encode_connect(packet: Connect, protocol_level: int) -> list[bytes]:
    if packet.protocol_level != protocol_level:
        raise ValueError(
            f"CONNECT is level {packet.protocol_level}, encoded at level {protocol_level}"
        )
    v5 = protocol_level >= _MQTT_5
    will = packet.will
    if packet.password is not None and packet.username is None and not v5:
        raise ValueError("MQTT 3.1.1 has no password without a user name")
    flags = (
        (packet.clean_start << 1)
        | ((will is not None) << 2)
        | ((packet.username is not None) << 7)
        | ((packet.password is not None) << 6)
    )
    if will is not None:
        flags |= (_check_qos(will.qos) << 3) | (will.retain << 5)
    parts = [
        encode_string(packet.protocol_name),
        bytes((protocol_level, flags)),
        encode_u16(packet.keep_alive),
    ]
    if v5:
        parts.append(encode_properties(packet.properties, PacketType.CONNECT))
    parts.append(encode_string(packet.client_id))
    if will is not None:
        if v5:
            parts.append(encode_properties(will.properties, WILL_PROPERTIES))
        parts.append(encode_string(will.topic))
        parts.append(encode_binary(will.payload))
    if packet.username is not None:
        parts.append(encode_string(packet.username))
    if packet.password is not None:
        parts.append(encode_binary(packet.password))
    return parts
