"""Where the format parsers read a reply the way vLLM's tool parsers and SGLang's detectors do.

The fixture files hold one case per behaviour (``fixtures/formats/*.json``, checked with every
split by test_formats_a/b and end to end by test_e2e_formats). Here: the rules around them that
a fixture alone does not pin (what decides that a bracketed block is prose, which parameters
read ``null`` as null), and property tests with random splits over text that mixes prose with
each changed format's markers, so that the new decisions (a list after prose, a tag after
prose, a name after ``[TOOL_CALLS]``, a value closed by the next parameter) are split-invariant
and never invent a call.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolmend.parsers.events import Text, ToolCallStart
from toolmend.parsers.formats import deepseek, make_parser
from toolmend.parsers.formats.glm45 import GLM_VALUES, container_from_text

from .format_harness import run


def tool(name: str, props: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": props or {}}}}


WEATHER = tool("get_weather", {"city": {"type": "string"}, "days": {"type": "integer"}})


# --- pythonic ------------------------------------------------------------------------------------

def test_pythonic_list_after_prose_must_name_declared_tools() -> None:
    """After prose, a list naming a tool the request did not declare is prose; the same list
    opening the reply is the model's call, judged later as an unknown tool."""
    text = "Compare [get_time(tz='UTC')] with this."
    assert run("pythonic", [text], [WEATHER]).key() == (text, "", ())
    res = run("pythonic", ["[get_time(tz='UTC')] then prose."], [WEATHER])
    assert [(c.name, c.arguments) for c in res.calls] == [("get_time", '{"tz": "UTC"}')]
    assert res.content == " then prose."


def test_pythonic_list_after_prose_needs_keyword_arguments() -> None:
    assert run("pythonic", ["See [get_weather('Oslo')]."]).key() == (
        "See [get_weather('Oslo')].", "", ())
    # at the start of the reply it is a call, whose raw arguments go to the repair stage
    res = run("pythonic", ["[get_weather('Oslo')]"])
    assert [(c.name, c.arguments) for c in res.calls] == [("get_weather", "'Oslo'")]


def test_pythonic_call_waits_for_the_end_of_its_list() -> None:
    """Nothing of a list goes out before its ``]``: until then it may still be prose."""
    parser = make_parser("pythonic", [WEATHER])
    assert parser.feed("Hi. ") == [Text("Hi. ")]
    assert parser.feed('[get_weather(city="Oslo"), get_weather(city="Bergen")') == []
    events = parser.feed("]")
    assert [e.name for e in events if isinstance(e, ToolCallStart)] == ["get_weather"] * 2


def test_pythonic_cut_off_list_is_a_call_only_where_the_reply_opened_it() -> None:
    assert [c.truncated for c in run("pythonic", ['[get_weather(city="Os']).calls] == [True]
    wrapped = run("pythonic", ['Sure. <|python_start|>[get_weather(city="Os'])
    assert wrapped.content == "Sure. " and [c.truncated for c in wrapped.calls] == [True]
    assert run("pythonic", ['Sure. [get_weather(city="Os']).key() == (
        'Sure. [get_weather(city="Os', "", ())


def test_pythonic_special_tokens_never_reach_the_content() -> None:
    res = run("pythonic", ["<|python_start|>no list here<|python_end|> done<|python_end|>"])
    assert res.key() == ("no list here done", "", ())


# --- GLM / MiniMax values ------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "value"), [
    ('["a", "b"]', ["a", "b"]),
    ('[\\"a\\", \\"b\\"]', ["a", "b"]),
    ('"[\\"a\\", \\"b\\"]"', ["a", "b"]),
    ("['a', 'b']", ["a", "b"]),
    ('{\\"k\\": [1, {\\"n\\": null}]}', {"k": [1, {"n": None}]}),
    ("not json", None),
    ('"just a string"', None),
    ("[1,", None),
])
def test_container_from_text(text: str, value: Any) -> None:
    assert container_from_text(text, {"array", "object"}) == value


def test_container_must_be_the_declared_kind() -> None:
    assert container_from_text('{"a": 1}', {"array"}) is None
    assert container_from_text('["a"]', {"object"}) is None


@pytest.mark.parametrize(("raw", "prop", "json_text"), [
    ("null", {"type": ["string", "null"]}, "null"),
    ("null", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, "null"),
    ("null", {"type": "string"}, '"null"'),  # not nullable: the word itself
    ("None", {"type": ["string", "null"]}, '"None"'),
    ('[\\"x\\"]', {"type": "array"}, '["x"]'),
    ('[\\"x\\"]', {"type": ["array", "string"]}, '"[\\\\\\"x\\\\\\"]"'),  # may be a string
    ("[1,", {"type": "array"}, '"[1,"'),  # not JSON at all: left for validation to report
    ("42", {"type": "integer"}, "42"),
])
def test_glm_value_typing(raw: str, prop: dict[str, Any], json_text: str) -> None:
    assert GLM_VALUES.complete(raw, prop) == json_text


# --- Mistral -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "tools", "content", "names"), [
    ("[TOOL_CALLS]get_weather", [WEATHER], "", ["get_weather"]),  # cut off after a real name
    ("[TOOL_CALLS]get_weather", None, "get_weather", []),
    ("[TOOL_CALLS]Sure", [WEATHER], "Sure", []),
    ("[TOOL_CALLS] ok, then.", [WEATHER], " ok, then.", []),
    ("[TOOL_CALLS]get_weather[TOOL_CALLS]get_time[ARGS]{}", None, "",
     ["get_weather", "get_time"]),
    ("[TOOL_CALLS]" + "x" * 200 + "[ARGS]{}", None, "x" * 200 + "{}", []),
])
def test_mistral_head(text: str, tools: Any, content: str, names: list[str]) -> None:
    res = run("mistral", [text], tools)
    assert res.content == content
    assert [c.name for c in res.calls] == names


# --- property tests: random splits over prose mixed with markers ---------------------------------

_PROSE = ["Let me check. ", "the ", "a, b", "(x)", "[1]", "Sure", " ", "\n", "ok", "=", "'"]
VOCAB: dict[str, list[str]] = {
    "pythonic": [*_PROSE, "[", "]", "(", ")", "get_weather", "f(", "city=", '"Oslo"', "1",
                 ", ", "<|python_start|>", "<|python_end|>", "'''", "x = y"],
    "llama3_json": [*_PROSE, "<|python_tag|>", '{"name": "get_weather", ', '"parameters": ',
                    '{"city": "Oslo"}', "}", ";", "{", '"'],
    "kimi_k2": [*_PROSE, "<think>", "</think>", "<|tool_calls_section_begin|>",
                "<|tool_calls_section_end|>", "<|tool_call_begin|>", "functions.get_weather:0",
                "<|tool_call_argument_begin|>", '{"city": "Oslo"}', "<|tool_call_end|>",
                "<|tool_call_section_end|>"],
    "deepseek_v31": [*_PROSE, deepseek.CALLS_BEGIN, deepseek.CALL_BEGIN, deepseek.TOOL_SEP,
                     deepseek.CALL_END, deepseek.CALLS_END, *deepseek.STRAY_TOKENS,
                     "<think>", "</think>", "get_weather", '{"city": "Oslo"}'],
    "qwen3_coder": [*_PROSE, "<tool_call>", "</tool_call>", "<function=get_weather>",
                    "</function>", "<parameter=city>", "<parameter=days>", "</parameter>", "3",
                    "\n", ">"],
    "glm45": [*_PROSE, "<tool_call>", "</tool_call>", "get_weather", "<arg_key>", "city",
              "days", "</arg_key>", "<arg_value>", "</arg_value>", '[\\"a\\"]', "null", "\n"],
    "minimax_m2": [*_PROSE, "<minimax:tool_call>", "</minimax:tool_call>",
                   '<invoke name="get_weather">', "</invoke>", '<parameter name="city">',
                   "</parameter>", "</param", "null", "<think>", "</think>"],
    "mistral": [*_PROSE, "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "get_weather", "abc123456",
                '{"city": "Oslo"}', "[", "{", "}", "[THINK]", "[/THINK]"],
}
TOOLS = [tool("get_weather", {"city": {"type": "string"}, "days": {"type": ["integer", "null"]},
                              "tags": {"type": "array"}})]


def _text(fmt: str) -> st.SearchStrategy[str]:
    vocab = VOCAB[fmt]
    atom = st.one_of(st.sampled_from(vocab), st.text(max_size=3),
                     st.sampled_from(vocab).flatmap(
                         lambda m: st.integers(1, len(m)).map(lambda k: m[:k])))
    return st.lists(atom, max_size=30).map("".join)


def _cut(text: str, points: list[int]) -> list[str]:
    bounds = sorted({p % (len(text) + 1) for p in points} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("fmt", sorted(VOCAB))
def test_prose_and_markers_are_split_invariant(fmt: str) -> None:
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(text=_text(fmt), points=st.lists(st.integers(0, 10_000), max_size=8))
    def prop(text: str, points: list[int]) -> None:
        whole = run(fmt, [text], TOOLS)
        assert run(fmt, _cut(text, points), TOOLS).key() == whole.key()
        assert run(fmt, list(text), TOOLS).key() == whole.key()
        if fmt in ("glm45", "minimax_m2"):  # these build the JSON themselves: always valid
            for call in whole.calls:
                if not call.truncated:
                    json.loads(call.arguments)

    prop()


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=_text("pythonic"))
def test_pythonic_after_prose_invents_no_call(text: str) -> None:
    """After prose, a call comes only from a closed list (or one the model opened with its
    ``<|python_start|>`` token): without either, none at all, and the text comes back whole,
    the ``<|python_end|>`` token aside."""
    body = text.replace("]", "")
    while "<|python_start|>" in body:
        body = body.replace("<|python_start|>", "")
    prose = "Well, " + body
    res = run("pythonic", [prose], TOOLS)
    assert res.calls == []
    assert res.content == prose.replace("<|python_end|>", "")


# --- Inkling's message header -------------------------------------------------------------------

def test_inkling_header_is_held_only_while_it_can_be_a_name() -> None:
    """The reply starts in a message header (the template wrote ``<|message_model|>``): a run of
    name characters waits for the token after it, and the mender's fast path must not overtake
    it meanwhile; anything else makes it text at once."""
    parser = make_parser("inkling", [WEATHER])
    assert parser.feed("get_weather") == []
    assert not parser.at_rest
    assert parser.feed(" is a word") == [Text("get_weather"), Text(" is a word")]
    assert parser.at_rest


def test_inkling_header_before_a_block_is_metadata() -> None:
    res = run("inkling", ["get_weather", "<|content_invoke_tool_json|>",
                          '{"name": "get_weather", "args": {"city": "Oslo"}}', "<|end_message|>",
                          "<|message_model|>note", "<|content_text|>Done.<|end_message|>"],
              [WEATHER])
    assert res.content == "Done."
    assert [(c.name, c.arguments) for c in res.calls] == [("get_weather", '{"city": "Oslo"}')]
    # a header the reply ends in, or one a block's end follows, was text after all
    assert run("inkling", ["Sure"]).key() == ("Sure", "", ())
    assert run("inkling", ["Sure<|end_message|>"]).key() == ("Sure", "", ())
