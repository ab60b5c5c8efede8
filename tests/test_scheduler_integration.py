"""The fair queue in front of the simulated backend, over real HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from toolmend.server.app import SCHEDULER, build_app, start_server
from toolmend.server.config import Settings
from toolmend.sim.server import SimBackend

from .conftest import Stack, StackFactory


def _body(tokens: int = 4, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": tokens, "stream": stream, **extra}


async def _call(session: aiohttp.ClientSession, stack: Stack, agent: str, tokens: int = 4,
                stream: bool = True, headers: dict[str, str] | None = None,
                ) -> tuple[int, dict[str, str], bytes]:
    h = {"X-Agent-Id": agent, **(headers or {})}
    async with session.post(stack.v1 + "/chat/completions", json=_body(tokens, stream),
                            headers=h) as r:
        return r.status, dict(r.headers), await r.read()


@pytest.mark.parametrize("slots", [1, 4])
async def test_backend_never_sees_more_than_its_slots(make_stack: StackFactory,
                                                      slots: int) -> None:
    # the sim itself could take 64 at once: only toolmend's queue keeps it to `slots`
    stack = await make_stack(slots=slots, sim_kwargs={"slots": 64, "token_delay": 0.004,
                                                      "ttft": 0.01})
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(
            _call(s, stack, "heavy" if i % 2 else "light", tokens=12 if i % 2 else 3,
                  stream=i % 3 != 0) for i in range(20)))
    assert [r[0] for r in results] == [200] * 20
    assert stack.sim.stats.requests == 20
    assert stack.sim.stats.max_in_flight == slots


async def test_one_agent_alone_keeps_every_slot_busy(make_stack: StackFactory) -> None:
    """Its own small loop steps never make toolmend hold a slot back from its long requests."""
    stack = await make_stack(slots=3, sim_kwargs={"slots": 64, "token_delay": 0.01,
                                                  "ttft": 0.01})
    async with aiohttp.ClientSession() as s:
        for _ in range(3):  # a tool loop: small steps with a tool time between them
            status, _, _ = await _call(s, stack, "solo", tokens=3,
                                       headers={"X-Session-Id": "loop"})
            assert status == 200
        results = await asyncio.gather(*(
            _call(s, stack, "solo", tokens=30, headers={"X-Session-Id": "batch"})
            for _ in range(6)))
    assert [r[0] for r in results] == [200] * 6
    assert stack.sim.stats.max_in_flight == 3


def _scheduler(stack: Stack) -> Any:
    assert stack.app is not None
    return stack.app[SCHEDULER]


async def _wait_until(cond: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("stream", [True, False])
async def test_disconnect_while_queued_never_reaches_the_backend(make_stack: StackFactory,
                                                                 stream: bool) -> None:
    stack = await make_stack(slots=1, sim_kwargs={"token_delay": 0.03, "ttft": 0.01})
    async with aiohttp.ClientSession() as s:
        long = asyncio.create_task(_call(s, stack, "a", tokens=20))  # ~0.6 s
        await _wait_until(lambda: stack.sim.stats.in_flight == 1)
        gone = asyncio.create_task(_call(s, stack, "b", stream=stream))
        await _wait_until(lambda: _scheduler(stack).queued == 1)
        gone.cancel()  # the client gives up while its request waits for the slot
        with pytest.raises(asyncio.CancelledError):
            await gone
        await _wait_until(lambda: _scheduler(stack).queued == 0)  # its place is given up
        after = await _call(s, stack, "c")
        assert after[0] == 200 and (await long)[0] == 200
    assert stack.sim.stats.requests == 2  # a and c; b never left toolmend


async def test_full_queue_is_429_with_retry_after(make_stack: StackFactory) -> None:
    stack = await make_stack(slots=1, max_queue_per_agent=1, max_queue=2,
                             sim_kwargs={"token_delay": 0.03, "ttft": 0.01})
    async with aiohttp.ClientSession() as s:
        running = asyncio.create_task(_call(s, stack, "a", tokens=15))
        await _wait_until(lambda: stack.sim.stats.in_flight == 1)
        waiting = asyncio.create_task(_call(s, stack, "a"))
        await _wait_until(lambda: _scheduler(stack).queued == 1)
        status, headers, raw = await _call(s, stack, "a")
        assert status == 429 and int(headers["Retry-After"]) >= 1
        err = orjson.loads(raw)["error"]
        assert err["code"] == "agent_queue_full" and err["type"] == "rate_limit_error"
        other = asyncio.create_task(_call(s, stack, "b"))  # another agent may still queue
        await _wait_until(lambda: _scheduler(stack).queued == 2)
        status, headers, raw = await _call(s, stack, "c", stream=False)
        assert status == 429 and b"queue_full" in raw and "Retry-After" in headers
        assert [(await t)[0] for t in (running, waiting, other)] == [200, 200, 200]


async def test_queue_ttl_is_503(make_stack: StackFactory) -> None:
    stack = await make_stack(slots=1, queue_ttl=0.2,
                             sim_kwargs={"token_delay": 0.03, "ttft": 0.01})
    async with aiohttp.ClientSession() as s:
        running = asyncio.create_task(_call(s, stack, "a", tokens=20))
        await _wait_until(lambda: stack.sim.stats.in_flight == 1)
        status, headers, raw = await _call(s, stack, "b")
        assert status == 503 and b'"queue_timeout"' in raw and "Retry-After" in headers
        status, _, raw = await _call(s, stack, "b", stream=False,
                                     headers={"X-Toolmend-Deadline-Ms": "50"})
        assert status == 503 and b'"deadline_exceeded"' in raw
        assert (await running)[0] == 200
    assert stack.sim.stats.requests == 1


async def test_keepalives_flow_while_queued(make_stack: StackFactory) -> None:
    stack = await make_stack(slots=1, keepalive_interval=0.05,
                             sim_kwargs={"token_delay": 0.03, "ttft": 0.01})
    async with aiohttp.ClientSession() as s:
        running = asyncio.create_task(_call(s, stack, "a", tokens=10))
        await _wait_until(lambda: stack.sim.stats.in_flight == 1)
        status, _, raw = await _call(s, stack, "b")
        assert status == 200 and raw.startswith(b": keep-alive") and raw.endswith(b"[DONE]\n\n")
        await running


async def test_slots_from_llama_server_props_and_vllm_priority() -> None:
    sim = SimBackend("llamacpp", slots=3)
    await sim.start()
    app = build_app(Settings(log_requests=False, vllm_priority=True), [sim.url])
    runner, port = await start_server(app, "127.0.0.1", 0)
    try:
        assert app[SCHEDULER].slots == 3
        async with aiohttp.ClientSession() as s, s.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", json=_body(stream=False),
                headers={"X-Priority": "-2"}) as r:
            assert r.status == 200
        # class -2 is vLLM's 4 (lower first); a small first step goes one ahead of it: 3
        assert sim.stats.bodies[-1]["priority"] == 3
    finally:
        await runner.cleanup()
        await sim.stop()
