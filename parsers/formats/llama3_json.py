"""Llama 3.x JSON tool calls: ``{"name": ..., "parameters"|"arguments": {...}}``.

The reply is a call when it starts (after whitespace) with ``{`` or ``<|python_tag|>``, and
calls follow prose once ``<|python_tag|>`` appears (``Let me check.<|python_tag|>{...}``, as
vLLM and SGLang read it); a ``{`` after prose without the tag is the model answering in prose
and passes through untouched. Several calls are separated by ``;`` (vLLM's llama3_json
convention); a newline between objects is accepted too. The tag itself, a special token, never
reaches the content.
An object with no ``"name"`` was not a call after all and is released as content, so a model
that answers with a plain JSON document is not turned into a nameless tool call.
"""

from __future__ import annotations

from ..events import Event
from ._declaration import ToolFormat
from ._stream import (
    MORE,
    NOT_A_CALL,
    WS_LIMIT,
    CallReader,
    Markers,
    StreamParser,
    skip_ws,
)

PYTHON_TAG = "<|python_tag|>"
CALL_SEPARATOR = ";"

# states
_START, _TEXT, _CALL, _AFTER, _NEXT = range(5)


class Llama3JsonParser(StreamParser):
    """Llama 3.x JSON calls, optionally after ``<|python_tag|>``, separated by ``;``."""

    name = "llama3_json"

    _TAG = Markers(PYTHON_TAG)
    _IN_TEXT = _TAG

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._state = _START

    def _new_call(self) -> None:
        self._reader = CallReader(self, None, text_if_unnamed=True)
        self._state = _CALL

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        n = len(data)
        if st == _TEXT:  # prose: calls may follow only after the tag
            pos, tok = self._plain(data, pos, final, out)
            if tok == PYTHON_TAG:
                self._state = _NEXT
            return pos, tok is None
        if st == _CALL:
            assert self._reader is not None
            i, status = self._reader.feed(data, pos, final, out)
            if status == MORE:
                return i, True
            status = self._call_ended(out, status)
            self._state = _TEXT if status == NOT_A_CALL else _AFTER
            return i, False
        # _START, _AFTER, _NEXT: look past whitespace at what comes next
        j = skip_ws(data, pos)
        if j - pos >= WS_LIMIT:
            self._state = _TEXT
            return pos, False
        if j >= n:
            if not final:
                return pos, True
            if st == _START:  # a reply of nothing but whitespace
                self._state = _TEXT
                return pos, False
            return j, True  # whitespace after the last call
        c = data[j]
        if c == "{":
            self._new_call()
            return pos, False  # the reader skips the whitespace (and keeps it, should it be text)
        hit = self._TAG.at(data, j, final)
        if hit is True:
            return pos, True
        if hit:
            self._state = _NEXT
            return j + len(PYTHON_TAG), False
        if c == CALL_SEPARATOR and st == _AFTER:
            self._state = _NEXT
            return j + 1, False
        # prose (before any call, or after the calls)
        self._state = _TEXT
        return pos, False


FORMAT = ToolFormat(
    name="llama3_json",
    parser=Llama3JsonParser,
    models=(r"llama",),
    rank=60,  # after Llama 3.2 small and Llama 4 (pythonic)
    examples=("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.3-70B-Instruct"),
    markers=(PYTHON_TAG,),
    calls_in_reasoning=False,
    triggers=(b"<", b"{"),
    vllm_parser="llama3_json",
    vllm_aliases=("llama4_json",),
    sample='{"name": "write", "parameters": $ARGS}',
)
