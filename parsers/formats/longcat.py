"""Meituan LongCat-Flash: Hermes calls in LongCat's own tags, LongCat's own reasoning::

    <longcat_think>Oslo, three days.</longcat_think>
    <longcat_tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</longcat_tool_call>

vLLM's ``longcat`` parser is its Hermes one with these tags, and so is this one
(:class:`~.hermes.HermesParser`): the JSON envelope, ``"parameters"`` for ``"arguments"``, a call
whose closing tag never comes ending with its JSON. LongCat-Flash-Thinking reasons in
``<longcat_think>``...``</longcat_think>``; a call written there is a draft, decided by the
reasoning rule.
"""

from __future__ import annotations

from ._declaration import ToolFormat
from ._stream import Markers
from .hermes import HermesParser

TOOL_CALL_START = "<longcat_tool_call>"
TOOL_CALL_END = "</longcat_tool_call>"
THINK_START = "<longcat_think>"
THINK_END = "</longcat_think>"


class LongCatParser(HermesParser):
    """LongCat ``<longcat_tool_call>`` JSON calls, with ``<longcat_think>`` reasoning."""

    name = "longcat"

    _CALL_OPEN = TOOL_CALL_START
    _CALL_CLOSE = TOOL_CALL_END
    _THINK_START = THINK_START
    _THINK_END = THINK_END
    _IN_TEXT = Markers(TOOL_CALL_START, TOOL_CALL_END, THINK_START)
    _IN_THINK = Markers(TOOL_CALL_START, THINK_END)
    _CALL_STOPS = Markers(TOOL_CALL_END)
    _AFTER_CALL = Markers(TOOL_CALL_END, TOOL_CALL_START)


FORMAT = ToolFormat(
    name="longcat",
    parser=LongCatParser,
    models=(r"longcat",),
    rank=160,
    examples=("meituan-longcat/LongCat-Flash-Chat", "meituan-longcat/LongCat-Flash-Thinking"),
    markers=(TOOL_CALL_START,),
    reasoning_markers=(THINK_START,),
    vllm_parser="longcat",
    sample='<longcat_tool_call>{"name": "write", "arguments": $ARGS}</longcat_tool_call>',
)
