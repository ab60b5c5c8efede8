"""Granite 20B Function Calling: each call a JSON object after its own ``<function_call>``::

    Let me look.<function_call> {"name": "get_weather", "arguments": {"city": "Oslo"}}
    <function_call> {"name": "get_time", "arguments": {}}

No closing marker: a call ends where its JSON object does (or, if the object never balances,
at the next ``<function_call>``), as vLLM's ``granite-20b-fc`` parser reads it. Unlike that
parser, text after the calls stays content rather than being dropped, and what follows a
marker that is not a call object naming a tool (``{"answer": 42}``, prose, Olmo 3's
``<function_calls>`` block) is content too, marker and all: no call is invented from it.
The model does not reason in tags.
"""

from __future__ import annotations

from ..events import Event
from ._declaration import ToolFormat
from ._stream import MORE, CallReader, Markers, StreamParser, emit_plain

FUNCTION_CALL = "<function_call>"

# states
_TEXT, _CALL = range(2)


class Granite20bFcParser(StreamParser):
    """Granite 20B FC ``<function_call>`` JSON calls, one marker each."""

    name = "granite_20b_fc"

    _IN_TEXT = Markers(FUNCTION_CALL)
    _CALL_STOPS = Markers(FUNCTION_CALL)

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        if self._state == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok == FUNCTION_CALL:
                self._reader = CallReader(self, self._CALL_STOPS, text_if_unnamed=True)
                self._state = _CALL
            return pos, tok is None
        reader = self._reader
        assert reader is not None
        i, status = reader.feed(data, pos, final, out)
        if status == MORE:
            return i, True
        # DONE (the object closed) or STOP (the next marker begins at i): back to text
        self._end_call(out, truncated=False)
        self._state = _TEXT
        return i, False

    def _end_call(self, out: list[Event], truncated: bool) -> None:
        reader = self._reader
        assert reader is not None
        self._reader = None
        text = reader.close(out, truncated=truncated)
        if text is not None:  # named no tool: the marker and its text were content
            emit_plain(out, FUNCTION_CALL + text, False)

    def _close(self, out: list[Event]) -> None:
        if self._reader is not None:
            self._end_call(out, truncated=True)


FORMAT = ToolFormat(
    name="granite_20b_fc",
    parser=Granite20bFcParser,
    models=(r"granite-?20b-?function",),
    rank=75,  # before Granite 3 (granite), whose pattern covers this name too
    examples=("ibm-granite/granite-20b-functioncalling",),
    markers=(FUNCTION_CALL,),
    vllm_parser="granite-20b-fc",
    sample='<function_call> {"name": "write", "arguments": $ARGS}',
)
