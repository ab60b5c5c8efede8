"""The request log's batching writer: same line format as the log's, every line kept, written
in batches, the logger's level honoured, and the logger itself when nothing is installed."""

from __future__ import annotations

import asyncio
import io
import logging
import re

import pytest

from toolmend.server import access_log

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO toolmend.access \{\"n\":\d+\}$")


class Stream(io.StringIO):
    """A stream that says when something was written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.written = asyncio.Event()

    def write(self, s: str) -> int:
        self.writes += 1
        self.written.set()
        return super().write(s)


@pytest.fixture
def sink():
    stream = Stream()
    access_log.install(stream)
    level = access_log.LOGGER.level
    access_log.LOGGER.setLevel(logging.INFO)
    yield stream
    access_log.uninstall()
    access_log.LOGGER.setLevel(level)


async def test_lines_of_one_loop_turn_go_out_together_in_the_log_format(sink: Stream) -> None:
    for i in range(5):
        access_log.emit(f'{{"n":{i}}}')
    assert sink.getvalue() == ""  # batched, not written line by line
    await asyncio.wait_for(sink.written.wait(), 5)
    lines = sink.getvalue().splitlines()
    assert len(lines) == 5 and sink.writes == 1
    assert all(LINE.match(line) for line in lines), lines
    assert [line.rsplit(" ", 1)[1] for line in lines] == [f'{{"n":{i}}}' for i in range(5)]


async def test_a_full_batch_is_written_at_once(sink: Stream) -> None:
    for i in range(access_log.MAX_BATCH):
        access_log.emit(f'{{"n":{i}}}')
    assert len(sink.getvalue().splitlines()) == access_log.MAX_BATCH


def test_outside_a_loop_a_line_is_written_at_once(sink: Stream) -> None:
    access_log.emit('{"n":1}')
    assert LINE.match(sink.getvalue().strip())


def test_the_loggers_level_is_honoured(sink: Stream) -> None:
    access_log.LOGGER.setLevel(logging.WARNING)
    access_log.emit('{"n":1}')
    access_log.uninstall()  # flushes whatever was kept
    assert sink.getvalue() == ""


def test_without_install_lines_go_to_the_logger(caplog: pytest.LogCaptureFixture) -> None:
    access_log.uninstall()
    caplog.set_level(logging.INFO, logger="toolmend.access")
    access_log.emit('{"n":7}')
    assert [(r.name, r.getMessage()) for r in caplog.records] == [("toolmend.access",
                                                                    '{"n":7}')]


def test_a_loop_closed_before_its_flush_does_not_stop_later_ones(sink: Stream) -> None:
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_emit_in_loop())
    finally:
        loop.close()  # its timer never ran
    assert sink.getvalue() == ""
    asyncio.run(_emit_and_wait(sink))  # a new loop: its own flush is scheduled and runs
    assert len(sink.getvalue().splitlines()) == 2


async def _emit_in_loop() -> None:
    access_log.emit('{"n":3}')


async def _emit_and_wait(sink: Stream) -> None:
    sink.written = asyncio.Event()  # of this loop
    access_log.emit('{"n":4}')
    await asyncio.wait_for(sink.written.wait(), 5)
