"""Responses requests as chat requests: literal translations, refusals naming the field, and no
crash on any JSON (hypothesis)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolmend.parsers.responses_wire import ResponsesRequestError, to_chat

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def opener(value: str) -> str | None:
    return value[len("good:"):] if value.startswith("good:") else None


def test_string_input_with_instructions() -> None:
    tr = to_chat({"model": "m", "instructions": "Be brief.", "input": "Hi"})
    assert tr.body == {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Hi"}]}
    assert tr.ignored_tools == [] and tr.ignored_items == [] and tr.dropped_reasoning == 0


def test_a_codex_turn_folds_into_chat_messages() -> None:
    """What Codex sends on its second request: developer messages, user context, the
    reasoning, text and call of the first reply (reasoning sealed), then the call's output."""
    body = {
        "model": "m",
        "input": [
            {"type": "message", "role": "developer",
             "content": [{"type": "input_text", "text": "You are Codex."}]},
            {"type": "message", "role": "developer",
             "content": [{"type": "input_text", "text": "Skills: none."}]},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "<env/>"}]},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "Read token.txt"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [],
             "encrypted_content": "good:I should cat it."},
            {"type": "message", "role": "assistant", "id": "msg_1",
             "content": [{"type": "output_text", "text": "Reading."}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_1",
             "name": "exec_command", "arguments": '{"cmd": "cat token.txt"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "abc123"},
        ],
        "tools": [{"type": "function", "name": "exec_command", "description": "Run",
                   "strict": False, "parameters": WEATHER},
                  {"type": "namespace", "name": "multi_agent_v1", "tools": []},
                  {"type": "web_search", "external_web_access": False}],
        "tool_choice": "auto", "parallel_tool_calls": True,
        "reasoning": {"summary": "auto"}, "store": False,
        "include": ["reasoning.encrypted_content"], "prompt_cache_key": "thread-1",
        "client_metadata": {"session_id": "thread-1"},
    }
    tr = to_chat(body, open_reasoning=opener)
    assert tr.body == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "You are Codex.\n\nSkills: none."},
            {"role": "user", "content": "<env/>"},
            {"role": "user", "content": "Read token.txt"},
            {"role": "assistant", "content": "Reading.",
             "reasoning_content": "I should cat it.",
             "tool_calls": [{"id": "call_1", "type": "function",
                             "function": {"name": "exec_command",
                                          "arguments": '{"cmd": "cat token.txt"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "abc123"},
        ],
        "tools": [{"type": "function", "function": {"name": "exec_command",
                                                     "description": "Run",
                                                     "parameters": WEATHER}}],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
    }
    assert tr.ignored_tools == ["namespace", "web_search"]
    assert tr.tools == [body["tools"][0]]


def test_foreign_or_altered_encrypted_reasoning_is_dropped_and_counted() -> None:
    tr = to_chat({"input": [
        {"role": "user", "content": "Hi"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "visible"}],
         "encrypted_content": "gAAAAB-openai-blob"},
        {"type": "reasoning", "summary": [], "encrypted_content": "good:kept"},
        {"role": "assistant", "content": "Hello"},
    ]}, open_reasoning=opener)
    assert tr.body["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "reasoning_content": "kept"}]
    assert tr.dropped_reasoning == 1


def test_reasoning_without_encrypted_content_carries_its_text() -> None:
    tr = to_chat({"input": [
        {"role": "user", "content": "Hi"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "short"}],
         "content": [{"type": "reasoning_text", "text": "the whole thought"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "then"}]},
        {"type": "function_call", "call_id": "c2", "name": "f", "arguments": {"a": 1}},
    ]})
    assert tr.body["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "reasoning_content": "the whole thought",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "assistant", "content": None, "reasoning_content": "then",
         "tool_calls": [{"id": "c2", "type": "function",
                         "function": {"name": "f", "arguments": '{"a":1}'}}]}]


def test_history_comes_before_input_and_instructions_first() -> None:
    history = [{"type": "message", "role": "user", "content": "Weather?"},
               {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"}]
    tr = to_chat({"instructions": "Sys", "input": [
        {"type": "function_call_output", "call_id": "c1",
         "output": [{"type": "input_text", "text": "sunny"}]}]}, history=history)
    assert tr.body["messages"] == [
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]


def test_images_and_text_parts_of_a_user_message() -> None:
    tr = to_chat({"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"}]}]})
    assert tr.body["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                            "detail": "low"}}]}]


def test_sampling_reasoning_and_structured_output() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    tr = to_chat({"input": "x", "max_output_tokens": 50, "temperature": 0.2, "top_p": 0.9,
                  "user": "u1", "reasoning": {"effort": "minimal", "summary": "auto"},
                  "text": {"format": {"type": "json_schema", "name": "answer",
                                      "schema": schema, "strict": True}},
                  "metadata": {"k": "v"}, "store": True, "include": [],
                  "prompt_cache_key": "p", "truncation": "disabled"})
    assert tr.body == {"messages": [{"role": "user", "content": "x"}], "max_tokens": 50,
                       "temperature": 0.2, "top_p": 0.9, "user": "u1",
                       "reasoning_effort": "low",
                       "response_format": {"type": "json_schema", "json_schema": {
                           "name": "answer", "schema": schema, "strict": True}}}
    assert to_chat({"input": "x", "reasoning": {"effort": "none"},
                    "text": {"format": {"type": "text"}}}).body == {
        "messages": [{"role": "user", "content": "x"}]}
    assert to_chat({"input": "x", "text": {"format": {"type": "json_object"}}}
                   ).body["response_format"] == {"type": "json_object"}


def test_tool_choice_forms() -> None:
    tools = [{"type": "function", "name": "a"}, {"type": "function", "name": "b"},
             {"type": "file_search"}]
    named = to_chat({"input": "x", "tools": tools,
                     "tool_choice": {"type": "function", "name": "b"}}).body
    assert named["tool_choice"] == {"type": "function", "function": {"name": "b"}}
    allowed = to_chat({"input": "x", "tools": tools, "tool_choice": {
        "type": "allowed_tools", "mode": "required", "tools": [{"type": "function",
                                                                "name": "a"}]}}).body
    assert allowed["tools"] == [{"type": "function", "function": {"name": "a"}}]
    assert allowed["tool_choice"] == "required"
    hosted = to_chat({"input": "x", "tools": tools, "tool_choice": {"type": "file_search"}})
    assert hosted.body["tool_choice"] == "auto" and hosted.ignored_tools == ["file_search"]
    only_hosted = to_chat({"input": "x", "tools": [{"type": "web_search"}],
                           "tool_choice": "required", "parallel_tool_calls": False})
    assert only_hosted.body == {"messages": [{"role": "user", "content": "x"}]}
    assert only_hosted.ignored_tools == ["web_search"]


def test_items_of_unsupported_tools_are_left_out_and_listed() -> None:
    tr = to_chat({"input": [
        {"role": "user", "content": "x"},
        {"type": "web_search_call", "id": "ws_1", "status": "completed"},
        {"type": "custom_tool_call", "call_id": "c", "name": "apply_patch", "input": "..."},
        {"type": "custom_tool_call_output", "call_id": "c", "output": "ok"},
        {"role": "assistant", "content": "done"}]})
    assert tr.body["messages"] == [{"role": "user", "content": "x"},
                                   {"role": "assistant", "content": "done"}]
    assert tr.ignored_items == ["web_search_call", "custom_tool_call", "custom_tool_call_output"]


@pytest.mark.parametrize(("body", "param", "words"), [
    ({}, "input", "'input' is required"),
    ({"input": 3}, "input", "string or an array"),
    ({"input": ["x"]}, "input[0]", "must be an object"),
    ({"input": [{"role": "critic", "content": "x"}]}, "input[0].role", "not 'critic'"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id", "required"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 3}]},
     "input[0].output", "string or an array"),
    ({"input": [{"type": "function_call_output", "call_id": "c",
                 "output": [{"type": "input_image", "image_url": "u"}]}]},
     "input[0].output[0]", "only text parts"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f1"}]}]},
     "input[0].content[0].image_url", "file_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f1"}]}]},
     "input[0].content[0].type", "not 'input_file'"),
    ({"input": [{"role": "assistant", "content": [{"type": "input_image",
                                                   "image_url": "u"}]}]},
     "input[0].content[0].type", "only accepted in user messages"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", "item_reference"),
    ({"input": [{"type": "frobnicate"}]}, "input[0].type", "not 'frobnicate'"),
    ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name", "required"),
    ({"input": "x", "tools": [{"type": "function", "name": "a", "parameters": []}]},
     "tools[0].parameters", "JSON Schema object"),
    ({"input": "x", "tools": [{"type": "function", "name": "a"}],
      "tool_choice": {"type": "function", "name": "b"}}, "tool_choice.name", "'b'"),
    ({"input": "x", "tool_choice": "sometimes"}, "tool_choice", "auto, none, required"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "positive integer"),
    ({"input": "x", "temperature": "hot"}, "temperature", "number"),
    ({"input": "x", "reasoning": {"effort": "extreme"}}, "reasoning.effort", "one of"),
    ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format.schema",
     "JSON Schema"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type", "json_schema"),
    ({"input": "x", "background": True}, "background", "not supported"),
    ({"input": "x", "conversation": "conv_1"}, "conversation", "previous_response_id"),
    ({"input": "x", "prompt": {"id": "pmpt_1"}}, "prompt", "not supported"),
    ({"input": "x", "instructions": ["a"]}, "instructions", "string"),
    ({"input": "x", "model": 7}, "model", "string"),
])
def test_bad_requests_name_the_field(body: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(ResponsesRequestError) as e:
        to_chat(body)
    assert e.value.param == param
    assert words in str(e.value)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "user",
                       "assistant", "developer", "input_text", "input_image", "function"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "role", "content", "text", "call_id", "name", "arguments",
                         "output", "summary", "encrypted_content", "tools", "image_url",
                         "parameters", "format", "schema", "effort", "mode"]), inner,
        max_size=5),
    max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["input", "instructions", "tools", "tool_choice",
                                        "reasoning", "text", "max_output_tokens", "model",
                                        "parallel_tool_calls", "temperature"]), _json,
                       max_size=6))
def test_any_json_translates_or_is_refused_by_name(body: dict[str, Any]) -> None:
    try:
        tr = to_chat(body, open_reasoning=opener)
    except ResponsesRequestError as e:
        assert e.param is not None and str(e)
        return
    assert tr.body["messages"]
    assert all(m["role"] in ("system", "user", "assistant", "tool") for m in tr.body["messages"])
