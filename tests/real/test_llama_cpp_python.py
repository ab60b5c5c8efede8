"""llama-cpp-python's OpenAI server (``chatml-function-calling``), real Gemma model, via toolmend.

Its bugs, as seen on the real server: the function name and id repeated in every chunk, so an
SDK-style accumulator builds ``get_weatherget_weather...``; the deprecated ``function_call``
sent beside ``tool_calls``; no usage chunk; ``owned_by: "me"``. A named ``tool_choice`` is
grammar- constrained, so the call itself is real model output and deterministic at temperature
0.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from toolmend.backends.detect import detect

from .helpers import (
    ASK,
    NAMED,
    ON_INVALID,
    TOOL_MODE,
    TOOLS,
    WEATHER_SCHEMA,
    post_json,
    raw_stream,
    sdk_stream,
)
from .stacks import Server

pytestmark = pytest.mark.real

FORCED: dict[str, Any] = {"messages": ASK, "tools": TOOLS, "tool_choice": NAMED,
                          "max_tokens": 40, "temperature": 0}


async def test_detected_as_llama_cpp_python(llama_cpp_python: Server) -> None:
    d = await detect(llama_cpp_python.url)
    assert d.kind == "llama-cpp-python"
    assert d.slots == 1  # one generation at a time
    assert d.model


async def test_the_bug_is_real_upstream(llama_cpp_python: Server) -> None:
    """Control: straight from the server, an SDK accumulator gets a repeated name."""
    direct = await sdk_stream(llama_cpp_python.v1, **FORCED)
    assert len(direct.calls) == 1
    assert direct.calls[0]["name"].startswith("get_weatherget_weather")
    assert direct.function_call_deltas > 0


@pytest.mark.parametrize("mode", ["buffered", "incremental"])
async def test_named_call_streams_as_one_clean_call(make_proxy: Any, llama_cpp_python: Server,
                                                    mode: str) -> None:
    """Issue 3 against the real server: the SDK accumulates exactly the expected call."""
    proxy = await make_proxy(llama_cpp_python)
    got = await sdk_stream(proxy.v1, headers={TOOL_MODE: mode}, **FORCED)
    assert len(got.calls) == 1
    call = got.calls[0]
    assert call["name"] == "get_weather"  # once, not once per chunk
    assert call["id"] and call["id"].count(call["id"][:8]) == 1  # one id, sent once
    assert got.args()["city"] == "Oslo"
    jsonschema.validate(got.args(), WEATHER_SCHEMA)
    assert got.function_call_deltas == 0  # the deprecated field is gone
    assert got.finish == "tool_calls"


async def test_raw_stream_has_one_header_fragment(make_proxy: Any,
                                                  llama_cpp_python: Server) -> None:
    """On the wire: exactly one fragment carries id/type/name, and it has ``arguments: ""``."""
    proxy = await make_proxy(llama_cpp_python)
    raw = await raw_stream(proxy.v1, FORCED)
    assert raw.status == 200 and raw.done and raw.error is None
    headers = [tc for e in raw.events for c in e.get("choices") or ()
               for tc in (c.get("delta") or {}).get("tool_calls") or ()
               if (tc.get("function") or {}).get("name") or tc.get("id")]
    assert len(headers) == 1
    assert headers[0]["type"] == "function"
    assert headers[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert not any("function_call" in (c.get("delta") or {}) and c["delta"]["function_call"]
                   for e in raw.events for c in e.get("choices") or ())


async def test_named_call_non_streaming(make_proxy: Any, llama_cpp_python: Server) -> None:
    proxy = await make_proxy(llama_cpp_python)
    status, doc = await post_json(proxy.v1, FORCED)
    assert status == 200, doc
    choice = doc["choices"][0]
    msg = choice["message"]
    assert [tc["function"]["name"] for tc in msg["tool_calls"]] == ["get_weather"]
    assert msg.get("function_call") is None
    assert choice["finish_reason"] == "tool_calls"
    jsonschema.validate(json.loads(msg["tool_calls"][0]["function"]["arguments"]),
                        WEATHER_SCHEMA)


BOUNDED_DAYS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"},
                   "days": {"type": "integer", "minimum": 1, "maximum": 14}},
    "required": ["city", "days"], "additionalProperties": False}


async def test_out_of_range_argument_never_reaches_the_agent(make_proxy: Any,
                                                            llama_cpp_python: Server) -> None:
    """The server's grammar ignores ``maximum``: Gemma writes ``"days": 1000000000000000``
    (real output). The agent gets a call that validates (retried) or a clear
    ``invalid_tool_call`` error, never the out-of-range call."""
    tools = [{"type": "function", "function": {"name": "get_weather",
                                               "parameters": BOUNDED_DAYS}}]
    body = {"messages": ASK, "tools": tools, "tool_choice": NAMED, "max_tokens": 60,
            "temperature": 0}
    direct = await raw_stream(llama_cpp_python.v1, body)
    assert direct.tool_calls(), "the forced call did not come out at all"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(direct.tool_calls()[0]["arguments"]), BOUNDED_DAYS)
    proxy = await make_proxy(llama_cpp_python)
    raw = await raw_stream(proxy.v1, body, headers={ON_INVALID: "retry"})
    if raw.error is not None:
        assert raw.error["code"] == "invalid_tool_call", raw.error
        assert "/days" in raw.error["message"]
        return
    calls = raw.tool_calls()
    assert [c["name"] for c in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), BOUNDED_DAYS)


async def test_out_of_range_argument_is_retried_with_a_grammar(make_proxy: Any,
                                                               llama_cpp_python: Server) -> None:
    """The constrained retry on llama-cpp-python: its grammar ignores ``maximum``, so toolmend
    spells the small range out as an enum in the retry's schema, and the retried call
    validates by construction."""
    proxy = await make_proxy(llama_cpp_python)
    tools = [{"type": "function", "function": {"name": "get_weather",
                                               "parameters": BOUNDED_DAYS}}]
    raw = await raw_stream(proxy.v1, {"messages": ASK, "tools": tools, "tool_choice": NAMED,
                                      "max_tokens": 60, "temperature": 0},
                           headers={ON_INVALID: "retry"})
    assert raw.error is None, raw.error
    calls = raw.tool_calls()
    assert [c["name"] for c in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), BOUNDED_DAYS)
