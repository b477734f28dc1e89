"""The broker's log output: records written once per event-loop turn, not once each.

A connection logs two INFO lines (connected, disconnected). Written one by one, each is a
``write`` syscall with the handler's flush, plus a ``time.strftime`` for its timestamp:
together about a fifth of the broker's CPU per connection (bench/README.md, broker section).
Here a record is formatted at once (so it shows the state of its moment) and joined with the
others of the same loop turn into one write at the end of the turn. What cannot wait is
written at once: WARNING and above (with everything before it, so the order holds), records
from outside the event loop's thread, and a full batch (``MAX_BATCH``). Exit flushes
(``logging.shutdown``); a killed process loses at most the records of one loop turn.

The per-connection lines are built once, as text, by their caller and handed to
:func:`broker.logline.log_line`: when such a line reaches only a :class:`TurnBufferedHandler`
with the broker's own :data:`FORMAT` (the ``broker`` command's setup), it is stamped and
queued here without a ``LogRecord`` (:meth:`TurnBufferedHandler.write_line`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TextIO

from broker.logline import LineHandler, forget_handlers

__all__ = ["FORMAT", "MAX_BATCH", "SecondCachedFormatter", "TurnBufferedHandler"]

#: Records held before they are written regardless of the loop turn.
MAX_BATCH = 256
#: The broker's log line, which :meth:`TurnBufferedHandler.write_line` writes without a record.
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TurnBufferedHandler(logging.StreamHandler[TextIO], LineHandler):
    """A StreamHandler that writes the records of one event-loop turn in one write."""

    # Every line it takes is written by flush(), at the end of the turn or at once.
    turn_scoped = True

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self.queue(text, record.levelno)

    def write_line(self, level: int, name: str, message: str) -> bool:
        formatter = self.formatter
        if not isinstance(formatter, SecondCachedFormatter) or not formatter.direct:
            return False
        text = formatter.line(level, name, message, self.terminator)
        with self.lock:  # type: ignore[union-attr]  # createLock made it
            self.queue(text, level)
        return True

    def queue(self, text: str, level: int) -> None:
        """Write ``text`` (formatted, with its terminator) with the records of this turn."""
        self._pending.append(text)
        if level >= logging.WARNING or len(self._pending) >= MAX_BATCH:
            self.flush()
            return
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on the event loop's thread (or no loop): now
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        forget_handlers()  # the turn is over for log_line's walks too
        self.acquire()
        try:
            self._scheduled = False
            if self._pending:
                data = "".join(self._pending)
                self._pending.clear()
                try:
                    self.stream.write(data)
                    self.stream.flush()
                except (OSError, ValueError):
                    pass  # stderr gone (closed pipe): nothing left to tell anyone
        finally:
            self.release()


class SecondCachedFormatter(logging.Formatter):
    """``%(asctime)s`` as the default Formatter writes it, with strftime once per second."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._second = -1
        self._text = ""
        #: Whether lines may be written by :meth:`line`, without a record.
        self.direct = fmt == FORMAT

    def _stamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._text = time.strftime(self.default_time_format, self.converter(created))
            self._second = second
        return self._text

    def line(self, level: int, name: str, message: str, terminator: str = "") -> str:
        """What :meth:`format` makes of a record of ``message`` (no exception) in FORMAT,
        followed by ``terminator``."""
        created = time.time()
        second = int(created)
        stamp = self._text if second == self._second else self._stamp(created)
        msecs = int((created - second) * 1000)
        return f"{stamp},{msecs:03d} {logging.getLevelName(level)} {name}: {message}{terminator}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return "%s,%03d" % (self._stamp(record.created), record.msecs)  # noqa: UP031  # the default_msec_format
