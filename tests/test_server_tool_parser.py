"""toolmend in place of vLLM's own tool parser (``server_tool_parser``), against a stand-in vLLM
that replays the real server's recorded replies (``fixtures/vllm/reasoning.json``, recorded by
``tests/real/record_vllm.py`` from vLLM 0.32 with its qwen3 reasoning parser on).

The stand-in answers as the real server did: with ``tool_choice: "auto"`` its parsers' split
(a call drafted inside reasoning comes out as a real call), with ``tool_choice: "none"`` the raw
text (reasoning cut at the drafted call, the rest in ``content``). It records every request, so
the tests check what toolmend asked for as well as what the agent got. The expected client
output of each case is written in ``tests/real/reasoning_cases.py``, shared with the real-server
tests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from toolmend.pipeline.mending import ChatMending, bypasses_server_parser
from toolmend.pipeline.whole_reply import fold_stream
from toolmend.server.app import build_app, start_server
from toolmend.server.config import Settings
from toolmend.server.context import RequestContext
from toolmend.server.errors import ProxyError

from .real.helpers import ASK, NAMED, TOOLS, literal
from .real.reasoning_cases import BY_NAME, CASES, Case

RECORDED = json.loads((Path(__file__).resolve().parent.parent / "fixtures" / "vllm" /
                       "reasoning.json").read_text())
MODEL = "gemma-3-270m"


# --- when toolmend takes over ------------------------------------------------------------------

T = {"tools": TOOLS}


@pytest.mark.parametrize(("setting", "backend", "body", "expected"), [
    ("auto", "vllm", T, True),
    ("auto", "vllm", {**T, "tool_choice": "auto"}, True),
    ("auto", "vllm", {**T, "tool_choice": "none"}, True),
    ("auto", "vllm", {**T, "tool_choice": "required"}, False),
    ("auto", "vllm", {**T, "tool_choice": NAMED}, False),
    ("auto", "vllm", {**T, "n": 2}, False),
    ("auto", "vllm", {**T, "n": 1}, True),
    ("auto", "vllm", {}, False),  # no tools: no tool parser runs
    ("bypass", "vllm", {"tools": []}, False),
    ("trust", "vllm", T, False),
    ("bypass", "vllm", T, True),
    ("auto", "openai", T, False),
    ("bypass", "openai", T, True),
    ("bypass", "openai", {**T, "tool_choice": "required"}, False),
    ("auto", "llamacpp", T, False),
    ("bypass", "llamacpp", T, False),
    ("bypass", "ollama", T, False),
    ("bypass", "sglang", T, False),
    ("bypass", "embedded", T, False),
])
def test_when_the_server_parser_is_bypassed(setting: str, backend: str, body: dict[str, Any],
                                            expected: bool) -> None:
    assert bypasses_server_parser(setting, backend, body) is expected


def test_the_shaped_body_is_a_copy() -> None:
    """Validation and retries keep reading the client's body and its ``tool_choice``."""
    body = {"model": "m", "messages": ASK, "tools": TOOLS, "stream": True}
    m = ChatMending(Settings(), body, RequestContext("r", "/v1/chat/completions", 0.0), {},
                    "vllm")
    shaped = m.upstream_body()
    assert shaped == {"model": "m", "messages": ASK, "tools": TOOLS, "stream": True,
                      "tool_choice": "none", "skip_special_tokens": False}
    assert body == {"model": "m", "messages": ASK, "tools": TOOLS, "stream": True}
    assert m.validation is not None and m.validation.toolset.choice == "auto"


# --- a stand-in vLLM replaying the real server -------------------------------------------------

class RecordedVllm:
    """Answers like the real vLLM did for each recorded case; keeps every request body."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.by_request = {(literal(c["text"]), c["max_tokens"]): name
                           for name, c in RECORDED["cases"].items()}
        self.error_midway = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/version", self.version)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": RECORDED["vllm_version"]})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": MODEL, "object": "model", "owned_by": "vllm", "max_model_len": 1024}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        regex = (body.get("structured_outputs") or {}).get("regex")
        case = RECORDED["cases"][self.by_request[regex, body.get("max_tokens")]]
        raw = body.get("tool_choice") == "none"
        if not body.get("stream"):
            if raw:  # never asked: toolmend fetches a re-split reply as a stream
                return web.json_response({"error": {"message": "unexpected"}}, status=418)
            choice = {"index": 0, "logprobs": None, **case["trust_whole"]}
            return web.json_response({"id": "chatcmpl-rec", "object": "chat.completion",
                                      "created": 1, "model": MODEL, "choices": [choice],
                                      "usage": USAGE})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        steps = case["bypass_stream" if raw else "trust_stream"]
        for i, step in enumerate(steps):
            if self.error_midway and i == len(steps) // 2:
                await resp.write(b'data: {"error": {"message": "engine died", "type": '
                                 b'"InternalServerError", "code": 500}}\n\n')
                break
            await resp.write(b"data: " + orjson.dumps(chunk(step)) + b"\n\n")
        else:
            if (body.get("stream_options") or {}).get("include_usage"):
                await resp.write(b"data: " + orjson.dumps(
                    {**chunk(None), "choices": [], "usage": USAGE}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp


USAGE = {"prompt_tokens": 241, "completion_tokens": 90, "total_tokens": 331}


def chunk(step: dict[str, Any] | None) -> dict[str, Any]:
    choices = [] if step is None else [{"index": 0, "logprobs": None, **step}]
    return {"id": "chatcmpl-rec", "object": "chat.completion.chunk", "created": 1,
            "model": MODEL, "choices": choices}


Proxy = Callable[..., Any]


@pytest.fixture
async def vllm() -> AsyncIterator[tuple[RecordedVllm, str]]:
    server = RecordedVllm()
    runner, port = await start_server(server.app(), "127.0.0.1", 0)
    yield server, f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def proxy(vllm: tuple[RecordedVllm, str]) -> AsyncIterator[Proxy]:
    runners: list[web.AppRunner] = []

    async def start(**settings: Any) -> str:
        app = build_app(Settings(**{"log_requests": False, **settings}), [vllm[1]])
        runner, port = await start_server(app, "127.0.0.1", 0)
        runners.append(runner)
        return f"http://127.0.0.1:{port}/v1"

    yield start
    for r in runners:
        await r.cleanup()


def request(case: Case, **extra: Any) -> dict[str, Any]:
    return {"model": "gemma", **case.request(
        logit_bias=RECORDED["logit_bias"], max_tokens=RECORDED["cases"][case.name]["max_tokens"]),
        **extra}


async def ask(base: str, body: dict[str, Any], headers: dict[str, str] | None = None
              ) -> tuple[int, dict[str, Any]]:
    """The client's view of one request: status, then the calls (name and parsed arguments),
    each reasoning field, content, finish reason (and the error, if any)."""
    async with aiohttp.ClientSession() as s, \
            s.post(base + "/chat/completions", json=body, headers=headers or {}) as r:
        status = r.status
        if not body.get("stream"):
            doc = await r.json(content_type=None)
            if status != 200:
                return status, doc
            choice = doc["choices"][0]
            msg = choice["message"]
            calls = [{"name": c["function"]["name"],
                      "arguments": json.loads(c["function"]["arguments"])}
                     for c in msg.get("tool_calls") or ()]
            view = {k: msg[k] for k in ("reasoning", "reasoning_content") if msg.get(k)}
            return status, {"calls": calls, **view, "content": msg.get("content") or "",
                            "finish": choice["finish_reason"]}
        events = [json.loads(line[6:]) for line in (await r.text()).splitlines()
                  if line.startswith("data: {")]
    fields: dict[str, str] = {}
    parts: dict[int, dict[str, str]] = {}
    finish = None
    for e in events:
        if "error" in e:
            return status, e
        for c in e.get("choices") or ():
            d = c.get("delta") or {}
            for k in ("reasoning", "reasoning_content", "content"):
                if d.get(k):
                    fields[k] = fields.get(k, "") + d[k]
            for tc in d.get("tool_calls") or ():
                slot = parts.setdefault(tc["index"], {"name": "", "arguments": ""})
                slot["name"] += tc["function"].get("name") or ""
                slot["arguments"] += tc["function"].get("arguments") or ""
            finish = c.get("finish_reason") or finish
    calls = [{"name": p["name"], "arguments": json.loads(p["arguments"])}
             for _, p in sorted(parts.items())]
    return status, {"calls": calls, **{k: v for k, v in fields.items() if k != "content"},
                    "content": fields.get("content", ""), "finish": finish}


def expected(case: Case) -> dict[str, Any]:
    out: dict[str, Any] = {"calls": case.calls}
    if case.reasoning:
        out["reasoning"] = case.reasoning
    out.update(content=case.content, finish=case.finish)
    return out


WAYS = ["buffered", "incremental", "whole"]


def way(w: str) -> tuple[dict[str, Any], dict[str, str]]:
    if w == "whole":
        return {"stream": False}, {}
    return {"stream": True}, {"X-Toolmend-Tool-Mode": w}


# --- the agent's view: exactly what the model meant --------------------------------------------

@pytest.mark.parametrize("w", WAYS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_each_case_through_toolmend(vllm: tuple[RecordedVllm, str], proxy: Proxy,
                                          case: Case, w: str) -> None:
    server, _ = vllm
    extra, headers = way(w)
    status, got = await ask(await proxy(), request(case, **extra), headers)
    assert status == 200, got
    assert got == expected(case)
    # what vLLM was asked for: raw text, its tool parser out of play, tools still offered
    sent = server.bodies[-1]
    assert sent["tool_choice"] == "none"
    assert sent["skip_special_tokens"] is False
    assert sent["tools"] == TOOLS
    assert sent["stream"] is True  # a whole reply too: vLLM's whole replies lose </think>
    assert sent["stream_options"] == {"include_usage": True}
    assert len(server.bodies) == 1


async def test_the_drafted_call_is_the_reason(vllm: tuple[RecordedVllm, str],
                                              proxy: Proxy) -> None:
    """The case the bypass exists for, and what the agent got before it: with
    ``server_tool_parser = "trust"`` toolmend relays vLLM's own split, in which the call the model
    only drafted inside its reasoning is a second, real call."""
    server, _ = vllm
    case = BY_NAME["drafted_call_then_call"]
    base = await proxy(server_tool_parser="trust")
    for extra in ({"stream": True}, {"stream": False}):
        status, got = await ask(base, request(case, **extra))
        assert status == 200, got
        assert got == {"calls": [{"name": "get_time", "arguments": {"city": "Bergen"}},
                                 {"name": "get_weather", "arguments": {"city": "Bergen"}}],
                       "reasoning": "The user asks about the weather. I could call ",
                       "content": "", "finish": "tool_calls"}
        sent = server.bodies[-1]
        assert "tool_choice" not in sent and "skip_special_tokens" not in sent
        assert sent["stream"] is extra["stream"]
    status, got = await ask(await proxy(), request(case, stream=True))
    assert got["calls"] == [{"name": "get_weather", "arguments": {"city": "Bergen"}}]


async def test_tool_choice_none_from_the_client(vllm: tuple[RecordedVllm, str],
                                                proxy: Proxy) -> None:
    """Under the client's own ``tool_choice: "none"`` a call drafted inside reasoning is not a
    call the request forbade: the agent gets the answer, and the draft stays reasoning."""
    server, _ = vllm
    case = BY_NAME["drafted_call_then_text"]
    for w in WAYS:
        extra, headers = way(w)
        status, got = await ask(await proxy(), request(case, tool_choice="none", **extra),
                                headers)
        assert status == 200, got
        assert got == expected(case)
        assert server.bodies[-1]["tool_choice"] == "none"


async def test_the_clients_own_skip_special_tokens_is_kept(vllm: tuple[RecordedVllm, str],
                                                           proxy: Proxy) -> None:
    server, _ = vllm
    case = BY_NAME["thinking_then_text"]
    status, got = await ask(await proxy(), request(case, stream=True, skip_special_tokens=True))
    assert status == 200 and got == expected(case)
    assert server.bodies[-1]["skip_special_tokens"] is True


async def test_an_upstream_error_inside_a_whole_reply(vllm: tuple[RecordedVllm, str],
                                                      proxy: Proxy) -> None:
    """A whole reply fetched as a stream that breaks off with an error event: the agent gets an
    OpenAI-shaped error with a real status, as for any failed non-streaming request."""
    server, _ = vllm
    server.error_midway = True
    status, got = await ask(await proxy(), request(BY_NAME["thinking_then_call"], stream=False))
    assert status == 502
    assert got == {"error": {"message": "upstream: engine died", "type": "InternalServerError",
                             "param": None, "code": "upstream_error"}}


# --- folding a stream into one reply -----------------------------------------------------------

def sse(*chunks: Any) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def test_fold_stream_keeps_every_field_as_it_came() -> None:
    raw = sse({"id": "c1", "created": 7, "model": "m", "choices": [
                  {"index": 0, "delta": {"role": "assistant", "content": ""}}]},
              {"id": "c1", "choices": [{"index": 0, "delta": {"reasoning": "Hm"}}]},
              {"id": "c1", "choices": [{"index": 0, "delta": {"content": "<tool_call>"}}]},
              {"id": "c1", "choices": [{"index": 0, "delta": {"content": " ok</think>"}}]},
              {"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [
                  {"index": 0, "id": "t1", "function": {"name": "f"}}]}}]},
              {"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [
                  {"index": 0, "function": {"arguments": "{}"}}]}, "finish_reason": "stop"}]},
              {"id": "c1", "choices": [], "usage": USAGE})
    assert fold_stream(raw) == ({
        "id": "c1", "object": "chat.completion", "created": 7, "model": "m",
        "choices": [{"index": 0, "message": {
            "role": "assistant", "content": "<tool_call> ok</think>", "reasoning": "Hm",
            "tool_calls": [{"id": "t1", "type": "function",
                            "function": {"name": "f", "arguments": "{}"}}]},
            "logprobs": None, "finish_reason": "stop"}],
        "usage": USAGE}, 0)


def test_fold_stream_raises_the_upstreams_error() -> None:
    raw = sse({"id": "c", "choices": [{"index": 0, "delta": {"content": "a"}}]},
              {"error": {"message": "out of memory", "code": 500}})
    with pytest.raises(ProxyError) as e:
        fold_stream(raw)
    assert (e.value.status, e.value.message) == (502, "upstream: out of memory")


def test_fold_stream_refuses_an_event_that_is_not_json() -> None:
    with pytest.raises(ProxyError) as e:
        fold_stream(b"data: {not json\n\n")
    assert (e.value.status, e.value.code) == (502, "upstream_bad_response")


def test_fold_stream_replaces_invalid_utf8_and_counts_it() -> None:
    raw = b'data: {"choices": [{"index": 0, "delta": {"content": "a\xffb"}}]}\n\n' + \
        b'data: {"choices": [{"index": 0, "delta": {"content": "c"}}]}\n\n'
    out, replaced = fold_stream(raw)
    assert out["choices"][0]["message"]["content"] == "a\ufffdbc"
    assert replaced == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fold_stream_never_crashes_on_any_bytes(raw: bytes) -> None:
    try:
        out, _ = fold_stream(raw)
    except ProxyError as e:
        assert e.status == 502
    else:
        assert out["object"] == "chat.completion"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["content", "reasoning", "reasoning_content",
                                                 "role"]),
                                st.text(max_size=8), max_size=3), max_size=12))
def test_fold_stream_concatenates_each_field(deltas: list[dict[str, str]]) -> None:
    raw = sse(*({"choices": [{"index": 0, "delta": d}]} for d in deltas))
    msg = fold_stream(raw)[0]["choices"][0]["message"] if deltas else None
    for key in ("content", "reasoning", "reasoning_content"):
        want = "".join(d.get(key, "") for d in deltas)
        if msg is not None:
            assert (msg.get(key) or "") == want


# --- the re-split's hot path -------------------------------------------------------------------

def _pipeline_run(deltas: list[dict[str, Any]], mender: Any) -> list[dict[str, Any]]:
    from toolmend.parsers.sse import SSEDecoder, SSEEvent
    from toolmend.parsers.stream import StreamPipeline

    p = StreamPipeline(False, mender)
    out = b"".join(p.feed(e) for e in (b"data: " + orjson.dumps(chunk(
        {"delta": d, "finish_reason": None})) + b"\n\n" for d in deltas))
    out += p.feed(b"data: " + orjson.dumps(chunk({"delta": {}, "finish_reason": "stop"})) +
                  b"\n\n") + p.feed(b"data: [DONE]\n\n") + p.finish()
    return [orjson.loads(e.data) for e in SSEDecoder().feed(out)
            if isinstance(e, SSEEvent) and not e.is_done]


def test_plain_server_reasoning_is_forwarded_without_being_parsed() -> None:
    """Re-splitting reads the server's reasoning, but a delta of it with no character that could
    start a marker, while nothing is held, goes out as it came: a thinking reply costs the
    mender a parse per marker, not per delta."""
    from toolmend.parsers.mender import ChatMender

    words = [{"role": "assistant", "content": ""}] + \
        [{"reasoning": f"word{i} "} for i in range(200)] + \
        [{"content": "<tool_call>"}, {"content": '\n{"name": "get_time", "arguments": {}}\n'},
         {"content": "</tool_call>"}, {"content": " no."}, {"content": "</think>"},
         {"content": "It is sunny."}]
    m = ChatMender("hermes", TOOLS, resplit_server_reasoning=True)
    fed: list[Any] = []
    feed = m.feed
    m.feed = lambda c: (fed.append(c), feed(c))[1]  # type: ignore[method-assign]
    events = _pipeline_run(words, m)
    reasoning = "".join(c["delta"].get("reasoning") or "" for e in events
                        for c in e["choices"])
    content = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert reasoning == "".join(f"word{i} " for i in range(200)) + \
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call> no.'
    assert content == "It is sunny."
    assert not any(c["delta"].get("tool_calls") for e in events for c in e["choices"])
    assert len(fed) <= 12  # the first deltas, the markers, the call, the finish; not 200 words


def test_resplit_fast_and_parsed_paths_agree() -> None:
    """The same deltas, once through the hot path and once with every event parsed: the
    client receives the same chunks."""
    from toolmend.parsers.mender import ChatMender

    deltas = [{"role": "assistant", "content": ""}, {"reasoning": "a é 🌍 "},
              {"reasoning": "b"}, {"reasoning": " [c] <d"}, {"reasoning": "e"},
              {"content": "<tool_call>\n"}, {"content": '{"name": "get_time", "arguments": {}}'},
              {"content": "\n</tool_call>"}, {"content": " f</think>"}, {"content": "g"}]

    class Always(ChatMender):
        def wants(self, data: bytes) -> bool:
            return True

    def run(m: ChatMender) -> list[Any]:
        return [(c["delta"], c["finish_reason"]) for e in _pipeline_run(deltas, m)
                for c in e["choices"]]

    fast = run(ChatMender("hermes", TOOLS, resplit_server_reasoning=True))
    slow = run(Always("hermes", TOOLS, resplit_server_reasoning=True))
    assert fast == slow


def test_a_server_that_ignores_stream_true_is_read_whole() -> None:
    """Asked for a stream, a server that answers one JSON object has sent the whole reply."""
    from toolmend.pipeline.whole_reply import fold_stream

    whole = {"id": "c1", "object": "chat.completion", "model": "m",
             "choices": [{"index": 0, "finish_reason": "stop",
                          "message": {"role": "assistant", "content": "Sunny."}}]}
    assert fold_stream(b"  " + json.dumps(whole).encode()) == (whole, 0)
    with pytest.raises(ProxyError):
        fold_stream(b'{"error": {"message": "boom", "type": "server_error"}}')
