"""Tencent Hunyuan: calls in a ``<tool_calls>`` block, in one of two dialects.

Hunyuan-A13B writes a JSON list of calls::

    <tool_calls>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_calls>

Hunyuan 3 and later (HY V3, V4) write GLM-style keys and values, the name ended by
``<tool_sep>`` (V3) or by the first key (V4)::

    <tool_calls>
    <tool_call>get_weather<tool_sep>
    <arg_key>city</arg_key>
    <arg_value>Oslo</arg_value>
    </tool_call>
    </tool_calls>

The shipping Hunyuan 3 tokenizers spell every one of these tokens with a suffix
(``<tool_calls:opensource>``, ``<arg_key:opensource>``...), one suffix per tokenizer, which
vLLM and SGLang read from the vocabulary. toolmend reads it from the block's opening tag and
expects the same suffix on the block's other tokens. Values are typed by the tool's schema as
GLM's are (:data:`~.glm45.GLM_VALUES`); the JSON list is read by
:class:`~._stream.CallListReader`. Reasoning is ``<think>``...``</think>`` (A13B wraps the answer
after it in ``<answer>``...``</answer>``, tags dropped); a block opened inside reasoning is a
draft, decided by the reasoning rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ..events import Event
from ._declaration import ToolFormat
from ._stream import (
    THINK_END,
    THINK_START,
    CallListReader,
    Collector,
    Markers,
    StreamParser,
    XmlArgs,
    emit_plain,
    skip_ws,
)
from .glm45 import GLM_VALUES

TOOL_CALLS = "<tool_calls"  # then ">", or a suffix and ">"
TAG_CLOSE = ">"
ANSWER_START = "<answer>"
ANSWER_END = "</answer>"
#: a token suffix: ":" and a short name
_SUFFIX = re.compile(r":[^\s<>]{1,32}")
_MAX_SUFFIX = 33

# states (reasoning is a flag, see StreamParser)
_TEXT, _OPEN, _LEAD, _LIST, _AFTER_LIST, _BLOCK, _NAME, _ARGS, _KEY, _VALUE = range(10)


@dataclass(frozen=True, slots=True)
class Tokens:
    """The block's tokens, spelled with its suffix."""

    block_end: str
    call: str
    call_end: str
    sep: str
    key: str
    key_end: str
    value: str
    value_end: str
    in_block: Markers
    name_end: Markers
    in_args: Markers
    key_stop: Markers
    value_stop: Markers


@lru_cache(maxsize=16)
def tokens(suffix: str) -> Tokens:
    def tag(name: str) -> str:
        return f"<{name}{suffix}>"

    block_end, call, call_end = tag("/tool_calls"), tag("tool_call"), tag("/tool_call")
    sep, key, key_end = tag("tool_sep"), tag("arg_key"), tag("/arg_key")
    value, value_end = tag("arg_value"), tag("/arg_value")
    return Tokens(block_end, call, call_end, sep, key, key_end, value, value_end,
                  in_block=Markers(call, block_end),
                  name_end=Markers(sep, key, call_end, block_end),
                  in_args=Markers(key, value, call_end, block_end),
                  key_stop=Markers(key_end, value, call_end, block_end),
                  value_stop=Markers(value_end))


class HunyuanParser(StreamParser):
    """Hunyuan ``<tool_calls>`` blocks: A13B's JSON lists, HY V3/V4's keys and values."""

    name = "hunyuan"

    _IN_TEXT = Markers(THINK_START, TOOL_CALLS, ANSWER_START, ANSWER_END)
    _IN_THINK = Markers(THINK_END, TOOL_CALLS, ANSWER_START, ANSWER_END)
    _STRAYS = frozenset((ANSWER_START, ANSWER_END))

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._tok = tokens("")
        self._collect = Collector(self._tok.name_end)
        self._list: CallListReader | None = None
        self._call: XmlArgs | None = None
        self._key = ""

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        n = len(data)
        if st == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok == TOOL_CALLS:
                self._state = _OPEN
            return pos, tok is None
        if st == _OPEN:  # "<tool_calls" read: ">" or a suffix and ">", else it was text
            if pos >= n:
                if final:
                    return self._not_a_block(pos, out)
                return pos, True
            if data[pos] == TAG_CLOSE:
                return self._open_block("", pos + 1)
            m = _SUFFIX.match(data, pos)
            if m is not None and m.end() < n and data[m.end()] == TAG_CLOSE:
                return self._open_block(m.group(), m.end() + 1)
            if not final and n - pos <= _MAX_SUFFIX and \
                    (data[pos:] == ":" or (m is not None and m.end() == n)):
                return pos, True  # the suffix may go on, or its ">" come next
            return self._not_a_block(pos, out)
        if st == _LEAD:  # a JSON list (A13B), or the calls' tags
            j = skip_ws(data, pos)
            if j >= n and not final:
                return j, True  # whitespace is layout either way: dropped as it comes
            if j < n and data[j] in "[{":
                self._list = CallListReader(self.next_index)
                self._state = _LIST
                return j, False
            self._state = _BLOCK
            return pos, False
        if st == _LIST:
            assert self._list is not None
            pos = self._list.feed(data, pos, out)
            if not self._list.done:
                return pos, True
            self._list = None
            self._state = _AFTER_LIST
            return pos, False
        if st == _AFTER_LIST:  # the closing tag right after the list is dropped
            j = skip_ws(data, pos)
            end_tag = self._tok.block_end
            if data.startswith(end_tag, j):
                self._state = _TEXT
                return j + len(end_tag), False
            if not final and (j >= n or end_tag.startswith(data[j:])):
                return pos, True
            self._state = _TEXT
            return pos, False
        t = self._tok
        if st == _BLOCK or st == _ARGS:  # layout between calls, between keys and values
            end, m = (t.in_block if st == _BLOCK else t.in_args).scan(data, pos, final)
            if m is None:
                return end, True
            self._on_marker(m.group(), out)
            return m.end(), False
        end, m = self._collect.feed(data, pos, final)
        if m is None:
            return end, True
        tok = m.group()
        text = self._collect.text()
        if st == _NAME:
            self._call = XmlArgs(self, text.strip(), GLM_VALUES, out)
            self._state = _ARGS
            if tok != t.sep:
                self._on_marker(tok, out)
        elif st == _KEY:
            self._key = text
            self._state = _ARGS
            if tok != t.key_end:
                self._on_marker(tok, out)
        else:  # _VALUE
            if self._call is not None:
                self._call.member(self._key, text, out)
            self._key = ""
            self._state = _ARGS
        return m.end(), False

    def _open_block(self, suffix: str, pos: int) -> tuple[int, bool]:
        self._tok = tokens(suffix)
        self._state = _LEAD
        return pos, False

    def _not_a_block(self, pos: int, out: list[Event]) -> tuple[int, bool]:
        emit_plain(out, TOOL_CALLS, self._thinking)
        self._state = _TEXT
        return pos, False

    def _on_marker(self, tok: str, out: list[Event]) -> None:
        t = self._tok
        if tok == t.call:
            self._read(_NAME, t.name_end)
        elif tok == t.key:
            self._read(_KEY, t.key_stop)
        elif tok == t.value:
            self._read(_VALUE, t.value_stop)
        else:  # the call's end, or the block's
            if self._call is not None:
                self._call.end(out)
                self._call = None
            self._state = _BLOCK if tok == t.call_end else _TEXT

    def _close(self, out: list[Event]) -> None:
        st = self._state
        if self._list is not None:
            self._list.finish(out)
            self._list = None
            return
        text = self._collect.text()
        if st == _NAME and text.strip():
            self._call = XmlArgs(self, text.strip(), GLM_VALUES, out)
        if self._call is not None:
            in_value = st == _VALUE
            self._call.truncate(self._key if in_value else None, text if in_value else None,
                                out)
            self._call = None


FORMAT = ToolFormat(
    name="hunyuan",
    parser=HunyuanParser,
    models=(r"hunyuan",),
    rank=210,
    examples=("tencent/Hunyuan-A13B-Instruct",),
    markers=(TOOL_CALLS + TAG_CLOSE,),  # the suffixed spellings only by the model name
    vllm_parser="hunyuan_a13b",
    vllm_aliases=("hy_v3", "hy_v4"),
    sample='<tool_calls>[{"name": "write", "arguments": $ARGS}]</tool_calls>',
)
