"""The real Claude Code CLI (pinned in tests/clients/) through toolmend, in front of
the simulated backend.

``claude -p`` is pointed at toolmend with ``ANTHROPIC_BASE_URL`` and a dummy key. The sim,
scripted to read a file that holds a random token, sends its ``Read`` call broken: as raw
``<tool_call>`` text in the content, split across deltas, the way a server without a tool
parser for the model leaks it. toolmend must hand Claude Code a clean ``tool_use``: the CLI
runs the tool, sends the token back in a ``tool_result``, and ends with exit code 0, and no
request of the CLI's gets a 4xx on the way.

The CLI sends one ``/v1/messages?beta=true`` request per step with
``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1`` (no title or quota side requests in this
version); any other request it might send gets the sim's default short reply.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from toolmend.server import auth
from toolmend.server.app import build_app, start_server
from toolmend.server.config import Settings
from toolmend.sim.scenario import Scenario
from toolmend.sim.server import SimBackend

from .clients import npm
from .real.stacks import StackError

PROMPT = "Read the file token.txt and tell me the token it holds."
KEY = "tm-claude-code-key-3c3c3c3c"


def leaked_read(path: str) -> list[str]:
    """A Hermes ``<tool_call>`` for ``Read``, leaked into content, split inside the markers,
    the name, a key and the path."""
    cut = len(path) // 2
    return ["I'll read the file.", " <tool", "_call>\n{\"name\": \"Re",
            "ad\", \"arguments\": {\"file_", "path\": \"" + path[:cut],
            path[cut:] + "\"}}\n</tool_", "call>"]


def tool_results(body: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(the tool_use's name, its input's file_path, the tool_result's content) for every
    tool_result in a Messages request, paired with the tool_use it answers."""
    uses = {b["id"]: b for m in body.get("messages") or () if m.get("role") == "assistant"
            and isinstance(m.get("content"), list) for b in m["content"]
            if b.get("type") == "tool_use"}
    out = []
    for m in body.get("messages") or ():
        if m.get("role") != "user" or not isinstance(m.get("content"), list):
            continue
        for b in m["content"]:
            if b.get("type") == "tool_result":
                use = uses.get(b["tool_use_id"], {})
                out.append((use.get("name"), (use.get("input") or {}).get("file_path"),
                            b.get("content")))
    return out


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(c.get("text", "") for c in content or () if isinstance(c, dict))


async def recorded_sessions(url: str) -> list[dict[str, Any]]:
    """The session list, read once every request the CLI sent has been handled (see
    ``record`` in the test: telemetry records a step before its handler returns)."""
    async with aiohttp.ClientSession() as s, s.get(url + "/toolmend/v1/sessions") as r:
        data: list[dict[str, Any]] = (await r.json())["data"]
    return data


@pytest.fixture(scope="session")
def claude_binary() -> Path:
    """The pinned CLI, installed once from tests/clients (a failure fails, never skips)."""
    try:
        return npm.cli("claude")
    except StackError as e:
        pytest.fail(f"the Claude Code CLI could not be installed: {e}", pytrace=False)


@pytest.mark.parametrize(("dialect", "keyed"), [("llamacpp", False), ("vllm", True)],
                         ids=["llamacpp", "vllm-keyed"])
async def test_claude_code_reads_a_file_through_a_leaked_split_call(
        claude_binary: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        dialect: str, keyed: bool) -> None:
    """``keyed``: toolmend requires a key; the CLI sends its ANTHROPIC_API_KEY as
    ``x-api-key``, and the key names the agent."""
    token = "tok-" + secrets.token_hex(12)
    work = tmp_path / "work"
    work.mkdir()
    target = work / "token.txt"
    target.write_text(token + "\n")
    sim = SimBackend(dialect, ttft=0.0)
    sim.library["read"] = Scenario.from_dict({"name": "read", "match": "token.txt", "step": 0,
                                              "chunks": leaked_read(str(target))})
    sim.library["answer"] = Scenario.from_dict({"name": "answer", "match": "token.txt",
                                                "step": 1,
                                                "content": f"The token is {token}."})
    await sim.start()
    settings = Settings(log_requests=True, state_dir=str(tmp_path / "state"))
    if keyed:
        cfg = tmp_path / "toolmend.toml"
        cfg.write_text(f'[keys."{auth.hash_key(KEY)}"]\nagent = "claude-agent"\n')
        settings.config_path = str(cfg)
    app = build_app(settings, [sim.url])
    received: list[dict[str, Any]] = []
    handled = asyncio.Condition()
    done = 0

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        """Outermost: what the CLI sent, and when toolmend (telemetry included) was done."""
        nonlocal done
        if request.path != "/v1/messages":
            return await handler(request)
        received.append(orjson.loads(await request.read()))
        try:
            return await handler(request)
        finally:
            async with handled:
                done += 1
                handled.notify_all()

    app.middlewares.insert(0, record)
    runner, port = await start_server(app, "127.0.0.1", 0)
    caplog.set_level(logging.INFO, logger="toolmend.access")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANTHROPIC_", "CLAUDE_", "OTEL_"))}
    env.update({"HOME": str(tmp_path / "home"),
                "ANTHROPIC_API_KEY": KEY if keyed else "dummy-key",
                "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}",
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"})
    try:
        proc = await asyncio.create_subprocess_exec(
            str(claude_binary), "-p", PROMPT, "--allowedTools", "Read", cwd=work, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        # the CLI has exited, so it sends nothing more: wait until what it sent is handled
        # (a CLI that failed early ends here too, and the asserts below say why)
        async with handled:
            await handled.wait_for(lambda: done == len(received))
        sessions = await recorded_sessions(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()
        await sim.stop()
    report = f"stdout: {out.decode()[-2000:]}\nstderr: {err.decode()[-2000:]}"
    assert proc.returncode == 0, report
    assert f"The token is {token}." in out.decode(), report
    # the step after the tool call carries the token, in a tool_result for the Read call
    results = [r for body in received for r in tool_results(body)]
    assert [(name, path) for name, path, _ in results] == [("Read", str(target))], report
    assert token in text_of(results[0][2])
    assert len(received) == 2
    # the backend got it as an OpenAI tool message answering the call toolmend made
    sent = sim.stats.bodies[-1]["messages"]
    tool_msgs = [m for m in sent if m["role"] == "tool"]
    assert len(tool_msgs) == 1 and token in tool_msgs[0]["content"]
    call = next(m for m in sent if m.get("tool_calls"))["tool_calls"][0]
    assert call["id"] == tool_msgs[0]["tool_call_id"] and call["id"].startswith("toolu_")
    # toolmend's log: every request of the CLI answered without a 4xx
    lines = [line for r in caplog.records if r.name == "toolmend.access"
             if not (line := orjson.loads(r.getMessage()))["path"].startswith("/toolmend/")]
    assert [(ln["method"], ln["path"]) for ln in lines] == [("POST", "/v1/messages")] * 2
    assert all(ln["status"] == 200 and ln["error"] is None for ln in lines), lines
    # both steps are one session of one agent, named by the CLI's own session id
    assert [(s["source"], s["steps"]) for s in sessions] == [("claude-code", 2)]
    cli_session = orjson.loads(received[0]["metadata"]["user_id"])["session_id"]
    assert sessions[0]["id"] == cli_session
    assert sessions[0]["agent_id"] == ("claude-agent" if keyed else cli_session)


def test_the_cli_is_the_pinned_version(claude_binary: Path) -> None:
    import subprocess

    got = subprocess.run([str(claude_binary), "--version"], capture_output=True, text=True,
                         timeout=60, check=True)
    assert got.stdout.split()[0] == npm.pinned_version("claude") == "2.1.332"
