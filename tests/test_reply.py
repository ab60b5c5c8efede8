"""The reply model's chat decoder: literal event sequences, and the same events for any split."""

from __future__ import annotations

import itertools

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from toolmend.parsers.reply import (
    ChatReplyDecoder,
    Error,
    Finish,
    Note,
    Reasoning,
    Text,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
    Usage,
    chat_reply_events,
)


def _sse(*chunks: dict) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def _delta(delta: dict, finish: str | None = None) -> dict:
    return {"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


REPLY = _sse(
    _delta({"role": "assistant", "reasoning_content": "Let me look."}),
    _delta({"content": "Checking é "}),
    _delta({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                            "function": {"name": "get_weather", "arguments": ""}}]}),
    _delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
    _delta({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
    _delta({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                            "function": {"name": "get_time", "arguments": "{}"}}]}),
    _delta({}, "tool_calls"),
    {"object": "chat.completion.chunk", "choices": [],
     "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}},
).replace(b"data: [DONE]", b": toolmend repaired arguments of get_weather\n\ndata: [DONE]")

EXPECTED = [
    Reasoning("Let me look."),
    Text("Checking é "),
    ToolCallStart(0, "get_weather", "call_a"),
    ToolCallArgs(0, '{"city": '),
    ToolCallArgs(0, '"Paris"}'),
    ToolCallEnd(0),
    ToolCallStart(1, "get_time", "call_b"),
    ToolCallArgs(1, "{}"),
    ToolCallEnd(1),
    Finish("tool_calls"),
    Usage(prompt_tokens=12, completion_tokens=30),
    Note("repaired arguments of get_weather"),
]


def _decode(parts: list[bytes]) -> list:
    dec = ChatReplyDecoder()
    out: list = []
    for p in parts:
        out += dec.feed(p)
    return out + dec.finish()


def test_a_mended_stream_decodes_to_the_literal_events() -> None:
    assert _decode([REPLY]) == EXPECTED


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(REPLY)), max_size=40))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(REPLY)]
    events = _decode([REPLY[a:b] for a, b in itertools.pairwise(bounds)])
    # text may arrive in more pieces; joined, and with every other event in place, it is equal
    assert _merge_text(events) == _merge_text(EXPECTED)


def _merge_text(events: list) -> list:
    out: list = []
    for e in events:
        if out and type(e) in (Text, Reasoning) and type(out[-1]) is type(e):
            out[-1] = type(e)(out[-1].text + e.text)
        else:
            out.append(e)
    return out


def test_a_name_split_over_chunks_starts_the_call_once_whole() -> None:
    reply = _sse(
        _delta({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "get_"}}]}),
        _delta({"tool_calls": [{"index": 0, "function": {"name": "weather"}}]}),
        _delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":"Oslo"}'}}]}),
        _delta({}, "tool_calls"))
    assert _decode([reply]) == [ToolCallStart(0, "get_weather", "c1"),
                                ToolCallArgs(0, '{"city":"Oslo"}'), ToolCallEnd(0),
                                Finish("tool_calls")]


def test_an_in_stream_error_ends_the_events() -> None:
    reply = _sse(
        _delta({"content": "Hi"}),
        _delta({"tool_calls": [{"index": 0, "id": "c1",
                                "function": {"name": "f", "arguments": "{"}}]}),
        {"error": {"message": "tool call f has invalid arguments", "type": "invalid_tool_call",
                   "code": "invalid_tool_call", "status": 502}},
        _delta({"content": "never"}, "stop"))
    assert _decode([reply]) == [
        Text("Hi"), ToolCallStart(0, "f", "c1"), ToolCallArgs(0, "{"), ToolCallEnd(0),
        Error("tool call f has invalid arguments", code="invalid_tool_call",
              type="invalid_tool_call", status=502)]


def test_a_stream_cut_without_finish_is_closed_by_finish() -> None:
    reply = b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"x",' \
            b'"function":{"name":"f","arguments":"{}"}}]}}]}\n\n'
    assert _decode([reply]) == [ToolCallStart(0, "f", "x"), ToolCallArgs(0, "{}"),
                                ToolCallEnd(0), Finish("tool_calls")]


def test_a_whole_reply_object_gives_the_same_events() -> None:
    reply = {"id": "r", "object": "chat.completion", "choices": [{
        "index": 0, "finish_reason": "tool_calls",
        "message": {"role": "assistant", "content": "On it.", "reasoning_content": "hmm",
                    "tool_calls": [{"id": "call_1", "type": "function", "function": {
                        "name": "get_time", "arguments": '{"tz":"UTC"}'}}]}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7,
                  "completion_tokens_details": {"reasoning_tokens": 2}}}
    assert chat_reply_events(reply) == [
        Reasoning("hmm"), Text("On it."), ToolCallStart(0, "get_time", "call_1"),
        ToolCallArgs(0, '{"tz":"UTC"}'), ToolCallEnd(0), Finish("tool_calls"),
        Usage(prompt_tokens=5, completion_tokens=7, reasoning_tokens=2)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_crash(data: bytes) -> None:
    events = _decode([data])
    assert isinstance(events[-1], Finish | Error)


def test_a_delta_that_is_not_an_object_is_an_error() -> None:
    reply = _sse(_delta({"content": "hi"})) .replace(b"data: [DONE]\n\n", b"") + \
        b'data: {"choices":[{"index":0,"delta":"oops"}]}\n\n'
    assert _decode([reply]) == [
        Text("hi"), Error("upstream sent a malformed chunk: its delta is not an object",
                          code="upstream_bad_response", type="upstream_error", status=502)]
