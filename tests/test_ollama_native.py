"""Ollama's native /api/chat as an upstream dialect, and the sans-I/O translations both ways."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import orjson
import pytest

from toolmend.parsers.ollama import (
    NDJSONToSSE,
    chat_request_to_openai,
    openai_to_ollama_chat,
)
from toolmend.parsers.ollama_emit import Durations, OllamaEmitter
from toolmend.parsers.reply import Text
from toolmend.parsers.sse import SSEDecoder

from .conftest import Stack, StackFactory

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"]}}}]
MSG = [{"role": "user", "content": "Weather in Oslo?"}]


def ndjson(*docs: dict[str, Any]) -> bytes:
    return b"".join(orjson.dumps(d) + b"\n" for d in docs)


REPLY = ndjson(
    {"model": "m", "message": {"role": "assistant", "content": "", "thinking": "hmm"},
     "done": False},
    {"model": "m", "message": {"role": "assistant", "content": "Olá ünï 🌍"}, "done": False},
    {"model": "m", "message": {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
        {"function": {"name": "get_weather", "arguments": {"city": "Bergen"}}}]},
     "done": False},
    {"model": "m", "message": {"role": "assistant", "content": ""}, "done": True,
     "done_reason": "stop", "prompt_eval_count": 11, "eval_count": 7})


def events(sse: bytes) -> list[Any]:
    return [e.data if e.data == b"[DONE]" else orjson.loads(e.data)
            for e in SSEDecoder().feed(sse) + SSEDecoder().finish()]


# --- NDJSON -> SSE (upstream side) ------------------------------------------------------------
def test_ndjson_to_sse_translates_every_line_kind() -> None:
    a = NDJSONToSSE("chatcmpl-1", 1, id_prefix="call_x")
    evs = events(a.feed(REPLY) + a.finish())
    assert evs[-1] == b"[DONE]"
    deltas = [e["choices"][0]["delta"] for e in evs[:-2]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert {"reasoning_content": "hmm"} in deltas
    assert {"content": "Olá ünï 🌍"} in deltas
    calls = next(d["tool_calls"] for d in deltas if "tool_calls" in d)
    assert [(c["index"], c["id"], orjson.loads(c["function"]["arguments"])) for c in calls] == [
        (0, "call_x0", {"city": "Oslo"}), (1, "call_x1", {"city": "Bergen"})]
    assert evs[-3]["choices"][0]["finish_reason"] == "tool_calls"
    assert evs[-2]["usage"] == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    assert a.done


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_ndjson_to_sse_is_split_invariant(size: int) -> None:
    whole = NDJSONToSSE("c", 1, id_prefix="k")
    expect = whole.feed(REPLY) + whole.finish()
    a = NDJSONToSSE("c", 1, id_prefix="k")
    got = b"".join(a.feed(REPLY[i:i + size]) for i in range(0, len(REPLY), size)) + a.finish()
    assert got == expect


def test_ndjson_error_and_malformed_lines_become_error_events() -> None:
    a = NDJSONToSSE("c", 1)
    evs = events(a.feed(b'{"error": "model \\"x\\" not found"}\n'))
    assert evs[0]["error"]["message"] == 'model "x" not found'
    b = NDJSONToSSE("c", 1)
    evs = events(b.feed(b"{oops\n"))
    assert evs[0]["error"]["code"] == "upstream_malformed_event"
    c = NDJSONToSSE("c", 1)  # cut before done: no finish, so the relay calls it incomplete
    out = c.feed(b'{"message": {"content": "hi"}, "done": false}\n{"message"') + c.finish()
    assert b"finish_reason\":\"" not in out and b"[DONE]" not in out


def test_openai_body_to_native_chat() -> None:
    body = {"model": "qwen3", "stream": True, "max_tokens": 50, "temperature": 0.1,
            "stop": "END", "seed": 3, "tools": TOOLS,
            "response_format": {"type": "json_object"},
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_9", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "call_9", "content": "12 C"}]}
    out = openai_to_ollama_chat(body, keep_alive="-1")
    assert out["keep_alive"] == -1 and out["stream"] is True and out["format"] == "json"
    assert out["options"] == {"temperature": 0.1, "num_predict": 50, "stop": ["END"], "seed": 3}
    assert out["tools"] == TOOLS
    m = out["messages"]
    assert m[0] == {"role": "system", "content": "Be brief."}
    assert m[1] == {"role": "user", "content": "What is this?", "images": ["AAAA"]}
    assert m[2]["tool_calls"] == [{"function": {"name": "get_weather",
                                                "arguments": {"city": "Oslo"}}}]
    assert m[3] == {"role": "tool", "content": "12 C", "tool_name": "get_weather"}
    assert openai_to_ollama_chat({"messages": []}, keep_alive="30m")["keep_alive"] == "30m"
    assert "tools" not in openai_to_ollama_chat({"tools": TOOLS, "tool_choice": "none"})


def test_ollama_request_to_openai_body() -> None:
    out = chat_request_to_openai({
        "model": "m", "options": {"num_predict": -1, "temperature": 0, "top_k": 5},
        "format": "json", "tools": [{"function": {"name": "f"}}],
        "messages": [{"role": "user", "content": "look", "images": ["iVBORw0KGgo="]},
                     {"role": "assistant", "tool_calls": [
                         {"function": {"name": "f", "arguments": {"a": 1}}},
                         {"function": {"name": "g", "arguments": {}}}]},
                     {"role": "tool", "tool_name": "g", "content": "G"},
                     {"role": "tool", "tool_name": "f", "content": "F"}]})
    assert out["stream"] is True and out["temperature"] == 0 and "max_tokens" not in out
    assert "top_k" not in out and out["response_format"] == {"type": "json_object"}
    assert out["tools"][0]["type"] == "function"
    user, asst, g, f = out["messages"]
    assert user["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    ids = {c["function"]["name"]: c["id"] for c in asst["tool_calls"]}
    assert g["tool_call_id"] == ids["g"] and f["tool_call_id"] == ids["f"]
    assert asst["content"] is None


# --- OpenAI SSE -> Ollama NDJSON (front side) -------------------------------------------------
def _sse(*chunks: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


FRONT = _sse(
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hé"}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "a", "function": {"name": "f", "arguments": "{\"x\":"}}]}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": " 1}"}}]}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 1, "id": "b", "function": {"name": "g", "arguments": "{}"}}]}}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 9}})


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_emitter_streams_whole_calls_split_invariant(size: int) -> None:
    e = OllamaEmitter("chat", "m", "t")
    out = b"".join(e.feed(FRONT[i:i + size]) for i in range(0, len(FRONT), size))
    out += e.finish(Durations(total=10, load=1, prompt_eval=2, eval=7))
    lines = [orjson.loads(x) for x in out.splitlines()]
    assert lines[0]["message"]["content"] == "Hé"
    # call 0 goes out as soon as call 1 starts; call 1 at the finish
    assert [c["function"] for ln in lines for c in ln["message"].get("tool_calls", ())] == [
        {"index": 0, "name": "f", "arguments": {"x": 1}},
        {"index": 1, "name": "g", "arguments": {}}]
    assert len([ln for ln in lines if ln["message"].get("tool_calls")]) == 2
    last = lines[-1]
    assert last["done"] is True and last["done_reason"] == "stop"
    assert (last["prompt_eval_count"], last["eval_count"], last["total_duration"]) == (4, 9, 10)


@pytest.mark.parametrize("kind", ["chat", "generate"])
def test_a_streamed_content_line_is_ollamas_own(kind: str) -> None:
    """The content line is written from parts encoded once; it is exactly Ollama's line."""
    e = OllamaEmitter(kind, 'qwen3:8b "q"', "2026-12-07T00:00:00Z")
    line = e.feed_events([Text('Hé "<x>"\n')])
    body = ({"message": {"role": "assistant", "content": 'Hé "<x>"\n'}} if kind == "chat"
            else {"response": 'Hé "<x>"\n'})
    assert line == orjson.dumps({"model": 'qwen3:8b "q"', "created_at": "2026-12-07T00:00:00Z",
                                 **body, "done": False}) + b"\n"


def test_emitter_accumulates_without_stream() -> None:
    e = OllamaEmitter("chat", "m", "t", stream=False)
    assert e.feed(FRONT) == b""
    doc = orjson.loads(e.finish())
    assert doc["message"]["content"] == "Hé" and len(doc["message"]["tool_calls"]) == 2
    g = OllamaEmitter("generate", "m", "t", stream=False)
    g.feed(FRONT)
    assert orjson.loads(g.finish())["response"] == "Hé"


# --- end to end through toolmend against the sim's native endpoint -----------------------------
def client(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.v1, api_key="x", max_retries=0, timeout=20)


async def native_stack(make_stack: StackFactory, **kw: Any) -> Stack:
    kw.setdefault("ollama_native", True)
    return await make_stack("ollama", **kw)


async def test_native_stream_with_parallel_calls(make_stack: StackFactory) -> None:
    stack = await native_stack(make_stack, keep_alive="-1")
    stack.sim.push({"content": "Checking.",
                    "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}},
                                   {"name": "get_weather", "arguments": {"city": "Bergen"}}]})
    calls: dict[int, dict[str, str]] = {}
    text, finish, usage = "", None, None
    async for ch in await client(stack).chat.completions.create(
            model="sim-model", messages=MSG, tools=TOOLS, stream=True, max_tokens=99,
            stream_options={"include_usage": True}):
        usage = ch.usage or usage
        if not ch.choices:
            continue
        text += ch.choices[0].delta.content or ""
        for tc in ch.choices[0].delta.tool_calls or ():
            slot = calls.setdefault(tc.index, {"id": "", "args": ""})
            slot["id"] += tc.id or ""
            slot["args"] += tc.function.arguments or "" if tc.function else ""
        finish = ch.choices[0].finish_reason or finish
    assert text == "Checking."
    assert [orjson.loads(calls[i]["args"]) for i in sorted(calls)] == [{"city": "Oslo"},
                                                                       {"city": "Bergen"}]
    assert len({c["id"] for c in calls.values()}) == 2
    assert finish == "tool_calls"
    assert usage is not None and usage.completion_tokens > 2  # the done line's eval_count
    sent = stack.sim.stats.bodies[-1]  # what reached /api/chat
    assert sent["keep_alive"] == -1 and sent["options"]["num_predict"] == 99
    assert sent["stream"] is True and sent["tools"] == TOOLS


async def test_native_non_streaming_and_leaked_call(make_stack: StackFactory) -> None:
    stack = await native_stack(make_stack, backend="ollama")
    stack.sim.push({"content": "<tool_call>{\"name\": \"get_weather\", \"arguments\": "
                               "{'city': 'Oslo', 'days': '2'}}</tool_call>"})
    r = await client(stack).chat.completions.create(model="sim-model", messages=MSG,
                                                    tools=TOOLS)
    tc = r.choices[0].message.tool_calls
    assert tc and orjson.loads(tc[0].function.arguments) == {"city": "Oslo", "days": 2}
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.usage and r.usage.prompt_tokens > 0
    assert stack.sim.stats.bodies[-1]["stream"] is False


async def test_native_length_and_error_line(make_stack: StackFactory) -> None:
    stack = await native_stack(make_stack)
    stack.sim.push({"content": "a b c", "finish_reason": "length"},
                   {"content": "a b c d e", "fault": {"kind": "error_event", "after": 2,
                                                      "message": "GPU fell over"}})
    r = await client(stack).chat.completions.create(model="sim-model", messages=MSG)
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(openai.APIError) as e:
        async for _ in await client(stack).chat.completions.create(
                model="sim-model", messages=MSG, stream=True):
            pass
    assert "GPU fell over" in str(e.value)


async def test_native_only_when_asked(make_stack: StackFactory) -> None:
    stack = await make_stack("ollama")  # default: Ollama's /v1 layer
    await client(stack).chat.completions.create(model="sim-model", messages=MSG)
    assert "stream_options" not in stack.sim.stats.bodies[-1]
    assert "keep_alive" not in stack.sim.stats.bodies[-1]
    assert "options" not in stack.sim.stats.bodies[-1]


async def _until(cond: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_warmup_loads_ollama_with_keep_alive(make_stack: StackFactory) -> None:
    stack = await make_stack("ollama", warmup=True, keep_alive="-1")
    await _until(lambda: stack.sim.stats.bodies)
    body = stack.sim.stats.bodies[0]
    assert body == {"model": "sim-model", "messages": [], "keep_alive": -1, "stream": False}


async def test_warmup_of_an_openai_server_asks_one_token(make_stack: StackFactory) -> None:
    stack = await make_stack("vllm", warmup=True)
    await _until(lambda: stack.sim.stats.completed >= 1)
    body = stack.sim.stats.bodies[0]
    assert body["max_tokens"] == 1 and body["model"] == "sim-model"


async def test_native_constrained_retry_uses_format(make_stack: StackFactory) -> None:
    stack = await native_stack(make_stack)
    stack.sim.push({"tool_calls": [{"name": "get_weather", "arguments": {"days": 2}}]},
                   {"content": "{\"city\": \"Oslo\", \"days\": 2}"})
    r = await client(stack).chat.completions.create(model="sim-model", messages=MSG,
                                                    tools=TOOLS)
    tc = r.choices[0].message.tool_calls
    assert tc and orjson.loads(tc[0].function.arguments) == {"city": "Oslo", "days": 2}
    retry = stack.sim.stats.bodies[-1]
    assert stack.sim.stats.requests == 2
    assert retry["format"]["required"] == ["city"] and "tools" not in retry
