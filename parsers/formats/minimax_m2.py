"""MiniMax-M2 / M2.1 / M2.5: XML-style calls inside ``<minimax:tool_call>`` sections.

::

    <minimax:tool_call>
    <invoke name="get_weather">
    <parameter name="city">Paris</parameter>
    </invoke>
    </minimax:tool_call>

Several ``<invoke>`` blocks in one section are parallel calls. Parameter values are raw text
typed by the tool's schema exactly like GLM's (:data:`~.glm45.GLM_VALUES`: a literal ``null``
for a parameter that may be null is null, an array or object written as JSON text is that array
or object); ``<think>...</think>`` is reasoning, and a section opened inside it is a draft,
decided by the reasoning rule. A value ends only at ``</parameter>``: one that
contains another closing tag (``</invoke>``, ``</minimax:tool_call>``) or the start of one is
kept whole.
"""

from __future__ import annotations

from typing import Any

from ..events import Event
from ._declaration import ToolFormat
from ._stream import THINK_END, THINK_START, Collector, Markers, StreamParser, XmlArgs
from .glm45 import GLM_VALUES

SECTION_START = "<minimax:tool_call>"
SECTION_END = "</minimax:tool_call>"
INVOKE_START = "<invoke name="
INVOKE_END = "</invoke>"
PARAM_START = "<parameter name="
PARAM_END = "</parameter>"
TAG_CLOSE = ">"

# states (reasoning is a flag, see StreamParser)
_TEXT, _SECTION, _INVOKE_NAME, _CALL, _PARAM_NAME, _VALUE = range(6)


def _attr(text: str) -> str:
    """``"get_weather"`` (or unquoted) -> ``get_weather``."""
    return text.strip().strip("\"'").strip()


class MiniMaxM2Parser(StreamParser):
    """MiniMax-M2 tool calls and reasoning."""

    name = "minimax_m2"

    #: the section's tokens (dots spells them its own way)
    _SECTION_START = SECTION_START
    _IN_TEXT = Markers(THINK_START, SECTION_START)
    # a section opened inside reasoning is a draft, decided by the reasoning rule
    _IN_THINK = Markers(THINK_END, SECTION_START)
    _IN_SECTION = Markers(INVOKE_START, SECTION_END)
    _NAME_END = Markers(TAG_CLOSE)
    _IN_CALL = Markers(PARAM_START, INVOKE_END, SECTION_END)
    _VALUE_END = Markers(PARAM_END)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._collect = Collector(self._NAME_END)  # the name or value being read
        self._key: str | None = None
        self._call: XmlArgs | None = None

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        if st == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok == self._SECTION_START:
                self._state = _SECTION
            return pos, tok is None
        if st == _SECTION or st == _CALL:  # between calls, between parameters: layout
            end, m = (self._IN_SECTION if st == _SECTION else self._IN_CALL).scan(data, pos, final)
            if m is None:
                return end, True
            tok = m.group()
            if tok == INVOKE_START:
                self._read(_INVOKE_NAME, self._NAME_END)
            elif tok == PARAM_START:
                self._read(_PARAM_NAME, self._NAME_END)
            elif st == _SECTION:
                self._state = _TEXT
            else:
                if self._call is not None:
                    self._call.end(out)
                    self._call = None
                self._state = _SECTION if tok == INVOKE_END else _TEXT
            return m.end(), False
        end, m = self._collect.feed(data, pos, final)
        if m is None:
            return end, True
        text = self._collect.text()
        if st == _INVOKE_NAME:
            self._call = XmlArgs(self, _attr(text), GLM_VALUES, out)
            self._state = _CALL
        elif st == _PARAM_NAME:
            self._key = _attr(text)
            self._read(_VALUE, self._VALUE_END)
        else:  # _VALUE
            if self._call is not None:
                self._call.member(self._key or "", text, out)
            self._key = None
            self._state = _CALL
        return m.end(), False

    def _close(self, out: list[Event]) -> None:
        st = self._state
        text = self._collect.text()
        if st == _INVOKE_NAME:
            name = _attr(text)
            if name:
                self._call = XmlArgs(self, name, GLM_VALUES, out)
        if self._call is not None:
            in_value = st == _VALUE
            key = self._key if in_value else (_attr(text) if st == _PARAM_NAME else None)
            self._call.truncate(key, text if in_value else None, out)
            self._call = None


FORMAT = ToolFormat(
    name="minimax_m2",
    parser=MiniMaxM2Parser,
    models=(r"minimax",),
    rank=140,
    examples=("MiniMaxAI/MiniMax-M2",),
    markers=(SECTION_START,),
    vllm_parser="minimax_m2",
    sample=('<minimax:tool_call>\n<invoke name="write">\n<parameter name="text">$TEXT'
            "</parameter>\n</invoke>\n</minimax:tool_call>"),
)
