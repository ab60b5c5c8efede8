"""MiniMax-M3: XML-style calls, every tag prefixed with the ``]<]minimax[>[`` marker::

    ]<]minimax[>[<tool_call>
    ]<]minimax[>[<invoke name="create_order">
    ]<]minimax[>[<user_id>42]<]minimax[>[</user_id>
    ]<]minimax[>[<items>]<]minimax[>[<item>]<]minimax[>[<sku>b-1]<]minimax[>[</sku>]<]minimax[>[</item>
    ]<]minimax[>[</items>
    ]<]minimax[>[</invoke>
    ]<]minimax[>[</tool_call>

as vLLM's ``minimax_m3`` parser and SGLang's ``minimax-m3`` detector read it. Each ``<invoke>``
is a call; its parameters are elements named after the argument and may nest: an element with
child elements is an object, or an array when the schema says so (the template writes list
items as ``<item>``); a name repeated collects into a list; text beside child elements is kept
under ``$text``. A leaf's text is typed by its schema like GLM's values
(:data:`~.glm45.GLM_VALUES`; an empty element is ``[]`` or ``{}`` where the schema wants a
container) and stays a string where no schema speaks for it. The name goes out as soon as it
is read, the arguments once the invoke closes (a repeated name turns a value already read into
a list, so they cannot stream), as vLLM does; a cut-off invoke keeps the parameters complete
so far. White space between the marker and a parameter's tag is tolerated (as SGLang
normalizes it).
Reasoning is ``<mm:think>``...``</mm:think>``; a call written there is a draft, decided by the
reasoning rule.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..events import Event, ToolCallArgs, ToolCallEnd, ToolCallStart
from ._declaration import ToolFormat
from ._stream import Collector, Markers, StreamParser, schema_types
from .glm45 import GLM_VALUES

NAMESPACE = "]<]minimax[>["
TOOL_CALL_START = NAMESPACE + "<tool_call>"
TOOL_CALL_END = NAMESPACE + "</tool_call>"
INVOKE_DQ = NAMESPACE + '<invoke name="'
INVOKE_SQ = NAMESPACE + "<invoke name='"
INVOKE_BARE = NAMESPACE + "<invoke name="
INVOKE_END = NAMESPACE + "</invoke>"
THINK_START = "<mm:think>"
THINK_END = "</mm:think>"
MIXED_TEXT = "$text"
MAX_DEPTH = 128

_INVOKES = {INVOKE_DQ: '">', INVOKE_SQ: "'>", INVOKE_BARE: ">"}
_STRAY_TOKENS = (TOOL_CALL_END, INVOKE_END)
_SPACED_TAG = re.compile(re.escape(NAMESPACE) + r"[ \t\r\n]+(?=<)")

# states (reasoning is a flag, see StreamParser)
_TEXT, _BLOCK, _NAME, _BODY = range(4)

#: an element's value: its text, or its (name, value) children in order
Element = str | list[tuple[str, "Element"]]


def parse_elements(text: str) -> list[tuple[str, Element]]:
    """The parameter elements of an invoke's body, in order; reading stops at the first one
    that is malformed or not closed, keeping those before it."""
    text = _SPACED_TAG.sub(NAMESPACE, text)
    params: list[tuple[str, Element]] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        got = _element(text, pos, 1)
        if got is None:
            return params
        name, value, pos = got
        params.append((name, value))


def _element(text: str, pos: int, depth: int) -> tuple[str, Element, int] | None:
    """The element opening at ``pos``: (name, value, position after it), or None."""
    opener = NAMESPACE + "<"
    if depth > MAX_DEPTH or not text.startswith(opener, pos):
        return None
    start = pos + len(opener)
    end = text.find(">", start)
    name = text[start:end] if end > start else ""
    if not name.strip() or name.startswith("/"):
        return None
    closer = f"{NAMESPACE}</{name}>"
    pos = end + 1
    parts: list[str] = []
    children: list[tuple[str, Element]] = []
    while True:
        mark = text.find(NAMESPACE, pos)
        if mark < 0:
            return None
        parts.append(text[pos:mark])
        if text.startswith(closer, mark):
            pos = mark + len(closer)
            break
        child = _element(text, mark, depth + 1)
        if child is None:
            return None
        children.append((child[0], child[1]))
        pos = child[2]
    body = "".join(parts)
    if not children:
        return name, body, pos
    if body.strip():
        field = MIXED_TEXT
        while any(n == field for n, _ in children):
            field = "$" + field
        children.append((field, body))
    return name, children, pos


def _container(schema: Any) -> tuple[str, dict[str, Any]] | None:
    """The first array or object alternative a schema allows."""
    if not isinstance(schema, dict):
        return None
    types = schema.get("type")
    for kind in ("array", "object"):
        if types == kind or (isinstance(types, list) and kind in types):
            return kind, schema
    if types is None:
        if "items" in schema:
            return "array", schema
        if "properties" in schema or "additionalProperties" in schema:
            return "object", schema
    for key in ("anyOf", "oneOf"):
        for alt in schema.get(key) or ():
            found = _container(alt)
            if found is not None:
                return found
    return None


def convert(value: Element, schema: Any) -> Any:
    """One element's value as JSON data, typed by its (sub)schema."""
    container = _container(schema)
    if isinstance(value, str):
        if not isinstance(schema, dict) or (not schema_types(schema) and container is None):
            return value
        if container is not None and "string" not in schema_types(schema) and \
                not value.strip():
            return [] if container[0] == "array" else {}
        return json.loads(GLM_VALUES.complete(value, schema))
    if container is not None and container[0] == "array":
        items = container[1].get("items")
        return [convert(child, items) for _, child in value]
    return convert_object(value, container[1] if container is not None else None)


def convert_object(elements: list[tuple[str, Element]], schema: Any) -> dict[str, Any]:
    """Named elements as an object; a name repeated collects its values into a list."""
    schema = schema if isinstance(schema, dict) else {}
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    extra = schema.get("additionalProperties")
    out: dict[str, Any] = {}
    repeated: set[str] = set()
    for name, element in elements:
        value = convert(element, props.get(name, extra))
        if name not in out:
            out[name] = value
        elif name in repeated:
            out[name].append(value)
        else:
            out[name] = [out[name], value]
            repeated.add(name)
    return out


class MiniMaxM3Parser(StreamParser):
    """MiniMax-M3 ``]<]minimax[>[`` calls, with ``<mm:think>`` reasoning."""

    name = "minimax_m3"

    _THINK_START = THINK_START
    _THINK_END = THINK_END
    _STRAYS = frozenset(_STRAY_TOKENS)
    _IN_TEXT = Markers(THINK_START, TOOL_CALL_START, *_INVOKES, *_STRAY_TOKENS)
    _IN_THINK = Markers(THINK_END, TOOL_CALL_START, *_INVOKES, *_STRAY_TOKENS)
    _IN_BLOCK = Markers(*_INVOKES, TOOL_CALL_END, INVOKE_END)
    _BODY_END = Markers(INVOKE_END, TOOL_CALL_END)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._in_block = False
        self._collect = Collector(self._BODY_END)
        self._index = -1
        self._name = ""

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        if st == _TEXT or st == _BLOCK:
            if st == _TEXT:
                pos, tok = self._plain(data, pos, final, out)
            else:  # between a block's invokes: white space (anything else is dropped)
                end, m = self._IN_BLOCK.scan(data, pos, final)
                pos, tok = (end, None) if m is None else (m.end(), m.group())
            if tok in _INVOKES:
                self._read(_NAME, Markers(_INVOKES[tok]))
            elif tok == TOOL_CALL_START:
                self._state, self._in_block = _BLOCK, True
            elif tok == TOOL_CALL_END:
                self._state, self._in_block = _TEXT, False
            return pos, tok is None
        end, m = self._collect.feed(data, pos, final)
        if m is None:
            return end, True
        text = self._collect.text()
        if st == _NAME:
            self._start(text.strip(), out)
            self._read(_BODY, self._BODY_END)
        else:  # _BODY
            self._end(text, out)
            if m.group() == TOOL_CALL_END:
                self._in_block = False
            self._state = _BLOCK if self._in_block else _TEXT
        return m.end(), False

    def _start(self, name: str, out: list[Event]) -> None:
        self._index = self.next_index()
        self._name = name
        out.append(ToolCallStart(self._index, name))

    def _arguments(self, body: str) -> dict[str, Any]:
        schema = self.schema_of(self._name)
        props = schema.get("properties") if schema else None
        return convert_object(parse_elements(body),
                              {"properties": props if isinstance(props, dict) else {}})

    def _end(self, body: str, out: list[Event]) -> None:
        args = json.dumps(self._arguments(body), ensure_ascii=False)
        out.append(ToolCallArgs(self._index, args))
        out.append(ToolCallEnd(self._index))
        self._index = -1

    def _close(self, out: list[Event]) -> None:
        st = self._state
        if st == _NAME:
            name = self._collect.text().strip()
            if name:
                self._start(name, out)
        if self._index < 0:
            return
        args = self._arguments(self._collect.text()) if st == _BODY else {}
        if args:  # the parameters complete so far, the object left open
            out.append(ToolCallArgs(self._index, json.dumps(args, ensure_ascii=False)[:-1]))
        out.append(ToolCallEnd(self._index, truncated=True))
        self._index = -1


FORMAT = ToolFormat(
    name="minimax_m3",
    parser=MiniMaxM3Parser,
    models=(r"minimax-?m3",),
    rank=135,  # before MiniMax-M2, whose pattern is every MiniMax
    examples=("MiniMaxAI/MiniMax-M3",),
    markers=(TOOL_CALL_START,),
    reasoning_markers=(THINK_START,),
    triggers=(b"]", b"<"),
    vllm_parser="minimax_m3",
    sample=(TOOL_CALL_START + INVOKE_DQ + 'write">' + NAMESPACE + "<text>$TEXT" + NAMESPACE
            + "</text>" + INVOKE_END + TOOL_CALL_END),
)
