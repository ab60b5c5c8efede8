"""``Markers``: the earliest marker in streamed text, the same however the text is split.

A short marker that is a prefix of a longer one (xLAM's ``[`` and ``[TOOL_CALLS]``) must not be
taken at the end of a piece when the next piece may still make it the longer marker.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from toolmend.parsers.formats._stream import Markers
from toolmend.parsers.formats.base import holdback

NESTED = Markers("[", "[TOOL_CALLS]", "<tool", "<tool_call>")


def scan_stream(markers: Markers, pieces: list[str]) -> list[tuple[str, str]]:
    """Drive ``scan`` as a format's parser does: released text and markers, in order."""
    out: list[tuple[str, str]] = []
    buf = ""
    for i, piece in enumerate([*pieces, ""]):
        final = i == len(pieces)
        buf += piece
        pos = 0
        while True:
            end, m = markers.scan(buf, pos, final)
            if end > pos:
                out.append(("text", buf[pos:end]))
            if m is None:
                buf = buf[end:]
                break
            out.append(("marker", m.group()))
            pos = m.end()
    return merge(out)


def merge(events: list[tuple[str, str]]) -> list[tuple[str, str]]:
    merged: list[tuple[str, str]] = []
    for kind, text in events:
        if kind == "text" and merged and merged[-1][0] == "text":
            merged[-1] = ("text", merged[-1][1] + text)
        else:
            merged.append((kind, text))
    return merged


def test_longer_marker_split_after_its_short_prefix() -> None:
    assert scan_stream(NESTED, ["a [", "TOOL_CALLS] b"]) == [
        ("text", "a "), ("marker", "[TOOL_CALLS]"), ("text", " b")]
    assert scan_stream(NESTED, ["x <tool", "_call>"]) == [("text", "x "), ("marker", "<tool_call>")]


def test_longer_marker_split_inside_its_rest() -> None:
    """The piece ends past the short marker but still inside the longer one."""
    assert scan_stream(NESTED, ["a [T", "OOL_CALLS] b"]) == [
        ("text", "a "), ("marker", "[TOOL_CALLS]"), ("text", " b")]
    channel = Markers("<|channel>", "<|channel>thought\n")
    assert scan_stream(channel, list("<|channel>thought\nplan")) == [
        ("marker", "<|channel>thought\n"), ("text", "plan")]
    assert scan_stream(channel, ["<|channel>tho", "se"]) == [
        ("marker", "<|channel>"), ("text", "those")]


def test_short_marker_stands_once_the_longer_is_ruled_out() -> None:
    assert scan_stream(NESTED, ["a [", "1, 2]"]) == [
        ("text", "a "), ("marker", "["), ("text", "1, 2]")]
    assert scan_stream(NESTED, ["<tool", ""]) == [("marker", "<tool")]
    assert scan_stream(NESTED, ["[TOOL"]) == [("marker", "["), ("text", "TOOL")]


def test_at_prefers_the_longer_marker_and_waits_for_it() -> None:
    m = Markers("<tool", "<tool_call>")
    assert m.at("<tool_call>{", 0, final=False) == "<tool_call>"
    assert m.at("<tool_ca", 0, final=False) is True
    assert m.at("<tool_ca", 0, final=True) == "<tool"
    assert m.at("<toolbox", 0, final=False) == "<tool"


ALPHABET = st.sampled_from(["[", "TOOL_CALLS]", "<tool", "_call>", "a", " ", "]", "_", "<"])


@given(parts=st.lists(ALPHABET, max_size=30), cuts=st.lists(st.integers(0, 200), max_size=8))
def test_any_split_finds_what_the_whole_text_finds(parts: list[str], cuts: list[int]) -> None:
    text = "".join(parts)
    bounds = sorted({c % (len(text) + 1) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    assert scan_stream(NESTED, pieces) == scan_stream(NESTED, [text])


@given(text=st.text(max_size=60), cut=st.integers(0, 60))
def test_random_text_never_crashes_and_loses_nothing(text: str, cut: int) -> None:
    events = scan_stream(NESTED, [text[:cut], text[cut:]])
    assert "".join(t for _, t in events) == text


# holdback: the longest suffix of the text that a marker properly begins with. The reference is
# the definition itself, marker by marker and length by length.
def _holdback_by_definition(text: str, markers: tuple[str, ...]) -> int:
    best = 0
    for n in range(1, len(text) + 1):
        if any(len(m) > n and m.startswith(text[-n:]) for m in markers):
            best = n
    return best


def test_holdback_literal_cases() -> None:
    markers = ("<tool_call>", "<|python_tag|>", "[TOOL_CALLS]")
    assert holdback("hello <tool", markers) == 5
    assert holdback("hello <|py", markers) == 4
    assert holdback("hello [", markers) == 1
    assert holdback("hello <tool_call>", markers) == 0  # a whole marker is not held
    assert holdback("hello", markers) == 0
    assert holdback("", markers) == 0


@given(st.text(alphabet="<|>[]_tocalp", max_size=24),
       st.lists(st.text(alphabet="<|>[]_tocalp", min_size=1, max_size=8), min_size=1,
                max_size=6))
def test_holdback_matches_its_definition(text: str, markers: list[str]) -> None:
    assert holdback(text, tuple(markers)) == _holdback_by_definition(text, tuple(markers))
