"""Tracing, metrics and sessions, checked from what actually leaves toolmend.

A real OTLP/HTTP receiver (aiohttp, decoding ``ExportTraceServiceRequest``) takes the spans;
the agent is the openai SDK running a tool loop through toolmend against the simulated backend.
Everything asserted about traces is read from the bytes that arrived over the wire.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from toolmend.server.app import build_app, start_server
from toolmend.server.config import Settings
from toolmend.sim.server import SimBackend
from toolmend.telemetry import names as names
from toolmend.telemetry.model_server import PASSED_ON
from toolmend.telemetry.tracing import (
    TELEMETRY,
    conversation_fingerprint,
    epoch_us_to_ns,
    format_traceparent,
    loop_step,
    parse_traceparent,
    tool_results,
)

SIM_TTFT = 0.1
TOOL_TIME = 0.2
SECRETS = ("SYSTEM-SECRET-7f3a", "USER-SECRET-91bc", "ARG-SECRET-55de", "RESULT-SECRET-c0ff",
           "REPLY-SECRET-a1a1")
TOOLS = [{"type": "function", "function": {
    "name": "read_file", "description": "read a file",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                   "required": ["path"]}}}]


# --- an OTLP/HTTP receiver ----------------------------------------------------------------------
@dataclass
class Receiver:
    url: str = ""
    raw: list[bytes] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    hits: int = 0
    stall: asyncio.Event | None = None  # when set up, requests wait for it (a hung collector)

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        body = await request.read()
        if self.stall is not None:
            await self.stall.wait()
        self.raw.append(body)
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(body)
        for rs in msg.resource_spans:
            for ss in rs.scope_spans:
                self.spans.extend(ss.spans)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")


class RecordingSim(SimBackend):
    """The simulator, also remembering the ``traceparent`` each upstream request carried."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.traceparents: list[str | None] = []

    def app(self) -> web.Application:
        app = super().app()

        @web.middleware
        async def remember(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.method == "POST":
                self.traceparents.append(request.headers.get("traceparent"))
            return await handler(request)

        app.middlewares.append(remember)
        return app


@dataclass
class TStack:
    sim: RecordingSim
    url: str
    app: web.Application

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    def client(self, **headers: str) -> openai.AsyncOpenAI:
        c = openai.AsyncOpenAI(base_url=self.v1, api_key="sk-never-recorded", max_retries=0,
                               timeout=20, default_headers=headers or None)
        self.clients.append(c)
        return c

    async def flush(self, *, end_sessions: bool = True) -> None:
        """Export everything now; with ``end_sessions``, the open session spans too (they would
        otherwise wait for the session to go idle)."""
        if end_sessions:
            self.app[TELEMETRY].end_sessions()
        assert await self.app[TELEMETRY].flush(5.0)


Factory = Callable[..., Any]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    yield rec
    if rec.stall is not None:
        rec.stall.set()
    await runner.cleanup()


@pytest.fixture
async def make_tstack(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Factory]:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # export promptly, the test waits less
    cleanups: list[Any] = []

    async def factory(**settings: Any) -> TStack:
        sim = RecordingSim("vllm", ttft=SIM_TTFT)
        await sim.start()
        cleanups.append(sim.stop)
        app = build_app(Settings(**{"log_requests": False, **settings}), [sim.url])
        runner, port = await start_server(app, "127.0.0.1", 0)
        cleanups.append(runner.cleanup)
        stack = TStack(sim, f"http://127.0.0.1:{port}", app)
        cleanups.append(lambda: asyncio.gather(*(c.close() for c in stack.clients)))
        return stack

    yield factory
    for fn in reversed(cleanups):
        await fn()


def attrs(span: Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        v = kv.value
        kind = v.WhichOneof("value")
        if kind == "array_value":
            out[kv.key] = [getattr(x, x.WhichOneof("value")) for x in v.array_value.values]
        else:
            out[kv.key] = getattr(v, kind)
    return out


async def agent_loop(stack: TStack, tag: str, ids: list[str] | None = None,
                     **headers: str) -> list[tuple[float, float]]:
    """Three steps: tool call, tool call, answer; TOOL_TIME of "tool work" between steps.

    Returns when each step was sent and when its reply had been read (``time.monotonic``,
    toolmend's clock too): toolmend's measures of the loop must fall between them. The ids of
    the tool calls it ran are appended to ``ids``."""
    c = stack.client(**headers)
    ids = [] if ids is None else ids
    msgs: list[dict[str, Any]] = [
        {"role": "system", "content": f"{SECRETS[0]} {tag}"},
        {"role": "user", "content": f"{SECRETS[1]} {tag}"}]
    marks: list[tuple[float, float]] = []
    for step in range(3):
        sent = time.monotonic()
        stream = await c.chat.completions.create(model="sim-model", messages=msgs, tools=TOOLS,
                                                 stream=True)
        calls: dict[int, dict[str, Any]] = {}
        async for ch in stream:
            for d in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
                slot = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = d.id or slot["id"]
                if d.function is not None:
                    slot["name"] += d.function.name or ""
                    slot["arguments"] += d.function.arguments or ""
        marks.append((sent, time.monotonic()))
        if step == 2:
            assert not calls
            return marks
        assert calls, f"step {step + 1} should have called a tool"
        call = calls[0]
        ids.append(call["id"])
        msgs.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function",
             "function": {"name": call["name"], "arguments": call["arguments"]}}]})
        await asyncio.sleep(TOOL_TIME)  # the agent runs its tool
        msgs.append({"role": "tool", "tool_call_id": call["id"],
                     "content": f"{SECRETS[3]} {tag}"})
    raise AssertionError("unreachable")


def most_tool_time(marks: list[tuple[float, float]], step: int) -> float:
    """The most toolmend can measure as the agent's tool time before ``step`` (0-based), in
    ms: from the sending of the step before (its end came later) to the reading of this
    step's reply (its start came earlier); 1 ms for the float conversions on the way."""
    return (marks[step][1] - marks[step - 1][0]) * 1000 + 1


def script_loop(sim: SimBackend) -> None:
    tool = {"tool_calls": [{"name": "read_file", "arguments": {"path": SECRETS[2]}}]}
    sim.push(tool, tool, {"content": f"{SECRETS[4]} all done"})


# --- pure helpers ---------------------------------------------------------------------------------
def test_helpers() -> None:
    tp = format_traceparent(0xABC, 0x12, True)
    assert tp == "00-00000000000000000000000000000abc-0000000000000012-01"
    assert parse_traceparent(tp) == (0xABC, 0x12, True)
    assert parse_traceparent("00-" + "0" * 32 + "-0000000000000012-01") is None
    assert parse_traceparent("garbage") is None
    body = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                         {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]}
    assert loop_step(body) == 2
    assert loop_step({"prompt": "x"}) == 1
    fp = conversation_fingerprint("agent", body)
    grown = {"messages": [*body["messages"], {"role": "assistant", "content": "b"}]}
    assert conversation_fingerprint("agent", grown) == fp  # later steps: same session
    assert conversation_fingerprint("other", body) != fp
    assert re.fullmatch(r"fp-[0-9a-f]{24}", fp)  # only a hash leaves


def test_tool_results_are_read_from_the_end_of_the_conversation() -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "read_file"}},
             {"id": "call_2", "type": "function", "function": {"name": "grep"}}]
    body = {"messages": [
        {"role": "user", "content": "fix it"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "..."},
        {"role": "tool", "tool_call_id": "call_2", "content": "..."},
        {"role": "user", "content": "and hurry"}]}
    assert tool_results(body) == [("call_1", "read_file"), ("call_2", "grep")]
    # a result with no call to match keeps the name it gives itself, or is left out
    body["messages"][3] = {"role": "tool", "tool_call_id": "call_9", "name": "ls"}
    assert tool_results(body) == [("call_1", "read_file"), ("call_9", "ls")]
    body["messages"][3] = {"role": "tool", "content": "no id, no name"}
    assert tool_results(body) == [("call_1", "read_file")]
    assert tool_results({"messages": [{"role": "user", "content": "hi"}]}) == []
    assert tool_results({"messages": [{"role": "tool", "tool_call_id": "x"}]}) == []
    assert tool_results({"prompt": "x"}) == [] and tool_results(None) == []


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.sampled_from(["role", "tool_calls", "tool_call_id",
                                                        "function", "name", "id", "content"]),
                                       inner, max_size=4), max_leaves=20)
_message = st.dictionaries(st.sampled_from(["role", "tool_calls", "tool_call_id", "name"]),
                           st.sampled_from(["tool", "assistant", "user"]) | _json, max_size=4)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.just("messages"), st.lists(_message | _json, max_size=6)) | _json)
def test_tool_results_never_fail_on_any_body(body: Any) -> None:
    got = tool_results(body if isinstance(body, dict) else {"messages": body})
    assert all(isinstance(name, str) and name for _, name in got)


# --- traces -------------------------------------------------------------------------------
async def test_agent_loop_traces(make_tstack: Factory, receiver: Receiver) -> None:
    stack = await make_tstack(otlp_endpoint=receiver.url)
    # Two agent sessions: one identified by fingerprint, one by X-Session-Id. (One after the
    # other: the sim serves its script in arrival order.)
    script_loop(stack.sim)
    call_ids: list[str] = []
    marks = {"agent-a": await agent_loop(stack, "A", call_ids, **{"X-Agent-Id": "agent-a"})}
    script_loop(stack.sim)
    marks["agent-b"] = await agent_loop(stack, "B", call_ids, **{"X-Agent-Id": "agent-b",
                                                                 "X-Session-Id": "sess-B"})
    await stack.flush()

    servers = [s for s in receiver.spans if s.kind == Span.SPAN_KIND_SERVER]
    clients = [s for s in receiver.spans if s.kind == Span.SPAN_KIND_CLIENT]
    internal = [s for s in receiver.spans if s.kind == Span.SPAN_KIND_INTERNAL]
    roots = [s for s in internal if s.name.startswith("invoke_agent ")]
    tools = [s for s in internal if s.name.startswith("execute_tool ")]
    assert len(servers) == 6 and len(clients) == 6 and len(roots) == 2 and len(tools) == 4
    assert len(internal) == 6
    by_trace: dict[bytes, list[Span]] = defaultdict(list)
    for s in servers:
        by_trace[s.trace_id].append(s)
    assert len(by_trace) == 2, "one trace per session"
    assert {r.trace_id for r in roots} == set(by_trace)
    sessions = set()
    for trace_id, spans in by_trace.items():
        # the session is the trace's one root span; its steps are its children, in order
        (root,) = [r for r in roots if r.trace_id == trace_id]
        assert not root.parent_span_id
        ra = attrs(root)
        assert ra[names.GEN_AI_OPERATION_NAME] == "invoke_agent"
        assert root.name == f"invoke_agent {ra[names.GEN_AI_AGENT_NAME]}"
        assert ra[names.GEN_AI_AGENT_NAME] in ("agent-a", "agent-b")
        assert ra[names.TM_SESSION_STEPS] == 3
        assert (ra[names.TM_SESSION_FIRST_STEP], ra[names.TM_SESSION_LAST_STEP]) == (1, 3)
        assert all(s.parent_span_id == root.span_id for s in spans)
        assert root.start_time_unix_nano == min(s.start_time_unix_nano for s in spans)
        assert root.end_time_unix_nano == max(s.end_time_unix_nano for s in spans)
        assert ra[names.GEN_AI_CONVERSATION_ID] == attrs(spans[0])[names.GEN_AI_CONVERSATION_ID]
        a = [attrs(s) for s in sorted(spans, key=lambda s: s.start_time_unix_nano)]
        assert [x[names.TM_STEP] for x in a] == [1, 2, 3]
        assert len({x[names.GEN_AI_CONVERSATION_ID] for x in a}) == 1
        sessions.add(a[0][names.GEN_AI_CONVERSATION_ID])
        for i, x in enumerate(a):
            assert x[names.GEN_AI_OPERATION_NAME] == "chat"
            assert x[names.GEN_AI_REQUEST_MODEL] == "sim-model"
            assert x[names.GEN_AI_REQUEST_STREAM] is True
            assert x[names.TM_FRONT] == "openai_chat"
            assert x[names.TM_TTFT_MS] >= SIM_TTFT * 1000
            # the convention's seconds beside toolmend's milliseconds
            assert x[names.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] >= SIM_TTFT
            assert x[names.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] == pytest.approx(
                x[names.TM_TTFT_MS] / 1000, abs=1e-6)
            assert x[names.TM_UPSTREAM_TTFT_MS] >= SIM_TTFT * 1000
            assert x[names.GEN_AI_USAGE_OUTPUT_TOKENS] > 0
            if i == 0:
                assert names.TM_AGENT_TOOL_TIME_MS not in x
            else:
                assert TOOL_TIME * 1000 * 0.9 <= x[names.TM_AGENT_TOOL_TIME_MS] \
                    <= most_tool_time(marks[ra[names.GEN_AI_AGENT_ID]], i)
        for s in spans:
            assert s.name == "chat sim-model"
            assert s.end_time_unix_nano - s.start_time_unix_nano >= SIM_TTFT * 1e9
            assert {e.name for e in s.events} >= {"queued", "dispatched", "first_token"}
    assert "sess-B" in sessions
    assert any(sid.startswith("fp-") for sid in sessions)

    # the agent's tool time: an execute_tool span under the session for each call, from the
    # end of the step that asked for it to the start of the step that brought its result
    for t in tools:
        ta = attrs(t)
        (root,) = [r for r in roots if r.trace_id == t.trace_id]
        assert t.parent_span_id == root.span_id and t.name == "execute_tool read_file"
        assert ta[names.GEN_AI_OPERATION_NAME] == "execute_tool"
        assert ta[names.GEN_AI_TOOL_NAME] == "read_file"
        assert ta[names.GEN_AI_TOOL_TYPE] == "function"
        assert ta[names.GEN_AI_CONVERSATION_ID] == attrs(root)[names.GEN_AI_CONVERSATION_ID]
        steps = sorted((s for s in servers if s.trace_id == t.trace_id),
                       key=lambda s: s.start_time_unix_nano)
        before = [s for s in steps if s.end_time_unix_nano <= t.start_time_unix_nano + 1000]
        after = [s for s in steps if s.start_time_unix_nano >= t.end_time_unix_nano - 1000]
        assert abs(before[-1].end_time_unix_nano - t.start_time_unix_nano) <= 1000
        assert abs(after[0].start_time_unix_nano - t.end_time_unix_nano) <= 1000
        assert t.end_time_unix_nano - t.start_time_unix_nano >= TOOL_TIME * 1e9
        assert root.start_time_unix_nano <= t.start_time_unix_nano
        assert t.end_time_unix_nano <= root.end_time_unix_nano
    assert sorted(attrs(t)[names.GEN_AI_TOOL_CALL_ID] for t in tools) == sorted(call_ids)
    assert len(set(call_ids)) == 4
    # the session id is on every span of the session's trace
    for sp in receiver.spans:
        assert attrs(sp)[names.GEN_AI_CONVERSATION_ID] in sessions

    # every server span has exactly one CLIENT child in the same trace ...
    for s in servers:
        kids = [c for c in clients if c.parent_span_id == s.span_id]
        assert len(kids) == 1 and kids[0].trace_id == s.trace_id
        assert s.start_time_unix_nano <= kids[0].start_time_unix_nano
        ka = attrs(kids[0])
        assert ka[names.GEN_AI_REQUEST_STREAM] is True
        assert ka[names.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] >= SIM_TTFT
        assert ka[names.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] == pytest.approx(
            ka[names.TM_UPSTREAM_TTFT_MS] / 1000, abs=1e-6)
    # ... and the upstream request carried that client span as its traceparent
    sent = set(stack.sim.traceparents)
    for c in clients:
        assert f"00-{c.trace_id.hex()}-{c.span_id.hex()}-01" in sent

    wire = b"".join(receiver.raw)
    for secret in (*SECRETS, "sk-never-recorded"):
        assert secret.encode() not in wire, f"{secret} leaked into the exported spans"


async def test_incoming_traceparent_is_honoured(make_tstack: Factory, receiver: Receiver) -> None:
    stack = await make_tstack(otlp_endpoint=receiver.url)
    trace_id, parent = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    stack.sim.push({"content": "hi"})
    await stack.client(traceparent=format_traceparent(trace_id, parent, True)) \
        .chat.completions.create(model="sim-model", messages=[{"role": "user", "content": "x"}])
    await stack.flush()
    server = next(s for s in receiver.spans if s.kind == Span.SPAN_KIND_SERVER)
    assert int.from_bytes(server.trace_id, "big") == trace_id
    assert int.from_bytes(server.parent_span_id, "big") == parent
    assert attrs(server)[names.GEN_AI_CONVERSATION_ID] == f"{trace_id:032x}"
    assert attrs(server)[names.GEN_AI_REQUEST_STREAM] is False
    upstream = parse_traceparent(stack.sim.traceparents[-1])
    assert upstream is not None and upstream[0] == trace_id
    # the agent framework's span is the session: toolmend adds no session span of its own
    assert not [s for s in receiver.spans if s.kind == Span.SPAN_KIND_INTERNAL]


# --- session spans ----------------------------------------------------------------------------
async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition (an exporter thread or a timer makes it true)."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def session_spans(receiver: Receiver) -> list[Span]:
    return sorted((s for s in receiver.spans if s.kind == Span.SPAN_KIND_INTERNAL
                   and s.name.startswith("invoke_agent ")), key=lambda s: s.start_time_unix_nano)


def step_spans(receiver: Receiver) -> list[Span]:
    return sorted((s for s in receiver.spans if s.kind == Span.SPAN_KIND_SERVER),
                  key=lambda s: s.start_time_unix_nano)


async def one_step(stack: TStack, session: str, text: str = "hi") -> None:
    await stack.client(**{"X-Session-Id": session}).chat.completions.create(
        model="sim-model", messages=[{"role": "user", "content": text}])


async def test_idle_session_span_is_exported_and_a_later_step_opens_another(
        make_tstack: Factory, receiver: Receiver) -> None:
    stack = await make_tstack(otlp_endpoint=receiver.url, trace_session_idle=0.2)
    stack.sim.push({"content": "one"}, {"content": "two"})
    await one_step(stack, "sess-idle")
    # nobody ends the session: it goes idle and its span is exported by itself
    await until(lambda: len(session_spans(receiver)) == 1)
    (first,) = session_spans(receiver)
    assert attrs(first)[names.TM_SESSION_STEPS] == 1
    assert attrs(first)[names.GEN_AI_CONVERSATION_ID] == "sess-idle"
    await one_step(stack, "sess-idle")
    await until(lambda: len(session_spans(receiver)) == 2)
    first, second = session_spans(receiver)
    assert second.trace_id == first.trace_id  # still one trace per session
    assert second.span_id != first.span_id
    assert first.end_time_unix_nano <= second.start_time_unix_nano
    await until(lambda: len(step_spans(receiver)) == 2)
    s1, s2 = step_spans(receiver)
    assert (s1.parent_span_id, s2.parent_span_id) == (first.span_id, second.span_id)


async def test_a_step_in_flight_keeps_its_session_open(make_tstack: Factory,
                                                       receiver: Receiver) -> None:
    """Step A ends and the idle time passes while step B of the same session still runs:
    the session is not idle, so both steps end up under one session span."""
    stack = await make_tstack(otlp_endpoint=receiver.url, trace_session_idle=0.2)
    stack.sim.push({"content": "a", "ttft": 0.5}, {"content": "b", "ttft": 1.0})
    a = asyncio.ensure_future(one_step(stack, "sess-busy", "a"))
    await until(lambda: stack.sim.stats.in_flight == 1)
    b = asyncio.ensure_future(one_step(stack, "sess-busy", "b"))
    await until(lambda: stack.sim.stats.in_flight == 2)
    await asyncio.gather(a, b)
    await until(lambda: len(session_spans(receiver)) == 1)
    await stack.flush(end_sessions=False)
    (root,) = session_spans(receiver)
    steps = step_spans(receiver)
    assert attrs(root)[names.TM_SESSION_STEPS] == 2
    assert [s.parent_span_id for s in steps] == [root.span_id, root.span_id]
    assert root.end_time_unix_nano == max(s.end_time_unix_nano for s in steps)


async def test_open_session_spans_are_bounded(make_tstack: Factory, receiver: Receiver) -> None:
    """More open sessions than sessions_max: the least recently active one is ended (and
    exported) to make room, long before it would go idle."""
    stack = await make_tstack(otlp_endpoint=receiver.url, sessions_max=2,
                              trace_session_idle=3600)
    for sid in ("sess-1", "sess-2", "sess-3"):
        stack.sim.push({"content": sid})
        await one_step(stack, sid)
    await until(lambda: len(session_spans(receiver)) == 1)
    assert attrs(session_spans(receiver)[0])[names.GEN_AI_CONVERSATION_ID] == "sess-1"
    await stack.flush()
    assert sorted(attrs(s)[names.GEN_AI_CONVERSATION_ID] for s in session_spans(receiver)) \
        == ["sess-1", "sess-2", "sess-3"]


WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"], "additionalProperties": False}}}]


async def test_repair_and_retry_are_span_events(make_tstack: Factory, receiver: Receiver) -> None:
    stack = await make_tstack(otlp_endpoint=receiver.url)
    # step 1: "days" as a string, repaired in place; step 2: "city" missing, retried
    stack.sim.push(
        {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo", "days": "3"}}]},
        {"tool_calls": [{"name": "get_weather", "arguments": {"days": 3}}]},
        {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}]})
    c = stack.client(**{"X-Session-Id": "sess-events"})
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "weather?"}]
    for _ in range(2):
        r = await c.chat.completions.create(model="sim-model", messages=msgs, tools=WEATHER)
        call = r.choices[0].message.tool_calls[0]
        assert orjson.loads(call.function.arguments) == {"city": "Oslo", "days": 3}
        msgs += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    await stack.flush()
    s1, s2 = step_spans(receiver)

    def events(span: Span) -> list[tuple[str, dict[str, Any]]]:
        return [(e.name, {kv.key: getattr(kv.value, kv.value.WhichOneof("value"))
                          for kv in e.attributes}) for e in span.events]

    assert events(s1) == [("queued", {}), ("dispatched", {}), ("first_token", {}),
                          ("repaired", {"toolmend.repair.kind": "coerce_string_to_integer"})]
    assert attrs(s1)[names.TM_VALIDATION] == "repaired"
    why = {"gen_ai.tool.name": "get_weather", "toolmend.validation.decision": "retry"}
    assert events(s2) == [("queued", {}), ("dispatched", {}), ("first_token", {}),
                          ("validation_failed", why),
                          ("retried", why | {"toolmend.retry.attempt": 1})]
    assert attrs(s2)[names.TM_VALIDATION] == "retried"
    assert attrs(s2)[names.TM_RETRIES] == 1
    (root,) = session_spans(receiver)
    assert attrs(root)[names.TM_REPAIRS] == 1 and attrs(root)[names.TM_RETRIES] == 1


async def test_content_only_with_opt_in(make_tstack: Factory, receiver: Receiver) -> None:
    stack = await make_tstack(otlp_endpoint=receiver.url, trace_content=True)
    stack.sim.push({"content": "hi"})
    await stack.client().chat.completions.create(
        model="sim-model", messages=[{"role": "user", "content": SECRETS[1]}])
    await stack.flush()
    server = next(s for s in receiver.spans if s.kind == Span.SPAN_KIND_SERVER)
    assert SECRETS[1] in attrs(server)[names.GEN_AI_INPUT_MESSAGES]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def served(stack: TStack, count: int) -> None:
    """``count`` streaming requests, one after another, each read to its end."""
    c = stack.client()
    for _ in range(count):
        stream = await c.chat.completions.create(
            model="sim-model", stream=True, messages=[{"role": "user", "content": "hello"}])
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream
                        if ch.choices])
        assert text


async def test_requests_are_served_while_the_collector_is_down(make_tstack: Factory) -> None:
    """Every export fails (nothing listens) and the requests go on; what that costs in time
    is measured by bench/tracing.py ("down" against "off")."""
    stack = await make_tstack(otlp_endpoint=f"http://127.0.0.1:{closed_port()}",
                              otlp_timeout=1.0)
    exporter = stack.app[TELEMETRY].exporter
    await served(stack, 5)
    await until(lambda: exporter.dropped > 0)  # the exporter has failed at least once
    await served(stack, 3)
    await until(lambda: exporter.dropped >= 8)  # every request's span was given up, counted
    assert exporter.exported == 0
    # cleanup gives up on the exporter's retries rather than waiting them out (the bound on
    # the wait is the hang guard, not a measure)
    await asyncio.wait_for(stack.app[TELEMETRY].shutdown(timeout=2.0), 30)


async def test_requests_do_not_wait_for_a_stalled_collector(make_tstack: Factory,
                                                            receiver: Receiver) -> None:
    receiver.stall = asyncio.Event()  # never set during the test: the export hangs
    stack = await make_tstack(otlp_endpoint=receiver.url, otlp_timeout=60.0)
    exporter = stack.app[TELEMETRY].exporter
    await served(stack, 1)
    await until(lambda: receiver.hits == 1)  # the exporter thread is stuck in that request
    await served(stack, 5)
    # served while the first export still hangs: none of them waited for it
    assert receiver.hits == 1 and exporter.exported == 0 and exporter.dropped == 0
    # cleanup gives up on the hung export (it cannot end before the stall is lifted)
    await asyncio.wait_for(stack.app[TELEMETRY].shutdown(timeout=1.0), 30)
    assert not receiver.stall.is_set() and exporter.exported == 0


# --- metrics and sessions ---------------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


async def scrape(stack: TStack) -> dict[str, list[tuple[dict[str, str], float]]]:
    async with aiohttp.ClientSession() as s, s.get(stack.url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        m = _SAMPLE.match(line)
        assert m, line
        out[m.group(1)].append((dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(v for _, v in samples.get(name, []))


async def test_metrics(make_tstack: Factory) -> None:
    stack = await make_tstack()
    before = await scrape(stack)
    count = "gen_ai_server_time_to_first_token_seconds_count"
    await served(stack, 2)
    await stack.client(**{"X-Session-Id": "sess-metrics"}).chat.completions.create(
        model="sim-model", messages=[{"role": "user", "content": "x"}])
    after = await scrape(stack)
    assert total(after, count) - total(before, count) == 3
    buckets = after["gen_ai_server_time_to_first_token_seconds_bucket"]
    ttft_buckets = {lab["le"] for lab, _ in buckets}
    assert {"0.001", "0.1", "10.0", "+Inf"} <= ttft_buckets
    assert total(after, "gen_ai_server_request_duration_seconds_count") == 3
    assert total(after, "gen_ai_client_token_usage_count") == 6  # input and output
    assert total(after, "toolmend_queue_wait_seconds_count") == 3
    assert "toolmend_requests_in_flight" in after and "toolmend_queue_depth" in after
    # by the API the agent spoke: the OpenAI chat front here
    assert {lab["toolmend_front"] for lab, _ in buckets} == {"openai_chat"}
    allowed = {"gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model",
               "gen_ai_token_type", "error_type", "status", "kind", "code", "toolmend_front",
               "le"}
    for name, samples in after.items():
        if name in PASSED_ON:  # one sample each, labelled as the backend labelled it
            assert len(samples) == 1
            continue
        for labels, _ in samples:
            assert set(labels) <= allowed, labels
            assert not any("sess-" in v or v.startswith(("fp-", "req_")) for v in labels.values())


async def test_time_to_first_token_covers_the_queue_wait(make_tstack: Factory) -> None:
    """On one slot the second of two requests waits for the first: its time to first token,
    as the histogram records it, holds that wait and its own prefill."""
    stack = await make_tstack(slots=1)
    await asyncio.gather(*(served(stack, 1) for _ in range(2)))
    after = await scrape(stack)
    ttft = total(after, "gen_ai_server_time_to_first_token_seconds_sum")
    queued = total(after, "toolmend_queue_wait_seconds_sum")
    assert total(after, "gen_ai_server_time_to_first_token_seconds_count") == 2
    # the second waited for the slot (how long depends on when it arrived, a few ms after the
    # first or more on a loaded machine: no fixed bound), and each request's time to first
    # token holds its own wait and the sim's time to first token
    assert queued > 0
    assert ttft >= queued + 2 * SIM_TTFT


async def test_every_emitted_name_is_listed(make_tstack: Factory, receiver: Receiver) -> None:
    """Spans, attributes, events and metrics that leave toolmend use only the names of
    ``names.EMITTED``, each from the convention version listed there."""
    stack = await make_tstack(otlp_endpoint=receiver.url)
    script_loop(stack.sim)
    await agent_loop(stack, "N", **{"X-Agent-Id": "agent-n", "X-Session-Id": "sess-N"})
    await stack.client().chat.completions.create(  # not streamed
        model="sim-model", messages=[{"role": "user", "content": "x"}])
    await stack.flush()
    emitted = names.EMITTED
    kinds = {"chat", "invoke_agent", "execute_tool", "text_completion"}
    for sp in receiver.spans:
        a = attrs(sp)
        assert set(a) <= set(emitted), set(a) - set(emitted)
        for e in sp.events:
            assert e.name in emitted
            assert {kv.key for kv in e.attributes} <= set(emitted)
        op, _, rest = sp.name.partition(" ")
        assert op in kinds and rest, sp.name
        filled = {"chat": names.GEN_AI_REQUEST_MODEL, "invoke_agent": names.GEN_AI_AGENT_NAME,
                  "execute_tool": names.GEN_AI_TOOL_NAME}[op]
        assert f"{op} {{{filled}}}" in emitted
        if sp.kind != Span.SPAN_KIND_CLIENT or op != "chat":
            assert a[filled] == rest
    for raw in receiver.raw:
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(raw)
        for rs in msg.resource_spans:
            assert {kv.key for kv in rs.resource.attributes} <= set(emitted)
    # a request that was not streamed says so, and has no time to first chunk
    (whole,) = [sp for sp in receiver.spans if sp.kind == Span.SPAN_KIND_SERVER
                and attrs(sp)[names.GEN_AI_REQUEST_STREAM] is False]
    assert names.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK not in attrs(whole)
    # metrics: every family and label is a listed name, as Prometheus spells it
    prom = {names.prometheus_name(k) for k in emitted}
    suffixes = ("_seconds_bucket", "_seconds_count", "_seconds_sum", "_seconds_created",
                "_bucket", "_count", "_sum", "_created", "_total", "_ratio", "_seconds", "")
    for family, samples in (await scrape(stack)).items():
        if family.startswith(("python_", "process_")):
            continue  # prometheus-client's own
        assert any(family.endswith(x) and family[:len(family) - len(x)] in prom
                   for x in suffixes), family
        if family in PASSED_ON:
            continue  # labelled as the backend labelled it
        for labels, _ in samples:
            assert set(labels) - {"le"} <= prom, labels


async def test_sessions_endpoint(make_tstack: Factory, receiver: Receiver) -> None:
    stack = await make_tstack(otlp_endpoint=receiver.url)
    script_loop(stack.sim)
    marks = await agent_loop(stack, "S", **{"X-Session-Id": "sess-S"})
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.url + "/toolmend/v1/sessions") as r:
            listing = await r.json()
        async with s.get(stack.url + "/toolmend/v1/sessions/sess-S") as r:
            detail = await r.json()
        async with s.get(stack.url + "/toolmend/v1/sessions/nope") as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "session_not_found"
    assert [d["id"] for d in listing["data"]] == ["sess-S"]
    assert listing["data"][0]["steps"] == 3
    steps = detail["steps"]
    assert [st["step"] for st in steps] == [1, 2, 3]
    assert all(st["ttft_ms"] >= SIM_TTFT * 1000 for st in steps)
    assert steps[0]["tool_time_ms"] is None
    assert all(TOOL_TIME * 900 <= st["tool_time_ms"] <= most_tool_time(marks, i)
               for i, st in enumerate(steps) if i)
    assert len({st["trace_id"] for st in steps}) == 1 and steps[0]["trace_id"]
    assert detail["trace_ids"] == [steps[0]["trace_id"]]

    # and `toolmend trace` draws it, with the Jaeger link
    import argparse
    import io

    from rich.console import Console

    from toolmend.telemetry.trace_view import add_arguments, run

    p = argparse.ArgumentParser()
    add_arguments(p)
    out = io.StringIO()
    args = p.parse_args(["--url", stack.url, "--jaeger-url", "http://jaeger:16686"])
    rc = await asyncio.to_thread(run, args, Console(file=out, width=160))
    assert rc == 0
    text = out.getvalue()
    assert "sess-S" in text and f"http://jaeger:16686/trace/{steps[0]['trace_id']}" in text


async def test_observability_endpoints_are_loopback_only() -> None:
    from aiohttp.test_utils import make_mocked_request

    from toolmend.server.errors import ProxyError
    from toolmend.telemetry.tracing import Telemetry, metrics_handler

    def request(remote: str, **headers: str) -> web.Request:
        app = web.Application()
        app[TELEMETRY] = Telemetry(Settings(admin_key="k3y"))

        class Transport:
            def get_extra_info(self, name: str, default: Any = None) -> Any:
                return (remote, 1234) if name == "peername" else default

            def is_closing(self) -> bool:
                return False

        return make_mocked_request("GET", "/metrics", headers=headers, app=app,
                                   transport=Transport())

    assert (await metrics_handler(request("127.0.0.1"))).status == 200
    assert (await metrics_handler(request("::1"))).status == 200
    with pytest.raises(ProxyError) as e:
        await metrics_handler(request("10.1.2.3"))
    assert e.value.status == 403
    r = await metrics_handler(request("10.1.2.3", Authorization="Bearer k3y"))
    assert r.status == 200


async def test_grpc_exporter_is_an_option() -> None:
    # the test extra installs the gRPC exporter: without it this fails, it never skips
    import opentelemetry.exporter.otlp.proto.grpc.trace_exporter  # noqa: F401

    from toolmend.telemetry.tracing import Telemetry

    tel = Telemetry(Settings(otlp_endpoint="http://127.0.0.1:4317", otlp_protocol="grpc"))
    try:
        assert tel.tracing and "grpc" in type(tel.exporter.inner).__module__  # type: ignore[union-attr]
    finally:
        await tel.shutdown(timeout=1.0)


def test_a_step_end_kept_to_the_microsecond_converts_exactly() -> None:
    # the value a tool span once started from, a microsecond before the step it follows
    assert epoch_us_to_ns(1796697759.772122) == 1796697759_772122_000
    assert epoch_us_to_ns(1796697759.000001) == 1796697759_000001_000
    assert epoch_us_to_ns(0.0) == 0
