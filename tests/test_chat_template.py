"""The embedded backend's prompt template, tool plan and stop scanner (pure, no model)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from toolmend.backends.chat_template import (
    StopScanner,
    ToolChoiceError,
    forced_prefill,
    plan_tools,
    render_builtin,
    response_format_schema,
)

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL2 = {"type": "function", "function": {"name": "get_time"}}


def test_render_puts_system_and_tools_in_the_first_user_turn() -> None:
    p = render_builtin([{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Weather in Oslo?"}], [TOOL])
    assert p.startswith("<start_of_turn>user\nBe brief.\n\n")
    assert "<tools>\n" + json.dumps(TOOL) + "\n</tools>" in p
    assert p.endswith("Weather in Oslo?<end_of_turn>\n<start_of_turn>model\n")


def test_render_history_with_calls_and_results() -> None:
    p = render_builtin([
        {"role": "user", "content": "Weather in Oslo and Lima?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "2", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}}]},
        {"role": "tool", "tool_call_id": "1", "content": "3 C"},
        {"role": "tool", "tool_call_id": "2", "content": [{"type": "text", "text": "18 C"}]},
    ])
    assert ('<start_of_turn>model\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Oslo"}}\n</tool_call>\n<tool_call>') in p
    # both results in one user turn
    assert ("<start_of_turn>user\n<tool_response>\n3 C\n</tool_response>\n<tool_response>\n"
            "18 C\n</tool_response><end_of_turn>\n<start_of_turn>model\n") in p


def test_tool_plans() -> None:
    assert plan_tools({}).mode == "none"
    assert plan_tools({"tools": [TOOL], "tool_choice": "none"}).mode == "none"
    assert plan_tools({"tools": [TOOL]}).mode == "auto"
    named = plan_tools({"tools": [TOOL, TOOL2], "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}}})
    assert (named.mode, named.name) == ("named", "get_weather")
    assert named.schema == TOOL["function"]["parameters"]
    assert forced_prefill(named) == '<tool_call>\n{"name": "get_weather", "arguments": '
    one = plan_tools({"tools": [TOOL2], "tool_choice": "required"})
    assert (one.mode, one.schema) == ("named", {"type": "object"})
    anyp = plan_tools({"tools": [TOOL, TOOL2], "tool_choice": "required"})
    assert anyp.mode == "any" and len(anyp.schema["anyOf"]) == 2
    with pytest.raises(ToolChoiceError):
        plan_tools({"tools": [TOOL], "tool_choice": {"type": "function",
                                                     "function": {"name": "nope"}}})


def test_response_format() -> None:
    assert response_format_schema({"response_format": {"type": "json_object"}}) == {
        "type": "object"}
    s = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert response_format_schema({"response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": s}}}) == s
    assert response_format_schema({"response_format": {"type": "text"}}) is None


def test_stop_scanner_holds_back_only_a_possible_stop() -> None:
    sc = StopScanner(["<end_of_turn>"])
    assert sc.feed("Hello <") == ("Hello ", False)
    assert sc.feed("b>") == ("<b>", False)
    assert sc.feed(" bye<end_of") == (" bye", False)
    assert sc.feed("_turn> junk") == ("", True)


@given(st.text(alphabet="ab<>xyz", max_size=40), st.lists(st.integers(1, 6), max_size=20))
def test_stop_scanner_split_invariance(text: str, cuts: list[int]) -> None:
    stops = ["<ab>", "zz"]
    whole = StopScanner(stops)
    out_whole, hit_whole = whole.feed(text)
    if not hit_whole:
        out_whole += whole.flush()
    sc = StopScanner(stops)
    out, hit, i = "", False, 0
    pieces = []
    for c in cuts:
        pieces.append(text[i:i + c])
        i += c
    pieces.append(text[i:])
    for piece in pieces:
        emitted, hit = sc.feed(piece)
        out += emitted
        if hit:
            break
    if not hit:
        out += sc.flush()
    assert (out, hit) == (out_whole, hit_whole)
