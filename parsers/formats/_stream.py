"""Shared machinery of the marker parsers: the feed loop, marker scanning with hold-back, and
an incremental reader for JSON tool calls.

Not a format itself (hence the underscore). Every format in this package that carries calls as
JSON (Hermes, Llama 3, Mistral, DeepSeek) reads them with :class:`CallReader`, so they share one
answer to the hard questions: where a call ends when a marker-like string sits inside a JSON
string, what a malformed call becomes, and how to do it in one pass over each character.

The loop (:class:`StreamParser`) keeps only an unconsumed tail between feeds: at most a marker
length in text states (the hold-back), so ``buffer + new text`` costs O(new text) per feed.
"""

from __future__ import annotations

import json
import re
from abc import abstractmethod
from typing import Any

from ..events import Event, Reasoning, Text, ToolCallArgs, ToolCallEnd, ToolCallStart
from .base import MarkerParser, holdback

_WS = re.compile(r"[ \t\r\n]*")
_WS_CHARS = " \t\r\n"
#: whitespace held while deciding what follows a call; longer runs are released as text
WS_LIMIT = 256


def skip_ws(data: str, pos: int) -> int:
    """Index of the first non-whitespace character at or after ``pos``."""
    return _WS.match(data, pos).end()  # type: ignore[union-attr]


class Markers:
    """A fixed set of markers: one alternation regex to find the earliest, plus hold-back."""

    __slots__ = ("firsts", "longest", "markers", "regex")

    def __init__(self, *markers: str) -> None:
        self.markers = markers
        # longest first so that, at one position, the longer of two markers sharing a prefix wins
        ordered = sorted(markers, key=len, reverse=True)
        self.regex = re.compile("|".join(re.escape(m) for m in ordered))
        self.longest = max(len(m) for m in markers)
        self.firsts = frozenset(m[0] for m in markers)

    def scan(self, data: str, pos: int, final: bool) -> tuple[int, re.Match[str] | None]:
        """Find the next marker at or after ``pos``.

        Returns ``(end, match)``: ``data[pos:end]`` is plain text that can be released now. With
        no match, ``data[end:]`` is the suffix that could still become a marker (empty when
        ``final``). The search covers only ``data[pos:]``, which the caller keeps to the new
        text plus a held tail.
        """
        m = self.regex.search(data, pos)
        if m is not None:
            return m.start(), m
        n = len(data)
        if final or pos >= n:
            return n, None
        tail = data[max(pos, n - self.longest + 1):]
        return n - holdback(tail, self.markers), None

    def at(self, data: str, i: int, final: bool) -> str | bool | None:
        """What starts at ``data[i]``: the marker (str), ``True`` when the rest of ``data`` is a
        proper prefix of a marker and more text may complete it, or ``None``."""
        for m in self.markers:
            if data.startswith(m, i):
                return m
        if not final:
            rest = len(data) - i
            for m in self.markers:
                if len(m) > rest and m.startswith(data[i:]):
                    return True
        return None


def emit_plain(out: list[Event], text: str, reasoning: bool) -> None:
    if text:
        out.append(Reasoning(text) if reasoning else Text(text))


class StreamParser(MarkerParser):
    """The feed/finish loop shared by the formats: a state machine over ``buffer + text``.

    Subclasses implement :meth:`_step`, one state's handler: it consumes from ``pos``, appends
    events, and returns ``(new_pos, need_more)``. ``need_more`` stops the loop; whatever lies
    after ``new_pos`` is kept for the next feed (a partial marker, never more). With ``final``
    set a handler must consume everything it can; :meth:`_close` then ends what is still open.
    """

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._buf = ""
        self._finished = False
        self._state = 0

    def feed(self, text: str) -> list[Event]:
        if self._finished or not text:
            return []
        return self._run(text, final=False)

    def finish(self) -> list[Event]:
        if self._finished:
            return []
        out = self._run("", final=True)
        self._close(out)
        self._buf = ""
        self._finished = True
        return out

    def _run(self, text: str, final: bool) -> list[Event]:
        data = self._buf + text if self._buf else text
        out: list[Event] = []
        pos = 0
        last = (-1, -1)
        while True:
            pos, more = self._step(data, pos, final, out)
            if more:
                break
            # A handler that neither consumed nor changed state would spin; treat it as
            # waiting for more text (defensive: every handler is meant to make progress).
            here = (pos, self._state)
            if here == last:
                break
            last = here
        self._buf = data[pos:]
        return out

    @abstractmethod
    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        """Handle the current state (see the class docstring)."""

    @abstractmethod
    def _close(self, out: list[Event]) -> None:
        """End of stream: close an open call with ``truncated=True``, flush held text."""


class Collector:
    """Collects text up to a marker (a function name, a parameter value) in O(new text).

    The collected pieces are kept in a list and joined once, so a long value fed one character
    at a time stays linear.
    """

    __slots__ = ("markers", "parts")

    def __init__(self, markers: Markers) -> None:
        self.markers = markers
        self.parts: list[str] = []

    def feed(self, data: str, pos: int, final: bool) -> tuple[int, re.Match[str] | None]:
        end, m = self.markers.scan(data, pos, final)
        if end > pos:
            self.parts.append(data[pos:end])
        return end, m

    def text(self) -> str:
        return "".join(self.parts)


# --- CallReader -------------------------------------------------------------------------------

# reader status
MORE = 0  # needs more text
DONE = 1  # the call's JSON is complete; position is just after it
STOP = 2  # a stop marker begins at the position (not consumed): the call ends there

# phases
_OBJ_WAIT, _KEY_WAIT, _COLON, _VAL_WAIT, _VALUE, _AFTER_VAL, _FLAT_RAW, _DONE = range(8)
# value roles
_R_KEY, _R_NAME, _R_ARGS, _R_OTHER, _R_RAW, _R_JUNK = range(6)
# value kinds
_K_STRING, _K_CONTAINER, _K_ATOM = range(3)

ARG_KEYS = ("arguments", "parameters")
_STR_RUN = re.compile(r'[^"\\]+')
_NAME_IN_RAW = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _decode_string(token: str) -> str:
    """A JSON string token to its value; the raw text between the quotes when it is broken."""
    try:
        value = json.loads(token)
    except ValueError:
        return token.strip('"')
    return value if isinstance(value, str) else token


class CallReader:
    """Reads one tool call written as JSON, incrementally, in one pass per character.

    Two shapes:

    * envelope (``name=None``): ``{"name": "f", "arguments"|"parameters": {...}}``, keys in any
      order, other keys ignored. ToolCallStart is emitted as soon as the name is complete; the
      arguments value is passed through as ToolCallArgs fragments exactly as written (held until
      the name is known when they come first).
    * bare (``name`` given): the arguments value alone (Mistral v11 ``[ARGS]``, DeepSeek).

    Only string state and bracket depth are tracked (like :class:`~.base.JsonScanner`), so a
    marker inside a JSON string never ends the call, while a stop marker outside any string does
    (a call whose JSON is unbalanced still ends at its closing marker). When the envelope is not
    the expected shape, the call's arguments become its raw text, stripped, for the repair
    stage. ``text_if_unnamed``: an object with no ``"name"`` is not a call but content (Llama 3
    replies that merely start with ``{``).
    """

    __slots__ = (
        "_args_seen", "_atom_re", "_bare", "_body", "_cont_re", "_depth", "_esc", "_instr",
        "_keep_body", "_key", "_kind", "_parser", "_pending", "_phase", "_role", "_stops",
        "_text_if_unnamed",
        "_val", "call_id", "index", "name", "started",
    )

    def __init__(self, parser: MarkerParser, stops: Markers | None = None, *,
                 name: str | None = None, call_id: str | None = None,
                 text_if_unnamed: bool = False) -> None:
        self._parser = parser
        self._stops = stops
        firsts = "".join(sorted(stops.firsts)) if stops else ""
        self._cont_re = re.compile("[" + re.escape('"{}[]' + firsts) + "]")
        self._atom_re = re.compile("[^" + re.escape(_WS_CHARS + ',}]"{[' + firsts) + "]+")
        self._text_if_unnamed = text_if_unnamed
        self.name = name
        self.call_id = call_id
        self.index = -1
        self.started = False
        self._pending: list[str] = []  # argument text seen before the name
        self._body: list[str] = []  # raw text of the call, while a raw fallback may need it
        self._keep_body = name is None
        self._args_seen = False
        self._key = ""
        self._val: list[str] = []
        self._role = _R_OTHER
        self._kind = _K_CONTAINER
        self._depth = 0
        self._instr = False
        self._esc = False
        self._bare = name is not None
        self._phase = _VAL_WAIT if self._bare else _OBJ_WAIT

    # -- events --

    def _start(self, name: str, out: list[Event]) -> None:
        self.started = True
        self.index = self._parser.next_index()
        out.append(ToolCallStart(self.index, name, self.call_id))
        for frag in self._pending:
            out.append(ToolCallArgs(self.index, frag))
        self._pending = []
        self._drop_body()

    def _drop_body(self) -> None:
        # once the name is out and the arguments are streaming, no raw fallback can need the
        # text seen so far: stop keeping it
        if self.started and self._args_seen and not self.is_raw:
            self._keep_body = False
            self._body = []

    def _args(self, frag: str, out: list[Event]) -> None:
        if not frag:
            return
        if self.started:
            out.append(ToolCallArgs(self.index, frag))
        else:
            self._pending.append(frag)

    @property
    def is_raw(self) -> bool:
        return self._phase == _FLAT_RAW or self._role == _R_RAW

    def close(self, out: list[Event], truncated: bool) -> str | None:
        """End the call: emit what is still held, then ToolCallEnd. Returns text to emit as
        content instead when the object turned out not to be a call (``text_if_unnamed``)."""
        raw = self.is_raw or (self._phase == _DONE and self.name is None)
        body = "".join(self._body)
        if not self.started:
            name = self.name
            if name is None:
                m = _NAME_IN_RAW.search(body)
                if m is None and self._text_if_unnamed:
                    return body
                name = _decode_string(f'"{m.group(1)}"') if m else ""
            self._start(name, out)
        if raw:
            self._args(body.strip(), out)
        elif not self._args_seen and not truncated:
            self._args("{}", out)
        out.append(ToolCallEnd(self.index, truncated))
        return None

    # -- scanning --

    def feed(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, int]:
        """Consume from ``data[pos:]``; returns ``(position, MORE | DONE | STOP)``."""
        i, status = self._feed(data, pos, final, out)
        if self._keep_body and i > pos:
            self._body.append(data[pos:i])
        return i, status

    def _stop_at(self, data: str, i: int, final: bool) -> str | bool | None:
        return self._stops.at(data, i, final) if self._stops else None

    def _to_raw(self) -> None:
        """The envelope is not the expected shape: the rest of it, up to its closing brace or a
        stop marker, is raw (or junk, once the arguments have already been streamed)."""
        self._role = _R_JUNK if (self.started and self._args_seen) else _R_RAW
        self._kind = _K_CONTAINER
        self._depth = 1
        self._instr = False
        self._esc = False
        self._phase = _VALUE

    def _feed(self, data: str, i: int, final: bool, out: list[Event]) -> tuple[int, int]:
        n = len(data)
        firsts = self._stops.firsts if self._stops else ()
        if self._bare and not self.started:
            self._start(self.name or "", out)
        while True:
            ph = self._phase
            if ph == _DONE:
                return i, DONE
            if ph == _VALUE:
                start = i
                i, st = self._scan_value(data, i, final)
                if i > start:
                    self._take(data[start:i], out)
                if st != DONE:
                    return i, st
                self._end_value(out)
                continue
            if ph == _FLAT_RAW:
                if self._stops is None:
                    return n, MORE
                end, m = self._stops.scan(data, i, final)
                return end, (STOP if m is not None else MORE)
            i = skip_ws(data, i)
            if i >= n:
                return i, MORE
            c = data[i]
            if c in firsts:
                hit = self._stop_at(data, i, final)
                if hit is True:
                    return i, MORE
                if hit:
                    return i, STOP
            if ph == _OBJ_WAIT:
                if c == "{":
                    i += 1
                    self._phase = _KEY_WAIT
                else:
                    self._phase = _FLAT_RAW
                    self._keep_body = True
            elif ph == _KEY_WAIT:
                if c == '"':
                    self._begin(_R_KEY, _K_STRING)
                    self._val = ['"']
                    i += 1
                elif c == ",":
                    i += 1
                elif c == "}":
                    i += 1
                    self._phase = _DONE
                else:
                    self._to_raw()
            elif ph == _COLON:
                if c == ":":
                    i += 1
                    self._phase = _VAL_WAIT
                else:
                    self._to_raw()
            elif ph == _VAL_WAIT:
                i = self._open_value(data, i, c, out)
            else:  # _AFTER_VAL
                if c == ",":
                    i += 1
                    self._phase = _KEY_WAIT
                elif c == "}":
                    i += 1
                    self._phase = _DONE
                else:
                    self._to_raw()

    def _begin(self, role: int, kind: int) -> None:
        self._role = role
        self._kind = kind
        self._depth = 1 if kind == _K_CONTAINER else 0
        self._instr = kind == _K_STRING
        self._esc = False
        self._phase = _VALUE

    def _open_value(self, data: str, i: int, c: str, out: list[Event]) -> int:
        if self._bare:
            self._args_seen = True
            if c not in '{["':
                # bare arguments that are not JSON: raw up to the stop marker
                self._phase = _FLAT_RAW
                self._keep_body = True
                return i
            role = _R_ARGS
        elif c in ",}]:":
            self._to_raw()
            return i
        elif self._key in ARG_KEYS and not self._args_seen:
            role = _R_ARGS
            self._args_seen = True
            self._drop_body()
        elif self._key == "name" and self.name is None and c == '"':
            role = _R_NAME
            self._val = []
        else:
            role = _R_OTHER
        if c == '"':
            self._begin(role, _K_STRING)
        elif c in "{[":
            self._begin(role, _K_CONTAINER)
        else:
            self._begin(role, _K_ATOM)
            return i
        if role == _R_ARGS:
            self._args(c, out)
        elif role == _R_NAME:
            self._val.append(c)
        return i + 1

    def _take(self, piece: str, out: list[Event]) -> None:
        role = self._role
        if role == _R_ARGS:
            self._args(piece, out)
        elif role in (_R_KEY, _R_NAME):
            self._val.append(piece)

    def _end_value(self, out: list[Event]) -> None:
        role = self._role
        self._phase = _AFTER_VAL
        if role == _R_KEY:
            self._key = _decode_string("".join(self._val))
            self._val = []
            self._phase = _COLON
        elif role == _R_NAME:
            self.name = _decode_string("".join(self._val))
            self._val = []
            if not self.started:
                self._start(self.name, out)
        elif role in (_R_RAW, _R_JUNK):
            self._phase = _DONE
        elif role == _R_ARGS and self._bare:
            # a bare reader has no envelope: the arguments value is the whole call
            self._phase = _DONE

    def _scan_value(self, data: str, i: int, final: bool) -> tuple[int, int]:
        """Advance through the current value; DONE just after its last character."""
        n = len(data)
        firsts = self._stops.firsts if self._stops else ()
        while i < n:
            if self._esc:
                self._esc = False
                i += 1
                continue
            if self._instr:
                m = _STR_RUN.match(data, i)
                if m is not None:
                    i = m.end()
                    continue
                if data[i] == "\\":
                    self._esc = True
                    i += 1
                    continue
                i += 1  # closing quote
                self._instr = False
                if self._depth == 0:
                    return i, DONE
                continue
            if self._kind == _K_ATOM:
                m = self._atom_re.match(data, i)
                if m is not None:
                    i = m.end()
                    continue
                c = data[i]
                if c in firsts:
                    hit = self._stop_at(data, i, final)
                    if hit is True:
                        return i, MORE
                    if hit:
                        return i, STOP
                    if c not in _WS_CHARS and c not in ',}]"{[':
                        i += 1
                        continue
                return i, DONE  # the terminator is not part of the value
            m = self._cont_re.search(data, i)
            if m is None:
                return n, MORE
            i = m.start()
            c = data[i]
            if c in firsts:
                hit = self._stop_at(data, i, final)
                if hit is True:
                    return i, MORE
                if hit:
                    return i, STOP
            i += 1
            if c == '"':
                self._instr = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    return i, DONE
        return i, MORE
