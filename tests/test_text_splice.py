"""Plain text as the upstream's own bytes (``TextJSON``): for any text, a front's stream is
byte for byte what it is when every chunk is decoded and its text encoded again, and the
splice is taken for the usual text (so this test fails if it never is)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolmend.parsers.anthropic_emit import MessagesEncoder
from toolmend.parsers.mender import ChatMender
from toolmend.parsers.ollama_emit import OllamaEmitter
from toolmend.parsers.reply import ChatReplyDecoder, Text, TextJSON
from toolmend.parsers.responses_emit import ResponsesEncoder
from toolmend.parsers.stream import StreamPipeline

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    # vLLM's shape, key for key: the splice reads the usual chunk as it comes
    return b"data: " + orjson.dumps({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    ) + b"\n\n"


def _stream(texts: list[str]) -> list[bytes]:
    return [_chunk({"role": "assistant", "content": ""}), *(_chunk({"content": t})
                                                             for t in texts),
            _chunk({}, "stop"),
            b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}\n\n',
            b"data: [DONE]\n\n"]


class _Front:
    """One front's encoder behind its decoder, as the front drives them."""

    def __init__(self, name: str, splice: bool) -> None:
        self.name = name
        ids = itertools.count()
        if name == "anthropic":
            self.enc: Any = MessagesEncoder("msg_1", "m", mac=b"k" * 32,
                                            new_tool_id=lambda: f"toolu_{next(ids)}",
                                            stream=True, thinking=False, input_estimate=4)
            self.decoder = ChatReplyDecoder(splice_text=splice)
            self.head = b""
            self.write: Callable[[list[Any]], bytes] = self.enc.feed
        elif name == "responses":
            self.enc = ResponsesEncoder({"id": "resp_1", "object": "response", "model": "m"},
                                        new_id=lambda prefix: f"{prefix}_{next(ids)}",
                                        stream=True)
            self.decoder = ChatReplyDecoder(splice_text=splice)
            self.head = self.enc.start()
            self.write = self.enc.feed
        else:
            self.enc = OllamaEmitter(name.split("_")[1], "m", "t")
            self.decoder = self.enc.decoder
            self.decoder.splice_text = splice
            self.head = b""
            self.write = self.enc.feed_events

    def tail(self) -> bytes:
        return self.write(self.decoder.finish()) + self.enc.finish()


FRONTS = ["anthropic", "responses", "ollama_chat", "ollama_generate"]


def _run(front: str, texts: list[str], splice: bool, tools: bool,
         cuts: list[int] | None = None) -> tuple[bytes, list[Any]]:
    """The front's bytes for a stream of ``texts``, fed event by event, or (``cuts``) as the
    whole stream cut at those offsets: reads that hold several events, or part of one."""
    f = _Front(front, splice)
    mender = ChatMender(None, TOOLS, model_hint=None) if tools else None
    p = StreamPipeline(False, mender, reply=f.decoder)
    out, seen = [f.head], []
    pieces = _stream(texts)
    if cuts is not None:
        wire = b"".join(pieces)
        points = sorted({c % len(wire) for c in cuts} - {0})
        pieces = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    for piece in pieces:
        events = p.feed(piece)
        seen += events
        out.append(f.write(events))
    events = p.finish()
    seen += events
    out.append(f.write(events))
    out.append(f.tail())
    return b"".join(out), seen


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("tools", [False, True])
def test_usual_text_is_spliced_and_the_stream_is_unchanged(front: str, tools: bool) -> None:
    texts = ["Local", " models", " are", " fast", " enough."]
    spliced, seen = _run(front, texts, True, tools)
    decoded, seen_decoded = _run(front, texts, False, tools)
    assert spliced == decoded
    # every plain text is spliced, on the fast path and the general one (where the first token
    # is looked for) alike; with tools offered, the mender reads the reply's start first
    spliced_texts = [b" models", b" are", b" fast", b" enough."]
    if not tools:
        spliced_texts.insert(0, b"Local")
    assert [e.raw for e in seen if isinstance(e, TextJSON)] == spliced_texts
    assert [e.text for e in seen_decoded if isinstance(e, Text)] == texts


@pytest.mark.parametrize("text", ['say "hi"', "back\\slash", "tab\there", "line\nbreak",
                                  "Zürich", "\u2028", "\x00"])
def test_text_needing_an_escape_takes_the_general_way(text: str) -> None:
    dec = ChatReplyDecoder(splice_text=True)
    payload = _chunk({"content": text})[6:-2]
    out: list[Any] = []
    assert not dec.plain_text(payload, out) and out == []
    dec.payload(payload, out)
    assert out == [Text(text)]


def test_a_delta_holding_more_than_content_takes_the_general_way() -> None:
    dec = ChatReplyDecoder(splice_text=True)
    for delta in ({"content": "a", "reasoning_content": "b"}, {"role": "assistant",
                                                              "content": "a"}):
        out: list[Any] = []
        assert not dec.plain_text(_chunk(delta)[6:-2], out) and out == []


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(FRONTS), st.booleans(),
       st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]),
                        max_size=12), max_size=8))
def test_any_text_streams_the_same_spliced_or_not(front: str, tools: bool,
                                                  texts: list[str]) -> None:
    assert _run(front, texts, True, tools)[0] == _run(front, texts, False, tools)[0]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(FRONTS), st.booleans(),
       st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]),
                        max_size=12), max_size=8),
       st.lists(st.integers(min_value=1, max_value=4000), max_size=6))
def test_reads_holding_several_events_stream_the_same_spliced_or_not(
        front: str, tools: bool, texts: list[str], cuts: list[int]) -> None:
    assert _run(front, texts, True, tools, cuts)[0] == _run(front, texts, False, tools, cuts)[0]


def test_text_in_a_read_of_several_events_is_spliced() -> None:
    texts = ["Local", " models", " are", " fast", " enough."]
    spliced, seen = _run("anthropic", texts, True, False, cuts=[])  # one read: the whole stream
    assert spliced == _run("anthropic", texts, False, False, cuts=[])[0]
    assert [e.raw for e in seen if isinstance(e, TextJSON)] == [t.encode() for t in texts]
