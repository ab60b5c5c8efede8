"""dots (rednote-hilab): MiniMax-M2's ``<invoke>`` calls inside ``<dots_function_call>``::

    <dots_function_call>
    <invoke name="search">
    <parameter name="query">weather in Shanghai</parameter>
    </invoke>
    </dots_function_call>

read by :class:`~.minimax_m2.MiniMaxM2Parser` (several invokes in a block, several blocks,
values typed by the tool's schema), as vLLM's and SGLang's ``dots`` parsers read it. Their
fallback is read too: a block whose body is a JSON object ``{"name": ..., "arguments": ...}``
(``"parameters"`` accepted) is that call; a JSON object naming no tool stays text. A stray
``</dots_function_call>`` never reaches the content. ``<think>`` reasoning and drafted calls
follow the reasoning rule, as for MiniMax.
"""

from __future__ import annotations

from ..events import Event
from ._declaration import ToolFormat
from ._stream import (
    MORE,
    THINK_END,
    THINK_START,
    CallReader,
    Markers,
    StreamParser,
)
from .minimax_m2 import _SECTION, INVOKE_END, INVOKE_START, PARAM_START, MiniMaxM2Parser

SECTION_START = "<dots_function_call>"
SECTION_END = "</dots_function_call>"

#: reading a block's JSON call (the states below it are MiniMax's)
_JSON = 100


class DotsParser(MiniMaxM2Parser):
    """dots ``<dots_function_call>`` blocks: MiniMax invokes or one JSON call."""

    name = "dots"

    _SECTION_START = SECTION_START
    _STRAYS = frozenset((SECTION_END,))
    _IN_TEXT = Markers(THINK_START, SECTION_START, SECTION_END)
    _IN_THINK = Markers(THINK_END, SECTION_START, SECTION_END)
    _IN_SECTION = Markers(INVOKE_START, SECTION_END, "{")
    # the block's end also ends an invoke left open
    _IN_CALL = Markers(PARAM_START, INVOKE_END, SECTION_END)
    _JSON_STOPS = Markers(SECTION_END)

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        if st == _SECTION:
            # between calls: a JSON object, an invoke or the block's end (layout in between
            # is dropped, as MiniMax drops it)
            end, m = self._IN_SECTION.scan(data, pos, final)
            if m is None:
                return end, True
            if m.group() == "{":
                self._reader = CallReader(self, self._JSON_STOPS, text_if_unnamed=True)
                self._state = _JSON
                return m.start(), False
            return super()._step(data, m.start(), final, out)
        if st == _JSON:
            reader = self._reader
            assert reader is not None
            i, status = reader.feed(data, pos, final, out)
            if status == MORE:
                return i, True
            self._call_ended(out, status)
            self._state = _SECTION  # its closing token (or another call) follows
            return i, False
        return super()._step(data, pos, final, out)

    def _close(self, out: list[Event]) -> None:
        if self._reader is not None:
            StreamParser._close(self, out)
        else:
            super()._close(out)


FORMAT = ToolFormat(
    name="dots",
    parser=DotsParser,
    models=(r"dots\.?llm|rednote-hilab",),
    rank=310,
    examples=("rednote-hilab/dots.llm1.inst",),
    markers=(SECTION_START,),
    vllm_parser="dots",
    sample=('<dots_function_call>\n<invoke name="write">\n<parameter name="text">$TEXT'
            "</parameter>\n</invoke>\n</dots_function_call>"),
)
