"""Muse Glimmer: messages addressed to a recipient, tool calls as ATEM XML::

    <|start|>assistant to=self<|message|>Oslo, then Bergen.<|eom|>
    <|start|>assistant to=get_weather.get_weather<|message|><atem:function_calls>
    <atem:invoke name="get_weather.get_weather">
    <atem:parameter name="city">Oslo</atem:parameter>
    </atem:invoke>
    </atem:function_calls><|eom|>
    <|start|>assistant to=user<|message|>It is sunny.<|eot|>

as vLLM's ``muse_glimmer`` parser and SGLang's ``muse`` detector read it. A message's header
runs from ``<|start|>`` to ``<|message|>``; the first message of a turn has only
`` to=self<|message|>`` (the prompt ends with ``<|start|>assistant``), and a bare
``<|message|>`` has no recipient. ``to=self`` is reasoning; ``to=user``, ``commentary`` or no
recipient is content; any other recipient is a tool, and each ``<atem:invoke>`` in its message
is a call. A message ends at ``<|eom|>``, ``<|eot|>`` or the next header (so a reasoning
message whose ``<|eom|>`` was lost cannot swallow the call after it). Calls are scoped to tool
messages: an ``<atem:invoke>`` echoed in reasoning or in the answer is text, never a call, so
there is nothing drafted to decide. Text outside any message is content.

The template renders a tool's recipient as ``NAME.*``, so the model writes ``NAME.NAME``: that
name is read as ``NAME`` when the request declared ``NAME`` (and not the doubled one), as vLLM
does. A parameter's value is typed by the tool's schema like GLM's
(:data:`~.glm45.GLM_VALUES`; the peers JSON-decode every value, which turns a string parameter
written ``42`` into a number).
"""

from __future__ import annotations

import re
from typing import Any

from ..events import Event
from ._declaration import ToolFormat
from ._stream import WS_LIMIT, Collector, Markers, StreamParser, XmlArgs, emit_plain, skip_ws
from .glm45 import GLM_VALUES

START = "<|start|>"
MESSAGE = "<|message|>"
EOM = "<|eom|>"
EOT = "<|eot|>"
CALLS_OPEN = "<atem:function_calls>"
CALLS_CLOSE = "</atem:function_calls>"
INVOKE_OPEN = "<atem:invoke"
INVOKE_CLOSE = "</atem:invoke>"
PARAM_OPEN = "<atem:parameter"
PARAM_CLOSE = "</atem:parameter>"
TAG_END = ">"
REASONING_RECIPIENT = "self"
CONTENT_RECIPIENTS = frozenset({"user", "commentary"})

#: a recipient's header written without ``<|start|>``: `` to=NAME`` right before ``<|message|>``
_TO_TAIL = re.compile(r"to=([A-Za-z0-9_.\-]*)[^\S\n]*$")
#: what may still grow into one: held back until the next piece says
_TO_PARTIAL = re.compile(r"(?:to=[A-Za-z0-9_.\-]*[^\S\n]*|to|t)$")
_RECIPIENT = re.compile(r"to=([^\s<]+)")
_NAME_ATTR = re.compile(r'\bname="([^"]*)"')
#: the longest such header held back (a recipient is a tool name)
_TO_WINDOW = 256

# states
_TEXT, _HEADER, _REASONING, _CONTENT, _TOOL, _INVOKE, _PARAM_ATTRS, _VALUE, _INVOKE_ATTRS = \
    range(9)


class MuseGlimmerParser(StreamParser):
    """Muse Glimmer messages: reasoning, content and ATEM tool calls."""

    name = "muse_glimmer"

    _IN_TEXT = Markers(START, MESSAGE, EOM, EOT)
    _IN_HEADER = Markers(MESSAGE, START, EOM, EOT)
    _IN_TOOL = Markers(INVOKE_OPEN, CALLS_OPEN, CALLS_CLOSE, START, MESSAGE, EOM, EOT)
    _IN_INVOKE = Markers(PARAM_OPEN, INVOKE_CLOSE, START, MESSAGE, EOM, EOT)
    _TAG_END = Markers(TAG_END)
    _VALUE_END = Markers(PARAM_CLOSE, INVOKE_CLOSE, START, MESSAGE, EOM, EOT)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._header: list[str] = []
        self._collect = Collector(self._TAG_END)
        self._call: XmlArgs | None = None
        self._key = ""
        #: the reply's leading white space, held: before the first header it is not content
        self._fresh = True
        self._lead_ws = ""

    def open_reasoning(self, lead: bool = True) -> None:
        super().open_reasoning(lead)
        self._thinking = False  # reasoning is a message to=self, not a <think> block
        self._lead = False
        if self._state == _TEXT:
            self._state = _REASONING

    @property
    def in_reasoning(self) -> bool:
        return self._state == _REASONING

    def end_server_reasoning(self) -> None:
        if self._state == _REASONING:
            self._state = _TEXT

    # messages -----------------------------------------------------------------------------
    def _open(self, recipient: str | None) -> None:
        if recipient == REASONING_RECIPIENT:
            self._state = _REASONING
        elif recipient is None or recipient in CONTENT_RECIPIENTS:
            self._state = _CONTENT
        else:
            self._state = _TOOL

    def _framing(self, tok: str) -> None:
        """A message ended at ``tok`` (or a stray end token met outside one)."""
        if tok == START:
            self._header = []
            self._state = _HEADER
        else:
            self._state = _TEXT

    def _prose(self, data: str, pos: int, final: bool, out: list[Event],
               kind: int) -> tuple[int, bool]:
        """Text outside messages, reasoning or content, up to the next framing token; a
        `` to=NAME`` right before ``<|message|>`` is the next message's header."""
        if self._fresh:  # the reply's leading white space: held until what follows says
            j = skip_ws(data, pos)
            if j >= len(data) and not final and j - pos < WS_LIMIT:
                return pos, True
            self._fresh = False
            self._lead_ws = data[pos:j]
            pos = j
        end, m = self._IN_TEXT.scan(data, pos, final)
        chunk = data[pos:end]
        reasoning = kind == _REASONING
        tok = m.group() if m is not None else None
        if tok == MESSAGE or (tok is None and not final):
            window = len(chunk) - _TO_WINDOW if len(chunk) > _TO_WINDOW else 0
            t = (_TO_TAIL if tok == MESSAGE else _TO_PARTIAL).search(chunk, window)
            if t is not None and (t.start() > window or window == 0):
                self._emit(out, chunk[:t.start()], reasoning)
                if tok is None:  # may still be a header: hold it
                    return pos + t.start(), True
                self._lead_ws = ""  # white space before a header is not content
                self._open(t.group(1) or None)
                return m.end(), False
        self._emit(out, chunk, reasoning)
        if m is None:
            if final:  # a reply of white space alone: it was text
                emit_plain(out, self._lead_ws, reasoning)
                self._lead_ws = ""
            return end, True
        self._lead_ws = ""  # white space before framing is not content
        if tok == MESSAGE:
            self._open(None)
        else:
            self._framing(tok)
        return m.end(), False

    def _emit(self, out: list[Event], text: str, reasoning: bool) -> None:
        if text and self._lead_ws:
            text, self._lead_ws = self._lead_ws + text, ""
        emit_plain(out, text, reasoning)

    # the steps ----------------------------------------------------------------------------
    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        if st == _TEXT or st == _REASONING or st == _CONTENT:
            return self._prose(data, pos, final, out, st)
        if st == _HEADER:
            end, m = self._IN_HEADER.scan(data, pos, final)
            self._header.append(data[pos:end])
            if m is None:
                return end, True
            header = "".join(self._header)
            self._header = []
            tok = m.group()
            if tok == MESSAGE:
                r = _RECIPIENT.search(header)
                self._open(r.group(1) if r else None)
            else:  # the header was abandoned: it was text
                emit_plain(out, START + header, False)
                self._framing(tok)
            return m.end(), False
        if st == _TOOL or st == _INVOKE:
            end, m = (self._IN_TOOL if st == _TOOL else self._IN_INVOKE).scan(data, pos, final)
            if m is None:  # between tags: layout, dropped
                return end, True
            tok = m.group()
            if tok == INVOKE_OPEN:
                self._read(_INVOKE_ATTRS, self._TAG_END)
            elif tok == PARAM_OPEN:
                self._read(_PARAM_ATTRS, self._TAG_END)
            elif tok == INVOKE_CLOSE:
                self._end_call(out)
                self._state = _TOOL
            elif tok in (START, MESSAGE, EOM, EOT):
                self._end_call(out)
                self._message_ended(tok)
            return m.end(), False
        end, m = self._collect.feed(data, pos, final)
        if m is None:
            return end, True
        text = self._collect.text()
        if st == _INVOKE_ATTRS:
            n = _NAME_ATTR.search(text)
            self._call = XmlArgs(self, self._tool_name(n.group(1) if n else ""), GLM_VALUES,
                                 out)
            self._state = _INVOKE
        elif st == _PARAM_ATTRS:
            n = _NAME_ATTR.search(text)
            self._key = n.group(1) if n else ""
            self._read(_VALUE, self._VALUE_END)
        else:  # _VALUE
            if self._call is not None:
                self._call.member(self._key, text, out)
            tok = m.group()
            if tok == PARAM_CLOSE:
                self._state = _INVOKE
            elif tok == INVOKE_CLOSE:
                self._end_call(out)
                self._state = _TOOL
            else:
                self._end_call(out)
                self._message_ended(tok)
        return m.end(), False

    def _message_ended(self, tok: str) -> None:
        if tok == MESSAGE:  # a bare header: the next message has no recipient
            self._open(None)
        else:
            self._framing(tok)

    def _tool_name(self, emitted: str) -> str:
        """``NAME.NAME`` (the template's ``NAME.*`` recipient) is ``NAME`` when only that is
        declared."""
        names = self.tool_names
        if not names or emitted in names:
            return emitted
        head, dot, tail = emitted.partition(".")
        return head if dot and head == tail and head in names else emitted

    def _end_call(self, out: list[Event]) -> None:
        if self._call is not None:
            self._call.end(out)
            self._call = None

    def _close(self, out: list[Event]) -> None:
        st = self._state
        if st == _HEADER:  # a header that never opened a message: text
            emit_plain(out, START + "".join(self._header), False)
            return
        if st == _INVOKE_ATTRS:
            n = _NAME_ATTR.search(self._collect.text())
            if n is not None:
                self._call = XmlArgs(self, self._tool_name(n.group(1)), GLM_VALUES, out)
        if self._call is not None:
            in_value = st == _VALUE
            self._call.truncate(self._key if in_value else None,
                                self._collect.text() if in_value else None, out)
            self._call = None


FORMAT = ToolFormat(
    name="muse_glimmer",
    parser=MuseGlimmerParser,
    models=(r"muse-?glimmer",),
    rank=400,
    examples=("Muse-Glimmer-30B",),
    calls_in_reasoning=False,
    vllm_parser="muse_glimmer",
    sample=('<|start|>assistant to=write.write<|message|><atem:function_calls>'
            '<atem:invoke name="write"><atem:parameter name="text">$TEXT</atem:parameter>'
            "</atem:invoke></atem:function_calls><|eom|>"),
)
