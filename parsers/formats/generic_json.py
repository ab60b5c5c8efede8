"""Generic fallback: the whole reply is a JSON tool call (or a list of them), no markers.

Models without a dedicated format, or prompted to "answer with JSON", reply with
``{"name": "get_weather", "arguments": {...}}`` (also ``"parameters"``, or
``{"tool": ..., "tool_input"/"args": ...}``, the OpenAI ``{"function": {...}}`` shape), bare or
fenced in a ```` ```json ```` block, or an array of such objects. Whether it is a call can
only be known once the value is complete, so text is held only while the reply so far could
still be such a value; anything else streams as text at once. A value that does not name
one of the request's tools is released as text: nothing is lost and no call is invented.

This module also holds the JSON helpers shared by the formats whose calls are JSON objects
(Granite, Phi-4-mini) or whose arguments are raw JSON closed by a marker (Kimi K2, gpt-oss).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from json.decoder import scanstring
from typing import Any

from ..events import Event, Text, ToolCallArgs, ToolCallEnd, ToolCallStart
from .base import JsonScanner, MarkerParser, holdback, text_event

FENCE = "```"
FENCE_LANGS = ("", "json")  # an opening fence with another language is not a call

# keys naming the tool, and keys carrying its arguments, in order of preference
NAME_KEYS = ("name", "tool", "tool_name", "function", "function_name")
ARG_KEYS = ("arguments", "parameters", "tool_input", "args", "input", "params")

_DECODER = json.JSONDecoder()
_WS = " \t\r\n"
_LENIENT_NAME = re.compile(
    r"""["']?(?:name|tool|tool_name|function|function_name)["']?\s*:\s*["']([^"'\\]+)["']""")
_LENIENT_ARGS = re.compile(
    r"""["']?(?:arguments|parameters|tool_input|args|input|params)["']?\s*:\s*""")


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def object_members(text: str) -> dict[str, tuple[Any, str]] | None:
    """Parse a JSON object keeping each member's raw text: key -> (value, raw value text).

    The raw text lets arguments reach the client exactly as the model wrote them (no number
    or escape re-serialization). None when ``text`` is not exactly one JSON object.
    """
    try:
        i = _skip_ws(text, 0)
        if text[i] != "{":
            return None
        members: dict[str, tuple[Any, str]] = {}
        i = _skip_ws(text, i + 1)
        if text[i] == "}":
            return members if _skip_ws(text, i + 1) == len(text) else None
        while True:
            if text[i] != '"':
                return None
            key, i = scanstring(text, i + 1)
            i = _skip_ws(text, i)
            if text[i] != ":":
                return None
            i = _skip_ws(text, i + 1)
            value, j = _DECODER.raw_decode(text, i)
            members[key] = (value, text[i:j])
            i = _skip_ws(text, j)
            if text[i] == ",":
                i = _skip_ws(text, i + 1)
                continue
            if text[i] == "}":
                return members if _skip_ws(text, i + 1) == len(text) else None
            return None
    except (ValueError, IndexError, RecursionError):
        return None


def call_from_members(members: dict[str, tuple[Any, str]]) -> tuple[str, str] | None:
    """(name, arguments JSON text) of a parsed call object, or None if it names no tool."""
    fn = members.get("function")
    if fn is not None and isinstance(fn[0], dict):  # OpenAI shape {"function": {...}}
        inner = object_members(fn[1])
        return call_from_members(inner) if inner is not None else None
    name = next((members[k][0] for k in NAME_KEYS
                 if k in members and isinstance(members[k][0], str)), None)
    if name is None:
        return None
    for k in ARG_KEYS:
        if k in members:
            value, raw = members[k]
            # OpenAI wire shape: arguments already a JSON string; unwrap, don't double-encode
            return name, (value if isinstance(value, str) else raw)
    return name, "{}"


def lenient_call(text: str, closed: bool) -> tuple[str, str] | None:
    """Best-effort (name, raw arguments) from an object that is not valid JSON or is cut off.

    The arguments are the raw text after the arguments key (without the object's closing
    brace when ``closed``); repair happens later, on the whole.
    """
    m = _LENIENT_NAME.search(text)
    if m is None:
        return None
    a = _LENIENT_ARGS.search(text)
    if a is None:
        return m.group(1), ""
    raw = text[a.end():]
    if closed:
        raw = raw.rstrip()
        raw = raw[:-1].rstrip() if raw.endswith("}") else raw
    return m.group(1), raw


class CallListReader:
    """Reads ``[{call}, {call}, ...]`` or a single ``{call}`` from the stream, one call at a time.

    Each object is delimited with a :class:`JsonScanner` (so brackets and markers inside
    strings don't count) and held until it closes, then emitted as one call; work is linear
    in the text. The reader stops at the list's end or at the first character that cannot
    continue it, leaving that character to the caller.
    """

    __slots__ = ("_in_list", "_next_index", "_parts", "_scanner", "done")

    def __init__(self, next_index: Callable[[], int], in_list: bool = False) -> None:
        # in_list: the opening bracket was part of the format's marker (``functools[``)
        self._next_index = next_index
        self._in_list = in_list
        self._scanner: JsonScanner | None = None
        self._parts: list[str] = []
        self.done = False

    def feed(self, buf: str, pos: int, out: list[Event]) -> int:
        """Consume from ``buf[pos:]``; returns the new position (``self.done`` once over)."""
        n = len(buf)
        while pos < n and not self.done:
            if self._scanner is not None:
                chunk = buf[pos:]
                k = self._scanner.feed(chunk)
                if k < 0:
                    self._parts.append(chunk)
                    return n
                self._parts.append(chunk[:k])
                pos += k
                self._emit("".join(self._parts), out, truncated=False)
                self._scanner, self._parts = None, []
                self.done = not self._in_list
                continue
            c = buf[pos]
            if c in _WS:
                pos += 1
            elif c == "{":
                self._scanner = JsonScanner()
            elif c == "[" and not self._in_list:
                self._in_list = True
                pos += 1
            elif c == "," and self._in_list:
                pos += 1
            elif c == "]" and self._in_list:
                pos += 1
                self.done = True
            else:
                self.done = True
        return pos

    def finish(self, out: list[Event]) -> None:
        """End of stream: an object still open becomes a truncated call."""
        if self._scanner is not None:
            self._emit("".join(self._parts), out, truncated=True)
            self._scanner, self._parts = None, []
        self.done = True

    def _emit(self, text: str, out: list[Event], truncated: bool) -> None:
        members = None if truncated else object_members(text)
        call = call_from_members(members) if members is not None else None
        if call is None:
            call = lenient_call(text, closed=not truncated)
        if call is None:  # names no tool: it was never a call, pass it on as text
            text_event(text, out)
            return
        name, args = call
        index = self._next_index()
        out.append(ToolCallStart(index, name))
        if args:
            out.append(ToolCallArgs(index, args))
        out.append(ToolCallEnd(index, truncated))


class JsonArgs:
    """Streams a call's raw JSON arguments up to a closing marker.

    A closing marker counts only outside JSON strings (a ``"<|call|>"`` inside a value does
    not end the call) but does count while brackets are still open, so unbalanced JSON
    cannot swallow the rest of the reply. Leading whitespace is dropped; text after the
    value is complete is held and kept only if it is not just whitespace.
    """

    __slots__ = ("_ends", "_scanner", "_started", "_trailing", "emitted", "index")

    def __init__(self, index: int, ends: tuple[str, ...]) -> None:
        self.index = index
        self._ends = ends
        self._scanner = JsonScanner()
        self._started = False
        self._trailing: list[str] = []
        self.emitted = False

    @property
    def complete(self) -> bool:
        return self._scanner.done

    def feed(self, buf: str, pos: int, out: list[Event], final: bool) -> tuple[int, str | None]:
        """Consume from ``buf[pos:]``; returns the new position and the closing marker once
        found (then the call's ToolCallEnd is the caller's)."""
        while True:
            best, found = -1, None
            for m in self._ends:
                j = buf.find(m, pos)
                if j >= 0 and (found is None or j < best):
                    best, found = j, m
            if found is None:
                end = len(buf)
                if not final:
                    held = holdback(buf[pos:], self._ends)
                    if held and not self._in_string_after(buf[pos:end - held]):
                        end -= held
                self._take(buf[pos:end], out)
                return end, None
            self._take(buf[pos:best], out)
            if self._scanner.in_string and not self._scanner.done:
                # inside a string value: the marker is text; step over its first character
                self._take(buf[best], out)
                pos = best + 1
                continue
            self._close(out)
            return best + len(found), found

    def finish(self, out: list[Event]) -> None:
        self._close(out)

    def _in_string_after(self, text: str) -> bool:
        """Whether ``text`` (not yet taken) would leave the value inside a string; a held
        marker prefix there cannot be a marker, so it need not wait."""
        probe = JsonScanner()
        s = self._scanner
        probe.depth, probe.in_string, probe.escape = s.depth, s.in_string, s.escape
        probe.started, probe.done = s.started, s.done
        probe.feed(text)
        return probe.in_string and not probe.done

    def _take(self, text: str, out: list[Event]) -> None:
        if not text:
            return
        if not self._started:
            text = text.lstrip(_WS)
            if not text:
                return
            self._started = True
        if self._scanner.done:
            self._trailing.append(text)
            return
        k = self._scanner.feed(text)
        head, tail = (text, "") if k < 0 else (text[:k], text[k:])
        out.append(ToolCallArgs(self.index, head))
        self.emitted = True
        if tail:
            self._trailing.append(tail)

    def _close(self, out: list[Event]) -> None:
        rest = "".join(self._trailing)
        self._trailing = []
        if rest.strip(_WS):
            out.append(ToolCallArgs(self.index, rest))
            self.emitted = True


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
                return len(text)
            if rest.startswith(FENCE):
                rest = rest[len(FENCE):]
                self._fenced = False
                self._tail = rest
                rest = rest.lstrip(_WS)
        if rest:
            self._tail = ""
            self._state = _PASS
            text_event(rest, out)
        return len(text)
