"""Log lines built once, as text, by their caller: the per-connection lines.

A connection logs two INFO lines (connected, disconnected). Through ``Logger.log`` each costs
a ``LogRecord``, the Formatter's ``%`` passes and the walk over the logger tree's handlers:
about 10 µs, a seventh of the broker's CPU per connection (bench/README.md, issue 13).
:func:`log_line` takes the finished message instead; when the only handler it reaches is a
:class:`LineHandler` that can write it as it would have written the record (broker.logs'
handler with the broker's own format), that handler writes it without a record. Anything else
(another handler such as pytest's caplog, a filter, another format) gets an ordinary record
with the same message, so what is logged never depends on the path.

No asyncio here: the sans-IO connection (broker.connection) logs through this module.
"""

from __future__ import annotations

import logging

__all__ = ["LineHandler", "log_line"]


class LineHandler(logging.Handler):
    """A handler that may take a finished line without a record."""

    def write_line(self, level: int, name: str, message: str) -> bool:
        """Write ``message`` as a record of ``level`` from logger ``name`` would be; False
        when this handler needs the record (the caller then makes one)."""
        return False


def _line_handler(logger: logging.Logger, level: int) -> LineHandler | None:
    """The one handler a record of ``level`` from ``logger`` would reach, if it is a
    LineHandler and no filter is on the way (Logger.handle and callHandlers' walk)."""
    if logger.filters or logger.disabled:
        return None
    found: LineHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if level < handler.level:
                continue
            if found is not None or not isinstance(handler, LineHandler) or handler.filters:
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    return found


def log_line(logger: logging.Logger, level: int, message: str) -> None:
    """Log ``message``, already formatted; callers check ``logger.isEnabledFor(level)``
    before they build it. ``message`` is never %-formatted (a "%" in a client id stays)."""
    handler = _line_handler(logger, level)
    if handler is None or not handler.write_line(level, logger.name, message):
        logger.log(level, message)
