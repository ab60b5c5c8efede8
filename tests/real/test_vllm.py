"""vLLM's CPU build with its hermes tool parser, real Gemma model (converted), via toolmend.

A 270M base model will not write a given broken call on request, so each bug is produced exactly
with ``structured_outputs: {"regex": ...}``: the model's output is forced to the literal text,
and vLLM's own parser then does what it does with it, as seen on the real server: invalid JSON
inside the tags is streamed as corrupted arguments; a call cut by ``max_tokens`` arrives with
invented ``{}``; unknown tool names pass; a named ``tool_choice`` ends with ``finish_reason:
"stop"``; with ``tool_choice: "none"`` raw ``<tool_call>`` text comes out as content.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import jsonschema
import pytest

from toolmend.backends.detect import detect
from toolmend.server.keys import SETTINGS

from .helpers import (
    ASK,
    NAMED,
    ON_INVALID,
    TOOL_MODE,
    TOOLS,
    WEATHER_SCHEMA,
    literal,
    post_json,
    raw_stream,
    sdk_stream,
)
from .stacks import Server

pytestmark = pytest.mark.real

MODES = ["buffered", "incremental"]


def tagged(call_json: str) -> str:
    return f"<tool_call>\n{call_json}\n</tool_call>"


def forced(text: str, **body: Any) -> dict[str, Any]:
    """A request whose reply is exactly ``text`` (greedy, regex-constrained)."""
    return {"messages": ASK, "tools": TOOLS, "max_tokens": 80, "temperature": 0,
            "structured_outputs": {"regex": literal(text)}, **body}


GOOD = tagged('{"name": "get_weather", "arguments": {"city": "Paris"}}')


async def _sdk(base_v1: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    extra = {k: body.pop(k) for k in ("structured_outputs",) if k in body}
    return await sdk_stream(base_v1, headers=headers, extra_body=extra, **body)


async def test_detected_as_vllm(vllm: Server) -> None:
    d = await detect(vllm.url)
    assert d.kind == "vllm"
    assert d.model == "gemma-3-270m"
    assert d.details.get("max_model_len") == 1024


@pytest.mark.parametrize("mode", MODES)
async def test_forced_call_streams_as_one_clean_call(make_proxy: Any, vllm: Server,
                                                     mode: str) -> None:
    proxy = await make_proxy(vllm)
    got = await _sdk(proxy.v1, forced(GOOD), {TOOL_MODE: mode})
    assert [c["name"] for c in got.calls] == ["get_weather"]
    assert got.calls[0]["id"]
    assert got.args() == {"city": "Paris"}
    assert got.finish == "tool_calls"
    assert "<tool_call>" not in got.content


async def test_forced_call_non_streaming(make_proxy: Any, vllm: Server) -> None:
    proxy = await make_proxy(vllm)
    status, doc = await post_json(proxy.v1, forced(GOOD))
    assert status == 200, doc
    choice = doc["choices"][0]
    calls = choice["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert choice["finish_reason"] == "tool_calls"


STRICT_SCHEMA: dict[str, Any] = {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"], "additionalProperties": False}
STRICT_WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "strict": True, "parameters": STRICT_SCHEMA}}]


@pytest.mark.parametrize("mode", MODES)
async def test_named_tool_choice_finish_reason(make_proxy: Any, vllm: Server,
                                               mode: str) -> None:
    """vLLM honours a named ``tool_choice`` (schema-guided with ``strict``) but ends it with
    ``stop``; an agent loop that waits for ``tool_calls`` would stop. The agent gets
    ``tool_calls``."""
    body = {"messages": ASK, "tools": STRICT_WEATHER, "tool_choice": NAMED, "max_tokens": 40,
            "temperature": 0}
    direct = await raw_stream(vllm.v1, body)
    assert direct.finish == "stop"
    assert [c["name"] for c in direct.tool_calls()] == ["get_weather"]
    proxy = await make_proxy(vllm)
    got = await sdk_stream(proxy.v1, headers={TOOL_MODE: mode}, **body)
    assert [c["name"] for c in got.calls] == ["get_weather"]
    jsonschema.validate(got.args(), STRICT_SCHEMA)
    assert got.args()["city"] == "Oslo"
    assert got.finish == "tool_calls"


@pytest.mark.parametrize("mode", MODES)
async def test_invalid_json_inside_the_tags(make_proxy: Any, vllm: Server, mode: str) -> None:
    """``{city: Paris}`` inside the tags: vLLM streams corrupted arguments (``{city: Paris}}``).
    The agent gets them repaired to valid JSON, or a clear error; never the broken text."""
    text = tagged('{"name": "get_weather", "arguments": {city: Paris}}')
    direct = await raw_stream(vllm.v1, forced(text))
    bad = direct.tool_calls()
    assert bad and bad[0]["arguments"], direct.content
    with pytest.raises(ValueError):
        json.loads(bad[0]["arguments"])
    proxy = await make_proxy(vllm)
    raw = await raw_stream(proxy.v1, forced(text), headers={TOOL_MODE: mode})
    if raw.error is not None:
        assert raw.error["code"] == "invalid_tool_call", raw.error
        return
    calls = raw.tool_calls()
    assert [c["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert raw.finish == "tool_calls"
    assert any("repaired" in c for c in raw.comments), raw.comments


CUT_TEXT = tagged('{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}')


_cut_at: dict[str, int] = {}


async def _cut(vllm: Server) -> tuple[dict[str, Any], Any]:
    """A ``max_tokens`` that ends the forced call just after its name; vLLM then sends the call
    in one chunk with invented arguments ``{}`` and ``finish_reason: "length"`` (measured: 14
    tokens with this template; searched, so a tokenizer change does not break the test)."""
    order = [_cut_at[vllm.url]] if vllm.url in _cut_at else list(range(10, 24))
    for n in order:
        body = forced(CUT_TEXT, max_tokens=n)
        direct = await raw_stream(vllm.v1, body)
        calls = direct.tool_calls()
        if calls and calls[0]["arguments"] == "{}" and direct.finish == "length":
            _cut_at[vllm.url] = n
            return body, direct
    raise AssertionError("no max_tokens made vLLM invent {} for a cut call")


@pytest.mark.parametrize("mode", MODES)
async def test_call_cut_by_max_tokens_keeps_length(make_proxy: Any, vllm: Server,
                                                   mode: str) -> None:
    """The cut call arrives with invented ``{}``: at the least the agent must see
    ``finish_reason: "length"`` (not ``tool_calls``), so it knows the call is not whole."""
    body, direct = await _cut(vllm)
    assert direct.tool_calls()[0]["arguments"] == "{}"
    proxy = await make_proxy(vllm)
    raw = await raw_stream(proxy.v1, body, headers={TOOL_MODE: mode})
    if raw.error is not None:
        assert raw.error["code"] == "invalid_tool_call", raw.error
        return
    assert raw.finish == "length"


async def test_call_cut_by_max_tokens_never_passes_invented_arguments(make_proxy: Any,
                                                                     vllm: Server) -> None:
    """The invented ``{}`` lacks the required ``city``: validation catches it, so the agent gets
    a schema-valid call (retried) or a clear error, never ``{}``."""
    body, _ = await _cut(vllm)
    proxy = await make_proxy(vllm)
    raw = await raw_stream(proxy.v1, body)
    if raw.error is not None:
        assert raw.error["code"] == "invalid_tool_call", raw.error
        return
    calls = raw.tool_calls()
    assert calls
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER_SCHEMA)


async def test_unknown_tool_name(make_proxy: Any, vllm: Server) -> None:
    """vLLM passes a call to a tool the request never offered. The agent gets a clear error
    naming the tool (with ``error`` policy), never a call it cannot dispatch."""
    text = tagged('{"name": "get_stock", "arguments": {"symbol": "ACME"}}')
    direct = await raw_stream(vllm.v1, forced(text))
    assert [c["name"] for c in direct.tool_calls()] == ["get_stock"]
    proxy = await make_proxy(vllm)
    raw = await raw_stream(proxy.v1, forced(text), headers={ON_INVALID: "error"})
    assert raw.error is not None, raw.tool_calls()
    assert raw.error["code"] == "invalid_tool_call"
    assert "get_stock" in raw.error["message"]


ECHO_BODY: dict[str, Any] = {"messages": ASK, "tools": [{"type": "function", "function": {
    "name": "get_weather", "parameters": STRICT_SCHEMA}}], "tool_choice": NAMED,
    "max_tokens": 60, "temperature": 0}


async def _echo_is_real(vllm: Server) -> None:
    """Control: without ``strict``, the named choice is not held to the schema and Gemma fills
    the arguments with (a piece of) the schema itself: ``{"city": {"type": "string"}}``."""
    direct = await raw_stream(vllm.v1, ECHO_BODY)
    args = json.loads(direct.tool_calls()[0]["arguments"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(args, STRICT_SCHEMA)


async def test_schema_echo_arguments_are_an_error(make_proxy: Any, vllm: Server) -> None:
    """Schema-echo arguments are valid JSON but not a valid call: with ``error`` policy the agent
    gets a clear ``invalid_tool_call`` error, not the echo."""
    await _echo_is_real(vllm)
    proxy = await make_proxy(vllm)
    raw = await raw_stream(proxy.v1, ECHO_BODY, headers={ON_INVALID: "error"})
    assert raw.error is not None, raw.tool_calls()
    assert raw.error["code"] == "invalid_tool_call"


async def test_schema_echo_is_retried_constrained(make_proxy: Any, vllm: Server) -> None:
    """The same real schema echo with ``retry``: toolmend asks again constrained to the schema
    (named ``tool_choice`` + ``structured_outputs``), and the retried call validates."""
    await _echo_is_real(vllm)
    proxy = await make_proxy(vllm)
    raw = await raw_stream(proxy.v1, ECHO_BODY, headers={ON_INVALID: "retry"})
    assert raw.error is None, raw.error
    calls = raw.tool_calls()
    assert [c["name"] for c in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), STRICT_SCHEMA)


async def test_raw_tags_as_content_with_tool_choice_none(make_proxy: Any, vllm: Server) -> None:
    """``tool_choice: "none"`` takes vLLM's parser out of play and the call comes out as raw
    ``<tool_call>`` text in ``content``. The agent asked for no tools: it gets a clear error
    (with ``error`` policy), not markup it would show to its user as prose."""
    body = forced(GOOD, tool_choice="none")
    direct = await raw_stream(vllm.v1, body)
    assert "<tool_call>" in direct.content()
    proxy = await make_proxy(vllm)
    raw = await raw_stream(proxy.v1, body, headers={ON_INVALID: "error"})
    assert raw.error is not None, raw.content()
    assert raw.error["code"] == "invalid_tool_call"


async def test_constrained_retry_validates(make_proxy: Any, vllm: Server) -> None:
    """A first answer forced wrong (``town`` instead of the required ``city``); with ``retry``
    toolmend asks again constrained to the tool's schema (vLLM named ``tool_choice`` +
    ``structured_outputs``), and the agent receives a call that validates."""
    text = tagged('{"name": "get_weather", "arguments": {"town": "Paris"}}')
    proxy = await make_proxy(vllm)
    raw = await raw_stream(proxy.v1, forced(text), headers={ON_INVALID: "retry"})
    assert raw.error is None, raw.error
    calls = raw.tool_calls()
    assert [c["name"] for c in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER_SCHEMA)


# --- request priorities (vLLM started with --scheduling-policy priority --max-num-seqs 2) ----

async def _vllm_gauge(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


async def test_a_loop_step_overtakes_long_requests_waiting_inside_vllm(
        make_proxy: Any, vllm: Server) -> None:
    """toolmend lets 8 requests through to a vLLM that runs 2: the rest wait in vLLM's queue.
    A light agent's loop step, sent after a heavy agent's six long requests, finishes before
    the third of them: its priority put it ahead of the four that were waiting."""
    proxy = await make_proxy(vllm, slots=8, vllm_priority=True)
    assert proxy.app[SETTINGS].vllm_priority is True  # the start-up probe was accepted
    done: list[str] = []

    async def ask(agent: str, tokens: int, tag: str) -> None:
        body = {"model": "gemma", "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Count slowly. ({tag})"}]}
        async with aiohttp.ClientSession() as s, s.post(
                proxy.v1 + "/chat/completions", json=body,
                headers={"X-Agent-Id": agent, "X-Session-Id": f"{agent}-{tag}"}) as r:
            assert r.status == 200, await r.text()
            await r.read()
        done.append(tag)

    # long: more max_tokens than a loop step may ask for (express_max_tokens, 256)
    heavy = [asyncio.create_task(ask("heavy", 300, f"h{i}")) for i in range(6)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    while await _vllm_gauge(vllm.url, "vllm:num_requests_waiting") < 4:
        assert loop.time() < deadline, "the heavy requests never queued inside vLLM"
        await asyncio.sleep(0.05)
    assert await _vllm_gauge(vllm.url, "vllm:num_requests_running") == 2
    await ask("light", 4, "light")
    finished_before = [t for t in done if t != "light"]
    await asyncio.gather(*heavy)
    assert len(finished_before) <= 2, done  # only the two that were running when it came
    assert done.index("light") <= 2
