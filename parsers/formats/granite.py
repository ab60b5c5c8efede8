"""IBM Granite 3.x: ``<|tool_call|>[{"name": ..., "arguments": {...}}, ...]``.

The marker is followed by a JSON list of call objects (a single object is accepted too).
Some Granite templates spell the marker ``<tool_call>`` and may close it with
``</tool_call>``; the closing tag right after the list is dropped. Each call is emitted when
its object closes (see :class:`~._stream.CallListReader`); text after the list is
content again.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..events import Event
from ._declaration import ToolFormat
from ._stream import CallListReader, Markers, StreamParser

TOOL_CALL = "<|tool_call|>"
TOOL_CALL_TAG = "<tool_call>"
TOOL_CALL_TAG_END = "</tool_call>"

_WS = " \t\r\n"

# states
_TEXT, _LIST, _AFTER_LIST = range(3)


class GraniteParser(StreamParser):
    """Granite ``<|tool_call|>`` JSON lists."""

    name = "granite"
    _IN_TEXT = Markers(TOOL_CALL, TOOL_CALL_TAG)
    closing: ClassVar[str | None] = TOOL_CALL_TAG_END
    marker_opens_list = False  # whether the marker ends with the list's "["
    #: what reads the list (Apertus writes its calls in another shape)
    list_reader: ClassVar[type[CallListReader]] = CallListReader

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._list: CallListReader | None = None

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        if self._state == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok is None:
                return pos, True
            if tok in self._STRAYS:  # a special token out of place: dropped
                return pos, False
            self._list = self.list_reader(self.next_index, self.marker_opens_list)
            self._state = _LIST
            return pos, False
        if self._state == _LIST:
            assert self._list is not None
            pos = self._list.feed(data, pos, out)
            if not self._list.done:
                return pos, True
            self._list = None
            self._state = _AFTER_LIST if self.closing else _TEXT
            return pos, False
        # _AFTER_LIST: drop a closing tag right after the list
        rest = data[pos:]
        stripped = rest.lstrip(_WS)
        closing = self.closing or ""
        if stripped.startswith(closing):
            pos += len(rest) - len(stripped) + len(closing)
        elif not final and (not stripped or closing.startswith(stripped)):
            return pos, True  # could still be the closing tag
        self._state = _TEXT
        return pos, False

    def _close(self, out: list[Event]) -> None:
        if self._list is not None:
            self._list.finish(out)
            self._list = None


FORMAT = ToolFormat(
    name="granite",
    parser=GraniteParser,
    models=(r"granite",),
    rank=80,
    examples=("ibm-granite/granite-3.3-8b-instruct",),
    markers=(TOOL_CALL,),
    vllm_parser="granite",
    sample='<|tool_call|>[{"name": "write", "arguments": $ARGS}]',
)
