"""Log lines a flood must not multiply: a token bucket, and "N similar lines suppressed".

A hostile or broken peer can cause one warning per connection (a refused TLS handshake, a
PROXY header that never comes, a source that is not trusted): 2,000 silent sockets must not
write 2,000 lines. `RateLimiter` lets a burst through, then a steady rate, and counts the
rest; `SuppressedLines` puts one kind of line through it and reports what it held back as
"N similar lines suppressed", every `interval` seconds while the flood lasts and once more
when it is over (or at `flush`). `Burst` tells a run of events (accepts paused at a rate
limit, accepts failed for want of files) in two lines, when it begins and when it is over.

This is a leaf module (it imports nothing else of lb), so the broker uses it too
(tests/test_layering.py); the clock and the scheduler are passed in, so it has no event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

__all__ = [
    "DEFAULT_BURST",
    "DEFAULT_RATE",
    "REPORT_INTERVAL",
    "Burst",
    "RateLimiter",
    "SuppressedLines",
]

#: A burst of this many lines at once, then this many per second (lb's refused handshakes).
DEFAULT_BURST = 20
DEFAULT_RATE = 10.0
#: How often the count of suppressed lines is reported while a flood lasts (seconds).
REPORT_INTERVAL = 10.0


class RateLimiter:
    """A token bucket: `burst` lines at once, then `rate` per second; counts the rest."""

    __slots__ = ("burst", "clock", "rate", "suppressed", "tokens", "updated")

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.updated = clock()
        self.suppressed = 0

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        count, self.suppressed = self.suppressed, 0
        return count


class SuppressedLines:
    """One kind of line through a `RateLimiter`, with the count of held-back lines reported.

    `write(line)` writes a line (a logger call), `write_report` the report (`write` unless
    given: a report louder than the lines); `schedule(delay, callback)` is the event loop's
    call_later. `what` names the kind in the report: "{label}: N similar lines suppressed
    ({what} over R/s)".
    """

    __slots__ = (
        "interval",
        "label",
        "limiter",
        "report_pending",
        "schedule",
        "total",
        "what",
        "write",
        "write_report",
    )

    def __init__(
        self,
        write: Callable[[str], None],
        label: str,
        what: str,
        clock: Callable[[], float],
        schedule: Callable[[float, Callable[[], None]], object],
        *,
        rate: float = DEFAULT_RATE,
        burst: int = DEFAULT_BURST,
        interval: float = REPORT_INTERVAL,
        write_report: Callable[[str], None] | None = None,
    ) -> None:
        self.write = write
        self.write_report = write if write_report is None else write_report
        self.label = label
        self.what = what
        self.limiter = RateLimiter(rate, burst, clock)
        self.schedule = schedule
        self.interval = interval
        self.report_pending = False
        #: Lines suppressed since start (the reports say how many since the last report).
        self.total = 0

    def emit(self, line: str) -> None:
        if self.limiter.allow():
            self.write(line)
            return
        self.total += 1
        if not self.report_pending:
            self.report_pending = True
            self.schedule(self.interval, self.report)

    def report(self) -> None:
        """Write the count held back since the last report (nothing when there is none)."""
        self.report_pending = False
        count = self.limiter.take_suppressed()
        if count:
            self.write_report(
                f"{self.label}: {count} similar lines suppressed "
                f"({self.what} over {self.limiter.rate:g}/s)"
            )

    def flush(self) -> None:
        """At stop: report now what a pending report would have said."""
        self.report()


class _Cancellable(Protocol):
    def cancel(self) -> None: ...


class Burst:
    """A run of events (accepts paused at a rate limit, accepts failed for want of files)
    told in two lines however long it lasts: the caller writes the first when `add` says the
    run began, and `on_over(count, seconds)` is called once none came for `quiet` seconds
    (or at `end`), with how many there were and over how long.

    `schedule(delay, callback)` is the event loop's call_later (None: the run is never told
    over, for objects that have no loop)."""

    __slots__ = ("_check", "clock", "count", "first", "last", "on_over", "quiet", "schedule")

    def __init__(
        self,
        quiet: float,
        clock: Callable[[], float],
        schedule: Callable[[float, Callable[[], None]], _Cancellable] | None,
        on_over: Callable[[int, float], None],
    ) -> None:
        self.quiet = quiet
        self.clock = clock
        self.schedule = schedule
        self.on_over = on_over
        self.count = 0  # events in the run (0: no run)
        self.first = self.last = 0.0
        self._check: _Cancellable | None = None

    def add(self) -> bool:
        """One more event; True when it began a run (write its first line then)."""
        now = self.clock()
        self.last = now
        self.count += 1
        if self.count > 1:
            return False
        self.first = now
        if self.schedule is not None:
            self._check = self.schedule(self.quiet, self._look)
        return True

    def _look(self) -> None:
        quiet_for = self.clock() - self.last
        if quiet_for < self.quiet:
            assert self.schedule is not None
            self._check = self.schedule(self.quiet - quiet_for, self._look)
            return
        self._check = None
        self.end()

    def end(self) -> None:
        """Tell the run over now, if there is one (at stop)."""
        if self._check is not None:
            self._check.cancel()
            self._check = None
        if self.count:
            count, self.count = self.count, 0
            self.on_over(count, self.last - self.first)
