"""Kimi K2 (Instruct, 0905, Thinking): tool calls in a section of special tokens.

::

    <|tool_calls_section_begin|>
    <|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{...}<|tool_call_end|>
    <|tool_calls_section_end|>

The ``functions.NAME:IDX`` string is the call id the model refers back to in later turns,
so it is kept whole as ``ToolCallStart.id``; NAME (which may itself contain dots) is the
name. Arguments are raw JSON, streamed as they arrive. Some checkpoints spell the section
markers in the singular (``<|tool_call_section_begin|>``, as vLLM accepts); a call outside
any section is accepted too. Kimi K2 Thinking wraps reasoning in ``<think>...</think>``.
"""

from __future__ import annotations

import re
from typing import Any

from ..events import Event, Reasoning, ToolCallArgs, ToolCallEnd, ToolCallStart
from .base import MarkerParser, MarkerStream, text_event
from .generic_json import JsonArgs

THINK_START = "<think>"
THINK_END = "</think>"
SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_BEGIN_ALT = "<|tool_call_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
SECTION_END_ALT = "<|tool_call_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARG_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"

_TEXT_MARKERS = (THINK_START, SECTION_BEGIN, SECTION_BEGIN_ALT, CALL_BEGIN)
_THINK_MARKERS = (THINK_END,)
_SECTION_MARKERS = (CALL_BEGIN, SECTION_END, SECTION_END_ALT)
_ID_MARKERS = (ARG_BEGIN, CALL_END)
_ARG_ENDS = (CALL_END, SECTION_END, SECTION_END_ALT)

_CALL_ID = re.compile(r"^(?:functions\.)?(.+?)(?::\d+)?$", re.S)

# states
_TEXT, _THINK, _SECTION, _ID, _ARGS = range(5)


def name_from_id(call_id: str) -> str:
    """``functions.get_weather:0`` -> ``get_weather``."""
    m = _CALL_ID.match(call_id)
    return m.group(1) if m else call_id


class KimiK2Parser(MarkerParser):
    """Kimi K2 tool-call sections and reasoning."""

    name = "kimi_k2"

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._in = MarkerStream()
        self._state = _TEXT
        self._in_section = False
        self._parts: list[str] = []
        self._args: JsonArgs | None = None

    def feed(self, text: str) -> list[Event]:
        self._in.push(text)
        return self._run(final=False)

    def finish(self) -> list[Event]:
        out = self._run(final=True)
        if self._state == _ID:
            call_id = "".join(self._parts).strip()
            if call_id:
                index = self.next_index()
                out.append(ToolCallStart(index, name_from_id(call_id), call_id))
                out.append(ToolCallEnd(index, truncated=True))
        elif self._args is not None:
            args = self._args
            args.finish(out)
            out.append(ToolCallEnd(args.index, truncated=not args.complete))
            self._args = None
        self._state = _TEXT
        return out

    def _run(self, final: bool) -> list[Event]:
        out: list[Event] = []
        src = self._in
        while True:
            state = self._state
            if state == _TEXT:
                chunk, marker = src.until(_TEXT_MARKERS, final)
                text_event(chunk, out)
                if marker is None:
                    return out
                if marker == THINK_START:
                    self._state = _THINK
                elif marker == CALL_BEGIN:
                    self._state, self._parts = _ID, []
                else:
                    self._state, self._in_section = _SECTION, True
            elif state == _THINK:
                chunk, marker = src.until(_THINK_MARKERS, final)
                if chunk:
                    out.append(Reasoning(chunk))
                if marker is None:
                    return out
                self._state = _TEXT
            elif state == _SECTION:
                _, marker = src.until(_SECTION_MARKERS, final)  # whitespace between calls
                if marker is None:
                    return out
                if marker == CALL_BEGIN:
                    self._state, self._parts = _ID, []
                else:
                    self._state, self._in_section = _TEXT, False
            elif state == _ID:
                chunk, marker = src.until(_ID_MARKERS, final)
                self._parts.append(chunk)
                if marker is None:
                    return out
                call_id = "".join(self._parts).strip()
                index = self.next_index()
                out.append(ToolCallStart(index, name_from_id(call_id), call_id))
                if marker == ARG_BEGIN:
                    self._args = JsonArgs(index, _ARG_ENDS)
                    self._state = _ARGS
                else:
                    out.append(ToolCallArgs(index, "{}"))
                    out.append(ToolCallEnd(index))
                    self._after_call()
            else:  # _ARGS
                args = self._args
                if args is None:  # pragma: no cover - _ARGS always has a reader
                    self._state = _TEXT
                    continue
                src.pos, marker = args.feed(src.buf, src.pos, out, final)
                if marker is None:
                    return out
                if not args.emitted:
                    out.append(ToolCallArgs(args.index, "{}"))
                out.append(ToolCallEnd(args.index))
                self._args = None
                if marker == CALL_END:
                    self._after_call()
                else:
                    self._state, self._in_section = _TEXT, False

    def _after_call(self) -> None:
        self._state = _SECTION if self._in_section else _TEXT
