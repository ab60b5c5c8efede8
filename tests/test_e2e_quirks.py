"""Each server's real tool-call bug, reproduced by the simulator, fixed on the way through."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import orjson
import pytest

from .conftest import Stack, StackFactory

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"]}}}]
MSG = [{"role": "user", "content": "Weather in Oslo?"}]


def client(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.v1, api_key="x", max_retries=0, timeout=20)


async def stream_calls(stack: Stack, **kw: Any) -> tuple[list[dict[str, str]], str | None, str]:
    calls: dict[int, dict[str, str]] = {}
    finish = None
    content = ""
    async for ch in await client(stack).chat.completions.create(
            model="sim-model", messages=MSG, tools=TOOLS, stream=True, **kw):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            slot["id"] += tc.id or ""
            slot["name"] += tc.function.name or ""
            slot["arguments"] += tc.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish, content


async def test_ollama_parallel_calls_get_distinct_indexes(make_stack: StackFactory) -> None:
    stack = await make_stack("ollama")
    stack.sim.push({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}},
                                   {"name": "get_weather", "arguments": {"city": "Bergen"}}]})
    calls, finish, _ = await stream_calls(stack)
    assert [orjson.loads(c["arguments"])["city"] for c in calls] == ["Oslo", "Bergen"]
    assert len({c["id"] for c in calls}) == 2
    assert finish == "tool_calls"


async def test_llama_cpp_python_name_repeated_in_every_chunk(make_stack: StackFactory) -> None:
    stack = await make_stack("llama-cpp-python")
    stack.sim.push({"tool_calls": [{"name": "get_weather",
                                    "arguments": {"city": "Oslo", "days": 3}}]})
    calls, finish, _ = await stream_calls(stack)
    assert calls[0]["name"] == "get_weather"  # not get_weatherget_weather...
    assert orjson.loads(calls[0]["arguments"]) == {"city": "Oslo", "days": 3}
    assert finish == "tool_calls"


async def test_vllm_duplicated_argument_tail(make_stack: StackFactory) -> None:
    stack = await make_stack("vllm")
    stack.sim.push({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}],
                    "quirks": {"duplicate_args_tail": True}})
    calls, _, _ = await stream_calls(stack)
    assert orjson.loads(calls[0]["arguments"]) == {"city": "Oslo"}


async def test_vllm_call_cut_by_max_tokens_with_invented_braces(make_stack: StackFactory) -> None:
    stack = await make_stack("vllm")
    stack.sim.push({"tool_calls": [{"name": "get_weather", "arguments": "{\"city\": \"Os"}],
                    "finish_reason": "length"})
    calls, finish, _ = await stream_calls(stack)
    assert orjson.loads(calls[0]["arguments"]) == {"city": "Os"}
    assert finish == "length"


@pytest.mark.parametrize("dialect", ["vllm", "llamacpp", "ollama"])
async def test_raw_tags_leaked_as_content_become_a_call(make_stack: StackFactory,
                                                        dialect: str) -> None:
    stack = await make_stack(dialect)
    stack.sim.push({"chunks": ["Let me check.", " <tool", "_call>\n{\"name\": \"get_",
                               "weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_",
                               "call>"]})
    calls, finish, content = await stream_calls(stack)
    assert content == "Let me check. "
    assert calls[0]["name"] == "get_weather"
    assert orjson.loads(calls[0]["arguments"]) == {"city": "Oslo"}
    assert finish == "tool_calls"


async def test_incremental_mode_per_request_header(stack: Stack) -> None:
    stack.sim.push({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]})
    calls, _, _ = await stream_calls(stack, extra_headers={"X-Toolmend-Tool-Mode":
                                                           "incremental"})
    assert orjson.loads(calls[0]["arguments"]) == {"city": "Oslo"}


async def test_unrepairable_call_is_an_explicit_error(stack: Stack) -> None:
    stack.sim.push({"content": "<tool_call>{\"name\": \"get_weather\", \"arguments\": "
                               "the city of Oslo please}</tool_call>"})
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.v1 + "/chat/completions",
                          json={"messages": MSG, "tools": TOOLS, "stream": True}) as r:
            raw = await r.read()
    events = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    err = orjson.loads(events[-2])["error"]
    assert err["code"] == "invalid_tool_call" and err["tool"] == "get_weather"
    assert b'"tool_calls"' not in raw  # nothing half-broken was passed on
    assert stack.sim.stats.requests == 2  # one retry (the default), then the error


async def test_repairs_are_reported_as_sse_comments(stack: Stack) -> None:
    stack.sim.push({"content": "<tool_call>{\"name\": \"get_weather\", \"arguments\": "
                               "{'city': 'Oslo'}}</tool_call>"})
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.v1 + "/chat/completions",
                          json={"messages": MSG, "tools": TOOLS, "stream": True}) as r:
            raw = await r.read()
    assert b": toolmend repaired call 0 get_weather: single_quotes" in raw


async def test_non_streaming_response_is_mended(stack: Stack) -> None:
    stack.sim.push({"content": "Sure.<tool_call>{\"name\": \"get_weather\", \"arguments\": "
                               "{\"city\": \"Oslo\",}}</tool_call>"})
    r = await client(stack).chat.completions.create(model="sim-model", messages=MSG,
                                                    tools=TOOLS)
    msg = r.choices[0].message
    assert msg.content == "Sure."
    assert msg.tool_calls and msg.tool_calls[0].function.name == "get_weather"
    assert orjson.loads(msg.tool_calls[0].function.arguments) == {"city": "Oslo"}
    assert r.choices[0].finish_reason == "tool_calls"


async def test_without_tools_text_is_left_alone(stack: Stack) -> None:
    text = "<tool_call>{\"name\": \"x\"}</tool_call>"
    stack.sim.push({"content": text})
    out = ""
    async for ch in await client(stack).chat.completions.create(model="m", messages=MSG,
                                                                stream=True):
        if ch.choices:
            out += ch.choices[0].delta.content or ""
    assert out == text
