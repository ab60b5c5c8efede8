"""llama-cpp-python's own OpenAI server with the real Gemma model, behind toolmend.

Its quirks (REAL-BACKENDS): name and id repeated in every tool-call chunk, the deprecated
``function_call`` beside ``tool_calls``, no usage chunk, ``owned_by: "me"``, no ``/health``.
toolmend must detect it and hand the agent one clean tool call.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest
from openai import AsyncOpenAI

from toolmend.app import build_app, start_server
from toolmend.config import Settings
from toolmend.detect import detect

pytestmark = pytest.mark.real

SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string", "enum": ["Oslo", "Paris", "Lima"]}},
          "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}]


@pytest.fixture
async def lcp_server() -> AsyncIterator[str]:
    """llama-cpp-python's server from the shared real-stack set-up (fails loudly, no skip)."""
    from tests.real.stacks import start_llama_cpp_python

    server = await asyncio.to_thread(start_llama_cpp_python)
    try:
        yield server.url
    finally:
        await asyncio.to_thread(server.stop)


async def _toolmend(upstream: str) -> tuple[Any, str]:
    settings = Settings(log_requests=False)
    runner, port = await start_server(build_app(settings, [upstream]), "127.0.0.1", 0)
    return runner, f"http://127.0.0.1:{port}"


async def test_detected_as_llama_cpp_python(lcp_server: str) -> None:
    d = await detect(lcp_server)
    assert d.kind == "llama-cpp-python"
    assert d.slots == 1
    assert d.model


async def test_named_tool_call_through_toolmend_is_one_clean_call(lcp_server: str) -> None:
    runner, url = await _toolmend(lcp_server)
    try:
        client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model="gemma", messages=[{"role": "user", "content": "Weather in Oslo?"}],
            tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=30, stream=True)
        calls: dict[int, dict[str, str]] = {}
        async for chunk in stream:
            for c in chunk.choices:
                for tc in c.delta.tool_calls or ():
                    acc = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                    acc["id"] = acc["id"] or tc.id or ""
                    if tc.function and tc.function.name:
                        acc["name"] += tc.function.name  # what an SDK accumulator does
                    if tc.function and tc.function.arguments:
                        acc["arguments"] += tc.function.arguments
        assert list(calls) == [0]
        assert calls[0]["name"] == "get_weather"  # not get_weatherget_weather...
        jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMA)
    finally:
        await runner.cleanup()
