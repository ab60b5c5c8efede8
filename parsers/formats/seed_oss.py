"""ByteDance Seed-OSS: Qwen3-Coder's XML calls in Seed's own wrapper, Seed's own reasoning::

    <seed:think>The user wants Oslo's weather.</seed:think>
    <seed:tool_call>
    <function=get_weather>
    <parameter=city>Oslo</parameter>
    </function>
    </seed:tool_call>

Only the wrapper and the reasoning markers differ from Qwen3-Coder (vLLM's ``seed_oss`` parser is
its ``qwen3_coder`` one with these tokens), so everything else is
:class:`~.qwen3_coder.Qwen3CoderParser`'s: values typed by the schema, a parameter closed
implicitly by the next one or by ``</function>``, a bare ``<function=`` without the wrapper, a
JSON call inside it. A call written inside ``<seed:think>`` is a draft, decided by the reasoning
rule; the budget notes Seed writes there (``<seed:cot_budget_reflect>``) are reasoning text. The
turn tokens ``<seed:bos>`` and ``<seed:eos>``, which a server keeping special tokens passes on,
never reach the content.
"""

from __future__ import annotations

from ._declaration import ToolFormat
from ._stream import Markers
from .qwen3_coder import (
    FUNCTION_END,
    FUNCTION_START,
    PARAMETER_START,
    TAG_CLOSE,
    Qwen3CoderParser,
)

TOOL_CALL_START = "<seed:tool_call>"
TOOL_CALL_END = "</seed:tool_call>"
THINK_START = "<seed:think>"
THINK_END = "</seed:think>"
#: the turn tokens: special tokens that mean nothing in a reply
TURN_TOKENS = ("<seed:bos>", "<seed:eos>")


class SeedOssParser(Qwen3CoderParser):
    """Seed-OSS ``<seed:tool_call>`` XML calls and ``<seed:think>`` reasoning."""

    name = "seed_oss"

    _CALL_OPEN = TOOL_CALL_START
    _CALL_CLOSE = TOOL_CALL_END
    _THINK_START = THINK_START
    _THINK_END = THINK_END
    _STRAYS = frozenset(TURN_TOKENS)
    _IN_TEXT = Markers(TOOL_CALL_START, FUNCTION_START, TOOL_CALL_END, THINK_START, *TURN_TOKENS)
    _IN_THINK = Markers(THINK_END, TOOL_CALL_START, FUNCTION_START, *TURN_TOKENS)
    _WRAP_NEXT = Markers(FUNCTION_START, TOOL_CALL_END)
    _TAG_END = Markers(TAG_CLOSE, TOOL_CALL_END)
    _IN_FUNC = Markers(PARAMETER_START, FUNCTION_END, TOOL_CALL_END)
    _AFTER_FUNC_NEXT = Markers(TOOL_CALL_END, FUNCTION_START)
    _JSON_STOPS = Markers(TOOL_CALL_END)


FORMAT = ToolFormat(
    name="seed_oss",
    parser=SeedOssParser,
    models=(r"seed-?oss",),
    rank=150,
    examples=("ByteDance-Seed/Seed-OSS-36B-Instruct",),
    markers=(TOOL_CALL_START,),
    reasoning_markers=(THINK_START,),
    vllm_parser="seed_oss",
    sample=("<seed:tool_call>\n<function=write>\n<parameter=text>\n$TEXT\n</parameter>\n"
            "</function>\n</seed:tool_call>"),
)
