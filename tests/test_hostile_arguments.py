"""Hostile tool-call arguments from a hostile upstream: nested 1,100 levels, or without end.

Each case runs toolmend in front of a small aiohttp upstream that sends exactly the bytes under
test. The client must get an OpenAI-shaped ``invalid_tool_call`` error (502 before streaming, an
error event then ``[DONE]`` after, keep-alives or not) naming the limit, never a 500, a
``RecursionError`` or broken chunked encoding; and the upstream response must be let go.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from toolmend.parsers.arguments import ArgumentText
from toolmend.parsers.mender import ChatMender, StreamError
from toolmend.parsers.ollama import NDJSONToSSE
from toolmend.parsers.repair import REPAIR_MAX_CHARS, repair_arguments, too_deep
from toolmend.parsers.schemas import BudgetExceeded, compile_tools, validation_budget
from toolmend.parsers.validation import Issue, validate_call
from toolmend.server.app import build_app, start_server
from toolmend.server.config import Settings

MSG = [{"role": "user", "content": "go"}]
TOOL = {"type": "function", "function": {"name": "write", "parameters": {
    "type": "object", "properties": {"a": {}}}}}
DEEP = "[" * 1100 + "]" * 1100
DEEP_ARGS = '{"a": ' + DEEP + "}"


@dataclass
class Reply:
    """What the upstream sends for one request: SSE ``data`` payloads (dicts are chunks), or a
    whole JSON body when ``whole`` is set. ``arrived`` is set when the request arrives, ``hold``
    is awaited before the first byte; after the events, ``forever`` (if given) is sent again
    and again until the write fails."""

    events: list[Any] = field(default_factory=list)
    whole: dict[str, Any] | None = None
    hold: asyncio.Event | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    forever: dict[str, Any] | None = None


class HostileUpstream:
    """An OpenAI-compatible upstream that answers each request with the next scripted reply
    and records whether its response was let go (the client side closed) before it ended."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.url = ""
        self.cut_off = asyncio.Event()  # a streamed reply could not be written to the end
        self.finished = asyncio.Event()  # a streamed reply was written to the end
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        reply = self.replies.pop(0)
        reply.arrived.set()
        asked = await request.json()
        if reply.hold is not None:
            await reply.hold.wait()
        if reply.whole is not None and asked.get("stream") is True:
            # toolmend may ask for a stream to fold into a whole reply: answer as servers do
            choice = reply.whole["choices"][0]
            message = {k: v for k, v in choice["message"].items() if v is not None}
            for i, tc in enumerate(message.get("tool_calls") or ()):
                tc["index"] = i
            reply = Reply([chunk(message), chunk({}, choice["finish_reason"])])
        elif reply.whole is not None:
            return web.json_response(reply.whole)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for ev in reply.events:
                data = ev if isinstance(ev, bytes) else orjson.dumps(ev)
                await resp.write(b"data: " + data + b"\n\n")
            if reply.forever is not None:
                again = b"data: " + orjson.dumps(reply.forever) + b"\n\n"
                while True:  # until toolmend lets the response go
                    await resp.write(again)
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
            self.cut_off.set()
            raise
        self.finished.set()
        return resp


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def call_deltas(arguments: str, piece: int = 4096, name: str = "write"
                ) -> list[dict[str, Any]]:
    """A structured call whose arguments arrive in pieces, then the finish chunk."""
    out = [chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1",
                                                       "type": "function", "function": {
                                                           "name": name,
                                                           "arguments": ""}}]})]
    out += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments[i:i + piece]}}]})
            for i in range(0, len(arguments), piece)]
    return [*out, chunk({}, "tool_calls")]


def content_deltas(text: str, piece: int = 4096) -> list[dict[str, Any]]:
    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": text[i:i + piece]}) for i in range(0, len(text), piece)]
    return [*out, chunk({}, "stop")]


@pytest.fixture
async def hostile() -> AsyncIterator[Callable[..., Any]]:
    cleanups: list[Any] = []

    async def factory(**settings: Any) -> tuple[HostileUpstream, str]:
        up = HostileUpstream()
        await up.start()
        cleanups.append(up.stop)
        app = build_app(Settings(**{"log_requests": False, "backend": "vllm",
                                    "tool_format": "hermes", **settings}), [up.url])
        runner, port = await start_server(app, "127.0.0.1", 0)
        cleanups.append(runner.cleanup)
        return up, f"http://127.0.0.1:{port}/v1/chat/completions"

    yield factory
    for fn in reversed(cleanups):
        await fn()


def stream_error(raw: bytes) -> dict[str, Any]:
    """The in-stream error: an error event, then ``[DONE]``, at the very end."""
    events = [ln[6:] for ln in raw.split(b"\n") if ln.startswith(b"data: ")]
    assert events[-1] == b"[DONE]", raw[-300:]
    err = orjson.loads(events[-2])["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    return err  # type: ignore[no-any-return]


async def post(url: str, body: dict[str, Any], on_line: Callable[[bytes], None] | None = None
               ) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        if on_line is None:
            return r.status, await r.read()
        raw = b""
        async for line in r.content:  # a broken chunked encoding raises here
            on_line(line)
            raw += line
        return r.status, raw


# --- nested 1,100 levels: both as structured arguments and inside a Hermes <tool_call> ---------

@pytest.mark.parametrize("source", ["structured", "hermes"])
async def test_deep_arguments_end_the_stream_with_invalid_tool_call(
        hostile: Callable[..., Any], source: str) -> None:
    up, url = await hostile()
    hermes = '<tool_call>{"name": "write", "arguments": ' + DEEP_ARGS + "}</tool_call>"
    up.replies.append(Reply(call_deltas(DEEP_ARGS) if source == "structured"
                            else content_deltas(hermes)))
    status, raw = await post(url, {"messages": MSG, "tools": [TOOL], "stream": True})
    assert status == 200
    err = stream_error(raw)
    assert err["code"] == "invalid_tool_call"
    assert err["message"] == ("tool call 'write': arguments nest deeper than the limit of 64 "
                              "levels (max_argument_depth)")
    assert b'"tool_calls"' not in raw  # the call never reached the client


async def test_deep_arguments_after_keepalives_keep_the_chunked_stream_whole(
        hostile: Callable[..., Any]) -> None:
    """The probe's case: keep-alives already sent, so only an in-stream error can be given."""
    up, url = await hostile(keepalive_interval=0.01)
    first_keepalive = asyncio.Event()
    up.replies.append(Reply(call_deltas(DEEP_ARGS), hold=first_keepalive))

    def seen(line: bytes) -> None:
        if line.startswith(b": keep-alive"):
            first_keepalive.set()

    status, raw = await post(url, {"messages": MSG, "tools": [TOOL], "stream": True}, seen)
    assert status == 200 and raw.startswith(b": keep-alive")
    assert stream_error(raw)["code"] == "invalid_tool_call"


async def test_deep_arguments_in_a_whole_response_are_a_502(hostile: Callable[..., Any]) -> None:
    up, url = await hostile()
    up.replies.append(Reply(whole={
        "id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "write", "arguments": DEEP_ARGS}}]}}]}))
    status, raw = await post(url, {"messages": MSG, "tools": [TOOL]})
    assert status == 502
    err = orjson.loads(raw)["error"]
    assert err["code"] == "invalid_tool_call"
    assert "max_argument_depth" in err["message"]


async def test_depth_limit_is_configurable(hostile: Callable[..., Any]) -> None:
    up, url = await hostile(max_argument_depth=3)
    up.replies.append(Reply(call_deltas('{"a": [[1]]}')))  # 3 levels: allowed
    up.replies.append(Reply(call_deltas('{"a": [[[1]]]}')))  # 4 levels: refused
    status, raw = await post(url, {"messages": MSG, "tools": [TOOL], "stream": True})
    assert status == 200 and b'"arguments":"{\\"a\\": [[1]]}"' in raw and b"error" not in raw
    status, raw = await post(url, {"messages": MSG, "tools": [TOOL], "stream": True})
    err = stream_error(raw)
    assert err["code"] == "invalid_tool_call"
    assert "limit of 3 levels (max_argument_depth)" in err["message"]


# --- arguments without end ------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["buffered", "incremental"])
async def test_argument_cap_stops_a_structured_call_mid_stream(
        hostile: Callable[..., Any], mode: str) -> None:
    up, url = await hostile(max_argument_chars=10_000, tool_mode=mode)
    up.replies.append(Reply(call_deltas('{"a": "')[:-1], forever=chunk({"tool_calls": [
        {"index": 0, "function": {"arguments": "x" * 1000}}]})))
    status, raw = await post(url, {"messages": MSG, "tools": [TOOL], "stream": True})
    assert status == 200
    err = stream_error(raw)
    assert err["code"] == "invalid_tool_call"
    assert err["message"] == ("tool call 'write': arguments are longer than the limit of "
                              "10000 characters (max_argument_chars)")
    await up.cut_off.wait()  # the upstream response was let go, not read to its end
    assert not up.finished.is_set()


async def test_argument_cap_stops_a_call_held_inside_markers(
        hostile: Callable[..., Any]) -> None:
    """A format whose calls are emitted whole keeps their text in the parser: bounded too."""
    up, url = await hostile(max_argument_chars=10_000, tool_format="granite")
    opening = '<|tool_call|>[{"name": "write", "arguments": {"a": "'
    up.replies.append(Reply(content_deltas(opening)[:-1],
                            forever=chunk({"content": "x" * 1000})))
    status, raw = await post(url, {"messages": MSG, "tools": [TOOL], "stream": True})
    assert status == 200
    err = stream_error(raw)
    assert err["code"] == "invalid_tool_call"
    assert "limit of 10000 characters of arguments (max_argument_chars)" in err["message"]
    await up.cut_off.wait()


async def test_calls_under_the_cap_pass_whole(hostile: Callable[..., Any]) -> None:
    up, url = await hostile(max_argument_chars=10_000)
    args = '{"a": "' + "y" * 9_000 + '"}'
    up.replies.append(Reply(call_deltas(args, piece=7)))
    status, raw = await post(url, {"messages": MSG, "tools": [TOOL], "stream": True})
    assert status == 200 and b"error" not in raw
    got = "".join(tc["function"]["arguments"]
                  for ev in raw.split(b"\n") if ev.startswith(b"data: {")
                  for ch in orjson.loads(ev[6:])["choices"]
                  for tc in ch["delta"].get("tool_calls") or ())
    assert got == args


# --- the same bounds in the sans-I/O pieces ---------------------------------------------------

def test_repair_refuses_deep_text_without_recursion() -> None:
    for text in (DEEP_ARGS, '{"a": ' + "[" * 1100, "{" * 5000, '{"a": ' + DEEP + ", }"):
        result = repair_arguments(text)
        assert not result.ok
        assert result.error == "arguments nest deeper than the limit of 64 levels " \
                               "(max_argument_depth)"


def test_repair_leaves_long_malformed_text_alone() -> None:
    small = "{'a': 1,}"
    assert repair_arguments(small).ok
    big = "{'a': '" + "z" * REPAIR_MAX_CHARS + "'}"
    result = repair_arguments(big)
    assert not result.ok
    assert result.error is not None and f"repairs stop at {REPAIR_MAX_CHARS}" in result.error


def test_validation_refuses_deep_arguments() -> None:
    toolset = compile_tools([TOOL], cache=None)
    verdict = validate_call("write", DEEP_ARGS, toolset)
    assert not verdict.ok
    assert verdict.error is not None and verdict.error.keyword == "depth"
    # a JSON string holding deep JSON is not offered as a coercion
    verdict = validate_call("write", json.dumps({"a": DEEP_ARGS}), compile_tools([{
        "type": "function", "function": {"name": "write", "parameters": {
            "type": "object", "properties": {"a": {"type": "object"}}}}}], cache=None),
        coerce=True)
    assert not verdict.ok and verdict.repairs == ()


EXPONENTIAL = {"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}}, "$defs": {"n": {
    "anyOf": [{"type": "array", "items": {"$ref": "#/$defs/n"}},
              {"type": "array", "items": {"$ref": "#/$defs/n"}}, {"type": "integer"}]}}}


def test_python_validation_is_bounded_by_a_budget() -> None:
    """Two recursive ``anyOf`` branches make Python validation exponential in the depth of the
    arguments; the budget stops it, and the call is refused, saying why."""
    toolset = compile_tools([{"type": "function", "function": {
        "name": "nest", "parameters": EXPONENTIAL}}], cache=None)
    inner: Any = "x"
    for _ in range(40):
        inner = [inner]
    with validation_budget(1000), pytest.raises(BudgetExceeded):
        list(toolset.tools["nest"].validator.iter_errors({"a": inner}))
    verdict = validate_call("nest", json.dumps({"a": inner}), toolset, coerce=True)
    assert not verdict.ok
    assert verdict.errors == (Issue("", "budget", "the arguments are too large or too complex "
                                    "to check against the tool's schema within 2000 steps"),)


def test_structured_call_repeating_its_name_is_split_only_between_whole_calls() -> None:
    """Some servers repeat the name on every fragment and send no id: a second call starts only
    when both the text so far and the new fragment are whole JSON, checked without re-parsing
    the accumulated text on every fragment."""
    m = ChatMender("hermes", [TOOL])
    out: list[dict[str, Any]] = []
    for frag in ['{"a": ', "1", ", ", '"b": 2', "}", '{"a": 3}']:
        out += m.feed({"choices": [{"index": 0, "delta": {"tool_calls": [{
            "index": 0, "function": {"name": "write", "arguments": frag}}]}}]})[0]
    out += m.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})[0]
    args = [tc["function"]["arguments"] for c in out for tc in c["choices"][0]["delta"].get(
        "tool_calls") or () if tc["function"].get("arguments")]
    assert args == ['{"a": 1, "b": 2}', '{"a": 3}']


def test_mender_cap_counts_every_fragment() -> None:
    m = ChatMender("hermes", [TOOL], max_argument_chars=100)
    m.feed({"choices": [{"index": 0, "delta": {"tool_calls": [{
        "index": 0, "id": "c", "function": {"name": "write", "arguments": "x" * 100}}]}}]})
    with pytest.raises(StreamError, match="max_argument_chars"):
        m.feed({"choices": [{"index": 0, "delta": {"tool_calls": [{
            "index": 0, "function": {"arguments": "x"}}]}}]})


# --- property tests: anything in, no crash; split anywhere, same result ------------------------

def _depth_reference(text: str) -> int:
    """Bracket depth outside JSON strings, one character at a time."""
    depth = best = 0
    in_string = escape = False
    for c in text:
        if in_string:
            if escape:
                escape = False
            elif c == "\\":
                escape = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            best = max(best, depth)
        elif c in "]}":
            depth -= 1
    return best


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='[]{}"\\ ab,:', max_size=200), st.integers(0, 12))
def test_too_deep_agrees_with_a_character_scan(text: str, limit: int) -> None:
    assert too_deep(text, limit) == (_depth_reference(text) > limit)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.lists(st.integers(0, 300), max_size=12))
def test_argument_text_is_the_same_however_it_is_split(text: str, cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    buf, sent = ArgumentText(), []
    for piece in pieces:
        buf.add(piece)
        sent.append(buf.tail(sum(map(len, sent))))  # what incremental mode streams on
    assert "".join(sent) == text == buf.text()
    assert buf.size == len(text)
    assert buf.whole_json() == (_is_json_container(text))


def _is_json_container(text: str) -> bool:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    # the scanner delimits objects, arrays and strings (a bare number never "ends")
    return isinstance(value, dict | list | str) and text.strip()[:1] in '[{"'


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_repair_and_validation_never_raise(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    toolset = compile_tools([TOOL], cache=None)
    for t in (text, "{" * 70 + text, '{"a": ' + "[" * 70 + text):
        repair_arguments(t)
        repair_arguments(t, truncated=True)
        validate_call("write", t, toolset, coerce=True)


def test_ollama_argument_objects_of_any_depth_become_text_then_a_refusal() -> None:
    """Ollama sends arguments as an object; orjson cannot encode one past 255 levels, which
    used to end the stream with an exception. Now the text is exact, and refused by depth."""
    deep: Any = 1
    for _ in range(600):
        deep = [deep]
    line = json.dumps({"model": "m", "message": {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "write", "arguments": {"a": deep}}}]}, "done": False})
    out = NDJSONToSSE("c", 1, "m").feed(line.encode() + b"\n")
    chunks = [orjson.loads(ln[6:]) for ln in out.split(b"\n") if ln.startswith(b"data: {")]
    [call] = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls") or ()]
    assert call["function"]["arguments"] == json.dumps({"a": deep}, separators=(",", ":"))
    m = ChatMender("hermes", [TOOL])
    m.feed(chunks[-1])
    with pytest.raises(StreamError, match="max_argument_depth"):
        m.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
