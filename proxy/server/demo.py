"""``toolmend demo``: a short agent loop through toolmend, with its per-step timeline.

Self-contained by default: a simulated server that breaks tool calls the way real local servers
do (:mod:`toolmend.sim.agent_loop`: a ``<tool_call>`` leaked into the text and split across
deltas, ``"days": "3"`` for an integer, a duplicated argument tail) and toolmend in front of it,
both in this process. The agent is deliberately plain HTTP (aiohttp, no SDK) so the demo needs
nothing beyond toolmend's own dependencies, and so every byte it sees is what any client would
see. Each step shows what the server sent, what the agent received and what toolmend repaired;
the end shows the same session as ``toolmend trace`` draws it.

With ``--upstream URL`` the same loop runs against a real server (toolmend still in process):
what the model does is then up to the model.
"""

from __future__ import annotations

import argparse
import json
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from toolmend.sim import agent_loop
from toolmend.sim.scenario import split_tokens

if TYPE_CHECKING:
    from rich.console import Console

#: The agent's tools: small local Python functions, looked up by the name the model asked for.
TOOL_FUNCTIONS = {"get_weather": agent_loop.get_weather,
                  "find_restaurant": agent_loop.find_restaurant}
REPAIR_NOTE = ": toolmend "


@dataclass
class DemoStep:
    """One request of the loop, as the agent saw it."""

    step: int
    content: str = ""
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    call_ids: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # toolmend's SSE comments (repairs)
    finish_reason: str | None = None
    server_sent: str = ""  # what the simulated server streamed, when known
    error: str | None = None


@dataclass
class DemoResult:
    steps: list[DemoStep]
    answer: str
    session: dict[str, Any]
    upstream: str

    @property
    def calls(self) -> list[tuple[str, dict[str, Any]]]:
        return [c for s in self.steps for c in s.calls]

    @property
    def repairs(self) -> list[str]:
        return [n for s in self.steps for n in s.notes]


async def _chat(http: aiohttp.ClientSession, url: str, body: dict[str, Any],
                headers: dict[str, str], step: DemoStep) -> None:
    """One streamed chat request: accumulate text, tool calls and toolmend's notes into ``step``."""
    calls: dict[int, dict[str, str]] = {}
    async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
        if r.status >= 400:
            raw = await r.read()
            try:
                step.error = orjson.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                step.error = f"HTTP {r.status}: {raw[:200].decode('utf-8', 'replace')}"
            return
        async for raw_line in r.content:
            line = raw_line.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith(REPAIR_NOTE):
                step.notes.append(line[len(REPAIR_NOTE):])
                continue
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = orjson.loads(line[6:])
            if "error" in doc:
                step.error = str(doc["error"].get("message"))
                continue
            for choice in doc.get("choices") or ():
                delta = choice.get("delta") or {}
                step.content += delta.get("content") or ""
                for tc in delta.get("tool_calls") or ():
                    acc = calls.setdefault(tc.get("index", 0), {"id": "", "name": "",
                                                                "arguments": ""})
                    fn = tc.get("function") or {}
                    acc["id"] = acc["id"] or tc.get("id") or ""
                    acc["name"] += fn.get("name") or ""
                    acc["arguments"] += fn.get("arguments") or ""
                step.finish_reason = choice.get("finish_reason") or step.finish_reason
    step.calls = []
    for i in sorted(calls):
        c = calls[i]
        try:
            args = json.loads(c["arguments"] or "{}")
        except ValueError:
            args = {"_unparsable": c["arguments"]}
        step.calls.append((c["name"], args))
    step.call_ids = [calls[i]["id"] or f"call_{i}" for i in sorted(calls)]


def _run_tool(name: str, args: dict[str, Any]) -> str:
    fn = TOOL_FUNCTIONS.get(name)
    if fn is None:
        return f"error: no tool named {name!r}"
    try:
        return str(fn(**args))
    except TypeError as e:
        return f"error: {e}"


def _server_sent(sim: Any, step: int) -> str:
    """What the buggy server streams at this step, as a client without toolmend would see it."""
    sc = next((s for s in sim.library.values() if s.step == step), None)
    if sc is None:
        return ""
    if sc.tool_calls:
        c = sc.tool_calls[0]
        pieces = split_tokens(c.arguments)
        if sc.quirks.get("duplicate_args_tail") and pieces:
            pieces.append(pieces[-1])
            return f"structured call {c.name}, argument tail sent twice: {''.join(pieces)}"
        return f"structured call {c.name}: {c.arguments}"
    text = " | ".join(repr(p) for p in sc.content_pieces())
    if "<tool" in sc.content:
        return f"the call as raw text in content, {len(sc.content_pieces())} deltas: {text}"
    return f"text: {sc.content}"


async def run_loop(toolmend_url: str, *, model: str, max_steps: int = 4,
                   sim: Any = None) -> tuple[list[DemoStep], str, str]:
    """The agent: ask, run the tools the model called, send their results, until it answers."""
    session_id = "demo-" + secrets.token_hex(4)
    headers = {"X-Session-Id": session_id, "X-Agent-Id": "toolmend-demo"}
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You plan outings. Call the tools, then answer briefly."},
        {"role": "user", "content": agent_loop.PROMPT}]
    steps: list[DemoStep] = []
    answer = ""
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for n in range(max_steps):
            step = DemoStep(n + 1, server_sent=_server_sent(sim, n) if sim is not None else "")
            body: dict[str, Any] = {"model": model, "messages": messages,
                                    "tools": agent_loop.TOOLS, "stream": True}
            await _chat(http, toolmend_url, body, headers, step)
            steps.append(step)
            if step.error or not step.calls:
                answer = step.content
                break
            ids = step.call_ids
            messages.append({"role": "assistant", "content": step.content or None,
                             "tool_calls": [{"id": cid, "type": "function", "function": {
                                 "name": name, "arguments": json.dumps(args)}}
                                 for cid, (name, args) in zip(ids, step.calls, strict=True)]})
            for cid, (name, args) in zip(ids, step.calls, strict=True):
                result = _run_tool(name, args)
                step.results.append(result)
                messages.append({"role": "tool", "tool_call_id": cid, "content": result})
    return steps, answer, session_id


async def run_demo(upstream: str | None = None, *, model: str = "sim-model",
                   max_steps: int = 4) -> DemoResult:
    """Run the loop through an in-process toolmend; against the buggy sim unless ``upstream``."""
    from toolmend.server.app import build_app, start_server
    from toolmend.server.config import Settings

    async def session_doc(url: str, sid: str) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, \
                http.get(f"{url}/toolmend/v1/sessions/{sid}") as r:
            return await r.json() if r.status == 200 else {"id": sid, "steps": []}

    if upstream is None:
        async with agent_loop.LocalStack() as stack:
            steps, answer, sid = await run_loop(stack.toolmend_url, model=model,
                                                max_steps=max_steps, sim=stack.sim)
            doc = await session_doc(stack.toolmend_url, sid)
        return DemoResult(steps, answer, doc, "simulated buggy server (vLLM dialect)")
    app = build_app(Settings(log_requests=False), [upstream])
    runner, port = await start_server(app, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    try:
        steps, answer, sid = await run_loop(url, model=model, max_steps=max_steps)
        doc = await session_doc(url, sid)
    finally:
        await runner.cleanup()
    from toolmend.backends.upstream import redacted

    return DemoResult(steps, answer, doc, redacted(upstream))


def render(result: DemoResult, console: Console) -> None:
    """The loop step by step, the timeline panel, and a summary of what toolmend repaired."""
    from rich.text import Text

    from toolmend.telemetry.trace_view import render_session

    console.print(Text(f"toolmend demo: an agent loop through toolmend -> {result.upstream}",
                       style="bold"))
    console.print(f"task: {agent_loop.PROMPT}\n")
    for s in result.steps:
        console.print(Text(f"step {s.step}", style="bold cyan"))
        if s.server_sent:
            console.print(Text(f"  server sent:  {s.server_sent}", style="dim"))
        if s.content.strip():
            console.print(f"  model said:   {s.content.strip()}")
        for (name, args), res in zip(s.calls, s.results, strict=False):
            console.print(f"  tool call:    {name}({json.dumps(args)})  ->  {res}")
        for note in s.notes:
            console.print(Text(f"  toolmend:     {note}", style="yellow"))
        if s.error:
            console.print(Text(f"  error:        {s.error}", style="red"))
    console.print()
    console.print(render_session(result.session, "http://127.0.0.1:16686"))
    console.print(Text("what toolmend repaired", style="bold"))
    lines = []
    for s in result.steps:
        if "raw text" in s.server_sent and s.calls:
            lines.append(f"step {s.step}: a tool call leaked into the text, its <tool_call> "
                         "marker split across deltas, became a structured call")
        if "sent twice" in s.server_sent and s.calls:
            lines.append(f"step {s.step}: the duplicated argument tail was dropped")
        lines += [f"step {s.step}: {n}" for n in s.notes if n.startswith("repaired")]
    for line in lines or ["nothing needed repair this time"]:
        console.print(f"  {line}")
    ok = bool(result.calls) and not any(s.error for s in result.steps)
    console.print(Text(f"\nanswer: {result.answer.strip() or '(none)'}",
                       style="green" if ok else "red"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--upstream", metavar="URL",
                   help="run against a real OpenAI-compatible server instead of the simulated "
                   "buggy one")
    p.add_argument("--model", default="sim-model", help="model name to ask for")
    p.add_argument("--steps", type=int, default=4, help="most requests the agent makes")


def run(args: argparse.Namespace, console: Console | None = None) -> int:
    import asyncio

    from rich.console import Console

    console = console or Console()
    result = asyncio.run(run_demo(args.upstream, model=args.model, max_steps=args.steps))
    render(result, console)
    return 0 if result.calls and not any(s.error for s in result.steps) else 1
