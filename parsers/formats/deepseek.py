"""DeepSeek V3 / R1 and V3.1 tool calls, between fullwidth-bar special tokens.

V3 / R1::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {...}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

V3.1::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜><｜tool▁calls▁end｜>

The bars are U+FF5C and the spaces U+2581, exactly as in the tokenizer; an ASCII look-alike is
not a marker. R1 reasons in ``<think>...</think>`` before answering.

These are special tokens, and so are the rest of the family's (``<｜end▁of▁sentence｜>``, which
a server that keeps special tokens in the text passes on, the turn and tool-output markers): one
out of place, in the content or in the reasoning, is dropped, never shown to the client.
"""

from __future__ import annotations

import re

from ..events import Event
from ._declaration import ToolFormat
from ._stream import (
    MORE,
    THINK_END,
    THINK_START,
    WS_LIMIT,
    CallReader,
    Collector,
    Markers,
    StreamParser,
    skip_ws,
)

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
FENCE = "```"
NEWLINE = "\n"
ARGS_OPEN = "{"  # arguments right after the name, without the fence
#: the family's other special tokens: they mean nothing in text, so they are dropped there
STRAY_TOKENS = (
    TOOL_SEP, "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
    "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
)

_MAX_LANG = 16  # "```json\n": the language tag is short; only so much of it is read
_FENCE_LANG = re.compile(rf"[A-Za-z0-9_-]{{0,{_MAX_LANG}}}")

# states (reasoning is a flag, see StreamParser)
_TEXT, _SECTION, _TYPE, _NAME, _FENCE, _CALL, _TAIL = range(7)


class DeepSeekV3Parser(StreamParser):
    """DeepSeek V3 / R1: ``function<｜tool▁sep｜>NAME`` then fenced JSON arguments."""

    name = "deepseek_v3"
    #: V3.1 drops the type and the fence: ``NAME<｜tool▁sep｜>{...}``
    _typed = True

    # stray section/call closers in text are markers too, dropped
    _IN_TEXT = Markers(CALLS_BEGIN, CALL_BEGIN, CALLS_END, CALL_END, THINK_START, *STRAY_TOKENS)
    _IN_THINK = Markers(THINK_END, CALLS_BEGIN, CALL_BEGIN, CALLS_END, CALL_END, *STRAY_TOKENS)
    _STRAYS = frozenset((CALLS_END, CALL_END, *STRAY_TOKENS))
    _SECTION_NEXT = Markers(CALL_BEGIN, CALLS_END)
    _TYPE_END = Markers(TOOL_SEP, CALL_END)
    _NAME_END_V3 = Markers(NEWLINE, FENCE, ARGS_OPEN, CALL_END)
    _NAME_END_V31 = Markers(TOOL_SEP, CALL_END)
    _FENCED_STOPS = Markers(FENCE, CALL_END, CALLS_END)
    _STOPS = Markers(CALL_END, CALLS_END)
    _TAIL_NEXT = Markers(FENCE, CALL_END, CALLS_END, CALL_BEGIN)

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._collect: Collector | None = None
        self._call_name = ""

    def _begin_call(self) -> None:
        if self._typed:
            self._collect = Collector(self._TYPE_END)
            self._state = _TYPE
        else:
            self._collect = Collector(self._NAME_END_V31)
            self._state = _NAME

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        n = len(data)
        if st == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok == CALLS_BEGIN:
                self._state = _SECTION
            elif tok == CALL_BEGIN:  # the section opener left out: lenient
                self._begin_call()
            return pos, tok is None
        if st == _TYPE or st == _NAME:
            assert self._collect is not None
            end, m = self._collect.feed(data, pos, final)
            if m is None:
                return end, True
            tok = m.group()
            text = self._collect.text()
            self._collect = None
            if st == _TYPE:
                if tok == TOOL_SEP:
                    self._collect = Collector(
                        self._NAME_END_V3 if self._typed else self._NAME_END_V31)
                    self._state = _NAME
                    return m.end(), False
                self._call_name = text.strip()  # no separator: take what there is as the name
            else:
                self._call_name = text.strip()
            if tok == CALL_END:  # a name and no arguments
                CallReader(self, None, name=self._call_name).close(out, truncated=False)
                self._state = _SECTION
                return m.end(), False
            if tok == TOOL_SEP:  # V3.1
                self._reader = CallReader(self, self._STOPS, name=self._call_name)
                self._state = _CALL
                return m.end(), False
            self._state = _FENCE
            return (m.end() if tok == NEWLINE else end), False
        if st == _FENCE:
            j = skip_ws(data, pos)
            if j >= n and not final:
                return pos, True
            if data.startswith(FENCE, j):
                k = _FENCE_LANG.match(data, j + len(FENCE)).end()  # type: ignore[union-attr]
                if k >= n and not final and k - j - len(FENCE) < _MAX_LANG:
                    return pos, True
                if k < n and data[k] == NEWLINE:
                    k += 1
                j = k
            elif j + len(FENCE) > n and FENCE.startswith(data[j:]) and not final:
                return pos, True
            self._reader = CallReader(self, self._FENCED_STOPS, name=self._call_name)
            self._state = _CALL
            return j, False
        if st == _CALL:
            assert self._reader is not None
            i, status = self._reader.feed(data, pos, final, out)
            if status == MORE:
                return i, True
            self._call_ended(out, status)
            self._state = _TAIL  # DONE, or STOP at a call or section end
            return i, False
        # _SECTION (between calls) and _TAIL (after a call's JSON)
        j = skip_ws(data, pos)
        if j - pos >= WS_LIMIT:
            self._state = _TEXT
            return pos, False
        if j >= n:
            if not final:
                return pos, True
            self._state = _TEXT
            return pos, False
        hit = (self._TAIL_NEXT if st == _TAIL else self._SECTION_NEXT).at(data, j, final)
        if hit is True:
            return pos, True
        if hit == FENCE:
            return j + len(FENCE), False
        if hit == CALL_END:
            self._state = _SECTION
            return j + len(CALL_END), False
        if hit == CALL_BEGIN:
            self._begin_call()
            return j + len(CALL_BEGIN), False
        if hit == CALLS_END:
            self._state = _TEXT
            return j + len(CALLS_END), False
        self._state = _TEXT  # anything else is text again
        return pos, False

    def _close(self, out: list[Event]) -> None:
        if self._collect is not None:  # cut off inside the type or the name
            name = self._collect.text().strip() if self._state == _NAME else ""
            self._collect = None
            self._reader = CallReader(self, None, name=name)
        super()._close(out)


class DeepSeekV31Parser(DeepSeekV3Parser):
    """DeepSeek V3.1: ``NAME<｜tool▁sep｜>{...}``, no type, no fence."""

    name = "deepseek_v31"
    _typed = False


_CALL_OPEN = CALLS_BEGIN + CALL_BEGIN

FORMAT_V3 = ToolFormat(
    name="deepseek_v3",
    parser=DeepSeekV3Parser,
    models=(r"deepseek",),
    rank=40,  # after V3.1
    examples=("deepseek-ai/DeepSeek-V3-0324", "deepseek-ai/DeepSeek-R1"),
    vllm_parser="deepseek_v3",
    sample=(_CALL_OPEN + "function" + TOOL_SEP + "write\n```json\n$ARGS\n```" + CALL_END
            + CALLS_END),
)

FORMAT_V31 = ToolFormat(
    name="deepseek_v31",
    parser=DeepSeekV31Parser,
    models=(r"deepseek-?v3\.[1-9]|deepseek-?v3-?1|deepseek-?v3\.2",),
    rank=30,  # before V3
    examples=("deepseek-ai/DeepSeek-V3.1", "deepseek-ai/DeepSeek-V3.2-Exp"),
    # V3 writes the same markers: when nothing but the markers tells, they are read as V3.1
    markers=(CALLS_BEGIN, CALL_BEGIN),
    vllm_parser="deepseek_v31",
    sample=_CALL_OPEN + "write" + TOOL_SEP + "$ARGS" + CALL_END + CALLS_END,
)
