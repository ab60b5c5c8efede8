"""Marker parsers: Hermes, Qwen3-Coder, Llama 3 JSON, pythonic, Mistral, DeepSeek V3 / V3.1.

Every fixture case must give its expected result and the same result under every split of the
output; arbitrary text (rich in marker fragments) never raises and is split-invariant; text is
released at once except a possible marker prefix; and no parser keeps a growing buffer that it
would re-scan on every feed (the linear-work contract; timings are in bench/parsers_linear.py).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolmend.parsers.events import Text, ToolCallArgs, ToolCallEnd, ToolCallStart
from toolmend.parsers.formats import deepseek, hermes, make_parser, mistral, qwen3_coder

from .format_harness import check_expected, check_split_invariance, load_cases, options, run

FORMATS = ["hermes", "qwen3_coder", "llama3_json", "pythonic", "mistral", "deepseek_v3",
           "deepseek_v31"]

# markers (and pieces of call syntax) that arbitrary text is built from
_DS = [deepseek.CALLS_BEGIN, deepseek.CALL_BEGIN, deepseek.TOOL_SEP, deepseek.CALL_END,
       deepseek.CALLS_END, "<think>", "</think>"]
VOCAB: dict[str, list[str]] = {
    "hermes": ["<tool_call>", "</tool_call>", "<think>", "</think>", '{"name": "f", ',
               '"arguments": ', '"parameters": ', '{"a": "x"}', "{", "}", "[", "]", '"', "\\",
               ",", ":", "\n"],
    "qwen3_coder": ["<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=",
                    "</parameter>", ">", "\n", "get_weather", "days", "city", "3", "True",
                    "<think>", "</think>", "{", '"'],
    "llama3_json": ["<|python_tag|>", '{"name": "f", ', '"parameters": ', '"arguments": ', "{",
                    "}", "[", "]", '"', "\\", ";", ",", ":", " ", "\n", "null"],
    "pythonic": ["<|python_start|>", "<|python_end|>", "[", "]", "f", "g", "(", ")", "a=",
                 "b = ", "'", '"', "'''", '"""', ",", "1", "\\", "{", "}", "True", "None", " "],
    "mistral": ["[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]", "f", "abc123456",
                '{"name": "f", "arguments": ', "{", "}", "[", "]", '"', "\\", ",", ":", " "],
    "deepseek_v3": [*_DS, "function", "get_weather\n", "```json\n", "\n```", "{", "}", '"',
                    "\\", ","],
    "deepseek_v31": [*_DS, "get_weather", "{", "}", '"', "\\", ",", ":", "```"],
}

# typed parameters, so that arbitrary Qwen3-Coder values go through schema conversion too
_TOOLS = {"qwen3_coder": [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "True": {"type": ["boolean", "null"]},
                                     "3": {"type": "array"}}}}}]}

CASES = [(fmt, case) for fmt in FORMATS for case in load_cases(fmt)]
CASE_IDS = [f"{fmt}-{case['name']}" for fmt, case in CASES]


@pytest.mark.parametrize("fmt", FORMATS)
def test_fixture_file_covers_the_required_cases(fmt: str) -> None:
    cases = load_cases(fmt)
    assert len(cases) >= 10
    names = " ".join(c["name"] for c in cases)
    for needed in ("text_only", "one_call", "parallel", "unicode", "nested", "empty_arguments",
                   "marker_in_argument", "truncated", "malformed"):
        assert needed in names, f"{fmt}: no {needed} case"


@pytest.mark.parametrize(("fmt", "case"), CASES, ids=CASE_IDS)
def test_fixture_expected(fmt: str, case: dict[str, Any]) -> None:
    check_expected(run(fmt, [case["output"]], case.get("tools"), **options(case)),
                   case["expected"])


@pytest.mark.parametrize(("fmt", "case"), CASES, ids=CASE_IDS)
def test_fixture_split_invariance(fmt: str, case: dict[str, Any]) -> None:
    # 1-char pieces, every 2-way split (and 3-way for short outputs), 150 random splits of long
    # ones: with ~100 cases this keeps the file well under 20 s on a shared 2-core machine
    whole = check_split_invariance(fmt, case["output"], case.get("tools"), n_random=150,
                                   **options(case))
    check_expected(whole, case["expected"])


def test_unicode_arguments_are_kept_verbatim() -> None:
    """The model's characters reach the client as written: no \\uXXXX rewriting of ``ü``."""
    res = run("hermes", ['<tool_call>{"name": "f", "arguments": {"c": "Zürich 🌧️"}}</tool_call>'])
    assert res.calls[0].arguments == '{"c": "Zürich 🌧️"}'
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"c": {"type": "string"}}}}}]
    res = run("qwen3_coder", ["<tool_call>\n<function=f>\n<parameter=c>\nZürich 🌧️\n"
                              "</parameter>\n</function>\n</tool_call>"], tools)
    assert res.calls[0].arguments == '{"c": "Zürich 🌧️"}'
    res = run("pythonic", ["[f(c='Zürich 🌧️')]"])
    assert res.calls[0].arguments == '{"c": "Zürich 🌧️"}'


def test_deepseek_markers_need_the_exact_characters() -> None:
    ascii_lookalike = deepseek.CALLS_BEGIN.replace("｜", "|").replace("▁", "_")
    out = ascii_lookalike + '<|tool_call_begin|>f<|tool_sep|>{"a": 1}'
    assert run("deepseek_v31", [out]).key() == (out, "", ())


def test_mistral_call_id_is_kept() -> None:
    events = make_parser("mistral").feed('[TOOL_CALLS]f[CALL_ID]abc123456[ARGS]{"a": 1}')
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert starts == [ToolCallStart(0, "f", "abc123456")]


def test_arguments_stream_before_the_call_ends() -> None:
    """Argument fragments are emitted as they arrive, not only at the closing marker."""
    parser = make_parser("hermes")
    parser.feed('<tool_call>{"name": "f", "arguments": {"text": "')
    events = parser.feed("abc")
    assert events == [ToolCallArgs(0, "abc")]
    assert not any(isinstance(e, ToolCallEnd) for e in events)


# --- no added latency on text -------------------------------------------------------------------

_TEXT_MARKERS = {
    "hermes": (hermes.TOOL_CALL_START, hermes.TOOL_CALL_END, hermes.THINK_START),
    "qwen3_coder": (qwen3_coder.TOOL_CALL_START, qwen3_coder.FUNCTION_START,
                    qwen3_coder.TOOL_CALL_END, qwen3_coder.THINK_START),
    "mistral": (mistral.TOOL_CALLS, mistral.THINK_START),
    "deepseek_v3": (deepseek.CALLS_BEGIN, deepseek.CALL_BEGIN, deepseek.CALLS_END,
                    deepseek.CALL_END, deepseek.THINK_START),
}
_TEXTS = {
    "hermes": "a <b> <tool_ca x</tool <think x <",
    "qwen3_coder": "a <func <function <tool_c x <thin <",
    "mistral": "a [1] [TOOL_CALL x [THIN [T",
    "deepseek_v3": "a <｜tool▁call x <｜ <thin <｜tool▁calls▁en",
}


@pytest.mark.parametrize("fmt", sorted(_TEXT_MARKERS))
def test_text_is_held_only_while_it_could_be_a_marker(fmt: str) -> None:
    markers = _TEXT_MARKERS[fmt]
    parser = make_parser(fmt)
    fed = emitted = ""
    for ch in _TEXTS[fmt]:
        fed += ch
        emitted += "".join(e.text for e in parser.feed(ch) if isinstance(e, Text))
        held = fed[len(emitted):]
        assert fed.startswith(emitted)
        assert held == "" or any(m.startswith(held) and m != held for m in markers), held
    emitted += "".join(e.text for e in parser.finish() if isinstance(e, Text))
    assert emitted == fed


# --- linear work: bounded state between feeds ----------------------------------------------------

_LONG = 20_000
_STREAMS = {
    "hermes": ('<think>' + "r" * _LONG + '</think><tool_call>{"name": "f", "arguments": {"t": "'
               + "x" * _LONG + '", "n": [' + "1, " * (_LONG // 3) + "1]}}</tool_call>"
               + "y" * _LONG),
    "qwen3_coder": ("<tool_call>\n<function=f" + "n" * _LONG + ">\n<parameter=t>\n"
                    + "x<" * (_LONG // 2) + "\n</parameter>\n</function>\n</tool_call>"),
    "llama3_json": '{"name": "f", "parameters": {"t": "' + "x" * _LONG + '"}}; ' + "y" * _LONG,
    "pythonic": "[f(t='" + "x" * _LONG + "', n=[" + "1, " * (_LONG // 3) + "1])]",
    "mistral": '[TOOL_CALLS]f[ARGS]{"t": "' + "x[" * (_LONG // 2) + '"}' + "y[" * (_LONG // 2),
    "deepseek_v3": (deepseek.CALLS_BEGIN + deepseek.CALL_BEGIN + "function" + deepseek.TOOL_SEP
                    + "f\n```json\n" + '{"t": "' + "x<" * (_LONG // 2) + '"}\n```'
                    + deepseek.CALL_END + deepseek.CALLS_END),
    "deepseek_v31": (deepseek.CALLS_BEGIN + deepseek.CALL_BEGIN + "f" * _LONG + deepseek.TOOL_SEP
                     + '{"t": "' + "x<" * (_LONG // 2) + '"}' + deepseek.CALL_END),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_between_feeds_stays_bounded(fmt: str) -> None:
    """Fed one character at a time, a parser keeps at most a marker-length tail to look at
    again on the next feed, so per-feed work does not grow with what came before."""
    parser = make_parser(fmt)
    longest = 0
    for ch in _STREAMS[fmt]:
        parser.feed(ch)
        longest = max(longest, len(parser._buf))  # type: ignore[attr-defined]
    assert longest <= 32
    parser.finish()


# --- property tests ------------------------------------------------------------------------------


def _output(fmt: str) -> st.SearchStrategy[str]:
    vocab = VOCAB[fmt]
    pieces = st.one_of(
        st.sampled_from(vocab),
        st.sampled_from(vocab).flatmap(lambda m: st.integers(1, len(m)).map(lambda k: m[:k])),
        st.text(max_size=4),
    )
    return st.lists(pieces, max_size=30).map("".join)


def _cut(text: str, points: list[int]) -> list[str]:
    bounds = sorted({p % (len(text) + 1) for p in points} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_arbitrary_text_never_raises_and_is_split_invariant(fmt: str) -> None:
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(text=_output(fmt), points=st.lists(st.integers(0, 10_000), max_size=8))
    def prop(text: str, points: list[int]) -> None:
        tools = _TOOLS.get(fmt)
        whole = run(fmt, [text], tools)
        assert run(fmt, _cut(text, points), tools).key() == whole.key()
        assert run(fmt, list(text), tools).key() == whole.key()
        # nothing invented: plain text that carries no marker character comes back unchanged
        if not any(c in text for c in "<[{"):
            assert whole.content == text

    prop()
