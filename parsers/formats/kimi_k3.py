"""Kimi K3: XTML channels of three special tokens, ``<|open|>``, ``<|close|>`` and ``<|sep|>``::

    <|open|>think<|sep|>Oslo, then Bergen.<|close|>think<|sep|>
    <|open|>response<|sep|>Checking.<|close|>response<|sep|>
    <|open|>tools<|sep|><|open|>call tool="get_weather" index="1"<|sep|>
    <|open|>argument key="city" type="string"<|sep|>Oslo<|close|>argument<|sep|>
    <|open|>argument key="days" type="integer"<|sep|>3<|close|>argument<|sep|>
    <|close|>call<|sep|><|close|>tools<|sep|><|close|>message<|sep|>

(without the line breaks), as vLLM's ``kimi_k3`` parser and SGLang's ``kimi_k3`` detector read
it. The ``think`` channel is reasoning; the ``response`` channel is the content, its markers
dropped (vLLM often puts the opening one in the prompt); each ``call`` in the ``tools`` channel
is a call, its ``tool=`` attribute the name (``&quot;`` and ``&amp;`` decoded, as the template
encodes them). An argument tagged ``type="string"`` is its text exactly as written; any other
type is its JSON text, kept as a string when it is not JSON; an argument without a type is
typed by the tool's schema. The markers are also read with a space on each side of the channel
name (``<|open|> tools <|sep|>``), the spelling a detokenizer that spaces special tokens gives
(the ``think`` markers spelled so are dropped, their text left where it is). A ``tools``
channel opened inside reasoning is a draft, decided by the reasoning rule. Like vLLM, a value
that contains ``<|close|>argument<|sep|>`` itself ends there.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..events import Event, ToolCallArgs, ToolCallEnd, ToolCallStart
from ._declaration import ToolFormat
from ._stream import Collector, Markers, StreamParser
from .glm45 import GLM_VALUES

OPEN, CLOSE, SEP = "<|open|>", "<|close|>", "<|sep|>"


def spellings(token: str, word: str, sep: bool = True) -> tuple[str, ...]:
    """A marker as the model writes it, and with the spaces a detokenizer may put around the
    word: ``<|open|>tools<|sep|>``, ``<|open|> tools <|sep|>``."""
    end = SEP if sep else ""
    return (f"{token}{word}{end}", f"{token} {word} {end}" if sep else f"{token} {word}")


THINK_STARTS = spellings(OPEN, "think")
THINK_ENDS = spellings(CLOSE, "think")
TOOLS_STARTS = spellings(OPEN, "tools")
TOOLS_ENDS = spellings(CLOSE, "tools")
#: a call's and an argument's opening tag: attributes follow, up to ``<|sep|>``
CALL_STARTS = tuple(m + " " for m in spellings(OPEN, "call", sep=False))
CALL_ENDS = spellings(CLOSE, "call")
ARG_STARTS = tuple(m + " " for m in spellings(OPEN, "argument", sep=False))
ARG_ENDS = spellings(CLOSE, "argument")
RESPONSE_MARKERS = (*spellings(OPEN, "response"), *spellings(CLOSE, "response"))
MESSAGE_ENDS = spellings(CLOSE, "message")
THINK_START, THINK_END = THINK_STARTS[0], THINK_ENDS[0]

#: tokens that mean nothing in text or reasoning: dropped (the response channel's markers, a
#: closer with nothing open)
_STRAY_TOKENS = (*RESPONSE_MARKERS, *MESSAGE_ENDS, *TOOLS_ENDS, *CALL_ENDS, *ARG_ENDS)
_ATTR = re.compile(r'(\w+)\s*=\s*"([^"]*)"')

# states (reasoning is a flag, see StreamParser)
_TEXT, _TOOLS, _CALL_ATTRS, _CALL, _ARG_ATTRS, _VALUE = range(6)


def attributes(text: str) -> dict[str, str]:
    """``tool="f" index="1"`` -> its attributes, XTML's escapes decoded."""
    return {k: v.replace("&quot;", '"').replace("&amp;", "&") for k, v in _ATTR.findall(text)}


class KimiK3Parser(StreamParser):
    """Kimi K3 XTML channels: reasoning, response, and the tools channel's calls."""

    name = "kimi_k3"

    _THINK_START = THINK_START
    _THINK_END = THINK_END
    _STRAYS = frozenset((*_STRAY_TOKENS, THINK_STARTS[1], THINK_ENDS[1]))
    _IN_TEXT = Markers(*THINK_STARTS, *TOOLS_STARTS, *CALL_STARTS, *_STRAY_TOKENS,
                       THINK_ENDS[1])
    _IN_THINK = Markers(*THINK_ENDS, *TOOLS_STARTS, *CALL_STARTS, *_STRAY_TOKENS,
                        THINK_STARTS[1])
    _IN_TOOLS = Markers(*CALL_STARTS, *TOOLS_ENDS, *CALL_ENDS, *ARG_ENDS, *MESSAGE_ENDS)
    _IN_CALL = Markers(*ARG_STARTS, *CALL_ENDS, *TOOLS_ENDS, *ARG_ENDS, *MESSAGE_ENDS)
    _ATTRS_END = Markers(SEP)
    _VALUE_END = Markers(*ARG_ENDS)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._in_tools = False
        self._collect = Collector(self._ATTRS_END)
        self._index = -1  # the open call's index, or -1
        self._members = 0
        self._props: dict[str, Any] = {}
        self._arg: dict[str, str] = {}

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        if st == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok in TOOLS_STARTS:
                self._state, self._in_tools = _TOOLS, True
            elif tok in CALL_STARTS:
                self._read(_CALL_ATTRS, self._ATTRS_END)
            return pos, tok is None
        if st == _TOOLS or st == _CALL:
            end, m = (self._IN_TOOLS if st == _TOOLS else self._IN_CALL).scan(data, pos, final)
            if m is None:
                return end, True
            self._on_marker(m.group(), out)
            return m.end(), False
        end, m = self._collect.feed(data, pos, final)
        if m is None:
            return end, True
        text = self._collect.text()
        if st == _CALL_ATTRS:
            self._start(attributes(text).get("tool", ""), out)
            self._state = _CALL
        elif st == _ARG_ATTRS:
            self._arg = attributes(text)
            self._read(_VALUE, self._VALUE_END)
        else:  # _VALUE
            self._member(text, out)
            self._state = _CALL
        return m.end(), False

    def _on_marker(self, tok: str, out: list[Event]) -> None:
        if tok in CALL_STARTS:
            self._end_call(out)
            self._read(_CALL_ATTRS, self._ATTRS_END)
        elif tok in ARG_STARTS:
            self._read(_ARG_ATTRS, self._ATTRS_END)
        elif tok in CALL_ENDS:
            self._end_call(out)
            self._state = _TOOLS if self._in_tools else _TEXT
        elif tok in TOOLS_ENDS or tok in MESSAGE_ENDS:
            self._end_call(out)
            self._state, self._in_tools = _TEXT, False
        # a stray argument closer between arguments: dropped

    def _start(self, name: str, out: list[Event]) -> None:
        self._index = self.next_index()
        self._members = 0
        schema = self.schema_of(name)
        props = schema.get("properties") if schema else None
        self._props = props if isinstance(props, dict) else {}
        out.append(ToolCallStart(self._index, name))

    def _member(self, raw: str, out: list[Event]) -> None:
        key = self._arg.get("key", "")
        kind = self._arg.get("type")
        if kind == "string":
            value = json.dumps(raw, ensure_ascii=False)
        elif kind is None:
            value = GLM_VALUES.complete(raw, self._props.get(key))
        else:
            try:
                json.loads(raw)
                value = raw.strip()
            except ValueError:
                value = json.dumps(raw, ensure_ascii=False)
        lead = "{" if self._members == 0 else ", "
        self._members += 1
        out.append(ToolCallArgs(self._index, f"{lead}{json.dumps(key, ensure_ascii=False)}: "
                                             f"{value}"))

    def _end_call(self, out: list[Event], truncated: bool = False) -> None:
        if self._index < 0:
            return
        if not truncated or self._members:
            out.append(ToolCallArgs(self._index, "}" if self._members else "{}"))
        out.append(ToolCallEnd(self._index, truncated))
        self._index = -1

    def _close(self, out: list[Event]) -> None:
        st = self._state
        if st == _CALL_ATTRS:
            name = attributes(self._collect.text()).get("tool", "")
            if name:
                self._start(name, out)
        elif st == _VALUE and self._index >= 0:
            key = json.dumps(self._arg.get("key", ""), ensure_ascii=False)
            lead = "{" if self._members == 0 else ", "
            text = self._collect.text()
            value = json.dumps(text, ensure_ascii=False)[:-1] \
                if self._arg.get("type", "string") == "string" else text
            out.append(ToolCallArgs(self._index, f"{lead}{key}: {value}"))
            out.append(ToolCallEnd(self._index, truncated=True))
            self._index = -1
            return
        if self._index >= 0:
            if self._members:
                out.append(ToolCallEnd(self._index, truncated=True))
                self._index = -1
            else:
                self._end_call(out, truncated=True)


FORMAT = ToolFormat(
    name="kimi_k3",
    parser=KimiK3Parser,
    models=(r"kimi-?k3",),
    rank=96,  # before Kimi K2, whose pattern is every Kimi
    examples=("moonshotai/Kimi-K3",),
    markers=(TOOLS_STARTS[0],),
    reasoning_markers=(THINK_START,),
    vllm_parser="kimi_k3",
    sample=(TOOLS_STARTS[0] + '<|open|>call tool="write" index="1"<|sep|>'
            '<|open|>argument key="text" type="string"<|sep|>$TEXT<|close|>argument<|sep|>'
            "<|close|>call<|sep|><|close|>tools<|sep|>"),
)
