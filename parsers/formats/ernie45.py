"""Baidu ERNIE 4.5: Hermes ``<tool_call>`` JSON calls, the answer wrapped in ``<response>``::

    The user wants Oslo.
    </think>

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Oslo"}}
    </tool_call>

The calls are Hermes's (:class:`~.hermes.HermesParser`, as vLLM's ``ernie45`` parser reads them).
The thinking models' template opens ``<think>`` in the prompt, so their replies start inside
reasoning (``ERNIE-4.5-*-Thinking`` is in the reasoning module's table of such models), and the
answer after ``</think>`` may be wrapped in ``<response>``...``</response>``: those two tags
are dropped, the text between them is the content.
"""

from __future__ import annotations

from ._declaration import ToolFormat
from ._stream import THINK_END, THINK_START, Markers
from .hermes import TOOL_CALL_END, TOOL_CALL_START, HermesParser

RESPONSE_START = "<response>"
RESPONSE_END = "</response>"


class Ernie45Parser(HermesParser):
    """ERNIE 4.5: Hermes calls, ``<think>`` reasoning, ``<response>`` tags dropped."""

    name = "ernie45"

    _STRAYS = frozenset((RESPONSE_START, RESPONSE_END))
    _IN_TEXT = Markers(TOOL_CALL_START, TOOL_CALL_END, THINK_START, RESPONSE_START, RESPONSE_END)
    _IN_THINK = Markers(TOOL_CALL_START, THINK_END, RESPONSE_START, RESPONSE_END)


FORMAT = ToolFormat(
    name="ernie45",
    parser=Ernie45Parser,
    models=(r"ernie-?4\.5|ernie-?4_5",),
    rank=170,
    examples=("baidu/ERNIE-4.5-21B-A3B-PT", "baidu/ERNIE-4.5-21B-A3B-Thinking"),
    vllm_parser="ernie45",
    sample='<tool_call>\n{"name": "write", "arguments": $ARGS}\n</tool_call>',
)
