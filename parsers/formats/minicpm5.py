"""MiniCPM 5: XML elements, one per call (here with line breaks in the elements)::

    <function name="get_weather"><param name="city">Oslo</param><param name="days">3</param>
    </function>
    <function name="write"><param name="text"><![CDATA[two
    lines]]></param></function>

as vLLM's ``minicpm5`` parser and SGLang's ``minicpm5`` detector read it: the name and each
parameter's name in an attribute (double, single or no quotes; the collapsed spellings
``<functionname=`` and ``<paramname=`` that some outputs have too), the parameters directly
in the function or in an ``<arguments>`` element. A value is CDATA, kept exactly as written,
or text, stripped, with XML's five entities (``&lt;``, ``&amp;``, ...) decoded as an XML
parser would; it is typed by the tool's schema like GLM's (:data:`~.glm45.GLM_VALUES`: a
string parameter keeps its text, other values are read as JSON or a Python literal). A value
whose ``</param>`` never comes ends at the next parameter or at ``</function>``.

The peers drop a call to a tool the request did not declare, or one missing a required
parameter, as text; here such a call reaches validation, which repairs or refuses it in the
client's API shape. Reasoning is ``<think>``...``</think>``; a call written there is a draft,
decided by the reasoning rule.
"""

from __future__ import annotations

import re
from typing import Any

from ..events import Event
from ._declaration import ToolFormat
from ._stream import THINK_END, THINK_START, WS_LIMIT, Collector, Markers, StreamParser, XmlArgs
from .glm45 import GLM_VALUES

FUNCTION_START = "<function name="
FUNCTION_START_COLLAPSED = "<functionname="
FUNCTION_END = "</function>"
PARAM_START = "<param name="
PARAM_START_COLLAPSED = "<paramname="
PARAM_END = "</param>"
ARGUMENTS_START = "<arguments>"
ARGUMENTS_END = "</arguments>"
CDATA_START = "<![CDATA["
CDATA_END = "]]>"
TAG_END = ">"

_FUNCTION_STARTS = (FUNCTION_START, FUNCTION_START_COLLAPSED)
_PARAM_STARTS = (PARAM_START, PARAM_START_COLLAPSED)
#: the attribute value: quoted (either quote) or bare, then whatever other attributes
_ATTR = re.compile(r"""\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]*))""")
_ENTITIES = re.compile(r"&(lt|gt|amp|quot|apos);")
_ENTITY_CHARS = {"lt": "<", "gt": ">", "amp": "&", "quot": '"', "apos": "'"}

# states (reasoning is a flag, see StreamParser)
_TEXT, _NAME, _PARAMS, _KEY, _VALUE_START, _CDATA, _AFTER_CDATA, _VALUE = range(8)


def attribute_value(text: str) -> str:
    """The first attribute's value in the text of a start tag after ``name=``."""
    m = _ATTR.match(text)
    if m is None:  # pragma: no cover - the pattern matches any text
        return text.strip()
    return next((g for g in m.groups() if g is not None), "").strip()


def xml_text(text: str) -> str:
    """Text content as an XML parser gives it: the five predefined entities decoded."""
    return _ENTITIES.sub(lambda m: _ENTITY_CHARS[m.group(1)], text) if "&" in text else text


class MiniCpm5Parser(StreamParser):
    """MiniCPM 5 ``<function name=…><param name=…>`` calls, with ``<think>`` reasoning."""

    name = "minicpm5"

    _IN_TEXT = Markers(THINK_START, *_FUNCTION_STARTS)
    _IN_THINK = Markers(THINK_END, *_FUNCTION_STARTS)
    _TAG_END = Markers(TAG_END)
    _IN_FUNCTION = Markers(*_PARAM_STARTS, FUNCTION_END, ARGUMENTS_START, ARGUMENTS_END)
    _CDATA = Markers(CDATA_START)
    _CDATA_END = Markers(CDATA_END)
    _VALUE_END = Markers(PARAM_END, *_PARAM_STARTS, FUNCTION_END)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._collect = Collector(self._TAG_END)  # the name, key or value being read
        self._call: XmlArgs | None = None
        self._key: str | None = None
        self._cdata: str | None = None  # the value's CDATA, once read
        self._ws = 0  # whitespace skipped before a value (bounded by WS_LIMIT)

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        if st == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok in _FUNCTION_STARTS:
                self._read(_NAME, self._TAG_END)
            return pos, tok is None
        if st == _PARAMS:
            end, m = self._IN_FUNCTION.scan(data, pos, final)  # whitespace, or tags ignored
            if m is None:
                return end, True
            self._on_function_marker(m.group(), out)
            return m.end(), False
        if st == _VALUE_START:
            return self._value_start(data, pos, final)
        end, m = self._collect.feed(data, pos, final)
        if m is None:
            return end, True
        text = self._collect.text()
        if st == _NAME:
            self._call = XmlArgs(self, attribute_value(text), GLM_VALUES, out)
            self._state = _PARAMS
        elif st == _KEY:
            self._key = attribute_value(text)
            self._cdata, self._ws = None, 0
            self._state = _VALUE_START
        elif st == _CDATA:
            self._cdata = text
            self._read(_AFTER_CDATA, self._VALUE_END)
        else:  # _VALUE or _AFTER_CDATA: the value ends at this marker
            self._member(text, out)
            tok = m.group()
            if tok != PARAM_END:
                self._on_function_marker(tok, out)
            else:
                self._state = _PARAMS
        return m.end(), False

    def _value_start(self, data: str, pos: int, final: bool) -> tuple[int, bool]:
        """Before a value: whitespace, then CDATA or text."""
        n = len(data)
        while pos < n and data[pos] in " \t\r\n" and self._ws < WS_LIMIT:
            pos += 1
            self._ws += 1
        if pos >= n and not final:
            return pos, True
        hit = self._CDATA.at(data, pos, final) if pos < n else None
        if hit is True:
            return pos, True
        if hit:
            self._read(_CDATA, self._CDATA_END)
            return pos + len(CDATA_START), False
        self._read(_VALUE, self._VALUE_END)
        return pos, False

    def _on_function_marker(self, tok: str, out: list[Event]) -> None:
        if tok in _PARAM_STARTS:
            self._read(_KEY, self._TAG_END)
        elif tok == FUNCTION_END:
            if self._call is not None:
                self._call.end(out)
            self._call, self._key = None, None
            self._state = _TEXT
        else:  # <arguments>, </arguments>: the parameters may sit in that element
            self._state = _PARAMS

    def _member(self, text: str, out: list[Event]) -> None:
        raw = self._cdata if self._cdata is not None else xml_text(text).strip()
        if self._call is not None:
            self._call.member(self._key or "", raw, out)
        self._key, self._cdata = None, None

    def _close(self, out: list[Event]) -> None:
        st = self._state
        text = self._collect.text()
        if st == _NAME:
            name = attribute_value(text)
            if name:
                self._call = XmlArgs(self, name, GLM_VALUES, out)
        if self._call is None:
            return
        if st in (_VALUE, _CDATA, _AFTER_CDATA, _VALUE_START):
            if st == _VALUE:
                partial = xml_text(text).lstrip()
            elif st == _CDATA:
                partial = text
            else:
                partial = self._cdata or ""
            self._call.truncate(self._key, partial, out)
        else:
            self._call.truncate(None, None, out)
        self._call = None


FORMAT = ToolFormat(
    name="minicpm5",
    parser=MiniCpm5Parser,
    models=(r"minicpm-?5",),
    rank=380,
    examples=("openbmb/MiniCPM5-1B", "openbmb/MiniCPM5-2B"),
    markers=_FUNCTION_STARTS,
    vllm_parser="minicpm5",
    sample=('<function name="write"><param name="text"><![CDATA[$TEXT]]></param>'
            "</function>"),
)
