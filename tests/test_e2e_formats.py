"""End to end: every format fixture, replayed by the simulated backend in each dialect, reaches
the openai SDK through toolmend as exactly the expected tool calls.

The accumulator concatenates every fragment of every field per call index, as naive SDK
accumulators do, so a name or id repeated by the backend would show up as a doubled name.

What the client gets is written in the fixtures: a call's ``arguments`` (or, for arguments the
model wrote as broken JSON, ``repaired``: the arguments after repair), and a case's
``refused`` (why toolmend refuses the reply instead of passing a call on).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from .conftest import StackFactory

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "formats"
DIALECTS = ["vllm", "llamacpp", "ollama"]


def _cases() -> list[tuple[str, dict[str, Any]]]:
    files = sorted(FIXTURES.glob("*.json"))
    assert files, f"no format fixtures in {FIXTURES}"  # a missing folder fails, never skips
    return [(f.stem, case) for f in files for case in json.loads(f.read_text())]


CASES = _cases()


def tools_for(case: dict[str, Any]) -> Any:
    if "tools" in case:
        return case["tools"] or openai.omit
    calls = case["expected"].get("tool_calls", [])
    names = {c["name"] for c in calls if c["name"]} or ({"get_weather"} if calls else set())
    if not names and case["expected"].get("reasoning"):
        names = {"get_weather", "get_time"}  # an agent's request: the mender splits reasoning
    if not names:
        return openai.omit  # a reply without calls, to a request without tools
    return [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
            for n in sorted(names)]


async def accumulate(stream: Any) -> dict[str, Any]:
    content, calls, finish = [], {}, None
    async for ch in stream:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        content.append(d.content or "")
        for tc in d.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            slot["id"] += tc.id or ""
            slot["name"] += (tc.function.name or "") if tc.function else ""
            slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = ch.choices[0].finish_reason or finish
    return {"content": "".join(content), "calls": [calls[i] for i in sorted(calls)],
            "finish": finish}


def expected_arguments(call: dict[str, Any]) -> Any:
    """The arguments the client gets for one expected call: ``repaired`` when the model wrote
    broken JSON (``arguments_raw``), else ``arguments``."""
    if "arguments_raw" in call:
        assert "repaired" in call, f"fixture call {call['name']!r}: no 'repaired' arguments"
        return call["repaired"]
    return call["arguments"]


def test_fixtures_say_what_the_client_gets() -> None:
    assert len(CASES) > 150
    for fmt, case in CASES:
        refused = case.get("refused")
        assert refused is None or (isinstance(refused, str) and refused), (fmt, case["name"])
        if not refused:
            for call in case["expected"].get("tool_calls", []):
                assert call["name"], (fmt, case["name"])
                expected_arguments(call)


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize(("fmt", "case"), CASES, ids=[f"{f}-{c['name']}" for f, c in CASES])
async def test_fixture_through_toolmend(make_stack: StackFactory, dialect: str, fmt: str,
                                        case: dict[str, Any]) -> None:
    stack = await make_stack(dialect, tool_format=fmt)
    push: dict[str, Any] = {"content": case["output"], "wire_split_seed": 3}
    if case.get("finish_reason"):
        push["finish_reason"] = case["finish_reason"]
    stack.sim.push(push)
    # a reply that starts inside reasoning: the request turned thinking on for a template
    # that opens it
    extra = {"chat_template_kwargs": {"enable_thinking": True}} if case.get("reasoning_open") \
        else None
    c = openai.AsyncOpenAI(base_url=stack.v1, api_key="x", max_retries=0, timeout=20)
    expected = case["expected"]
    exp_calls = expected.get("tool_calls", [])
    request = c.chat.completions.create(
        model="sim-model", messages=[{"role": "user", "content": "go"}], tools=tools_for(case),
        stream=True, extra_body=extra)
    if case.get("refused"):
        # a call that cannot be mended, or breaks its tool's schema, is never passed on
        with pytest.raises(openai.APIError) as ei:
            await accumulate(await request)
        assert "invalid_tool_call" in str(ei.value.body) or "tool call" in ei.value.message
        return
    got = await accumulate(await request)
    assert got["content"] == expected.get("content", ""), got
    assert [x["name"] for x in got["calls"]] == [x["name"] for x in exp_calls]
    for g, e in zip(got["calls"], exp_calls, strict=True):
        assert g["id"], "every call has an id"
        if "id" in e:
            assert g["id"] == e["id"]
        # always valid JSON for the client, and exactly the expected arguments
        assert orjson.loads(g["arguments"]) == expected_arguments(e), g["arguments"]
    if exp_calls:
        assert got["finish"] == "tool_calls"
