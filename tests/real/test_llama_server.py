"""llama.cpp's llama-server (2 slots, Hermes-style template), real Gemma model, via toolmend.

The base model makes real, unforced calls after two earlier tool-call rounds in the history
(few-shot), which is how these tests get calls out of it: llama-server ignores a named
``tool_choice``. Its bugs, as seen on the real server: a call cut by ``max_tokens`` is streamed
anyway with arguments ``{"``; a named ``tool_choice`` is ignored; ``required`` can end with no
call at all.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import jsonschema
import pytest

from toolmend.backends.detect import detect
from toolmend.server.app import SCHEDULER

from .helpers import (
    NAMED,
    TOOL_MODE,
    TOOLS,
    WEATHER_SCHEMA,
    few_shot,
    post_json,
    raw_stream,
    sdk_stream,
)
from .stacks import Server

pytestmark = pytest.mark.real

# At temperature 0 Gemma repeats the call until max_tokens (parallel_tool_calls: false does not
# stop it, see below); the stop string ends the reply after the first call, as llama-server
# still parses a call whose closing tag the stop string removed.
FEW_SHOT: dict[str, Any] = {"messages": few_shot(), "tools": TOOLS, "max_tokens": 60,
                            "temperature": 0, "stop": ["</tool_call>"]}
MODES = ["buffered", "incremental"]


async def test_detected_as_llama_server_with_slots_from_props(llama_server: Server,
                                                              make_proxy: Any) -> None:
    d = await detect(llama_server.url)
    assert d.kind == "llamacpp"
    assert d.slots == 2  # -np 2, read from /props
    assert d.details.get("supports_tools") is True  # the shipped template is tool-aware
    proxy = await make_proxy(llama_server)
    assert proxy.app[SCHEDULER].slots == 2  # the fair queue is sized from /props


@pytest.mark.parametrize("mode", MODES)
async def test_few_shot_call_streams_as_one_clean_call(make_proxy: Any, llama_server: Server,
                                                       mode: str) -> None:
    proxy = await make_proxy(llama_server)
    got = await sdk_stream(proxy.v1, headers={TOOL_MODE: mode}, **FEW_SHOT)
    assert [c["name"] for c in got.calls] == ["get_weather"], got
    assert got.calls[0]["id"]
    jsonschema.validate(got.args(), WEATHER_SCHEMA)
    assert got.args()["city"] == "Lima"
    assert got.finish == "tool_calls"
    assert "<tool_call>" not in got.content


async def test_few_shot_call_non_streaming(make_proxy: Any, llama_server: Server) -> None:
    proxy = await make_proxy(llama_server)
    status, doc = await post_json(proxy.v1, FEW_SHOT)
    assert status == 200, doc
    choice = doc["choices"][0]
    calls = choice["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), WEATHER_SCHEMA)
    assert choice["finish_reason"] == "tool_calls"


_cut_at: dict[str, int] = {}


async def _max_tokens_that_cut_the_arguments(server: Server) -> int:
    """The smallest ``max_tokens`` at which llama-server streams the call with arguments that
    are not JSON yet (measured each run: the exact count depends on the tokenizer and template).
    """
    if server.url in _cut_at:
        return _cut_at[server.url]
    # first guess: the tokens of the call's text up to the start of its arguments
    prefix = '<tool_call>\n{"name": "get_weather", "arguments": {"'
    async with aiohttp.ClientSession() as s, \
            s.post(server.url + "/tokenize", json={"content": prefix}) as r:
        guess = len((await r.json())["tokens"])
    for n in sorted(range(max(guess - 3, 2), guess + 8), key=lambda n: abs(n - guess)):
        raw = await raw_stream(server.v1, {**FEW_SHOT, "max_tokens": n})
        calls = raw.tool_calls()
        if calls and calls[0]["arguments"]:
            try:
                json.loads(calls[0]["arguments"])
            except ValueError:
                _cut_at[server.url] = n
                return n
    raise AssertionError(f"no max_tokens near {guess} cut the few-shot call's arguments")


@pytest.mark.parametrize("mode", MODES)
async def test_call_cut_by_max_tokens(make_proxy: Any, llama_server: Server, mode: str) -> None:
    """llama-server streams a cut call as a tool call with arguments like ``{"``. The agent gets
    the call closed into valid JSON with ``finish_reason: "length"`` kept (so it knows the call
    was cut), or a clear ``invalid_tool_call`` error; never broken JSON."""
    n = await _max_tokens_that_cut_the_arguments(llama_server)
    direct = await raw_stream(llama_server.v1, {**FEW_SHOT, "max_tokens": n})
    assert direct.finish == "length"
    proxy = await make_proxy(llama_server)
    raw = await raw_stream(proxy.v1, {**FEW_SHOT, "max_tokens": n}, headers={TOOL_MODE: mode})
    assert raw.done
    if raw.error is not None:
        assert raw.error["code"] == "invalid_tool_call", raw.error
        return
    calls = raw.tool_calls()
    assert [c["name"] for c in calls] == ["get_weather"]
    assert isinstance(json.loads(calls[0]["arguments"]), dict)
    assert raw.finish == "length"
    assert any("repaired" in c for c in raw.comments), raw.comments


@pytest.mark.parametrize("mode", MODES)
async def test_parallel_tool_calls_false(make_proxy: Any, llama_server: Server,
                                         mode: str) -> None:
    """llama-server does not enforce ``parallel_tool_calls: false``: Gemma writes the same call
    again and again. toolmend does: the agent gets exactly one call (the first, complete one)."""
    body = {**FEW_SHOT, "parallel_tool_calls": False}
    del body["stop"]
    direct = await raw_stream(llama_server.v1, body)
    assert len(direct.tool_calls()) >= 2, "only one call this time"
    proxy = await make_proxy(llama_server)
    raw = await raw_stream(proxy.v1, body, headers={TOOL_MODE: mode})
    assert raw.error is None, raw.error
    calls = raw.tool_calls()
    assert [c["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Lima"}


async def test_named_tool_choice_is_honoured(make_proxy: Any, llama_server: Server) -> None:
    """llama-server ignores a named ``tool_choice`` (a warning in its log): told to call
    ``get_time``, Gemma answers the weather question with ``get_weather``. The agent gets a call to
    the tool it named (retried), or a clear error; never the other tool."""
    body = {**FEW_SHOT, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    direct = await raw_stream(llama_server.v1, body)
    assert [c["name"] for c in direct.tool_calls()] != ["get_time"], "not ignored this time"
    proxy = await make_proxy(llama_server)
    raw = await raw_stream(proxy.v1, body)
    if raw.error is not None:
        assert raw.error["code"] == "invalid_tool_call", raw.error
        return
    assert [c["name"] for c in raw.tool_calls()] == ["get_time"]
    assert json.loads(raw.tool_calls()[0]["arguments"])["city"]


async def test_required_with_no_call(make_proxy: Any, llama_server: Server) -> None:
    """``tool_choice: "required"`` and a prompt with nothing to call: llama-server lets the
    model answer in prose. The agent gets a call (retried) or a clear error, never prose alone
    with ``finish_reason: "stop"``."""
    body = {"messages": [{"role": "user", "content": "Write one sentence about the sea."}],
            "tools": TOOLS, "tool_choice": "required", "max_tokens": 40, "temperature": 0}
    direct = await raw_stream(llama_server.v1, body)
    assert not direct.tool_calls(), "the model called a tool this time"
    proxy = await make_proxy(llama_server)
    raw = await raw_stream(proxy.v1, body)
    if raw.error is not None:
        assert raw.error["code"] == "invalid_tool_call", raw.error
        return
    calls = raw.tool_calls()
    assert len(calls) >= 1 and calls[0]["name"] in ("get_weather", "get_time")
    assert raw.finish == "tool_calls"


async def test_named_tool_choice_objects_pass_through(make_proxy: Any,
                                                      llama_server: Server) -> None:
    """A named choice for the tool the model calls anyway: one clean call, as with any
    server (llama-server logs that it ignores the object, toolmend must not choke on it)."""
    proxy = await make_proxy(llama_server)
    got = await sdk_stream(proxy.v1, tool_choice=NAMED, **FEW_SHOT)
    assert [c["name"] for c in got.calls] == ["get_weather"]
    jsonschema.validate(got.args(), WEATHER_SCHEMA)
