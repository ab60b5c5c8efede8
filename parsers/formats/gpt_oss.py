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
"""

from __future__ import annotations

import re
from typing import Any

from ..events import Event, Reasoning, Text, ToolCallArgs, ToolCallEnd, ToolCallStart
from .base import MarkerParser, MarkerStream, text_event
from .generic_json import JsonArgs

START = "<|start|>"
CHANNEL = "<|channel|>"
MESSAGE = "<|message|>"
END = "<|end|>"
RETURN = "<|return|>"
CALL = "<|call|>"
CONSTRAIN = "<|constrain|>"
FUNCTIONS_PREFIX = "functions."
REASONING_CHANNEL = "analysis"

_TEXT_MARKERS = (START, CHANNEL, END, RETURN, CALL, MESSAGE)
_HEADER_MARKERS = (MESSAGE, START, END, RETURN, CALL)
_BODY_MARKERS = (END, RETURN, CALL, START, CHANNEL)
_CALL_ENDS = (CALL, END, RETURN)

_RECIPIENT = re.compile(r"to=([^\s<]+)")
_CHANNEL_NAME = re.compile(re.escape(CHANNEL) + r"\s*([^\s<]+)")

# states
_TEXT, _HEADER, _REASONING, _CONTENT, _CALL = range(5)


class GptOssParser(MarkerParser):
    """gpt-oss harmony channels and tool calls."""

    name = "gpt_oss"

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._in = MarkerStream()
        self._state = _TEXT
        self._header: list[str] = []
        self._args: JsonArgs | None = None

    def feed(self, text: str) -> list[Event]:
        self._in.push(text)
        return self._run(final=False)

    def finish(self) -> list[Event]:
        out = self._run(final=True)
        if self._state == _HEADER:  # a header that never opened a message: keep it as text
            text_event(self._header_text().removeprefix(CHANNEL), out)
        elif self._args is not None:
            args = self._args
            args.finish(out)
            out.append(ToolCallEnd(args.index, truncated=not args.complete))
            self._args = None
        self._state = _TEXT
        return out

    def _header_text(self) -> str:
        return "".join(self._header)

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

    def _run(self, final: bool) -> list[Event]:
        out: list[Event] = []
        src = self._in
        while True:
            state = self._state
            if state == _TEXT:
                chunk, marker = src.until(_TEXT_MARKERS, final)
                text_event(chunk, out)
                if marker is None:
                    return out
                if marker in (START, CHANNEL):
                    # keep <|channel|> in the header: the channel name follows it
                    self._header = [CHANNEL] if marker == CHANNEL else []
                    self._state = _HEADER
                elif marker == MESSAGE:  # a body without a header: content
                    self._state = _CONTENT
                # stray <|end|>, <|return|>, <|call|>: message framing, dropped
            elif state == _HEADER:
                chunk, marker = src.until(_HEADER_MARKERS, final)
                self._header.append(chunk)
                if marker is None:
                    return out
                header = self._header_text()
                self._header = []
                if marker == MESSAGE:
                    self._open(header, out)
                elif marker == START:  # the header was abandoned: not a marker, text
                    text_event(header.removeprefix(CHANNEL), out)
                else:
                    text_event(header.removeprefix(CHANNEL), out)
                    self._state = _TEXT
            elif state in (_REASONING, _CONTENT):
                chunk, marker = src.until(_BODY_MARKERS, final)
                if chunk:
                    out.append(Reasoning(chunk) if state == _REASONING else Text(chunk))
                if marker is None:
                    return out
                if marker in (START, CHANNEL):
                    self._header = [CHANNEL] if marker == CHANNEL else []
                    self._state = _HEADER
                else:
                    self._state = _TEXT
            else:  # _CALL
                args = self._args
                if args is None:  # pragma: no cover - _CALL always has a reader
                    self._state = _TEXT
                    continue
                src.pos, marker = args.feed(src.buf, src.pos, out, final)
                if marker is None:
                    return out
                if not args.emitted:
                    out.append(ToolCallArgs(args.index, "{}"))
                out.append(ToolCallEnd(args.index))
                self._args = None
                self._state = _TEXT
