"""Counts that the workers of one generation share, so that a `maxconn` (the global one, a
frontend's, a server's) is one limit for all of them, as it is for HAProxy's threads.

Before, each of `nbthread` workers took ceil(maxconn / nbthread) sessions. The kernel spreads
connections over the workers' SO_REUSEPORT sockets by a hash of their addresses, which is
even only on average: in the 100,000-device fleet run (15 workers, 6,667 sessions each) the
workers that filled first kept devices waiting in their accept queues while the others had
room, and a fleet of N needed a maxconn a little above N. Now each worker may take sessions
up to what its own files allow (lb.limits), and the configured maxconn bounds their sum.

How: the master maps one anonymous shared block per generation of workers before it forks
them. Each count has one 8-byte slot per worker, and only that worker writes its slot, so
there is no lock for a worker killed in the middle to leave held; the master zeroes a dead
worker's slots before its replacement starts. A worker reserves a place before accept() as
HAProxy's listener_accept() does (it increments actconn, then accepts): add one to its own
slot, then read the sum, and take the one back when the sum is past the limit. Two workers
reserving the last place at once may both take it back (the place stays free; the next
readable event or the poll below tries again). Neither can take it twice, except that
Python has no memory fence between the write and the reads: in theory each of two CPUs
could read the other's slot before seeing the other's write, and the limit would be
passed by one session per worker at most. Nothing here is on the hot path of a session's
bytes: one add and one read of `nbthread` slots per accepted connection.

A server's count is checked against its maxconn of the moment (slowstart ramps it) before
a connection is counted (lb.server), without the take-back: two workers may pass it by one
each at the same instant, as they could before only by far more (each had the whole
maxconn). Connections waiting for a server slot stay in the queue of the worker that
accepted them; a worker with connections queued looks every POLL_INTERVAL for slots that
others freed (lb.process).

A worker whose listener paused because a shared count was full learns that another worker
ended a session by looking again every POLL_INTERVAL (HAProxy's threads wake each other's
listeners, which processes would need a message for; 50 ms of delay at a full maxconn is
below a device's reconnect backoff). A worker's own sessions ending resume its listeners at
once, as before.

The same block holds each listener's accepts per second (lb.event_rate: two slots per
worker), for `maxconnrate`, `maxsessrate`, `maxsslrate` and `rate-limit sessions`, which
HAProxy applies to its whole process. With one worker there is no block: each frontend
counts in windows of its own (lb.frontend.FrontendRuntime).
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence

from lb.config.model import Config
from lb.event_rate import SLOTS_PER_WORKER, RateWindow

#: How often a worker whose listeners wait for a shared count looks at it again.
POLL_INTERVAL = 0.05
#: The name of the global maxconn's count; a frontend's is its name after "frontend ".
GLOBAL = "global"
SLOT_BYTES = 8


def frontend_count(name: str) -> str:
    return f"frontend {name}"


def server_count(backend: str, server: str) -> str:
    return f"server {backend}/{server}"


def listener_rate(frontend: str, bind_index: int) -> str:
    """The name of the accepts-per-second window of a frontend's `bind_index`-th bind line."""
    return f"rate {frontend}/{bind_index}"


def rate_names(config: Config) -> list[str]:
    return [
        listener_rate(frontend.name, index)
        for frontend in config.frontends
        for index in range(len(frontend.binds))
    ]


class SharedCounts:
    """One generation's block: a slot per worker for each named count, then two slots per
    worker for each named rate window."""

    def __init__(self, names: Sequence[str], workers: int, rates: Sequence[str] = ()) -> None:
        self.names = {name: index for index, name in enumerate(names)}
        self.rates = {name: index for index, name in enumerate(rates)}
        self.workers = workers
        self.rates_start = len(self.names) * workers
        size = self.rates_start + len(self.rates) * SLOTS_PER_WORKER * workers
        self.memory = mmap.mmap(-1, max(size, 1) * SLOT_BYTES)  # MAP_SHARED
        self.slots = memoryview(self.memory).cast("q")

    @classmethod
    def for_config(cls, config: Config) -> SharedCounts | None:
        """The counts `config`'s workers share, or None with one worker (its own counts are
        exact and its rates its own)."""
        workers = config.global_.nbthread or 1
        if workers < 2:
            return None
        names = [GLOBAL] if config.global_.maxconn is not None else []
        names += [frontend_count(f.name) for f in config.frontends if f.maxconn is not None]
        names += [
            server_count(backend.name, server.name)
            for backend in config.backends
            for server in backend.servers
            if server.maxconn is not None
        ]
        return cls(names, workers, rate_names(config))

    def count(self, name: str, worker: int, limit: int) -> SharedCount | None:
        """Worker `worker`'s (1-based) handle on count `name` bounded by `limit`."""
        index = self.names.get(name)
        if index is None:
            return None
        start = index * self.workers
        return SharedCount(self.slots, start, start + self.workers, start + worker - 1, limit)

    def rate_window(self, name: str, worker: int) -> RateWindow:
        """Worker `worker`'s (1-based) handle on rate window `name`."""
        start = self.rates_start + self.rates[name] * SLOTS_PER_WORKER * self.workers
        return RateWindow(self.slots, start, self.workers, worker - 1)

    def clear_worker(self, worker: int) -> None:
        """Zero worker `worker`'s slots (the master, once that worker is dead)."""
        for index in self.names.values():
            self.slots[index * self.workers + worker - 1] = 0
        for name in self.rates:
            self.rate_window(name, worker).clear_worker(worker - 1)


class SharedCount:
    """One worker's view of one shared count."""

    __slots__ = ("end", "limit", "mine", "slots", "start")

    def __init__(self, slots: memoryview, start: int, end: int, mine: int, limit: int) -> None:
        self.slots = slots
        self.start = start
        self.end = end
        self.mine = mine
        self.limit = limit

    def total(self) -> int:
        return sum(self.slots[self.start : self.end])

    def has_room(self) -> bool:
        return self.total() < self.limit

    def try_add(self, limit: int | None = None) -> bool:
        """Reserve one place; False (and nothing reserved) when every place is taken.

        Counted first, then checked: two workers that reach for the last place at once both
        see the other's count and both back off (one looks again a moment later), where
        checking first let both take it. ``limit``: the limit now, when it moves (a server's
        maxconn during slowstart); the count's own otherwise."""
        slots = self.slots
        slots[self.mine] += 1
        if sum(slots[self.start : self.end]) > (self.limit if limit is None else limit):
            slots[self.mine] -= 1
            return False
        return True

    def add(self) -> None:
        """Count one more whatever the limit (a connection that has its place already)."""
        self.slots[self.mine] += 1

    def remove(self) -> None:
        self.slots[self.mine] -= 1
