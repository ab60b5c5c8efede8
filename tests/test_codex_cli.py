"""The real Codex CLI (``@openai/codex``, pinned in tests/clients) through toolmend.

``codex exec`` runs one task against toolmend in front of the simulated backend, which is
scripted to call Codex's shell tool (``exec_command``) on a file holding a random token, and to
send that call broken: as raw ``<tool_call>`` text leaked into the content, split across
deltas. Through toolmend, Codex gets a clean ``function_call``, runs it, and its next request
carries the token in a ``function_call_output``; the CLI exits 0, and toolmend's request log
shows no 4xx for anything the CLI asked. Twice: as a custom provider
(``wire_api = "responses"``) and in Codex's local mode (``--oss --local-provider ollama``, which
probes the Ollama API, refuses an Ollama older than 0.13.4, then speaks Responses on the same
port).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from toolmend.server.app import build_app, start_server
from toolmend.server.config import Settings
from toolmend.sim.scenario import Scenario
from toolmend.sim.server import SimBackend

from .clients import npm
from .real.stacks import StackError

KEYWORD = "tokenfile"  # in the task: the sim's scenarios answer this conversation only


@pytest.fixture(scope="session")
def codex() -> Iterator[Path]:
    """The pinned CLI, installed once from tests/clients (a failure fails, never skips)."""
    try:
        yield npm.cli("codex")
    except StackError as e:
        pytest.fail(f"the Codex CLI could not be installed: {e}", pytrace=False)


def leaked_call(cmd: str) -> list[str]:
    """Codex's shell call as raw ``<tool_call>`` text, cut inside the marker, the name and the
    arguments."""
    call = orjson.dumps({"name": "exec_command", "arguments": {"cmd": cmd}}).decode()
    return ["I will read the file.", " <tool", "_call>\n" + call[:14], call[14:31],
            call[31:] + "\n</tool_", "call>"]


def script(sim: SimBackend, token: str) -> None:
    sim.library["codex/call"] = Scenario(name="codex/call", chunks=leaked_call("cat token.txt"),
                                         match=KEYWORD, step=0)
    sim.library["codex/answer"] = Scenario(name="codex/answer", match=KEYWORD, step=1,
                                           content=f"The token is {token}.")


def recorder(seen: list[dict[str, Any]]) -> Any:
    """A middleware that keeps each ``POST /v1/responses`` body as the CLI sent it."""
    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "POST" and request.path == "/v1/responses":
            seen.append({"headers": dict(request.headers),
                         "body": orjson.loads(await request.read())})
        return await handler(request)  # type: ignore[no-any-return]
    return record


def config(home: Path, port: int, *, provider: bool) -> None:
    lines = ['model = "sim-model"', "check_for_update_on_startup = false"]
    if provider:
        lines += ['model_provider = "toolmend"']
    lines += ["", "[analytics]", "enabled = false"]
    if provider:
        lines += ["", "[model_providers.toolmend]", 'name = "toolmend"',
                  f'base_url = "http://127.0.0.1:{port}/v1"', 'env_key = "TOOLMEND_TEST_KEY"',
                  'wire_api = "responses"']
    (home / "config.toml").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("mode", ["provider", "oss"])
async def test_codex_exec_runs_a_leaked_shell_call_through_toolmend(
        codex: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str) -> None:
    token = secrets.token_hex(12)
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    (work / "token.txt").write_text(token + "\n")
    sim = SimBackend("vllm")
    await sim.start()
    script(sim, token)
    seen: list[dict[str, Any]] = []
    app = build_app(Settings(state_dir=str(tmp_path / "state")), [sim.url])
    app.middlewares.append(recorder(seen))
    runner, port = await start_server(app, "127.0.0.1", 0)
    caplog.set_level(logging.INFO, logger="toolmend.access")
    try:
        config(home, port, provider=mode == "provider")
        env = {**os.environ, "CODEX_HOME": str(home), "HOME": str(home),
               "TOOLMEND_TEST_KEY": "sk-dummy"}
        args = [str(codex), "exec", "--strict-config", "--skip-git-repo-check", "-C", str(work)]
        if mode == "oss":
            env["CODEX_OSS_BASE_URL"] = f"http://127.0.0.1:{port}/v1"
            args += ["--oss", "--local-provider", "ollama", "-m", "sim-model"]
        args.append(f"Print the secret in the {KEYWORD} token.txt.")
        proc = await asyncio.create_subprocess_exec(
            *args, env=env, cwd=work, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
    finally:
        await runner.cleanup()
        await sim.stop()
    log = err.decode(errors="replace")[-4000:]
    assert proc.returncode == 0, log
    assert f"The token is {token}." in out.decode()

    # the call reached Codex clean, and its result came back in the next request
    assert len(seen) == 2, log
    first, second = seen[0]["body"], seen[1]["body"]
    kinds = {t.get("type") for t in first["tools"]}
    assert "function" in kinds and kinds - {"function"}, kinds  # Codex sends hosted tools too
    calls = [i for i in second["input"] if i.get("type") == "function_call"]
    assert [(c["name"], orjson.loads(c["arguments"])) for c in calls] == [
        ("exec_command", {"cmd": "cat token.txt"})]
    outputs = [i for i in second["input"] if i.get("type") == "function_call_output"]
    assert [o["call_id"] for o in outputs] == [calls[0]["call_id"]]
    assert token in orjson.dumps(outputs[0]["output"]).decode()
    # what the backend saw: only function tools, and the tool result paired with the call
    upstream = sim.stats.bodies[-1]
    assert {t["type"] for t in upstream["tools"]} == {"function"}
    assert upstream["messages"][-1]["role"] == "tool" and token in upstream["messages"][-1][
        "content"]

    # toolmend's log: every request the CLI made answered, none with a 4xx
    lines = [orjson.loads(r.getMessage()) for r in caplog.records
             if r.name == "toolmend.access"]
    asked = [(line["method"], line["path"], line["status"]) for line in lines]
    assert all(status < 400 for _, _, status in asked), asked
    assert asked.count(("POST", "/v1/responses", 200)) == 2, asked
    if mode == "oss":  # the Ollama probes Codex makes first, on the same port
        assert {("GET", "/v1/models", 200), ("GET", "/api/version", 200),
                ("GET", "/api/tags", 200)} <= set(asked), asked
    # one Codex task is one agent and one session: its own session-id header
    session = seen[0]["headers"]["session-id"]
    assert {line["agent_id"] for line in lines if line["path"] == "/v1/responses"} == {session}


def test_the_cli_is_the_pinned_version(codex: Path) -> None:
    import subprocess

    got = subprocess.run([str(codex), "--version"], capture_output=True, text=True,
                         timeout=60, check=True)
    assert got.stdout.split() == ["codex-cli", npm.pinned_version("codex")]
    assert npm.pinned_version("codex") == "0.171.0"
