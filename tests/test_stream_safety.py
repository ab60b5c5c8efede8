"""The stream pipeline's limits and its UTF-8 discipline, sans-I/O.

Whatever bytes an upstream sends, in whatever pieces: the pipeline either returns bytes for
the client or raises :class:`UpstreamStreamError` (nothing else), what it hands the client is
always valid UTF-8, one event never holds more than ``max_event_bytes``, and the verdict does
not depend on how the bytes were split.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolmend.parsers.sse import SSEDecoder, SSEEvent, SSEProtocolError
from toolmend.parsers.stream import StreamPipeline, UpstreamStreamError

PROPS = settings(max_examples=300, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow])


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({p % (len(data) + 1) for p in points})
    out, prev = [], 0
    for b in bounds:
        out.append(data[prev:b])
        prev = b
    out.append(data[prev:])
    return out


def run(pieces: list[bytes], limit: int = 1 << 20, **kw: Any) -> tuple[bytes, bytes | None]:
    """Client bytes, and the error body if the stream ended with one."""
    p = StreamPipeline(True, max_event_bytes=limit, **kw)
    out = bytearray()
    try:
        for piece in pieces:
            out += p.feed(piece)
        out += p.finish()
    except UpstreamStreamError as e:
        return bytes(out + e.pending), e.body
    return bytes(out), None


def chunk(raw_content: bytes, finish: bytes = b"null") -> bytes:
    return (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
            b'"choices":[{"index":0,"delta":{"content":"' + raw_content +
            b'"},"finish_reason":' + finish + b"}]}\n\n")


# --- the event bound -----------------------------------------------------------------------------

def test_event_bound_counts_data_lines_together() -> None:
    d = SSEDecoder(max_line_bytes=1000, max_event_bytes=10)
    assert d.feed(b"data: 1234\ndata: 56789\n\n") == [SSEEvent(b"1234\n56789")]  # 10 bytes
    with pytest.raises(SSEProtocolError) as e:
        d.feed(b"data: 1234\ndata: 567890\n\n")  # 11
    assert e.value.limit == 10 and str(e.value) == "SSE event longer than 10 bytes"


def test_events_before_the_bound_are_kept() -> None:
    d = SSEDecoder(max_line_bytes=1000, max_event_bytes=10)
    with pytest.raises(SSEProtocolError) as e:
        d.feed(b"data: ok\n\ndata: " + b"x" * 11 + b"\n")
    assert e.value.events == [SSEEvent(b"ok")]


@PROPS
@given(n_lines=st.integers(1, 40), points=st.lists(st.integers(0, 1 << 12), max_size=8))
def test_event_bound_is_split_invariant(n_lines: int, points: list[int]) -> None:
    data = b"data: abc\n" * n_lines + b"\n"

    def verdict(pieces: list[bytes]) -> Any:
        d = SSEDecoder(max_line_bytes=1 << 20, max_event_bytes=60)
        try:
            return [e for p in pieces for e in d.feed(p)] + d.finish()
        except SSEProtocolError:
            return "too large"

    want = [SSEEvent(b"\n".join([b"abc"] * n_lines))] if n_lines * 4 - 1 <= 60 else "too large"
    assert verdict([data]) == want
    assert verdict(cut(data, points)) == want


def test_an_event_of_many_small_lines_costs_about_its_bytes() -> None:
    """Small data lines gather in one buffer: a list of small bytes objects would cost
    several times the data (16 MiB of 8-byte lines used to take about 100 MiB)."""
    import gc
    import tracemalloc

    line = b'data: {"a": 1}\n'
    block = line * 4096
    d = SSEDecoder(max_line_bytes=1 << 20, max_event_bytes=8 << 20)
    data_bytes = 0
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(64):
            assert d.feed(block) == []
            data_bytes += 4096 * len(b'{"a": 1}\n')
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert data_bytes == 2_359_296
    assert held < data_bytes * 1.5, held
    (ev,) = d.feed(b"\n")
    assert ev.multiline and ev.data == b"\n".join([b'{"a": 1}'] * 4096 * 64)


def test_pipeline_turns_the_bound_into_a_clear_error() -> None:
    out, err = run([chunk(b"before"), b"data: " + b"x" * 400 + b"\n"], limit=256)
    assert b'"content":"before"' in out
    assert err is not None
    doc = orjson.loads(err)["error"]
    assert doc["code"] == "upstream_event_too_large" and doc["type"] == "upstream_error"
    assert doc["message"] == ("upstream sent an SSE event or line over the limit of 256 bytes "
                              "(max_upstream_event_bytes)")


def test_pipeline_bound_on_a_line_without_end() -> None:
    p = StreamPipeline(True, max_event_bytes=100)
    assert p.feed(b"data: ") == b""
    with pytest.raises(UpstreamStreamError) as e:
        for _ in range(10):
            p.feed(b"y" * 50)
    assert orjson.loads(e.value.body)["error"]["code"] == "upstream_event_too_large"
    assert p.feed(b"more") == b"" and p.finish() == b""  # stopped for good


def test_multi_line_event_is_reencoded_as_one_event() -> None:
    out, err = run([b'data: {"id":"c","choices":[{"index":0,\ndata: "delta":{"content":"m"}}]}'
                    b"\n\n"])
    assert err is None
    assert out.startswith(b'data: {"id":"c","choices":[{"index":0,\ndata: "delta":')


# --- UTF-8 ----------------------------------------------------------------------------------------

def test_invalid_utf8_replaced_counted_and_noted_once() -> None:
    p = StreamPipeline(True)
    out = p.feed(chunk(b"a\xffb") + chunk(b"ok") + chunk(b"\xe2\x82"))
    out += p.finish()
    assert out.decode("utf-8").count("toolmend replaced invalid UTF-8") == 1
    assert out == (b": toolmend replaced invalid UTF-8 from the upstream with U+FFFD\n\n"
                   + chunk("a\ufffdb".encode()) + chunk(b"ok")
                   + chunk("\ufffd".encode()) + b"data: [DONE]\n\n")
    assert p.stats.invalid_utf8 == 2


def test_valid_utf8_passes_untouched() -> None:
    ev = chunk("h\u00e9llo \U0001f30d".encode())
    p = StreamPipeline(True)
    assert p.feed(ev) == ev
    assert p.stats.invalid_utf8 == 0


def test_invalid_utf8_in_a_parsed_event() -> None:
    out, err = run([chunk(b"\xc3(", b'"stop"')])
    assert err is None
    doc = orjson.loads(out.split(b"\n\n")[1][6:])
    assert doc["choices"][0]["delta"]["content"] == "\ufffd("
    assert doc["choices"][0]["finish_reason"] == "stop"


json_atoms = st.sampled_from([b'{"choices":[{"index":0,"delta":{"content":"', b'"}}]}',
                              b'"finish_reason":"stop"', b'"usage":{"prompt_tokens":1}',
                              b"\xff", b"\xc3", b"\xc3\xa9", b"\xed\xa0\x80", b"\xf0\x9f\x8c",
                              b"data: ", b"\n\n", b"\n", b"event: error\n", b"[DONE]", b":x\n"])
stream_input = st.one_of(st.binary(max_size=400),
                         st.lists(st.one_of(json_atoms, st.binary(max_size=6)), max_size=60)
                         .map(b"".join))


@PROPS
@given(data=stream_input, points=st.lists(st.integers(0, 1 << 12), max_size=10),
       limit=st.sampled_from([16, 64, 1 << 20]))
def test_any_bytes_give_utf8_out_or_a_clear_error(data: bytes, points: list[int],
                                                  limit: int) -> None:
    whole = run([data], limit)
    split = run(cut(data, points), limit)
    for out, _err in (whole, split):
        out.decode("utf-8")
    # the same verdict however the bytes arrived (the line bound aside, which only decides
    # how soon an endless line is refused)
    if limit == 1 << 20:
        assert whole == split
