"""Qwen3-Coder XML tool calls::

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Oslo
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

Parameter values are raw text, typed by the tool's JSON schema: strings stay as written (one
leading and one trailing newline removed, as vLLM's qwen3coder parser does), other types are
parsed from the text (JSON, or a Python literal for ``True``/``None``/single quotes). The
parser builds the JSON arguments itself and emits them one parameter at a time.

A value ends only at ``</parameter>`` (or ``</function>`` when the model leaves the former
out, as vLLM tolerates), so ``</tool_call>`` inside code in a value is kept. A bare
``<function=`` without the ``<tool_call>`` wrapper is accepted, and so is a Hermes-style JSON
call inside ``<tool_call>`` (Qwen3-Coder falls back to it now and then).
"""

from __future__ import annotations

import ast
import json
from typing import Any

from ..events import Event, ToolCallArgs, ToolCallEnd, ToolCallStart
from ._stream import (
    DONE,
    MORE,
    STOP,
    WS_LIMIT,
    CallReader,
    Collector,
    Markers,
    StreamParser,
    emit_plain,
    skip_ws,
)

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
FUNCTION_START = "<function="
FUNCTION_END = "</function>"
PARAMETER_START = "<parameter="
PARAMETER_END = "</parameter>"
TAG_CLOSE = ">"
THINK_START = "<think>"
THINK_END = "</think>"

# states
_TEXT, _THINK, _WRAP, _FNAME, _FUNC, _PNAME, _PVALUE, _AFTER_FUNC, _JSON = range(9)

_PY_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "object": (dict,), "array": (list, tuple), "null": (type(None),),
}


def schema_types(schema: Any) -> set[str]:
    """The JSON types a (sub)schema allows, from ``type``, ``anyOf``/``oneOf`` or ``enum``."""
    if not isinstance(schema, dict):
        return set()
    t = schema.get("type")
    if isinstance(t, str):
        return {t}
    if isinstance(t, list):
        return {x for x in t if isinstance(x, str)}
    out: set[str] = set()
    for key in ("anyOf", "oneOf"):
        alts = schema.get(key)
        if isinstance(alts, list):
            for alt in alts:
                out |= schema_types(alt)
    if not out and isinstance(schema.get("enum"), list):
        for v in schema["enum"]:
            out |= {name for name, py in _PY_TYPES.items()
                    if isinstance(v, py) and not (isinstance(v, bool) and name != "boolean")}
    return out


def _fits(value: Any, types: set[str]) -> bool:
    for name in types:
        py = _PY_TYPES.get(name)
        if py is None:
            continue
        if isinstance(value, bool) and name != "boolean":
            continue
        if name == "integer" and isinstance(value, float):
            if value.is_integer():
                return True
            continue
        if isinstance(value, py):
            return True
    return False


def convert_value(raw: str, schema: Any) -> Any:
    """Type one raw parameter value by its schema; the raw string when it cannot be typed
    (validation reports that later, rather than the parser guessing)."""
    types = schema_types(schema)
    if not types or types == {"string"}:
        return raw
    text = raw.strip()
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
        except Exception:  # any parse failure: try the next reading
            continue
        if isinstance(value, tuple):
            value = list(value)
        if _fits(value, types):
            if "integer" in types and isinstance(value, float) and "number" not in types:
                value = int(value)
            return value
    if "boolean" in types and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if "null" in types and text.lower() in ("null", "none"):
        return None
    return raw


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):  # a value only Python can hold: keep it as text
        return json.dumps(str(value), ensure_ascii=False)


def _strip_one_newline(value: str) -> str:
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


class Qwen3CoderParser(StreamParser):
    """Qwen3-Coder ``<function=...><parameter=...>`` calls, arguments typed by schema."""

    name = "qwen3_coder"

    _IN_TEXT = Markers(TOOL_CALL_START, FUNCTION_START, TOOL_CALL_END, THINK_START)
    _IN_THINK = Markers(THINK_END, TOOL_CALL_START, FUNCTION_START)
    _WRAP_NEXT = Markers(FUNCTION_START, TOOL_CALL_END)
    _TAG_END = Markers(TAG_CLOSE, TOOL_CALL_END)
    _IN_FUNC = Markers(PARAMETER_START, FUNCTION_END, TOOL_CALL_END)
    _VALUE_END = Markers(PARAMETER_END, FUNCTION_END)
    _AFTER_FUNC_NEXT = Markers(TOOL_CALL_END, FUNCTION_START)
    _JSON_STOPS = Markers(TOOL_CALL_END)

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._resume = _TEXT
        self._collect: Collector | None = None
        self._reader: CallReader | None = None
        self._index = -1
        self._params = 0
        self._props: dict[str, Any] = {}
        self._pname = ""

    # -- calls --

    def _open_call(self, name: str, out: list[Event]) -> None:
        self._index = self.next_index()
        out.append(ToolCallStart(self._index, name))
        self._params = 0
        schema = self.schema_of(name)
        props = schema.get("properties") if schema else None
        self._props = props if isinstance(props, dict) else {}

    def _emit_param(self, out: list[Event], raw: str) -> None:
        value = convert_value(_strip_one_newline(raw), self._props.get(self._pname))
        prefix = "{" if self._params == 0 else ", "
        self._params += 1
        out.append(ToolCallArgs(self._index, f"{prefix}{_dumps(self._pname)}: {_dumps(value)}"))

    def _end_call(self, out: list[Event], truncated: bool = False) -> None:
        if not truncated:
            out.append(ToolCallArgs(self._index, "}" if self._params else "{}"))
        out.append(ToolCallEnd(self._index, truncated))
        self._index = -1

    # -- states --

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        n = len(data)
        if st == _TEXT or st == _THINK:
            markers = self._IN_TEXT if st == _TEXT else self._IN_THINK
            end, m = markers.scan(data, pos, final)
            emit_plain(out, data[pos:end], st == _THINK)
            if m is None:
                return end, True
            tok = m.group()
            if tok == TOOL_CALL_START:
                self._resume = st
                self._state = _WRAP
            elif tok == FUNCTION_START:
                self._resume = st
                self._collect = Collector(self._TAG_END)
                self._state = _FNAME
            elif tok == THINK_START:
                self._state = _THINK
            elif tok == THINK_END:
                self._state = _TEXT
            return m.end(), False
        if st == _FNAME or st == _PNAME or st == _PVALUE:
            assert self._collect is not None
            end, m = self._collect.feed(data, pos, final)
            if m is None:
                return end, True
            tok = m.group()
            text = self._collect.text()
            self._collect = None
            if st == _FNAME:
                self._open_call(text.strip(), out)
                if tok == TOOL_CALL_END:
                    self._end_call(out)
                    self._state = self._resume
                else:
                    self._state = _FUNC
            elif st == _PNAME:
                self._pname = text.strip()
                if tok == TOOL_CALL_END:
                    self._end_call(out)
                    self._state = self._resume
                else:
                    self._collect = Collector(self._VALUE_END)
                    self._state = _PVALUE
            else:
                self._emit_param(out, text)
                if tok == FUNCTION_END:
                    self._end_call(out)
                    self._state = _AFTER_FUNC
                else:
                    self._state = _FUNC
            return m.end(), False
        if st == _FUNC:
            end, m = self._IN_FUNC.scan(data, pos, final)  # text between parameters: layout
            if m is None:
                return end, True
            tok = m.group()
            if tok == PARAMETER_START:
                self._collect = Collector(self._TAG_END)
                self._state = _PNAME
            else:
                self._end_call(out)
                self._state = _AFTER_FUNC if tok == FUNCTION_END else self._resume
            return m.end(), False
        if st == _JSON:
            assert self._reader is not None
            i, status = self._reader.feed(data, pos, final, out)
            if status == MORE:
                return i, True
            assert status in (DONE, STOP)
            self._reader.close(out, truncated=False)
            self._reader = None
            self._state = _AFTER_FUNC
            return i, False
        # _WRAP (after <tool_call>) and _AFTER_FUNC (after </function>)
        j = skip_ws(data, pos)
        if j - pos >= WS_LIMIT and st == _AFTER_FUNC:
            self._state = self._resume
            return pos, False
        if j >= n:
            if not final:
                return (j if st == _WRAP else pos), True
            if st == _WRAP:  # "<tool_call>" and nothing else
                return j, True
            self._state = self._resume
            return pos, False
        hit = (self._WRAP_NEXT if st == _WRAP else self._AFTER_FUNC_NEXT).at(data, j, final)
        if hit is True:
            return (j if st == _WRAP else pos), True
        if hit == FUNCTION_START:
            self._collect = Collector(self._TAG_END)
            self._state = _FNAME
            return j + len(FUNCTION_START), False
        if hit == TOOL_CALL_END:
            self._state = self._resume
            return j + len(TOOL_CALL_END), False
        if st == _WRAP:  # not XML: a JSON call, or raw text, up to </tool_call>
            self._reader = CallReader(self, self._JSON_STOPS)
            self._state = _JSON
            return j, False
        self._state = self._resume
        return pos, False

    def _close(self, out: list[Event]) -> None:
        st = self._state
        if self._reader is not None:
            self._reader.close(out, truncated=True)
            self._reader = None
            return
        if st == _FNAME:
            assert self._collect is not None
            self._open_call(self._collect.text().strip(), out)
        elif st == _PVALUE:
            assert self._collect is not None
            raw = self._collect.text()
            if raw.startswith("\n"):
                raw = raw[1:]
            types = schema_types(self._props.get(self._pname))
            value = _dumps(raw)[:-1] if not types or "string" in types else raw.strip()
            prefix = "{" if self._params == 0 else ", "
            out.append(ToolCallArgs(self._index, f"{prefix}{_dumps(self._pname)}: {value}"))
        if self._index >= 0:
            self._end_call(out, truncated=True)
        self._collect = None
