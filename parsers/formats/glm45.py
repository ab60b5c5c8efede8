"""GLM-4.5 / 4.6 / 4.7: ``<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value></tool_call>``.

GLM-4.5/4.6 put a newline after the name and between the tags; GLM-4.7 writes them back to
back. Values are raw text: the chat template writes strings as-is and everything else as
JSON, so a value is typed by the tool's JSON schema (strings kept raw, other types parsed as
JSON, then as a Python literal, else kept as a string), as vLLM's ``glm45`` parser does
(:data:`~._stream.PARSED`), with two corrections (:data:`GLM_VALUES`, shared by MiniMax-M2):

* a parameter whose schema allows only arrays or objects (and null) gets the array or object
  its value spells as JSON text, also when the model escaped the quotes (``[{\\"a\\": 1}]``,
  as GLM-4.6/4.7 write now and then) or wrapped it in a JSON string; such a value must never
  stay a string, which schema repair would then wrap into a one-element list: valid, and
  silently wrong;
* a literal ``null`` for a parameter that may be null is null, not the string ``"null"``.

The arguments JSON is built here, one member per complete value. ``<think>...</think>`` is
reasoning; a call written inside it is a draft, decided by the reasoning rule.

Ling 3 (vLLM's and SGLang's ``ling3``) writes these calls too, GLM-4.7's way: the first
``<arg_key>`` right after the name, or ``</tool_call>`` right after it for a call without
arguments; this parser reads both (the name ends at a newline, ``<arg_key>`` or
``</tool_call>``), so Ling 3 is this format under its own model names. So is poolside's
Laguna (vLLM's and SGLang's ``poolside_v1``): GLM-4.5's layout, a newline after the name and
after each tag. And so is Spark-X2.5 (SGLang's ``spark25``), the name on the first line.
"""

from __future__ import annotations

import json
from typing import Any

from ..events import Event
from ._declaration import ToolFormat
from ._stream import (
    THINK_END,
    THINK_START,
    Collector,
    Markers,
    ParsedValues,
    StreamParser,
    XmlArgs,
    literal_eval_quiet,
    schema_types,
)

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"
KEY_START = "<arg_key>"
KEY_END = "</arg_key>"
VALUE_START = "<arg_value>"
VALUE_END = "</arg_value>"
NAME_END = "\n"

# states (reasoning is a flag, see StreamParser)
_TEXT, _NAME, _ARGS, _KEY, _VALUE = range(5)

_CONTAINERS: dict[str, type] = {"array": list, "object": dict}


def container_from_text(text: str, types: set[str]) -> list[Any] | dict[str, Any] | None:
    """The array or object that ``text`` spells, when ``types`` (the parameter's schema types)
    admit one: plain JSON, JSON with its quotes backslash-escaped, JSON inside a JSON string,
    or a Python literal. None when it spells none of them."""
    wanted = tuple(_CONTAINERS[t] for t in types if t in _CONTAINERS)
    readings = [text]
    try:  # the escaped form: the text is the inside of a JSON string
        readings.append(json.loads('"' + text + '"', strict=False))
    except ValueError:
        pass
    for reading in readings:
        for parse in (json.loads, literal_eval_quiet):
            try:
                value = parse(reading)
            except Exception:  # any failure: not this reading
                continue
            if isinstance(value, str):  # JSON text inside a JSON string
                try:
                    value = json.loads(value)
                except ValueError:
                    continue
            if isinstance(value, tuple):
                value = list(value)
            if isinstance(value, wanted):
                return value
    return None


class JsonTextValues(ParsedValues):
    """The glm45 typing rule, with arrays and objects read from their JSON text however it was
    written, and null read as null where the schema allows it (see the module docstring)."""

    def complete(self, raw: str, prop: Any) -> str:
        types = schema_types(prop)
        text = raw.strip()
        if text == "null" and "null" in types:
            return "null"
        if types & _CONTAINERS.keys() and "string" not in types:
            value = container_from_text(text, types)
            if value is not None:
                return json.dumps(value, ensure_ascii=False, allow_nan=False)
        return super().complete(raw, prop)


#: how GLM and MiniMax-M2 values are typed
GLM_VALUES = JsonTextValues()


class Glm45Parser(StreamParser):
    """GLM-4.5/4.6/4.7 tool calls and reasoning."""

    name = "glm45"

    #: the call's tags (IQuest-Q1 writes GLM's calls in tags of its own)
    _CALL_OPEN = CALL_START
    _CALL_CLOSE = CALL_END
    _IN_TEXT = Markers(THINK_START, CALL_START)
    # a call written inside reasoning is a draft, decided by the reasoning rule (GLM-4.5+
    # sometimes calls without closing its reasoning first: the model's final act)
    _IN_THINK = Markers(THINK_END, CALL_START)
    _NAME_END = Markers(NAME_END, KEY_START, CALL_END)
    _ARGS_NEXT = Markers(KEY_START, VALUE_START, CALL_END)
    _KEY_END = Markers(KEY_END, VALUE_START, CALL_END)
    _VALUE_END = Markers(VALUE_END)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._collect = Collector(self._NAME_END)  # the name, key or value being read
        self._key: str | None = None
        self._call: XmlArgs | None = None

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        if st == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok == self._CALL_OPEN:
                self._read(_NAME, self._NAME_END)
            return pos, tok is None
        if st == _ARGS:
            end, m = self._ARGS_NEXT.scan(data, pos, final)  # only whitespace in between
            if m is None:
                return end, True
            self._on_args_marker(m.group(), out)
            return m.end(), False
        end, m = self._collect.feed(data, pos, final)
        if m is None:
            return end, True
        tok = m.group()
        text = self._collect.text()
        if st == _NAME:
            name = text.strip()
            if tok == NAME_END and not name:
                return m.end(), False  # a newline before the name
            self._call = XmlArgs(self, name, GLM_VALUES, out)
            if tok == KEY_START:
                self._read(_KEY, self._KEY_END)
            elif tok == self._CALL_CLOSE:
                self._end(out)
            else:
                self._state = _ARGS
        elif st == _KEY:
            self._key = text
            self._state = _ARGS
            if tok != KEY_END:
                self._on_args_marker(tok, out)
        else:  # _VALUE
            if self._call is not None:
                self._call.member(self._key or "", text, out)
            self._key = None
            self._state = _ARGS
        return m.end(), False

    def _on_args_marker(self, marker: str, out: list[Event]) -> None:
        if marker == KEY_START:
            self._read(_KEY, self._KEY_END)
        elif marker == VALUE_START:
            self._read(_VALUE, self._VALUE_END)
        else:
            self._end(out)

    def _end(self, out: list[Event]) -> None:
        if self._call is not None:
            self._call.end(out)
        self._call = None
        self._key = None
        self._state = _TEXT

    def _close(self, out: list[Event]) -> None:
        st = self._state
        text = self._collect.text()
        if st == _NAME:
            name = text.strip()
            if name:
                self._call = XmlArgs(self, name, GLM_VALUES, out)
        if self._call is not None:
            in_value = st == _VALUE
            self._call.truncate(self._key if in_value else None, text if in_value else None,
                                out)
            self._call = None


FORMAT = ToolFormat(
    name="glm45",
    parser=Glm45Parser,
    models=(r"glm-?4\.[5-9]|glm-?4-?(5|6|7)", r"(?<![a-z])ling-?3", r"laguna|poolside",
            r"spark-?x?2[._]5"),
    rank=90,
    examples=("zai-org/GLM-4.5", "zai-org/GLM-4.7", "inclusionAI/Ling-3.0-flash",
              "poolside/Laguna-XS.2", "XHToken/Spark-X2.5-4B"),
    markers=(CALL_START,),  # shared: GLM's is the one followed by a name
    vllm_parser="glm45",
    vllm_aliases=("glm47", "ling3", "poolside_v1"),
    sample="<tool_call>write\n<arg_key>text</arg_key>\n<arg_value>$TEXT</arg_value>\n</tool_call>",
)
