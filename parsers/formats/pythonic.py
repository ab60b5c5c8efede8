"""Pythonic tool calls: ``[get_weather(city="Oslo", days=3), get_time()]`` (Llama 3.2, Llama 4),
optionally wrapped in ``<|python_start|>`` ... ``<|python_end|>``.

Only a reply that starts (after whitespace and the optional wrapper) with ``[``, an identifier
and ``(`` is a call list; anything else is prose and passes through. Keyword values are Python
literals, converted to JSON with :func:`ast.literal_eval` one value at a time (never ``eval``).
A value that is not a literal is kept as its raw text in place, and a call with positional
arguments becomes its raw argument text, for the repair stage.

The arguments of one call are emitted when its ``)`` arrives (the name as soon as its ``(``
does): a Python value cannot be converted to JSON before it is complete.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..events import Event, ToolCallArgs, ToolCallEnd, ToolCallStart
from ._stream import WS_LIMIT, Markers, StreamParser, emit_plain, literal_eval_quiet, skip_ws

PYTHON_START = "<|python_start|>"
PYTHON_END = "<|python_end|>"
LIST_OPEN = "["
LIST_CLOSE = "]"
CALL_SEPARATOR = ","

_IDENT = r"[A-Za-z_][\w.]*"
_FIRST_CALL = re.compile(r"\s*(?:" + re.escape(PYTHON_START) + r")?\s*\[\s*(" + _IDENT + r")\s*\(")
_NEXT_CALL = re.compile(r"\s*(" + _IDENT + r")\s*\(")
_IDENT_RE = re.compile(_IDENT)
_KWARG = re.compile(r"\s*([A-Za-z_]\w*)\s*=(?!=)(.*)", re.S)
_CODE = re.compile(r"[\"'()\[\]{},]")
_RUN = {'"': re.compile(r'[^"\\]+'), "'": re.compile(r"[^'\\]+")}
#: how much undecided text may be held while deciding whether the reply is a call list
_MAX_HEADER = 256

# states
_START, _TEXT, _ARGS, _AFTER_CALL, _NEXT, _LIST_END = range(6)


def _viable_header(s: str, first: bool) -> bool:
    """Could ``s`` still grow into a call header (``[name(`` / ``name(``)?"""
    s = s.lstrip()
    if first:
        if s.startswith(PYTHON_START):
            s = s[len(PYTHON_START):].lstrip()
        elif PYTHON_START.startswith(s):
            return True
        if not s:
            return True
        if s[0] != LIST_OPEN:
            return False
        s = s[1:].lstrip()
    if not s:
        return True
    m = _IDENT_RE.match(s)
    if m is None:
        return False
    rest = s[m.end():].lstrip()
    return not rest or rest[0] == "("


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, frozenset)):
        return list(o)
    raise TypeError(type(o).__name__)


def literal_to_json(text: str) -> str | None:
    """A Python literal as JSON text, or None when it is not a plain literal."""
    try:
        value = literal_eval_quiet(text.strip())
        return json.dumps(value, ensure_ascii=False, allow_nan=False, default=_json_default)
    except Exception:  # SyntaxError, ValueError, RecursionError, TypeError, MemoryError...
        return None


def kwargs_to_json(raw: str, pieces: list[str], truncated: bool) -> str:
    """The call's arguments (``raw``, cut at its top-level commas into ``pieces``) as JSON
    text; the raw text when they are not all keywords.

    When ``truncated`` the last piece is incomplete: it is kept raw and the object left open,
    for the repair stage to close.
    """
    items: list[str] = []
    last = len(pieces) - 1
    for k, piece in enumerate(pieces):
        if not piece.strip():
            if k == last:  # a trailing comma, or nothing at all
                continue
            return raw.strip()
        m = _KWARG.match(piece)
        if m is None:
            return raw.strip()
        key, value = m.group(1), m.group(2)
        if truncated and k == last:
            items.append(f"{json.dumps(key)}: {value.lstrip()}")
            return "{" + ", ".join(items)
        converted = literal_to_json(value)
        items.append(f"{json.dumps(key)}: {converted if converted is not None else value.strip()}")
    return "{" + ", ".join(items) + ("" if truncated else "}")


class PythonicParser(StreamParser):
    """A Python list of calls with keyword arguments."""

    name = "pythonic"

    _END = Markers(PYTHON_END)

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._state = _START
        self._index = -1
        self._raw: list[str] = []  # the current call's argument text
        self._rawlen = 0
        self._cuts: list[int] = []  # offsets of its top-level commas
        self._depth = 0
        self._quote = ""  # the open string's quote character, "" outside strings
        self._triple = False

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        n = len(data)
        if st == _TEXT:
            emit_plain(out, data[pos:], False)
            return n, True
        if st == _START or st == _NEXT:
            m = (_FIRST_CALL if st == _START else _NEXT_CALL).match(data, pos)
            if m is not None and m.end() - pos <= _MAX_HEADER:  # the same bound as holding
                self._open_call(m.group(1), out)
                return m.end(), False
            if st == _NEXT:
                j = skip_ws(data, pos)
                if j < n and data[j] == LIST_CLOSE:  # a trailing comma: "[f(), ]"
                    self._state = _LIST_END
                    return j + 1, False
            if not final and n - pos < _MAX_HEADER \
                    and _viable_header(data[pos:], st == _START):
                return pos, True
            self._state = _TEXT
            return pos, False
        if st == _ARGS:
            return self._scan_args(data, pos, final, out)
        # _AFTER_CALL, _LIST_END: after ")" or "]"
        j = skip_ws(data, pos)
        if j - pos >= WS_LIMIT:
            self._state = _TEXT
            return pos, False
        if j >= n:
            if final:
                self._state = _TEXT
            return pos, True
        if st == _AFTER_CALL:
            c = data[j]
            if c == CALL_SEPARATOR:
                self._state = _NEXT
                return j + 1, False
            if c == LIST_CLOSE:
                self._state = _LIST_END
                return j + 1, False
            self._state = _TEXT
            return pos, False
        hit = self._END.at(data, j, final)
        if hit is True:
            return pos, True
        self._state = _TEXT
        return (j + len(PYTHON_END) if hit else pos), False

    def _open_call(self, name: str, out: list[Event]) -> None:
        self._index = self.next_index()
        out.append(ToolCallStart(self._index, name))
        self._raw = []
        self._rawlen = 0
        self._cuts = []
        self._depth = 0
        self._quote = ""
        self._triple = False
        self._state = _ARGS

    def _end_call(self, out: list[Event], truncated: bool) -> None:
        text = "".join(self._raw)
        if not self._cuts and not text.strip():
            args = "" if truncated else "{}"
        else:
            pieces, prev = [], 0
            for cut in self._cuts:
                pieces.append(text[prev:cut])
                prev = cut + 1
            pieces.append(text[prev:])
            args = kwargs_to_json(text, pieces, truncated)
        if args:
            out.append(ToolCallArgs(self._index, args))
        out.append(ToolCallEnd(self._index, truncated))
        self._raw = []

    def _keep(self, data: str, a: int, b: int) -> None:
        if b > a:
            self._raw.append(data[a:b])
            self._rawlen += b - a

    def _scan_args(self, data: str, pos: int, final: bool,
                   out: list[Event]) -> tuple[int, bool]:
        n = len(data)
        i = pos
        while i < n:
            q = self._quote
            if q:
                m = _RUN[q].match(data, i)
                if m is not None:
                    i = m.end()
                    continue
                if data[i] == "\\":
                    if i + 1 >= n and not final:
                        break  # the escaped character decides nothing, but keep pairs whole
                    i += 2
                    continue
                if not self._triple:
                    self._quote = ""
                    i += 1
                elif data.startswith(q * 3, i):
                    self._quote = ""
                    i += 3
                elif not final and n - i < 3 and (q * 3).startswith(data[i:]):
                    break
                else:
                    i += 1
                continue
            m = _CODE.search(data, i)
            if m is None:
                i = n
                break
            i = m.start()
            c = data[i]
            if c in "\"'":
                if not final and n - i < 3 and (c * 3).startswith(data[i:]):
                    break  # one or two quotes: an empty string or a triple quote's start
                self._triple = data.startswith(c * 3, i)
                self._quote = c
                i += 3 if self._triple else 1
            elif c in "([{":
                self._depth += 1
                i += 1
            elif c == ",":
                if self._depth == 0:
                    self._cuts.append(self._rawlen + (i - pos))
                i += 1
            elif self._depth > 0:
                self._depth -= 1
                i += 1
            else:  # ")" closes the call; a stray "]" or "}" ends it too (not consumed)
                self._keep(data, pos, i)
                self._end_call(out, truncated=False)
                self._state = _AFTER_CALL
                return (i + 1 if c == ")" else i), False
        self._keep(data, pos, i)
        return i, True

    def _close(self, out: list[Event]) -> None:
        if self._state == _ARGS:
            self._end_call(out, truncated=True)
            self._state = _TEXT
