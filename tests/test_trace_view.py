"""``toolmend trace`` at the widths people run it at: nothing cut, at 80 columns or 200, in a
terminal or piped.

A real aiohttp server stands in for toolmend's ``/toolmend/v1/sessions`` API with a session
whose names and times are written down here; the command runs in-process with a console of a
given width, and as a real process with its output piped (optionally with a terminal on stderr,
as in ``toolmend trace | less``).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import web
from rich.console import Console

from toolmend.telemetry.trace_view import add_arguments, run

T0 = 1796614094  # 2026-12-07 03:28:14 UTC
SESSION: dict[str, Any] = {
    "id": "sess-picnic-7", "agent_id": "planner", "source": "header",
    "trace_ids": ["4bf92f3577b34da6a3ce929d0e0e4736"],
    "steps": [
        {"step": 1, "started": T0, "ended": T0 + 0.2, "status": 200, "queue_ms": 0.05,
         "ttft_ms": 120.4, "generation_ms": 40.0, "duration_ms": 160.0, "tool_time_ms": None,
         "tool_names": ["get_weather"], "repairs": 1, "input_tokens": 120,
         "output_tokens": 30},
        {"step": 2, "started": T0 + 1.5, "ended": T0 + 2.6, "status": 200, "queue_ms": 850.0,
         "ttft_ms": 1000.0, "generation_ms": 40.0, "duration_ms": 1100.0,
         "tool_time_ms": 1300.0, "tool_names": ["find_restaurant", "get_weather",
                                                "book_table_for_tonight"],
         "retries": 1, "input_tokens": 180, "output_tokens": 44},
        {"step": 3, "started": T0 + 3.0, "ended": T0 + 3.1, "status": 499,
         "error": "client_disconnected", "queue_ms": 0.01, "ttft_ms": 90.0,
         "generation_ms": 20.0, "duration_ms": 110.0, "tool_time_ms": 400.0,
         "tool_names": [], "input_tokens": 220, "output_tokens": 12},
    ]}
#: What must appear whole, whatever the width.
WHOLE = ("get_weather", "find_restaurant", "book_table_for_tonight", "client_disconnected",
         "03:28:14", "03:28:15", "03:28:17", "850 ms", "1.30 s", "180/44", "(1 repaired)",
         "(1 retried)", "sess-picnic-7", "http://127.0.0.1:16686/trace/"
         "4bf92f3577b34da6a3ce929d0e0e4736")


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
async def sessions_api() -> AsyncIterator[str]:
    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": SESSION["id"]}]})

    async def detail(request: web.Request) -> web.Response:
        return web.json_response(SESSION)

    app = web.Application()
    app.router.add_get("/toolmend/v1/sessions", listing)
    app.router.add_get("/toolmend/v1/sessions/{sid}", detail)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    await runner.cleanup()


async def render(url: str, width: int) -> str:
    p = argparse.ArgumentParser()
    add_arguments(p)
    out = io.StringIO()
    rc = await asyncio.to_thread(run, p.parse_args(["--url", url]),
                                 Console(file=out, width=width, color_system=None))
    assert rc == 0
    return out.getvalue()


def assert_whole(text: str, width: int) -> None:
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    assert "…" not in text  # the old cut: get_we…, 03:28:…
    for s in WHOLE:
        assert s in text, f"{s!r} is not whole at {width} columns:\n{text}"


@pytest.mark.usefixtures("utc")
async def test_80_columns_wraps_and_cuts_nothing(sessions_api: str) -> None:
    text = await render(sessions_api, 80)
    assert_whole(text, 80)
    lines = text.splitlines()
    # the numbers and their timeline stay one row per step ...
    row2 = next(line for line in lines if "03:28:15" in line)
    assert "850 ms" in row2 and "█" in row2
    # ... the names and the status move under them, where they wrap between names
    assert not any("get_weather" in line and "03:28:14" in line for line in lines)
    i = next(i for i, line in enumerate(lines) if "find_restaurant, get_weather," in line)
    assert "200 (1 retried)" in lines[i] and "book_table_for_tonight" in lines[i + 1]


@pytest.mark.usefixtures("utc")
async def test_200_columns_is_one_row_per_step(sessions_api: str) -> None:
    text = await render(sessions_api, 200)
    assert_whole(text, 200)
    row2 = next(line for line in text.splitlines() if "03:28:15" in line)
    for s in ("1.30 s", "850 ms", "find_restaurant, get_weather, book_table_for_tonight",
              "200 (1 retried)", "█"):
        assert s in row2


@pytest.mark.usefixtures("utc")
async def test_narrow_terminal_moves_the_bars_below(sessions_api: str) -> None:
    text = await render(sessions_api, 60)
    assert max(len(line) for line in text.splitlines()) <= 60
    assert [line.split("│")[1].strip().split(" ")[:2] for line in text.splitlines()
            if "│ step " in line and "█" in line] == [["step", "1"], ["step", "2"],
                                                       ["step", "3"]]


def _trace_cmd(url: str, **popen: Any) -> subprocess.Popen[bytes]:
    env = {**{k: v for k, v in os.environ.items() if k != "COLUMNS"}, "TZ": "UTC"}
    env.update(popen.pop("env", {}))
    return subprocess.Popen([sys.executable, "-m", "toolmend", "trace", "--url", url],
                            stdout=subprocess.PIPE, env=env, **popen)


async def _output(proc: subprocess.Popen[bytes]) -> str:
    out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 0
    return out.decode()


async def test_piped_without_a_terminal(sessions_api: str) -> None:
    """No terminal anywhere (CI logs): rich's 80 columns, and still nothing cut."""
    proc = _trace_cmd(sessions_api, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    text = await _output(proc)
    assert_whole(text, 80)
    assert "█" * 35 not in text


async def test_piped_honours_columns(sessions_api: str) -> None:
    proc = _trace_cmd(sessions_api, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                      env={"COLUMNS": "200"})
    text = await _output(proc)
    assert_whole(text, 200)
    assert "find_restaurant, get_weather, book_table_for_tonight" in text


async def test_piped_to_a_pager_uses_the_terminal_on_stderr(sessions_api: str) -> None:
    """``toolmend trace | less``: stdout is a pipe, the terminal (123 columns here) is still
    on stderr, and the table is drawn for it, not for rich's default 80."""
    leader, follower = pty.openpty()
    try:
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 123, 0, 0))
        proc = _trace_cmd(sessions_api, stdin=subprocess.DEVNULL, stderr=follower)
        text = await _output(proc)
    finally:
        os.close(follower)
        os.close(leader)
    assert_whole(text, 123)
    # the longest step gets its bar of about 40 cells, which 80 columns have no room for
    assert "█" * 35 in text
