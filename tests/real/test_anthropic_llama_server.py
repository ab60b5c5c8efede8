"""The Anthropic Messages front against the real llama-server (Gemma, Hermes-style template),
driven by the official ``anthropic`` SDK.

llama-server ignores a named ``tool_choice``: told to call ``get_time``, Gemma answers the
weather question with ``get_weather`` (see test_llama_server.py). Through toolmend's Messages
front, a ``tool_choice`` of type ``tool`` is held to: the wrong call is retried with the tool's
schema as llama-server's ``json_schema`` (a grammar), and the SDK gets a ``tool_use`` of the
tool it named, with schema-valid input (or, as on the chat front, a clear Anthropic-shaped
``invalid_tool_call`` error; never a call to the other tool).

Claude Code itself runs against the sim (tests/test_claude_code.py): its prompts are 10–25k
tokens, beyond what this small model can use.
"""

from __future__ import annotations

from typing import Any

import anthropic
import jsonschema
import pytest

from . import helpers
from .helpers import raw_stream
from .stacks import Server

pytestmark = pytest.mark.real

TIME_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}},
               "required": ["city"]}
TOOLS: list[Any] = [
    {"name": "get_weather", "description": "Weather forecast for a city",
     "input_schema": {"type": "object", "properties": {"city": {"type": "string"},
                                                       "days": {"type": "integer"}},
                      "required": ["city"]}},
    {"name": "get_time", "description": "Local time in a city", "input_schema": TIME_SCHEMA}]


def few_shot(question: str = "What is the weather in Lima?") -> list[dict[str, Any]]:
    """Two earlier tool-call rounds, as in helpers.few_shot, in the Messages API's shape."""
    msgs: list[dict[str, Any]] = []
    for i, city in enumerate(("Oslo", "Paris")):
        msgs += [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": f"toolu_{i}",
                                               "name": "get_weather", "input": {"city": city}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_{i}",
                                          "content": '{"temp_c": 12}'}]},
            {"role": "assistant", "content": f"It is 12 °C in {city}."},
        ]
    msgs.append({"role": "user", "content": question})
    return msgs


ASK: dict[str, Any] = {"model": "gemma", "max_tokens": 60, "messages": few_shot(),
                       "tools": TOOLS, "stop_sequences": ["</tool_call>"],
                       "extra_body": {"temperature": 0}}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_named_tool_choice_is_constrained_to_that_tool(make_proxy: Any,
                                                             llama_server: Server,
                                                             stream: bool) -> None:
    direct = await raw_stream(llama_server.v1, {
        "messages": helpers.few_shot(), "tools": helpers.TOOLS, "max_tokens": 60,
        "temperature": 0, "stop": ["</tool_call>"],
        "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert [c["name"] for c in direct.tool_calls()] != ["get_time"], "not ignored this time"
    proxy = await make_proxy(llama_server)
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0,
                                        timeout=300) as c:
        kw = {**ASK, "tool_choice": {"type": "tool", "name": "get_time"}}
        try:
            if stream:
                async with c.messages.stream(**kw) as s:
                    msg = await s.get_final_message()
            else:
                msg = await c.messages.create(**kw)
        except anthropic.APIStatusError as e:
            # the one other outcome allowed: a clear error in Anthropic's shape, never a call
            # to the other tool (as on the chat front, test_llama_server.py)
            body: Any = e.body
            assert body["type"] == "error", body
            assert body["error"]["type"] == "api_error", body
            assert body["error"]["code"] == "invalid_tool_call", body
            return
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert [u.name for u in uses] == ["get_time"], msg
    jsonschema.validate(uses[0].input, TIME_SCHEMA)
    assert uses[0].id.startswith("toolu_")
    assert msg.stop_reason == "tool_use"
