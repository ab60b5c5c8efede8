"""A three-step agent session through toolmend in front of ``toolmend sim``, with the things a
person looks for in a trace: a repaired call, a validation retry and a wait in the queue.

Shared by the viewer tests (``test_phoenix.py``) and the script that makes the pictures for the
docs (``docs/make_pictures.py``), so the pictures show exactly what the tests check.

- the simulated server is ``toolmend sim`` in its own process, scripted by scenario files
  (:func:`write_scenarios`): step 1 sends ``"days": "3"`` for an integer (repaired in place),
  step 2 forgets the required ``cuisine`` (validated, retried, corrected), step 3 answers;
- toolmend runs in this process with one backend slot, so that another agent's request that
  holds the slot makes step 2 wait in toolmend's queue (:func:`run_session` arranges it);
- the agent is plain aiohttp: streamed chat requests, its tools are local functions.

Every message carries one of :data:`SECRETS`, so a test can check none reaches the viewer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.real.stacks import StackError, _tail, free_port
from toolmend.sim.agent_loop import TOOLS, find_restaurant, get_weather

#: Part of every user prompt of the session; the scenarios answer only conversations with it.
KEY = "viewer-picnic"
SIM_TTFT = 0.05  # seconds to the first token, every reply
HOLD = "NOISE-hold-the-slot"  # the other agent's prompt: a reply that never comes
#: One in the system prompt, the user prompt, a tool result and the final answer each.
SECRETS = ("SYSTEM-SECRET-3e1f", "USER-SECRET-77aa", "RESULT-SECRET-0c4d", "REPLY-SECRET-9b2e")
ANSWER = f"Sunny in Oslo for 3 days; dinner at Fiskeriet. {SECRETS[3]}"
FUNCTIONS: dict[str, Callable[..., str]] = {"get_weather": get_weather,
                                           "find_restaurant": find_restaurant}


def scenarios() -> list[dict[str, Any]]:
    """What the simulated model says at each step (picked by tool results so far, ``step``)."""
    return [
        {"name": "viewer/1-days-as-string", "match": KEY, "step": 0,
         "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo", "days": "3"}}]},
        {"name": "viewer/2-cuisine-missing", "match": KEY, "step": 1,
         "content": "Now a restaurant. ",
         "tool_calls": [{"name": "find_restaurant", "arguments": {"city": "Oslo"}}]},
        # toolmend's retry appends a user message naming the problem: "... were invalid ..."
        {"name": "viewer/2-retried", "match": "were invalid", "step": 1,
         "tool_calls": [{"name": "find_restaurant",
                         "arguments": {"city": "Oslo", "cuisine": "seafood"}}]},
        {"name": "viewer/3-answer", "match": KEY, "step": 2, "content": ANSWER},
        {"name": "viewer/other-agent", "match": HOLD, "ttft": 3600, "content": "never"},
        {"name": "viewer/capture", "match": "capture-check", "content": "noted"},
    ]


def write_scenarios(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "viewer.json").write_text(json.dumps(scenarios(), indent=1))
    return folder


@dataclass
class SimProcess:
    proc: subprocess.Popen[bytes]
    url: str
    logfile: Path
    tmp: tempfile.TemporaryDirectory[str]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.tmp.cleanup()


def start_sim(*, ttft: float = SIM_TTFT, token_delay: float = 0.0,
              ready_timeout: float = 60.0) -> SimProcess:
    """``toolmend sim`` (vLLM dialect) on a free port with the session's scenarios."""
    tmp = tempfile.TemporaryDirectory(prefix="toolmend-viewer-sim-")
    folder = write_scenarios(Path(tmp.name) / "scenarios")
    port = free_port()
    logfile = Path(tmp.name) / "sim.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TOOLMEND_"))}
    with logfile.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "toolmend", "sim", "--host", "127.0.0.1", "--port",
             str(port), "--ttft", str(ttft), "--token-delay", str(token_delay),
             "--fixtures", str(folder)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    sim = SimProcess(proc, f"http://127.0.0.1:{port}", logfile, tmp)
    deadline = time.monotonic() + ready_timeout
    while True:
        if proc.poll() is not None:
            tail = _tail(logfile)
            sim.stop()
            raise StackError(f"toolmend sim exited with {proc.returncode}; log:\n{tail}")
        try:
            with urllib.request.urlopen(sim.url + "/v1/models", timeout=2) as r:
                if json.loads(r.read()).get("data"):
                    return sim
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            tail = _tail(logfile)
            sim.stop()
            raise StackError(f"toolmend sim not ready after {ready_timeout:.0f} s:\n{tail}")
        time.sleep(0.1)


@dataclass
class Step:
    """One request of the loop as the agent saw it; times are ``time.monotonic()``."""

    number: int
    sent_at: float = 0.0
    done_at: float = 0.0
    status: int = 0
    content: str = ""
    calls: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # toolmend's SSE comments


@dataclass
class Session:
    session_id: str
    agent_id: str
    steps: list[Step] = field(default_factory=list)
    queued_seen_at: float = 0.0  # step 2 seen waiting in toolmend's queue
    released_at: float = 0.0  # the other agent let go of the slot

    @property
    def queue_lower_bound_ms(self) -> float:
        """Step 2 cannot have left the queue before the slot was released."""
        return (self.released_at - self.queued_seen_at) * 1000

    def tool_time_lower_bound_ms(self, step: int) -> float:
        """The agent's own time before ``step``: from the previous reply's last byte to the
        request's first. toolmend measures from its end of the previous step, which is
        earlier, to its start of this one, which is later."""
        return (self.steps[step - 1].sent_at - self.steps[step - 2].done_at) * 1000


async def _until(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


async def _chat(http: aiohttp.ClientSession, url: str, body: dict[str, Any],
                headers: dict[str, str], step: Step) -> None:
    calls: dict[int, dict[str, str]] = {}
    step.sent_at = time.monotonic()
    async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
        step.status = r.status
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith(": toolmend "):
                step.notes.append(line[len(": toolmend "):])
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            for ch in chunk.get("choices") or ():
                delta = ch.get("delta") or {}
                step.content += delta.get("content") or ""
                for tc in delta.get("tool_calls") or ():
                    slot = calls.setdefault(tc["index"], {"id": "", "name": "", "args": ""})
                    slot["id"] = tc.get("id") or slot["id"]
                    fn = tc.get("function") or {}
                    slot["name"] += fn.get("name") or ""
                    slot["args"] += fn.get("arguments") or ""
    step.done_at = time.monotonic()
    step.calls = [(c["name"], json.loads(c["args"]), c["id"]) for _, c in sorted(calls.items())]


async def run_session(url: str, scheduler: Any, *, session_id: str, agent_id: str = "planner",
                      hold: Callable[[], Awaitable[None]] | None = None,
                      tool_work: Callable[[], Awaitable[None]] | None = None) -> Session:
    """The three steps, with another agent holding toolmend's only slot when step 2 arrives.

    ``scheduler`` is toolmend's (``app[SCHEDULER]``): the session waits on its state, never on
    the clock. ``hold``, if given, is awaited while step 2 waits, and ``tool_work`` after the
    agent ran its tools (the docs script uses them to make the wait and the tool time long
    enough to see); the tests give neither.
    """
    session = Session(session_id, agent_id)
    headers = {"X-Agent-Id": agent_id, "X-Session-Id": session_id}
    msgs: list[dict[str, Any]] = [
        {"role": "system", "content": f"You plan outings. {SECRETS[0]}"},
        {"role": "user", "content": f"Plan a {KEY} in Oslo for 3 days. {SECRETS[1]}"}]
    async with aiohttp.ClientSession() as http:
        for number in (1, 2, 3):
            step = Step(number)
            body = {"model": "sim-model", "messages": msgs, "tools": TOOLS, "stream": True}
            if number == 2:
                await _step_behind_another_agent(http, url, scheduler, body, headers, step,
                                                 session, hold)
            else:
                await _chat(http, url, body, headers, step)
            session.steps.append(step)
            if step.status != 200:
                raise AssertionError(f"step {number} failed: HTTP {step.status}")
            if not step.calls:
                break
            msgs.append({"role": "assistant", "content": step.content or None, "tool_calls": [
                {"id": cid, "type": "function",
                 "function": {"name": name, "arguments": json.dumps(args)}}
                for name, args, cid in step.calls]})
            for name, args, cid in step.calls:  # the agent runs its tools
                result = FUNCTIONS[name](**args)
                msgs.append({"role": "tool", "tool_call_id": cid,
                             "content": f"{result} {SECRETS[2]}"})
            if tool_work is not None:
                await tool_work()
    return session


async def _step_behind_another_agent(http: aiohttp.ClientSession, url: str, scheduler: Any,
                                     body: dict[str, Any], headers: dict[str, str], step: Step,
                                     session: Session,
                                     hold: Callable[[], Awaitable[None]] | None) -> None:
    other = asyncio.ensure_future(http.post(
        url + "/v1/chat/completions",
        json={"model": "sim-model", "stream": True,
              "messages": [{"role": "user", "content": HOLD}]},
        headers={"X-Agent-Id": "other-agent", "X-Session-Id": "other-agent-session"}))
    try:
        await _until(lambda: scheduler.in_flight == 1)  # the other agent holds the slot
        mine = asyncio.ensure_future(_chat(http, url, body, headers, step))
        await _until(lambda: scheduler.queued == 1)  # step 2 waits behind it
        session.queued_seen_at = time.monotonic()
        if hold is not None:
            await hold()
    finally:
        other.cancel()  # the other agent gives up: toolmend releases the slot
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            resp = await other
            resp.close()
        session.released_at = time.monotonic()
    await mine
