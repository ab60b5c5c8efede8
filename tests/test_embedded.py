"""The embedded backend with the real Gemma 3 270M model, in-process, behind toolmend.

Outputs are kept short: the model makes about 40 tokens a second on two cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import jsonschema
import pytest
from openai import AsyncOpenAI

from toolmend.server.app import build_app, start_server
from toolmend.server.config import Settings

pytestmark = pytest.mark.real

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Oslo", "Paris", "Lima"]},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather",
                                           "description": "Current weather in a city",
                                           "parameters": WEATHER_SCHEMA}}]
ASK = [{"role": "user", "content": "What is the weather in Oslo, in celsius?"}]


@dataclass
class Embedded:
    backend: Any
    url: str  # toolmend

    def client(self) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
async def embedded() -> AsyncIterator[Embedded]:
    from toolmend.backends.embedded import start_embedded  # needs llama-cpp-python: no silent skip

    settings = Settings(log_requests=False)
    backend = await start_embedded(settings)
    app = build_app(settings, [backend.url])
    runner, port = await start_server(app, "127.0.0.1", 0)
    yield Embedded(backend, f"http://127.0.0.1:{port}")
    await runner.cleanup()
    await backend.stop()


async def test_streams_text_through_toolmend(embedded: Embedded) -> None:
    stream = await embedded.client().chat.completions.create(
        model=embedded.backend.model_name, messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    async for chunk in stream:
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            finish = c.finish_reason or finish
        usage = chunk.usage or usage
    assert len(pieces) >= 3  # real streaming: many deltas, not one blob
    assert "".join(pieces).strip()
    assert finish in ("stop", "length")
    assert usage is not None and 0 < usage.completion_tokens <= 12
    assert usage.prompt_tokens > 3


async def test_named_tool_choice_streams_a_schema_valid_call(embedded: Embedded) -> None:
    stream = await embedded.client().chat.completions.create(
        model=embedded.backend.model_name, messages=ASK, tools=TOOLS, max_tokens=40,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or ():
                acc = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                acc["id"] = tc.id or acc["id"]
                if tc.function and tc.function.name:
                    acc["name"] += tc.function.name  # an SDK accumulator appends
                if tc.function and tc.function.arguments:
                    acc["arguments"] += tc.function.arguments
    assert list(calls) == [0]
    call = calls[0]
    assert call["name"] == "get_weather"
    assert call["id"]
    args = json.loads(call["arguments"])
    jsonschema.validate(args, WEATHER_SCHEMA)
    assert finish == "tool_calls"


async def test_named_tool_choice_non_streaming(embedded: Embedded) -> None:
    r = await embedded.client().chat.completions.create(
        model=embedded.backend.model_name, messages=ASK, tools=TOOLS, max_tokens=40,
        tool_choice="required")  # one tool: the same as naming it
    msg = r.choices[0].message
    assert msg.tool_calls and msg.tool_calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(msg.tool_calls[0].function.arguments), WEATHER_SCHEMA)
    assert r.usage is not None and r.usage.completion_tokens > 0


async def test_client_disconnect_stops_generation(embedded: Embedded) -> None:
    engine = embedded.backend.engine
    body = {"model": "m", "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 400, "stream": True}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(embedded.url + "/v1/chat/completions", json=body)
        seen = 0
        async for line in resp.content:
            if line.startswith(b"data: ") and b'"content"' in line:
                seen += 1
                if seen >= 3:
                    break
        assert engine.stats.busy
        resp.close()  # the client goes away mid-stream
    # The worker checks the stop flag before every token (~25 ms apart).
    await asyncio.wait_for(engine.wait_idle(), 2.0)
    assert not engine.stats.busy
    assert engine.stats.last_finish == "cancelled"
    assert engine.stats.last_tokens < 100
    # and the model is free for the next request
    r = await embedded.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")


async def test_toolmend_serve_without_upstream_starts_embedded() -> None:
    """The main job: ``toolmend serve`` alone runs the model and reports it in /readyz."""
    env = {**os.environ, "TOOLMEND_LOG_REQUESTS": "false"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "toolmend", "serve", "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        m = re.search(rb"listening on (http://\S+)/v1", line)
        assert m, line
        base = m.group(1).decode()
        async with aiohttp.ClientSession() as s, s.get(base + "/readyz") as r:
            doc = await r.json()
        assert r.status == 200
        assert doc["backend"]["kind"] == "embedded"
        assert doc["models"] == ["gemma-3-270m-q4_k_m"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
