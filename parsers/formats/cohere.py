"""Cohere Command A (``cohere_command3``) and Command A+ (``cohere_command4``): a JSON list of
calls between ``<|START_ACTION|>`` and ``<|END_ACTION|>``::

    <|START_THINKING|>I need the weather.<|END_THINKING|><|START_ACTION|>[
        {"tool_call_id": "0", "tool_name": "get_weather", "parameters": {"city": "Oslo"}}
    ]<|END_ACTION|>

as vLLM's parsers (through Cohere's ``cohere_melody`` filter, presets ``cmd3`` and ``cmd4``) and
SGLang's ``cohere_command4`` detector read it. Each call is read when its object closes, like
Granite's lists (:class:`~.granite.GraniteParser`); ``tool_name`` names the tool,
``parameters`` holds the arguments, ``tool_call_id`` (the model's own numbering) is not kept:
the proxy gives calls their ids. ``<|START_THINKING|>``...``<|END_THINKING|>`` is reasoning, and
an action written inside it is a draft, decided by the reasoning rule. The answer's wrappers
(``<|START_RESPONSE|>``/``<|END_RESPONSE|>``, Command A+'s ``<|START_TEXT|>``/``<|END_TEXT|>``)
never reach the content; citation tags inside the answer (``<co>``...``</co: 0:[1]>``) are
left as the model wrote them.

The two presets read the same text; they differ in where the reply starts: Command A+'s
template opens the reasoning in the prompt (melody starts its ``cmd4`` filter inside it), so
its model names are in ``reasoning.ALWAYS_OPEN``. Two formats, so that ``toolmend doctor``
names the right vLLM parser for each.
"""

from __future__ import annotations

from ._declaration import ToolFormat
from ._stream import Markers
from .granite import GraniteParser

START_ACTION = "<|START_ACTION|>"
END_ACTION = "<|END_ACTION|>"
START_THINKING = "<|START_THINKING|>"
END_THINKING = "<|END_THINKING|>"
START_RESPONSE = "<|START_RESPONSE|>"
END_RESPONSE = "<|END_RESPONSE|>"
START_TEXT = "<|START_TEXT|>"
END_TEXT = "<|END_TEXT|>"
END_OF_TURN = "<|END_OF_TURN_TOKEN|>"

#: special tokens that mean nothing to the reply's text, wherever they are met
_WRAPPERS = (END_ACTION, START_RESPONSE, END_RESPONSE, START_TEXT, END_TEXT, END_OF_TURN)


class CohereCommand3Parser(GraniteParser):
    """Command A ``<|START_ACTION|>`` call lists and ``<|START_THINKING|>`` reasoning."""

    name = "cohere_command3"

    _THINK_START = START_THINKING
    _THINK_END = END_THINKING
    _STRAYS = frozenset(_WRAPPERS)
    _IN_TEXT = Markers(START_ACTION, START_THINKING, *_WRAPPERS)
    _IN_THINK = Markers(END_THINKING, START_ACTION, *_WRAPPERS)
    closing = END_ACTION


class CohereCommand4Parser(CohereCommand3Parser):
    """Command A+: the same text (its reply starts inside reasoning: see the module)."""

    name = "cohere_command4"


_SAMPLE = ('<|START_ACTION|>[{"tool_call_id": "0", "tool_name": "write", "parameters": $ARGS}]'
           "<|END_ACTION|>")

FORMAT_CMD4 = ToolFormat(
    name="cohere_command4",
    parser=CohereCommand4Parser,
    models=(r"command-?a-?(plus|\+)",),
    rank=330,  # before Command A (cmd3), whose pattern covers this name too
    examples=("CohereLabs/command-a-plus",),
    # no markers of its own: Command A's format, which reads the same text, takes them
    vllm_parser="cohere_command4",
    sample=_SAMPLE,
)

FORMAT_CMD3 = ToolFormat(
    name="cohere_command3",
    parser=CohereCommand3Parser,
    models=(r"command-?a",),
    rank=331,
    examples=("CohereLabs/c4ai-command-a-03-2025", "CohereLabs/command-a-reasoning-08-2025"),
    markers=(START_ACTION,),
    reasoning_markers=(START_THINKING,),
    vllm_parser="cohere_command3",
    sample=_SAMPLE,
)
