"""Schema validation end to end: repair, constrained retry, clear errors, through the sim."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import orjson
import pytest

from .conftest import Stack, StackFactory

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"], "additionalProperties": False}}}]
MSG = [{"role": "user", "content": "Weather in Oslo for 3 days?"}]


def call(args: Any, text: str = "") -> dict[str, Any]:
    return {"content": text, "tool_calls": [{"name": "get_weather", "arguments": args}]}


async def raw_stream(stack: Stack, headers: dict[str, str] | None = None,
                     **extra: Any) -> tuple[int, bytes, list[Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.v1 + "/chat/completions", headers=headers or {},
                          json={"messages": MSG, "tools": TOOLS, "stream": True,
                                **extra}) as r:
            raw = await r.read()
            status = r.status
    events = [orjson.loads(line[6:]) for line in raw.split(b"\n")
              if line.startswith(b"data: {")]
    return status, raw, events


def calls_of(events: list[Any]) -> list[dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for e in events:
        for ch in e.get("choices") or ():
            for tc in (ch.get("delta") or {}).get("tool_calls") or ():
                slot = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
                slot["name"] += tc["function"].get("name") or ""
                slot["arguments"] += tc["function"].get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


def content_of(events: list[Any]) -> str:
    return "".join((ch.get("delta") or {}).get("content") or ""
                   for e in events for ch in e.get("choices") or ())


async def test_lossless_coercion_repairs_without_retry(stack: Stack) -> None:
    stack.sim.push(call({"city": "Oslo", "days": "3"}))
    _, raw, events = await raw_stream(stack)
    assert orjson.loads(calls_of(events)[0]["arguments"]) == {"city": "Oslo", "days": 3}
    assert b": toolmend repaired get_weather" in raw
    assert stack.sim.stats.requests == 1


@pytest.mark.parametrize("dialect", ["vllm", "llamacpp", "ollama"])
async def test_invalid_call_is_retried_constrained_and_replaced(make_stack: StackFactory,
                                                               dialect: str) -> None:
    stack = await make_stack(dialect)
    stack.sim.push(call({"days": 3}, text="Checking the forecast. "),
                   call({"city": "Oslo", "days": 3}))
    _, raw, events = await raw_stream(stack)
    assert content_of(events) == "Checking the forecast. "  # streamed once, never repeated
    calls = calls_of(events)
    assert len(calls) == 1
    assert orjson.loads(calls[0]["arguments"]) == {"city": "Oslo", "days": 3}
    assert b"retried get_weather: valid on attempt 1" in raw
    retry = stack.sim.stats.bodies[-1]
    assert retry["stream"] is False
    assert "city" in retry["messages"][-1]["content"]  # the correction names the problem
    if dialect == "vllm":
        assert retry["tool_choice"]["function"]["name"] == "get_weather"
        assert retry["tools"][0]["function"]["strict"] is True
        assert "structured_outputs" not in retry  # vLLM refuses it beside tools
    elif dialect == "llamacpp":
        assert "json_schema" in retry
    else:
        assert "format" in retry


async def test_still_invalid_after_retries_is_an_error_event(stack: Stack) -> None:
    stack.sim.push(call({"city": 7}), call({"city": 8}))
    _, _, events = await raw_stream(stack)
    err = events[-1]["error"]
    assert err["code"] == "invalid_tool_call" and err["tool"] == "get_weather"
    assert err["pointer"] == "/city"
    assert not calls_of(events)


async def test_non_streaming_error_is_502_with_the_same_body(stack: Stack) -> None:
    stack.sim.push(call({"city": "Oslo", "extra": 1}))
    c = openai.AsyncOpenAI(base_url=stack.v1, api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as ei:
        await c.chat.completions.create(model="m", messages=MSG, tools=TOOLS,
                                        extra_headers={"X-Toolmend-On-Invalid": "error"})
    assert ei.value.status_code == 502
    assert ei.value.body["code"] == "invalid_tool_call"  # type: ignore[index]
    assert stack.sim.stats.requests == 1  # policy error: no retry


async def test_non_streaming_repair_reports_in_header(stack: Stack) -> None:
    stack.sim.push(call({"city": "Oslo", "days": "2"}))
    c = openai.AsyncOpenAI(base_url=stack.v1, api_key="x", max_retries=0)
    r = await c.chat.completions.with_raw_response.create(model="m", messages=MSG, tools=TOOLS)
    assert "get_weather" in r.headers["x-toolmend-repairs"]
    msg = r.parse().choices[0].message
    assert orjson.loads(msg.tool_calls[0].function.arguments) == {"city": "Oslo", "days": 2}


async def test_pass_policy_forwards_unchanged_and_reports(stack: Stack) -> None:
    stack.sim.push(call({"city": 7}))
    _, raw, events = await raw_stream(stack, headers={"X-Toolmend-On-Invalid": "pass"})
    assert orjson.loads(calls_of(events)[0]["arguments"]) == {"city": 7}
    assert b": toolmend invalid get_weather passed" in raw


async def test_unknown_tool_name_is_not_passed(stack: Stack) -> None:
    stack.sim.push({"tool_calls": [{"name": "launch_rockets", "arguments": {}}]},
                   call({"city": "Oslo"}))
    _, _, events = await raw_stream(stack)
    assert [c["name"] for c in calls_of(events)] == ["get_weather"]


async def test_required_tool_choice_without_a_call_is_retried(stack: Stack) -> None:
    stack.sim.push({"content": "It is sunny, probably."}, call({"city": "Oslo"}))
    _, _, events = await raw_stream(stack, tool_choice="required")
    assert content_of(events) == "It is sunny, probably."
    assert [c["name"] for c in calls_of(events)] == ["get_weather"]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_invalid_schema_is_400_naming_the_tool(stack: Stack) -> None:
    bad = [{"type": "function", "function": {"name": "broken", "parameters": {
        "type": "object", "properties": {"n": {"type": "integr"}}}}}]
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.v1 + "/chat/completions",
                          json={"messages": MSG, "tools": bad}) as r:
            err = (await r.json())["error"]
    assert r.status == 400
    assert "broken" in err["message"] and err["code"] == "invalid_tool_schema"
    assert stack.sim.stats.requests == 0


async def test_redos_pattern_is_refused_or_safe(stack: Stack) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "pattern": "^(a+)+$"}}}}}]
    stack.sim.push({"tool_calls": [{"name": "f", "arguments": {"s": "a" * 50_000 + "!"}}]},
                   {"tool_calls": [{"name": "f", "arguments": {"s": "aaa"}}]})
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.v1 + "/chat/completions",
                          json={"messages": MSG, "tools": tools, "stream": True}) as r:
            raw = await r.read()
    events = [orjson.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]
    # the first call failed the (linear-time) pattern and was retried
    assert [orjson.loads(c["arguments"]) for c in calls_of(events)] == [{"s": "aaa"}]


async def test_bad_policy_header_is_400(stack: Stack) -> None:
    status, raw, _ = await raw_stream(stack, headers={"X-Toolmend-On-Invalid": "ignore"})
    assert status == 400
    assert b"X-Toolmend-On-Invalid" in raw


async def test_tool_choice_none_with_a_call_in_the_text_is_retried_as_text(stack: Stack) -> None:
    stack.sim.push({"content": "<tool_call>{\"name\": \"get_weather\", \"arguments\": "
                               "{\"city\": \"Oslo\"}}</tool_call>"},
                   {"content": "It is sunny in Oslo."})
    _, _, events = await raw_stream(stack, tool_choice="none")
    assert not calls_of(events)
    assert content_of(events) == "It is sunny in Oslo."
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    retry = stack.sim.stats.bodies[-1]
    assert "tools" not in retry  # the retry asks for a plain answer


async def test_tool_choice_none_with_a_call_is_refused_under_error(stack: Stack) -> None:
    stack.sim.push({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]})
    _, _, events = await raw_stream(stack, tool_choice="none",
                                    headers={"X-Toolmend-On-Invalid": "error"})
    assert events[-1]["error"]["code"] == "invalid_tool_call"
    assert "none" in events[-1]["error"]["message"]


async def test_a_retried_reply_is_read_with_the_requests_reasoning_signals(
        make_stack: StackFactory) -> None:
    """The request turned thinking on for a template that opens reasoning: the retried reply
    starts inside reasoning too, so reasoning that never closed stays reasoning and is not
    sent to the client as the plain answer the retry asked for."""
    stack = await make_stack("llamacpp")
    stack.sim.push({"content": "The user wants Oslo.</think><tool_call>{\"name\": "
                               "\"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}</tool_call>"},
                   {"content": "No tools this time, so I will just say it is sunny"})
    _, raw, events = await raw_stream(stack, tool_choice="none",
                                      chat_template_kwargs={"enable_thinking": True})
    assert not calls_of(events)
    assert content_of(events) == ""
    assert b"sunny" not in raw
    assert stack.sim.stats.requests == 2
    assert "tools" not in stack.sim.stats.bodies[-1]  # the retry asked for a plain answer


async def test_a_retried_reply_is_read_in_the_configured_tool_format(
        make_stack: StackFactory) -> None:
    """``--tool-format`` applies to the retry's reply as to the first: Phi-4-mini's
    ``functools[...]`` has no marker that detection by markers would know."""
    stack = await make_stack("llamacpp", tool_format="phi4_mini")
    stack.sim.push({"content": 'functools[{"name": "get_weather", "arguments": {"city": 7}}]'},
                   {"content": 'functools[{"name": "get_weather", "arguments": '
                               '{"city": "Oslo"}}]'})
    _, raw, events = await raw_stream(stack)
    assert [orjson.loads(c["arguments"]) for c in calls_of(events)] == [{"city": "Oslo"}]
    assert b"valid on attempt 1" in raw
    assert stack.sim.stats.requests == 2


async def _metric(stack: Stack, name: str, *, after_requests: int) -> float:
    """``name``'s total once ``after_requests`` requests are recorded (the metrics of a
    request are written when it has been answered, just after the client has its bytes)."""
    import asyncio

    for _ in range(1000):
        async with aiohttp.ClientSession() as s, s.get(stack.url + "/metrics") as r:
            text = await r.text()
        totals: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                metric = key.split("{", 1)[0]
                totals[metric] = totals.get(metric, 0.0) + float(value)
        if totals.get("gen_ai_server_request_duration_seconds_count", 0) >= after_requests:
            return totals.get(name, 0.0)
        await asyncio.sleep(0.01)
    raise AssertionError("the request was never recorded in /metrics")


async def test_retry_comments_match_the_retries_sent(stack: Stack) -> None:
    """Two invalid calls in one reply; the first one's retry is invalid too, so the reply ends
    in an error and the second call is never retried. The stream reports the one retry that
    was sent, as the metric counts it (it used to say ``retry 1/1`` for both)."""
    stack.sim.push({"content": "", "tool_calls": [
        {"name": "get_weather", "arguments": {"city": 7}},
        {"name": "get_weather", "arguments": {"city": 8}}]}, call({"city": 9}))
    _, raw, events = await raw_stream(stack)
    assert events[-1]["error"]["pointer"] == "/city"
    comments = [line for line in raw.split(b"\n") if line.startswith(b": toolmend retry")]
    assert comments == [b": toolmend retry 1/1 get_weather: at /city: 7 is not of type "
                        b"'string'"]
    assert stack.sim.stats.requests == 2
    assert await _metric(stack, "toolmend_retries_total", after_requests=1) == 1.0


async def test_two_retries_are_two_comments_and_two_counted(make_stack: StackFactory) -> None:
    stack = await make_stack(max_retries=2)
    stack.sim.push(call({"city": 7}), call({"city": 8}), call({"city": "Oslo"}))
    _, raw, events = await raw_stream(stack)
    assert orjson.loads(calls_of(events)[0]["arguments"]) == {"city": "Oslo"}
    comments = [line for line in raw.split(b"\n") if line.startswith(b": toolmend retr")]
    assert comments == [
        b": toolmend retry 1/2 get_weather: at /city: 7 is not of type 'string'",
        b": toolmend retry 2/2 get_weather: at /city: 8 is not of type 'string'",
        b": toolmend retried get_weather: valid on attempt 2"]
    assert await _metric(stack, "toolmend_retries_total", after_requests=1) == 2.0
    # the second attempt quotes what the validator said about the first retry's value
    assert stack.sim.stats.bodies[-1]["messages"][-1]["content"].startswith(
        "The arguments for `get_weather` were invalid: at /city: 8 is not of type 'string'.")
