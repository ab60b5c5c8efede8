"""toolmend's traces as a person finds them in a real trace viewer: Arize Phoenix.

A three-step agent session runs through toolmend in front of ``toolmend sim`` (a repaired call,
a validation retry, a wait in the queue behind another agent), toolmend exports its spans over
OTLP/HTTP to a real ``phoenix serve``, and everything below is read back from Phoenix's REST
API, the data its UI shows: the session listed under its id, one trace for it, the steps in
order under the session's span, each timing on the span it belongs to, the repair and the retry
as events, and no message content unless content capture is on.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.real.stacks import Server
from toolmend.server.app import SCHEDULER, build_app, start_server
from toolmend.server.config import Settings

from .agent_session import ANSWER, SECRETS, SimProcess, run_session

pytestmark = pytest.mark.viewer

SIM_TTFT_MS = 50.0  # agent_session.SIM_TTFT, as Phoenix shows it
SPAN_WAIT = 60.0  # seconds for Phoenix to ingest what toolmend exported


@dataclass
class Toolmend:
    url: str
    app: web.Application
    runner: web.AppRunner
    project: str
    stopped: bool = False

    async def stop(self) -> None:
        """Stop toolmend as its process would on exit: open session spans are exported."""
        if not self.stopped:
            self.stopped = True
            await self.runner.cleanup()


@pytest.fixture
async def make_toolmend(phoenix: Server, sim: SimProcess, monkeypatch: pytest.MonkeyPatch
                        ) -> AsyncIterator[Callable[..., Any]]:
    """toolmend in this process, exporting to Phoenix under a project of the test's own."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # export promptly
    started: list[Toolmend] = []

    async def factory(**settings: Any) -> Toolmend:
        project = f"toolmend-{uuid.uuid4().hex[:8]}"
        # Phoenix files spans under the project this resource attribute names
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", f"openinference.project.name={project}")
        s = Settings(**{"log_requests": False, "otlp_endpoint": phoenix.url, "slots": 1,
                        "express_slot": False, **settings})
        app = build_app(s, [sim.url])
        runner, port = await start_server(app, "127.0.0.1", 0)
        started.append(Toolmend(f"http://127.0.0.1:{port}", app, runner, project))
        return started[-1]

    yield factory
    for tm in reversed(started):
        await tm.stop()


# --- Phoenix's REST API ---------------------------------------------------------------------------
def _get(phoenix: Server, path: str, **query: Any) -> Any:
    url = phoenix.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def spans_of(phoenix: Server, project: str, **query: Any) -> list[dict[str, Any]]:
    """Every span of ``project``; none while the project does not exist yet (Phoenix makes it
    with the first span it files there)."""
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        try:
            page = _get(phoenix, f"/v1/projects/{project}/spans", limit=1000,
                        **({"cursor": cursor} if cursor else {}), **query)
        except urllib.error.HTTPError as e:
            if e.code == 404 and not out:
                return out
            raise
        out += page["data"]
        cursor = page.get("next_cursor")
        if not cursor:
            return out


def filtered(phoenix: Server, project: str, expression: str) -> set[str]:
    """The span ids the UI's span filter bar shows for ``expression`` (its GraphQL query)."""
    (pid,) = [p["id"] for p in _get(phoenix, "/v1/projects")["data"] if p["name"] == project]
    query = ("query($id: ID!, $f: String) { node(id: $id) { ... on Project { "
             "spans(first: 1000, filterCondition: $f) { edges { node { spanId } } } } } }")
    req = urllib.request.Request(
        phoenix.url + "/graphql",
        json.dumps({"query": query, "variables": {"id": pid, "f": expression}}).encode(),
        {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        doc = json.loads(r.read())
    assert not doc.get("errors"), doc["errors"]
    return {e["node"]["spanId"] for e in doc["data"]["node"]["spans"]["edges"]}


async def until_spans(phoenix: Server, project: str, ready: Callable[[list[dict[str, Any]]],
                                                                    bool]) -> list[dict[str, Any]]:
    """Phoenix ingests in the background: poll its API until ``ready`` holds."""
    deadline = time.monotonic() + SPAN_WAIT
    while True:
        spans = await asyncio.to_thread(spans_of, phoenix, project)
        if ready(spans):
            return spans
        if time.monotonic() > deadline:
            raise AssertionError(f"Phoenix did not show the expected spans in {SPAN_WAIT:.0f} s;"
                                 f" it has {[(s['name'], s['parent_id']) for s in spans]}")
        await asyncio.sleep(0.1)


def ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def events(span: dict[str, Any], *names: str) -> list[tuple[str, dict[str, Any]]]:
    return [(e["name"], e["attributes"]) for e in span["events"] if e["name"] in names]


# --- the session ----------------------------------------------------------------------------------
async def test_agent_session_in_phoenix(make_toolmend: Callable[..., Any],
                                        phoenix: Server) -> None:
    tm: Toolmend = await make_toolmend(trace_session_idle=1.0)
    sid = f"sess-{uuid.uuid4().hex[:8]}"
    session = await run_session(tm.url, tm.app[SCHEDULER], session_id=sid)

    # what the agent got: every call as the model meant it, whatever the server sent
    assert [[(n, a) for n, a, _ in s.calls] for s in session.steps] == [
        [("get_weather", {"city": "Oslo", "days": 3})],
        [("find_restaurant", {"city": "Oslo", "cuisine": "seafood"})],
        []]
    assert session.steps[2].content == ANSWER

    # Nobody ends the session: it goes idle after 1 s and its span is exported then. The
    # other agent's session (it gave up its request in step 2) is exported on its own: Phoenix
    # may ingest it later than this one, so the listing below waits for both.
    def complete(spans: list[dict[str, Any]]) -> bool:
        mine = [s for s in spans if s["attributes"].get("gen_ai.conversation.id") == sid]
        other = [s for s in spans if s["attributes"].get("gen_ai.conversation.id")
                 == "other-agent-session"]
        # the session, its 3 steps, their 3 upstream calls, and the 2 tool runs between them
        return any(s["span_kind"] == "AGENT" for s in mine) and len(mine) == 9 and \
            any(s["span_kind"] == "AGENT" for s in other)

    spans = await until_spans(phoenix, tm.project, complete)

    # the session is listed under its own id, with exactly one trace
    listed = {s["session_id"]: s for s in _get(phoenix, f"/v1/projects/{tm.project}/sessions")
              ["data"]}
    assert set(listed) == {sid, "other-agent-session"}
    (trace,) = listed[sid]["traces"]
    trace_id = trace["trace_id"]
    assert [t["trace_id"] for t in _get(phoenix, f"/v1/sessions/{sid}")["data"]["traces"]] == \
        [trace_id]
    assert listed["other-agent-session"]["traces"][0]["trace_id"] != trace_id
    # ... the same trace toolmend's own session view links to
    async with aiohttp.ClientSession() as http, \
            http.get(f"{tm.url}/toolmend/v1/sessions/{sid}") as resp:
        assert (await resp.json())["trace_ids"] == [trace_id]

    # the trace: the session's span, its three steps, each step's upstream call, and the
    # agent's two tool runs between the steps
    in_trace = [s for s in spans if s["context"]["trace_id"] == trace_id]
    assert len(in_trace) == 9
    (root,) = [s for s in in_trace if s["parent_id"] is None]
    assert root["span_kind"] == "AGENT"
    assert root["name"] == "invoke_agent planner"
    root_id = root["context"]["span_id"]
    tools = sorted((s for s in in_trace if s["name"].startswith("execute_tool ")),
                   key=lambda s: ts(s["start_time"]))
    steps = sorted((s for s in in_trace if s["parent_id"] == root_id and s not in tools),
                   key=lambda s: ts(s["start_time"]))
    assert [s["attributes"]["toolmend.loop.step"] for s in steps] == [1, 2, 3]
    assert all(s["span_kind"] == "LLM" and s["name"] == "chat sim-model" for s in steps)
    for a, b in itertools.pairwise(steps):
        assert ts(a["end_time"]) <= ts(b["start_time"])
    calls = {s["parent_id"]: s for s in in_trace
             if s not in steps and s not in tools and s is not root}
    assert set(calls) == {s["context"]["span_id"] for s in steps}
    assert [t["name"] for t in tools] == ["execute_tool get_weather",
                                          "execute_tool find_restaurant"]
    for t, (a, b) in zip(tools, itertools.pairwise(steps), strict=True):
        assert t["parent_id"] == root_id
        assert ts(a["end_time"]) <= ts(t["start_time"]) <= ts(t["end_time"]) \
            <= ts(b["start_time"])
    assert ts(root["start_time"]) == ts(steps[0]["start_time"])
    assert ts(root["end_time"]) == ts(steps[2]["end_time"])
    r = root["attributes"]
    assert (r["session.id"], r["gen_ai.agent.id"]) == (sid, "planner")
    assert (r["toolmend.session.steps"], r["toolmend.repairs.count"], r["toolmend.retries"]) \
        == (3, 1, 1)
    for s in steps:  # Phoenix reads gen_ai.conversation.id as its own session id
        assert s["attributes"]["session.id"] == sid

    # queue wait, TTFT and tool time, each on the span it belongs to
    s1, s2, s3 = (s["attributes"] for s in steps)
    assert s2["toolmend.queue.wait_ms"] >= session.queue_lower_bound_ms
    assert s2["toolmend.queue.wait_ms"] > max(s1["toolmend.queue.wait_ms"],
                                              s3["toolmend.queue.wait_ms"])
    queued = {name: ts(e["timestamp"]) for e in steps[1]["events"]
              for name in [e["name"]] if name in ("queued", "dispatched")}
    assert (queued["dispatched"] - queued["queued"]) * 1000 >= session.queue_lower_bound_ms
    for a in (s1, s2, s3):
        assert a["toolmend.ttft_ms"] >= SIM_TTFT_MS
    assert s2["toolmend.ttft_ms"] >= s2["toolmend.queue.wait_ms"] + SIM_TTFT_MS
    for call in calls.values():
        assert call["attributes"]["toolmend.upstream.ttft_ms"] >= SIM_TTFT_MS
        assert "toolmend.queue.wait_ms" not in call["attributes"]
        assert "toolmend.agent.tool_time_ms" not in call["attributes"]
    assert "toolmend.agent.tool_time_ms" not in s1
    assert s2["toolmend.agent.tool_time_ms"] >= session.tool_time_lower_bound_ms(2)
    assert s3["toolmend.agent.tool_time_ms"] >= session.tool_time_lower_bound_ms(3)
    assert not {"toolmend.queue.wait_ms", "toolmend.ttft_ms"} & set(r)

    # the repair and the retry are events on their steps
    assert events(steps[0], "repaired", "validation_failed", "retried") == [
        ("repaired", {"toolmend.repair.kind": "coerce_string_to_integer"})]
    why = {"gen_ai.tool.name": "find_restaurant", "toolmend.validation.decision": "retry"}
    assert events(steps[1], "repaired", "validation_failed", "retried") == [
        ("validation_failed", why), ("retried", why | {"toolmend.retry.attempt": 1})]
    assert events(steps[2], "repaired", "validation_failed", "retried") == []
    assert (s1["toolmend.validation.outcome"], s2["toolmend.validation.outcome"]) == \
        ("repaired", "retried")

    # the searches docs/tracing.md gives find it: by session id, by agent, by step
    everyone = {s["context"]["span_id"] for s in in_trace}
    by_session = spans_of(phoenix, tm.project, attribute=f"gen_ai.conversation.id:{sid}")
    assert {s["context"]["span_id"] for s in by_session} == everyone
    by_agent = spans_of(phoenix, tm.project, attribute="gen_ai.agent.id:planner")
    assert {s["context"]["span_id"] for s in by_agent} == \
        {root_id, *(s["context"]["span_id"] for s in steps)}
    # ... and so do the expressions it gives for the filter bar of Phoenix's span table
    step_ids = [s["context"]["span_id"] for s in steps]
    for expression, expected in (
            (f"session.id == '{sid}'", everyone),
            ("gen_ai.agent.id == 'planner'", {root_id, *step_ids}),
            ("toolmend.loop.step == 2", {step_ids[1]}),
            ("toolmend.validation.outcome == 'retried'", {step_ids[1]}),
            (f"toolmend.queue.wait_ms >= {s2['toolmend.queue.wait_ms']!r}", {step_ids[1]}),
            ("span_kind == 'AGENT' and gen_ai.agent.id == 'planner'", {root_id})):
        assert await asyncio.to_thread(filtered, phoenix, tm.project, expression) == expected, \
            expression

    # no message content anywhere Phoenix has it: not in attributes, events or names
    everything = json.dumps(spans_of(phoenix, tm.project))
    for secret in SECRETS:
        assert secret not in everything
    for s in spans:
        assert not {"gen_ai.input.messages", "llm.input_messages", "input.value"} \
            & set(s["attributes"])


async def test_message_content_only_with_capture_on(make_toolmend: Callable[..., Any],
                                                    phoenix: Server) -> None:
    tm: Toolmend = await make_toolmend(trace_content=True)
    secret = "CAPTURED-SECRET-5a5a"
    body = {"model": "sim-model", "messages": [
        {"role": "user", "content": f"capture-check {secret}"}]}
    req = urllib.request.Request(tm.url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json",
                                  "X-Session-Id": "sess-capture"})
    with await asyncio.to_thread(urllib.request.urlopen, req, timeout=10) as r:
        assert json.loads(r.read())["choices"][0]["message"]["content"] == "noted"
    await tm.stop()  # toolmend stops: the open session span is exported too

    def both(spans: list[dict[str, Any]]) -> bool:
        return {s["span_kind"] for s in spans} >= {"AGENT", "LLM"} and len(spans) == 3

    spans = await until_spans(phoenix, tm.project, both)
    (step,) = [s for s in spans if "toolmend.loop.step" in s["attributes"]]
    assert secret in step["attributes"]["gen_ai.input.messages"]
    (root,) = [s for s in spans if s["span_kind"] == "AGENT"]
    assert root["attributes"]["session.id"] == "sess-capture"
    assert secret not in json.dumps(root)  # the session span never carries content
