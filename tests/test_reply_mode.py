"""The stream pipeline in reply mode: the events a non-chat front gets straight from the mender.

A front that speaks another API (Ollama, Anthropic Messages, Responses) hands the pipeline its
``ChatReplyDecoder`` and gets reply events, never SSE bytes. These tests write the events down
literally for a mended Hermes call, an upstream error, invalid UTF-8 and a usage chunk, and check
that any split of the upstream bytes gives the events the SSE output decodes to.
"""

from __future__ import annotations

import itertools

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolmend.parsers.mender import ChatMender
from toolmend.parsers.reply import (
    ChatReplyDecoder,
    Finish,
    Note,
    Reasoning,
    Text,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
    Usage,
    reply_size,
)
from toolmend.parsers.stream import INVALID_UTF8_NOTE, StreamPipeline, UpstreamStreamError

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _chunk(delta: dict, finish: str | None = None) -> bytes:
    return b"data: " + orjson.dumps({"object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"


#: a vLLM-style stream whose call leaked into content as Hermes text, split across deltas
HERMES = b"".join([
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": "Looking it up. "}),
    _chunk({"content": "<tool_"}),
    _chunk({"content": 'call>{"name": "get_weather", '}),
    _chunk({"content": '"arguments": {"city": "Zürich"}}</tool_call>'}),
    _chunk({}, "stop"),
    b'data: {"object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":9,'
    b'"completion_tokens":21,"total_tokens":30}}\n\n',
    b"data: [DONE]\n\n",
])


def _reply_mode(pieces: list[bytes], mender: ChatMender | None = None,
                include_usage: bool = True) -> list:
    dec = ChatReplyDecoder()
    p = StreamPipeline(include_usage, mender, reply=dec)
    out: list = []
    for piece in pieces:
        got = p.feed(piece)
        assert isinstance(got, list)  # reply mode never hands out bytes
        out += got
    out += p.finish()
    return out + dec.finish()


def _sse_mode(pieces: list[bytes], mender: ChatMender | None = None,
              include_usage: bool = True) -> list:
    p = StreamPipeline(include_usage, mender)
    raw = b"".join(p.feed(piece) for piece in pieces) + p.finish()
    dec = ChatReplyDecoder()
    return dec.feed(raw) + dec.finish()


def _merge_text(events: list) -> list:
    out: list = []
    for e in events:
        if out and type(e) in (Text, Reasoning) and type(out[-1]) is type(e):
            out[-1] = type(e)(out[-1].text + e.text)
        else:
            out.append(e)
    return out


def _without_ids(events: list) -> list:
    """Call ids are generated per call: everything else is compared exactly."""
    return [ToolCallStart(e.index, e.name) if type(e) is ToolCallStart else e for e in events]


def test_a_mended_hermes_call_reaches_the_front_as_literal_events() -> None:
    events = _reply_mode([HERMES], ChatMender("hermes", TOOLS))
    assert _without_ids(_merge_text(events)) == [
        Text("Looking it up. "),
        ToolCallStart(0, "get_weather"),
        ToolCallArgs(0, '{"city": "Zürich"}'),
        Note("repaired finish_reason 'stop' -> 'tool_calls'"),  # before the chunk it explains
        ToolCallEnd(0),
        Finish("tool_calls"),
        Usage(prompt_tokens=9, completion_tokens=21),
    ]
    start = next(e for e in events if type(e) is ToolCallStart)
    assert start.id and start.id.startswith("call_")


def test_plain_text_without_a_mender_is_decoded_once_per_event() -> None:
    raw = _chunk({"content": "Hello"}) + _chunk({"content": " world"}) + _chunk({}, "stop") \
        + b"data: [DONE]\n\n"
    assert _reply_mode([raw]) == [Text("Hello"), Text(" world"), Finish("stop")]


def test_usage_the_client_did_not_ask_for_is_dropped_as_in_sse_mode() -> None:
    raw = _chunk({"content": "Hi"}, "stop") + (
        b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
        b"data: [DONE]\n\n")
    assert _reply_mode([raw], include_usage=False) == [Text("Hi"), Finish("stop")]


def test_invalid_utf8_is_replaced_and_noted() -> None:
    raw = b'data: {"choices":[{"index":0,"delta":{"content":"caf\xff"}}]}\n\n' \
        + _chunk({}, "stop") + b"data: [DONE]\n\n"
    assert _reply_mode([raw]) == [Note(INVALID_UTF8_NOTE), Text("caf\ufffd"), Finish("stop")]


def test_an_upstream_error_keeps_what_came_before_it_as_events() -> None:
    raw = _chunk({"content": "partial"}) + b'data: {"error": {"message": "CUDA OOM"}}\n\n'
    p = StreamPipeline(True, None, reply=ChatReplyDecoder())
    with pytest.raises(UpstreamStreamError) as info:
        p.feed(_chunk({"content": "first "}))
        p.feed(raw)
    assert info.value.pending == [Text("partial")]
    assert p.feed(_chunk({"content": "late"})) == []  # stopped: nothing more goes out


def test_a_retry_replacement_goes_out_as_events() -> None:
    """What a validation retry sends in place of a held call goes through ``emit``: in reply
    mode as events (its note first), with no ``[DONE]`` to decode."""
    dec = ChatReplyDecoder()
    p = StreamPipeline(True, ChatMender("hermes", TOOLS), reply=dec)
    out = p.emit([{"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_r", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        "finish_reason": "tool_calls"}]}], ["retried get_weather"], done=True)
    assert out == [Note("retried get_weather"), ToolCallStart(0, "get_weather", "call_r"),
                   ToolCallArgs(0, '{"city": "Oslo"}'), ToolCallEnd(0), Finish("tool_calls")]


def test_reply_size_counts_what_a_whole_reply_gathers() -> None:
    assert reply_size([Text("abc"), Reasoning("de"), ToolCallStart(0, "fn", "x"),
                       ToolCallArgs(0, "{}"), ToolCallEnd(0), Finish("stop")]) == 9


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(HERMES)), max_size=30),
       st.booleans())
def test_any_split_gives_the_events_the_sse_output_decodes_to(cuts: list[int],
                                                              mended: bool) -> None:
    bounds = [0, *sorted(cuts), len(HERMES)]
    pieces = [HERMES[a:b] for a, b in itertools.pairwise(bounds)]
    direct = _reply_mode(pieces, ChatMender("hermes", TOOLS) if mended else None)
    via_sse = _sse_mode(pieces, ChatMender("hermes", TOOLS) if mended else None)
    assert _without_ids(_merge_text(direct)) == _without_ids(_merge_text(via_sse))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_reply_mode(data: bytes) -> None:
    p = StreamPipeline(True, ChatMender("hermes", TOOLS), reply=ChatReplyDecoder())
    try:
        assert isinstance(p.feed(b"data: " + data + b"\n\n"), list)
        assert isinstance(p.finish(), list)
    except UpstreamStreamError as e:
        assert isinstance(e.pending, list)


# --- chunk objects from a backend's wire decoder (Ollama's NDJSON) ----------------------------

OLLAMA = b"".join(orjson.dumps(line) + b"\n" for line in [
    {"model": "qwen3", "message": {"role": "assistant", "content": "", "thinking": "Oslo? "}},
    {"model": "qwen3", "message": {"role": "assistant", "content": "Checking."}},
    {"model": "qwen3", "message": {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}},
    {"model": "qwen3", "message": {"role": "assistant", "content": ""}, "done": True,
     "done_reason": "stop", "prompt_eval_count": 7, "eval_count": 12},
])


def _ollama(lines: list[bytes], fmt: str | None = None, *, as_sse: bool = False,
            include_usage: bool = True) -> list:
    """The events a front gets from Ollama's NDJSON: as chunk objects (``NDJSONChunks``,
    ``feed_chunks``) or, ``as_sse``, encoded as SSE and decoded by the pipeline. A call the
    mender refuses ends the list with what went before and the error's code."""
    from toolmend.parsers.ollama import NDJSONChunks, NDJSONToSSE

    wire = (NDJSONToSSE if as_sse else NDJSONChunks)("chatcmpl-1", 1, id_prefix="call_k")
    dec = ChatReplyDecoder()
    p = StreamPipeline(include_usage, ChatMender(fmt, TOOLS, model_hint="qwen3"), reply=dec)
    out: list = []
    try:
        for ln in [*lines, None]:
            got = wire.finish() if ln is None else wire.feed(ln)
            if got:
                out += p.feed(got) if as_sse else p.feed_chunks(got)
        out += p.finish()
    except UpstreamStreamError as e:
        return out + list(e.pending) + [orjson.loads(e.body)["error"]["code"]]
    return out + dec.finish()


def test_ollama_ndjson_reaches_the_front_as_literal_events_without_sse() -> None:
    assert _ollama([OLLAMA]) == [
        Reasoning("Oslo? "),
        Text("Checking."),
        ToolCallStart(0, "get_weather", "call_k0"),
        ToolCallArgs(0, '{"city":"Oslo"}'),
        ToolCallEnd(0),
        Finish("tool_calls"),
        Usage(prompt_tokens=7, completion_tokens=12),
    ]


def test_chunk_objects_follow_the_usage_rule_and_end_on_an_error() -> None:
    assert Usage(prompt_tokens=7, completion_tokens=12) not in _ollama(
        [OLLAMA], include_usage=False)
    p = StreamPipeline(True, None, reply=ChatReplyDecoder())
    with pytest.raises(UpstreamStreamError) as info:
        p.feed_chunks([{"choices": [{"index": 0, "delta": {"content": "so far"}}]},
                       {"error": {"message": "model unloaded"}}])
    assert info.value.pending == [Text("so far")]
    assert p.feed_chunks([{"choices": [{"index": 0, "delta": {"content": "x"}}]}]) == []


def test_chunk_objects_in_sse_mode_are_the_events_encoded() -> None:
    p = StreamPipeline(True, None)
    raw = p.feed_chunks([{"choices": [{"index": 0, "delta": {"content": "hi"},
                                       "finish_reason": "stop"}]}])
    assert raw == b'data: {"choices":[{"index":0,"delta":{"content":"hi"},' \
        b'"finish_reason":"stop"}]}\n\n'
    assert p.stats.first_token and p.stats.finish_reasons == ["stop"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(OLLAMA)), max_size=30))
def test_any_split_of_ndjson_gives_the_same_events(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(OLLAMA)]
    events = _ollama([OLLAMA[a:b] for a, b in itertools.pairwise(bounds)])
    assert events == _ollama([OLLAMA])


PIECES = ["<tool_call>", "</tool_call>", "<think>", "</think>", '{"name": "get_weather", ',
          '"arguments": {"city": "Oslo"}}', "<", "[", "]", "{", "}", '"', "\\", "Hello ",
          "wörld ", "\n", "", "🌍"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PIECES), st.sampled_from(["content", "thinking"])),
                max_size=25),
       st.sampled_from([None, "hermes", "minimax_m3"]))
def test_chunk_objects_skip_the_mender_exactly_when_sse_events_do(
        pieces: list[tuple[str, str]], fmt: str | None) -> None:
    """Plain text skips the mender in both forms (``wants`` on the raw event, ``wants_content``
    on the object); whatever the text, the events are the same."""
    lines = [orjson.dumps({"model": "qwen3", "message": {"role": "assistant", "content": "",
                                                         key: text}, "done": False}) + b"\n"
             for text, key in pieces]
    lines.append(orjson.dumps({"model": "qwen3", "message": {"role": "assistant",
                                                             "content": ""},
                               "done": True, "done_reason": "stop"}) + b"\n")
    assert _without_ids(_merge_text(_ollama(lines, fmt))) == \
        _without_ids(_merge_text(_ollama(lines, fmt, as_sse=True)))
