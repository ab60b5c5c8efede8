"""Fuzzing the sans-I/O core: hostile bytes in, no unhandled exception out, splits don't matter.

Targets: the SSE decoder, every registered marker parser, the ChatMender fed structured
``tool_calls`` deltas, and ``repair_arguments``. Inputs are generated around real model output
(the format fixtures, mutated: cut, duplicated, spliced, truncated) as well as from scratch, so
the parsers spend their time near their markers rather than in plain text.

The CI sample is small (``TOOLMEND_FUZZ_EXAMPLES``, default 200 per target); ``bench/fuzz.py``
runs the same targets with enough examples for a six-figure total and prints the counts.
"""

from __future__ import annotations

import functools
import json
import os
import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolmend.parsers.formats import FORMATS
from toolmend.parsers.mender import ChatMender, StreamError
from toolmend.parsers.repair import repair_arguments
from toolmend.parsers.sse import SSEComment, SSEDecoder, SSEEvent, SSEProtocolError

from .format_harness import FIXTURES, run

EXAMPLES = int(os.environ.get("TOOLMEND_FUZZ_EXAMPLES", "200"))
#: inputs run per target in this process (read by bench/fuzz.py)
COUNTS: Counter[str] = Counter()
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def cut(text: Any, points: list[int]) -> list[Any]:
    """Split ``text`` at ``points`` (taken modulo its length); empty pieces are kept."""
    n = len(text)
    bounds = sorted({p % (n + 1) for p in points})
    out, prev = [], 0
    for b in bounds:
        out.append(text[prev:b])
        prev = b
    out.append(text[prev:])
    return out


points_st = st.lists(st.integers(0, 1 << 16), max_size=12)


# --- SSE decoder ---------------------------------------------------------------------------------

def _decode(pieces: list[bytes]) -> list[tuple[Any, ...]] | str:
    dec = SSEDecoder(max_line_bytes=4096)
    items: list[SSEEvent | SSEComment] = []
    try:
        for p in pieces:
            items.extend(dec.feed(p))
        items.extend(dec.finish())
    except SSEProtocolError:
        return "line too long"
    return [(type(i).__name__, i.data, i.event, i.id, i.retry) if isinstance(i, SSEEvent)
            else ("comment", i.text) for i in items]


sse_atoms = st.sampled_from([b"data:", b"data: ", b"event: x", b"id: 7", b"retry: 10", b":",
                             b"\n", b"\r", b"\r\n", b"\n\n", b"[DONE]", b'{"a":1}', b"\xc3\xa9",
                             b"\xf0\x9f", b"\x00", b" ", b"id:\x00"])
sse_input = st.one_of(st.binary(max_size=600),
                      st.lists(st.one_of(sse_atoms, st.binary(max_size=8)), max_size=80)
                      .map(b"".join))


@FUZZ
@given(data=sse_input, points=points_st)
def test_sse_decoder(data: bytes, points: list[int]) -> None:
    COUNTS["sse"] += 1
    whole = _decode([data])
    assert _decode(cut(data, points)) == whole
    assert _decode([data[i:i + 1] for i in range(len(data))]) == whole


# --- marker parsers ----------------------------------------------------------------------------

@functools.cache
def fixture_outputs(fmt: str) -> list[tuple[str, list[dict[str, Any]] | None]]:
    """The model outputs (and tools) of a format's fixture cases, the seeds of its fuzzing: a
    format without them fails here rather than being fuzzed from nothing."""
    path = FIXTURES / f"{fmt}.json"
    assert path.is_file(), f"{fmt}: no fixture file at {path} to fuzz from"
    cases = json.loads(path.read_text())
    assert cases, f"{fmt}: {path} holds no cases to fuzz from"
    return [(c["output"], c.get("tools")) for c in cases]


NOISE = ["<", ">", "</", "{", "}", "[", "]", '"', "\\", "\\u00", ":", ",", "\n", " ", "é", "🌍",
         "<|", "|>", "```", "null", "true", "1e9", "\ud800"[:0] + "\u2028"]


@st.composite
def mutated_output(draw: st.DrawFn, fmt: str) -> tuple[str, list[dict[str, Any]] | None]:
    """A fixture's model output, mutated a few times (or pure noise built from its pieces)."""
    outputs = fixture_outputs(fmt)
    text, tools = outputs[draw(st.integers(0, len(outputs) - 1))]
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    for _ in range(draw(st.integers(0, 4))):
        n = len(text)
        op = rng.randrange(6)
        i, j = sorted((rng.randint(0, n), rng.randint(0, n)))
        if op == 0:
            text = text[:i] + text[j:]  # delete a span
        elif op == 1:
            text = text[:j] + text[i:j] + text[j:]  # duplicate a span
        elif op == 2:
            text = text[:i] + rng.choice(NOISE) + text[i:]  # insert a hostile token
        elif op == 3:
            text = text[:i]  # truncate
        elif op == 4:
            other = rng.choice(outputs)[0]
            a, b = sorted((rng.randint(0, len(other)), rng.randint(0, len(other))))
            text = text[:i] + other[a:b] + text[j:]  # splice in another case
        else:
            text = text + text  # two replies back to back
    if draw(st.booleans()):
        text += draw(st.text(max_size=20))
    return text, tools


def _format_target(fmt: str) -> Any:
    fixture_outputs(fmt)  # no seeds is a failure of its own, before any fuzzing

    @FUZZ
    @given(case=mutated_output(fmt), points=points_st)
    def target(case: tuple[str, list[dict[str, Any]] | None], points: list[int]) -> None:
        COUNTS[f"format:{fmt}"] += 1
        text, tools = case
        whole = run(fmt, [text], tools)
        assert run(fmt, cut(text, points), tools).key() == whole.key()
        assert run(fmt, [*list(text[:200]), text[200:]], tools).key() == whole.key()

    return target


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_marker_parser(fmt: str) -> None:
    _format_target(fmt)()


# --- the mender on structured deltas -------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
         for n in ("get_weather", "search", "run")]
args_st = st.one_of(
    st.dictionaries(st.text(max_size=6), st.one_of(st.integers(), st.text(max_size=12),
                                                   st.booleans(), st.none()), max_size=4)
    .map(lambda d: json.dumps(d, ensure_ascii=False)),
    st.text(alphabet='{}[]":,\\ abn0123é', max_size=40))
call_st = st.tuples(st.sampled_from(["get_weather", "search", "run", "nope"]), args_st,
                    st.one_of(st.none(), st.text(alphabet="abc_0123", min_size=1, max_size=10)))


def _chunks(content: str, calls: list[tuple[str, str, str | None]], points: list[int],
            quirks: set[str], finish: str | None) -> list[dict[str, Any]]:
    def ch(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {"id": "c", "model": "qwen3", "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

    out = [ch({"role": "assistant", "content": ""})]
    out += [ch({"content": p}) for p in cut(content, points) if p]
    for i, (name, args, cid) in enumerate(calls):
        index = 0 if "index_zero" in quirks else i
        if quirks:
            # Servers that put every call at index 0 (Ollama) or repeat the name on every
            # fragment (llama-cpp-python) tell calls apart by id. Without ids, indexes or
            # boundaries two calls to one tool are ambiguous by construction, not a bug.
            cid = f"{cid or 'call'}_{i}"
        first: dict[str, Any] = {"index": index, "type": "function", "function": {"name": name}}
        if cid is not None:
            first["id"] = cid
        out.append(ch({"tool_calls": [first]}))
        for p in cut(args, points):
            if p:
                frag: dict[str, Any] = {"index": index, "function": {"arguments": p}}
                if "repeat_name" in quirks:
                    frag["function"]["name"] = name
                    frag["id"] = cid
                out.append(ch({"tool_calls": [frag]}))
    if finish is not None:
        out.append(ch({}, finish))
    return out


def _fold(chunks: list[dict[str, Any]]) -> tuple[str, list[tuple[str, str]], str | None]:
    content = ""
    calls: dict[int, list[str]] = {}
    reason = None
    for c in chunks:
        for choice in c.get("choices") or ():
            d = choice.get("delta") or {}
            content += d.get("content") or ""
            for tc in d.get("tool_calls") or ():
                slot = calls.setdefault(tc["index"], ["", ""])
                fn = tc.get("function") or {}
                slot[0] += fn.get("name") or ""
                slot[1] += fn.get("arguments") or ""
            reason = choice.get("finish_reason") or reason
    return content, [(n, a) for _, (n, a) in sorted(calls.items())], reason


def _mend(chunks: list[dict[str, Any]], mode: str) -> Any:
    m = ChatMender("hermes", TOOLS, mode=mode)
    out: list[dict[str, Any]] = []
    try:
        for c in chunks:
            out += m.feed(c)[0]
        out += m.finish()[0]
    except StreamError as e:  # a refused call is a clean, explicit outcome
        return ("error", e.body["error"].get("code"))
    return _fold(out)


@FUZZ
@given(content=st.text(alphabet="ab <>/{}\"tool_cal\n", max_size=60),
       calls=st.lists(call_st, max_size=3), p1=points_st, p2=points_st,
       quirks=st.sets(st.sampled_from(["index_zero", "repeat_name"])),
       finish=st.sampled_from([None, "tool_calls", "stop", "length"]),
       mode=st.sampled_from(["buffered", "incremental"]))
def test_mender_structured_deltas(content: str, calls: list[tuple[str, str, str | None]],
                                  p1: list[int], p2: list[int], quirks: set[str],
                                  finish: str | None, mode: str) -> None:
    COUNTS["mender:structured"] += 1
    a = _mend(_chunks(content, calls, p1, quirks, finish), mode)
    b = _mend(_chunks(content, calls, p2, quirks, finish), mode)
    assert a == b
    if not isinstance(a, tuple) or a[:1] != ("error",):
        for _, arguments in a[1]:
            if mode == "buffered":
                assert isinstance(json.loads(arguments), dict)  # well-formed or refused


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10))
json_any = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=3),
                                                      st.dictionaries(st.text(max_size=8), c,
                                                                      max_size=3)),
                        max_leaves=12)
delta_st = st.fixed_dictionaries({}, optional={
    "role": st.one_of(st.just("assistant"), json_any), "content": st.one_of(st.text(), json_any),
    "reasoning_content": json_any, "function_call": json_any,
    "tool_calls": st.one_of(json_any, st.lists(st.fixed_dictionaries({}, optional={
        "index": st.one_of(st.integers(-2, 4), json_any), "id": json_any, "type": json_any,
        "function": st.one_of(json_any, st.fixed_dictionaries({}, optional={
            "name": st.one_of(st.sampled_from(["run", "search"]), json_any),
            "arguments": st.one_of(st.text(max_size=20), json_any)}))}), max_size=3))})
chunk_st = st.fixed_dictionaries({"choices": st.one_of(
    st.lists(st.fixed_dictionaries({"delta": delta_st}, optional={
        "finish_reason": st.one_of(st.none(), st.sampled_from(["stop", "tool_calls"]),
                                   json_any), "index": json_any}), max_size=2),
    json_any)}, optional={"model": json_any, "usage": json_any, "id": json_any})


@FUZZ
@given(chunks=st.lists(chunk_st, max_size=8), mode=st.sampled_from(["buffered", "incremental"]))
def test_mender_hostile_chunks(chunks: list[dict[str, Any]], mode: str) -> None:
    """Whatever JSON a broken backend sends, the mender raises nothing but StreamError."""
    COUNTS["mender:hostile"] += 1
    m = ChatMender(None, TOOLS, mode=mode)
    try:
        for c in chunks:
            m.feed(c)
        m.finish()
    except StreamError:
        pass


# --- argument repair -----------------------------------------------------------------------------

@FUZZ
@given(raw=st.one_of(st.text(max_size=200), args_st,
                     st.tuples(args_st, st.integers(0, 200)).map(lambda t: t[0][:t[1]])),
       truncated=st.booleans())
def test_repair_arguments(raw: str, truncated: bool) -> None:
    COUNTS["repair"] += 1
    r = repair_arguments(raw, truncated)
    if r.ok:
        assert isinstance(r.value, dict)
    else:
        assert r.error
    assert repair_arguments(raw, truncated) == r  # deterministic


@FUZZ
@given(value=st.dictionaries(st.text(max_size=8), json_any, max_size=5),
       keep=st.integers(0, 10_000))
def test_repair_of_truncated_object(value: dict[str, Any], keep: int) -> None:
    """A cut-off object is either closed into an object or refused, never something else."""
    COUNTS["repair:truncated"] += 1
    text = json.dumps(value, ensure_ascii=False)
    r = repair_arguments(text[:keep % (len(text) + 1)], truncated=True)
    assert not r.ok or isinstance(r.value, dict)
    if keep % (len(text) + 1) == len(text):
        assert r.ok and r.text == text
