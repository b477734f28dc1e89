"""broker/logs.py: records of one loop turn in one write, in order; nothing held back past
the turn, a WARNING, a full batch or a record from outside the loop."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import threading
import time

import pytest

from broker.logline import log_line
from broker.logs import FORMAT, MAX_BATCH, SecondCachedFormatter, TurnBufferedHandler

pytestmark = pytest.mark.timeout(30)


class CountingStream(io.StringIO):
    """A real text stream that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


class RecordCountingHandler(TurnBufferedHandler):
    """The broker's handler, counting the records it formats."""

    def __init__(self, stream: CountingStream) -> None:
        super().__init__(stream)
        self.records = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1
        super().emit(record)


class Collecting(logging.Handler):
    """Another handler beside it (as pytest's caplog is)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _logger(
    stream: CountingStream, fmt: str = "%(asctime)s %(levelname)s %(message)s"
) -> logging.Logger:
    handler = RecordCountingHandler(stream)
    handler.setFormatter(SecondCachedFormatter(fmt))
    logger = logging.getLogger(f"test-logs-{id(stream)}")
    logger.propagate = False
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    return logger


def test_one_write_per_loop_turn_in_order() -> None:
    stream = CountingStream()
    logger = _logger(stream)

    async def main() -> str:
        logger.info("one")
        logger.info("two")
        held = stream.getvalue()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return held

    held = asyncio.run(main())
    assert held == ""
    lines = stream.getvalue().splitlines()
    assert [line.split(" ", 3)[-1] for line in lines] == ["one", "two"]
    assert stream.writes == 1


def test_warning_flushes_everything_before_it() -> None:
    stream = CountingStream()
    logger = _logger(stream)

    async def main() -> str:
        logger.info("before")
        logger.warning("now")
        return stream.getvalue()

    seen = asyncio.run(main())
    assert [line.rsplit(" ", 1)[-1] for line in seen.splitlines()] == ["before", "now"]


def test_full_batch_and_records_outside_the_loop_are_written_at_once() -> None:
    stream = CountingStream()
    logger = _logger(stream)

    async def main() -> int:
        for number in range(MAX_BATCH):
            logger.info("r%d", number)
        return len(stream.getvalue().splitlines())

    assert asyncio.run(main()) == MAX_BATCH
    logger.info("no loop here")
    assert stream.getvalue().endswith("no loop here\n")
    thread = threading.Thread(target=logger.info, args=("from a thread",))
    thread.start()
    thread.join(5)
    assert stream.getvalue().endswith("from a thread\n")


def test_timestamp_is_the_default_formatters() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.created = time.time()
    record.msecs = 7.0
    default = logging.Formatter("%(asctime)s").formatTime(record)
    formatter = SecondCachedFormatter("%(asctime)s")
    assert formatter.formatTime(record) == default
    assert formatter.formatTime(record) == default  # cached second


def _without_time(text: str) -> list[str]:
    return [line.split(" ", 2)[2] for line in text.splitlines()]


def test_log_line_is_written_as_its_record_would_be_without_one() -> None:
    stream = CountingStream()
    logger = _logger(stream, FORMAT)
    handler = logger.handlers[0]
    assert isinstance(handler, RecordCountingHandler)
    message = "client connected: client_id=a%sb%%c address=127.0.0.1:1"
    log_line(logger, logging.INFO, message)  # outside a loop: written at once
    logger.info(message)  # the record path, no args: no % formatting either
    assert handler.records == 1
    first, second = _without_time(stream.getvalue())
    assert first == second == f"INFO {logger.name}: {message}"
    stamp = stream.getvalue().split(" ", 2)[:2]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", " ".join(stamp))

    async def main() -> str:
        log_line(logger, logging.INFO, "in the loop")
        held = stream.getvalue()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return held

    held = asyncio.run(main())
    assert "in the loop" not in held
    assert stream.getvalue().endswith(f"INFO {logger.name}: in the loop\n")
    assert handler.records == 1


def test_log_line_makes_a_record_for_any_other_handler_or_format() -> None:
    stream = CountingStream()
    logger = _logger(stream, FORMAT)
    other = Collecting()
    logger.addHandler(other)
    log_line(logger, logging.INFO, "seen by both 100%")
    assert [record.getMessage() for record in other.records] == ["seen by both 100%"]
    assert _without_time(stream.getvalue()) == [f"INFO {logger.name}: seen by both 100%"]
    logger.removeHandler(other)

    stream = CountingStream()
    logger = _logger(stream)  # a format of its own: the record path
    log_line(logger, logging.INFO, "own format")
    handler = logger.handlers[0]
    assert isinstance(handler, RecordCountingHandler)
    assert handler.records == 1
    assert stream.getvalue().endswith(" INFO own format\n")

    logger.setLevel(logging.WARNING)  # callers check isEnabledFor; a record's level still counts
    logger.handlers[0].setLevel(logging.WARNING)
    log_line(logger, logging.INFO, "below the handler's level")
    assert "below the handler" not in stream.getvalue()


def test_a_handler_added_during_a_loop_turn_gets_lines_from_the_next_turn() -> None:
    stream = CountingStream()
    logger = _logger(stream, FORMAT)
    other = Collecting()

    async def main() -> None:
        log_line(logger, logging.INFO, "first")  # walks the tree once for this turn
        logger.addHandler(other)
        log_line(logger, logging.INFO, "same turn")
        await asyncio.sleep(0)  # the turn's lines are written: the walk is forgotten
        await asyncio.sleep(0)
        log_line(logger, logging.INFO, "next turn")
        logger.removeHandler(other)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        log_line(logger, logging.INFO, "after removal")
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(main())
    assert [record.getMessage() for record in other.records] == ["next turn"]
    assert [line.split(": ", 1)[1] for line in _without_time(stream.getvalue())] == [
        "first",
        "same turn",
        "next turn",
        "after removal",
    ]
