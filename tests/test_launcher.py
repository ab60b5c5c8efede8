"""``toolmend serve --launch``: the command for each stack, supervision, and a real child.

The command tests build each stack's launch plan from made-up machines without starting
anything. The supervision test runs a tiny stand-in server as the child (fast, no model). The
``real`` test launches ``python -m llama_cpp.server`` with the Gemma GGUF, kills it mid-run and
checks that it comes back, that a request during the outage waits or fails clearly, and that
requests after it succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from toolmend.backends.doctor import Gpu, Hardware
from toolmend.backends.launcher import (
    LaunchError,
    LaunchPlan,
    ManagedBackend,
    apply_plan,
    flag_value,
    free_port,
    merge_args,
    plan_launch,
)
from toolmend.server.app import build_app, start_server
from toolmend.server.cli import parse_args
from toolmend.server.config import Settings

NVIDIA = Hardware("Linux", "x86_64", 32, 128 * 1024, [Gpu("nvidia", "NVIDIA L40S", 46068)])
CPU = Hardware("Linux", "x86_64", 2, 24 * 1024)


def _pairs(argv: list[str]) -> str:
    return " ".join(argv)


# the command for each stack ----------------------------------------------------------------

def test_vllm_command_has_the_tool_flags_and_matching_format() -> None:
    plan = plan_launch("vllm", port=8123, hw=NVIDIA, model="Qwen/Qwen3-14B")
    cmd = _pairs(plan.argv)
    assert plan.argv[:3] == ["vllm", "serve", "Qwen/Qwen3-14B"]
    for flag in ("--enable-auto-tool-choice", "--tool-call-parser hermes",
                 "--gpu-memory-utilization 0.90", "--max-model-len 32768",
                 "--scheduling-policy priority", "--host 127.0.0.1", "--port 8123"):
        assert flag in cmd
    assert (plan.backend, plan.tool_format) == ("vllm", "hermes")
    assert plan.slots == int(flag_value(plan.argv, "--max-num-seqs") or 0) == 16
    assert plan.ready_path == "/v1/models" and plan.url == "http://127.0.0.1:8123"


@pytest.mark.parametrize(("model", "parser", "fmt"), [
    ("mistralai/Mistral-Small-3.2-24B-Instruct-2506", "mistral", "mistral"),
    ("meta-llama/Llama-3.1-8B-Instruct", "llama3_json", "llama3_json"),
    ("Qwen/Qwen3-Coder-30B-A3B-Instruct", "qwen3_coder", "qwen3_coder"),
    ("openai/gpt-oss-20b", "openai", "gpt_oss"),
    ("google/gemma-3-270m", "hermes", "hermes"),  # name says nothing: hermes-style template
])
def test_vllm_parser_follows_the_model(model: str, parser: str, fmt: str) -> None:
    plan = plan_launch("vllm", port=8000, hw=NVIDIA, model=model)
    assert flag_value(plan.argv, "--tool-call-parser") == parser
    assert plan.tool_format == fmt


def test_extra_args_replace_recommended_flags_and_set_the_format() -> None:
    plan = plan_launch("vllm", port=8000, hw=CPU, model="/models/gemma",
                       extra_args=["--tool-call-parser", "llama3_json", "--max-model-len=1024",
                                   "--dtype", "bfloat16"])
    assert plan.argv.count("--tool-call-parser") == 1
    assert flag_value(plan.argv, "--tool-call-parser") == "llama3_json"
    assert plan.tool_format == "llama3_json"  # toolmend reads calls the way the server does
    assert "32768" not in plan.argv and flag_value(plan.argv, "--max-model-len") == "1024"
    assert plan.argv[-2:] == ["--dtype", "bfloat16"]


def test_llama_server_command() -> None:
    plan = plan_launch("llama-server", port=8124, hw=CPU, model="/m/qwen3-4b.gguf")
    assert plan.argv[0] == "llama-server"
    cmd = _pairs(plan.argv)
    for flag in ("-m /m/qwen3-4b.gguf", "--jinja", "-np 2", "-c 16384", "-t 2", "--metrics",
                 "--port 8124"):
        assert flag in cmd
    assert (plan.backend, plan.slots, plan.ready_path) == ("llamacpp", 2, "/health")
    assert plan.tool_format == "hermes"  # Qwen's format, from the model name
    assert "-np 4" in _pairs(plan_launch("llama-server", port=1, hw=CPU, slots=4).argv)
    assert plan_launch("llama-server", port=1, hw=CPU, slots=4).slots == 4


def test_ollama_environment() -> None:
    plan = plan_launch("ollama", port=11500, hw=NVIDIA, model="qwen3:8b", slots=3)
    assert plan.argv == ["ollama", "serve"]
    assert plan.env["OLLAMA_KEEP_ALIVE"] == "-1"
    assert plan.env["OLLAMA_NUM_PARALLEL"] == "3"
    assert plan.env["OLLAMA_HOST"] == "127.0.0.1:11500"
    assert (plan.backend, plan.slots, plan.ready_path) == ("ollama", 3, "/api/version")


def test_llama_cpp_python_command() -> None:
    plan = plan_launch("llama-cpp-python", port=8125, hw=CPU, model="/m/gemma.gguf")
    assert plan.argv[:3] == [sys.executable, "-m", "llama_cpp.server"]
    cmd = _pairs(plan.argv)
    for flag in ("--model /m/gemma.gguf", "--chat_format chatml-function-calling",
                 "--port 8125", "--host 127.0.0.1"):
        assert flag in cmd
    assert plan.slots == 1 and plan.backend == "auto"


def test_binary_override_and_unknown_stack() -> None:
    plan = plan_launch("vllm", port=8000, hw=CPU, model="m",
                       binary="/venv/bin/python /opt/vllm_launcher.py")
    assert plan.argv[:4] == ["/venv/bin/python", "/opt/vllm_launcher.py", "serve", "m"]
    with pytest.raises(LaunchError):
        plan_launch("tgi", port=1, hw=CPU)


def test_merge_args_and_flag_value() -> None:
    assert merge_args(["x", "-c", "8192", "--jinja"], ["-c", "1024"]) == \
        ["x", "--jinja", "-c", "1024"]
    assert merge_args(["--a", "1", "--b"], []) == ["--a", "1", "--b"]
    assert flag_value(["--x=3", "--y", "-1"], "--y") == "-1"  # a negative number is a value
    assert flag_value(["--x=3"], "--x") == "3"


def test_apply_plan_keeps_what_the_user_chose() -> None:
    plan = plan_launch("vllm", port=8000, hw=CPU, model="meta-llama/Llama-3.1-8B")
    s = Settings(tool_format="pythonic")
    apply_plan(s, plan)
    assert s.upstream == ["http://127.0.0.1:8000"] and s.backend == "vllm"
    assert s.tool_format == "pythonic" and s.slots == plan.slots


def test_cli_passes_args_after_double_dash() -> None:
    args = parse_args(["serve", "--launch", "llama-server", "--", "-c", "4096", "--flash-attn"])
    s = Settings.load(args, None, environ={})
    assert s.launch == "llama-server" and s.launch_args == ["-c", "4096", "--flash-attn"]


# supervision with a stand-in child ---------------------------------------------------------

STAND_IN = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"object": "list", "data": [{"id": "stand-in"}]}'
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a):
        print("request", self.path, flush=True)
print("stand-in up", flush=True)
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _stand_in_plan(port: int) -> LaunchPlan:
    return LaunchPlan("stand-in", [sys.executable, "-c", STAND_IN, str(port)], {}, port,
                      "openai", "auto", 1, "stand-in", "/v1/models")


async def _wait_state(b: ManagedBackend, *states: str, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while b.state not in states:  # noqa: ASYNC110 - a test polling a plain attribute
            await asyncio.sleep(0.02)


def _gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_child_is_restarted_and_stopped_with_its_group() -> None:
    lines: list[str] = []
    b = ManagedBackend(_stand_in_plan(free_port()), ready_timeout=20,
                       backoff=(0.2, 2.0, 1.0), log_sink=lines.append)
    await b.start()
    try:
        await b.wait_ready(20)
        assert "[stand-in] stand-in up" in lines
        first = b.pid
        assert first is not None
        os.killpg(first, signal.SIGKILL)
        await _wait_state(b, "restarting")
        assert "exited with code -9" in b.reason
        await b.wait_ready(20)
        assert b.restarts == 1 and b.pid != first and b.last_exit == -9
    finally:
        pid = b.pid
        await b.stop()
    assert pid is not None and _gone(pid) and b.state == "stopped"


async def test_child_that_never_starts_is_a_clear_error() -> None:
    plan = LaunchPlan("broken", [sys.executable, "-c", "print('bad flag --nope'); exit(2)"], {},
                      free_port(), "openai", "auto", 1, "m", "/v1/models")
    b = ManagedBackend(plan, ready_timeout=20, log_sink=lambda _: None)
    await b.start()
    with pytest.raises(LaunchError, match=r"(?s)exit code 2.*bad flag --nope"):
        await b.wait_ready(20)
    await b.stop()
    missing = LaunchPlan("x", ["/nonexistent/llama-server"], {}, 1, "openai", "auto", 1, "m", "/")
    with pytest.raises(LaunchError, match="--launch-binary"):
        await ManagedBackend(missing).start()


# the real thing: llama-cpp-python's server with the Gemma GGUF --------------------------------

@contextlib.asynccontextmanager
async def _launched(stack_kw: dict[str, Any], lines: list[str]
                    ) -> AsyncIterator[tuple[ManagedBackend, str]]:
    plan = plan_launch("llama-cpp-python", port=free_port(), hw=CPU, **stack_kw)
    settings = Settings(log_requests=False, queue_ttl=120)
    apply_plan(settings, plan)
    backend = ManagedBackend(plan, ready_timeout=180, backoff=(0.5, 2.0, 5.0),
                             log_sink=lines.append)
    await backend.start()
    app = build_app(settings, settings.upstream)
    backend.attach(app)
    runner, port = await start_server(app, "127.0.0.1", 0)
    try:
        yield backend, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await backend.stop()


async def _chat(http: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, Any]:
    body = {"model": "gemma", "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 4}
    async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
        return r.status, orjson.loads(await r.read())


@pytest.mark.real
async def test_launched_llama_cpp_python_survives_being_killed() -> None:
    lines: list[str] = []
    timeout = aiohttp.ClientTimeout(total=180)
    async with _launched({"extra_args": ["--n_ctx", "1024"]}, lines) as (backend, url), \
            aiohttp.ClientSession(timeout=timeout) as http:
        assert "--chat_format" in backend.plan.argv
        await backend.wait_ready(180)
        async with http.get(url + "/readyz") as r:
            ready = await r.json()
        assert r.status == 200 and ready["backend"]["launched"]["state"] == "ready"
        status, doc = await _chat(http, url)
        assert status == 200 and doc["choices"][0]["message"] is not None
        assert any(line.startswith("[llama-cpp-python] ") for line in lines)

        # killed mid-stream: the request in flight ends with a clear error, not a hang
        body = {"model": "gemma", "messages": [{"role": "user", "content": "Count to 100."}],
                "max_tokens": 400, "stream": True}
        first_pid = backend.pid
        assert first_pid is not None
        raw = b""
        async with http.post(url + "/v1/chat/completions", json=body) as r:
            async for chunk in r.content.iter_any():
                raw += chunk
                if b'"content"' in raw and first_pid == backend.pid:
                    os.killpg(first_pid, signal.SIGKILL)
                    first_pid = -1
        assert first_pid == -1
        assert b'"error"' in raw and raw.rstrip().endswith(b"data: [DONE]")
        await asyncio.wait_for(_wait_state(backend, "restarting"), 10)

        # during the outage: /readyz says why; a request with a short deadline fails clearly,
        # one with the default time-to-live waits for the restart and succeeds
        async with http.get(url + "/readyz") as r:
            down = await r.json()
        assert r.status == 503 and "llama-cpp-python" in down["reason"]
        waiting = asyncio.create_task(_chat(http, url))
        status, doc = await _chat(http, url, **{"X-Toolmend-Deadline-Ms": "100"})
        assert status == 503 and doc["error"]["code"] == "deadline_exceeded"
        assert "llama-cpp-python backend" in doc["error"]["message"]
        status, doc = await waiting
        assert status == 200 and doc["choices"]

        assert backend.state == "ready" and backend.restarts == 1
        status, _ = await _chat(http, url)
        assert status == 200
        pid = backend.pid
    assert pid is not None and _gone(pid)
