"""gpt-oss (OpenAI harmony format): messages on channels, tool calls addressed to a recipient.

::

    <|channel|>analysis<|message|>reasoning<|end|>
    <|start|>assistant<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{}<|call|>
    <|start|>assistant<|channel|>final<|message|>content<|return|>

A message header runs from ``<|start|>`` (or from ``<|channel|>``, since servers often strip
the leading ``<|start|>assistant``) to ``<|message|>``; the recipient ``to=functions.NAME``
may sit before or after ``<|channel|>``. ``analysis`` is reasoning; ``final`` and
``commentary`` without a recipient are content; a message with a recipient is a call whose
body is the raw JSON arguments, closed by ``<|call|>``. Servers usually treat ``<|call|>``
and ``<|return|>`` as stop tokens and drop them, so a body ends at the stream's end too.
Text outside any message passes through as content.

Reasoning is the analysis channel. A call is its own message, addressed to a recipient, so it
is never drafted inside reasoning; a reply opened inside reasoning (:meth:`open_reasoning`)
starts in an analysis message body.
"""

from __future__ import annotations

import re
from typing import Any

from ..events import Event, ToolCallStart
from ._declaration import ToolFormat
from ._stream import JsonArgs, Markers, StreamParser, emit_plain

START = "<|start|>"
CHANNEL = "<|channel|>"
MESSAGE = "<|message|>"
END = "<|end|>"
RETURN = "<|return|>"
CALL = "<|call|>"
CONSTRAIN = "<|constrain|>"
FUNCTIONS_PREFIX = "functions."
REASONING_CHANNEL = "analysis"

_CALL_ENDS = (CALL, END, RETURN)

_RECIPIENT = re.compile(r"to=([^\s<]+)")
_CHANNEL_NAME = re.compile(re.escape(CHANNEL) + r"\s*([^\s<]+)")

# states
_TEXT, _HEADER, _REASONING, _CONTENT, _CALL = range(5)


class GptOssParser(StreamParser):
    """gpt-oss harmony channels and tool calls."""

    name = "gpt_oss"

    _IN_TEXT = Markers(START, CHANNEL, END, RETURN, CALL, MESSAGE)
    _IN_HEADER = Markers(MESSAGE, START, END, RETURN, CALL)
    _IN_BODY = Markers(END, RETURN, CALL, START, CHANNEL)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._header: list[str] = []
        self._args: JsonArgs | None = None

    def open_reasoning(self, lead: bool = True) -> None:
        super().open_reasoning(lead)
        self._thinking = False  # harmony marks reasoning by channel, not by <think>
        self._lead = False
        if self._state == _TEXT:
            self._state = _REASONING

    @property
    def in_reasoning(self) -> bool:
        return self._state == _REASONING

    def end_server_reasoning(self) -> None:
        if self._state == _REASONING:
            self._state = _TEXT

    def _open(self, header: str, out: list[Event]) -> None:
        """A header is complete: decide what the message body is."""
        m = _RECIPIENT.search(header)
        if m is not None:
            recipient = m.group(1)
            name = recipient.removeprefix(FUNCTIONS_PREFIX)
            index = self.next_index()
            out.append(ToolCallStart(index, name))
            self._args = JsonArgs(index, _CALL_ENDS)
            self._state = _CALL
            return
        c = _CHANNEL_NAME.search(header)
        self._state = _REASONING if c and c.group(1) == REASONING_CHANNEL else _CONTENT

    def _to_header(self, marker: str) -> None:
        # keep <|channel|> in the header: the channel name follows it
        self._header = [CHANNEL] if marker == CHANNEL else []
        self._state = _HEADER

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        if st == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok in (START, CHANNEL):
                self._to_header(tok)
            elif tok == MESSAGE:  # a body without a header: content
                self._state = _CONTENT
            # stray <|end|>, <|return|>, <|call|>: message framing, dropped
            return pos, tok is None
        if st == _HEADER:
            end, m = self._IN_HEADER.scan(data, pos, final)
            self._header.append(data[pos:end])
            if m is None:
                return end, True
            header = "".join(self._header)
            self._header = []
            tok = m.group()
            if tok == MESSAGE:
                self._open(header, out)
            else:  # the header was abandoned: not a marker, text
                emit_plain(out, header.removeprefix(CHANNEL), False)
                if tok != START:
                    self._state = _TEXT
            return m.end(), False
        if st == _REASONING or st == _CONTENT:
            end, m = self._IN_BODY.scan(data, pos, final)
            emit_plain(out, data[pos:end], st == _REASONING)
            if m is None:
                return end, True
            tok = m.group()
            if tok in (START, CHANNEL):
                self._to_header(tok)
            else:
                self._state = _TEXT
            return m.end(), False
        # _CALL
        assert self._args is not None
        pos, marker = self._args.feed(data, pos, out, final)
        if marker is None:
            return pos, True
        self._args = None
        self._state = _TEXT
        return pos, False

    def _close(self, out: list[Event]) -> None:
        if self._state == _HEADER:  # a header that never opened a message: keep it as text
            emit_plain(out, "".join(self._header).removeprefix(CHANNEL), False)
        elif self._args is not None:
            self._args.finish(out)
            self._args = None


FORMAT = ToolFormat(
    name="gpt_oss",
    parser=GptOssParser,
    models=(r"gpt-?oss",),
    rank=110,
    examples=("openai/gpt-oss-20b",),
    markers=(CHANNEL,),
    calls_in_reasoning=False,
    vllm_parser="openai",
    sample="<|channel|>commentary to=functions.write <|constrain|>json<|message|>$ARGS<|call|>",
)
