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
from ._declaration import ToolFormat
from ._stream import Collector, Markers, StreamParser, emit_plain

CALL_START = "<start_function_call>"
CALL_END = "<end_function_call>"
ESCAPE = "<escape>"
CALL_PREFIX = "call:"

ARGS_OPEN = "{"

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


class FunctionGemmaParser(StreamParser):
    """FunctionGemma calls, converted to JSON arguments while streaming."""

    name = "functiongemma"

    #: the tokens around a call and its strings (Gemma 4 spells them its own way)
    _CALL_START = CALL_START
    _CALL_END = CALL_END
    _ESCAPE = ESCAPE
    _IN_TEXT = Markers(CALL_START)
    _NAME_END = Markers(ARGS_OPEN, CALL_END)
    _IN_STRUCT = Markers(ESCAPE, CALL_END, CALL_START)
    _IN_STRING = Markers(ESCAPE)
    _AFTER_ARGS = Markers(CALL_END, CALL_START)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._collect = Collector(self._NAME_END)  # the name being read
        self._index = -1
        self._stack: list[str] = []  # "{" or "[" per open container
        self._expect_key = False
        self._token: list[str] = []  # a bare key or value being read

    def _emit(self, fragment: str, out: list[Event]) -> None:
        if fragment:
            out.append(ToolCallArgs(self._index, fragment))

    def _read_name(self) -> None:
        self._collect = Collector(self._NAME_END)
        self._state = _NAME_STATE

    def _name_text(self) -> str:
        """The text read after the call marker, without its ``call:`` prefix."""
        return self._collect.text().strip().removeprefix(CALL_PREFIX).strip()

    def _raw_call(self, out: list[Event], truncated: bool) -> None:
        """No ``{`` after the name: a malformed (or cut off) call, its raw text kept as the
        arguments."""
        text = self._name_text()
        m = _NAME.match(text)
        if not text or m is None:
            emit_plain(out, text, False)
            return
        index = self.next_index()
        out.append(ToolCallStart(index, m.group()))
        args = text[m.end():].strip() or ("" if truncated else "{}")
        if args:
            out.append(ToolCallArgs(index, args))
        out.append(ToolCallEnd(index, truncated))

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        if st == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok is None:
                return pos, True
            if tok == self._CALL_START:
                self._read_name()
            return pos, False
        if st == _NAME_STATE:
            end, m = self._collect.feed(data, pos, final)
            if m is None:
                return end, True
            if m.group() == self._CALL_END:
                self._raw_call(out, truncated=False)
                self._state = _TEXT
                return m.end(), False
            name = self._name_text()
            self._index = self.next_index()
            out.append(ToolCallStart(self._index, name))
            out.append(ToolCallArgs(self._index, "{"))
            self._stack, self._expect_key, self._token = ["{"], True, []
            self._state = _STRUCT
            return m.end(), False
        if st == _STRUCT:
            end, m = self._IN_STRUCT.scan(data, pos, final)
            self._emit(self._convert(data[pos:end]), out)
            if m is None:
                return end, True
            tok = m.group()
            if self._state == _CLOSED:  # the top-level braces closed in this chunk
                self._after_closed(tok, out)
            elif tok == self._ESCAPE:
                self._emit(self._flush() + '"', out)
                self._state = _STRING
            else:  # the call ended with brackets still open: malformed, kept as is
                self._emit(self._flush(), out)
                out.append(ToolCallEnd(self._index))
                if tok == self._CALL_START:
                    self._read_name()
                else:
                    self._state = _TEXT
            return m.end(), False
        if st == _STRING:
            end, m = self._IN_STRING.scan(data, pos, final)
            if end > pos:
                self._emit(json.dumps(data[pos:end], ensure_ascii=False)[1:-1], out)
            if m is None:
                return end, True
            self._emit('"', out)
            self._state = _STRUCT
            return m.end(), False
        # _CLOSED: the arguments are complete; wait for the end marker
        end, m = self._AFTER_ARGS.scan(data, pos, final)
        if m is None:
            return end, True
        self._after_closed(m.group(), out)
        return m.end(), False

    def _close(self, out: list[Event]) -> None:
        if self._state == _NAME_STATE:
            self._raw_call(out, truncated=True)
        elif self._state in (_STRUCT, _STRING, _CLOSED):
            if self._state == _STRUCT:
                self._emit(self._flush(), out)
            out.append(ToolCallEnd(self._index, truncated=self._state != _CLOSED))

    def _after_closed(self, marker: str, out: list[Event]) -> None:
        if marker == self._ESCAPE:  # stray text after the arguments: dropped, keep waiting
            self._state = _CLOSED
            return
        out.append(ToolCallEnd(self._index))
        if marker == self._CALL_START:
            self._read_name()
        else:
            self._state = _TEXT

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


FORMAT = ToolFormat(
    name="functiongemma",
    parser=FunctionGemmaParser,
    models=(r"functiongemma",),
    rank=120,
    examples=("google/functiongemma-270m-it",),
    markers=(CALL_START,),
    vllm_parser="functiongemma",
    sample="<start_function_call>call:write{text:<escape>$TEXT<escape>}<end_function_call>",
)
