"""Log lines built once, as text, by their caller: the per-connection lines.

A connection logs two INFO lines (connected, disconnected). Through ``Logger.log`` each costs
a ``LogRecord``, the Formatter's ``%`` passes and the walk over the logger tree's handlers:
about 10 µs, a seventh of the broker's CPU per connection (bench/README.md, issue 13).
:func:`log_line` takes the finished message instead; when the only handler it reaches is a
:class:`LineHandler` that can write it as it would have written the record (broker.logs'
handler with the broker's own format), that handler writes it without a record. Anything else
(another handler such as pytest's caplog, a filter, another format) gets an ordinary record
with the same message, so what is logged never depends on the path.

Which handler that is is worked out by walking the logger tree, as ``Logger.callHandlers``
does; a handler that writes its lines at the end of the event-loop turn (``turn_scoped``)
lets the answer be kept until then: it calls :func:`forget_handlers` when it writes them. So
a change of handlers takes effect from the next loop turn, and the walk is done once a turn
rather than once a line.

No asyncio here: the sans-IO connection (broker.connection) logs through this module.
"""

from __future__ import annotations

import logging

__all__ = ["LineHandler", "forget_handlers", "log_line"]


class LineHandler(logging.Handler):
    """A handler that may take a finished line without a record."""

    #: True when the handler calls :func:`forget_handlers` at the end of every loop turn in
    #: which it took a line (and whenever it writes at once): then log_line keeps the answer
    #: of its walk to it until then.
    turn_scoped = False

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


#: (logger, level) -> the turn-scoped handler its lines reach, until forget_handlers().
_handlers: dict[tuple[logging.Logger, int], LineHandler] = {}


def forget_handlers() -> None:
    """The loop turn is over (a turn-scoped handler wrote its lines): walk again next time."""
    _handlers.clear()


def log_line(logger: logging.Logger, level: int, message: str) -> None:
    """Log ``message``, already formatted; callers check ``logger.isEnabledFor(level)``
    before they build it. ``message`` is never %-formatted (a "%" in a client id stays)."""
    key = (logger, level)
    handler = _handlers.get(key)
    if handler is None:
        handler = _line_handler(logger, level)
        if handler is None:
            logger.log(level, message)
            return
        if handler.turn_scoped:
            # Kept before the write: a write made at once forgets it at once.
            _handlers[key] = handler
    if not handler.write_line(level, logger.name, message):
        # Not taken (so no write will forget it): the record path, and walk again next time.
        _handlers.pop(key, None)
        logger.log(level, message)
