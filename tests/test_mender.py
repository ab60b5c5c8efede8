"""The mender: each real server's tool-call bug in, one clean OpenAI tool call out."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolmend.parsers.mender import ChatMender, StreamError, mend_message
from toolmend.parsers.repair import repair_arguments
from toolmend.parsers.sse import SSEDecoder, SSEEvent
from toolmend.parsers.stream import StreamPipeline
from toolmend.sim.dialects import make_dialect
from toolmend.sim.scenario import Scenario

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"]}}}]


def accumulate(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """What an OpenAI-SDK-style accumulator builds from chunks (and checks on the way)."""
    content, reasoning = [], []
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for c in chunks:
        for ch in c.get("choices") or ():
            d = ch.get("delta") or {}
            content.append(d.get("content") or "")
            reasoning.append(d.get("reasoning_content") or "")
            for tc in d.get("tool_calls") or ():
                i = tc["index"]
                if i not in calls:
                    assert tc.get("id") and tc.get("type") == "function", tc
                    assert tc["function"].get("arguments") == "", tc
                    calls[i] = {"id": tc["id"], "name": tc["function"]["name"], "arguments": ""}
                else:
                    assert "name" not in tc.get("function", {}), "name repeated"
                    assert "id" not in tc, "id repeated"
                calls[i]["arguments"] += tc["function"].get("arguments") or ""
            if ch.get("finish_reason"):
                finish = ch["finish_reason"]
    assert sorted(calls) == list(range(len(calls))), "indexes not 0..n-1"
    return {"content": "".join(content), "reasoning": "".join(reasoning),
            "calls": [calls[i] for i in sorted(calls)], "finish": finish}


def run_deltas(deltas: list[dict[str, Any]], finish: str | None = "stop", fmt: str | None =
               "hermes", mode: str = "buffered") -> tuple[dict[str, Any], ChatMender]:
    m = ChatMender(fmt, TOOLS, mode=mode)
    out: list[dict[str, Any]] = []
    for d in deltas:
        out += m.feed({"id": "x", "model": "m", "choices": [{"index": 0, "delta": d,
                                                              "finish_reason": None}]})[0]
    out += m.feed({"id": "x", "model": "m", "choices": [{"index": 0, "delta": {},
                                                          "finish_reason": finish}]})[0]
    return accumulate(out), m


def args_of(result: dict[str, Any], i: int = 0) -> Any:
    return orjson.loads(result["calls"][i]["arguments"])


def test_markers_leaked_into_content_and_split_across_deltas() -> None:
    pieces = ["Sure. <tool", "_call>\n{\"name\": \"get_weather\", \"argu", "ments\": {\"city\": ",
              "\"Oslo\"}}\n</tool", "_call>"]
    res, m = run_deltas([{"content": p} for p in pieces])
    assert res["content"].strip() == "Sure."
    assert [c["name"] for c in res["calls"]] == ["get_weather"]
    assert args_of(res) == {"city": "Oslo"}
    assert res["calls"][0]["id"].startswith("call_")
    assert res["finish"] == "tool_calls"
    assert m.tool_names == ["get_weather"]


def test_vllm_duplicated_argument_tail_is_dropped_and_reported() -> None:
    res, m = run_deltas([
        {"tool_calls": [{"index": 0, "id": "chatcmpl-tool-1", "type": "function",
                         "function": {"name": "get_weather"}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": "}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "\"Oslo\"}"}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "\"Oslo\"}"}}]},
    ], finish="tool_calls")
    assert args_of(res) == {"city": "Oslo"}
    assert res["calls"][0]["id"] == "chatcmpl-tool-1"
    assert [r["kind"] for r in m.repairs] == ["text_after_value"]


def test_ollama_parallel_calls_all_at_index_zero() -> None:
    res, _ = run_deltas([{"tool_calls": [
        {"id": "call_a", "index": 0, "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}},
        {"id": "call_b", "index": 0, "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\":\"Bergen\"}"}}]}],
        finish="tool_calls")
    assert [c["id"] for c in res["calls"]] == ["call_a", "call_b"]
    assert [args_of(res, i)["city"] for i in (0, 1)] == ["Oslo", "Bergen"]


def test_llama_cpp_python_repeats_name_and_sends_function_call() -> None:
    pieces = ["{\"city\"", ": \"Oslo\"", ", \"days\": 3}"]
    res, _ = run_deltas([{"role": "assistant", "content": None,
                          "function_call": {"name": "get_weather", "arguments": p},
                          "tool_calls": [{"index": 0, "id": "call__0_abc", "type": "function",
                                          "function": {"name": "get_weather", "arguments": p}}]}
                         for p in pieces], finish="tool_calls")
    assert len(res["calls"]) == 1
    assert res["calls"][0]["name"] == "get_weather"
    assert args_of(res) == {"city": "Oslo", "days": 3}


def test_legacy_function_call_alone_becomes_a_tool_call() -> None:
    res, _ = run_deltas([{"function_call": {"name": "get_weather", "arguments": "{\"city\":"}},
                         {"function_call": {"arguments": "\"Rome\"}"}}], finish="function_call")
    assert args_of(res) == {"city": "Rome"}
    assert res["finish"] == "tool_calls"


def test_truncated_by_max_tokens_is_closed_and_keeps_length() -> None:
    res, m = run_deltas([{"content": "<tool_call>{\"name\": \"get_weather\", \"arguments\": "
                                     "{\"city\": \"Tromsø"}], finish="length")
    assert args_of(res) == {"city": "Tromsø"}
    assert res["finish"] == "length"
    assert m.repairs[0]["kind"] == "truncated_closed"


def test_llama_server_cut_call_with_open_brace() -> None:
    res, _ = run_deltas([{"tool_calls": [{"index": 0, "id": "abcDEF", "type": "function",
                                          "function": {"name": "get_weather",
                                                       "arguments": "{\""}}]}], finish="length")
    assert args_of(res) == {}
    assert res["finish"] == "length"


def test_named_tool_choice_finishing_with_stop_becomes_tool_calls() -> None:
    res, _ = run_deltas([{"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                          "function": {"name": "get_weather",
                                                       "arguments": "{\"city\":\"Oslo\"}"}}]}],
                        finish="stop")
    assert res["finish"] == "tool_calls"


def test_markup_leaked_into_name_is_cleaned() -> None:
    res, m = run_deltas([{"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                          "function": {"name": "<tool_call>get_weather",
                                                       "arguments": "{\"city\":\"Oslo\"}"}}]}])
    assert res["calls"][0]["name"] == "get_weather"
    assert m.repairs[0]["kind"] == "name_markup"


@pytest.mark.parametrize(("raw", "kind", "expected"), [
    ("{'city': 'Oslo'}", "single_quotes", {"city": "Oslo"}),
    ('{"a": True, "b": None}', "python_literals", {"a": True, "b": None}),
    ('{"city": "Oslo",}', "trailing_comma", {"city": "Oslo"}),
    ('```json\n{"city": "Oslo"}\n```', "markdown_fence", {"city": "Oslo"}),
    ('"{\\"city\\": \\"Oslo\\"}"', "double_encoded", {"city": "Oslo"}),
    ('{"city": "Oslo"} and then some', "text_after_value", {"city": "Oslo"}),
    ('{"note": "line\nbreak"}', "control_characters", {"note": "line\nbreak"}),
    ("{city: Paris}}", "unbalanced_brackets", {"city": "Paris"}),
    ("", "empty_arguments", {}),
])
def test_argument_repairs(raw: str, kind: str, expected: Any) -> None:
    r = repair_arguments(raw)
    assert r.ok, r
    assert orjson.loads(r.text) == expected
    assert r.repairs[0].kind == kind


def test_unrepairable_arguments_are_not_invented() -> None:
    r = repair_arguments("the weather in Oslo please")
    assert not r.ok and r.error
    assert not repair_arguments("[1, 2]").ok  # valid JSON, but not an object


def test_valid_arguments_are_untouched_byte_for_byte() -> None:
    raw = '{"q": "caf\u00e9 \\u00e9 \\n", "n": 1.50}'
    r = repair_arguments(raw)
    assert r.ok and r.text == raw and not r.repairs


def test_incremental_mode_streams_fragments_and_closes_truncation() -> None:
    res, _ = run_deltas([{"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                          "function": {"name": "get_weather",
                                                       "arguments": "{\"city\": "}}]},
                         {"tool_calls": [{"index": 0, "function": {"arguments": "\"Bo"}}]}],
                        finish="length", mode="incremental")
    assert args_of(res) == {"city": "Bo"}


def test_plain_text_is_forwarded_without_parsing() -> None:
    m = ChatMender("hermes", TOOLS)
    first = b'{"id":"x","model":"m","choices":[{"index":0,"delta":{"content":"Hello"}}]}'
    assert m.wants(first)  # the first content always goes through the parser
    m.feed(orjson.loads(first))
    assert not m.wants(b'{"id":"x","choices":[{"index":0,"delta":{"content":" world"}}]}')
    assert m.wants(b'{"id":"x","choices":[{"index":0,"delta":{"content":" <tool"}}]}')
    assert m.wants(b'{"id":"x","choices":[{"index":0,"delta":{"content":"\\u003ct"}}]}')
    assert m.wants(b'{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}')


@pytest.mark.parametrize("fmt", [None, "minimax_m3"])
def test_a_marker_character_in_the_envelope_does_not_make_plain_text_parsed(fmt: str | None
                                                                            ) -> None:
    """MiniMax-M3's marker starts with ``]``, which every chunk's envelope holds after the
    content (``}]}``): the search for markers stays inside the content string."""
    m = ChatMender(fmt, TOOLS)
    m.feed(orjson.loads(b'{"id":"x","model":"m","choices":[{"index":0,"delta":'
                        b'{"content":"Hello"},"finish_reason":null}]}'))
    assert b"]" in m._triggers
    assert not m.wants(b'{"id":"x","choices":[{"index":0,"delta":{"content":" world"},'
                       b'"finish_reason":null}]}')
    assert not m.wants(b'{"choices": [{"delta": {"content": " world"}}]}')  # spaced JSON
    assert m.wants(b'{"id":"x","choices":[{"index":0,"delta":{"content":" ]<]mini"}}]}')
    # a backslash in the string: where it ends is not certain, so the whole event is searched
    assert m.wants(b'{"id":"x","choices":[{"index":0,"delta":{"content":"a \\"b"}}]}')


@pytest.mark.parametrize("fmt", [None, "hermes", "minimax_m3"])
def test_a_delta_never_overtakes_text_the_parser_holds(fmt: str | None) -> None:
    """``<`` may begin a marker and is held; the next ``<`` releases it and is held in turn.
    The parser let out as much as came in, but it still holds text: the ``x`` after it must
    not skip the parser (it did, and the client got ``<x<``)."""
    deltas = [{"role": "assistant", "content": ""}, {"content": "<"}, {"content": "<"},
              {"content": "x"}, {}]
    pieces = [b"data: " + orjson.dumps({"id": "c1", "model": "m", "choices": [
        {"index": 0, "delta": d, "finish_reason": None if d else "stop"}]}) + b"\n\n"
        for d in deltas] + [b"data: [DONE]\n\n"]
    assert client_view(b"".join(pieces), pieces, fmt)["content"] == "<<x"


def test_non_streaming_message_is_mended_the_same_way() -> None:
    msg = {"role": "assistant", "content": "Checking.\n<tool_call>\n{\"name\": \"get_weather\", "
           "\"arguments\": {\"city\": \"Oslo\", \"days\": 2,}}\n</tool_call>"}
    out, finish, m = mend_message(msg, "stop", "hermes", TOOLS)
    assert out["content"].strip() == "Checking."
    assert orjson.loads(out["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo",
                                                                           "days": 2}
    assert out["tool_calls"][0]["id"].startswith("call_")
    assert finish == "tool_calls"
    assert m.repairs


def test_model_name_picks_the_format_late() -> None:
    m = ChatMender(None, TOOLS)
    m.feed({"model": "Qwen/Qwen3-8B", "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    assert m.format == "hermes"
    m2 = ChatMender(None, TOOLS)
    m2.feed({"model": "my-finetune", "choices": [{"index": 0, "delta": {"content": "x"}}]})
    assert m2.format == "auto"


def test_unknown_model_switches_on_markers_in_content() -> None:
    m = ChatMender(None, TOOLS)
    out = []
    for p in ["I'll check. <tool_", "call>{\"name\": \"get_weather\", \"arguments\": "
              "{\"city\": \"Oslo\"}}</tool_call>"]:
        out += m.feed({"model": "custom", "choices": [{"index": 0, "delta": {"content": p}}]})[0]
    out += m.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})[0]
    res = accumulate(out)
    assert res["calls"][0]["name"] == "get_weather"
    assert res["content"] == "I'll check. "


# --- split invariance at the SSE byte level, through the whole pipeline --------------------

def sse_stream(dialect: str, sc: Scenario) -> bytes:
    d = make_dialect(dialect, "sim-model")
    chunks = [d.envelope("c1", 1, [d.choice(d.first_delta())])]
    chunks += [d.envelope("c1", 1, [d.choice(d.content_delta(p))]) for p in sc.content_pieces()]
    chunks += [d.envelope("c1", 1, [d.choice(x)]) for x in d.tool_deltas(sc.tool_calls, {})]
    chunks.append(d.envelope("c1", 1, [d.finish_choice(sc.final_reason())]))
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def client_view(raw: bytes, pieces: list[bytes], fmt: str | None = "hermes") -> dict[str, Any]:
    p = StreamPipeline(False, ChatMender(fmt, TOOLS))
    out = b"".join(p.feed(x) for x in pieces) + p.finish()
    dec = SSEDecoder()
    events = [e for e in dec.feed(out) + dec.finish() if isinstance(e, SSEEvent)]
    assert events[-1].is_done
    res = accumulate([orjson.loads(e.data) for e in events[:-1]])
    for c in res["calls"]:
        c.pop("id")  # generated ids differ run to run
    return res


SCENARIOS = [
    Scenario(content="Let me look that up — ünïcode 🌍.\n<tool_call>\n{\"name\": \"get_weather\", "
             "\"arguments\": {\"city\": \"Zürich\", \"days\": 3}}\n</tool_call>"),
    Scenario(content="<think>User wants weather; note \"</tool_call>\" is text</think>"
             "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"</tool_call>\"}}"
             "</tool_call>\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": "
             "\"Oslo\"}}</tool_call> done"),
    Scenario(content="Plain answer, no tools: 2 < 3 and [brackets] {braces}."),
]


@pytest.mark.parametrize("dialect", ["vllm", "llamacpp", "ollama"])
@pytest.mark.parametrize("sc", SCENARIOS, ids=["call", "think-and-two", "text"])
def test_split_invariance_at_byte_level(dialect: str, sc: Scenario) -> None:
    raw = sse_stream(dialect, sc)
    whole = client_view(raw, [raw])
    assert whole["calls"] or "tool_call" not in sc.content
    rng = random.Random(1)
    for _ in range(150):
        cuts = sorted(rng.sample(range(1, len(raw)), rng.randint(1, 40)))
        pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        assert client_view(raw, pieces) == whole
    assert client_view(raw, [raw[i:i + 1] for i in range(len(raw))]) == whole


def test_structured_deltas_split_at_byte_level() -> None:
    sc = Scenario(content="Calling.", tool_calls=[])
    sc.tool_calls = Scenario.from_dict({"tool_calls": [
        {"name": "get_weather", "arguments": {"city": "São Paulo", "days": 2}},
        {"name": "get_weather", "arguments": {"city": "東京"}}]}).tool_calls
    for dialect in ("vllm", "llamacpp", "ollama"):
        raw = sse_stream(dialect, sc)
        whole = client_view(raw, [raw])
        assert [orjson.loads(c["arguments"])["city"] for c in whole["calls"]] == ["São Paulo",
                                                                                "東京"]
        assert client_view(raw, [raw[i:i + 1] for i in range(len(raw))]) == whole


@settings(max_examples=200, deadline=None)
@given(text=st.lists(st.sampled_from(["<tool_call>", "</tool_call>", "<think>", "</think>", "{",
                                      "}", '"name"', ":", '"get_weather"', '"arguments"', ",",
                                      "<tool", "_call>", '"', "\\", "é🌍", " ", "x"])
                     | st.text(max_size=3), max_size=30).map("".join),
       cut=st.integers(min_value=0, max_value=120), fmt=st.sampled_from([None, "hermes"]))
def test_property_any_content_never_raises_and_is_split_invariant(text: str, cut: int,
                                                                  fmt: str | None) -> None:
    cut = min(cut, len(text))

    def outcome(deltas: list[dict[str, Any]]) -> Any:
        try:
            res, _ = run_deltas(deltas, fmt=fmt)
        except StreamError as e:  # a call that cannot be mended: refused, the same way
            return e.body
        for c in res["calls"]:
            c.pop("id")
            assert isinstance(orjson.loads(c["arguments"]), dict)  # never malformed
        return res

    assert outcome([{"content": text}]) == outcome([{"content": text[:cut]},
                                                    {"content": text[cut:]}])


@pytest.mark.parametrize("mode", ["buffered", "incremental"])
def test_parallel_tool_calls_false_keeps_only_the_first_call(mode: str) -> None:
    m = ChatMender("hermes", TOOLS, mode=mode, single_call=True)
    out: list[dict[str, Any]] = []
    text = ("<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lima\"}}"
            "</tool_call><tool_call>{\"name\": \"get_weather\", \"arguments\": "
            "{\"city\": \"Lima\"}}</tool_call>")
    for ch in text:
        out += m.feed({"choices": [{"index": 0, "delta": {"content": ch}}]})[0]
    out += m.feed({"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 5, "id": "x", "type": "function",
         "function": {"name": "get_weather", "arguments": "{}"}}]}}]})[0]
    out += m.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})[0]
    res = accumulate(out)
    assert [orjson.loads(c["arguments"]) for c in res["calls"]] == [{"city": "Lima"}]
    assert [r["kind"] for r in m.repairs].count("extra_call_dropped") == 2
