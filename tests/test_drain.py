"""Readiness and draining (proxy/server/lifecycle.py), with a real ``toolmend serve`` and SIGTERM.

The sim runs in this process, so the test holds the request in flight (a ``hold`` fault) for
as long as it likes: the drain is seen to wait for it, not guessed from timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import StackFactory
from toolmend.scheduling.scheduler import Cost, FairScheduler, TicketState
from toolmend.server.context import RequestContext
from toolmend.server.errors import ProxyError
from toolmend.server.lifecycle import Lifecycle, draining_error
from toolmend.sim.server import SimBackend

MSG = [{"role": "user", "content": "hello"}]
HELD = {"content": "held reply", "fault": {"kind": "hold"}}


@contextlib.asynccontextmanager
async def serve(sim: SimBackend, tmp_path: Path, *flags: str
                ) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """``toolmend serve`` in front of ``sim``, one slot; yields the process and its URL."""
    log = (tmp_path / "toolmend.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "toolmend", "serve", "--port", "0", "--upstream", sim.url,
        "--backend", "vllm", "--slots", "1", "--no-express-slot", "--keepalive-interval",
        "0.05", "--backend-load-interval", "0", *flags,
        stdout=asyncio.subprocess.PIPE, stderr=log, cwd=tmp_path)
    try:
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        assert line.startswith(b"toolmend listening on http://"), line
        url = line.split()[3].decode().removesuffix("/v1")
        yield proc, url
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        log.close()


async def get(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json(content_type=None)


async def queue_depth(url: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    return float(next(line.split()[1] for line in text.splitlines()
                      if line.startswith("toolmend_queue_depth ")))


async def until_async(check: Any) -> None:
    while True:
        if await check():
            return
        await asyncio.sleep(0.02)


def events(raw: bytes) -> list[Any]:
    out = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: "):
            data = block[6:]
            out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


def text_of(raw: bytes) -> str:
    return "".join((e["choices"][0]["delta"].get("content") or "")
                   for e in events(raw) if isinstance(e, dict) and e.get("choices"))


class Stream:
    """A streaming chat request read piece by piece."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.raw = b""
        self.status = 0
        self._session = aiohttp.ClientSession()
        self._resp: aiohttp.ClientResponse | None = None

    async def open(self) -> None:
        self._resp = await self._session.post(
            self.url + "/v1/chat/completions",
            json={"model": "sim-model", "messages": MSG, "stream": True})
        self.status = self._resp.status

    async def read_until(self, marker: bytes) -> None:
        assert self._resp is not None
        while marker not in self.raw:
            chunk = await self._resp.content.readany()
            assert chunk, f"the stream ended before {marker!r}: {self.raw!r}"
            self.raw += chunk

    async def read_all(self) -> bytes:
        assert self._resp is not None
        with contextlib.suppress(aiohttp.ClientPayloadError):
            self.raw += await self._resp.content.read()
        return self.raw

    async def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
        await self._session.close()


async def test_sigterm_drains(tmp_path: Path) -> None:
    sim = SimBackend("vllm", ttft=0.0)
    await sim.start()
    sim.push(HELD)
    streams: list[Stream] = []
    try:
        async with serve(sim, tmp_path, "--drain-grace", "120") as (proc, url):
            # A holds the one slot; B (streaming) and C (not) wait in toolmend's queue
            a = Stream(url)
            streams.append(a)
            await a.open()
            await until_async(lambda: _true(sim.stats.in_flight == 1))
            b = Stream(url)
            streams.append(b)
            await b.open()
            await b.read_until(b": keep-alive")  # B already has its 200
            session = aiohttp.ClientSession()
            c = asyncio.ensure_future(session.post(
                url + "/v1/chat/completions", json={"model": "sim-model", "messages": MSG}))
            await until_async(lambda: _is(queue_depth(url), 2.0))

            proc.send_signal(signal.SIGTERM)
            await until_async(lambda: _status_is(url + "/readyz", 503))
            status, doc = await get(url + "/readyz")
            assert status == 503 and doc["ready"] is False and doc["reason"].startswith("draining")
            assert (await get(url + "/healthz"))[0] == 200  # alive, just not ready

            # the queued ones are told to retry elsewhere, each in the way it can still hear
            resp_c = await c
            assert resp_c.status == 503
            assert resp_c.headers["Retry-After"] == "1"
            body_c = await resp_c.json()
            assert body_c["error"]["code"] == "draining"
            assert body_c["error"]["retry_after"] == 1
            resp_c.close()
            await session.close()
            raw_b = await b.read_all()
            assert b.status == 200
            *_, err, done = events(raw_b)
            assert err["error"]["code"] == "draining" and err["error"]["type"] == \
                "service_unavailable"
            assert done == "[DONE]"

            # a new request is refused the same way
            async with aiohttp.ClientSession() as s, s.post(
                    url + "/v1/chat/completions",
                    json={"model": "sim-model", "messages": MSG}) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1"
                assert (await r.json())["error"]["code"] == "draining"

            # A is still in flight, and toolmend is still waiting for it
            assert proc.returncode is None
            assert sim.stats.in_flight == 1 and sim.stats.requests == 1
            sim.open_gate()
            raw_a = await a.read_all()
            assert text_of(raw_a) == "held reply"
            assert raw_a.endswith(b"data: [DONE]\n\n")
            assert await proc.wait() == 0
        log = (tmp_path / "toolmend.log").read_text()
        assert "draining: 2 queued requests told to retry elsewhere" in log
        assert "drained: every request finished" in log
    finally:
        for st in streams:
            await st.close()
        await sim.stop()


async def test_in_flight_past_the_grace_is_cut(tmp_path: Path) -> None:
    sim = SimBackend("vllm", ttft=0.0)
    await sim.start()
    sim.push(HELD)
    a = Stream("")
    try:
        async with serve(sim, tmp_path, "--drain-grace", "0.2") as (proc, url):
            a.url = url
            await a.open()
            await until_async(lambda: _true(sim.stats.in_flight == 1))
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0  # the gate never opened: it did not wait for A
            raw = await a.read_all()
            assert "held reply" not in text_of(raw)
            assert b"data: [DONE]" not in raw
        log = (tmp_path / "toolmend.log").read_text()
        assert "drain grace of 0.2 s is over: 1 requests in progress are cut" in log
    finally:
        sim.open_gate()
        await a.close()
        await sim.stop()


async def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    sim = SimBackend("vllm", ttft=0.0)
    await sim.start()
    sim.push(HELD)
    a = Stream("")
    try:
        async with serve(sim, tmp_path, "--drain-grace", "3600") as (proc, url):
            a.url = url
            await a.open()
            await until_async(lambda: _true(sim.stats.in_flight == 1))
            proc.send_signal(signal.SIGTERM)
            await until_async(lambda: _status_is(url + "/readyz", 503))
            proc.send_signal(signal.SIGINT)
            assert await proc.wait() == 0
    finally:
        sim.open_gate()
        await a.close()
        await sim.stop()


async def _true(value: bool) -> bool:
    return value


async def _is(aw: Any, expected: float) -> bool:
    return await aw == expected


async def _status_is(url: str, status: int) -> bool:
    return (await get(url))[0] == status


# --- readiness: loading and wedged slots --------------------------------------------------------

async def test_not_ready_while_loading_then_ready(make_stack: StackFactory) -> None:
    stack = await make_stack(sim_kwargs={"loading": True})
    status, doc = await get(stack.url + "/readyz")
    assert status == 503 and "Loading model" in doc["reason"]
    stack.sim.loading = False
    status, doc = await get(stack.url + "/readyz")
    assert status == 200 and doc["ready"] is True


async def test_not_ready_while_every_slot_is_wedged(make_stack: StackFactory) -> None:
    stack = await make_stack(slots=2, express_slot=False, wedged_after=0.05,
                             sim_kwargs={"ttft": 0.0})
    stack.sim.push(HELD, HELD)
    tasks = [asyncio.ensure_future(_chat(stack.url)) for _ in range(2)]
    try:
        await until_async(lambda: _status_is(stack.url + "/readyz", 503))
        status, doc = await get(stack.url + "/readyz")
        assert status == 503
        assert doc["reason"] == ("every backend slot (2) is held by a request without progress "
                                 "for over 0.05 s (wedged_after)")
        stack.sim.open_gate()
        await asyncio.gather(*tasks)
        assert (await get(stack.url + "/readyz"))[0] == 200
    finally:
        stack.sim.open_gate()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _chat(url: str) -> None:
    async with aiohttp.ClientSession() as s, s.post(
            url + "/v1/chat/completions", json={"model": "sim-model", "messages": MSG}) as r:
        assert r.status == 200


def _ctx(rid: str, dispatched: float | None, first: float | None = None,
         client_first: float | None = None, bytes_out: int = 0) -> RequestContext:
    ctx = RequestContext(rid, "/v1/chat/completions", 0.0)
    ctx.dispatched_at, ctx.upstream_first_token_at = dispatched, first
    ctx.client_first_token_at, ctx.bytes_out = client_first, bytes_out
    return ctx


def test_wedged_is_no_progress_for_the_bound() -> None:
    life = Lifecycle(wedged_after=10.0)
    queued = _ctx("q", None)
    prefill = _ctx("p", dispatched=0.0)  # no first token since t=0
    talking = _ctx("t", dispatched=0.0, first=1.0, client_first=1.0, bytes_out=100)
    for ctx in (queued, prefill, talking):
        life.enter(ctx)
    assert life.wedged(5.0) == 0
    assert life.wedged(10.5) == 1  # the prefill; the talker's output was seen moving at 5.0
    talking.bytes_out = 200
    assert life.wedged(20.0) == 1  # it moved again: seen at 20.0
    assert life.wedged(30.5) == 2  # nothing since 20.0
    life.leave(prefill)
    assert life.wedged(30.5) == 1
    assert Lifecycle(wedged_after=0.0).wedged(1e9) == 0  # off


def test_keep_alives_are_not_progress() -> None:
    life = Lifecycle(wedged_after=10.0)
    ctx = _ctx("k", dispatched=0.0)
    life.enter(ctx)
    ctx.bytes_out = 5000  # keep-alive comments while the backend says nothing
    assert life.wedged(11.0) == 1


# --- the scheduler's drain, without sockets -----------------------------------------------------

def test_scheduler_drain_refuses_queued_and_new_and_keeps_running() -> None:
    now = [0.0]
    sched = FairScheduler(1, express_slot=False, clock=lambda: now[0])
    running = sched.submit("a", Cost(10))
    queued = [sched.submit("a", Cost(10)), sched.submit("b", Cost(10))]
    assert running.state is TicketState.DISPATCHED
    assert sched.drain(draining_error) == 2
    assert [t.state for t in queued] == [TicketState.CANCELLED] * 2
    assert sched.queued == 0 and sched.in_flight == 1
    with pytest.raises(ProxyError) as e:
        sched.submit("c", Cost(1))
    assert e.value.status == 503 and e.value.code == "draining"
    assert e.value.headers["Retry-After"] == "1"
    assert sched.release(running) == []  # nothing dispatched after it
    assert sched.in_flight == 0
    assert sched.rejections["draining"] == 3


async def test_queued_waiters_get_the_refusal() -> None:
    sched = FairScheduler(1, express_slot=False)
    ctx1 = RequestContext("r1", "/x", 0.0, agent_id="a")
    ctx2 = RequestContext("r2", "/x", 0.0, agent_id="b")
    async with sched.slot(ctx1, Cost(1)):
        waiter = asyncio.ensure_future(_hold(sched, ctx2))
        await until_async(lambda: _true(sched.queued == 1))
        sched.drain(draining_error)
        with pytest.raises(ProxyError) as e:
            await waiter
        assert e.value.code == "draining"
    assert sched.in_flight == 0 and sched.queued == 0


async def _hold(sched: FairScheduler, ctx: RequestContext) -> None:
    async with sched.slot(ctx, Cost(1)):
        pass


# --- the drain endpoint (a native sidecar's model server calls it from preStop) ------------------

async def test_drain_endpoint_waits_for_in_flight(make_stack: StackFactory) -> None:
    stack = await make_stack(slots=1, express_slot=False, sim_kwargs={"ttft": 0.0})
    stack.sim.push(HELD)
    held = asyncio.ensure_future(_chat(stack.url))
    try:
        await until_async(lambda: _true(stack.sim.stats.in_flight == 1))
        session = aiohttp.ClientSession()
        drain = asyncio.ensure_future(session.post(stack.url + "/toolmend/v1/drain"))
        await until_async(lambda: _status_is(stack.url + "/readyz", 503))
        async with aiohttp.ClientSession() as s, s.post(
                stack.url + "/v1/chat/completions",
                json={"model": "sim-model", "messages": MSG}) as r:
            assert r.status == 503 and (await r.json())["error"]["code"] == "draining"
        assert not drain.done()  # the held request is still in flight
        stack.sim.open_gate()
        await held
        resp = await drain
        assert resp.status == 200
        assert await resp.json() == {"drained": True, "in_progress": 0}
        resp.close()
        # a second call (SIGTERM after the preStop hook) finds the drain over
        async with session.post(stack.url + "/toolmend/v1/drain") as again:
            assert again.status == 200
        await session.close()
    finally:
        stack.sim.open_gate()
        await asyncio.gather(held, return_exceptions=True)


async def test_drain_endpoint_is_loopback_or_admin_key() -> None:
    from aiohttp.test_utils import make_mocked_request

    from toolmend.server.app import build_app
    from toolmend.server.config import Settings
    from toolmend.server.lifecycle import drain_handler

    app = build_app(Settings(admin_key="adm1n", log_requests=False), ["http://127.0.0.1:9"])

    class Transport:
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return ("10.1.2.3", 1234) if name == "peername" else default

        def is_closing(self) -> bool:
            return False

    for headers in ({}, {"Authorization": "Bearer nope"}):
        req = make_mocked_request("POST", "/toolmend/v1/drain", headers=headers, app=app,
                                  transport=Transport())
        with pytest.raises(ProxyError) as e:
            await drain_handler(req)
        assert e.value.status == 403
