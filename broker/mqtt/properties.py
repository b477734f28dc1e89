"""MQTT 5.0 properties on the wire: identifiers, types, and which packet may carry which.

MQTT 5.0 section 2.2.2.2, Table 2-4, and the per-property text of sections 3.1-3.15:
an identifier not valid for its packet is a Malformed Packet; a property that is not
repeatable appearing twice, and the out-of-range values the spec names (Receive Maximum 0,
Maximum Packet Size 0, a Byte other than 0 or 1 where only those are defined, Subscription
Identifier 0, Authentication Data without an Authentication Method) are Protocol Errors;
a Topic Alias of 0 is "Topic Alias invalid" (section 3.3.2.3.4).
"""

from __future__ import annotations

from typing import Any, Final

from .packets import EMPTY_PROPERTIES, MQTTProtocolError, PacketType, Properties, ReasonCode
from .wire import (
    Reader,
    encode_binary,
    encode_string,
    encode_u16,
    encode_u32,
    encode_variable_byte_integer,
    malformed,
    protocol_error,
)

# Will Properties (5.0 section 3.1.3.2) are not a packet; they get a key of their own.
WILL_PROPERTIES: Final = 0

_P = PacketType
_BYTE, _U16, _U32, _VBI, _STRING, _BINARY, _PAIR = range(7)
_PUBLISH_LIKE = frozenset({_P.PUBLISH, WILL_PROPERTIES})
_ACKS = frozenset({_P.PUBACK, _P.PUBREC, _P.PUBREL, _P.PUBCOMP, _P.SUBACK, _P.UNSUBACK})

# identifier: (field name, data type, packets allowed) -- Table 2-4, in identifier order.
PROPERTY_TABLE: Final[dict[int, tuple[str, int, frozenset[int]]]] = {
    0x01: ("payload_format_indicator", _BYTE, _PUBLISH_LIKE),
    0x02: ("message_expiry_interval", _U32, _PUBLISH_LIKE),
    0x03: ("content_type", _STRING, _PUBLISH_LIKE),
    0x08: ("response_topic", _STRING, _PUBLISH_LIKE),
    0x09: ("correlation_data", _BINARY, _PUBLISH_LIKE),
    0x0B: ("subscription_identifiers", _VBI, frozenset({_P.PUBLISH, _P.SUBSCRIBE})),
    0x11: (
        "session_expiry_interval",
        _U32,
        frozenset({_P.CONNECT, _P.CONNACK, _P.DISCONNECT}),
    ),
    0x12: ("assigned_client_identifier", _STRING, frozenset({_P.CONNACK})),
    0x13: ("server_keep_alive", _U16, frozenset({_P.CONNACK})),
    0x15: ("authentication_method", _STRING, frozenset({_P.CONNECT, _P.CONNACK, _P.AUTH})),
    0x16: ("authentication_data", _BINARY, frozenset({_P.CONNECT, _P.CONNACK, _P.AUTH})),
    0x17: ("request_problem_information", _BYTE, frozenset({_P.CONNECT})),
    0x18: ("will_delay_interval", _U32, frozenset({WILL_PROPERTIES})),
    0x19: ("request_response_information", _BYTE, frozenset({_P.CONNECT})),
    0x1A: ("response_information", _STRING, frozenset({_P.CONNACK})),
    0x1C: ("server_reference", _STRING, frozenset({_P.CONNACK, _P.DISCONNECT})),
    0x1F: ("reason_string", _STRING, _ACKS | {_P.CONNACK, _P.DISCONNECT, _P.AUTH}),
    0x21: ("receive_maximum", _U16, frozenset({_P.CONNECT, _P.CONNACK})),
    0x22: ("topic_alias_maximum", _U16, frozenset({_P.CONNECT, _P.CONNACK})),
    0x23: ("topic_alias", _U16, frozenset({_P.PUBLISH})),
    0x24: ("maximum_qos", _BYTE, frozenset({_P.CONNACK})),
    0x25: ("retain_available", _BYTE, frozenset({_P.CONNACK})),
    0x26: ("user_properties", _PAIR, frozenset(_P) | {WILL_PROPERTIES}),
    0x27: ("maximum_packet_size", _U32, frozenset({_P.CONNECT, _P.CONNACK})),
    0x28: ("wildcard_subscription_available", _BYTE, frozenset({_P.CONNACK})),
    0x29: ("subscription_identifier_available", _BYTE, frozenset({_P.CONNACK})),
    0x2A: ("shared_subscription_available", _BYTE, frozenset({_P.CONNACK})),
}
# User Property may appear in every packet that has properties, but PINGREQ/PINGRESP have none.

SUBSCRIPTION_IDENTIFIER: Final = 0x0B
_ZERO_OR_ONE: Final = frozenset(
    name for name, kind, _ in PROPERTY_TABLE.values() if kind == _BYTE
)  # every Byte property is defined only for 0 and 1
_NOT_ZERO: Final = frozenset({"receive_maximum", "maximum_packet_size", "subscription_identifiers"})
_ENCODE_ORDER: Final = tuple(
    (ident, name, kind, allowed) for ident, (name, kind, allowed) in PROPERTY_TABLE.items()
)


def decode_properties(reader: Reader, key: int) -> Properties:
    """Read a Property Length and the properties after it, valid for packet `key`."""
    length = reader.variable_byte_integer("the property length")
    if length == 0:
        return EMPTY_PROPERTIES
    end = reader.pos + length
    if end > reader.end:
        raise malformed("the property length runs past the end of the packet")
    outer_end, reader.end = reader.end, end
    values: dict[str, Any] = {}
    user_properties: list[tuple[str, str]] = []
    subscription_identifiers: list[int] = []
    while reader.pos < end:
        ident = reader.u8("a property identifier")
        entry = PROPERTY_TABLE.get(ident)
        if entry is None:
            raise malformed(f"unknown property identifier 0x{ident:02X}")
        name, kind, allowed = entry
        if key not in allowed:
            where = "Will Properties" if key == WILL_PROPERTIES else PacketType(key).name
            raise malformed(f"property {name} is not allowed in {where}")
        value: Any
        if kind == _BYTE:
            value = reader.u8(name)
        elif kind == _U16:
            value = reader.u16(name)
        elif kind == _U32:
            value = reader.u32(name)
        elif kind == _VBI:
            value = reader.variable_byte_integer(name)
        elif kind == _STRING:
            value = reader.string(name)
        elif kind == _BINARY:
            value = reader.binary(name)
        else:
            user_properties.append((reader.string(name), reader.string(name)))
            continue
        if name in _ZERO_OR_ONE and value > 1:
            raise protocol_error(f"{name} must be 0 or 1, not {value}")
        if name in _NOT_ZERO and value == 0:
            raise protocol_error(f"{name} must not be 0")
        if ident == SUBSCRIPTION_IDENTIFIER:
            if subscription_identifiers and key != PacketType.PUBLISH:
                raise protocol_error("subscription_identifiers appears more than once")
            subscription_identifiers.append(value)
            continue
        if name in values:
            raise protocol_error(f"{name} appears more than once")
        values[name] = value
    reader.end = outer_end
    if values.get("topic_alias") == 0:
        raise MQTTProtocolError(ReasonCode.TOPIC_ALIAS_INVALID, "topic_alias must not be 0")
    if "authentication_data" in values and "authentication_method" not in values:
        raise protocol_error("authentication_data without authentication_method")
    if user_properties:
        values["user_properties"] = tuple(user_properties)
    if subscription_identifiers:
        values["subscription_identifiers"] = tuple(subscription_identifiers)
    return Properties(**values)


def encode_properties(properties: Properties, key: int) -> bytes:
    """Property Length plus the properties, in identifier order, for packet `key`."""
    if properties is EMPTY_PROPERTIES or properties == EMPTY_PROPERTIES:
        return b"\x00"
    out = bytearray()
    for ident, name, kind, allowed in _ENCODE_ORDER:
        value = getattr(properties, name)
        if value is None or value == ():
            continue
        _check_allowed(name, allowed, key)
        if kind == _VBI:  # subscription_identifiers
            for number in value:
                out.append(ident)
                out += encode_variable_byte_integer(number)
        elif kind == _PAIR:  # user_properties
            for pair_name, pair_value in value:
                out.append(ident)
                out += encode_string(pair_name)
                out += encode_string(pair_value)
        else:
            out.append(ident)
            if kind == _BYTE:
                if not 0 <= value <= 0xFF:
                    raise ValueError(f"{name} out of range: {value}")
                out.append(value)
            elif kind == _U16:
                out += encode_u16(value)
            elif kind == _U32:
                out += encode_u32(value)
            elif kind == _STRING:
                out += encode_string(value)
            else:
                out += encode_binary(value)
    return encode_variable_byte_integer(len(out)) + out


def _check_allowed(name: str, allowed: frozenset[int], key: int) -> None:
    if key not in allowed:
        where = "Will Properties" if key == WILL_PROPERTIES else PacketType(key).name
        raise ValueError(f"property {name} is not allowed in {where}")
