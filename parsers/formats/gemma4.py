"""Gemma 4: FunctionGemma's calls under Gemma 4's tokens, and a ``<|channel>`` for thought::

    <|channel>thought
    The user wants Tokyo.<channel|><|tool_call>call:get_weather{city:<|"|>Tokyo<|"|>}<tool_call|>

The call syntax is FunctionGemma's (:class:`~.functiongemma.FunctionGemmaParser`: bare keys,
strings between ``<|"|>`` delimiters, bare numbers and booleans), as vLLM's and SGLang's
``gemma4`` parsers read it, including the bare opener some checkpoints write
(``<|tool_call>:get_weather{...}``). Reasoning is the ``thought`` channel: its ``thought``
label is not reasoning text (vLLM strips it too), a bare ``<|channel>`` opens reasoning as
well, and a call written inside it is a draft, decided by the reasoning rule (vLLM lets such
a call out at once). Stray ``<channel|>`` and ``<tool_call|>`` tokens never reach the content.
"""

from __future__ import annotations

from ..events import Event
from ._declaration import ToolFormat
from ._stream import Markers
from .functiongemma import _TEXT, ARGS_OPEN, CALL_PREFIX, FunctionGemmaParser

TOOL_CALL_START = "<|tool_call>"
TOOL_CALL_END = "<tool_call|>"
STRING_DELIM = '<|"|>'
CHANNEL_START = "<|channel>"
CHANNEL_END = "<channel|>"
#: the reasoning channel as the model opens it; the label is not reasoning text
THOUGHT_START = CHANNEL_START + "thought\n"


class Gemma4Parser(FunctionGemmaParser):
    """Gemma 4 calls and ``<|channel>thought`` reasoning."""

    name = "gemma4"

    _CALL_START = TOOL_CALL_START
    _CALL_END = TOOL_CALL_END
    _ESCAPE = STRING_DELIM
    _THINK_START = THOUGHT_START
    _THINK_END = CHANNEL_END
    _STRAYS = frozenset((CHANNEL_START, TOOL_CALL_END))
    _IN_TEXT = Markers(TOOL_CALL_START, TOOL_CALL_END, THOUGHT_START, CHANNEL_START)
    _IN_THINK = Markers(CHANNEL_END, TOOL_CALL_START, TOOL_CALL_END, CHANNEL_START)
    _NAME_END = Markers(ARGS_OPEN, TOOL_CALL_END)
    _IN_STRUCT = Markers(STRING_DELIM, TOOL_CALL_END, TOOL_CALL_START)
    _IN_STRING = Markers(STRING_DELIM)
    _AFTER_ARGS = Markers(TOOL_CALL_END, TOOL_CALL_START)

    def _name_text(self) -> str:
        text = self._collect.text().strip()
        return text.removeprefix(CALL_PREFIX).removeprefix(":").strip()

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        if self._state == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok is None:
                return pos, True
            if tok == CHANNEL_START:
                # a channel opened without its label: reasoning all the same (outside
                # reasoning and with no drafts pending; elsewhere it is a stray, dropped)
                if not self._thinking and self._drafts is None:
                    self._thinking = True
            elif tok == self._CALL_START:
                self._read_name()
            return pos, False
        return super()._step(data, pos, final, out)


FORMAT = ToolFormat(
    name="gemma4",
    parser=Gemma4Parser,
    models=(r"gemma-?4",),
    rank=320,
    examples=("google/gemma-4-31B-it", "google/gemma-4-E4B-it"),
    markers=(TOOL_CALL_START,),
    reasoning_markers=(CHANNEL_START,),
    vllm_parser="gemma4",
    sample='<|tool_call>call:write{text:<|"|>$TEXT<|"|>}<tool_call|>',
)
