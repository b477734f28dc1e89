"""Per-connection timeouts in slots: one loop timer per listener, not one per connection.

A connection's timer as a loop ``call_later`` costs a TimerHandle, its libuv timer and a
bound method: about 540-600 B per connection (bench/idle_memory.py for lb's sessions,
tracemalloc in bench/README.md's broker section), and a handle per re-arm. Here a timer is an
entry in the set of its slot (``RESOLUTION`` seconds wide); one loop timer waits for the
earliest slot, and when it comes each of the slot's owners is called and checks its own
deadline (it may take a later slot). A timer therefore fires up to one slot late, never
early. lb's sessions (idle timeouts, lb.datapath) and the broker's connections (PROXY
header, CONNECT and keep alive timeouts, broker.listener) use it: a leaf the broker may
import.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from typing import Generic, Protocol, TypeVar

__all__ = ["RESOLUTION", "TimerWheel", "WheelTimer"]

logger = logging.getLogger(__name__)

#: Slot width in seconds: how late a timer may fire.
RESOLUTION = 0.05


class WheelTimer(Protocol):
    """What the wheel needs of an owner: where its entry is, and what to call."""

    wheel_slot: int | None

    def wheel_fired(self) -> None: ...


OwnerT = TypeVar("OwnerT", bound=WheelTimer)


class TimerWheel(Generic[OwnerT]):
    """One owner has at most one entry; ``add`` moves it, ``discard`` drops it."""

    __slots__ = ("armed", "handle", "loop", "order", "slots")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.slots: dict[int, set[OwnerT]] = {}
        self.order: list[int] = []  # heap of the slot numbers in `slots`
        self.handle: asyncio.TimerHandle | None = None
        self.armed: int | None = None  # the slot `handle` fires for

    def add(self, owner: OwnerT, deadline: float) -> None:
        """Call ``owner.wheel_fired()`` at the end of the slot holding ``deadline``."""
        self.discard(owner)
        slot = math.ceil(deadline / RESOLUTION)
        bucket = self.slots.get(slot)
        if bucket is None:
            bucket = self.slots[slot] = set()
            heapq.heappush(self.order, slot)
            if self.armed is None or slot < self.armed:
                if self.handle is not None:
                    self.handle.cancel()
                self.armed = slot
                self.handle = self.loop.call_at(slot * RESOLUTION, self._fire)
        bucket.add(owner)
        owner.wheel_slot = slot

    def discard(self, owner: OwnerT) -> None:
        slot = owner.wheel_slot
        if slot is not None:
            owner.wheel_slot = None
            bucket = self.slots.get(slot)
            if bucket is not None:
                bucket.discard(owner)  # an empty slot is dropped when it comes

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.armed = None

    def _fire(self) -> None:
        self.handle = None
        self.armed = None
        now = self.loop.time() / RESOLUTION + 0.02  # call_at rounds to milliseconds
        due: list[set[OwnerT]] = []
        order = self.order
        while order and order[0] <= now:
            bucket = self.slots.pop(heapq.heappop(order), None)
            if bucket:
                due.append(bucket)
        # Owners that take a later slot while these run are added after `due` was taken.
        for bucket in due:
            for owner in bucket:
                owner.wheel_slot = None
                try:
                    owner.wheel_fired()
                except Exception:
                    # One owner's failure must not stop every later timeout of the wheel.
                    self.failed(owner)
        if order and self.armed is None:
            self.armed = order[0]
            self.handle = self.loop.call_at(order[0] * RESOLUTION, self._fire)

    def failed(self, owner: OwnerT) -> None:
        """``owner.wheel_fired()`` raised (called in the ``except``): logged with its
        traceback; a subclass may also end the owner."""
        logger.exception("timer of %r failed", owner)
