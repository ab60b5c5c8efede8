"""FunctionGemma: ``<start_function_call>call:NAME{...}<end_function_call>``.

The arguments are not JSON: keys are bare identifiers, strings are delimited by the
``<escape>`` token (which may contain anything, quotes, braces and markers included),
numbers and booleans are bare, objects and lists nest with ``{}``/``[]``::

    call:get_weather{city:<escape>Paris<escape>,days:3,opts:{units:<escape>metric<escape>}}

This is the syntax of the model's chat template (``format_argument``), which llama.cpp's and
vLLM's ``functiongemma`` parsers read back. It is converted to JSON as it streams: escaped
strings are JSON-escaped piece by piece, bare keys are quoted, bare values are kept when
they are JSON literals (Python's ``True``/``False``/``None`` are mapped) and quoted
otherwise. llama.cpp stops generation at ``<end_function_call>``, so a call whose braces
closed is complete without it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..events import Event, ToolCallArgs, ToolCallEnd, ToolCallStart
from .base import MarkerParser, MarkerStream, text_event

CALL_START = "<start_function_call>"
CALL_END = "<end_function_call>"
ESCAPE = "<escape>"
CALL_PREFIX = "call:"

_TEXT_MARKERS = (CALL_START,)
_NAME_MARKERS = ("{", CALL_END)
_STRUCT_MARKERS = (ESCAPE, CALL_END, CALL_START)
_STRING_MARKERS = (ESCAPE,)
_CLOSED_MARKERS = (CALL_END, CALL_START)

_WS = " \t\r\n"
_NAME = re.compile(r"[\w.\-]+")
_JSON_LITERAL = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null")
_PY_LITERALS = {"True": "true", "False": "false", "None": "null"}

# states
_TEXT, _NAME_STATE, _STRUCT, _STRING, _CLOSED = range(5)


def _bare_value(text: str) -> str:
    """JSON for a bare (unescaped) value: literals kept, anything else quoted."""
    if _JSON_LITERAL.fullmatch(text):
        return text
    return _PY_LITERALS.get(text) or json.dumps(text, ensure_ascii=False)


class FunctionGemmaParser(MarkerParser):
    """FunctionGemma calls, converted to JSON arguments while streaming."""

    name = "functiongemma"

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._in = MarkerStream()
        self._state = _TEXT
        self._parts: list[str] = []  # the name being read
        self._index = -1
        self._stack: list[str] = []  # "{" or "[" per open container
        self._expect_key = False
        self._token: list[str] = []  # a bare key or value being read

    def feed(self, text: str) -> list[Event]:
        self._in.push(text)
        return self._run(final=False)

    def finish(self) -> list[Event]:
        out = self._run(final=True)
        if self._state == _NAME_STATE:
            self._raw_call(out, truncated=True)
        elif self._state in (_STRUCT, _STRING, _CLOSED):
            if self._state == _STRUCT:
                self._emit(self._flush(), out)
            out.append(ToolCallEnd(self._index, truncated=self._state != _CLOSED))
        self._state = _TEXT
        return out

    def _emit(self, fragment: str, out: list[Event]) -> None:
        if fragment:
            out.append(ToolCallArgs(self._index, fragment))

    def _raw_call(self, out: list[Event], truncated: bool) -> None:
        """No ``{`` after the name: a malformed (or cut off) call, its raw text kept as the
        arguments."""
        text = "".join(self._parts).strip().removeprefix(CALL_PREFIX).strip()
        self._parts = []
        m = _NAME.match(text)
        if not text or m is None:
            text_event(text, out)
            return
        index = self.next_index()
        out.append(ToolCallStart(index, m.group()))
        args = text[m.end():].strip() or ("" if truncated else "{}")
        if args:
            out.append(ToolCallArgs(index, args))
        out.append(ToolCallEnd(index, truncated))

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
                self._state, self._parts = _NAME_STATE, []
            elif state == _NAME_STATE:
                chunk, marker = src.until(_NAME_MARKERS, final)
                self._parts.append(chunk)
                if marker is None:
                    return out
                if marker == CALL_END:
                    self._raw_call(out, truncated=False)
                    self._state = _TEXT
                    continue
                name = "".join(self._parts).strip().removeprefix(CALL_PREFIX).strip()
                self._parts = []
                self._index = self.next_index()
                out.append(ToolCallStart(self._index, name))
                out.append(ToolCallArgs(self._index, "{"))
                self._stack, self._expect_key, self._token = ["{"], True, []
                self._state = _STRUCT
            elif state == _STRUCT:
                chunk, marker = src.until(_STRUCT_MARKERS, final)
                self._emit(self._convert(chunk), out)
                if marker is None:
                    return out
                if self._state == _CLOSED:  # the top-level braces closed in this chunk
                    self._after_closed(marker, out)
                elif marker == ESCAPE:
                    self._emit(self._flush() + '"', out)
                    self._state = _STRING
                else:  # the call ended with brackets still open: malformed, kept as is
                    self._emit(self._flush(), out)
                    out.append(ToolCallEnd(self._index))
                    self._state = _NAME_STATE if marker == CALL_START else _TEXT
                    self._parts = []
            elif state == _STRING:
                chunk, marker = src.until(_STRING_MARKERS, final)
                if chunk:
                    self._emit(json.dumps(chunk, ensure_ascii=False)[1:-1], out)
                if marker is None:
                    return out
                self._emit('"', out)
                self._state = _STRUCT
            else:  # _CLOSED: the arguments are complete; wait for the end marker
                _, marker = src.until(_CLOSED_MARKERS, final)
                if marker is None:
                    return out
                self._after_closed(marker, out)

    def _after_closed(self, marker: str, out: list[Event]) -> None:
        if marker == ESCAPE:  # stray text after the arguments: dropped, keep waiting
            self._state = _CLOSED
            return
        out.append(ToolCallEnd(self._index))
        self._state = _NAME_STATE if marker == CALL_START else _TEXT
        self._parts = []

    def _flush(self) -> str:
        """The bare token read so far, as JSON (a value, or a key missing its colon)."""
        text = "".join(self._token).strip(_WS)
        self._token = []
        if not text:
            return ""
        if self._stack and self._stack[-1] == "{" and self._expect_key:
            return json.dumps(text, ensure_ascii=False)
        return _bare_value(text)

    def _convert(self, chunk: str) -> str:
        """Convert structure text (outside escaped strings) to JSON."""
        out: list[str] = []
        token = self._token
        for c in chunk:
            if self._state == _CLOSED:
                break  # text between the closing brace and the end marker is dropped
            if c in "{[":
                out.append(self._flush())
                out.append(c)
                self._stack.append(c)
                self._expect_key = c == "{"
                token = self._token
            elif c in "}]":
                out.append(self._flush())
                out.append(c)
                token = self._token
                if self._stack:
                    self._stack.pop()
                self._expect_key = False
                if not self._stack:
                    self._state = _CLOSED
            elif c == ",":
                out.append(self._flush())
                out.append(c)
                token = self._token
                self._expect_key = bool(self._stack) and self._stack[-1] == "{"
            elif c == ":" and self._expect_key and self._stack and self._stack[-1] == "{":
                key = "".join(token).strip(_WS)
                token.clear()
                out.append((json.dumps(key, ensure_ascii=False) if key else "") + ":")
                self._expect_key = False
            elif c in _WS and not token:
                continue
            else:
                token.append(c)
        return "".join(out)
