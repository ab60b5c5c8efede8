"""Kimi K2 (Instruct, 0905, Thinking): tool calls in a section of special tokens.

::

    <|tool_calls_section_begin|>
    <|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{...}<|tool_call_end|>
    <|tool_calls_section_end|>

The ``functions.NAME:IDX`` string is the call id the model refers back to in later turns,
so it is kept whole as ``ToolCallStart.id``; NAME (which may itself contain dots) is the
name. Arguments are raw JSON, streamed as they arrive. Some checkpoints spell the section
markers in the singular (``<|tool_call_section_begin|>``, as vLLM accepts); a call outside
any section is accepted too. Kimi K2 Thinking wraps reasoning in ``<think>...</think>``, and
often starts its call section without closing the reasoning first (vLLM's ``kimi_k2`` reasoning
parser ends the reasoning there). The section is read as calls inside reasoning too, so that
``<think>...<|tool_calls_section_begin|>...`` that never writes ``</think>`` still calls: the
model's final act. Whether a call written inside reasoning counts is not this parser's
decision but the reasoning rule's (a call the model drafted and reasoned past never fires).

These markers are special tokens: a stray one (a section or call closer with nothing open, an
argument marker out of place) is dropped, never left in the content.
"""

from __future__ import annotations

import re
from typing import Any

from ..events import Event, ToolCallArgs, ToolCallEnd, ToolCallStart
from ._declaration import ToolFormat
from ._stream import THINK_END, THINK_START, Collector, JsonArgs, Markers, StreamParser

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_BEGIN_ALT = "<|tool_call_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
SECTION_END_ALT = "<|tool_call_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARG_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"

_ARG_ENDS = (CALL_END, SECTION_END, SECTION_END_ALT)
#: special tokens with no meaning in text: dropped
_STRAY_TOKENS = (SECTION_END, SECTION_END_ALT, CALL_END, ARG_BEGIN)
_CALL_ID = re.compile(r"^(?:functions\.)?(.+?)(?::\d+)?$", re.S)

# states (reasoning is a flag, see StreamParser)
_TEXT, _SECTION, _ID, _ARGS = range(4)


def name_from_id(call_id: str) -> str:
    """``functions.get_weather:0`` -> ``get_weather``."""
    m = _CALL_ID.match(call_id)
    return m.group(1) if m else call_id


class KimiK2Parser(StreamParser):
    """Kimi K2 tool-call sections and reasoning."""

    name = "kimi_k2"

    _IN_TEXT = Markers(THINK_START, SECTION_BEGIN, SECTION_BEGIN_ALT, CALL_BEGIN, *_STRAY_TOKENS)
    # a section opened inside reasoning is read as calls there too (see the module docstring)
    _IN_THINK = Markers(THINK_END, SECTION_BEGIN, SECTION_BEGIN_ALT, CALL_BEGIN, *_STRAY_TOKENS)
    _STRAYS = frozenset(_STRAY_TOKENS)
    _IN_SECTION = Markers(CALL_BEGIN, SECTION_END, SECTION_END_ALT)
    _ID_END = Markers(ARG_BEGIN, CALL_END)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._in_section = False
        self._collect = Collector(self._ID_END)
        self._args: JsonArgs | None = None

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        if st == _TEXT or st == _SECTION:
            if st == _TEXT:
                pos, tok = self._plain(data, pos, final, out)
            else:  # whitespace between calls
                end, m = self._IN_SECTION.scan(data, pos, final)
                pos, tok = (end, None) if m is None else (m.end(), m.group())
            if tok == CALL_BEGIN:
                self._collect = Collector(self._ID_END)
                self._state = _ID
            elif tok in (SECTION_BEGIN, SECTION_BEGIN_ALT):
                self._state, self._in_section = _SECTION, True
            elif tok in (SECTION_END, SECTION_END_ALT):
                self._state, self._in_section = _TEXT, False
            return pos, tok is None
        if st == _ID:
            end, m = self._collect.feed(data, pos, final)
            if m is None:
                return end, True
            call_id = self._collect.text().strip()
            index = self.next_index()
            out.append(ToolCallStart(index, name_from_id(call_id), call_id))
            if m.group() == ARG_BEGIN:
                self._args = JsonArgs(index, _ARG_ENDS)
                self._state = _ARGS
            else:
                out.append(ToolCallArgs(index, "{}"))
                out.append(ToolCallEnd(index))
                self._after_call()
            return m.end(), False
        # _ARGS
        assert self._args is not None
        pos, marker = self._args.feed(data, pos, out, final)
        if marker is None:
            return pos, True
        self._args = None
        if marker == CALL_END:
            self._after_call()
        else:
            self._state, self._in_section = _TEXT, False
        return pos, False

    def _after_call(self) -> None:
        self._state = _SECTION if self._in_section else _TEXT

    def _close(self, out: list[Event]) -> None:
        if self._state == _ID:
            call_id = self._collect.text().strip()
            if call_id:
                index = self.next_index()
                out.append(ToolCallStart(index, name_from_id(call_id), call_id))
                out.append(ToolCallEnd(index, truncated=True))
        elif self._args is not None:
            self._args.finish(out)
            self._args = None


FORMAT = ToolFormat(
    name="kimi_k2",
    parser=KimiK2Parser,
    models=(r"kimi",),
    rank=100,
    examples=("moonshotai/Kimi-K2-Instruct", "moonshotai/Kimi-K2-Thinking"),
    markers=(SECTION_BEGIN,),
    vllm_parser="kimi_k2",
    sample=("<|tool_calls_section_begin|><|tool_call_begin|>functions.write:0"
            "<|tool_call_argument_begin|>$ARGS<|tool_call_end|><|tool_calls_section_end|>"),
)
