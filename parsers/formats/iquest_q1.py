"""IQuest-Q1: GLM-4.7's calls in IQuest's own tags::

    <iquest_tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value></iquest_tool_call>

SGLang's ``iquest_q1`` detector is its GLM-4.7 one with these tags, and so is this parser
(:class:`~.glm45.Glm45Parser`): the name, then ``<arg_key>``/``<arg_value>`` pairs with or
without newlines between them, values typed by the tool's schema (a string parameter keeps its
text as written). ``<think>``...``</think>`` is reasoning; a call written there is a draft,
decided by the reasoning rule. Where SGLang gives a call whose closing tag never comes back as
text, here it is a call cut off, for the repair stage to finish or refuse, as for every format.
"""

from __future__ import annotations

from ._declaration import ToolFormat
from ._stream import THINK_END, THINK_START, Markers
from .glm45 import KEY_END, KEY_START, NAME_END, VALUE_START, Glm45Parser

CALL_START = "<iquest_tool_call>"
CALL_END = "</iquest_tool_call>"


class IQuestQ1Parser(Glm45Parser):
    """IQuest-Q1 ``<iquest_tool_call>`` calls (GLM's keys and values), ``<think>`` reasoning."""

    name = "iquest_q1"

    _CALL_OPEN = CALL_START
    _CALL_CLOSE = CALL_END
    _IN_TEXT = Markers(THINK_START, CALL_START)
    _IN_THINK = Markers(THINK_END, CALL_START)
    _NAME_END = Markers(NAME_END, KEY_START, CALL_END)
    _ARGS_NEXT = Markers(KEY_START, VALUE_START, CALL_END)
    _KEY_END = Markers(KEY_END, VALUE_START, CALL_END)


FORMAT = ToolFormat(
    name="iquest_q1",
    parser=IQuestQ1Parser,
    models=(r"iquest-?q1",),
    rank=360,
    examples=("IQuestLab/IQuest-Q1",),
    markers=(CALL_START,),
    sample=("<iquest_tool_call>write<arg_key>text</arg_key><arg_value>$TEXT</arg_value>"
            "</iquest_tool_call>"),
)
