"""MiniMax-M2 / M2.1 / M2.5: XML-style calls inside ``<minimax:tool_call>`` sections.

::

    <minimax:tool_call>
    <invoke name="get_weather">
    <parameter name="city">Paris</parameter>
    </invoke>
    </minimax:tool_call>

Several ``<invoke>`` blocks in one section are parallel calls. Parameter values are raw text
typed by the tool's schema exactly like GLM's (see :mod:`.glm45`); ``<think>...</think>`` is
reasoning.
"""

from __future__ import annotations

from typing import Any

from ..events import Event, Reasoning
from .base import MarkerParser, MarkerStream, text_event
from .glm45 import XmlCallBuilder

THINK_START = "<think>"
THINK_END = "</think>"
SECTION_START = "<minimax:tool_call>"
SECTION_END = "</minimax:tool_call>"
INVOKE_START = "<invoke name="
INVOKE_END = "</invoke>"
PARAM_START = "<parameter name="
PARAM_END = "</parameter>"
TAG_CLOSE = ">"

_TEXT_MARKERS = (THINK_START, SECTION_START)
_THINK_MARKERS = (THINK_END,)
_SECTION_MARKERS = (INVOKE_START, SECTION_END)
_NAME_MARKERS = (TAG_CLOSE,)
_CALL_MARKERS = (PARAM_START, INVOKE_END, SECTION_END)
_VALUE_MARKERS = (PARAM_END,)

# states
_TEXT, _THINK, _SECTION, _INVOKE_NAME, _CALL, _PARAM_NAME, _VALUE = range(7)


def _attr(text: str) -> str:
    """``"get_weather"`` (or unquoted) -> ``get_weather``."""
    return text.strip().strip("\"'").strip()


class MiniMaxM2Parser(MarkerParser):
    """MiniMax-M2 tool calls and reasoning."""

    name = "minimax_m2"

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._in = MarkerStream()
        self._state = _TEXT
        self._parts: list[str] = []
        self._key: str | None = None
        self._call: XmlCallBuilder | None = None

    def feed(self, text: str) -> list[Event]:
        self._in.push(text)
        return self._run(final=False)

    def finish(self) -> list[Event]:
        out = self._run(final=True)
        if self._state == _INVOKE_NAME:
            name = _attr("".join(self._parts))
            if name:
                self._call = XmlCallBuilder(self.next_index(), self.schema_of(name))
                self._call.start(name, out)
        if self._call is not None:
            in_value = self._state == _VALUE
            key = self._key if in_value else (
                _attr("".join(self._parts)) if self._state == _PARAM_NAME else None)
            self._call.truncate(key, "".join(self._parts) if in_value else None, out)
            self._call = None
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
                self._state = _THINK if marker == THINK_START else _SECTION
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
                self._state = _INVOKE_NAME if marker == INVOKE_START else _TEXT
                self._parts = []
            elif state in (_INVOKE_NAME, _PARAM_NAME):
                chunk, marker = src.until(_NAME_MARKERS, final)
                self._parts.append(chunk)
                if marker is None:
                    return out
                name = _attr("".join(self._parts))
                self._parts = []
                if state == _INVOKE_NAME:
                    self._call = XmlCallBuilder(self.next_index(), self.schema_of(name))
                    self._call.start(name, out)
                    self._state = _CALL
                else:
                    self._key = name
                    self._state = _VALUE
            elif state == _CALL:
                _, marker = src.until(_CALL_MARKERS, final)
                if marker is None:
                    return out
                if marker == PARAM_START:
                    self._state = _PARAM_NAME
                    continue
                if self._call is not None:
                    self._call.end(out)
                    self._call = None
                self._state = _SECTION if marker == INVOKE_END else _TEXT
            else:  # _VALUE
                chunk, marker = src.until(_VALUE_MARKERS, final)
                self._parts.append(chunk)
                if marker is None:
                    return out
                if self._call is not None:
                    self._call.member(self._key or "", "".join(self._parts), out)
                self._parts, self._key = [], None
                self._state = _CALL
