"""Mistral: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`` (tokenizers before v11)
and ``[TOOL_CALLS]name[ARGS]{...}`` (v11+), optionally ``[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}``.

Several ``[TOOL_CALLS]`` may follow each other. The call id the model wrote is kept
(ToolCallStart.id). When the special tokens are stripped upstream, ``name{...}`` without
``[ARGS]`` is accepted too, as vLLM does. Magistral's ``[THINK]...[/THINK]`` is reasoning; a
``[TOOL_CALLS]`` inside it is a drafted call (see ``_stream.StreamParser``).

What follows ``[TOOL_CALLS]`` is a call only when it has a call's shape: a list of objects, an
object, or a tool name (an identifier, at most :data:`MAX_NAME` characters) followed at once
by ``[ARGS]``, ``[CALL_ID]``, ``{`` or the next ``[TOOL_CALLS]``. Anything else (``[TOOL_CALLS]
Sorry, I can't.``) is content, without the token: a sentence is never taken for a tool name.
At the end of the reply a lone name is a call cut off only when it names a declared tool.
"""

from __future__ import annotations

import re

from ..events import Event
from ._declaration import ToolFormat
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
LIST_OPEN = "["
#: the longest tool name waited for after [TOOL_CALLS] (OpenAI allows 64 characters)
MAX_NAME = 128

_TOOL_NAME = re.compile(r"[A-Za-z_][\w.\-]*")

# states (reasoning is a flag, see StreamParser)
_TEXT, _HEAD, _ID, _CALL, _LIST, _AFTER, _LIST_HEAD = range(7)


class MistralParser(StreamParser):
    """Both Mistral tool-call layouts, told apart by what follows ``[TOOL_CALLS]``."""

    name = "mistral"

    # [ARGS] and [CALL_ID] out of place are special tokens with no meaning: dropped
    _IN_TEXT = Markers(TOOL_CALLS, THINK_START, ARGS, CALL_ID)
    _IN_THINK = Markers(THINK_END, TOOL_CALLS)
    _THINK_START = THINK_START
    _THINK_END = THINK_END
    _BOT = Markers(TOOL_CALLS)
    _AFTER_NAME = Markers(ARGS, CALL_ID, ARGS_OPEN, TOOL_CALLS)
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
        if st == _ID:
            assert self._collect is not None
            end, m = self._collect.feed(data, pos, final)
            if m is None:
                return end, True
            tok = m.group()
            call_id = self._collect.text().strip()
            self._collect = None
            self._bare_call(call_id)
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
        if st == _LIST_HEAD:  # "[TOOL_CALLS] [": a list of call objects, or prose
            k = skip_ws(data, skip_ws(data, pos) + 1)
            if k - pos >= WS_LIMIT:
                self._state = _TEXT
                return pos, False
            if k >= n and not final:
                return pos, True
            if k < n and data[k] == ARGS_OPEN:
                self._in_list = True
                self._state = _LIST
                return k, False
            self._state = _TEXT
            return pos, False
        # _HEAD, _LIST, _AFTER: decide from the next non-blank character
        j = skip_ws(data, pos)
        if j - pos >= WS_LIMIT:
            self._state = _TEXT
            return pos, False
        if j >= n:
            if not final:
                return pos, True
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
            if c == LIST_OPEN:
                self._state = _LIST_HEAD
                return pos, False
            if c == ARGS_OPEN:
                self._reader = CallReader(self, self._BOT)
                self._state = _CALL
                return j, False
            return self._name_head(data, pos, j, final)
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

    def _name_head(self, data: str, pos: int, j: int, final: bool) -> tuple[int, bool]:
        """After ``[TOOL_CALLS]``, at ``data[j]``: a v11 tool name, or content (from ``pos``,
        the token alone dropped)."""
        m = _TOOL_NAME.match(data, j)
        k = m.end() if m is not None else j
        if k == j or k - j > MAX_NAME:
            self._state = _TEXT
            return pos, False
        if k >= len(data):  # the name may go on
            if not final:
                return pos, True
            if data[j:k] not in self.tool_names:
                self._state = _TEXT
                return pos, False
            self._call_name = data[j:k]  # a declared tool, cut off after its name
            self._reader = CallReader(self, None, name=self._call_name)
            self._state = _CALL
            return k, False
        hit = self._AFTER_NAME.at(data, k, final)
        if hit is True:
            return pos, True
        if not hit:
            self._state = _TEXT
            return pos, False
        self._call_name = data[j:k]
        if hit == CALL_ID:
            self._collect = Collector(self._ID_END)
            self._state = _ID
            return k + len(CALL_ID), False
        self._bare_call(None)
        # [ARGS] is consumed; "{" starts the arguments; the next [TOOL_CALLS] ends a call
        # that has none
        return (k + len(ARGS) if hit == ARGS else k), False

    def _close(self, out: list[Event]) -> None:
        if self._collect is not None:  # cut off inside the id
            self._collect = None
            self._reader = CallReader(self, None, name=self._call_name)
        super()._close(out)


FORMAT = ToolFormat(
    name="mistral",
    parser=MistralParser,
    models=(r"mistral|mixtral|ministral|magistral|devstral|codestral",),
    rank=70,
    examples=("mistralai/Mistral-7B-Instruct-v0.3", "mistralai/Magistral-Small-2506"),
    markers=(TOOL_CALLS,),
    reasoning_markers=(THINK_START,),  # Magistral's
    triggers=(b"[",),
    vllm_parser="mistral",
    sample="[TOOL_CALLS]write[ARGS]$ARGS",
)
