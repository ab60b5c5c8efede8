"""Calls on requests that declared no tools: an unknown tool under the policy, tools or not.

End to end through toolmend in front of the sim, in each dialect: a tool-less request whose
reply carries a structured call is asked again for a plain-text answer, then refused; with
``undeclared_calls = "pass"`` the call is forwarded as before. Plain chat on such a request
is relayed byte for byte (the mender looks at events that carry a call, nothing else), which
the sans-I/O part checks on the pipeline itself.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import orjson
import pytest

from toolmend.parsers.mender import ChatMender, carries_call
from toolmend.parsers.policy import READ_TEXT, Outcome, Policy, decide, retry_plan
from toolmend.parsers.stream import StreamPipeline, UpstreamStreamError
from toolmend.parsers.validation import validate_call
from toolmend.pipeline.validating import NO_TOOLS

from .conftest import Stack, StackFactory
from .test_e2e_validation import calls_of, content_of

DIALECTS = ["vllm", "llamacpp", "ollama"]
MSG = [{"role": "user", "content": "Weather in Oslo?"}]
CALL = {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}
CORRECTION = "Tools are not available for this reply. Answer in text without calling a tool."


async def stream(stack: Stack, headers: dict[str, str] | None = None,
                 **extra: Any) -> tuple[int, bytes, list[Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.v1 + "/chat/completions", headers=headers or {},
                          json={"model": "m", "messages": MSG, "stream": True,
                                **extra}) as r:
            raw = await r.read()
            status = r.status
    events = [orjson.loads(line[6:]) for line in raw.split(b"\n")
              if line.startswith(b"data: {")]
    return status, raw, events


def finish_of(events: list[Any]) -> list[str]:
    return [ch["finish_reason"] for e in events for ch in e.get("choices") or ()
            if ch.get("finish_reason")]


# --- end to end, streaming -----------------------------------------------------------------------

@pytest.mark.parametrize("dialect", DIALECTS)
async def test_structured_call_without_tools_is_retried_as_text(make_stack: StackFactory,
                                                               dialect: str) -> None:
    stack = await make_stack(dialect)
    stack.sim.push({"content": "Checking. ", **CALL}, {"content": "It is sunny in Oslo."})
    status, raw, events = await stream(stack)
    assert status == 200
    assert calls_of(events) == []
    assert content_of(events) == "Checking. It is sunny in Oslo."
    assert finish_of(events) == ["stop"]
    assert raw.endswith(b"data: [DONE]\n\n")
    assert b": toolmend retry 1/1 get_weather: unknown tool 'get_weather'" in raw
    assert stack.sim.stats.requests == 2
    retry = stack.sim.stats.bodies[-1]
    assert "tools" not in retry and retry["stream"] is False
    assert retry["messages"] == [*MSG, {"role": "user", "content": CORRECTION}]


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_structured_call_without_tools_is_refused_when_the_retry_calls_again(
        make_stack: StackFactory, dialect: str) -> None:
    stack = await make_stack(dialect)
    stack.sim.push(CALL, CALL)
    status, raw, events = await stream(stack)
    assert status == 200  # the stream had begun (keep-alive), so the error is an event
    assert calls_of(events) == []
    err = events[-1]["error"]
    assert (err["code"], err["type"], err["tool"]) == ("invalid_tool_call", "invalid_tool_call",
                                                       "get_weather")
    assert err["keyword"] == "name"
    assert "unknown tool 'get_weather'" in err["message"]
    assert raw.endswith(b"data: [DONE]\n\n")
    assert stack.sim.stats.requests == 2


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_structured_call_without_tools_passes_with_undeclared_calls_pass(
        make_stack: StackFactory, dialect: str) -> None:
    stack = await make_stack(dialect, undeclared_calls="pass")
    stack.sim.push(CALL)
    _, raw, events = await stream(stack)
    calls = calls_of(events)
    assert [c["name"] for c in calls] == ["get_weather"]
    assert orjson.loads(calls[0]["arguments"]) == {"city": "Oslo"}
    assert b"toolmend" not in raw  # no mender: nothing judged, nothing reported
    assert stack.sim.stats.requests == 1


async def test_policy_header_applies_to_undeclared_calls(make_stack: StackFactory) -> None:
    stack = await make_stack("vllm")
    stack.sim.push(CALL)
    _, _, events = await stream(stack, headers={"X-Toolmend-On-Invalid": "error"})
    assert events[-1]["error"]["code"] == "invalid_tool_call"
    assert stack.sim.stats.requests == 1  # refused at once: no retry under "error"
    stack.sim.push(CALL)
    _, raw, events = await stream(stack, headers={"X-Toolmend-On-Invalid": "pass"})
    assert [c["name"] for c in calls_of(events)] == ["get_weather"]
    assert b": toolmend invalid get_weather passed: unknown tool 'get_weather'" in raw
    status, raw, _ = await stream(stack, headers={"X-Toolmend-On-Invalid": "maybe"})
    assert status == 400 and b"X-Toolmend-On-Invalid" in raw


async def test_incremental_mode_never_streams_an_undeclared_call(make_stack: StackFactory
                                                                ) -> None:
    stack = await make_stack("vllm", tool_mode="incremental")
    stack.sim.push(CALL, {"content": "Sunny."})
    _, _, events = await stream(stack)
    assert calls_of(events) == []
    assert content_of(events) == "Sunny."


async def test_marker_text_without_tools_is_the_models_own_business(stack: Stack) -> None:
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    stack.sim.push({"content": text})
    _, _, events = await stream(stack)
    assert calls_of(events) == []
    assert content_of(events) == text
    assert finish_of(events) == ["stop"]
    assert stack.sim.stats.requests == 1


async def test_plain_chat_without_tools_is_relayed_unchanged(stack: Stack) -> None:
    stack.sim.push({"content": "Hello there, how can I help?"})
    _, raw, events = await stream(stack)
    assert content_of(events) == "Hello there, how can I help?"
    assert finish_of(events) == ["stop"]
    assert b"toolmend" not in raw
    assert stack.sim.stats.requests == 1


async def test_ollama_native_front_refuses_undeclared_calls_too(make_stack: StackFactory
                                                                ) -> None:
    stack = await make_stack("ollama")
    stack.sim.push(CALL, {"content": "It is sunny."})
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.url + "/api/chat", json={"model": "m", "messages": MSG,
                                                         "stream": False}) as r:
            doc = await r.json()
    assert r.status == 200
    assert doc["message"]["content"] == "It is sunny."
    assert not doc["message"].get("tool_calls")
    assert stack.sim.stats.requests == 2


# --- end to end, not streaming -------------------------------------------------------------------

@pytest.mark.parametrize("dialect", DIALECTS)
async def test_non_streaming_undeclared_call_is_retried_then_refused(make_stack: StackFactory,
                                                                     dialect: str) -> None:
    stack = await make_stack(dialect)
    c = openai.AsyncOpenAI(base_url=stack.v1, api_key="x", max_retries=0)
    stack.sim.push(CALL, {"content": "It is sunny in Oslo."})
    r = await c.chat.completions.create(model="m", messages=MSG)  # type: ignore[arg-type]
    msg = r.choices[0].message
    assert (msg.content, msg.tool_calls, r.choices[0].finish_reason) == (
        "It is sunny in Oslo.", None, "stop")
    assert stack.sim.stats.requests == 2
    stack.sim.push(CALL, CALL)
    with pytest.raises(openai.APIStatusError) as ei:
        await c.chat.completions.create(model="m", messages=MSG)  # type: ignore[arg-type]
    assert ei.value.status_code == 502
    assert ei.value.body["code"] == "invalid_tool_call"  # type: ignore[index]
    assert ei.value.body["tool"] == "get_weather"  # type: ignore[index]
    assert stack.sim.stats.requests == 4


async def test_non_streaming_undeclared_call_passes_with_pass(make_stack: StackFactory) -> None:
    stack = await make_stack("vllm", undeclared_calls="pass")
    stack.sim.push(CALL)
    c = openai.AsyncOpenAI(base_url=stack.v1, api_key="x", max_retries=0)
    r = await c.chat.completions.create(model="m", messages=MSG)  # type: ignore[arg-type]
    assert [tc.function.name for tc in r.choices[0].message.tool_calls or ()] == ["get_weather"]


# --- sans-I/O: the rule and the cost -------------------------------------------------------------

@pytest.mark.parametrize(("data", "expected"), [
    (b'{"choices":[{"delta":{"content":"Hi"}}]}', False),
    (b'{"choices":[{"delta":{"content":"Hi","tool_calls":null}}]}', False),
    (b'{"choices":[{"delta":{"content":"Hi","tool_calls": null,"function_call":null}}]}', False),
    (b'{"choices":[{"delta":{"tool_calls":[]}}]}', False),
    (b'{"choices":[{"delta":{"tool_calls": [ ]}}]}', False),
    (b'{"choices":[{"delta":{"content":"the \\"tool_calls\\": [1] key"}}]}', False),
    (b'{"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}', True),
    (b'{"choices":[{"delta":{"tool_calls": [\n{"index":0}]}}]}', True),
    (b'{"choices":[{"delta":{"function_call":{"name":"f"}}}]}', True),
    (b'{"choices":[{"delta":{"tool_calls":null,"function_call":{"name":"f"}}}]}', True),
])
def test_carries_call(data: bytes, expected: bool) -> None:
    assert carries_call(data) is expected


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def test_plain_events_pass_the_structured_only_mender_byte_for_byte() -> None:
    chunks = [{"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": [
        {"index": 0, "delta": d, "finish_reason": f}]} for d, f in [
        ({"role": "assistant", "content": ""}, None), ({"content": "<tool_call>{"}, None),
        ({"content": "Hi [there]"}, None), ({"content": "caf\u00e9", "tool_calls": None}, None),
        ({}, "stop")]]
    upstream = b"".join(_sse(c) for c in chunks) + b"data: [DONE]\n\n"
    mender = ChatMender(None, None, structured_only=True)
    pipeline = StreamPipeline(True, mender)
    out = b"".join(pipeline.feed(upstream[i:i + 7]) for i in range(0, len(upstream), 7))
    out += pipeline.finish()
    assert out == upstream
    assert mender.tool_names == [] and mender.repairs == []


def test_a_structured_call_reaches_the_checker_and_the_text_around_it_survives() -> None:
    seen: list[tuple[str, str]] = []

    def checker(name: str, arguments: str) -> Any:
        from toolmend.parsers.mender import CheckResult

        seen.append((name, arguments))
        return CheckResult(False, error={"error": {"message": "no", "code": "invalid_tool_call"}})

    mender = ChatMender(None, None, structured_only=True, checker=checker)
    pipeline = StreamPipeline(False, mender)
    upstream = b"".join(_sse({"choices": [{"index": 0, "delta": d, "finish_reason": f}]})
                        for d, f in [({"content": "Let me see. "}, None),
                                     ({"tool_calls": [{"index": 0, "id": "x", "function": {
                                         "name": "rm", "arguments": '{"path": "/"}'}}]}, None),
                                     ({}, "tool_calls")])
    first = upstream.index(b"\n\n") + 2
    assert pipeline.feed(upstream[:first]) == upstream[:first]  # text before the call: as is
    with pytest.raises(UpstreamStreamError) as ei:
        pipeline.feed(upstream[first:])
    assert orjson.loads(ei.value.body)["error"]["message"] == "no"
    assert seen == [("rm", '{"path": "/"}')]


def test_no_tools_is_an_unknown_tool_retried_as_text() -> None:
    verdict = validate_call("get_weather", '{"city": "Oslo"}', NO_TOOLS)
    assert not verdict.ok and verdict.error is not None
    assert verdict.error.keyword == "name"
    d = decide(verdict, Policy.REPAIR, NO_TOOLS, backend="llamacpp")
    assert d.outcome is Outcome.RETRY and d.retry is not None
    assert d.retry.read_as == READ_TEXT
    assert d.retry.correction == CORRECTION
    assert set(d.retry.remove) == {"tools", "tool_choice", "parallel_tool_calls"}
    assert d.retry.set == {}
    # a retried reply that calls again is returned as a call, to be refused
    assert d.retry.read("get_weather", "{}", "") == ("get_weather", "{}")
    assert d.retry.read(None, None, "Sunny.") == (None, None)
    assert decide(verdict, Policy.REPAIR, NO_TOOLS, attempt=1).outcome is Outcome.ERROR
    assert decide(verdict, Policy.PASS, NO_TOOLS).outcome is Outcome.FORWARD
    assert retry_plan(verdict, NO_TOOLS, "vllm").read_as == READ_TEXT
