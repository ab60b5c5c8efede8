"""PLaMo 3: each call a request of special tokens, its arguments one JSON object::

    <|plamo:begin_tool_requests:plamo|><|plamo:begin_tool_request:plamo|>
    <|plamo:begin_tool_name:plamo|>get_weather<|plamo:end_tool_name:plamo|>
    <|plamo:begin_tool_arguments:plamo|><|plamo:constrain|>json<|plamo:msg|>{"city": "Oslo"}
    <|plamo:end_tool_arguments:plamo|><|plamo:end_tool_request:plamo|>
    <|plamo:end_tool_requests:plamo|>

(without the line breaks), as vLLM's ``plamo3`` parser reads it. The arguments are streamed as
written (:class:`~._stream.JsonArgs`: a marker inside a JSON string is text); the
``<|plamo:constrain|>json<|plamo:msg|>`` after the arguments token is optional. A request
outside the requests block is read as well, and a request that ends before any arguments gives
``{}``. Reasoning is ``<|plamo:begin_think:plamo|>``...``<|plamo:end_think:plamo|>``; a block
of requests opened inside it is a draft, decided by the reasoning rule (vLLM ends the reasoning
there and calls). The end-of-turn token ``<|plamo:tag|>`` and the other tokens out of place
are dropped, never left in the content.
"""

from __future__ import annotations

from typing import Any

from ..events import Event, ToolCallArgs, ToolCallEnd, ToolCallStart
from ._declaration import ToolFormat
from ._stream import Collector, JsonArgs, Markers, StreamParser

REQUESTS_BEGIN = "<|plamo:begin_tool_requests:plamo|>"
REQUESTS_END = "<|plamo:end_tool_requests:plamo|>"
REQUEST_BEGIN = "<|plamo:begin_tool_request:plamo|>"
REQUEST_END = "<|plamo:end_tool_request:plamo|>"
NAME_BEGIN = "<|plamo:begin_tool_name:plamo|>"
NAME_END = "<|plamo:end_tool_name:plamo|>"
ARGS_BEGIN = "<|plamo:begin_tool_arguments:plamo|>"
ARGS_BEGIN_JSON = ARGS_BEGIN + "<|plamo:constrain|>json<|plamo:msg|>"
ARGS_END = "<|plamo:end_tool_arguments:plamo|>"
THINK_START = "<|plamo:begin_think:plamo|>"
THINK_END = "<|plamo:end_think:plamo|>"
EOT = "<|plamo:tag|>"

#: special tokens with no meaning in text or reasoning: dropped
_STRAY_TOKENS = (REQUESTS_END, REQUEST_END, NAME_BEGIN, NAME_END, ARGS_BEGIN, ARGS_BEGIN_JSON,
                 ARGS_END, EOT)
_ARG_ENDS = (ARGS_END, REQUEST_END, REQUESTS_END)

# states (reasoning is a flag, see StreamParser)
_TEXT, _BLOCK, _NAME, _ARGS = range(4)


class Plamo3Parser(StreamParser):
    """PLaMo 3 tool requests and reasoning."""

    name = "plamo3"

    _THINK_START = THINK_START
    _THINK_END = THINK_END
    _IN_TEXT = Markers(THINK_START, REQUESTS_BEGIN, REQUEST_BEGIN, *_STRAY_TOKENS)
    _IN_THINK = Markers(THINK_END, REQUESTS_BEGIN, REQUEST_BEGIN, *_STRAY_TOKENS)
    _STRAYS = frozenset(_STRAY_TOKENS)
    #: what may come between a block's requests (anything else there is dropped whitespace)
    _IN_BLOCK = Markers(REQUEST_BEGIN, NAME_BEGIN, ARGS_BEGIN, ARGS_BEGIN_JSON, REQUEST_END,
                        REQUESTS_END, ARGS_END, EOT)
    _NAME_ENDS = Markers(NAME_END, ARGS_BEGIN, ARGS_BEGIN_JSON, REQUEST_END, REQUESTS_END)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._in_block = False  # inside <|plamo:begin_tool_requests:plamo|>
        self._collect = Collector(self._NAME_ENDS)
        self._index: int | None = None  # the call named and not yet given arguments
        self._args: JsonArgs | None = None

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        if st == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok == REQUESTS_BEGIN:
                self._state, self._in_block = _BLOCK, True
            elif tok == REQUEST_BEGIN:
                self._state, self._in_block = _BLOCK, False
            return pos, tok is None
        if st == _BLOCK:
            end, m = self._IN_BLOCK.scan(data, pos, final)
            if m is None:
                return end, True
            self._on_block_marker(m.group(), out)
            return m.end(), False
        if st == _NAME:
            end, m = self._collect.feed(data, pos, final)
            if m is None:
                return end, True
            self._start(self._collect.text().strip(), out)
            tok = m.group()
            if tok == NAME_END:
                self._state = _BLOCK
            else:
                self._on_block_marker(tok, out)
            return m.end(), False
        # _ARGS
        assert self._args is not None
        pos, marker = self._args.feed(data, pos, out, final)
        if marker is None:
            return pos, True
        self._args = None
        self._state = _BLOCK
        if marker == REQUEST_END:
            self._request_ended()
        elif marker == REQUESTS_END:
            self._state, self._in_block = _TEXT, False
        return pos, False

    def _on_block_marker(self, tok: str, out: list[Event]) -> None:
        if tok == NAME_BEGIN:
            self._end_unargued(out)
            self._collect = Collector(self._NAME_ENDS)
            self._state = _NAME
        elif tok == ARGS_BEGIN or tok == ARGS_BEGIN_JSON:
            if self._index is None:  # arguments for no named call: not a call
                self._start("", out)
            assert self._index is not None
            self._args = JsonArgs(self._index, _ARG_ENDS)
            self._index = None
            self._state = _ARGS
        elif tok == REQUEST_END:
            self._end_unargued(out)
            self._request_ended()
        elif tok == REQUESTS_END:
            self._end_unargued(out)
            self._state, self._in_block = _TEXT, False
        else:  # REQUEST_BEGIN, a stray ARGS_END or EOT: nothing to do
            self._end_unargued(out)
            self._state = _BLOCK

    def _start(self, name: str, out: list[Event]) -> None:
        self._index = self.next_index()
        out.append(ToolCallStart(self._index, name))

    def _end_unargued(self, out: list[Event]) -> None:
        """A named call whose request ended before any arguments: ``{}``."""
        if self._index is not None:
            out.append(ToolCallArgs(self._index, "{}"))
            out.append(ToolCallEnd(self._index))
            self._index = None

    def _request_ended(self) -> None:
        self._state = _BLOCK if self._in_block else _TEXT

    def _close(self, out: list[Event]) -> None:
        if self._state == _NAME:
            name = self._collect.text().strip()
            if name:
                self._start(name, out)
        if self._index is not None:
            out.append(ToolCallEnd(self._index, truncated=True))
            self._index = None
        elif self._args is not None:
            self._args.finish(out)
            self._args = None


FORMAT = ToolFormat(
    name="plamo3",
    parser=Plamo3Parser,
    models=(r"plamo-?3",),
    rank=370,
    examples=("pfnet/plamo-3-nict-31b-base",),
    markers=(REQUESTS_BEGIN,),
    reasoning_markers=(THINK_START,),
    vllm_parser="plamo3",
    sample=(REQUESTS_BEGIN + REQUEST_BEGIN + NAME_BEGIN + "write" + NAME_END + ARGS_BEGIN_JSON
            + "$ARGS" + ARGS_END + REQUEST_END + REQUESTS_END),
)
