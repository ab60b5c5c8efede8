"""The Responses front with the real ``openai`` SDK -> toolmend -> each simulated backend.

Whatever the backend's dialect, ``client.responses.create`` / ``client.responses.stream`` get
clean ``function_call`` items, mended and validated like on chat completions; reasoning comes
back through ``encrypted_content``; ``previous_response_id`` continues a stored response; and
tools a local backend cannot run are left out and named in a header.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from openai import AsyncOpenAI

from toolmend.server.app import build_app, start_server
from toolmend.server.auth import hash_key
from toolmend.server.config import Settings
from toolmend.server.keys import SCHEDULER
from toolmend.sim.server import SimBackend

from .conftest import Stack, StackFactory

WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "days": {"type": "integer"}},
           "required": ["city"], "additionalProperties": False}
TOOLS: list[dict[str, Any]] = [{"type": "function", "name": "get_weather",
                                "description": "Weather forecast", "parameters": WEATHER}]
ASK = "Weather in Oslo?"
# a raw <tool_call> leaked into content, split across deltas, with "days" as a string
LEAKED = {"chunks": ["Let me check.", " <tool", "_call>\n{\"name\": \"get_",
                     "weather\", \"arguments\": {\"city\": \"Oslo\", \"days\": \"3\"}}\n</tool_",
                     "call>"]}
CALL = {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}
INVALID = {"tool_calls": [{"name": "get_weather", "arguments": {"days": 2}}]}  # no city
BACKENDS = {"vllm": ("vllm", {}), "llamacpp": ("llamacpp", {}), "ollama": ("ollama", {}),
            "ollama-native": ("ollama", {"ollama_native": True})}


async def backend(make_stack: StackFactory, name: str, tmp_path: Any, **kw: Any) -> Stack:
    dialect, settings = BACKENDS[name]
    return await make_stack(dialect, state_dir=str(tmp_path), **settings, **kw)


_clients: list[AsyncOpenAI] = []


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _clients:
        await _clients.pop().close()


def client(stack: Stack) -> AsyncOpenAI:
    c = AsyncOpenAI(base_url=stack.v1, api_key="sk-local", max_retries=0, timeout=20)
    _clients.append(c)
    return c


async def stream_events(stack: Stack, **kw: Any) -> list[Any]:
    kw.setdefault("model", "sim-model")
    kw.setdefault("input", ASK)
    got = []
    async with client(stack).responses.stream(**kw) as s:
        async for ev in s:
            got.append(ev)
    return got


async def until(condition: Any) -> None:
    """Wait for a condition another task brings about (no time bound: it is the event)."""
    while True:
        if condition():
            return
        await asyncio.sleep(0.01)


def calls_of(output: list[Any]) -> list[tuple[str, Any]]:
    return [(o.name, orjson.loads(o.arguments)) for o in output if o.type == "function_call"]


def text_of(output: list[Any]) -> str:
    return "".join(c.text for o in output if o.type == "message" for c in o.content)


@pytest.mark.parametrize("name", list(BACKENDS))
async def test_function_call_round_trip(make_stack: StackFactory, tmp_path: Any,
                                        name: str) -> None:
    stack = await backend(make_stack, name, tmp_path)
    stack.sim.push(CALL, {"content": "Sunny, 21 °C."})
    first = await client(stack).responses.create(model="sim-model", input=ASK, tools=TOOLS,
                                                 store=False)
    assert first.status == "completed"
    assert calls_of(first.output) == [("get_weather", {"city": "Oslo"})]
    call = first.output[-1]
    assert call.call_id and call.id.startswith("fc_") and call.status == "completed"
    history = [{"role": "user", "content": ASK}, *[o.model_dump() for o in first.output],
               {"type": "function_call_output", "call_id": call.call_id,
                "output": "sunny, 21 °C"}]
    final = await client(stack).responses.create(model="sim-model", input=history,
                                                 tools=TOOLS, store=False)
    assert text_of(final.output) == "Sunny, 21 °C."
    assert final.status == "completed" and final.usage is not None
    assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0
    sent = stack.sim.stats.bodies[-1]["messages"]
    assert sent[-2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert sent[-1]["role"] == "tool" and sent[-1]["content"] == "sunny, 21 °C"
    if name != "ollama-native":  # Ollama's own API pairs results by tool name, not by id
        assert sent[-2]["tool_calls"][0]["id"] == call.call_id
        assert sent[-1]["tool_call_id"] == call.call_id


@pytest.mark.parametrize("name", list(BACKENDS))
async def test_leaked_split_call_streams_as_a_clean_function_call(make_stack: StackFactory,
                                                                  tmp_path: Any,
                                                                  name: str) -> None:
    stack = await backend(make_stack, name, tmp_path)
    stack.sim.push(LEAKED)
    got = await stream_events(stack, tools=TOOLS)
    types = [e.type for e in got]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert "".join(e.delta for e in got if e.type == "response.output_text.delta") \
        == "Let me check. "
    done = [e.item for e in got if e.type == "response.output_item.done"]
    assert [d.type for d in done] == ["message", "function_call"]
    assert done[1].name == "get_weather"
    assert orjson.loads(done[1].arguments) == {"city": "Oslo", "days": 3}  # "3" repaired
    final = got[-1].response
    assert calls_of(final.output) == [("get_weather", {"city": "Oslo", "days": 3})]
    assert [e.sequence_number for e in got] == list(range(len(got)))


async def test_repair_is_reported_in_a_header_when_not_streaming(make_stack: StackFactory,
                                                                 tmp_path: Any) -> None:
    stack = await backend(make_stack, "llamacpp", tmp_path)
    stack.sim.push(LEAKED)
    raw = await client(stack).responses.with_raw_response.create(model="sim-model", input=ASK,
                                                                 tools=TOOLS)
    assert "get_weather" in raw.headers["x-toolmend-repairs"]
    assert calls_of(raw.parse().output) == [("get_weather", {"city": "Oslo", "days": 3})]


@pytest.mark.parametrize("name", ["vllm", "llamacpp", "ollama"])
async def test_an_invalid_call_is_retried_and_arrives_valid(make_stack: StackFactory,
                                                            tmp_path: Any, name: str) -> None:
    stack = await backend(make_stack, name, tmp_path)
    stack.sim.push(INVALID, CALL)
    got = await stream_events(stack, tools=TOOLS)
    assert got[-1].type == "response.completed"
    assert calls_of(got[-1].response.output) == [("get_weather", {"city": "Oslo"})]
    assert stack.sim.stats.requests == 2  # asked again once


@pytest.mark.parametrize("name", ["vllm", "ollama-native"])
async def test_a_hopeless_call_ends_in_response_failed(make_stack: StackFactory, tmp_path: Any,
                                                       name: str) -> None:
    stack = await backend(make_stack, name, tmp_path)
    stack.sim.push({"content": "Checking.", **INVALID}, INVALID)
    got = await stream_events(stack, tools=TOOLS)
    assert got[-1].type == "response.failed"
    failed = got[-1].response
    assert failed.status == "failed"
    assert failed.error.code == "invalid_tool_call"
    assert "get_weather" in failed.error.message and "city" in failed.error.message
    assert not any(e.type == "response.output_item.added" and e.item.type == "function_call"
                   for e in got)  # never a bad function_call
    assert text_of(failed.output) == "Checking."


async def test_a_hopeless_call_fails_a_whole_reply_with_its_error(make_stack: StackFactory,
                                                                 tmp_path: Any) -> None:
    stack = await backend(make_stack, "vllm", tmp_path)
    stack.sim.push(INVALID, INVALID)
    with pytest.raises(openai.APIStatusError) as e:
        await client(stack).responses.create(model="sim-model", input=ASK, tools=TOOLS)
    assert e.value.status_code == 502
    assert e.value.body["code"] == "invalid_tool_call"  # type: ignore[index]


@pytest.mark.parametrize("name", list(BACKENDS))
async def test_reasoning_round_trips_through_encrypted_content(make_stack: StackFactory,
                                                               tmp_path: Any,
                                                               name: str) -> None:
    stack = await backend(make_stack, name, tmp_path)
    stack.sim.push({"reasoning": "The user wants Oslo's weather.", **CALL},
                   {"content": "Sunny."}, {"content": "Sunny again."})
    got = await stream_events(stack, tools=TOOLS, store=False, reasoning={"summary": "auto"},
                              include=["reasoning.encrypted_content"])
    output = got[-1].response.output
    reasoning = output[0]
    assert reasoning.type == "reasoning"
    assert [s.text for s in reasoning.summary] == ["The user wants Oslo's weather."]
    assert reasoning.encrypted_content and "Oslo" not in reasoning.encrypted_content
    assert any(e.type == "response.reasoning_summary_text.delta" for e in got)
    items = [o.model_dump(exclude_none=True) for o in output]
    history = [{"role": "user", "content": ASK}, *items,
               {"type": "function_call_output", "call_id": output[-1].call_id,
                "output": "sunny"}]
    await client(stack).responses.create(model="sim-model", input=history, tools=TOOLS,
                                         store=False)
    turn = stack.sim.stats.bodies[-1]["messages"][1]
    thinking = "thinking" if name == "ollama-native" else "reasoning_content"  # Ollama's name
    assert turn[thinking] == "The user wants Oslo's weather."
    assert turn["tool_calls"][0]["function"]["name"] == "get_weather"
    # altered (or another server's): left out, said in a header, never a 400
    forged = dict(items[0], summary=[], encrypted_content=items[0]["encrypted_content"][:-4]
                  + "0000")
    raw = await client(stack).responses.with_raw_response.create(
        model="sim-model", input=[history[0], forged, *history[2:]], tools=TOOLS, store=False)
    assert raw.http_response.status_code == 200
    assert raw.headers["x-toolmend-dropped-reasoning"] == "1"
    turn = stack.sim.stats.bodies[-1]["messages"][1]
    assert thinking not in turn and turn["role"] == "assistant"


async def test_encrypted_content_survives_a_restart_with_the_same_state_dir(
        make_stack: StackFactory, tmp_path: Any) -> None:
    one = await backend(make_stack, "vllm", tmp_path)
    one.sim.push({"reasoning": "Think once.", "content": "Hi."})
    first = await client(one).responses.create(model="sim-model", input="Hello", store=False,
                                               include=["reasoning.encrypted_content"])
    two = await backend(make_stack, "vllm", tmp_path)  # another process, the same key file
    await client(two).responses.create(model="sim-model", store=False, input=[
        {"role": "user", "content": "Hello"},
        *[o.model_dump(exclude_none=True) for o in first.output],
        {"role": "user", "content": "Again"}])
    assert two.sim.stats.bodies[-1]["messages"][1] == {
        "role": "assistant", "content": "Hi.", "reasoning_content": "Think once."}


@pytest.mark.parametrize("name", ["vllm", "ollama"])
async def test_previous_response_id_continues_a_stored_response(make_stack: StackFactory,
                                                                tmp_path: Any,
                                                                name: str) -> None:
    stack = await backend(make_stack, name, tmp_path)
    stack.sim.push(CALL, {"content": "Sunny."})
    c = client(stack)
    first = await c.responses.create(model="sim-model", input=ASK, tools=TOOLS,
                                     instructions="Be brief.")
    call_id = first.output[-1].call_id
    second = await c.responses.create(
        model="sim-model", previous_response_id=first.id, tools=TOOLS,
        input=[{"type": "function_call_output", "call_id": call_id, "output": "sunny"}])
    assert second.previous_response_id == first.id and text_of(second.output) == "Sunny."
    assert [m["role"] for m in stack.sim.stats.bodies[-1]["messages"]] == [
        "user", "assistant", "tool"]  # instructions are not carried over, as in the API
    assert stack.sim.stats.bodies[-1]["messages"][1]["tool_calls"][0]["id"] == call_id
    fetched = await c.responses.retrieve(first.id)
    assert fetched.id == first.id and calls_of(fetched.output) == calls_of(first.output)
    await c.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await c.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as e:
        await c.responses.create(model="sim-model", previous_response_id=first.id,
                                 input="And tomorrow?")
    assert e.value.body["code"] == "previous_response_not_found"  # type: ignore[index]
    assert e.value.body["param"] == "previous_response_id"  # type: ignore[index]


async def test_store_is_bounded_by_count(make_stack: StackFactory, tmp_path: Any) -> None:
    stack = await backend(make_stack, "vllm", tmp_path, responses_store_max=1)
    c = client(stack)
    first = await c.responses.create(model="sim-model", input="one")
    second = await c.responses.create(model="sim-model", input="two")
    assert (await c.responses.retrieve(second.id)).id == second.id
    with pytest.raises(openai.NotFoundError):  # the oldest made room
        await c.responses.retrieve(first.id)
    unstored = await c.responses.create(model="sim-model", input="three", store=False)
    with pytest.raises(openai.NotFoundError):
        await c.responses.retrieve(unstored.id)


async def test_unsupported_tool_types_are_left_out_and_named(make_stack: StackFactory,
                                                             tmp_path: Any) -> None:
    stack = await backend(make_stack, "vllm", tmp_path)
    stack.sim.push(CALL)
    tools: list[Any] = [
        {"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["vs_1"]},
        {"type": "computer_use_preview", "display_width": 800, "display_height": 600,
         "environment": "linux"},
        {"type": "namespace", "name": "multi_agent_v1", "description": "sub-agents",
         "tools": [{"type": "function", "name": "spawn_agent", "parameters": WEATHER}]},
        {"type": "custom", "name": "apply_patch", "description": "patch"},
        {"type": "local_shell"}, *TOOLS]
    raw = await client(stack).responses.with_raw_response.create(
        model="sim-model", input=ASK, tools=tools, tool_choice="auto")
    assert raw.headers["x-toolmend-ignored-tools"] == \
        "web_search, file_search, computer_use_preview, namespace, custom, local_shell"
    assert [t["function"]["name"] for t in stack.sim.stats.bodies[-1]["tools"]] == \
        ["get_weather"]
    assert calls_of(raw.parse().output) == [("get_weather", {"city": "Oslo"})]


async def test_requests_map_onto_the_chat_body(make_stack: StackFactory, tmp_path: Any) -> None:
    stack = await backend(make_stack, "vllm", tmp_path)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    r = await client(stack).responses.create(
        model="sim-model", input="Count.", max_output_tokens=5, temperature=0.3, top_p=0.8,
        metadata={"run": "7"}, reasoning={"effort": "high"},
        text={"format": {"type": "json_schema", "name": "count", "schema": schema}})
    sent = stack.sim.stats.bodies[-1]
    assert sent["max_tokens"] == 5 and sent["temperature"] == 0.3 and sent["top_p"] == 0.8
    assert sent["reasoning_effort"] == "high"
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "count", "schema": schema}}
    assert "metadata" not in sent and "store" not in sent and "include" not in sent
    assert r.metadata == {"run": "7"}
    assert r.status == "incomplete"  # the sim's 16 words are cut at 5 tokens
    assert r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"


async def test_bad_requests_are_refused_naming_the_field(make_stack: StackFactory,
                                                         tmp_path: Any) -> None:
    stack = await backend(make_stack, "vllm", tmp_path)
    with pytest.raises(openai.BadRequestError) as e:
        await client(stack).responses.create(
            model="sim-model", input=[{"role": "critic", "content": "hm"}])  # type: ignore
    assert e.value.body["param"] == "input[0].role"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        await client(stack).responses.create(model="sim-model", input="x",
                                             metadata={"k": "v" * 600})
    assert e.value.body["param"] == "metadata"  # type: ignore[index]
    assert stack.sim.stats.requests == 0


async def test_an_upstream_error_before_output_keeps_its_status(make_stack: StackFactory,
                                                                tmp_path: Any) -> None:
    stack = await backend(make_stack, "vllm", tmp_path)
    stack.sim.push({"fault": {"kind": "status", "status": 500, "message": "boom"}})
    with pytest.raises(openai.InternalServerError):
        await stream_events(stack)


async def test_codex_headers_name_the_session(make_stack: StackFactory, tmp_path: Any) -> None:
    stack = await backend(make_stack, "vllm", tmp_path)
    await client(stack).responses.create(
        model="sim-model", input="hi", store=False, prompt_cache_key="thread-9",
        extra_headers={"session-id": "cx-session-9", "thread-id": "cx-session-9"})
    await client(stack).responses.create(model="sim-model", input="hi", store=False,
                                         prompt_cache_key="thread-10")
    async with aiohttp.ClientSession() as s:
        while True:  # the step is recorded once its reply is written: wait for it
            async with s.get(stack.url + "/toolmend/v1/sessions") as r:
                data = (await r.json())["data"]
            if len(data) == 2:
                break
            await asyncio.sleep(0.01)
    assert {(d["id"], d["agent_id"], d["source"]) for d in data} == {
        ("cx-session-9", "cx-session-9", "codex"), ("thread-10", "thread-10", "codex")}


async def test_get_and_delete_of_unknown_ids_are_404(make_stack: StackFactory,
                                                     tmp_path: Any) -> None:
    stack = await backend(make_stack, "vllm", tmp_path)
    async with aiohttp.ClientSession() as s:
        for method in ("GET", "DELETE"):
            async with s.request(method, stack.v1 + "/responses/resp_nope") as r:
                assert r.status == 404
                doc = await r.json()
                assert doc["error"]["code"] == "not_found"
                assert "resp_nope" in doc["error"]["message"]


async def test_a_stored_response_belongs_to_its_keys_agent(tmp_path: Any) -> None:
    keys = {"planner": "tm-key-planner-1111", "coder": "tm-key-coder-2222"}
    cfg = tmp_path / "toolmend.toml"
    cfg.write_text("".join(f'[keys."{hash_key(k)}"]\nagent = "{a}"\n' for a, k in keys.items()))
    sim = SimBackend("vllm")
    await sim.start()
    conf = Settings(log_requests=False, state_dir=str(tmp_path))
    conf.config_path = str(cfg)
    runner, port = await start_server(build_app(conf, [sim.url]), "127.0.0.1", 0)
    base = f"http://127.0.0.1:{port}/v1"
    planner, coder = (AsyncOpenAI(base_url=base, api_key=k, max_retries=0)
                      for k in keys.values())
    _clients.extend((planner, coder))
    try:
        mine = await planner.responses.create(model="sim-model", input="hi")
        with pytest.raises(openai.NotFoundError):
            await coder.responses.retrieve(mine.id)
        with pytest.raises(openai.NotFoundError):
            await coder.responses.create(model="sim-model", input="more",
                                         previous_response_id=mine.id)
        with pytest.raises(openai.NotFoundError):
            await coder.responses.delete(mine.id)
        assert (await planner.responses.retrieve(mine.id)).id == mine.id  # still there
    finally:
        await runner.cleanup()
        await sim.stop()


async def test_an_upstream_failure_mid_stream_ends_in_response_failed(make_stack: StackFactory,
                                                                     tmp_path: Any) -> None:
    stack = await backend(make_stack, "vllm", tmp_path)
    stack.sim.push({"content": "one two three four five six",
                    "fault": {"kind": "reset", "after": 3}})
    got = await stream_events(stack)
    # the sim's first three chunks: the role, "one", " two"; then the connection is reset
    assert "".join(e.delta for e in got if e.type == "response.output_text.delta") == "one two"
    assert got[-1].type == "response.failed"
    assert got[-1].response.error.code == "upstream_disconnected"
    assert got[-1].response.output[0].status == "incomplete"


async def test_a_client_that_leaves_mid_stream_releases_slot_and_upstream(
        tmp_path: Any) -> None:
    sim = SimBackend("vllm")
    await sim.start()
    app = build_app(Settings(log_requests=False, state_dir=str(tmp_path)), [sim.url])
    runner, port = await start_server(app, "127.0.0.1", 0)
    sim.push({"fault": {"kind": "endless"}, "token_delay": 0.005})
    try:
        async with aiohttp.ClientSession() as s:
            resp = await s.post(f"http://127.0.0.1:{port}/v1/responses",
                                json={"model": "sim-model", "input": "go", "stream": True})
            await resp.content.readuntil(b"response.output_text.delta")
            resp.close()
        # the upstream call is closed and the slot given back
        await until(lambda: bool(sim.stats.disconnects) and app[SCHEDULER].in_flight == 0)
        assert sim.stats.requests == 1
    finally:
        await runner.cleanup()
        await sim.stop()
