"""The request log: one JSON line per request, on the ``toolmend.access`` logger.

Through :mod:`logging`, every line cost a LogRecord, a caller lookup, a formatter and a write
and a flush of stderr: about a tenth of the CPU of a short streamed request. When toolmend
serves from its command line (it owns the process's logging then), :func:`install` puts a
batching writer in front: lines get the same prefix the log format gives every other line
(``2026-12-07 21:14:14,607 INFO toolmend.access {...}``), are collected, and are written
together at most :data:`FLUSH_AFTER` seconds later, in one write. Whoever embeds toolmend or
configures logging itself (tests with ``caplog`` among them) gets the logger as before.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import time
from typing import TextIO

LOGGER = logging.getLogger("toolmend.access")
#: how long a line may wait for others to be written with it
FLUSH_AFTER = 0.05
#: a batch this long is written at once, whatever its age
MAX_BATCH = 256

_INFO = logging.INFO


class BatchedLines:
    """Lines for one stream, written in batches from the event loop (see the module doc)."""

    __slots__ = ("_due_on", "_lines", "_second", "_stamp", "stream")

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lines: list[str] = []
        self._due_on: asyncio.AbstractEventLoop | None = None  # the loop a flush is due on
        self._second = -1
        self._stamp = ""

    def write(self, message: str) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:  # the date part changes once a second, not per line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        lines = self._lines
        lines.append(f"{self._stamp},{int((now - second) * 1000):03d} INFO toolmend.access "
                     f"{message}\n")
        if len(lines) >= MAX_BATCH:
            self.flush()
        else:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # outside a loop nothing would flush it later
                self.flush()
                return
            if self._due_on is not loop:  # (a loop closed before its flush ran: not this one)
                self._due_on = loop
                loop.call_later(FLUSH_AFTER, self.flush)

    def flush(self) -> None:
        self._due_on = None
        if not self._lines:
            return
        text = "".join(self._lines)
        self._lines.clear()
        with contextlib.suppress(OSError, ValueError):  # a closed stderr costs the log only
            self.stream.write(text)
            self.stream.flush()


_sink: BatchedLines | None = None


def install(stream: TextIO) -> BatchedLines:
    """Write request lines to ``stream`` in batches from now on (and whatever is left at
    exit)."""
    global _sink
    if _sink is not None:
        _sink.flush()
    _sink = BatchedLines(stream)
    atexit.register(_sink.flush)
    return _sink


def uninstall() -> None:
    """Back to the logger (what :func:`install` undoes; tests use it)."""
    global _sink
    if _sink is not None:
        _sink.flush()
        atexit.unregister(_sink.flush)
    _sink = None


def emit(message: str) -> None:
    """Log one request line, honouring the logger's level either way."""
    if not LOGGER.isEnabledFor(_INFO):
        return
    sink = _sink
    if sink is not None:
        sink.write(message)
    else:
        LOGGER.info(message)
