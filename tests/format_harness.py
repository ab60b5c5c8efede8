"""Shared checks for the marker parsers: run a parser over pieces, compare, split invariance.

Fixture files live in ``fixtures/formats/<format>.json``: a list of cases
``{"name", "output", "tools"?, "expected": {"content", "reasoning"?, "tool_calls": [
{"name", "arguments", "id"?, "truncated"?}]}}``. ``arguments`` is the JSON value the
concatenated fragments must parse to; when the model's text is not valid JSON (malformed or
truncated cases), ``arguments_raw`` gives the exact expected text instead, and ``repaired`` the
arguments the client gets once toolmend repaired it. A case toolmend must refuse (a call it
cannot repair, or one that breaks its tool's schema) says why in ``"refused"``; the end-to-end
tests (``test_e2e_formats.py``) check both. Two optional keys say how the reply was produced:
``"reasoning_open": true`` (the chat template opened reasoning, so the reply starts inside it)
and ``"finish_reason"`` (``"length"``: the reply was cut off).
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolmend.parsers.autodetect import AutoParser
from toolmend.parsers.events import Reasoning, Text, ToolCallArgs, ToolCallEnd, ToolCallStart
from toolmend.parsers.formats import make_parser

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "formats"


@dataclass
class Call:
    index: int
    name: str
    id: str | None
    arguments: str = ""
    ended: bool = False
    truncated: bool = False


@dataclass
class Result:
    content: str = ""
    reasoning: str = ""
    calls: list[Call] = field(default_factory=list)

    def key(self) -> tuple[Any, ...]:
        return (self.content, self.reasoning,
                tuple((c.index, c.name, c.id, c.arguments, c.ended, c.truncated)
                      for c in self.calls))


def options(case: dict[str, Any]) -> dict[str, Any]:
    """How a fixture case's reply was produced, as keyword arguments for :func:`run`."""
    return {"reasoning_open": bool(case.get("reasoning_open")),
            "finish_reason": case.get("finish_reason")}


def run(fmt: str, pieces: list[str], tools: list[dict[str, Any]] | None = None, *,
        reasoning_open: bool = False, finish_reason: str | None = None) -> Result:
    """Feed the pieces, finish, and fold the events into a Result, checking event order
    (``fmt`` "auto": the marker-triggered detection in front of the formats)."""
    parser = AutoParser(tools) if fmt == "auto" else make_parser(fmt, tools)
    if reasoning_open:
        parser.open_reasoning()
    res = Result()
    events = []
    for p in pieces:
        events.extend(parser.feed(p))
    parser.cut_off = finish_reason == "length"
    events.extend(parser.finish())
    open_calls: dict[int, Call] = {}
    for ev in events:
        if isinstance(ev, Text):
            assert ev.text, "empty Text event"
            res.content += ev.text
        elif isinstance(ev, Reasoning):
            res.reasoning += ev.text
        elif isinstance(ev, ToolCallStart):
            assert ev.index == len(res.calls), f"call index {ev.index} out of order"
            call = Call(ev.index, ev.name, ev.id)
            res.calls.append(call)
            open_calls[ev.index] = call
        elif isinstance(ev, ToolCallArgs):
            assert ev.index in open_calls, f"arguments for call {ev.index} that is not open"
            open_calls[ev.index].arguments += ev.fragment
        elif isinstance(ev, ToolCallEnd):
            call = open_calls.pop(ev.index)
            call.ended = True
            call.truncated = ev.truncated
        else:  # pragma: no cover
            raise AssertionError(f"unknown event {ev!r}")
    assert not open_calls, f"calls never ended: {list(open_calls)}"
    return res


def load_cases(fmt: str) -> list[dict[str, Any]]:
    return json.loads((FIXTURES / f"{fmt}.json").read_text())


def check_expected(res: Result, expected: dict[str, Any]) -> None:
    assert res.content == expected.get("content", ""), (res.content, expected.get("content"))
    assert res.reasoning == expected.get("reasoning", ""), (res.reasoning,
                                                            expected.get("reasoning"))
    exp_calls = expected.get("tool_calls", [])
    assert len(res.calls) == len(exp_calls), (res.calls, exp_calls)
    for got, exp in zip(res.calls, exp_calls, strict=True):
        assert got.name == exp["name"]
        if "id" in exp:
            assert got.id == exp["id"]
        if "arguments_raw" in exp:
            assert got.arguments == exp["arguments_raw"], (got.arguments, exp["arguments_raw"])
        else:
            assert json.loads(got.arguments) == exp["arguments"], (got.arguments,
                                                                  exp["arguments"])
        assert got.truncated == exp.get("truncated", False)


def splits(text: str, rng: random.Random, n_random: int = 500) -> list[list[str]]:
    """1-char pieces, every 2-way and 3-way split of short texts, random splits of long ones."""
    out = [list(text)]
    n = len(text)
    if n <= 120:
        out.extend([text[:i], text[i:]] for i in range(1, n))
    if n <= 40:
        out.extend([text[:i], text[i:j], text[j:]]
                   for i, j in itertools.combinations(range(1, n), 2))
    else:
        for _ in range(n_random):
            cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(1, 12))))
            bounds = [0, *cuts, n]
            out.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return out


def check_split_invariance(fmt: str, output: str, tools: list[dict[str, Any]] | None = None,
                           seed: int = 0, n_random: int = 500, **how: Any) -> Result:
    whole = run(fmt, [output], tools, **how)
    rng = random.Random(seed)
    for pieces in splits(output, rng, n_random):
        got = run(fmt, pieces, tools, **how)
        assert got.key() == whole.key(), f"split {pieces!r} differs: {got} vs {whole}"
    return whole
