"""Best-of-n retries (``retry_samples``) against a scripted llama-server-like upstream.

The first reply streams an invalid call; the retry asks for ``n`` choices and toolmend keeps
the first valid one. llama-server refuses an ``n`` above its slot count with a 400, and then
the retry is asked again for one choice instead of being lost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from toolmend.server.app import build_app, start_server
from toolmend.server.config import Settings

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
    "additionalProperties": False}}}]


class Upstream:
    """Streams one invalid call; answers retries with the scripted choices' contents."""

    def __init__(self, choices: list[str], max_n: int = 8, first: str = '{"city": 7}') -> None:
        self.choices = choices
        self.first = first
        self.max_n = max_n
        self.retries: list[dict[str, Any]] = []

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            delta = {"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": self.first}}]}
            for chunk in ({"choices": [{"index": 0, "delta": delta}]},
                          {"choices": [{"index": 0, "delta": {},
                                        "finish_reason": "tool_calls"}]}):
                await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp
        self.retries.append(body)
        n = body.get("n", 1)
        if n > self.max_n:
            return web.json_response({"error": {
                "code": 400, "message": f"Field 'n': Value must be between 1 <= value <= "
                f"{self.max_n}, but got {n}", "type": "invalid_request_error"}}, status=400)
        return web.json_response({"choices": [
            {"index": i, "finish_reason": "stop",
             "message": {"role": "assistant", "content": self.choices[i]}}
            for i in range(n)]})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m"}]})


@pytest.fixture
async def proxy() -> AsyncIterator[Callable[..., Any]]:
    cleanups: list[Any] = []

    async def start(upstream: Upstream, **settings: Any) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", upstream.chat)
        app.router.add_get("/v1/models", upstream.models)
        runner, port = await start_server(app, "127.0.0.1", 0)
        cleanups.append(runner.cleanup)
        tm = build_app(Settings(**{"log_requests": False, "backend": "llamacpp", "slots": 2,
                                   "on_invalid": "retry", **settings}),
                       [f"http://127.0.0.1:{port}"])
        tm_runner, tm_port = await start_server(tm, "127.0.0.1", 0)
        cleanups.append(tm_runner.cleanup)
        return f"http://127.0.0.1:{tm_port}"

    yield start
    for c in reversed(cleanups):
        await c()


async def ask(url: str, tools: list[dict[str, Any]] = TOOLS, **extra: Any
              ) -> tuple[list[str], dict[str, str], list[bytes]]:
    body = {"model": "m", "stream": True, "tools": tools,
            "messages": [{"role": "user", "content": "Weather in Oslo?"}], **extra}
    async with aiohttp.ClientSession() as s, \
            s.post(url + "/v1/chat/completions", json=body) as r:
        raw = await r.read()
    events = [orjson.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]
    args = "".join(tc["function"].get("arguments") or ""
                   for e in events for c in e.get("choices") or ()
                   for tc in (c.get("delta") or {}).get("tool_calls") or ())
    errors = [e["error"] for e in events if "error" in e]
    comments = [line for line in raw.split(b"\n") if line.startswith(b": toolmend")]
    return [args] if args else [], errors[0] if errors else {}, comments


async def test_the_first_valid_of_n_choices_replaces_the_call(proxy: Any) -> None:
    upstream = Upstream(['{"city": 8}', '{"city": "Oslo"}'])
    url = await proxy(upstream, retry_samples=2)
    args, error, comments = await ask(url)
    assert error == {}
    assert args == ['{"city": "Oslo"}']
    assert [r["n"] for r in upstream.retries] == [2]
    assert comments == [b": toolmend retry 1/1 get_weather: at /city: 7 is not of type 'string'",
                        b": toolmend retried get_weather: valid on attempt 1"]


async def test_no_valid_choice_is_the_clear_error_of_the_first(proxy: Any) -> None:
    upstream = Upstream(['{"city": 8}', '{"town": "Oslo"}'])
    url = await proxy(upstream, retry_samples=2)
    args, error, _ = await ask(url)
    assert args == []
    assert error["code"] == "invalid_tool_call"
    assert error["validator_message"] == "8 is not of type 'string'"


async def test_n_above_the_backends_limit_is_asked_again_for_one(proxy: Any) -> None:
    upstream = Upstream(['{"city": "Oslo"}'], max_n=2)
    url = await proxy(upstream, retry_samples=3)
    args, error, _ = await ask(url)
    assert error == {}
    assert args == ['{"city": "Oslo"}']
    assert [r.get("n") for r in upstream.retries] == [3, None]


async def test_one_sample_sends_no_n(proxy: Any) -> None:
    upstream = Upstream(['{"city": "Oslo"}'])
    url = await proxy(upstream)
    args, _, _ = await ask(url)
    assert args == ['{"city": "Oslo"}']
    assert "n" not in upstream.retries[0]
    # the retry is constrained by the translated schema, read back as the arguments
    assert upstream.retries[0]["json_schema"] == TOOLS[0]["function"]["parameters"]


async def test_a_retry_gets_room_for_the_arguments(proxy: Any) -> None:
    """A small ``max_tokens`` is raised to 512 for the retry (a grammar lets white space eat
    the client's budget); a larger one is kept."""
    upstream = Upstream(['{"city": "Oslo"}'])
    url = await proxy(upstream, max_retries=2)
    await ask(url, max_tokens=60)
    await ask(url, max_completion_tokens=2000)
    assert [(r.get("max_tokens"), r.get("max_completion_tokens")) for r in upstream.retries] \
        == [(512, None), (None, 2000)]


def _tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


async def test_a_retry_for_any_call_keeps_the_clients_bound(proxy: Any) -> None:
    """A call to an unknown tool among several is retried with ``tool_choice: "required"``
    and read as a tool call: no JSON-schema grammar to pad, so ``max_tokens`` stays."""
    upstream = Upstream(["no call"])
    url = await proxy(upstream)
    _, error, _ = await ask(url, tools=[_tool("read_file"), _tool("write_file")], max_tokens=60)
    assert error["code"] == "invalid_tool_call"
    (retry,) = upstream.retries
    assert (retry["tool_choice"], retry["max_tokens"]) == ("required", 60)


FORECAST = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "unit": {"enum": ["c", "f"]}},
    "required": ["city", "days"], "additionalProperties": False}}}]


async def test_a_focused_retry_replaces_only_the_wrong_member(proxy: Any) -> None:
    """Only ``days`` was wrong: the retry asks for ``days`` alone, under its own schema, and the
    answer takes its place in the held call; ``city`` and ``unit`` stay as the model wrote them."""
    upstream = Upstream(['{"days": 7}'], first='{"city": "Oslo", "days": 40, "unit": "c"}')
    url = await proxy(upstream)
    args, error, comments = await ask(url, tools=FORECAST)
    assert error == {}
    assert args == ['{"city":"Oslo","days":7,"unit":"c"}']
    (retry,) = upstream.retries
    assert retry["json_schema"] == {
        "type": "object", "properties": {"days": {"type": "integer", "minimum": 1, "maximum": 14}},
        "required": ["days"], "additionalProperties": False}
    assert retry["messages"][-1]["content"].endswith(
        "Reply with only a JSON object holding the corrected `days`.")
    assert comments[-1] == b": toolmend retried get_weather: valid on attempt 1"


async def test_a_focused_answer_still_wrong_is_the_clear_error(proxy: Any) -> None:
    upstream = Upstream(['{"days": 99}'], first='{"city": "Oslo", "days": 40}')
    url = await proxy(upstream)
    args, error, _ = await ask(url, tools=FORECAST)
    assert args == []
    assert error["code"] == "invalid_tool_call"
    assert error["pointer"] == "/days"
    assert error["validator_message"] == "99 is greater than the maximum of 14"
