"""The Responses encoder: literal events for a mended reply, the API's legal event order for any
split of the chat stream (hypothesis), incomplete and failed endings, and no crash on noise."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from toolmend.parsers.reply import ChatReplyDecoder, Finish, Text, ToolCallArgs, ToolCallStart
from toolmend.parsers.responses_emit import ResponsesEncoder
from toolmend.parsers.sse import SSEDecoder, SSEEvent


def _sse(*chunks: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def _delta(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


#: a mended chat stream: reasoning, text, two calls, a repair note, usage
REPLY = _sse(
    _delta({"role": "assistant", "reasoning_content": "Weather "}),
    _delta({"reasoning_content": "first, é."}),
    _delta({"content": "Checking "}),
    _delta({"content": "Oslo."}),
    _delta({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                            "function": {"name": "get_weather", "arguments": ""}}]}),
    _delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
    _delta({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}),
    _delta({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                            "function": {"name": "get_time", "arguments": "{}"}}]}),
    _delta({}, "tool_calls"),
    {"object": "chat.completion.chunk", "choices": [],
     "usage": {"prompt_tokens": 12, "completion_tokens": 30,
               "completion_tokens_details": {"reasoning_tokens": 4}}},
).replace(b"data: [DONE]", b": toolmend repaired call 0 get_weather\n\ndata: [DONE]")


def ids() -> Any:
    n = itertools.count()
    return lambda prefix: f"{prefix}_{next(n)}"


def encoder(*, stream: bool = True, summary: bool = False, sealed: bool = False
            ) -> ResponsesEncoder:
    return ResponsesEncoder({"id": "resp_1", "object": "response", "model": "m"},
                            new_id=ids(), stream=stream, summary=summary,
                            seal=(lambda text: f"sealed:{text}") if sealed else None)


def run(parts: list[bytes], enc: ResponsesEncoder) -> list[dict[str, Any]]:
    dec = ChatReplyDecoder()
    out = [enc.start()]
    for p in parts:
        out.append(enc.feed(dec.feed(p)))
    out.append(enc.feed(dec.finish()))
    out.append(enc.finish())
    return events(b"".join(out))


def events(raw: bytes) -> list[dict[str, Any]]:
    sse = SSEDecoder()
    got = []
    for ev in sse.feed(raw) + sse.finish():
        if isinstance(ev, SSEEvent):
            doc = orjson.loads(ev.data)
            assert ev.event == doc["type"]  # the event: line names the data's type
            got.append(doc)
    return got


FINAL_OUTPUT = [
    {"type": "reasoning", "id": "rs_0", "summary": [],
     "content": [{"type": "reasoning_text", "text": "Weather first, é."}]},
    {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
     "content": [{"type": "output_text", "text": "Checking Oslo.", "annotations": [],
                  "logprobs": []}]},
    {"type": "function_call", "id": "fc_2", "call_id": "call_a", "name": "get_weather",
     "arguments": '{"city": "Oslo"}', "status": "completed"},
    {"type": "function_call", "id": "fc_3", "call_id": "call_b", "name": "get_time",
     "arguments": "{}", "status": "completed"},
]
USAGE = {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0},
         "output_tokens": 30, "output_tokens_details": {"reasoning_tokens": 4},
         "total_tokens": 42}


def test_the_literal_event_sequence() -> None:
    got = run([REPLY], encoder())
    assert [(e["type"], e.get("output_index"), e.get("delta")) for e in got] == [
        ("response.created", None, None),
        ("response.in_progress", None, None),
        ("response.output_item.added", 0, None),
        ("response.content_part.added", 0, None),
        ("response.reasoning_text.delta", 0, "Weather "),
        ("response.reasoning_text.delta", 0, "first, é."),
        ("response.reasoning_text.done", 0, None),
        ("response.content_part.done", 0, None),
        ("response.output_item.done", 0, None),
        ("response.output_item.added", 1, None),
        ("response.content_part.added", 1, None),
        ("response.output_text.delta", 1, "Checking "),
        ("response.output_text.delta", 1, "Oslo."),
        ("response.output_text.done", 1, None),
        ("response.content_part.done", 1, None),
        ("response.output_item.done", 1, None),
        ("response.output_item.added", 2, None),
        ("response.function_call_arguments.delta", 2, '{"city": '),
        ("response.function_call_arguments.delta", 2, '"Oslo"}'),
        ("response.function_call_arguments.done", 2, None),
        ("response.output_item.done", 2, None),
        ("response.output_item.added", 3, None),
        ("response.function_call_arguments.delta", 3, "{}"),
        ("response.function_call_arguments.done", 3, None),
        ("response.output_item.done", 3, None),
        ("response.completed", None, None),
    ]
    assert [e["sequence_number"] for e in got] == list(range(26))
    assert got[0]["response"] == {"id": "resp_1", "object": "response", "model": "m",
                                  "status": "in_progress", "error": None,
                                  "incomplete_details": None, "output": [], "usage": None}
    assert got[16]["item"] == {"type": "function_call", "id": "fc_2", "call_id": "call_a",
                               "name": "get_weather", "arguments": "",
                               "status": "in_progress"}
    assert got[19]["arguments"] == '{"city": "Oslo"}' and got[19]["name"] == "get_weather"
    final = got[-1]["response"]
    assert final["status"] == "completed" and final["incomplete_details"] is None
    assert final["output"] == FINAL_OUTPUT
    assert final["usage"] == USAGE


def test_notes_are_sse_comments_and_kept() -> None:
    enc = encoder()
    raw = enc.start() + enc.feed(ChatReplyDecoder().feed(REPLY))
    assert b": toolmend repaired call 0 get_weather\n\n" in raw
    assert enc.notes == ["repaired call 0 get_weather"]


def test_summary_mode_and_sealed_reasoning() -> None:
    got = run([REPLY], encoder(summary=True, sealed=True))
    assert [e["type"] for e in got[2:9]] == [
        "response.output_item.added", "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta", "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done", "response.reasoning_summary_part.done",
        "response.output_item.done"]
    assert got[8]["item"] == {"type": "reasoning", "id": "rs_0",
                              "summary": [{"type": "summary_text", "text": "Weather first, é."}],
                              "encrypted_content": "sealed:Weather first, é."}


def test_whole_reply_builds_the_same_object_and_no_bytes() -> None:
    enc = encoder(stream=False)
    dec = ChatReplyDecoder()
    assert enc.start() == b""
    assert enc.feed(dec.feed(REPLY)) == b"" and enc.feed(dec.finish()) == b""
    assert enc.finish() == b""
    doc = enc.response()
    assert doc["status"] == "completed" and doc["output"] == FINAL_OUTPUT
    assert doc["usage"] == USAGE


def test_a_reply_cut_by_the_output_cap_is_incomplete() -> None:
    reply = _sse(_delta({"content": "Once upon"}), _delta({"content": " a"}, "length"))
    got = run([reply], encoder())
    assert got[-1]["type"] == "response.incomplete"
    assert got[-1]["response"]["status"] == "incomplete"
    assert got[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert got[-1]["response"]["output"][0]["content"][0]["text"] == "Once upon a"


def test_failure_mid_item_ends_with_response_failed_and_nothing_after() -> None:
    enc = encoder()
    raw = enc.start() + enc.feed([Text("Let me "), ToolCallStart(0, "f", "c1"),
                                  ToolCallArgs(0, "{")])
    raw += enc.fail("invalid_tool_call", "tool call f has invalid arguments")
    assert enc.finish() == b"" and enc.fail("x", "y") == b""  # the end is written once
    got = events(raw)
    assert [e["type"] for e in got[-3:]] == ["response.output_item.added",
                                             "response.function_call_arguments.delta",
                                             "response.failed"]
    failed = got[-1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "invalid_tool_call",
                               "message": "tool call f has invalid arguments"}
    assert failed["output"] == [
        {"type": "message", "id": "msg_0", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "Let me ", "annotations": [],
                      "logprobs": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f",
         "arguments": "{", "status": "incomplete"}]


def test_an_error_event_in_the_stream_fails_the_response() -> None:
    reply = _sse(_delta({"content": "Hi"}),
                 {"error": {"message": "upstream went away", "code": "upstream_error"}})
    got = run([reply], encoder())
    assert got[-1]["type"] == "response.failed"
    assert got[-1]["response"]["error"] == {"code": "upstream_error",
                                            "message": "upstream went away"}


# --- the API's legal order, for any split ------------------------------------------------------

def check_legal_order(got: list[dict[str, Any]]) -> None:
    """The order the Responses API defines, checked as a state machine: created, in_progress,
    then items one at a time (added, their part and deltas, done), then one terminal event."""
    types = [e["type"] for e in got]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete", "response.failed")
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    open_item: dict[str, Any] | None = None
    index = 0
    texts: dict[str, list[str]] = {}
    for e in got[2:-1]:
        t = e["type"]
        if t == "response.output_item.added":
            assert open_item is None and e["output_index"] == index
            open_item = e["item"]
            texts[open_item["id"]] = []
            continue
        assert open_item is not None, t
        assert e["output_index"] == index
        if t == "response.output_item.done":
            assert e["item"]["id"] == open_item["id"]
            open_item = None
            index += 1
        elif t.endswith(".delta"):
            assert e["item_id"] == open_item["id"]
            texts[open_item["id"]].append(e["delta"])
        elif t.endswith(".done") and "text" in e:
            assert e["text"] == "".join(texts[open_item["id"]])
        elif t == "response.function_call_arguments.done":
            assert e["arguments"] == "".join(texts[open_item["id"]])
    assert open_item is None


def _cuts(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    for a, b in itertools.pairwise(bounds):
        yield data[a:b]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(REPLY)), max_size=40),
       st.booleans())
def test_any_split_gives_the_same_response_in_legal_order(cuts: list[int],
                                                          summary: bool) -> None:
    whole = run([REPLY], encoder(summary=summary))
    got = run(list(_cuts(REPLY, cuts)), encoder(summary=summary))
    check_legal_order(got)
    assert got[-1]["response"] == whole[-1]["response"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=12))
def test_noise_never_crashes_and_still_ends_legally(parts: list[bytes]) -> None:
    got = run([b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\n", *parts],
              encoder())
    check_legal_order(got)


def test_a_finish_event_alone_completes_an_empty_response() -> None:
    enc = encoder()
    got = events(enc.start() + enc.feed([Finish("stop")]) + enc.finish())
    assert [e["type"] for e in got] == ["response.created", "response.in_progress",
                                        "response.completed"]
    assert got[-1]["response"]["output"] == []
