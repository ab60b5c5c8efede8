"""The SSE decoder: every chunk boundary gives the same events."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolmend.parsers.sse import (
    SSEComment,
    SSEDecoder,
    SSEEvent,
    SSEProtocolError,
    encode_comment,
    encode_event,
)


def decode(pieces: list[bytes]) -> list[SSEEvent | SSEComment]:
    d = SSEDecoder()
    out: list[SSEEvent | SSEComment] = []
    for p in pieces:
        out.extend(d.feed(p))
    out.extend(d.finish())
    return out


STREAM = (
    b": keep-alive\r\n\r\n"
    b'data: {"choices":[{"delta":{"content":"h\xc3\xa9llo \xf0\x9f\x8c\x8d"}}]}\n\n'
    b"event: error\r\ndata: {\"error\":\r\ndata:  {\"message\":\"x\"}}\r\n\r\n"
    b"id: 7\rretry: 1500\rdata:no-space\r\r"
    b"data: [DONE]"  # no final newline
)
EXPECTED = [
    SSEComment(b"keep-alive"),
    SSEEvent('{"choices":[{"delta":{"content":"héllo 🌍"}}]}'.encode()),
    SSEEvent(b'{"error":\n {"message":"x"}}', event="error"),
    SSEEvent(b"no-space", id="7", retry=1500),
    SSEEvent(b"[DONE]", id="7"),
]


def test_whole_stream() -> None:
    assert decode([STREAM]) == EXPECTED
    assert decode([STREAM])[-1].is_done  # type: ignore[union-attr]


def test_every_two_and_three_way_split() -> None:
    n = len(STREAM)
    for i in range(1, n):
        assert decode([STREAM[:i], STREAM[i:]]) == EXPECTED, i
    for i, j in itertools.combinations(range(1, n, 3), 2):
        assert decode([STREAM[:i], STREAM[i:j], STREAM[j:]]) == EXPECTED, (i, j)


def test_one_byte_at_a_time_splits_utf8_sequences() -> None:
    assert decode([bytes([b]) for b in STREAM]) == EXPECTED


def test_crlf_split_between_cr_and_lf_is_one_line_end() -> None:
    assert decode([b"data: a\r", b"\n", b"\r", b"\ndata: b\n\n"]) == [SSEEvent(b"a"),
                                                                     SSEEvent(b"b")]


def test_event_without_data_is_not_dispatched_and_fields_reset() -> None:
    assert decode([b"event: ping\n\ndata: x\n\n"]) == [SSEEvent(b"x")]


def test_unknown_fields_and_field_without_colon_are_ignored() -> None:
    assert decode([b"foo: bar\ndata\ndata: y\n\n"]) == [SSEEvent(b"\ny")]


def test_long_line_in_tiny_pieces_is_linear_and_exact() -> None:
    payload = b"x" * 200_000
    pieces = [b"data: "] + [payload[i:i + 3] for i in range(0, len(payload), 3)] + [b"\n\n"]
    assert decode(pieces) == [SSEEvent(payload)]


def test_encode_roundtrip_multiline_and_comment() -> None:
    raw = encode_event(b"line1\nline2\r\nline3", event="error") + encode_comment("a\nb")
    assert decode([raw]) == [SSEEvent(b"line1\nline2\nline3", event="error"), SSEComment(b"a b")]


events_st = st.lists(
    st.tuples(st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b),
              st.sampled_from([None, "error", "message"])),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(events=events_st, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
       crlf=st.booleans())
def test_property_roundtrip_under_any_split(events: list[tuple[bytes, str | None]],
                                            cuts: list[int], crlf: bool) -> None:
    raw = b"".join(encode_event(d, e) for d, e in events)
    if crlf:
        raw = raw.replace(b"\n", b"\r\n")
    bounds = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    pieces = [raw[a:b] for a, b in itertools.pairwise(bounds)]
    got = decode(pieces)
    assert got == [SSEEvent(d, event=e) for d, e in events]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), cut=st.integers(min_value=0, max_value=300))
def test_property_random_bytes_never_raise_and_split_invariant(data: bytes, cut: int) -> None:
    cut %= len(data) + 1
    assert decode([data[:cut], data[cut:]]) == decode([data])


def test_whole_one_line_event_per_feed_and_what_came_before_it() -> None:
    """A feed of exactly one ``data: ...\\n\\n`` event (the usual upstream write) gives that
    event and says so (``whole``); one that completes or follows buffered fields does not."""
    d = SSEDecoder()
    assert d.feed(b'data: {"a":1}\n\n') == [SSEEvent(b'{"a":1}')]
    assert d.whole is True
    assert d.feed(b"event: note\n") == []
    assert d.whole is False
    assert d.feed(b"data: x\n\n") == [SSEEvent(b"x", "note")]
    assert d.whole is False
    assert d.feed(b"data: par") == []
    assert d.feed(b"data: t\n\n") == [SSEEvent(b"pardata: t")]
    assert d.whole is False
    assert d.feed(b"data: a\r\n\r\n") == [SSEEvent(b"a")]
    assert d.whole is False
    small = SSEDecoder(max_event_bytes=4)
    assert small.feed(b"data: 1234\n\n") == [SSEEvent(b"1234")]
    with pytest.raises(SSEProtocolError, match="longer than 4 bytes"):
        small.feed(b"data: 12345\n\n")
