"""Giving back to the system what a burst of TLS handshakes left in the C allocator.

A reconnect storm makes thousands of TLS handshakes at once in each worker: OpenSSL's
connection state, its record buffers and the certificates it parses (tens of KiB a
handshake) come from glibc's malloc. lb frees OpenSSL's connection once a TLS 1.3 handshake
is done (lb.tls_io), but the freed chunks stay in the heap: glibc shrinks the heap only from
its top (M_TRIM_THRESHOLD), and the sessions that stayed hold small chunks all through it.
The 20,000-device storm left lb at 55 KiB RSS per device against 6.2 before it (HAProxy 50
against 25, bench/README.md). `malloc_trim(0)` gives back every free page of the heap, the
middle included (madvise MADV_DONTNEED, glibc 2.8 and later), in every arena: the handshakes
run on the loop's thread (the main arena), and worker #1 also has libuv's threadpool (four
threads, for the health checks' address lookups) with arenas of their own.

A trim walks the free lists (milliseconds for a heap of a GiB), so it runs once a burst is
over: after at least TRIM_AFTER_HANDSHAKES handshake steps, when none has run for
TRIM_QUIET seconds. Python's own small objects live in obmalloc's arenas, which Python
unmaps when an arena empties; what is left there is not the allocator's to give.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable

logger = logging.getLogger(__name__)

#: Handshake steps since the last trim that make a burst worth trimming after: ~40 KiB each
#: in a storm (the 20,000-device run grew 940 MiB over 20,000 handshakes), so about 10 MiB.
TRIM_AFTER_HANDSHAKES = 256
#: Seconds without a handshake step before the trim: the burst is over, and a trim during
#: it would hand pages back that the next handshakes take again.
TRIM_QUIET = 5.0

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def libc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def resident_bytes() -> int | None:
    """This process's RSS now (Linux /proc/self/statm), None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


class HeapTrimmer:
    """Trims the C heap once a burst of handshakes has been over for TRIM_QUIET seconds.

    The handshake queue tells it how many steps each turn ran (`busy`); one timer, armed
    when a burst is big enough, looks at the last busy time when it fires and waits again
    if handshakes came meanwhile, so a long storm costs no more than one timer."""

    __slots__ = (
        "after",
        "last_busy",
        "loop",
        "pending",
        "quiet",
        "released",
        "timer",
        "trim",
        "trims",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        trim: Callable[[int], int] | None = None,
        after: int = TRIM_AFTER_HANDSHAKES,
        quiet: float = TRIM_QUIET,
    ) -> None:
        self.loop = loop
        self.trim = trim if trim is not None else libc_malloc_trim()
        self.after = after
        self.quiet = quiet
        self.pending = 0  # handshake steps since the last trim
        self.last_busy = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.trims = 0
        self.released = 0  # bytes of RSS the trims gave back, in all

    def busy(self, steps: int) -> None:
        """`steps` handshake steps ran in this turn."""
        if self.trim is None:
            return
        self.pending += steps
        self.last_busy = self.loop.time()
        if self.timer is None and self.pending >= self.after:
            self.timer = self.loop.call_later(self.quiet, self._check)

    def _check(self) -> None:
        self.timer = None
        idle = self.loop.time() - self.last_busy
        if idle < self.quiet:  # still busy: look again when it may have been quiet enough
            self.timer = self.loop.call_later(self.quiet - idle, self._check)
            return
        self.trim_now()

    def trim_now(self) -> int:
        """Trim at once; the bytes of RSS given back (0 when unknown or none)."""
        if self.trim is None:
            return 0
        steps, self.pending = self.pending, 0
        before = resident_bytes()
        self.trim(0)
        after = resident_bytes()
        self.trims += 1
        released = max(before - after, 0) if before is not None and after is not None else 0
        self.released += released
        logger.info(
            "heap trimmed after %d handshake steps and %.0fs without one: RSS %s -> %s MiB",
            steps,
            self.quiet,
            f"{before / 2**20:.1f}" if before is not None else "?",
            f"{after / 2**20:.1f}" if after is not None else "?",
        )
        return released

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
