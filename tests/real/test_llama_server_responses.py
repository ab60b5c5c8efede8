"""The Responses API through toolmend in front of the real llama-server (real Gemma model).

llama-server has no ``/v1/responses``, and it ignores a named ``tool_choice`` (see
test_llama_server.py): told to call ``get_time``, the model answers a weather question with
``get_weather``. Through toolmend's Responses front the agent still gets a ``function_call`` to
the tool it named: the wrong call is refused and the request retried constrained by
llama-server's ``json_schema`` grammar to the named tool's arguments.

Codex's own prompts (10-25k tokens) are beyond this small model's context, so the Codex CLI runs
against the simulated backend (tests/test_codex_cli.py); these tests use the openai SDK.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from openai import AsyncOpenAI

from .helpers import TOOLS, WEATHER_SCHEMA
from .stacks import Server

pytestmark = pytest.mark.real

#: the chat tools as Responses function tools
RESPONSES_TOOLS = [{"type": "function", "name": t["function"]["name"],
                    "description": t["function"]["description"],
                    "parameters": t["function"]["parameters"]} for t in TOOLS]
TIME_SCHEMA = TOOLS[1]["function"]["parameters"]


def few_shot_items(question: str = "What is the weather in Lima?") -> list[dict[str, Any]]:
    """The two earlier tool-call rounds of helpers.few_shot, as Responses input items: the
    base model then makes a real call of its own."""
    items: list[dict[str, Any]] = []
    for i, city in enumerate(("Oslo", "Paris")):
        items += [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"type": "function_call", "call_id": f"call_{i}", "name": "get_weather",
             "arguments": json.dumps({"city": city})},
            {"type": "function_call_output", "call_id": f"call_{i}", "output": '{"temp_c": 12}'},
            {"role": "assistant", "content": f"It is 12 °C in {city}."},
        ]
    items.append({"role": "user", "content": question})
    return items


# Gemma repeats a call until the output cap; one call is kept (parallel_tool_calls: false), and
# the Responses API has no stop strings to end the reply sooner
REQUEST: dict[str, Any] = {"model": "gemma", "input": few_shot_items(), "tools": RESPONSES_TOOLS,
                           "max_output_tokens": 60, "temperature": 0,
                           "parallel_tool_calls": False, "store": False}


def client(proxy: Any) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=proxy.v1, api_key="unused", max_retries=0, timeout=300)


async def test_named_tool_choice_is_honoured_under_grammar(make_proxy: Any,
                                                           llama_server: Server) -> None:
    """A call to the named tool (retried under the grammar), or, as on chat completions, a
    clear ``invalid_tool_call`` error when even the constrained retry is cut off; never a call
    to the other tool."""
    proxy = await make_proxy(llama_server)
    async with client(proxy) as c:
        try:
            r = await c.responses.create(**REQUEST,
                                         tool_choice={"type": "function", "name": "get_time"})
        except openai.APIStatusError as e:
            assert e.status_code == 502 and e.body["code"] == "invalid_tool_call", e.body
            return
    calls = [o for o in r.output if o.type == "function_call"]
    assert [o.name for o in calls] == ["get_time"], r.output
    jsonschema.validate(json.loads(calls[0].arguments), TIME_SCHEMA)
    assert calls[0].call_id and calls[0].status == "completed"


async def test_streamed_call_for_the_named_tool_is_one_clean_function_call(
        make_proxy: Any, llama_server: Server) -> None:
    proxy = await make_proxy(llama_server)
    async with client(proxy) as c, c.responses.stream(
            **REQUEST, tool_choice={"type": "function", "name": "get_weather"}) as s:
        events = [e async for e in s]
    assert events[0].type == "response.created"
    assert events[-1].type in ("response.completed", "response.incomplete"), events[-1]
    calls = [o for o in events[-1].response.output if o.type == "function_call"]
    assert [o.name for o in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER_SCHEMA)
    deltas = "".join(e.delta for e in events
                     if e.type == "response.function_call_arguments.delta")
    assert deltas == calls[0].arguments
