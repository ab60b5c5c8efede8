"""IBM Granite 3.x: ``<|tool_call|>[{"name": ..., "arguments": {...}}, ...]``.

The marker is followed by a JSON list of call objects (a single object is accepted too).
Some Granite templates spell the marker ``<tool_call>`` and may close it with
``</tool_call>``; the closing tag right after the list is dropped. Each call is emitted when
its object closes (see :class:`.generic_json.CallListReader`); text after the list is
content again.
"""

from __future__ import annotations

from typing import Any

from ..events import Event
from .base import MarkerParser, MarkerStream, text_event
from .generic_json import CallListReader

TOOL_CALL = "<|tool_call|>"
TOOL_CALL_TAG = "<tool_call>"
TOOL_CALL_TAG_END = "</tool_call>"

_TEXT_MARKERS = (TOOL_CALL, TOOL_CALL_TAG)
_WS = " \t\r\n"

# states
_TEXT, _LIST, _AFTER_LIST = range(3)


class GraniteParser(MarkerParser):
    """Granite ``<|tool_call|>`` JSON lists."""

    name = "granite"
    markers: tuple[str, ...] = _TEXT_MARKERS
    closing: str | None = TOOL_CALL_TAG_END
    marker_opens_list = False  # whether the marker ends with the list's "["

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._in = MarkerStream()
        self._state = _TEXT
        self._reader: CallListReader | None = None

    def feed(self, text: str) -> list[Event]:
        self._in.push(text)
        return self._run(final=False)

    def finish(self) -> list[Event]:
        out = self._run(final=True)
        if self._reader is not None:
            self._reader.finish(out)
            self._reader = None
        self._state = _TEXT
        return out

    def _run(self, final: bool) -> list[Event]:
        out: list[Event] = []
        src = self._in
        while True:
            if self._state == _TEXT:
                chunk, marker = src.until(self.markers, final)
                text_event(chunk, out)
                if marker is None:
                    return out
                self._reader = CallListReader(self.next_index, self.marker_opens_list)
                self._state = _LIST
            elif self._state == _LIST:
                reader = self._reader
                if reader is None:  # pragma: no cover - _LIST always has a reader
                    self._state = _TEXT
                    continue
                src.pos = reader.feed(src.buf, src.pos, out)
                if not reader.done:
                    return out
                self._reader = None
                self._state = _AFTER_LIST if self.closing else _TEXT
            else:  # _AFTER_LIST: drop a closing tag right after the list
                rest = src.buf[src.pos:]
                stripped = rest.lstrip(_WS)
                closing = self.closing or ""
                if stripped.startswith(closing):
                    src.pos += len(rest) - len(stripped) + len(closing)
                elif not final and (not stripped or closing.startswith(stripped)):
                    return out  # could still be the closing tag
                self._state = _TEXT
