"""Inkling: typed message blocks, each opened by a content-kind token and closed by
``<|end_message|>``::

    <|content_thinking|>The user wants SF.<|end_message|>
    <|message_model|>get_weather<|content_invoke_tool_json|>{"name": "get_weather",
    "args": {"city": "SF"}}<|end_message|>
    <|message_model|><|content_text|>Checking.<|end_message|>

as vLLM's and SGLang's ``inkling`` parsers read it. A tool block holds one JSON call, its
arguments under ``"args"`` (``"arguments"`` and ``"parameters"`` accepted), read as it streams
like a Hermes call (:class:`~.hermes.HermesParser`); an object naming no tool stays text. A
thinking block is reasoning, ended by ``<|end_message|>`` (or ``<|content_model_end_sampling|>``);
a tool block opened inside it is a draft, decided by the reasoning rule. Text blocks, raw-text
tool blocks and tool-error blocks are visible text (SGLang makes a raw-text block a nameless
call; it is not a call here). The template writes ``<|message_model|>`` into the prompt, so a
reply starts in a message header: the optional name between that token and the block's kind
token is metadata, not content. A header is held only while it can still be a name (a short
run of name characters); anything else is text at once. Inkling's tokens never reach the
content, and ``<|end_message|>`` after a text block is not a stray reasoning end.
"""

from __future__ import annotations

import re
from typing import Any

from ..events import Event
from ._declaration import ToolFormat
from ._stream import CallReader, Markers, emit_plain
from .hermes import _CALL, _TEXT, HermesParser

MESSAGE_MODEL = "<|message_model|>"
CONTENT_TEXT = "<|content_text|>"
CONTENT_THINKING = "<|content_thinking|>"
CONTENT_INVOKE_TOOL_JSON = "<|content_invoke_tool_json|>"
CONTENT_INVOKE_TOOL_TEXT = "<|content_invoke_tool_text|>"
CONTENT_TOOL_ERROR = "<|content_tool_error|>"
CONTENT_MODEL_END_SAMPLING = "<|content_model_end_sampling|>"
END_MESSAGE = "<|end_message|>"

#: the tokens that open a block: a header right before one of them is metadata
_KINDS = frozenset((CONTENT_TEXT, CONTENT_THINKING, CONTENT_INVOKE_TOOL_JSON,
                    CONTENT_INVOKE_TOOL_TEXT, CONTENT_TOOL_ERROR, MESSAGE_MODEL))
_ARG_KEYS = ("args", "arguments", "parameters")
#: what a header (a function name) is made of, and the most of it held before it is text
_NAME_CHARS = re.compile(r"[\w.:\-]*")
HEADER_LIMIT = 128

_HEADER = 10  # a message header is being read (the other states are Hermes's)


class InklingParser(HermesParser):
    """Inkling message blocks: tool calls, thinking and text."""

    name = "inkling"

    _THINK_START = CONTENT_THINKING
    _THINK_END = END_MESSAGE
    _CALL_OPEN = CONTENT_INVOKE_TOOL_JSON
    _CALL_CLOSE = END_MESSAGE
    _STRAYS = frozenset((CONTENT_MODEL_END_SAMPLING,))
    _IN_TEXT = Markers(*_KINDS, CONTENT_MODEL_END_SAMPLING)
    _IN_THINK = Markers(END_MESSAGE, CONTENT_INVOKE_TOOL_JSON, CONTENT_MODEL_END_SAMPLING)
    _CALL_STOPS = Markers(END_MESSAGE)
    _AFTER_CALL = Markers(END_MESSAGE, CONTENT_INVOKE_TOOL_JSON)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._state = _HEADER  # the prompt ends with <|message_model|>
        self._head: list[str] = []
        self._head_len = 0

    @property
    def at_rest(self) -> bool:
        # a header being read holds text the fast path must not overtake
        return self._state != _HEADER and super().at_rest

    def closes_unopened(self, text: str) -> bool:
        # <|end_message|> ends every block, so its presence says nothing about reasoning
        # opened by the template
        return False

    def _marker(self, tok: str, thinking: bool) -> None:
        if tok == CONTENT_MODEL_END_SAMPLING:  # ends whatever block is open
            if thinking:
                self._thinking = False
            return
        if tok == END_MESSAGE and not thinking:  # the end of a text block: dropped
            return
        super()._marker(tok, thinking)

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        if st == _HEADER:
            return self._header(data, pos, final, out)
        if st == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok == CONTENT_INVOKE_TOOL_JSON:
                self._reader = CallReader(self, self._CALL_STOPS, text_if_unnamed=True,
                                          arg_keys=_ARG_KEYS)
                self._state = _CALL
            elif tok == MESSAGE_MODEL and self._drafts is None and not self._thinking:
                self._state = _HEADER
            # the other kinds (text, raw-text and error blocks) open visible text: dropped
            return pos, tok is None
        return super()._step(data, pos, final, out)

    def _header(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        """Hold a run of name characters until the token after it says what it was: a
        block's kind (the run was metadata, dropped) or anything else (it was text)."""
        if self._thinking or self._lead or self._boundary or self._drafts is not None:
            self._to_text()  # reasoning the template opened: no header to read
            return pos, False
        n = len(data)
        j = _NAME_CHARS.match(data, pos).end()  # type: ignore[union-attr]
        if j > pos:
            self._head.append(data[pos:j])
            self._head_len += j - pos
        if self._head_len > HEADER_LIMIT:
            self._release(out)
            return j, False
        if j >= n:
            if final:
                self._release(out)
            return j, True
        hit = self._IN_TEXT.at(data, j, final)
        if hit is True:
            return j, True  # a token may be starting: wait for it
        if hit in _KINDS:
            self._to_text()  # metadata: dropped; the text state reads the token
        else:
            self._release(out)
        return j, False

    def _to_text(self) -> None:
        self._head, self._head_len = [], 0
        self._state = _TEXT

    def _release(self, out: list[Event]) -> None:
        emit_plain(out, "".join(self._head), False)
        self._to_text()

    def _close(self, out: list[Event]) -> None:
        if self._state == _HEADER:
            self._release(out)
        super()._close(out)


FORMAT = ToolFormat(
    name="inkling",
    parser=InklingParser,
    models=(r"inkling",),
    rank=340,
    examples=("inkling",),
    markers=(CONTENT_INVOKE_TOOL_JSON,),
    reasoning_markers=(CONTENT_THINKING,),
    vllm_parser="inkling",
    sample='<|content_invoke_tool_json|>{"name": "write", "args": $ARGS}<|end_message|>',
)
