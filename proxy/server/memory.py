"""Giving memory back to the system after large, short-lived work.

A large tool schema's Rust validator takes about 25 bytes per byte of schema (3.7 MB for a
157 KB one), and a body of many small values parses to ten times its size. Both are freed when
their request ends, but glibc keeps freed memory in its heaps (one per thread that allocated
it), so the process would stay at its high-water mark: after a burst of hostile requests, RSS
stayed 400 MB above where it started. ``malloc_trim(0)`` hands the free pages back (about
75 ms for 220 MB, in a thread: ctypes releases the GIL, so the event loop keeps running).

Work that allocates a lot calls :func:`note_large_work`; a background task trims at most every
:data:`TRIM_INTERVAL` seconds, and only after such work, so ordinary traffic never pays for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
from typing import Any, Final

from aiohttp import web

log = logging.getLogger("toolmend")

TRIM_INTERVAL: Final = 5.0

_pending = False


def note_large_work() -> None:
    """Something large was allocated and will be freed soon: trim after it."""
    global _pending
    _pending = True


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or ``None`` where there is none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


async def _trimmer(trim: Any) -> None:
    global _pending
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(TRIM_INTERVAL)
        if _pending:
            _pending = False
            await loop.run_in_executor(None, trim, 0)


_TASK = web.AppKey("memory_trimmer", asyncio.Task)


def install(app: web.Application) -> None:
    """Run the trimmer while the app runs (nothing at all without glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return

    async def start(app: web.Application) -> None:
        app[_TASK] = asyncio.get_running_loop().create_task(_trimmer(trim))

    async def stop(app: web.Application) -> None:
        task = app.get(_TASK)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
