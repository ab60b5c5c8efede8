"""InternLM2 / InternLM3 / Intern-S1: a JSON call as a plugin action::

    Let me check.<|action_start|><|plugin|>
    {"name": "get_weather", "parameters": {"city": "Oslo"}}<|action_end|>

The call is Hermes's JSON envelope (:class:`~.hermes.HermesParser`: ``"parameters"`` or
``"arguments"``, a call whose ``<|action_end|>`` never comes ends with its JSON), opened by
``<|action_start|><|plugin|>`` (a space between the two tokens is accepted, as SGLang writes
it), as vLLM's ``internlm`` and SGLang's ``interns1`` parsers read it. One action after another
is parallel calls. An action of another kind (``<|interpreter|>``, code to run) is not a tool
call: it stays text. Intern-S1 reasons in ``<think>``...``</think>``; a call written there is a
draft, decided by the reasoning rule.
"""

from __future__ import annotations

from ..events import Event
from ._declaration import ToolFormat
from ._stream import THINK_END, THINK_START, CallReader, Markers
from .hermes import _CALL, _TEXT, HermesParser

ACTION_START = "<|action_start|>"
PLUGIN = "<|plugin|>"
ACTION_END = "<|action_end|>"
PLUGIN_CALL = ACTION_START + PLUGIN
PLUGIN_CALL_SPACED = ACTION_START + " " + PLUGIN


class InternLmParser(HermesParser):
    """InternLM ``<|action_start|><|plugin|>`` JSON calls, with ``<think>`` reasoning."""

    name = "internlm"

    _CALL_OPEN = PLUGIN_CALL
    _CALL_CLOSE = ACTION_END
    _STRAYS = frozenset((ACTION_END,))
    _IN_TEXT = Markers(PLUGIN_CALL, PLUGIN_CALL_SPACED, ACTION_END, THINK_START)
    _IN_THINK = Markers(PLUGIN_CALL, PLUGIN_CALL_SPACED, ACTION_END, THINK_END)
    _CALL_STOPS = Markers(ACTION_END)
    _AFTER_CALL = Markers(ACTION_END, PLUGIN_CALL, PLUGIN_CALL_SPACED)

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        if self._state == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok == PLUGIN_CALL or tok == PLUGIN_CALL_SPACED:
                self._reader = CallReader(self, self._CALL_STOPS)
                self._state = _CALL
            return pos, tok is None
        return super()._step(data, pos, final, out)


FORMAT = ToolFormat(
    name="internlm",
    parser=InternLmParser,
    models=(r"internlm|intern-?s1",),
    rank=240,
    examples=("internlm/internlm2_5-7b-chat", "internlm/internlm3-8b-instruct",
              "internlm/Intern-S1"),
    markers=(PLUGIN_CALL, PLUGIN_CALL_SPACED),
    vllm_parser="internlm",
    sample='<|action_start|><|plugin|>\n{"name": "write", "parameters": $ARGS}<|action_end|>',
)
