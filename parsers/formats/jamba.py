"""AI21 Jamba: a JSON list of calls in a ``<tool_calls>`` block::

    <tool_calls>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_calls>

Hunyuan-A13B's dialect exactly (:class:`~.hunyuan.HunyuanParser` reads both), as vLLM's
``jamba`` parser reads it. The marker is Hunyuan's too, so a reply whose model name says
nothing is read with Hunyuan's parser, which gives the same calls.
"""

from __future__ import annotations

from ._declaration import ToolFormat
from .hunyuan import HunyuanParser


class JambaParser(HunyuanParser):
    """Jamba ``<tool_calls>`` JSON lists."""

    name = "jamba"


FORMAT = ToolFormat(
    name="jamba",
    parser=JambaParser,
    models=(r"jamba",),
    rank=220,
    examples=("ai21labs/AI21-Jamba-Mini-1.7", "ai21labs/AI21-Jamba-Large-1.7"),
    vllm_parser="jamba",
    sample='<tool_calls>[{"name": "write", "arguments": $ARGS}]</tool_calls>',
)
