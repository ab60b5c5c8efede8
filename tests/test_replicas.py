"""Several upstreams for one model: least-loaded routing, health checks, failover before the
first byte and never after."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from toolmend.backends.upstream import UpstreamClient
from toolmend.server.app import UPSTREAM, build_app, start_server
from toolmend.server.config import Settings
from toolmend.sim.server import SimBackend

MSG = [{"role": "user", "content": "hello"}]


@dataclasses.dataclass
class Pair:
    sims: list[SimBackend]
    url: str
    up: UpstreamClient

    @property
    def v1(self) -> str:
        return self.url + "/v1"


Factory = Callable[..., Any]


@pytest.fixture
async def make_pair() -> AsyncIterator[Factory]:
    """Two sims (replicas of one model) behind one toolmend."""
    cleanups: list[Any] = []

    async def factory(n: int = 2, *, sim_kwargs: dict[str, Any] | None = None,
                      **settings_kwargs: Any) -> Pair:
        sims = []
        for _ in range(n):
            sim = SimBackend("vllm", **(sim_kwargs or {}))
            await sim.start()
            cleanups.append(sim)
            sims.append(sim)
        settings = Settings(**{"log_requests": False, "health_interval": 0.1, "slots": 16,
                               **settings_kwargs})
        app = build_app(settings, [s.url for s in sims])
        runner, port = await start_server(app, "127.0.0.1", 0)
        cleanups.append(runner)
        return Pair(sims, f"http://127.0.0.1:{port}", app[UPSTREAM])

    yield factory
    for c in reversed(cleanups):
        await (c.stop() if isinstance(c, SimBackend) else c.cleanup())


def client(pair: Pair) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=pair.v1, api_key="x", max_retries=0, timeout=20)


async def ask(pair: Pair, stream: bool = False) -> str:
    c = client(pair)
    if not stream:
        r = await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=4)
        return r.choices[0].message.content or ""
    out = ""
    async for ch in await c.chat.completions.create(model="sim-model", messages=MSG,
                                                    max_tokens=4, stream=True):
        if ch.choices:
            out += ch.choices[0].delta.content or ""
    return out


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.02)


async def readyz(pair: Pair) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.get(pair.url + "/readyz") as r:
            return r.status, await r.json()


def test_pick_prefers_healthy_then_least_loaded() -> None:
    up = UpstreamClient(["http://a", "http://b", "http://c"], Settings())
    a, b, c = up.replicas
    a.in_flight, b.in_flight, c.in_flight = 3, 1, 2
    assert up.pick() is b
    b.healthy = False
    assert up.pick() is c
    assert up.pick([c]) is a
    assert up.pick([a, c]) is b  # an unhealthy replica is still a last resort
    assert up.pick([a, b, c]) is None
    for r in up.replicas:
        r.in_flight, r.healthy = 0, True
    assert {up.pick().url for _ in range(6)} == {"http://a", "http://b", "http://c"}


async def test_sequential_requests_alternate(make_pair: Factory) -> None:
    pair = await make_pair()
    for _ in range(6):
        assert await ask(pair)
    assert [s.stats.requests for s in pair.sims] == [3, 3]


async def test_least_loaded_spreads_concurrent_load(make_pair: Factory) -> None:
    pair = await make_pair(sim_kwargs={"token_delay": 0.03})
    # one long request pins replica 0 or 1; the next ones go to the other until loads even out
    long = asyncio.create_task(client(pair).chat.completions.create(
        model="sim-model", messages=MSG, max_tokens=40))
    await until(lambda: sum(s.stats.in_flight for s in pair.sims) == 1)
    busy = next(i for i, s in enumerate(pair.sims) if s.stats.in_flight)
    await ask(pair, stream=True)
    assert pair.sims[1 - busy].stats.requests == 1 and pair.sims[busy].stats.requests == 1
    await long
    results = await asyncio.gather(*(ask(pair, stream=True) for _ in range(8)))
    assert all(results)
    assert [s.stats.requests for s in pair.sims] == [5, 5]
    assert [s.stats.max_in_flight for s in pair.sims] == [4, 4]


async def test_stopped_replica_is_skipped_until_it_answers_again(make_pair: Factory) -> None:
    pair = await make_pair()
    a, b = pair.sims
    for i in range(4):
        assert await ask(pair, stream=bool(i % 2))
    assert a.stats.requests == 2 and b.stats.requests == 2
    port = int(a.url.rsplit(":", 1)[1])
    await a.stop()  # mid-run: connections to it are refused from now on
    for i in range(6):
        assert await ask(pair, stream=bool(i % 2))
    assert b.stats.requests == 8
    status, doc = await readyz(pair)
    assert status == 200 and doc["ready"] is True
    health = {r["url"]: r["healthy"] for r in doc["backend"]["replicas"]}
    assert health == {a.url: False, b.url: True}

    revived = SimBackend("vllm")  # the replica comes back on the same address
    await revived.start(port=port)
    try:
        await until(lambda: all(r.healthy for r in pair.up.replicas))
        for _ in range(4):
            assert await ask(pair)
        assert revived.stats.requests == 2
    finally:
        await revived.stop()


async def test_failover_when_a_replica_drops_the_request(make_pair: Factory) -> None:
    pair = await make_pair(health_interval=60)
    a, b = pair.sims
    # reads the request, then resets the connection, however often it is resent
    a.push({"fault": {"kind": "refuse", "times": 3}})
    served = 0
    while a.stats.requests == 0:
        assert await ask(pair, stream=True)  # never fails: the request moved to b
        served += 1
        assert served <= 2
    assert b.stats.requests == served
    assert a.stats.completed == 0
    assert [r.healthy for r in pair.up.replicas] == [False, True]


async def test_no_failover_after_the_first_byte(make_pair: Factory) -> None:
    pair = await make_pair()
    broken = {"content": "one two three four five six", "fault": {"kind": "reset", "after": 3}}
    for s in pair.sims:
        s.push(broken)
    async with aiohttp.ClientSession() as s:
        async with s.post(pair.v1 + "/chat/completions",
                          json={"messages": MSG, "stream": True}) as r:
            assert r.status == 200
            raw = await r.read()
    events = [ln[6:] for ln in raw.split(b"\n") if ln.startswith(b"data: ")]
    assert b"one" in raw
    assert events[-1] == b"[DONE]"
    assert orjson.loads(events[-2])["error"]["code"] == "upstream_disconnected"
    assert sorted(s.stats.requests for s in pair.sims) == [0, 1]  # the other never saw it


async def test_all_replicas_down(make_pair: Factory) -> None:
    pair = await make_pair()
    for s in pair.sims:
        await s.stop()
    with pytest.raises(openai.APIStatusError) as e:
        await ask(pair)
    assert e.value.status_code == 502
    status, doc = await readyz(pair)
    assert status == 503 and doc["ready"] is False
    assert not any(r["healthy"] for r in doc["backend"]["replicas"])
