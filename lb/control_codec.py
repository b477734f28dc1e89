"""The frames of lb's control channel (lb.control), sans-IO.

A frame is a 4-byte big-endian length, then a UTF-8 JSON object whose "t" names the
message (lb.control lists them). `encode` is a pure function; `FrameDecoder` has the shape
of every codec here (STYLE.md rule 2): `feed(data)`, `next_event()` (a message, or
NEED_DATA), and `trailing_data`, the bytes that are not a whole frame yet. A frame longer
than MAX_FRAME is refused from its header, before its body is buffered; a decoder that
has refused a frame accepts nothing more (ControlProtocolError).
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any, Final, Literal

#: One control message at most (a `show sess` answer of very many sessions is the largest).
MAX_FRAME = 64 * 1024 * 1024
#: Frame header: the length of the JSON body.
HEADER = struct.Struct(">I")

Message = dict[str, Any]


class ControlProtocolError(Exception):
    """A control frame that cannot be decoded: the peer is not a well-behaved lb process."""


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


#: What `next_event` answers until a whole frame has been fed (h11's sentinel).
NEED_DATA: Final = _NeedData.NEED_DATA
NeedData = Literal[_NeedData.NEED_DATA]


def encode(message: Message) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ControlProtocolError(f"control message of {len(body)} bytes is too large")
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Sans-IO: `feed(bytes)`, then `next_event()` until it answers NEED_DATA."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.failed = False

    @property
    def trailing_data(self) -> bytes:
        """What was fed and is not a whole frame yet."""
        return bytes(self.buffer)

    def feed(self, data: bytes) -> None:
        if self.failed:
            raise ControlProtocolError("decoder has failed")
        self.buffer.extend(data)

    def next_event(self) -> Message | NeedData:
        if self.failed:
            # The frames after a refused one are not read: the peer is not trusted any more.
            raise ControlProtocolError("decoder has failed")
        if len(self.buffer) < HEADER.size:
            return NEED_DATA
        (length,) = HEADER.unpack_from(self.buffer)
        if length > MAX_FRAME:
            self.failed = True
            raise ControlProtocolError(f"control frame of {length} bytes is too large")
        if len(self.buffer) < HEADER.size + length:
            return NEED_DATA
        body = bytes(self.buffer[HEADER.size : HEADER.size + length])
        del self.buffer[: HEADER.size + length]
        try:
            message = json.loads(body)
        except ValueError as error:
            self.failed = True
            raise ControlProtocolError(f"control frame is not JSON: {error}") from None
        except RecursionError:
            # json nests by recursion: about a thousand "[" are enough to reach the limit.
            self.failed = True
            raise ControlProtocolError("control frame nests JSON too deeply") from None
        if not isinstance(message, dict) or not isinstance(message.get("t"), str):
            self.failed = True
            raise ControlProtocolError("control frame is not a message")
        return message
