"""Events per second over a sliding second, counted by several processes: HAProxy's
`freq_ctr`, for `maxconnrate`, `maxsessrate`, `maxsslrate` and `rate-limit sessions`.

HAProxy keeps, per counter, the events of the current second and of the one before, and
reads the rate as ``current + previous * (share of the previous second still inside the
sliding second)``. A listener whose limit is reached stops accepting (the connections wait
in the kernel's accept backlog, none is refused) until the rate has fallen below the limit,
and then accepts no more at once than the limit leaves.

lb's workers are processes, and HAProxy's limits are per process (all its threads), so the
counts live in a block of 8-byte slots that the workers of one generation share
(lb.shared_counts maps it). A `RateWindow` is one listener's: two slots per worker, one for
even and one for odd seconds, each holding ``second << 32 | count`` and written only by its
worker, in one store, so readers never see a second with another second's count and no
lock is needed. A reader adds the workers' slots that belong to the current and the
previous second; a slot of an older second counts nothing. The clock is CLOCK_MONOTONIC
(`time.monotonic`), the same in every process of the machine.

An `EventRate` reads several windows as one: a frontend's listeners for its `rate-limit
sessions`, every listener for `maxconnrate`, the SSL listeners for `maxsslrate`.

Two workers that read the same remaining budget at once may both use it: the limit can be
passed by what one accept batch takes per worker (HAProxy's threads can pass it the same
way between their reads and their accepts).

This is a leaf module (it imports nothing else of lb), so the broker may use it too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

__all__ = ["SLOTS_PER_WORKER", "EventRate", "RateWindow", "own_windows"]

#: Slots per worker in a window: one for even seconds, one for odd ones.
SLOTS_PER_WORKER = 2
_COUNT_MASK = (1 << 32) - 1
#: The shortest wait before a limited listener looks again (seconds).
MIN_DELAY = 0.001


class RateWindow:
    """One listener's events per second, over every worker that shares its slots.

    ``slots[start : start + 2 * workers]`` are the window's: worker ``w`` (0-based) writes
    ``slots[start + 2 * w]`` in even seconds and the next one in odd seconds."""

    __slots__ = ("mine", "slots", "start", "stop")

    def __init__(self, slots: memoryview, start: int, workers: int, worker: int) -> None:
        if not 0 <= worker < workers:
            raise ValueError(f"worker {worker} of {workers}")
        self.slots = slots
        self.start = start
        self.stop = start + SLOTS_PER_WORKER * workers
        self.mine = start + SLOTS_PER_WORKER * worker

    def add(self, now: float) -> None:
        """One event at `now` (time.monotonic())."""
        second = int(now)
        index = self.mine + (second & 1)
        value = self.slots[index]
        self.slots[index] = value + 1 if value >> 32 == second else second << 32 | 1

    def counts(self, second: int) -> tuple[int, int]:
        """Events in `second` and in the second before it, every worker's."""
        current = previous = 0
        before = second - 1
        for value in self.slots[self.start : self.stop]:
            stamp = value >> 32
            if stamp == second:
                current += value & _COUNT_MASK
            elif stamp == before:
                previous += value & _COUNT_MASK
        return current, previous

    def clear_worker(self, worker: int) -> None:
        """Forget worker `worker`'s events (it is gone; the master zeroes its slots)."""
        index = self.start + SLOTS_PER_WORKER * worker
        self.slots[index] = self.slots[index + 1] = 0


def own_windows(count: int) -> list[RateWindow]:
    """`count` windows of one process, in memory no other process sees."""
    slots = memoryview(bytearray(8 * SLOTS_PER_WORKER * max(count, 1))).cast("q")
    return [RateWindow(slots, SLOTS_PER_WORKER * index, 1, 0) for index in range(count)]


class EventRate:
    """Windows read as one rate, with an optional limit (events per second).

    `seen_max` is the largest rate this process has read (HAProxy's MaxConnRate, "rate_max"):
    lb reads it at each check of the limit, every 0.1 s at most while a listener accepts, and
    when the counters are shown, so it is a lower bound of the true peak."""

    __slots__ = ("label", "limit", "seen_max", "windows")

    def __init__(
        self, windows: Sequence[RateWindow], limit: int | None = None, label: str = ""
    ) -> None:
        self.windows = tuple(windows)
        self.limit = limit
        #: What the limit is called where it is written (log lines).
        self.label = label
        self.seen_max = 0

    def counts(self, now: float) -> tuple[int, int]:
        second = int(now)
        current = previous = 0
        for window in self.windows:
            mine, before = window.counts(second)
            current += mine
            previous += before
        return current, previous

    def estimate(self, now: float) -> float:
        """Events over the sliding second ending at `now` (time.monotonic())."""
        current, previous = self.counts(now)
        return current + previous * (1.0 - (now - int(now)))

    def rate(self, now: float | None = None) -> int:
        """`estimate`, rounded down, as the counters show it."""
        rate = math.floor(self.estimate(time.monotonic() if now is None else now))
        self.seen_max = max(self.seen_max, rate)
        return rate

    def remain(self, now: float) -> int:
        """How many events the limit still allows now (a large number without a limit):
        the limit less the rate rounded down, as HAProxy's freq_ctr_remain."""
        if self.limit is None:
            return 1 << 31
        return max(self.limit - self.rate(now), 0)

    def delay(self, now: float) -> float:
        """Seconds from `now` until `remain` is at least 1 (the rate is below the limit),
        if nothing else happens; at least MIN_DELAY when it is not already.

        The previous second's events leave the sliding second evenly as it passes; the
        current second's leave only once it is over. HAProxy (next_event_delay) waits
        (excess / limit) but at least 1 ms, which, when the excess is this second's events,
        means waking every millisecond until the second is over; this says when."""
        if self.limit is None:
            return 0.0
        limit = self.limit
        current, previous = self.counts(now)
        fraction = now - int(now)
        if current < limit:
            if previous == 0:
                return 0.0
            # current + previous * (1 - f) < limit  <=>  f > 1 - (limit - current) / previous
            needed = 1.0 - (limit - current) / previous
            if needed < fraction:
                return 0.0
            return max(needed - fraction, 0.0) + MIN_DELAY
        # Only once this second is over: then current * (1 - g) < limit in the next one.
        return (1.0 - fraction) + max(1.0 - limit / current, 0.0) + MIN_DELAY
