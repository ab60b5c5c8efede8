"""Apertus: a JSON list of one-member call objects, the tool's name as the key::

    I will check.<|tools_prefix|>[{"get_weather": {"city": "Paris"}}, {"noop": {}}]<|tools_suffix|>

as vLLM's ``apertus`` parser and SGLang's ``apertus2509`` detector read it. The list is read
like Granite's (:class:`~.granite.GraniteParser`: each call is emitted when its object closes,
the closing token right after the list is dropped, text after it is content again); an object
in the ``{"name": ..., "arguments": ...}`` shape is read as that. An object that is neither
(several keys, no tool) stays text. A stray ``<|tools_suffix|>`` never reaches the content.
Apertus has no reasoning markers of its own in either peer.
"""

from __future__ import annotations

import re

from ..events import Event, ToolCallArgs, ToolCallEnd, ToolCallStart
from ._declaration import ToolFormat
from ._stream import CallListReader, Markers, call_from_members, object_members
from .base import text_event
from .granite import GraniteParser

TOOLS_PREFIX = "<|tools_prefix|>"
TOOLS_SUFFIX = "<|tools_suffix|>"

#: the name key of a call object cut off before it closed, and where its arguments begin
_CUT_NAME = re.compile(r'\s*\{\s*"((?:[^"\\]|\\.)+)"\s*:\s*')


def _apertus_call(text: str, truncated: bool) -> tuple[str, str] | None:
    """(name, raw arguments) of one list element, or None when it is not a call."""
    if truncated:
        m = _CUT_NAME.match(text)
        return (m.group(1), text[m.end():]) if m else None
    members = object_members(text)
    if members is None:
        return None
    if len(members) == 1:
        ((name, (value, raw)),) = members.items()
        if isinstance(value, dict):
            return name, raw
    return call_from_members(members)


class ApertusListReader(CallListReader):
    """A :class:`CallListReader` for ``{"tool": {arguments}}`` objects."""

    __slots__ = ()

    def _emit(self, text: str, out: list[Event], truncated: bool) -> None:
        call = _apertus_call(text, truncated)
        if call is None:  # not a call: pass it on as text
            text_event(text, out)
            return
        name, args = call
        index = self._next_index()
        out.append(ToolCallStart(index, name))
        if args:
            out.append(ToolCallArgs(index, args))
        out.append(ToolCallEnd(index, truncated))


class ApertusParser(GraniteParser):
    """Apertus ``<|tools_prefix|>`` call lists."""

    name = "apertus"
    _IN_TEXT = Markers(TOOLS_PREFIX, TOOLS_SUFFIX)
    _STRAYS = frozenset((TOOLS_SUFFIX,))
    closing = TOOLS_SUFFIX
    list_reader = ApertusListReader


FORMAT = ToolFormat(
    name="apertus",
    parser=ApertusParser,
    models=(r"apertus",),
    rank=300,
    examples=("swiss-ai/Apertus-8B-Instruct-2509", "swiss-ai/Apertus-70B-Instruct-2509"),
    markers=(TOOLS_PREFIX,),
    vllm_parser="apertus",
    sample='<|tools_prefix|>[{"write": $ARGS}]<|tools_suffix|>',
)
