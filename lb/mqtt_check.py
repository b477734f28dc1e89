"""The few MQTT bytes `option mqtt-chk` needs (ours), sans-IO: CONNECT, CONNACK, DISCONNECT.

lb speaks no MQTT otherwise and must not import the broker's codec (lb never imports
broker), so this is the small subset, from the specifications:

- MQTT 3.1.1 (OASIS, 2014) section 3.1 CONNECT: fixed header 0x10, protocol name "MQTT",
  level 4, flags (clean session 0x02), keep alive, client id; section 3.2 CONNACK: 0x20, 2,
  session present, return code (table 3.1: 0 accepted, 1..5 refused);
- MQTT 5.0 (OASIS, 2019) section 3.1: level 5 and a property length (0 here); section 3.2:
  CONNACK with a reason code (table 3-1: 0x00 success, 0x80 and above refused) and
  properties; section 3.14: DISCONNECT 0xE0 0x00 (normal disconnection).

A CONNACK is parsed whole or not at all: ``parse_connack`` returns NEED_MORE until the
fixed header's remaining length is in, then the code, or raises ``ConnackError`` for bytes
that are not a CONNACK.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "MQTT_CHECK_KEEPALIVE",
    "NEED_MORE",
    "Connack",
    "ConnackError",
    "connack_rule",
    "connack_words",
    "encode_connect",
    "encode_disconnect",
    "expected_connack",
    "parse_connack",
]

#: Seconds; the check disconnects at once, any value the broker takes will do.
MQTT_CHECK_KEEPALIVE: Final = 10
#: Section 2.2.3 (both versions): the remaining length is at most four bytes.
_MAX_LENGTH_BYTES: Final = 4
#: A CONNACK bigger than this is not one a broker sends a client that asked for nothing.
MAX_CONNACK: Final = 4096
NEED_MORE: Final = "need more"

#: MQTT 3.1.1 table 3.1, the CONNACK return codes.
RETURN_CODES: Final = {
    0: "Connection Accepted",
    1: "Connection Refused, unacceptable protocol version",
    2: "Connection Refused, identifier rejected",
    3: "Connection Refused, Server unavailable",
    4: "Connection Refused, bad user name or password",
    5: "Connection Refused, not authorized",
}
#: MQTT 5.0 table 3-1, the CONNACK reason codes.
REASON_CODES: Final = {
    0x00: "Success",
    0x80: "Unspecified error",
    0x81: "Malformed Packet",
    0x82: "Protocol Error",
    0x83: "Implementation specific error",
    0x84: "Unsupported Protocol Version",
    0x85: "Client Identifier not valid",
    0x86: "Bad User Name or Password",
    0x87: "Not authorized",
    0x88: "Server unavailable",
    0x89: "Server busy",
    0x8A: "Banned",
    0x8C: "Bad authentication method",
    0x90: "Topic Name invalid",
    0x95: "Packet too large",
    0x97: "Quota exceeded",
    0x99: "Payload format invalid",
    0x9A: "Retain not supported",
    0x9B: "QoS not supported",
    0x9C: "Use another server",
    0x9D: "Server moved",
    0x9F: "Connection rate exceeded",
}

Level = Literal[4, 5]


class ConnackError(Exception):
    """The peer answered something that is not a CONNACK."""


@dataclass(frozen=True, slots=True)
class Connack:
    level: int
    session_present: bool
    code: int

    @property
    def accepted(self) -> bool:
        return self.code == 0

    @property
    def words(self) -> str:
        return connack_words(self.level, self.code)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def encode_connect(level: int, client_id: str, keepalive: int) -> bytes:
    """A CONNECT with a clean start, no will, no credentials (and no 5.0 properties)."""
    identifier = client_id.encode("utf-8")
    variable = b"\x00\x04MQTT" + bytes((level, 0x02)) + keepalive.to_bytes(2, "big")
    if level >= 5:
        variable += b"\x00"  # property length 0
    payload = len(identifier).to_bytes(2, "big") + identifier
    body = variable + payload
    return b"\x10" + _varint(len(body)) + body


def encode_disconnect(level: int) -> bytes:
    """DISCONNECT; in 5.0 a remaining length of 0 means reason 0x00, normal disconnection."""
    del level
    return b"\xe0\x00"


def expected_connack(level: int) -> bytes:
    """The CONNACK of an accepted clean start without properties (what `tcp-check expect
    binary` can match for 3.1.1; a 5.0 broker usually adds properties)."""
    return b"\x20\x02\x00\x00" if level < 5 else b"\x20\x03\x00\x00\x00"


def connack_rule(level: int) -> str:
    """What HAProxy's `tcp-check expect` needs to accept what mqtt-chk accepts: the exact
    bytes in 3.1.1; in 5.0, where brokers add properties, a CONNACK of any length that
    starts "no session, success" (rbinary matches the hex dump of what was received)."""
    if level < 5:
        return f"binary {expected_connack(level).hex()}"
    return "rbinary ^20[0-9A-F]{2}0000"


def parse_connack(data: bytes | bytearray, level: int) -> Connack | str:
    """The CONNACK at the start of `data`, NEED_MORE, or ConnackError."""
    if not data:
        return NEED_MORE
    if data[0] != 0x20:
        raise ConnackError(f"not a CONNACK: the first byte is 0x{data[0]:02X}")
    length = 0
    for position in range(1, 1 + _MAX_LENGTH_BYTES):
        if position >= len(data):
            return NEED_MORE
        byte = data[position]
        length |= (byte & 0x7F) << (7 * (position - 1))
        if not byte & 0x80:
            start = position + 1
            break
    else:
        raise ConnackError("CONNACK with a malformed remaining length")
    if length < 2 or length > MAX_CONNACK:
        raise ConnackError(f"CONNACK of {length} bytes")
    if len(data) < start + length:
        return NEED_MORE
    flags, code = data[start], data[start + 1]
    if flags & 0xFE:
        raise ConnackError(f"CONNACK with reserved flags 0x{flags:02X}")
    return Connack(level, bool(flags & 1), code)


def connack_words(level: int, code: int) -> str:
    """`CONNACK 0x87 Not authorized (MQTT 5.0)`, `CONNACK return code 5 ... (MQTT 3.1.1)`."""
    if level >= 5:
        return f"CONNACK 0x{code:02X} {REASON_CODES.get(code, 'unknown reason code')} (MQTT 5.0)"
    words = RETURN_CODES.get(code, "unknown return code")
    return f"CONNACK return code {code}: {words} (MQTT 3.1.1)"
