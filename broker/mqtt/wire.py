"""MQTT data representation: integers, Variable Byte Integers, UTF-8 strings, binary data.

MQTT 5.0 section 1.5 (3.1.1 section 1.5): big-endian Two/Four Byte Integers, the Variable
Byte Integer of at most four bytes in its shortest form [MQTT-1.5.5-1], UTF-8 Encoded Strings
that are well-formed and hold no U+0000 [MQTT-1.5.4-1, -2], and length-prefixed Binary Data.
Reading past the end of a packet, or any of these rules broken, is a Malformed Packet.
"""

from __future__ import annotations

import struct
from typing import Final

from .packets import MQTTProtocolError, ReasonCode

# 5.0 section 1.5.5 / 3.1.1 section 2.2.3: four bytes of seven bits each.
MAX_VARIABLE_BYTE_INTEGER: Final = 268_435_455
VARIABLE_BYTE_INTEGER_MAX_BYTES: Final = 4
# 5.0 section 1.5.4: the string length prefix is a Two Byte Integer.
MAX_STRING_BYTES: Final = 65_535

_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")


def malformed(message: str) -> MQTTProtocolError:
    return MQTTProtocolError(ReasonCode.MALFORMED_PACKET, message)


def protocol_error(message: str) -> MQTTProtocolError:
    return MQTTProtocolError(ReasonCode.PROTOCOL_ERROR, message)


class Reader:
    """A cursor over one packet's body; every read checks the end of the packet."""

    __slots__ = ("end", "pos", "view")

    def __init__(self, view: memoryview, pos: int, end: int) -> None:
        self.view = view
        self.pos = pos
        self.end = end

    def remaining(self) -> int:
        return self.end - self.pos

    def _need(self, count: int, what: str) -> int:
        start = self.pos
        if start + count > self.end:
            raise malformed(f"packet ends inside {what}")
        self.pos = start + count
        return start

    def u8(self, what: str = "a byte") -> int:
        return self.view[self._need(1, what)]

    def u16(self, what: str = "a two byte integer") -> int:
        value: int = _U16.unpack_from(self.view, self._need(2, what))[0]
        return value

    def u32(self, what: str = "a four byte integer") -> int:
        value: int = _U32.unpack_from(self.view, self._need(4, what))[0]
        return value

    def variable_byte_integer(self, what: str = "a variable byte integer") -> int:
        value = 0
        for index in range(VARIABLE_BYTE_INTEGER_MAX_BYTES):
            byte = self.u8(what)
            value |= (byte & 0x7F) << (7 * index)
            if not byte & 0x80:
                if byte == 0 and index:
                    raise malformed(f"{what} is not in its shortest form")
                return value
        raise malformed(f"{what} is longer than {VARIABLE_BYTE_INTEGER_MAX_BYTES} bytes")

    def binary(self, what: str = "binary data") -> bytes:
        size = self.u16(what)
        start = self._need(size, what)
        return bytes(self.view[start : start + size])

    def string(self, what: str = "a string") -> str:
        size = self.u16(what)
        start = self._need(size, what)
        try:
            text = str(self.view[start : start + size], "utf-8")
        except UnicodeDecodeError:
            raise malformed(f"{what} is not well-formed UTF-8") from None
        if "\x00" in text:
            raise malformed(f"{what} contains U+0000")
        return text

    def rest(self) -> bytes:
        start, self.pos = self.pos, self.end
        return bytes(self.view[start : self.end])


def encode_variable_byte_integer(value: int) -> bytes:
    if not 0 <= value <= MAX_VARIABLE_BYTE_INTEGER:
        raise ValueError(f"variable byte integer out of range: {value}")
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while True:
        value, byte = value >> 7, value & 0x7F
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_u16(value: int) -> bytes:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"two byte integer out of range: {value}")
    return _U16.pack(value)


def encode_u32(value: int) -> bytes:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"four byte integer out of range: {value}")
    return _U32.pack(value)


def encode_binary(data: bytes) -> bytes:
    if len(data) > MAX_STRING_BYTES:
        raise ValueError(f"binary data longer than {MAX_STRING_BYTES} bytes")
    return _U16.pack(len(data)) + data


def encode_string(text: str) -> bytes:
    if "\x00" in text:
        raise ValueError("MQTT strings cannot contain U+0000")
    return encode_binary(text.encode("utf-8"))
