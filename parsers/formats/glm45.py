"""GLM-4.5 / 4.6 / 4.7: ``<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value></tool_call>``.

GLM-4.5/4.6 put a newline after the name and between the tags; GLM-4.7 writes them back to
back. Values are raw text: the chat template writes strings as-is and everything else as
JSON, so a value is typed by the tool's JSON schema (strings kept raw, other types parsed as
JSON, then as a Python literal, else kept as a string), as vLLM's ``glm45`` parser does. The
arguments JSON is built here, one member per complete value. ``<think>...</think>`` is
reasoning.

This module also holds the value typing and argument building shared with the other
XML-style format (MiniMax-M2).
"""

from __future__ import annotations

import ast
import json
from typing import Any

from ..events import Event, Reasoning, ToolCallArgs, ToolCallEnd, ToolCallStart
from .base import MarkerParser, MarkerStream, text_event

THINK_START = "<think>"
THINK_END = "</think>"
CALL_START = "<tool_call>"
CALL_END = "</tool_call>"
KEY_START = "<arg_key>"
KEY_END = "</arg_key>"
VALUE_START = "<arg_value>"
VALUE_END = "</arg_value>"

_TEXT_MARKERS = (THINK_START, CALL_START)
_THINK_MARKERS = (THINK_END,)
_NAME_MARKERS = ("\n", KEY_START, CALL_END)
_ARGS_MARKERS = (KEY_START, VALUE_START, CALL_END)
_KEY_MARKERS = (KEY_END, VALUE_START, CALL_END)
_VALUE_MARKERS = (VALUE_END,)

_NOT_STRING = ("integer", "number", "boolean", "object", "array", "null")


def _schema_types(prop: Any) -> set[str]:
    if not isinstance(prop, dict):
        return set()
    t = prop.get("type")
    types = {t} if isinstance(t, str) else {x for x in t if isinstance(x, str)} \
        if isinstance(t, list) else set()
    for alt in ("anyOf", "oneOf"):
        for sub in prop.get(alt) or ():
            types |= _schema_types(sub)
    if not types and isinstance(prop.get("enum"), list):
        types = {"string"} if all(isinstance(v, str) for v in prop["enum"]) else set()
    return types


def is_string_param(schema: dict[str, Any] | None, key: str) -> bool | None:
    """True/False when the schema says whether ``key`` is a string; None when it doesn't."""
    props = schema.get("properties") if isinstance(schema, dict) else None
    types = _schema_types(props.get(key)) if isinstance(props, dict) else set()
    if not types:
        return None
    return "string" in types or not types & set(_NOT_STRING)


def typed_value(raw: str, schema: dict[str, Any] | None, key: str) -> str:
    """The JSON text of one raw XML-style value, typed by the tool's schema."""
    if is_string_param(schema, key) is not True:
        text = raw.strip()
        for parse in (json.loads, ast.literal_eval):
            try:
                return json.dumps(parse(text), ensure_ascii=False, allow_nan=False)
            except Exception:  # any failure means "not this kind of value"
                continue
    return json.dumps(raw, ensure_ascii=False)


def trim_value(raw: str) -> str:
    """Templates put the value on its own line; drop one newline each side, keep the rest."""
    if raw.startswith("\n"):
        raw = raw[1:]
    if raw.endswith("\n"):
        raw = raw[:-1]
    return raw


class XmlCallBuilder:
    """Builds the arguments JSON of an XML-style call member by member, as fragments."""

    __slots__ = ("count", "index", "schema")

    def __init__(self, index: int, schema: dict[str, Any] | None) -> None:
        self.index = index
        self.schema = schema
        self.count = 0

    def start(self, name: str, out: list[Event]) -> None:
        out.append(ToolCallStart(self.index, name))

    def member(self, key: str, raw: str, out: list[Event]) -> None:
        key = key.strip()
        lead = "{" if self.count == 0 else ", "
        self.count += 1
        value = typed_value(trim_value(raw), self.schema, key)
        out.append(ToolCallArgs(self.index, f"{lead}{json.dumps(key, ensure_ascii=False)}: "
                                            f"{value}"))

    def end(self, out: list[Event]) -> None:
        out.append(ToolCallArgs(self.index, "}" if self.count else "{}"))
        out.append(ToolCallEnd(self.index))

    def truncate(self, key: str | None, partial: str | None, out: list[Event]) -> None:
        """The stream ended inside the call: emit what there is as unterminated JSON."""
        frag = "{" if self.count == 0 else ""
        if key is not None:
            key = key.strip()
            frag += ("" if self.count == 0 else ", ") + json.dumps(key, ensure_ascii=False) + ": "
            if partial is not None:
                partial = partial[1:] if partial.startswith("\n") else partial
                if is_string_param(self.schema, key) is False:
                    frag += partial
                else:  # an unterminated string: repair closes it
                    frag += json.dumps(partial, ensure_ascii=False)[:-1]
        if frag:
            out.append(ToolCallArgs(self.index, frag))
        out.append(ToolCallEnd(self.index, truncated=True))


# states
_TEXT, _THINK, _NAME, _ARGS, _KEY, _VALUE = range(6)


class Glm45Parser(MarkerParser):
    """GLM-4.5/4.6/4.7 tool calls and reasoning."""

    name = "glm45"

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._in = MarkerStream()
        self._state = _TEXT
        self._parts: list[str] = []  # the name, key or value being read
        self._key: str | None = None
        self._call: XmlCallBuilder | None = None

    def feed(self, text: str) -> list[Event]:
        self._in.push(text)
        return self._run(final=False)

    def finish(self) -> list[Event]:
        out = self._run(final=True)
        if self._state == _NAME:
            name = "".join(self._parts).strip()
            if name:
                self._begin(name, out)
        if self._call is not None:
            partial = "".join(self._parts) if self._state == _VALUE else None
            key = self._key if self._state == _VALUE else None
            self._call.truncate(key, partial, out)
            self._call = None
        self._state = _TEXT
        return out

    def _begin(self, name: str, out: list[Event]) -> None:
        self._call = XmlCallBuilder(self.next_index(), self.schema_of(name))
        self._call.start(name, out)

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
                self._state = _THINK if marker == THINK_START else _NAME
                self._parts = []
            elif state == _THINK:
                chunk, marker = src.until(_THINK_MARKERS, final)
                if chunk:
                    out.append(Reasoning(chunk))
                if marker is None:
                    return out
                self._state = _TEXT
            elif state == _NAME:
                chunk, marker = src.until(_NAME_MARKERS, final)
                self._parts.append(chunk)
                if marker is None:
                    return out
                name = "".join(self._parts).strip()
                if marker == "\n" and not name:
                    continue  # a newline before the name
                self._parts = []
                self._begin(name, out)
                self._state = _KEY if marker == KEY_START else _ARGS
                if marker == CALL_END:
                    self._end(out)
            elif state == _ARGS:
                _, marker = src.until(_ARGS_MARKERS, final)  # only whitespace in between
                if marker is None:
                    return out
                self._on_args_marker(marker, out)
            elif state == _KEY:
                chunk, marker = src.until(_KEY_MARKERS, final)
                self._parts.append(chunk)
                if marker is None:
                    return out
                self._key = "".join(self._parts)
                self._parts = []
                self._state = _ARGS
                if marker != KEY_END:
                    self._on_args_marker(marker, out)
            else:  # _VALUE
                chunk, marker = src.until(_VALUE_MARKERS, final)
                self._parts.append(chunk)
                if marker is None:
                    return out
                if self._call is not None:
                    self._call.member(self._key or "", "".join(self._parts), out)
                self._parts, self._key = [], None
                self._state = _ARGS

    def _on_args_marker(self, marker: str, out: list[Event]) -> None:
        if marker == KEY_START:
            self._state = _KEY
        elif marker == VALUE_START:
            self._state = _VALUE
        else:
            self._end(out)

    def _end(self, out: list[Event]) -> None:
        if self._call is not None:
            self._call.end(out)
        self._call = None
        self._parts, self._key = [], None
        self._state = _TEXT
