"""Pythonic tool calls: ``[get_weather(city="Oslo", days=3), get_time()]`` (Llama 3.2, Llama 4),
optionally wrapped in ``<|python_start|>`` ... ``<|python_end|>``.

A call list may open anywhere in the reply: at its start, inside the wrapper, or after leading
text (``Let me check. [get_weather(city="Oslo")]``), and one reply may hold several lists. A
``[`` starts a candidate only when an identifier and ``(`` follow it; anything else (a markdown
link, ``[1, 2, 3]``) is text at once. A candidate is held until its ``]`` and becomes calls only
when it is a Python list of calls (each call's text parses as Python, separated by ``,``);
otherwise it is released as text, exactly as written, and no call is emitted: an unrecoverable
block never turns into a call the model did not write. After leading text a list must also
pass for what models write: keyword arguments only, and names among the request's tools when it
declared them, so that prose such as ``[Oslo (city)](https://...)`` is not a call.

Keyword values are Python literals, converted to JSON with :func:`ast.literal_eval` one value at
a time (never ``eval``). A value that is not a literal is kept as its raw text in place, and a
call with positional arguments becomes its raw argument text: both go to the invalid-call policy
through the repair stage. A list cut off by the end of the reply is kept as (truncated) calls
when it opened the reply or the wrapper, the model's evident intent, and as text after prose.

Calls are emitted when their list closes: a Python value cannot be converted to JSON before it
is complete, and a list cannot be told from prose before its ``]``. The special tokens
``<|python_start|>`` and ``<|python_end|>`` never reach the content.
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from typing import Any

from ..events import Event, Text, ToolCallArgs, ToolCallEnd, ToolCallStart
from ._declaration import ToolFormat
from ._stream import WS_LIMIT, Markers, StreamParser, emit_plain, literal_eval_quiet, skip_ws

PYTHON_START = "<|python_start|>"
PYTHON_END = "<|python_end|>"
LIST_OPEN = "["
LIST_CLOSE = "]"
CALL_SEPARATOR = ","

_IDENT = r"[A-Za-z_][\w.]*"
_FIRST_CALL = re.compile(r"\s*\[\s*(" + _IDENT + r")\s*\(")
_NEXT_CALL = re.compile(r"\s*(" + _IDENT + r")\s*\(")
_IDENT_RE = re.compile(_IDENT)
_KWARG = re.compile(r"\s*([A-Za-z_]\w*)\s*=(?!=)(.*)", re.S)
_CODE = re.compile(r"[\"'()\[\]{},]")
_RUN = {'"': re.compile(r'[^"\\]+'), "'": re.compile(r"[^'\\]+")}
#: how much undecided text may be held while deciding whether a ``[`` opens a call list
_MAX_HEADER = 256

# states
_TEXT, _HEADER, _ARGS, _AFTER_CALL, _NEXT = range(5)


def _viable_header(s: str, first: bool) -> bool:
    """Could ``s`` still grow into a call header (``[name(`` / ``name(``)?"""
    s = s.lstrip()
    if first:
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


def is_call_syntax(args: str) -> bool:
    """Whether ``f(<args>)`` is Python: the test that tells a call from prose in brackets.
    Parsed once per call, when its ``)`` arrives, so the cost is linear in the call."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse("f(" + args + "\n)", mode="eval")
    except Exception:  # SyntaxError, ValueError (NUL), RecursionError, MemoryError
        return False
    return True


def kwargs_to_json(raw: str, pieces: list[str], truncated: bool) -> str | None:
    """The call's arguments (``raw``, cut at its top-level commas into ``pieces``) as JSON
    text; None when they are not all keywords (the caller keeps the raw text).

    When ``truncated`` the last piece is incomplete: it is kept raw and the object left open,
    for the repair stage to close.
    """
    items: list[str] = []
    last = len(pieces) - 1
    for k, piece in enumerate(pieces):
        if not piece.strip():
            if k == last:  # a trailing comma, or nothing at all
                continue
            return None
        m = _KWARG.match(piece)
        if m is None:
            return None
        key, value = m.group(1), m.group(2)
        if truncated and k == last:
            items.append(f"{json.dumps(key)}: {value.lstrip()}")
            return "{" + ", ".join(items)
        converted = literal_to_json(value)
        items.append(f"{json.dumps(key)}: {converted if converted is not None else value.strip()}")
    return "{" + ", ".join(items) + ("" if truncated else "}")


class PythonicParser(StreamParser):
    """Python lists of calls with keyword arguments, wherever they open in the reply."""

    name = "pythonic"

    _IN_TEXT = Markers(LIST_OPEN, PYTHON_START, PYTHON_END)

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._wrapped = False  # the candidate list follows <|python_start|>
        self._prose = False  # text other than whitespace has been emitted
        self._strong = False  # the current list opened the reply or the wrapper
        self._block: list[str] = []  # the current list's raw text, should it be prose
        #: its complete calls: name, arguments, whether they were all keywords
        self._done: list[tuple[str, str, bool]] = []
        self._name = ""
        self._raw: list[str] = []  # the current call's argument text
        self._rawlen = 0
        self._cuts: list[int] = []  # offsets of its top-level commas
        self._depth = 0
        self._quote = ""  # the open string's quote character, "" outside strings
        self._triple = False

    # -- states --

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        if st == _TEXT:
            k = len(out)
            pos, tok = self._plain(data, pos, final, out)
            if not self._prose:
                self._prose = any(type(e) is Text and e.text.strip(" \t\r\n") for e in out[k:])
            if tok is None:
                return pos, True
            if tok == PYTHON_START:
                self._wrapped = True
                self._state = _HEADER
                return pos, False
            if tok == LIST_OPEN:
                self._state = _HEADER
                return pos - 1, False  # the header is matched from its "["
            return pos, False  # a stray <|python_end|>: a special token, dropped
        if st == _HEADER:
            return self._header(data, pos, final, out)
        if st == _ARGS:
            return self._scan_args(data, pos, final, out)
        n = len(data)
        if st == _NEXT:
            m = _NEXT_CALL.match(data, pos)
            if m is not None and m.end() - pos <= _MAX_HEADER:
                self._block.append(data[pos:m.end()])
                self._open_call(m.group(1))
                return m.end(), False
            j = skip_ws(data, pos)
            if j < n and data[j] == LIST_CLOSE and j - pos < _MAX_HEADER:  # "[f(), ]"
                self._block.append(data[pos:j + 1])
                self._list_closed(out)
                return j + 1, False
            if not final and n - pos < _MAX_HEADER and _viable_header(data[pos:], False):
                return pos, True
            return self._not_a_list(pos, final, out)
        # _AFTER_CALL: after ")", a "," or the closing "]"
        j = skip_ws(data, pos)
        if j - pos >= WS_LIMIT:  # decided by the run's length alone, so split-invariant
            return self._not_a_list(pos, final, out)
        if j >= n and not final:
            return pos, True
        if j < n and data[j] == CALL_SEPARATOR:
            self._block.append(data[pos:j + 1])
            self._state = _NEXT
            return j + 1, False
        if j < n and data[j] == LIST_CLOSE:
            self._block.append(data[pos:j + 1])
            self._list_closed(out)
            return j + 1, False
        return self._not_a_list(pos, final, out)

    def _header(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        n = len(data)
        m = _FIRST_CALL.match(data, pos)
        if m is not None and m.end() - pos <= _MAX_HEADER:
            self._strong = self._wrapped or not self._prose
            self._wrapped = False
            self._block = [data[pos:m.end()]]
            self._done = []
            self._open_call(m.group(1))
            return m.end(), False
        if not final and n - pos < _MAX_HEADER and _viable_header(data[pos:], True):
            return pos, True
        self._state = _TEXT
        if self._wrapped:  # the wrapper held no list: its token is dropped, the rest is text
            self._wrapped = False
            return pos, False
        emit_plain(out, LIST_OPEN, False)
        self._prose = True
        return pos + 1, False

    # -- the list --

    def _open_call(self, name: str) -> None:
        self._name = name
        self._raw = []
        self._rawlen = 0
        self._cuts = []
        self._depth = 0
        self._quote = ""
        self._triple = False
        self._state = _ARGS

    def _call_args(self, truncated: bool) -> tuple[str, bool]:
        """The current call's arguments as JSON text (or raw, for the repair stage) and
        whether they were keywords only."""
        text = "".join(self._raw)
        self._raw = []
        if not self._cuts and not text.strip():
            return ("" if truncated else "{}"), True
        pieces, prev = [], 0
        for cut in self._cuts:
            pieces.append(text[prev:cut])
            prev = cut + 1
        pieces.append(text[prev:])
        args = kwargs_to_json(text, pieces, truncated)
        return (text.strip(), False) if args is None else (args, True)

    def _list_closed(self, out: list[Event]) -> None:
        """``]``: the list is complete; its calls go out unless it reads as prose."""
        declared = {n for n in self.tool_names if n}
        if not self._strong and not all(
                keywords and (not declared or name in declared)
                for name, _, keywords in self._done):
            self._release_block(out)  # after prose, "[Oslo (city)](...)" is not a call
        else:
            self._emit_calls(out)
        self._state = _TEXT

    def _emit_calls(self, out: list[Event], truncated: tuple[str, str] | None = None) -> None:
        for name, args, _ in self._done:
            index = self.next_index()
            out.append(ToolCallStart(index, name))
            if args:
                out.append(ToolCallArgs(index, args))
            out.append(ToolCallEnd(index))
        if truncated is not None:
            index = self.next_index()
            out.append(ToolCallStart(index, truncated[0]))
            if truncated[1]:
                out.append(ToolCallArgs(index, truncated[1]))
            out.append(ToolCallEnd(index, truncated=True))
        self._done = []
        self._block = []

    def _release_block(self, out: list[Event]) -> None:
        """Not a call list after all: its text, exactly as written, is content."""
        emit_plain(out, "".join(self._block), False)
        self._prose = True
        self._done = []
        self._block = []
        self._raw = []

    def _not_a_list(self, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        """What follows a call cannot continue the list: it was prose, released as text.
        Only the reply's end is different (``final``: what is left is whitespace or a partial
        call header): a list that opened the reply or the wrapper keeps its complete calls,
        the model's output having been cut off; the rest goes on as text."""
        if final and self._strong:
            self._emit_calls(out)
        else:
            self._release_block(out)
        self._state = _TEXT
        return pos, False

    def _keep(self, data: str, a: int, b: int) -> None:
        if b > a:
            piece = data[a:b]
            self._raw.append(piece)
            self._block.append(piece)
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
            elif c == ")":  # the call is complete
                self._keep(data, pos, i)
                self._block.append(c)
                text = "".join(self._raw)
                if not is_call_syntax(text):
                    self._release_block(out)
                    self._state = _TEXT
                    return i + 1, False
                self._done.append((self._name, *self._call_args(truncated=False)))
                self._state = _AFTER_CALL
                return i + 1, False
            else:  # a stray "]" or "}" where ")" belongs: not Python, so not a call list
                self._keep(data, pos, i)
                self._release_block(out)
                self._state = _TEXT
                return i, False
        self._keep(data, pos, i)
        return i, True

    def _close(self, out: list[Event]) -> None:
        st = self._state
        if st == _ARGS:  # cut off inside a call
            if self._strong:
                self._emit_calls(out, (self._name, self._call_args(truncated=True)[0]))
            else:
                self._release_block(out)
        elif st in (_AFTER_CALL, _NEXT):
            if self._strong:
                self._emit_calls(out)
            else:
                self._release_block(out)
        self._state = _TEXT


FORMAT = ToolFormat(
    name="pythonic",
    parser=PythonicParser,
    models=(r"llama-?4", r"llama-?3\.2-?(1|3)b"),
    rank=50,  # before Llama 3 JSON
    examples=("meta-llama/Llama-4-Scout-17B-16E-Instruct", "meta-llama/Llama-3.2-3B-Instruct"),
    markers=(PYTHON_START,),
    calls_in_reasoning=False,
    triggers=(b"<", b"["),
    vllm_parser="pythonic",
    vllm_aliases=("llama4_pythonic",),
    sample="[write(items=$VALUE)]",
)
