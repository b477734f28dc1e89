"""What a protocol writes during one loop turn, handed to its transport as one write.

A client connection (broker.listener) and a cluster link (broker.cluster) both queue their
packets and frames in ``_out`` and write them together at the end of the turn (or at once
past their own bound, so the transport's buffer limits still pause the writers): one send,
and on TLS one record, per turn instead of one per packet. Each class does its own queueing
step (its checks and bound differ, and that step runs per packet); the write and the drop at
connection loss are these two functions, which the classes take as methods.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

__all__ = ["drop_unwritten", "flush"]


class Queued(Protocol):
    """What the protocol keeps (in its own __slots__): the queued bytes objects, their
    size, and the flush scheduled for the end of the turn (or None)."""

    transport: asyncio.Transport | None
    _out: list[bytes]
    _out_bytes: int
    _flush_handle: asyncio.Handle | None


def flush(queued: Queued) -> bool:
    """Write what is queued in one write; True when something was written."""
    handle = queued._flush_handle
    if handle is not None:
        handle.cancel()
        queued._flush_handle = None
    out = queued._out
    if not out:
        return False
    data = out[0] if len(out) == 1 else b"".join(out)
    out.clear()
    queued._out_bytes = 0
    transport = queued.transport
    if transport is None:
        return False
    transport.write(data)
    return True


def drop_unwritten(queued: Queued) -> None:
    """The connection is gone: nothing queued is written."""
    handle = queued._flush_handle
    if handle is not None:
        handle.cancel()
        queued._flush_handle = None
    queued._out.clear()
    queued._out_bytes = 0
