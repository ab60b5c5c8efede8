"""End to end: the reasoning decision table, reasoning fields and opened reasoning through the
proxy, a real HTTP client in front and the simulated backend behind, in each dialect (vLLM,
llama-server, Ollama), streaming and not.

The table's rows are ``fixtures/reasoning/decision_table.json``. The simulated server sends each
scripted reply the way a server without a reasoning parser does (raw text in ``content``) or,
for the last row, the way one with a reasoning parser does (its own reasoning field, which
toolmend passes through and never reads for calls).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import ollama
import orjson
import pytest

from toolmend.parsers.sse import SSEComment, SSEDecoder, SSEEvent

from .conftest import Stack, StackFactory

DIALECTS = ["vllm", "llamacpp", "ollama"]
#: the field each simulated server puts its own reasoning in (as the real ones do)
SERVER_FIELD = {"vllm": "reasoning", "llamacpp": "reasoning_content", "ollama": "reasoning"}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}}}}},
]
X = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
Y = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bergen"}}\n</tool_call>'
BERGEN = ["get_weather", {"city": "Bergen"}]

#: the decision table, one row per case: the scripted reply and what the client gets
TABLE = orjson.loads((Path(__file__).resolve().parent.parent / "fixtures" / "reasoning" /
                      "decision_table.json").read_bytes())


def expected_view(case: dict[str, Any], dialect: str) -> dict[str, Any]:
    """A table case's expected result as :func:`client_view` shows it: reasoning toolmend
    separated in ``reasoning_content``, a server's own in that server's field."""
    exp = case["expected"]
    out: dict[str, Any] = {}
    if exp.get("content"):
        out["content"] = exp["content"]
    if exp.get("reasoning"):
        out["reasoning_content"] = exp["reasoning"]
    if exp.get("server_reasoning"):
        out[SERVER_FIELD[dialect]] = exp["server_reasoning"]
    out["calls"] = [[c["name"], c["arguments"]] for c in exp["tool_calls"]]
    out["finish"] = exp["finish_reason"]
    return out


def client_view(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    fields: dict[str, str] = {}
    calls: dict[int, list[Any]] = {}
    finish = None
    for c in chunks:
        for ch in c.get("choices") or ():
            for key, value in (ch.get("delta") or {}).items():
                if key == "tool_calls":
                    for tc in value:
                        slot = calls.setdefault(tc["index"], ["", ""])
                        if tc.get("id"):
                            assert not slot[0], "a call started twice"
                        slot[0] += tc["function"].get("name") or ""
                        slot[1] += tc["function"].get("arguments") or ""
                elif isinstance(value, str) and value and key != "role":
                    fields[key] = fields.get(key, "") + value
            finish = ch.get("finish_reason") or finish
    return {**fields, "calls": [[n, orjson.loads(a)] for n, a in
                                (calls[i] for i in sorted(calls))], "finish": finish}


def message_view(doc: dict[str, Any]) -> dict[str, Any]:
    choice = doc["choices"][0]
    msg = choice["message"]
    out = {k: v for k, v in msg.items() if isinstance(v, str) and v and k != "role"}
    out["calls"] = [[c["function"]["name"], orjson.loads(c["function"]["arguments"])]
                    for c in msg.get("tool_calls") or ()]
    out["finish"] = choice["finish_reason"]
    return out


async def chat(stack: Stack, *, stream: bool, headers: dict[str, str] | None = None,
               **extra: Any) -> tuple[dict[str, Any], list[str]]:
    """One chat request through toolmend: the client's view and toolmend's notes (SSE comments
    when streaming, the ``X-Toolmend-Repairs`` header when not)."""
    body = {"model": extra.pop("model", "sim-model"),
            "messages": [{"role": "user", "content": "Weather in Bergen?"}],
            "tools": TOOLS, "stream": stream, **extra}
    async with aiohttp.ClientSession() as http, \
            http.post(stack.v1 + "/chat/completions", json=body, headers=headers) as r:
        raw = await r.read()
        assert r.status == 200, raw
        header = r.headers.get("X-Toolmend-Repairs", "")
    if not stream:
        return message_view(orjson.loads(raw)), header.split("; ") if header else []
    dec = SSEDecoder()
    evs = dec.feed(raw) + dec.finish()
    data = [e for e in evs if isinstance(e, SSEEvent)]
    assert data[-1].is_done
    comments = [e.text.decode() for e in evs if isinstance(e, SSEComment)]
    return client_view([orjson.loads(e.data) for e in data[:-1]]), comments


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("case", TABLE, ids=[c["name"] for c in TABLE])
async def test_decision_table_end_to_end(make_stack: StackFactory, dialect: str, stream: bool,
                                         case: dict[str, Any]) -> None:
    stack = await make_stack(dialect)
    stack.sim.push({**case["scenario"], "wire_split_seed": 5})
    got, _ = await chat(stack, stream=stream)
    assert got == expected_view(case, dialect)


@pytest.mark.parametrize("mode", ["buffered", "incremental", "whole"])
@pytest.mark.parametrize("dialect", DIALECTS)
async def test_drafted_call_never_fires_and_is_reported(make_stack: StackFactory, dialect: str,
                                                        mode: str) -> None:
    stack = await make_stack(dialect)
    stack.sim.push({"content": f"<think>I could call {X} but no.</think>\n\n{Y}",
                    "wire_split_seed": 11})
    got, notes = await chat(stack, stream=mode != "whole",
                            headers={"X-Toolmend-Tool-Mode": mode} if mode != "whole" else None)
    assert got["calls"] == [BERGEN]
    prefix = "toolmend " if mode != "whole" else ""
    assert prefix + "kept 1 tool call(s) drafted inside reasoning as reasoning: the model went "\
        "on after them" in notes


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("dialect", DIALECTS)
async def test_server_reasoning_field_is_passed_through_and_never_read_for_calls(
        make_stack: StackFactory, dialect: str, stream: bool) -> None:
    stack = await make_stack(dialect)
    stack.sim.push({"reasoning": f"I could call {Y} and stop there.", "content": "Hi."})
    got, _ = await chat(stack, stream=stream, headers={"X-Toolmend-Reasoning": "drop"})
    assert got == {SERVER_FIELD[dialect]: f"I could call {Y} and stop there.", "content": "Hi.",
                   "calls": [], "finish": "stop"}


OPENED = f"I could call {X} but no.</think>\n\n{Y}"
OPENED_VIEW = {"content": "\n\n", "reasoning_content": f"I could call {X} but no.",
               "calls": [BERGEN], "finish": "tool_calls"}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("dialect", DIALECTS)
async def test_reasoning_opened_by_the_request(make_stack: StackFactory, dialect: str,
                                               stream: bool) -> None:
    stack = await make_stack(dialect)
    stack.sim.push({"content": OPENED, "wire_split_seed": 2})
    got, _ = await chat(stack, stream=stream,
                        chat_template_kwargs={"enable_thinking": True})
    assert got == OPENED_VIEW


async def test_reasoning_opened_by_the_model_name(make_stack: StackFactory) -> None:
    stack = await make_stack("vllm", sim_kwargs={"model": "Qwen/Qwen3-4B-Thinking-2507"})
    stack.sim.push({"content": OPENED})
    got, _ = await chat(stack, stream=True, model="any-name-the-agent-uses")
    assert got == OPENED_VIEW


async def test_reasoning_opened_by_configuration(make_stack: StackFactory) -> None:
    stack = await make_stack("llamacpp", sim_kwargs={"model": "acme-reasoner-7b"},
                             reasoning_open_models=["*reasoner*"])
    stack.sim.push({"content": OPENED})
    got, _ = await chat(stack, stream=True)
    assert got == OPENED_VIEW
    # and the request cannot close it for a model the operator says opens reasoning
    stack.sim.push({"content": OPENED})
    got, _ = await chat(stack, stream=False, chat_template_kwargs={"enable_thinking": False})
    assert got == OPENED_VIEW


async def test_reply_guessed_open_that_never_closes_says_so(make_stack: StackFactory) -> None:
    stack = await make_stack("vllm")
    stack.sim.push({"content": "Still weighing the options"})
    got, comments = await chat(stack, stream=True, chat_template_kwargs={"thinking": True})
    assert got == {"reasoning_content": "Still weighing the options", "calls": [],
                   "finish": "stop"}
    assert "toolmend the reply ended inside reasoning (taken to start there: "\
        "chat_template_kwargs); it never closed it, so all of its text after the start went "\
        "to reasoning" in comments


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_stray_end_marker(make_stack: StackFactory, dialect: str) -> None:
    stack = await make_stack(dialect)
    text = "The user wants weather.</think>\n\nIt is sunny."
    stack.sim.push({"content": text})
    got, comments = await chat(stack, stream=True)
    assert got == {"content": "The user wants weather.\n\nIt is sunny.", "calls": [],
                   "finish": "stop"}
    assert any("dropped 1 reasoning end marker" in c for c in comments)
    stack.sim.push({"content": text})
    got, _ = await chat(stack, stream=False)
    assert got == {"reasoning_content": "The user wants weather.", "content": "\n\nIt is sunny.",
                   "calls": [], "finish": "stop"}


@pytest.mark.parametrize(("asked", "expected"), [
    ("reasoning", {"reasoning": "Let me see.", "content": "Sunny."}),
    ("drop", {"content": "Sunny."}),
    ("content", {"content": "<think>Let me see.</think>Sunny."}),
    (None, {"reasoning_content": "Let me see.", "content": "Sunny."}),
])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_field_for_separated_reasoning_per_request(make_stack: StackFactory,
                                                         asked: str | None, stream: bool,
                                                         expected: dict[str, Any]) -> None:
    stack = await make_stack("llamacpp")
    stack.sim.push({"content": "<think>Let me see.</think>Sunny.", "wire_split_seed": 4})
    headers = {"X-Toolmend-Reasoning": asked} if asked else None
    got, _ = await chat(stack, stream=stream, headers=headers)
    assert got == {**expected, "calls": [], "finish": "stop"}


async def test_field_for_separated_reasoning_per_server(make_stack: StackFactory) -> None:
    stack = await make_stack("vllm", reasoning_field="reasoning")
    stack.sim.push({"content": "<think>Let me see.</think>Sunny."})
    got, _ = await chat(stack, stream=True)
    assert got == {"reasoning": "Let me see.", "content": "Sunny.", "calls": [],
                   "finish": "stop"}


# --- the Ollama front: every reasoning field becomes "thinking" -------------------------------

@pytest.mark.parametrize("backend", ["vllm", "ollama-native"])
async def test_ollama_front_gets_thinking_and_only_meant_calls(make_stack: StackFactory,
                                                               backend: str) -> None:
    native = backend == "ollama-native"
    stack = await make_stack("ollama" if native else backend, ollama_native=native)
    stack.sim.push({"reasoning": "Server-side thoughts. ",
                    "content": f"<think>I could call {X} but no.</think>{Y}"})
    parts = [p async for p in await ollama.AsyncClient(host=stack.url, timeout=20).chat(
        model="sim-model", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
        stream=True)]
    thinking = "".join(p.message.thinking or "" for p in parts)
    assert thinking == f"Server-side thoughts. I could call {X} but no."
    calls = [(c.function.name, dict(c.function.arguments)) for p in parts
             for c in p.message.tool_calls or ()]
    assert calls == [("get_weather", {"city": "Bergen"})]
    assert "".join(p.message.content or "" for p in parts) == ""
