"""``toolmend demo``: the loop runs, one call is repaired, and the timeline shows every step."""

from __future__ import annotations

import argparse
import io

from rich.console import Console

from toolmend.server.demo import render, run, run_demo
from toolmend.sim.agent_loop import FINAL_ANSWER, INTENDED_CALLS


async def test_demo_runs_the_loop_and_reports_the_repairs() -> None:
    result = await run_demo()
    assert result.calls == INTENDED_CALLS
    assert [s.step for s in result.steps] == [1, 2, 3]
    assert result.answer == FINAL_ANSWER
    assert "repaired get_weather: string_to_integer /days" in result.steps[0].notes
    assert [st["step"] for st in result.session["steps"]] == [1, 2, 3]
    assert result.session["steps"][1]["tool_time_ms"] is not None  # the agent's tool time

    out = io.StringIO()
    render(result, Console(file=out, width=160, color_system=None))
    text = out.getvalue()
    assert "step 1: a tool call leaked into the text" in text
    assert "step 1: repaired get_weather: string_to_integer /days" in text
    assert 'get_weather({"city": "Oslo", "days": 3})' in text
    assert 'find_restaurant({"city": "Oslo", "cuisine": "seafood"})' in text
    assert f"answer: {FINAL_ANSWER}" in text
    assert "session demo-" in text and "(1 repaired)" in text  # the timeline panel


def test_demo_command_exit_status() -> None:
    out = io.StringIO()
    args = argparse.Namespace(upstream=None, model="sim-model", steps=4)
    assert run(args, Console(file=out, width=160, color_system=None)) == 0
    assert "what toolmend repaired" in out.getvalue()
