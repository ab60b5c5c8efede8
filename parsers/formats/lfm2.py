"""Liquid LFM2 / LFM2.5: a pythonic call list between ``<|tool_call_start|>`` and
``<|tool_call_end|>``::

    <|tool_call_start|>[get_weather(city="Oslo"), get_time()]<|tool_call_end|>The weather...

The list is read as a pythonic one (:class:`~.pythonic.PythonicParser`; values in JSON's
spelling, ``null``/``true``/``false``, too, as Olmo 3's are), and a JSON list of call objects
in the wrapper is read as well (SGLang's ``lfm2`` detector accepts both). Only a wrapped list is
a call: a bracket in the text is text, as vLLM's and SGLang's parsers read it. A wrapper that
holds neither invents no call (its tokens are dropped, the rest is text). LFM2.5's thinking
models reason in ``<think>``...``</think>``; a list written there is a draft, decided by the
reasoning rule.
"""

from __future__ import annotations

from typing import Any

from ..events import Event
from ._declaration import ToolFormat
from ._stream import THINK_END, THINK_START, WS_LIMIT, CallListReader, Markers, skip_ws
from .olmo3 import value_to_json
from .pythonic import _HEADER, _MAX_HEADER, _TEXT, PythonicParser

TOOL_CALL_START = "<|tool_call_start|>"
TOOL_CALL_END = "<|tool_call_end|>"
LIST_OPEN = "["
OBJECT_OPEN = "{"

# beside the pythonic parser's states: a JSON call list in the wrapper, and the wrapper's end
_JSON, _WRAP_END = 100, 101


class Lfm2Parser(PythonicParser):
    """LFM2 ``<|tool_call_start|>`` pythonic (or JSON) call lists, with ``<think>`` reasoning."""

    name = "lfm2"

    _IN_TEXT = Markers(TOOL_CALL_START, TOOL_CALL_END, THINK_START)
    _IN_THINK = Markers(THINK_END, TOOL_CALL_START)
    _WRAP_OPEN = TOOL_CALL_START
    _value_to_json = staticmethod(value_to_json)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._list: CallListReader | None = None

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        if st == _HEADER and self._wrapped:  # a JSON list instead of a pythonic one?
            n = len(data)
            j = skip_ws(data, pos)
            k = skip_ws(data, j + 1) if j < n and data[j] == LIST_OPEN else j
            if k >= n and not final and n - pos < _MAX_HEADER:
                return pos, True
            if k < n and data[k] == OBJECT_OPEN:
                self._wrapped = False
                self._list = CallListReader(self.next_index, in_list=k != j)
                self._state = _JSON
                return k, False
        elif st == _JSON:
            assert self._list is not None
            pos = self._list.feed(data, pos, out)
            if not self._list.done:
                return pos, True
            self._list = None
            self._state = _WRAP_END
            return pos, False
        elif st == _WRAP_END:  # the wrapper's end token, read as part of the call
            j = skip_ws(data, pos)
            if data.startswith(TOOL_CALL_END, j):
                self._state = _TEXT
                return j + len(TOOL_CALL_END), False
            if not final and j - pos < WS_LIMIT and TOOL_CALL_END.startswith(data[j:]):
                return pos, True
            self._state = _TEXT
            return pos, False
        return super()._step(data, pos, final, out)

    def _list_closed(self, out: list[Event]) -> None:
        super()._list_closed(out)
        self._state = _WRAP_END

    def _close(self, out: list[Event]) -> None:
        if self._list is not None:
            self._list.finish(out)
            self._list = None
            self._state = _TEXT
            return
        super()._close(out)


FORMAT = ToolFormat(
    name="lfm2",
    parser=Lfm2Parser,
    models=(r"lfm-?2",),
    rank=250,
    examples=("LiquidAI/LFM2-1.2B-Tool", "LiquidAI/LFM2.5-1.2B-Instruct"),
    markers=(TOOL_CALL_START,),
    vllm_parser="lfm2",
    sample="<|tool_call_start|>[write(items=$VALUE)]<|tool_call_end|>",
)
