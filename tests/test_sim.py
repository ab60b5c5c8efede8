"""The simulated backend itself: dialect shapes, FIFO slots, timing, scripting, the CLI."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

import aiohttp
import orjson
import pytest

from toolmend.sim.server import SimBackend

from .conftest import Stack


async def _stream(url: str, body: dict) -> list[dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/chat/completions", json={**body, "stream": True}) as r:
            raw = await r.read()
    return [orjson.loads(line[6:]) for line in raw.split(b"\n")
            if line.startswith(b"data: {")]


@pytest.mark.parametrize(("dialect", "first_delta", "id_prefix"), [
    ("vllm", {"role": "assistant", "content": ""}, "chatcmpl-tool-"),
    ("llamacpp", {"role": "assistant", "content": None}, ""),
    ("ollama", {"role": "assistant", "content": ""}, "call_"),
])
async def test_dialect_first_chunk_and_tool_ids(dialect: str, first_delta: dict,
                                                id_prefix: str) -> None:
    sim = SimBackend(dialect)
    await sim.start()
    try:
        sim.push({"tool_calls": [{"name": "f", "arguments": {"a": 1}}]})
        chunks = await _stream(sim.url, {"messages": [{"role": "user", "content": "x"}]})
        assert chunks[0]["choices"][0]["delta"] == first_delta
        first_tc = next(c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
                        if c["choices"] and c["choices"][0]["delta"].get("tool_calls"))
        assert first_tc["id"].startswith(id_prefix)
        if dialect == "vllm":
            assert "arguments" not in first_tc["function"]
        if dialect == "llamacpp":
            assert first_tc["function"]["arguments"] == "{"
            assert "timings" in chunks[-1]
    finally:
        await sim.stop()


async def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.005)


async def test_slots_are_fifo_and_bounded() -> None:
    sim = SimBackend("llamacpp", slots=2, ttft=0, token_delay=0.001)
    await sim.start()
    held: list[asyncio.Task[list[dict]]] = []
    try:
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
        # two requests hold both slots (stalled before their first token) until they leave
        sim.push(*[{"content": "held", "fault": {"kind": "stall", "after": 0}}] * 2,
                 *[{"content": f"w{i}"} for i in range(1, 5)])
        held = [asyncio.create_task(_stream(sim.url, body)) for _ in range(2)]
        await _until(lambda: sim.stats.in_flight == 2)
        finished: list[str] = []
        waiting = []
        for i in range(1, 5):  # one at a time, so that they queue in this order
            task = asyncio.create_task(_stream(sim.url, body))
            task.add_done_callback(lambda t: finished.append(
                "".join(c["choices"][0]["delta"].get("content") or ""
                        for c in t.result() if c["choices"])))
            waiting.append(task)
            await _until(lambda i=i: sim.stats.queued == i)
        assert sim.stats.in_flight == 2 and sim.stats.requests == 6
        held[0].cancel()  # one slot frees: the four go through it one after another
        await asyncio.gather(*waiting)
        assert finished == ["w1", "w2", "w3", "w4"]  # in the order they came
        assert sim.stats.max_in_flight == 2 and sim.stats.queued == 0
    finally:
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        await sim.stop()


async def test_bundled_format_fixtures_are_scenarios() -> None:
    sim = SimBackend("vllm", ttft=0)
    n = sim.load_fixtures(Path(str(files("toolmend.fixtures"))))
    assert n > 50
    assert "hermes/one_call" in sim.library or any(k.startswith("hermes/") for k in sim.library)
    name = next(k for k in sim.library if "/" in k)
    await sim.start()
    try:
        chunks = await _stream(sim.url, {"messages": [{"role": "user",
                                                       "content": f"#scenario:{name}"}]})
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                       if c["choices"])
        assert text == sim.library[name].content
    finally:
        await sim.stop()


async def test_ollama_native_chat_ndjson() -> None:
    sim = SimBackend("ollama", ttft=0)
    await sim.start()
    try:
        sim.push({"content": "hi", "tool_calls": [{"name": "f", "arguments": {"a": 1}}]})
        async with aiohttp.ClientSession() as s:
            async with s.post(sim.url + "/api/chat", json={"model": "m", "messages": [
                    {"role": "user", "content": "hi"}]}) as r:
                lines = [orjson.loads(x) for x in (await r.read()).splitlines()]
            async with s.get(sim.url + "/") as r:
                assert await r.text() == "Ollama is running"
        assert lines[-1]["done"] is True and lines[-1]["eval_count"] > 0
        calls = [c for x in lines for c in x["message"].get("tool_calls", [])]
        assert calls == [{"function": {"name": "f", "arguments": {"a": 1}}}]
    finally:
        await sim.stop()


def test_sim_cli_serves(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "toolmend", "sim", "--port", str(port),
                             "--dialect", "llamacpp", "--slots", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert f"127.0.0.1:{port}" in line
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/props", timeout=5) as r:
            assert orjson.loads(r.read())["total_slots"] == 3
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_one_json_log_line_per_request(make_stack, caplog: pytest.LogCaptureFixture
                                             ) -> None:
    stack: Stack = await make_stack(log_requests=True)
    caplog.set_level(logging.INFO, logger="toolmend.access")
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.v1 + "/chat/completions", headers={"X-Agent-Id": "planner"},
                          json={"messages": [{"role": "user", "content": "x"}],
                                "stream": True}) as r:
            await r.read()
    lines = [orjson.loads(r.getMessage()) for r in caplog.records
             if r.name == "toolmend.access"]
    assert len(lines) == 1
    line = lines[0]
    assert line["agent_id"] == "planner" and line["status"] == 200
    assert line["request_id"].startswith("req_")
    assert line["ttft_ms"] is not None and line["duration_ms"] >= line["ttft_ms"]
    assert line["completion_tokens"] > 0
