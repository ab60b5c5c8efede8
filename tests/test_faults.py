"""Faults: every way the upstream, the client or the collector can fail, and what is left after.

For each fault the client gets an OpenAI-shaped error (the real status before streaming began,
an error event then ``[DONE]`` after) or a clean finish; the upstream is asked again only while
nothing has reached the client; and afterwards the fair queue, the event loop's tasks and the
upstream connection pool are exactly as they were before. (test_proxy.py checks the timing of
the same faults; this file checks what they leave behind.)
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from toolmend.server.app import SCHEDULER, UPSTREAM, build_app, start_server
from toolmend.server.config import Settings
from toolmend.sim.server import SimBackend

MSG = [{"role": "user", "content": "hello"}]


@dataclass
class FStack:
    sim: SimBackend
    url: str
    app: web.Application
    tasks: set[asyncio.Task[Any]]
    pooled: int

    @property
    def connector(self) -> aiohttp.TCPConnector:
        conn = self.app[UPSTREAM].session.connector
        assert isinstance(conn, aiohttp.TCPConnector)
        return conn

    def mark_baseline(self) -> None:
        self.tasks = set(asyncio.all_tasks())
        self.pooled = self._pooled()

    def _pooled(self) -> int:
        """Idle upstream connections: the chat requests' pool and aiohttp's (small GETs)."""
        return _pooled(self.connector) + self.app[UPSTREAM].pool.stats()["idle"]

    def _acquired(self) -> int:
        pool = self.app[UPSTREAM].pool.stats()
        return len(self.connector._acquired) + pool["open"] - pool["idle"]

    async def assert_baseline(self, timeout: float = 3.0) -> None:
        """Scheduler empty, no task left over, no upstream connection held or leaked."""
        sched = self.app[SCHEDULER]
        end = time.monotonic() + timeout
        while True:
            me = asyncio.current_task()
            extra = {t for t in asyncio.all_tasks() if t not in self.tasks and t is not me}
            # the backend's side of connections kept alive in toolmend's pool: bounded by the
            # pool, counted there, not a leak
            backend_conns = self.sim._runner.server.connections  # type: ignore[union-attr]
            extra -= {h._task_handler for h in backend_conns}
            state = {"in_flight": sched.in_flight, "queued": sched.queued,
                     "tasks": sorted(t.get_coro().__qualname__ for t in extra),  # type: ignore[union-attr]
                     "acquired": self._acquired(),
                     "pooled": self._pooled(), "sim_in_flight": self.sim.stats.in_flight}
            if (not extra and sched.in_flight == 0 and sched.queued == 0
                    and state["acquired"] == 0 and state["pooled"] <= self.pooled
                    and state["sim_in_flight"] == 0
                    and len(backend_conns) <= max(self.pooled, state["pooled"])):
                return
            if time.monotonic() > end:
                raise AssertionError(f"not back to baseline: {state}")
            await asyncio.sleep(0.02)


def _pooled(conn: aiohttp.TCPConnector) -> int:
    return sum(len(v) for v in conn._conns.values())


@pytest.fixture
async def make_fstack() -> AsyncIterator[Callable[..., Any]]:
    cleanups: list[Any] = []

    async def factory(sim_kwargs: dict[str, Any] | None = None, **settings: Any) -> FStack:
        sim = SimBackend("vllm", **{"ttft": 0.0, **(sim_kwargs or {})})
        await sim.start()
        cleanups.append(sim.stop)
        app = build_app(Settings(**{"log_requests": False, "loading_timeout": 5.0,
                                    **settings}), [sim.url])
        runner, port = await start_server(app, "127.0.0.1", 0)
        cleanups.append(runner.cleanup)
        st = FStack(sim, f"http://127.0.0.1:{port}", app, set(), 0)
        # warm up (pool, detection, lazy imports), then take the baseline
        sim.push({"content": "warm"})
        status, _ = await post(st, {"messages": MSG, "stream": True})
        assert status == 200
        sim.stats.requests = 0
        # the warm-up is over once its slot, its upstream connection and the sim are released
        await _until(lambda: app[SCHEDULER].in_flight == 0 and sim.stats.in_flight == 0
                     and not st.connector._acquired)
        st.mark_baseline()
        return st

    yield factory
    for fn in reversed(cleanups):
        await fn()


async def post(st: FStack, body: dict[str, Any], timeout: float = 20) -> tuple[int, bytes]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.post(st.url + "/v1/chat/completions", json=body) as r:
            return r.status, await r.read()


def error_of(status: int, raw: bytes, stream_started: bool) -> dict[str, Any]:
    """The OpenAI error the client received, checked for shape and placement."""
    if not stream_started:
        assert status >= 400
        err = orjson.loads(raw)["error"]
    else:
        assert status == 200
        events = [ln[6:] for ln in raw.split(b"\n") if ln.startswith(b"data: ")]
        assert events[-1] == b"[DONE]", raw[-200:]
        err = orjson.loads(events[-2])["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["message"]
    return err


STORY = "one two three four five six seven eight"

# (fault scenario, settings, expected status before streaming / None for in-stream, code)
UPSTREAM_FAULTS: list[tuple[str, dict[str, Any], dict[str, Any], int | None, str | None]] = [
    # dropped before any answer: resent twice (it may be a stale keep-alive), then refused
    ("refuses", {"fault": {"kind": "refuse", "times": 3}}, {}, 502, "upstream_disconnected"),
    ("resets mid-stream", {"content": STORY, "fault": {"kind": "reset", "after": 3}}, {}, None,
     "upstream_disconnected"),
    ("stalls before first byte", {"content": STORY, "fault": {"kind": "stall", "seconds": 30}},
     {"first_byte_timeout": 0.3}, 504, "upstream_first_byte_timeout"),
    ("stalls mid-stream", {"content": STORY, "fault": {"kind": "stall", "after": 2,
                                                         "seconds": 30}},
     {"idle_timeout": 0.3}, None, "upstream_idle_timeout"),
    ("429", {"fault": {"kind": "status", "status": 429, "message": "slow down"}}, {}, 429,
     None),
    ("500", {"fault": {"kind": "status", "status": 500, "message": "kaputt"}}, {}, 500, None),
    ("503", {"fault": {"kind": "status", "status": 503, "message": "overloaded"}}, {}, 503,
     None),
    ("malformed SSE", {"content": STORY, "fault": {"kind": "malformed", "after": 2}}, {}, None,
     "upstream_malformed_event"),
    ("truncated JSON", {"content": STORY, "fault": {"kind": "truncated", "after": 2}}, {}, None,
     None),
    ("never-ending stream", {"fault": {"kind": "endless"}, "token_delay": 0.002},
     {"total_timeout": 0.5}, None, "upstream_total_timeout"),
    ("error event", {"content": STORY, "fault": {"kind": "error_event", "after": 2,
                                                   "message": "CUDA out of memory"}}, {}, None,
     "upstream_stream_error"),
]


@pytest.mark.parametrize(("name", "scenario", "settings", "status", "code"), UPSTREAM_FAULTS,
                         ids=[f[0] for f in UPSTREAM_FAULTS])
async def test_upstream_fault_streaming(make_fstack: Callable[..., Any], name: str,
                                        scenario: dict[str, Any], settings: dict[str, Any],
                                        status: int | None, code: str | None) -> None:
    st = await make_fstack(**settings)
    st.sim.push(scenario)
    got, raw = await post(st, {"messages": MSG, "stream": True})
    err = error_of(got, raw, stream_started=status is None)
    if status is not None:
        assert got == status
    if code is not None:
        assert err["code"] == code
    if status is None and "content" in scenario:  # what came before the fault was relayed
        assert b'"content":"one"' in raw
    # never retried once streaming began or for an answer; a connection dropped before any
    # answer is resent twice (a stale keep-alive looks just like it)
    assert st.sim.stats.requests == (3 if name == "refuses" else 1)
    await st.assert_baseline()


@pytest.mark.parametrize(("name", "scenario", "settings", "status", "code"),
                         [f for f in UPSTREAM_FAULTS if f[3] is not None],
                         ids=[f[0] for f in UPSTREAM_FAULTS if f[3] is not None])
async def test_upstream_fault_whole_response(make_fstack: Callable[..., Any], name: str,
                                             scenario: dict[str, Any], settings: dict[str, Any],
                                             status: int, code: str | None) -> None:
    st = await make_fstack(**settings)
    st.sim.push(scenario)
    got, raw = await post(st, {"messages": MSG})
    assert got == status
    err = error_of(got, raw, stream_started=False)
    if code is not None:
        assert err["code"] == code
    assert st.sim.stats.requests == (3 if name == "refuses" else 1)
    await st.assert_baseline()


async def test_retry_only_before_first_byte(make_fstack: Callable[..., Any]) -> None:
    """A backend still loading (503 "Loading model") is asked again, invisibly: nothing had
    reached the client. A stream that broke after output began is never asked again."""
    st = await make_fstack()
    st.sim.push({"fault": {"kind": "status", "status": 503, "message": "Loading model"}},
                {"fault": {"kind": "status", "status": 503, "message": "Loading model"}},
                {"content": "ready now"})
    got, raw = await post(st, {"messages": MSG, "stream": True})
    assert got == 200 and b'"content":"ready"' in raw
    assert raw.rstrip().endswith(b"data: [DONE]")
    assert b'"error"' not in raw
    assert st.sim.stats.requests == 3
    await st.assert_baseline()
    st.sim.stats.requests = 0
    st.sim.push({"content": STORY, "fault": {"kind": "reset", "after": 2}},
                {"content": "a retry would read this"})
    got, raw = await post(st, {"messages": MSG, "stream": True})
    error_of(got, raw, stream_started=True)
    assert b"a retry would read this" not in raw
    assert st.sim.stats.requests == 1
    st.sim.script.clear()
    await st.assert_baseline()


# --- the client goes away ---------------------------------------------------------------------

async def _until(pred: Callable[[], bool], timeout: float = 3.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


async def test_client_disconnects_while_queued(make_fstack: Callable[..., Any]) -> None:
    st = await make_fstack(slots=1, express_slot=False)
    sched = st.app[SCHEDULER]
    st.sim.push({"content": "the long one", "ttft": 1.0})
    first = asyncio.ensure_future(post(st, {"messages": MSG, "stream": True}))
    await _until(lambda: sched.in_flight == 1)
    second = asyncio.ensure_future(post(st, {"messages": MSG, "stream": True}))
    await _until(lambda: sched.queued == 1)
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    await _until(lambda: sched.queued == 0)  # left the queue at once, not at dispatch
    status, raw = await first
    assert status == 200 and b"long" in raw
    assert st.sim.stats.requests == 1  # the abandoned request never reached the backend
    await st.assert_baseline()


@pytest.mark.parametrize("phase", ["prefill", "mid-stream"])
async def test_client_disconnects_upstream_released(make_fstack: Callable[..., Any],
                                                    phase: str) -> None:
    st = await make_fstack()
    if phase == "prefill":
        st.sim.push({"content": "never", "ttft": 30})
    else:
        st.sim.push({"fault": {"kind": "endless"}, "token_delay": 0.005})
    session = aiohttp.ClientSession()
    try:
        if phase == "prefill":
            req = asyncio.ensure_future(session.post(st.url + "/v1/chat/completions",
                                                     json={"messages": MSG, "stream": True}))
            await _until(lambda: st.sim.stats.in_flight == 1)
            req.cancel()
            await asyncio.gather(req, return_exceptions=True)
        else:
            resp = await session.post(st.url + "/v1/chat/completions",
                                      json={"messages": MSG, "stream": True})
            await resp.content.readuntil(b"tick")
            resp.close()
    finally:
        await session.close()
    await _until(lambda: bool(st.sim.stats.disconnects))
    assert st.sim.stats.requests == 1
    await st.assert_baseline()


# --- the trace collector is down ----------------------------------------------------------------

def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def test_trace_collector_down(make_fstack: Callable[..., Any]) -> None:
    st = await make_fstack(otlp_endpoint=f"http://127.0.0.1:{_closed_port()}", otlp_timeout=0.5)
    for _ in range(5):
        st.sim.push({"content": "still served"})
        status, raw = await post(st, {"messages": MSG, "stream": True})
        assert status == 200 and b'"content":"still"' in raw
        assert b'"error"' not in raw
    await st.assert_baseline()


# --- nothing accumulates -----------------------------------------------------------------------

async def test_repeated_faults_leave_no_memory_behind(make_fstack: Callable[..., Any]) -> None:
    st = await make_fstack(first_byte_timeout=0.2, idle_timeout=0.2, total_timeout=0.4)
    quick = [f[1] for f in UPSTREAM_FAULTS if f[0] not in ("never-ending stream",)]
    quick = [dict(s, token_delay=0) for s in quick]

    async def round_() -> None:
        for sc in quick:
            st.sim.push(sc)
            await post(st, {"messages": MSG, "stream": True})

    for _ in range(3):  # warm caches, interned strings, pools
        await round_()
    await st.assert_baseline()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(8):
            await round_()
        await st.assert_baseline()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # 8 rounds x 10 faults: anything kept per request would show as tens of KB each
    assert grown < 256 * 1024, f"{grown} bytes retained after {8 * len(quick)} faults"
