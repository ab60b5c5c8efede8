"""Hermes / Qwen2.5 / Qwen3: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

Qwen3 also thinks in ``<think>...</think>``; that text is reasoning, and a call written inside
it is still a call (models do this, and dropping it would lose the call). ``"parameters"`` is
accepted for ``"arguments"`` (some fine-tunes use it). Between the JSON's closing brace and
``</tool_call>`` only whitespace is expected; a call whose closing tag never comes still ends
when its JSON does.
"""

from __future__ import annotations

from ..events import Event
from ._stream import (
    DONE,
    MORE,
    STOP,
    WS_LIMIT,
    CallReader,
    Markers,
    StreamParser,
    emit_plain,
    skip_ws,
)

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
THINK_START = "<think>"
THINK_END = "</think>"

# states
_TEXT, _THINK, _CALL, _TAIL = range(4)


class HermesParser(StreamParser):
    """``<tool_call>`` JSON calls, with ``<think>`` reasoning."""

    name = "hermes"

    # a stray closing tag in text is a marker too: dropped, never shown to the client
    _IN_TEXT = Markers(TOOL_CALL_START, TOOL_CALL_END, THINK_START)
    _IN_THINK = Markers(TOOL_CALL_START, THINK_END)
    _CALL_STOPS = Markers(TOOL_CALL_END)
    _AFTER_CALL = Markers(TOOL_CALL_END, TOOL_CALL_START)

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._resume = _TEXT  # the state a call returns to (text or think)
        self._reader: CallReader | None = None

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        if st == _TEXT or st == _THINK:
            markers = self._IN_TEXT if st == _TEXT else self._IN_THINK
            end, m = markers.scan(data, pos, final)
            emit_plain(out, data[pos:end], st == _THINK)
            if m is None:
                return end, True
            tok = m.group()
            if tok == TOOL_CALL_START:
                self._resume = st
                self._reader = CallReader(self, self._CALL_STOPS)
                self._state = _CALL
            elif tok == THINK_START:
                self._state = _THINK
            elif tok == THINK_END:
                self._state = _TEXT
            return m.end(), False
        if st == _CALL:
            assert self._reader is not None
            i, status = self._reader.feed(data, pos, final, out)
            if status == MORE:
                return i, True
            self._reader.close(out, truncated=False)
            self._reader = None
            if status == STOP:
                self._state = self._resume
                return i + len(TOOL_CALL_END), False
            assert status == DONE
            self._state = _TAIL
            return i, False
        # _TAIL: after the JSON, expect whitespace and the closing tag
        j = skip_ws(data, pos)
        if j - pos >= WS_LIMIT:  # decided by the run's length alone, so split-invariant
            self._state = self._resume
            return pos, False
        if j >= len(data) and not final:
            return pos, True
        hit = self._AFTER_CALL.at(data, j, final) if j < len(data) else None
        if hit is True:
            return pos, True
        self._state = self._resume
        if hit == TOOL_CALL_END:
            return j + len(TOOL_CALL_END), False
        return pos, False  # no closing tag: what follows is the resumed state's text

    def _close(self, out: list[Event]) -> None:
        if self._reader is not None:
            self._reader.close(out, truncated=True)
            self._reader = None
