"""Three toolmend sidecars, each a real ``toolmend serve`` process in front of its own simulated
backend, behind a stand-in for the inference gateway's endpoint picker (tests/gateway_picker.py)
that routes by the metrics the sidecars serve. Agents reach the picker through a toolmend set up
as a client of a gateway (``gateway_upstream``), which names each request's agent.

Structure, not timing, is asserted: no backend is ever sent more than its slots; the picker
never sends a request to the sidecar whose reported waiting count is the highest; the fairness
id the picker receives is the agent's, and the sidecar behind it queues the request under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.gateway_picker import Decision, StandInPicker
from toolmend.server.app import build_app, start_server
from toolmend.server.config import Settings
from toolmend.sim.server import SimBackend

SLOTS = 2
HELD = {"content": "held", "fault": {"kind": "hold"}}
AGENTS = ("planner", "coder", "reviewer")


async def until(check: Callable[[], bool]) -> None:
    while True:
        if check():
            return
        await asyncio.sleep(0.01)


async def banner(proc: asyncio.subprocess.Process) -> bytes:
    assert proc.stdout is not None
    return await proc.stdout.readline()


@contextlib.asynccontextmanager
async def sidecars(sims: list[SimBackend], tmp_path: Path) -> AsyncIterator[list[str]]:
    """One ``toolmend serve`` process per sim, started together; yields their URLs."""
    logs = [(tmp_path / f"sidecar-{i}.log").open("wb") for i in range(len(sims))]
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "toolmend", "serve", "--port", "0", "--upstream", sim.url,
        "--backend", "vllm", "--slots", str(SLOTS), "--no-express-slot",
        "--trusted-gateways", "127.0.0.1", "--backend-load-interval", "0.05",
        "--drain-grace", "5", stdout=asyncio.subprocess.PIPE, stderr=log, cwd=tmp_path)
        for sim, log in zip(sims, logs, strict=True)]
    try:
        lines = await asyncio.gather(*(banner(p) for p in procs))
        for line in lines:
            assert line.startswith(b"toolmend listening on http://"), line
        yield [line.split()[3].decode().removesuffix("/v1") for line in lines]
    finally:
        for p in procs:
            if p.returncode is None:
                p.terminate()
        for p in procs:
            await p.wait()
        for log in logs:
            log.close()


@contextlib.asynccontextmanager
async def pool(tmp_path: Path) -> AsyncIterator[tuple[list[SimBackend], list[str],
                                                      StandInPicker, str]]:
    """Three sims, three sidecars, the stand-in picker, and the agents' own toolmend."""
    sims = [SimBackend("vllm", slots=SLOTS, ttft=0.0, default_tokens=6) for _ in range(3)]
    for sim in sims:
        await sim.start()
    async with contextlib.AsyncExitStack() as stack:
        urls = await stack.enter_async_context(sidecars(sims, tmp_path))
        picker = StandInPicker(urls)
        await picker.start()
        stack.push_async_callback(picker.stop)
        client_side = Settings(log_requests=False, gateway_upstream=True, backend="openai",
                               slots=64, backend_load_interval=0.0)
        runner, port = await start_server(build_app(client_side, [picker.url]), "127.0.0.1", 0)
        stack.push_async_callback(runner.cleanup)
        try:
            yield sims, urls, picker, f"http://127.0.0.1:{port}"
        finally:
            for sim in sims:
                sim.open_gate()
    for sim in sims:
        await sim.stop()


async def chat(url: str, agent: str, text: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.post(
            url + "/v1/chat/completions", headers={"X-Agent-Id": agent},
            json={"model": "sim-model", "messages": [{"role": "user", "content": text}]}) as r:
        doc = await r.json()
        assert r.status == 200, doc
        return doc


async def reported_waiting(picker: StandInPicker, endpoint: int, expected: float) -> None:
    while True:
        if (await picker.scrape())[endpoint].waiting == expected:
            return
        await asyncio.sleep(0.02)


def chats(picker: StandInPicker) -> list[Decision]:
    """The picker's decisions for chat requests (the client toolmend's start-up probes aside)."""
    return [d for d in picker.decisions if d.body]


def highest_waiting(d: Decision) -> int | None:
    """The endpoint whose reported waiting count is the highest, when one alone is."""
    waiting = [x.waiting for x in d.loads]
    top = max(waiting)
    return waiting.index(top) if waiting.count(top) == 1 else None


async def test_the_picker_routes_by_what_the_sidecars_report(tmp_path: Path) -> None:
    async with pool(tmp_path) as (sims, urls, picker, client):
        # sidecar 0 takes a burst straight from an agent of its own: two requests run in its
        # backend (held there) and three wait in its queue, which it reports to the picker
        sims[0].push(*[HELD] * 5)
        direct = [asyncio.ensure_future(chat(urls[0], "bulk", f"bulk {i}")) for i in range(5)]
        await until(lambda: sims[0].stats.in_flight == SLOTS)
        await reported_waiting(picker, 0, 3.0)

        for i in range(9):  # each sees sidecar 0 as the one with the most waiting
            await chat(client, AGENTS[i % 3], f"{AGENTS[i % 3]} step {i}")
        steered = chats(picker)
        assert len(steered) == 9
        assert all(highest_waiting(d) == 0 for d in steered)
        assert all(d.chosen != 0 for d in steered)
        assert sims[0].stats.requests == SLOTS  # the burst's first two; three still queued

        sims[0].open_gate()
        await asyncio.gather(*direct)

        # then all three agents at once, through the picker
        work = [chat(client, agent, f"{agent} task {j}") for j in range(6) for agent in AGENTS]
        await asyncio.gather(*work)

        decisions = chats(picker)
        assert len(decisions) == 9 + 18
        for d in decisions:
            top = highest_waiting(d)
            assert top is None or d.chosen != top, d.loads
        # no backend was ever sent more than its slots, whatever reached its sidecar
        assert all(sim.stats.max_concurrent <= SLOTS for sim in sims)
        assert sims[0].stats.max_concurrent == SLOTS  # the burst waited in toolmend, not there
        assert sum(sim.stats.completed for sim in sims) == 5 + 9 + 18

        # the fairness id the picker received is the agent's, and the objective its class
        for d in decisions:
            text = orjson.loads(d.body)["messages"][-1]["content"]
            assert d.fairness_id == text.split()[0]
            assert d.objective == "priority-0"
        # and each sidecar queued those requests under that agent
        seen: set[str] = set()
        async with aiohttp.ClientSession() as s:
            for url in urls:
                async with s.get(url + "/toolmend/v1/sessions") as r:
                    seen |= {x["agent_id"] for x in (await r.json())["data"]}
        assert seen == {*AGENTS, "bulk"}
