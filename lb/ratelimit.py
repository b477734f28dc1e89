"""Log lines a flood must not multiply: a token bucket, and "N similar lines suppressed".

A hostile or broken peer can cause one warning per connection (a refused TLS handshake, a
PROXY header that never comes, a source that is not trusted): 2,000 silent sockets must not
write 2,000 lines. `RateLimiter` lets a burst through, then a steady rate, and counts the
rest; `SuppressedLines` puts one kind of line through it and reports what it held back as
"N similar lines suppressed", every `interval` seconds while the flood lasts and once more
when it is over (or at `flush`).

This is a leaf module (it imports nothing else of lb), so the broker uses it too
(tests/test_layering.py); the clock and the scheduler are passed in, so it has no event loop.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["DEFAULT_BURST", "DEFAULT_RATE", "REPORT_INTERVAL", "RateLimiter", "SuppressedLines"]

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

    `write(line)` writes a line (a logger call); `schedule(delay, callback)` is the event
    loop's call_later. `what` names the kind in the report: "{label}: N similar lines
    suppressed ({what} over R/s)".
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
    ) -> None:
        self.write = write
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
            self.write(
                f"{self.label}: {count} similar lines suppressed "
                f"({self.what} over {self.limiter.rate:g}/s)"
            )

    def flush(self) -> None:
        """At stop: report now what a pending report would have said."""
        self.report()
