"""Mistral: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`` (tokenizers before v11)
and ``[TOOL_CALLS]name[ARGS]{...}`` (v11+), optionally ``[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}``.

Several ``[TOOL_CALLS]`` may follow each other. The call id the model wrote is kept
(ToolCallStart.id). When the special tokens are stripped upstream, ``name{...}`` without
``[ARGS]`` is accepted too, as vLLM does. Magistral's ``[THINK]...[/THINK]`` is reasoning; a
``[TOOL_CALLS]`` inside it is a drafted call (see ``_stream.StreamParser``).
"""

from __future__ import annotations

from ..events import Event
from ._stream import (
    MORE,
    STOP,
    WS_LIMIT,
    CallReader,
    Collector,
    Markers,
    StreamParser,
    skip_ws,
)

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
THINK_START = "[THINK]"
THINK_END = "[/THINK]"
ARGS_OPEN = "{"  # v11 output with the special tokens stripped: name{...}

# states (reasoning is a flag, see StreamParser)
_TEXT, _HEAD, _NAME, _ID, _CALL, _LIST, _AFTER = range(7)


class MistralParser(StreamParser):
    """Both Mistral tool-call layouts, told apart by what follows ``[TOOL_CALLS]``."""

    name = "mistral"

    _IN_TEXT = Markers(TOOL_CALLS, THINK_START)
    _IN_THINK = Markers(THINK_END, TOOL_CALLS)
    _THINK_START = THINK_START
    _THINK_END = THINK_END
    _BOT = Markers(TOOL_CALLS)
    _NAME_END = Markers(ARGS, CALL_ID, ARGS_OPEN, TOOL_CALLS)
    _ID_END = Markers(ARGS, ARGS_OPEN, TOOL_CALLS)

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._collect: Collector | None = None
        self._call_name = ""
        self._in_list = False

    def _bare_call(self, call_id: str | None) -> None:
        self._reader = CallReader(self, self._BOT, name=self._call_name, call_id=call_id or None)
        self._state = _CALL

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        n = len(data)
        if st == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok == TOOL_CALLS:
                self._state = _HEAD
            return pos, tok is None
        if st == _NAME or st == _ID:
            assert self._collect is not None
            end, m = self._collect.feed(data, pos, final)
            if m is None:
                return end, True
            tok = m.group()
            if st == _NAME:
                self._call_name = self._collect.text().strip()
                call_id = None
            else:
                call_id = self._collect.text().strip()
            self._collect = None
            if tok == CALL_ID:
                self._collect = Collector(self._ID_END)
                self._state = _ID
                return m.end(), False
            self._bare_call(call_id)
            if tok == TOOL_CALLS:  # a name and nothing else: a call without arguments
                return end, False
            return (m.end() if tok == ARGS else end), False
        if st == _CALL:
            assert self._reader is not None
            i, status = self._reader.feed(data, pos, final, out)
            if status == MORE:
                return i, True
            status = self._call_ended(out, status)
            if status == STOP:  # the next [TOOL_CALLS] while this call was still open
                self._in_list = False
                self._state = _TEXT
            else:
                self._state = _LIST if self._in_list else _AFTER
            return i, False
        # _HEAD, _LIST, _AFTER: decide from the next non-blank character
        j = skip_ws(data, pos)
        if j - pos >= WS_LIMIT and st != _HEAD:
            self._state = _TEXT
            return pos, False
        if j >= n:
            if not final:
                return (j if st == _HEAD else pos), True
            self._state = _TEXT
            return (j if st == _HEAD else pos), False
        c = data[j]
        hit = self._BOT.at(data, j, final)
        if hit is True:
            return pos, True
        if hit:
            self._in_list = False
            self._state = _HEAD
            return j + len(TOOL_CALLS), False
        if st == _HEAD:
            if c == "[":
                self._in_list = True
                self._state = _LIST
                return j + 1, False
            if c == "{":
                self._reader = CallReader(self, self._BOT)
                self._state = _CALL
                return j, False
            self._collect = Collector(self._NAME_END)
            self._state = _NAME
            return j, False
        if st == _LIST:
            if c == ",":
                return j + 1, False
            if c == "{":
                self._reader = CallReader(self, self._BOT)
                self._state = _CALL
                return j, False
            if c == "]":
                self._in_list = False
                self._state = _AFTER
                return j + 1, False
        self._in_list = False
        self._state = _TEXT
        return pos, False

    def _close(self, out: list[Event]) -> None:
        if self._collect is not None:  # cut off inside the name or the id
            if self._state == _NAME:
                self._call_name = self._collect.text().strip()
            self._collect = None
            self._reader = CallReader(self, None, name=self._call_name)
        super()._close(out)
