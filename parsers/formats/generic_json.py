"""Generic fallback: the whole reply is a JSON tool call (or a list of them), no markers.

Models without a dedicated format, or prompted to "answer with JSON", reply with
``{"name": "get_weather", "arguments": {...}}`` (also ``"parameters"``, or
``{"tool": ..., "tool_input"/"args": ...}``, the OpenAI ``{"function": {...}}`` shape), bare or
fenced in a ```` ```json ```` block, or an array of such objects. Whether it is a call can
only be known once the value is complete, so text is held only while the reply so far could
still be such a value; anything else streams as text at once. A value that does not name
one of the request's tools is released as text: nothing is lost and no call is invented.

Reading the call objects is :class:`~._stream.CallListReader`'s, shared with Granite and
Phi-4-mini.
"""

from __future__ import annotations

from typing import Any

from ..events import Event, Text, ToolCallStart
from ._declaration import ToolFormat
from ._stream import CallListReader
from .base import JsonScanner, MarkerParser, text_event

FENCE = "```"
FENCE_LANGS = ("", "json")  # an opening fence with another language is not a call

_WS = " \t\r\n"


# states of GenericJsonParser
_LEAD, _FENCE, _FENCED_LEAD, _JSON, _AFTER, _PASS = range(6)


class GenericJsonParser(MarkerParser):
    """The reply as a whole is a JSON tool call (or list of them); otherwise plain text."""

    name = "generic_json"

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._state = _LEAD if self.tool_names - {None} else _PASS
        self._prefix: list[str] = []  # held whitespace and fence opening, released on refusal
        self._fence = ""  # the opening fence read so far
        self._fenced = False
        self._scanner = JsonScanner()
        self._json: list[str] = []
        self._tail = ""  # after the calls: whitespace and the closing fence, dropped

    @property
    def at_rest(self) -> bool:
        """Once the reply is known not to be a call, everything streams as it comes."""
        return self._state == _PASS

    def feed(self, text: str) -> list[Event]:
        out: list[Event] = []
        i, n = 0, len(text)
        while i < n:
            state = self._state
            if state == _PASS:
                text_event(text[i:], out)
                break
            if state == _JSON:
                chunk = text[i:]
                k = self._scanner.feed(chunk)
                if k < 0:
                    self._json.append(chunk)
                    break
                self._json.append(chunk[:k])
                i += k
                self._decide(out, complete=True)
                continue
            if state == _AFTER:
                i = self._after(text, i, out)
                continue
            c = text[i]
            if state in (_LEAD, _FENCED_LEAD):
                if c in _WS:
                    self._prefix.append(c)
                    i += 1
                elif c in "{[":
                    self._state = _JSON
                elif c == "`" and state == _LEAD:
                    self._state = _FENCE
                else:
                    self._refuse(out)
            else:  # _FENCE: "```" then an optional language tag then a newline
                i += 1
                self._fence += c
                if len(self._fence) <= 3:
                    if c != "`":
                        self._refuse(out)
                elif c == "\n":
                    if self._fence[3:].strip().lower() in FENCE_LANGS:
                        self._prefix.append(self._fence)
                        self._fence = ""
                        self._fenced = True
                        self._state = _FENCED_LEAD
                    else:
                        self._refuse(out)
                elif not (c.isalnum() or c in " \t") or len(self._fence) > 16:
                    self._refuse(out)
        return out

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self._state == _JSON:
            self._decide(out, complete=False)
        elif self._state in (_LEAD, _FENCE, _FENCED_LEAD):
            self._refuse(out)
        self._state = _PASS
        return out

    def _refuse(self, out: list[Event]) -> None:
        """Not a tool call after all: everything held so far is text, and so is the rest."""
        text_event("".join(self._prefix) + self._fence + "".join(self._json), out)
        self._prefix, self._fence, self._json = [], "", []
        self._state = _PASS

    def _decide(self, out: list[Event], complete: bool) -> None:
        """The JSON value ended (or the stream did): emit it as calls if it names our tools."""
        text = "".join(self._json)
        events: list[Event] = []
        counter = iter(range(self._calls, self._calls + 1_000_000_000))
        reader = CallListReader(lambda: next(counter))
        pos = reader.feed(text, 0, events)
        reader.finish(events)
        starts = [e for e in events if isinstance(e, ToolCallStart)]
        ok = (starts and pos == len(text) and all(e.name in self.tool_names for e in starts)
              and not any(isinstance(e, Text) for e in events))
        if not ok:
            self._refuse(out)
            return
        self._calls += len(starts)
        out.extend(events)
        self._prefix, self._json = [], []
        self._state = _AFTER if complete else _PASS

    def _after(self, text: str, i: int, out: list[Event]) -> int:
        """Drop whitespace (and the closing fence) after the calls; the rest is text."""
        self._tail += text[i:]
        rest = self._tail.lstrip(_WS)
        if self._fenced:
            if not rest or (len(rest) < len(FENCE) and FENCE.startswith(rest)):
                self._tail = rest  # the whitespace is dropped anyway: keep the tail short
                return len(text)
            if rest.startswith(FENCE):
                rest = rest[len(FENCE):]
                self._fenced = False
                self._tail = rest
                rest = rest.lstrip(_WS)
        self._tail = ""  # whitespace alone is dropped: nothing to keep (and re-strip)
        if rest:
            self._state = _PASS
            text_event(rest, out)
        return len(text)


FORMAT = ToolFormat(
    name="generic_json",
    parser=GenericJsonParser,  # no model names, no markers: only by --tool-format
    triggers=(b"{", b"[", b"`"),
    sample='{"name": "write", "arguments": $ARGS}',
)
