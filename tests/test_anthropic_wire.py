"""The Anthropic Messages codec, sans-I/O: request translation, thinking signatures, and the
event encoder (split invariance, well-formed event order, whole replies equal to streams)."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolmend.parsers.anthropic_emit import MessagesEncoder, stop_reason
from toolmend.parsers.anthropic_wire import (
    AnthropicRequestError,
    messages_to_openai,
    signed_thinking,
    thinking_signature,
)
from toolmend.parsers.reply import ChatReplyDecoder, Finish
from toolmend.server.signing import Signer

SIGNER = Signer(b"k" * 32)


def mac(data: bytes) -> str:
    return SIGNER.sign("anthropic-thinking", data)


def check(data: bytes, sig: str) -> bool:
    return SIGNER.verify("anthropic-thinking", data, sig)


def translate(**body: Any) -> Any:
    body.setdefault("max_tokens", 10)
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return messages_to_openai(body, check)


# --- requests --------------------------------------------------------------------------------
def test_minimal_request() -> None:
    tr = translate(model="m", stream=True)
    assert tr.body == {"model": "m", "max_tokens": 10,
                       "messages": [{"role": "user", "content": "hi"}],
                       "chat_template_kwargs": {"enable_thinking": False}}
    assert tr.stream is True and tr.thinking is False and tr.ignored == []


def test_system_blocks_and_billing_line() -> None:
    tr = translate(system=[{"type": "text", "text": "x-anthropic-billing-header: cc=1;"},
                           {"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}},
                           {"type": "text", "text": "B"}])
    assert tr.body["messages"][0] == {"role": "system", "content": "A\n\nB"}
    assert translate(system="S").body["messages"][0] == {"role": "system", "content": "S"}


def test_system_turns_fold_into_the_conversation() -> None:
    msgs = [{"role": "system", "content": "first"},
            {"role": "user", "content": "q"},
            {"role": "system", "content": [{"type": "text", "text": "env"}]},
            {"role": "assistant", "content": "a"},
            {"role": "system", "content": "later"},
            {"role": "user", "content": "q2"}]
    assert translate(system="S", messages=msgs).body["messages"] == [
        {"role": "system", "content": "S\n\nfirst"},
        {"role": "user", "content": "q\n\nenv"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "later\n\nq2"}]


def test_consecutive_turns_merge() -> None:
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert translate(messages=msgs).body["messages"] == [
        {"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "cd"}]


def test_tool_use_and_results_in_openai_order() -> None:
    msgs = [{"role": "user", "content": "go"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Calling."},
                {"type": "tool_use", "id": "toolu_a", "name": "f", "input": {"x": 1}}]},
            {"role": "user", "content": [
                {"type": "text", "text": "note"},
                {"type": "tool_result", "tool_use_id": "toolu_a",
                 "content": [{"type": "text", "text": "one"},
                             {"type": "tool_reference", "tool_name": "WebFetch"}]}]}]
    assert translate(messages=msgs).body["messages"] == [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "Calling.", "tool_calls": [
            {"id": "toolu_a", "type": "function",
             "function": {"name": "f", "arguments": '{"x":1}'}}]},
        {"role": "tool", "tool_call_id": "toolu_a", "content": "one\n\nTool loaded: WebFetch"},
        {"role": "user", "content": "note"}]


def test_assistant_with_calls_only_has_null_content() -> None:
    msgs = [{"role": "user", "content": "go"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                               "input": {}}]}]
    assert translate(messages=msgs).body["messages"][1]["content"] is None


def test_tools_choice_and_sampling() -> None:
    tools = [{"name": "f", "description": "d", "input_schema": {"type": "object"},
              "cache_control": {"type": "ephemeral"}, "strict": True},
             {"type": "bash_20250124", "name": "bash"}]
    tr = translate(tools=tools, tool_choice={"type": "tool", "name": "f"},
                   stop_sequences=["X", "Y"], temperature=0, top_p=1, top_k=5)
    assert tr.body["tools"] == [{"type": "function", "function": {
        "name": "f", "description": "d", "parameters": {"type": "object"}}}]
    assert tr.body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert (tr.body["stop"], tr.body["temperature"], tr.body["top_p"], tr.body["top_k"]) == \
        (["X", "Y"], 0, 1, 5)
    assert tr.stop_sequences == ("X", "Y")
    assert tr.ignored == ["server tool bash"]
    only_server = translate(tools=tools[1:], tool_choice={"type": "any"}).body
    assert "tools" not in only_server and "tool_choice" not in only_server


def test_thinking_switch() -> None:
    on = translate(thinking={"type": "enabled", "budget_tokens": 2048})
    assert on.thinking and not on.hide_thinking and "chat_template_kwargs" not in on.body
    hidden = translate(thinking={"type": "adaptive", "display": "omitted"})
    assert hidden.thinking and hidden.hide_thinking
    off = translate(thinking={"type": "disabled"})
    assert not off.thinking and off.body["chat_template_kwargs"] == {"enable_thinking": False}


def test_quiet_and_unknown_fields() -> None:
    tr = translate(context_management={}, output_config={"effort": "low"}, new_thing=1,
                   messages=[{"role": "user", "content": [
                       {"type": "text", "text": "q", "citations": []},
                       {"type": "container_upload", "file_id": "f"}]}])
    assert tr.ignored == ["container_upload blocks", "new_thing"]
    assert tr.body["messages"] == [{"role": "user", "content": "q"}]


@pytest.mark.parametrize(("body", "param"), [
    ({"max_tokens": True}, "max_tokens"),
    ({"stream": "yes"}, "stream"),
    ({"model": 3}, "model"),
    ({"system": 5}, "system"),
    ({"system": [{"type": "image"}]}, "system[0]"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
     "messages[0].content[0].tool_use_id"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b"}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "b"}]}]},
     "messages[0].content[0].id"),
    ({"messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "a", "name": "b", "input": []}]}]},
     "messages[0].content[0].input"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]},
     "messages[0].content[0].source.type"),
    ({"tools": {}}, "tools"),
    ({"tools": [{"input_schema": {}}]}, "tools[0].name"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
    ({"stop_sequences": "X"}, "stop_sequences"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_k": 1.5}, "top_k"),
    ({"metadata": "x"}, "metadata"),
    ({"thinking": {"type": "enabled", "budget_tokens": "lots"}}, "thinking.budget_tokens"),
])
def test_bad_fields_are_named(body: dict[str, Any], param: str) -> None:
    with pytest.raises(AnthropicRequestError) as info:
        translate(**body)
    assert info.value.param == param
    assert str(info.value).startswith(param + ": ")


def test_count_only_needs_no_max_tokens() -> None:
    tr = messages_to_openai({"messages": [{"role": "user", "content": "x"}]}, check,
                            count_only=True)
    assert "max_tokens" not in tr.body


# --- thinking signatures ---------------------------------------------------------------------
def test_signatures_round_trip_and_refuse_anything_else() -> None:
    sig = thinking_signature("I think.", mac)
    assert signed_thinking({"thinking": "I think.", "signature": sig}, check) == "I think."
    assert signed_thinking({"thinking": "I thought.", "signature": sig}, check) is None
    hidden = thinking_signature("secret plan", mac, hidden=True)
    assert signed_thinking({"thinking": "", "signature": hidden}, check) == "secret plan"
    packed, _, tag = hidden.rpartition(".")
    assert signed_thinking({"signature": packed + "x." + tag}, check) is None
    flipped = "tm1h." + ("d" if packed[5] != "d" else "e") + packed[6:]
    assert signed_thinking({"signature": flipped + "." + tag}, check) is None
    assert signed_thinking({"signature": "tm1h.!!!.abc"}, check) is None
    other = Signer(b"o" * 32)
    assert signed_thinking({"thinking": "I think.", "signature": thinking_signature(
        "I think.", lambda d: other.sign("anthropic-thinking", d))}, check) is None
    for junk in (None, 5, "", "EqQBCkYIBRgCKkA", "tm1."):
        assert signed_thinking({"thinking": "x", "signature": junk}, check) is None


def test_thinking_blocks_in_history() -> None:
    good = {"type": "thinking", "thinking": "plan", "signature": thinking_signature("plan", mac)}
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": [
                good, {"type": "redacted_thinking", "data": "zzz"},
                {"type": "thinking", "thinking": "forged", "signature": "tm1.00"},
                {"type": "text", "text": "ok"}]}]
    tr = translate(messages=msgs)
    assert tr.body["messages"][1] == {"role": "assistant", "content": "ok",
                                      "reasoning_content": "plan"}
    assert tr.dropped_thinking == 2


# --- the encoder -----------------------------------------------------------------------------
def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": delta,
                                                  "finish_reason": finish}]}) + b"\n\n"


def reply_stream(pieces: list[tuple[str, str]], finish: str) -> bytes:
    out = [chunk({"role": "assistant", "content": ""})]
    calls = 0
    for kind, text in pieces:
        if kind == "text":
            out.append(chunk({"content": text}))
        elif kind == "reasoning":
            out.append(chunk({"reasoning_content": text}))
        else:  # a whole call: start, then its arguments in two fragments
            out.append(chunk({"tool_calls": [{"index": calls, "id": f"c{calls}",
                                              "type": "function",
                                              "function": {"name": "f", "arguments": ""}}]}))
            half = len(text) // 2
            for frag in (text[:half], text[half:]):
                out.append(chunk({"tool_calls": [{"index": calls,
                                                  "function": {"arguments": frag}}]}))
            calls += 1
    out.append(chunk({}, finish))
    out.append(b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\n')
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def encoder(stream: bool, thinking: bool = True) -> MessagesEncoder:
    ids = itertools.count()
    return MessagesEncoder("msg_1", "m", mac=mac, new_tool_id=lambda: f"toolu_{next(ids)}",
                           stream=stream, thinking=thinking, input_estimate=4)


def run(raw: bytes, cuts: list[int], stream: bool = True) -> tuple[bytes, MessagesEncoder]:
    dec, enc = ChatReplyDecoder(), encoder(stream)
    out = []
    last = 0
    for c in [*sorted(cuts), len(raw)]:
        out.append(enc.feed(dec.feed(raw[last:c])))
        last = c
    out.append(enc.feed(dec.finish()))
    out.append(enc.finish() if stream else b"")
    return b"".join(out), enc


def parse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in raw.split(b"\n\n"):
        if not block or block.startswith(b":"):
            continue
        name, data = block.split(b"\n")
        events.append((name[7:].decode(), orjson.loads(data[6:])))
    return events


def accumulate(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The message a client builds from the events, checking their order as it goes."""
    assert events[0][0] == "message_start" and events[-1][0] == "message_stop"
    assert events[-2][0] == "message_delta"
    msg = events[0][1]["message"]
    open_index = None
    for name, d in events[1:-2]:
        if name == "content_block_start":
            assert open_index is None and d["index"] == len(msg["content"])
            open_index = d["index"]
            msg["content"].append(dict(d["content_block"]))
        elif name == "content_block_delta":
            assert d["index"] == open_index
            block, delta = msg["content"][open_index], d["delta"]
            key = {"text_delta": ("text", "text"), "thinking_delta": ("thinking", "thinking"),
                   "input_json_delta": ("partial_json", "_json"),
                   "signature_delta": ("signature", "signature")}[delta["type"]]
            block[key[1]] = block.get(key[1], "") + delta[key[0]]
        else:
            assert name == "content_block_stop" and d["index"] == open_index
            open_index = None
    assert open_index is None
    for block in msg["content"]:
        if "_json" in block:
            block["input"] = orjson.loads(block.pop("_json"))
    msg.update(events[-2][1]["delta"])
    msg["usage"] = events[-2][1]["usage"]
    return msg


PIECES = st.lists(st.tuples(st.sampled_from(["text", "reasoning", "call"]),
                            st.text(min_size=1, max_size=12)), max_size=6)


@settings(max_examples=150, deadline=None)
@given(pieces=PIECES, data=st.data())
def test_split_invariance_and_whole_equals_stream(pieces: list[tuple[str, str]],
                                                  data: Any) -> None:
    pieces = [(k, orjson.dumps({"a": t}).decode() if k == "call" else t) for k, t in pieces]
    raw = reply_stream(pieces, "tool_calls" if any(k == "call" for k, _ in pieces) else "stop")
    whole_bytes, _ = run(raw, [])
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12))
    split_bytes, _ = run(raw, cuts)
    one = accumulate(parse(whole_bytes))
    assert accumulate(parse(split_bytes)) == one
    _, enc = run(raw, cuts, stream=False)
    assert enc.message() == one
    texts = "".join(b.get("text", "") for b in one["content"])
    assert texts == "".join(t for k, t in pieces if k == "text")
    thought = "".join(b.get("thinking", "") for b in one["content"])
    assert thought == "".join(t for k, t in pieces if k == "reasoning")
    assert [b["input"] for b in one["content"] if b["type"] == "tool_use"] == \
        [orjson.loads(t) for k, t in pieces if k == "call"]
    for b in one["content"]:
        if b["type"] == "thinking":
            assert signed_thinking(b, check) == b["thinking"]


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=6))
def test_random_bytes_never_crash(raw: bytes, cuts: list[int]) -> None:
    out, _ = run(raw, [c for c in cuts if c <= len(raw)])
    events = parse(out)
    assert events[0][0] == "message_start" and events[-1][0] in ("message_stop", "error")
    run(raw, [], stream=False)[1].message()


def test_reasoning_hidden_without_thinking_and_usage() -> None:
    raw = reply_stream([("reasoning", "hmm"), ("text", "Hi")], "stop")
    dec, enc = ChatReplyDecoder(), encoder(True, thinking=False)
    out = enc.feed(dec.feed(raw)) + enc.feed(dec.finish()) + enc.finish()
    msg = accumulate(parse(out))
    assert msg["content"] == [{"type": "text", "text": "Hi"}]
    assert msg["usage"] == {"input_tokens": 7, "output_tokens": 3,
                            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    assert msg["stop_reason"] == "end_turn"


def test_ping_starts_the_message_once() -> None:
    enc = encoder(True)
    first, second = enc.ping(), enc.ping()
    assert [n for n, _ in parse(first)] == ["message_start", "ping"]
    assert parse(first)[0][1]["message"]["usage"] == {"input_tokens": 4, "output_tokens": 0}
    assert second == b'event: ping\ndata: {"type":"ping"}\n\n'


def test_error_ends_the_stream() -> None:
    enc = encoder(True)
    enc.feed(ChatReplyDecoder().feed(chunk({"content": "partial"})))
    err = enc.error(502, "bad call", {"code": "invalid_tool_call", "tool": "f", "x": None})
    assert parse(err) == [("error", {"type": "error", "error": {
        "type": "api_error", "message": "bad call", "code": "invalid_tool_call", "tool": "f"}})]
    assert enc.finish() == b""


@pytest.mark.parametrize(("finish", "tool", "stops", "expected"), [
    (Finish("stop"), False, (), ("end_turn", None)),
    (Finish("length"), True, (), ("max_tokens", None)),
    (Finish("tool_calls"), False, (), ("tool_use", None)),
    (Finish("stop"), True, (), ("tool_use", None)),
    (Finish("content_filter"), False, (), ("refusal", None)),
    (Finish("stop", "END"), False, ("END",), ("stop_sequence", "END")),
    (Finish("stop", "OTHER"), False, ("END",), ("end_turn", None)),
    (None, False, (), ("end_turn", None)),
])
def test_stop_reasons(finish: Finish | None, tool: bool, stops: tuple[str, ...],
                      expected: tuple[str, str | None]) -> None:
    assert stop_reason(finish, tool, stops) == expected
