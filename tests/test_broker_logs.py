"""broker/logs.py: records of one loop turn in one write, in order; nothing held back past
the turn, a WARNING, a full batch or a record from outside the loop."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time

import pytest

from broker.logs import MAX_BATCH, SecondCachedFormatter, TurnBufferedHandler

pytestmark = pytest.mark.timeout(30)


class CountingStream(io.StringIO):
    """A real text stream that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _logger(stream: CountingStream) -> logging.Logger:
    handler = TurnBufferedHandler(stream)
    handler.setFormatter(SecondCachedFormatter("%(asctime)s %(levelname)s %(message)s"))
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
