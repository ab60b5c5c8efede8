"""Real agent frameworks run a multi-step tool loop through toolmend against a buggy server.

The simulated server (``toolmend.sim.agent_loop``) leaks the first call into ``content`` as raw
``<tool_call>`` text split across deltas, with ``days`` as the string ``"3"`` for an integer, and
streams the second with its argument tail duplicated. Through toolmend every framework runs both
tools with exactly the intended arguments and gets the final answer; pointed straight at the
server, the same loop never runs the intended tools. The loops are the ones in ``examples/``, so
the examples cannot rot. No network, no model hub: fake keys, tracing export off.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from toolmend.sim.agent_loop import FINAL_ANSWER, INTENDED_CALLS, LocalStack

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
#: framework -> its example; the frameworks are in the ``test`` extra, so a missing one fails
FRAMEWORKS = {
    "openai-agents": "openai_agents_loop.py",
    "pydantic-ai": "pydantic_ai_loop.py",
    "langchain": "langchain_loop.py",
}



@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Belt and braces beside the examples' own settings: no framework may phone home."""
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
    for name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2"):
        monkeypatch.setenv(name, "false")


def _example(framework: str) -> ModuleType:
    filename = FRAMEWORKS[framework]
    spec = importlib.util.spec_from_file_location(f"example_{filename[:-3]}",
                                                  EXAMPLES / filename)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
async def test_loop_through_toolmend_runs_every_tool_exactly(framework: str) -> None:
    run_loop = _example(framework).run_loop
    calls: list[tuple[str, dict[str, Any]]] = []
    async with LocalStack() as stack:
        answer = await run_loop(stack.toolmend_url + "/v1", calls, "sim-model")
        requests = stack.sim.stats.requests
    assert calls == INTENDED_CALLS
    assert type(calls[0][1]["days"]) is int  # "3" arrived as 3, not as a string
    assert answer.strip() == FINAL_ANSWER
    assert requests == 3  # one request per step: repaired in place, not retried


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
async def test_same_loop_straight_to_the_buggy_server_fails(framework: str) -> None:
    run_loop = _example(framework).run_loop
    calls: list[tuple[str, dict[str, Any]]] = []
    async with LocalStack() as stack:
        try:
            answer = await run_loop(stack.sim_url + "/v1", calls, "sim-model")
        except Exception as e:  # giving up on the broken reply is failing too
            answer = f"error: {e}"
    assert calls != INTENDED_CALLS
    assert calls == []  # the leaked call reached the agent as text: no tool ran at all
    assert "<tool_call>" in answer


@pytest.mark.parametrize("streamed", [True, False])
async def test_agents_sdk_default_responses_model_runs_the_loop(streamed: bool) -> None:
    """The Agents SDK on its default model (``OpenAIResponsesModel``, ``POST /v1/responses``),
    streamed and not: the same loop, both tools run exactly, one request per step."""
    module = _responses_example()
    calls: list[tuple[str, dict[str, Any]]] = []
    async with LocalStack() as stack:
        answer = await module.run_loop(stack.toolmend_url + "/v1", calls, "sim-model",
                                       streamed=streamed)
        requests = stack.sim.stats.requests
    assert calls == INTENDED_CALLS
    assert type(calls[0][1]["days"]) is int
    assert answer.strip() == FINAL_ANSWER
    assert requests == 3


def _responses_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_openai_agents_responses_loop",
                                                  EXAMPLES / "openai_agents_responses_loop.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
