"""toolmend as an Ollama server: the real ``ollama`` client -> toolmend -> each simulated backend.

The backend's own dialect does not matter to the client: whatever stack is behind toolmend, the
Ollama client gets whole tool calls with object arguments, mended and validated like on /v1.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import ollama
import orjson
import pytest

from .conftest import Stack, StackFactory

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                           "parameters": {
                                               "type": "object",
                                               "properties": {"city": {"type": "string"},
                                                              "days": {"type": "integer"}},
                                               "required": ["city"]}}}]
MSG = [{"role": "user", "content": "Weather in Oslo?"}]
# a raw <tool_call> leaked into content, split across deltas, with "days" as a string
LEAKED = {"chunks": ["Let me check.", " <tool", "_call>\n{\"name\": \"get_",
                     "weather\", \"arguments\": {\"city\": \"Oslo\", \"days\": \"3\"}}\n</tool_",
                     "call>"]}
# each simulated dialect, plus Ollama reached through its native /api/chat
BACKENDS = {"vllm": ("vllm", {}), "llamacpp": ("llamacpp", {}), "ollama": ("ollama", {}),
            "ollama-native": ("ollama", {"ollama_native": True})}


def client(stack: Stack) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=stack.url, timeout=20)


async def backend(make_stack: StackFactory, name: str, **kw: Any) -> Stack:
    dialect, settings = BACKENDS[name]
    return await make_stack(dialect, **settings, **kw)


async def chat_stream(stack: Stack, **kw: Any) -> list[ollama.ChatResponse]:
    kw.setdefault("messages", MSG)
    return [p async for p in await client(stack).chat(model="sim-model", stream=True, **kw)]


@pytest.mark.parametrize("name", list(BACKENDS))
async def test_streaming_chat_with_leaked_split_call_is_mended(make_stack: StackFactory,
                                                               name: str) -> None:
    stack = await backend(make_stack, name)
    stack.sim.push(LEAKED)
    parts = await chat_stream(stack, tools=TOOLS)
    assert "".join(p.message.content or "" for p in parts) == "Let me check. "
    with_calls = [p for p in parts if p.message.tool_calls]
    assert len(with_calls) == 1  # the call arrives whole, in one line
    call = with_calls[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert call.function.arguments == {"city": "Oslo", "days": 3}  # repaired: "3" -> 3
    last = parts[-1]
    assert last.done is True and all(p.done is False for p in parts[:-1])
    assert last.done_reason == "stop"
    assert last.eval_count and last.eval_count > 0
    assert last.prompt_eval_count and last.prompt_eval_count > 0
    assert last.total_duration and last.total_duration >= (last.eval_duration or 0) > 0
    if name == "ollama-native":  # the upstream really was asked on its native endpoint
        assert "options" in stack.sim.stats.bodies[-1] or "tools" in stack.sim.stats.bodies[-1]
        assert "stream_options" not in stack.sim.stats.bodies[-1]


@pytest.mark.parametrize("name", ["vllm", "llamacpp", "ollama"])
async def test_structured_parallel_calls_come_whole(make_stack: StackFactory, name: str) -> None:
    stack = await backend(make_stack, name)
    stack.sim.push({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}},
                                   {"name": "get_weather", "arguments": {"city": "Bergen"}}],
                    "quirks": {"duplicate_args_tail": True}})
    parts = await chat_stream(stack, tools=TOOLS)
    calls = [c for p in parts for c in p.message.tool_calls or ()]
    assert [c.function.arguments for c in calls] == [{"city": "Oslo"}, {"city": "Bergen"}]
    raw = [c.model_dump() for c in calls]
    assert all(isinstance(c["function"]["arguments"], dict) for c in raw)


async def test_non_streaming_chat_with_tools(make_stack: StackFactory) -> None:
    stack = await make_stack("llamacpp")
    stack.sim.push({"content": "Sure.<tool_call>{\"name\": \"get_weather\", \"arguments\": "
                               "{\"city\": \"Oslo\",}}</tool_call>"})
    r = await client(stack).chat(model="sim-model", messages=MSG, tools=TOOLS, stream=False)
    assert r.done is True and r.done_reason == "stop"
    assert r.message.content == "Sure."
    assert r.message.tool_calls is not None
    assert r.message.tool_calls[0].function.arguments == {"city": "Oslo"}
    assert r.eval_count and r.prompt_eval_count


async def test_non_streaming_plain_text_and_length(stack: Stack) -> None:
    r = await client(stack).chat(model="sim-model", messages=MSG, stream=False,
                                 options={"num_predict": 5})
    assert r.done_reason == "length"
    assert r.message.content and len(r.message.content.split()) == 5
    assert not r.message.tool_calls


async def test_options_and_format_map_to_openai(stack: Stack) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    await client(stack).chat(model="sim-model", messages=MSG, stream=False, format=schema,
                             options={"temperature": 0.2, "top_p": 0.9, "num_predict": 7,
                                      "stop": ["END"], "seed": 42, "num_ctx": 8192})
    body = stack.sim.stats.bodies[-1]
    assert body["temperature"] == 0.2 and body["top_p"] == 0.9 and body["max_tokens"] == 7
    assert body["stop"] == ["END"] and body["seed"] == 42 and "num_ctx" not in body
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "response", "schema": schema}}
    assert body["model"] == "sim-model"


async def test_tool_history_is_paired_by_name(stack: Stack) -> None:
    history = [*MSG,
               {"role": "assistant", "content": "",
                "tool_calls": [{"function": {"name": "get_weather",
                                             "arguments": {"city": "Oslo"}}}]},
               {"role": "tool", "content": "12 C", "tool_name": "get_weather"}]
    stack.sim.push({"content": "It is 12 C."})
    r = await client(stack).chat(model="sim-model", messages=history, tools=TOOLS,
                                 stream=False)
    assert r.message.content == "It is 12 C."
    sent = stack.sim.stats.bodies[-1]["messages"]
    call = sent[1]["tool_calls"][0]
    assert orjson.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    assert sent[2]["role"] == "tool" and sent[2]["tool_call_id"] == call["id"]


@pytest.mark.parametrize("stream", [True, False])
async def test_generate(stack: Stack, stream: bool) -> None:
    stack.sim.push({"content": "Paris is the capital."})
    c = client(stack)
    if stream:
        parts = [p async for p in await c.generate(model="sim-model", prompt="Capital?",
                                                   system="Be brief.", stream=True)]
        text = "".join(p.response or "" for p in parts)
        last = parts[-1]
    else:
        last = await c.generate(model="sim-model", prompt="Capital?", system="Be brief.")
        text = last.response or ""
    assert text == "Paris is the capital."
    assert last.done and last.done_reason == "stop" and last.eval_count
    msgs = stack.sim.stats.bodies[-1]["messages"]
    assert msgs == [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Capital?"}]


async def test_load_requests_answer_without_generating(stack: Stack) -> None:
    r = await client(stack).generate(model="sim-model", prompt="")
    assert r.done and r.done_reason == "load"
    r2 = await client(stack).chat(model="sim-model", messages=[], stream=False)
    assert r2.done and r2.done_reason == "load"
    assert stack.sim.stats.requests == 0


async def test_discovery_endpoints(make_stack: StackFactory) -> None:
    stack = await make_stack("llamacpp")
    c = client(stack)
    tags = await c.list()
    assert [m.model for m in tags.models] == ["sim-model"]
    ps = await c.ps()
    assert ps.models[0].model == "sim-model" and ps.models[0].context_length == 2048
    show = await c.show("sim-model:latest")
    assert "tools" in (show.capabilities or [])
    assert show.modelinfo and show.modelinfo["general.basename"] == "sim-model"
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.url + "/api/version") as r:
            assert "version" in await r.json()
        async with s.get(stack.url + "/") as r:
            assert await r.text() == "Ollama is running"


async def test_errors_have_ollama_shape(stack: Stack) -> None:
    c = client(stack)
    with pytest.raises(ollama.ResponseError) as e:
        await c.show("no-such-model")
    assert e.value.status_code == 404 and "not found" in e.value.error
    stack.sim.push({"fault": {"kind": "status", "status": 503, "message": "overloaded"}})
    with pytest.raises(ollama.ResponseError) as e:
        await c.chat(model="sim-model", messages=MSG, stream=False)
    assert e.value.status_code == 503 and "overloaded" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        await c.chat(model="sim-model", messages=[{"role": "wizard", "content": "x"}])
    assert e.value.status_code == 400 and "role" in e.value.error
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.url + "/api/chat", data=b"{not json") as r:
            assert r.status == 400
            doc = await r.json()
    assert isinstance(doc["error"], str)


async def test_error_mid_stream_is_an_error_line(stack: Stack) -> None:
    stack.sim.push({"content": "one two three four five six",
                    "fault": {"kind": "reset", "after": 3}})
    seen: list[str] = []
    with pytest.raises(ollama.ResponseError) as e:
        async for p in await client(stack).chat(model="sim-model", messages=MSG, stream=True):
            seen.append(p.message.content or "")
    assert "".join(seen).startswith("one")
    assert "upstream" in e.value.error


async def test_agent_session_is_traced(stack: Stack) -> None:
    stack.sim.push({"content": "ok"})
    await client(stack).chat(model="sim-model", messages=MSG, stream=False)
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.url + "/toolmend/v1/sessions") as r:
            listing = await r.json()
    assert listing["data"] and listing["data"][0]["steps"] == 1


@pytest.mark.parametrize("stream", [True, False])
async def test_unrepairable_call_is_an_explicit_error(stack: Stack, stream: bool) -> None:
    bad = {"content": "<tool_call>{\"name\": \"get_weather\", \"arguments\": "
                      "the city of Oslo please}</tool_call>"}
    stack.sim.push(bad, bad)
    with pytest.raises(ollama.ResponseError) as e:
        if stream:
            async for p in await client(stack).chat(model="sim-model", messages=MSG,
                                                    tools=TOOLS, stream=True):
                assert not p.message.tool_calls  # nothing half-broken was passed on
        else:
            await client(stack).chat(model="sim-model", messages=MSG, tools=TOOLS,
                                     stream=False)
    assert "invalid tool call" in e.value.error
    if not stream:
        assert e.value.status_code == 502
    assert stack.sim.stats.requests == 2  # one retry, then the error


async def test_version_is_current_and_configurable(make_stack: StackFactory) -> None:
    """Clients gate on the version: Codex's --oss mode refuses an Ollama older than 0.13.4."""
    default = await make_stack("vllm")
    pinned = await make_stack("vllm", ollama_version="0.15.0")
    async with aiohttp.ClientSession() as s:
        async with s.get(default.url + "/api/version") as r:
            assert await r.json() == {"version": "0.14.3"}
        async with s.get(pinned.url + "/api/version") as r:
            assert await r.json() == {"version": "0.15.0"}


async def test_pull_of_a_served_model_succeeds_and_of_another_says_why(
        make_stack: StackFactory) -> None:
    """Clients pull a model they do not see (Codex --oss does); toolmend cannot pull."""
    stack = await make_stack("vllm")
    await client(stack).pull("sim-model")  # served: "pulled" at once
    with pytest.raises(ollama.ResponseError) as e:
        await client(stack).pull("gpt-oss:20b")
    assert e.value.status_code == 404
    assert "'gpt-oss:20b' is not served by the backend behind toolmend" in e.value.error
    assert "(sim-model)" in e.value.error
    # streamed, as Ollama reports a failed pull: an error line in the progress stream
    with pytest.raises(ollama.ResponseError) as e:
        async for _ in await client(stack).pull("gpt-oss:20b", stream=True):
            pass
    assert "'gpt-oss:20b' is not served by the backend behind toolmend" in e.value.error
