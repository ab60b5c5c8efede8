"""Session-scoped real serving stacks, and toolmend in front of them.

Each stack starts once per test session (set-up is minutes for vLLM) and is stopped at the end.
A stack that cannot be set up FAILS every test that needs it, with the reason: in CI a missing
compiler or network must be seen, never skipped past.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from toolmend.server.app import build_app, start_server
from toolmend.server.config import Settings

from . import stacks
from .helpers import Proxy

_failures: dict[str, str] = {}


def _serve(name: str, start: Callable[[], stacks.Server]) -> Iterator[stacks.Server]:
    if name in _failures:  # one failed set-up is not retried by every later test
        pytest.fail(_failures[name], pytrace=False)
    try:
        server = start()
    except stacks.StackError as e:
        _failures[name] = f"{name} could not be set up: {e}"
        pytest.fail(_failures[name], pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def llama_cpp_python() -> Iterator[stacks.Server]:
    """``python -m llama_cpp.server`` with ``chatml-function-calling`` and the Gemma GGUF."""
    yield from _serve("llama-cpp-python", stacks.start_llama_cpp_python)


@pytest.fixture(scope="session")
def llama_server() -> Iterator[stacks.Server]:
    """llama.cpp's llama-server (2 slots) with the project's Hermes-style template."""
    yield from _serve("llama-server", stacks.start_llama_server)


@pytest.fixture(scope="session")
def vllm() -> Iterator[stacks.Server]:
    """vLLM's CPU build with its hermes tool parser, its qwen3 reasoning parser and the
    converted Gemma model: one launch (about 2.5 minutes) shared by every vLLM test. It
    schedules by request priority and runs two sequences at once (:data:`stacks.VLLM_QUEUE_ARGS`),
    so a third request waits in vLLM's own queue, where priorities order it."""
    yield from _serve("vllm", lambda: stacks.start_vllm(extra_args=stacks.VLLM_QUEUE_ARGS))


@pytest.fixture
async def make_proxy() -> AsyncIterator[Callable[..., Any]]:
    """Start toolmend (default settings, everything on) in front of a real server."""
    runners: list[Any] = []

    async def factory(server: stacks.Server, **settings: Any) -> Proxy:
        s = Settings(**{"log_requests": False, **settings})
        app = build_app(s, [server.url])
        runner, port = await start_server(app, "127.0.0.1", 0)
        runners.append(runner)
        return Proxy(f"http://127.0.0.1:{port}", server, app)

    yield factory
    for r in reversed(runners):
        await r.cleanup()
