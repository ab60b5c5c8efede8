"""The machinery the marker parsers share; each format module keeps only its own markers and
states.

Not a format itself (hence the underscore). In order:

* :class:`Markers` and :class:`StreamParser`: the feed/finish loop over ``held tail + new text``
  that every marker format runs on, with the plain-text and ``<think>`` reasoning handling they
  all need. Between feeds only an unconsumed tail is kept (at most a marker length in text
  states, the hold-back), so each feed costs O(new text).
* :class:`CallReader`: calls written as JSON with a closing marker (Hermes, Llama 3, Mistral,
  DeepSeek, Qwen3-Coder's JSON fallback), so they share one answer to the hard questions: where
  a call ends when a marker-like string sits inside a JSON string, what a malformed call
  becomes, and how to do it in one pass over each character.
* :class:`CallListReader` and :class:`JsonArgs`: whole JSON call objects (Granite, Phi-4-mini,
  the generic fallback) and raw JSON arguments closed by a marker (Kimi K2, gpt-oss).
* :class:`XmlArgs`: the JSON arguments of XML-style calls, one member per value, typed by the
  tool's schema (Qwen3-Coder, GLM, MiniMax-M2).
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from json.decoder import scanstring
from typing import Any, ClassVar

from ..events import Event, Reasoning, Text, ToolCallArgs, ToolCallEnd, ToolCallStart
from .base import JsonScanner, MarkerParser, holdback, text_event

#: the reasoning block most formats use (Mistral spells it ``[THINK]``)
THINK_START = "<think>"
THINK_END = "</think>"

_WS = re.compile(r"[ \t\r\n]*")
_WS_CHARS = " \t\r\n"
#: whitespace held while deciding what follows a call; longer runs are released as text
WS_LIMIT = 256


def literal_eval_quiet(text: str) -> Any:
    """``ast.literal_eval`` without its SyntaxWarning/DeprecationWarning noise: model output
    full of odd escapes (``"\\i"``) is expected input here, not a programming mistake."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.literal_eval(text)


def skip_ws(data: str, pos: int) -> int:
    """Index of the first non-whitespace character at or after ``pos``."""
    return _WS.match(data, pos).end()  # type: ignore[union-attr]


class Markers:
    """A fixed set of markers: one alternation regex to find the earliest, plus hold-back."""

    __slots__ = ("extends", "firsts", "longest", "markers", "regex")

    def __init__(self, *markers: str) -> None:
        # longest first so that, at one position, the longer of two markers sharing a prefix wins
        self.markers = tuple(sorted(markers, key=len, reverse=True))
        self.regex = re.compile("|".join(re.escape(m) for m in self.markers))
        self.longest = max(len(m) for m in markers)
        self.firsts = frozenset(m[0] for m in markers)
        # marker -> the longer markers it is a proper prefix of (``<tool`` of ``<tool_call>``):
        # a match of it at the end of the text is final only once those are ruled out
        self.extends = {m: tuple(o for o in self.markers if len(o) > len(m) and o.startswith(m))
                        for m in self.markers}

    def scan(self, data: str, pos: int, final: bool) -> tuple[int, re.Match[str] | None]:
        """Find the next marker at or after ``pos``.

        Returns ``(end, match)``: ``data[pos:end]`` is plain text that can be released now. With
        no match, ``data[end:]`` is the suffix that could still become a marker (empty when
        ``final``). The search covers only ``data[pos:]``, which the caller keeps to the new
        text plus a held tail.
        """
        m = self.regex.search(data, pos)
        n = len(data)
        if m is not None:
            longer = self.extends[m.group()]
            if longer and not final:
                # what follows the match so far may still grow into the longer marker (at the
                # end of the piece, or some characters of it already here): hold it
                start = m.start()
                rest = n - start
                if rest < self.longest and any(len(o) > rest and o.startswith(data[start:])
                                               for o in longer):
                    return start, None
            return m.start(), m
        if final or pos >= n:
            return n, None
        tail = data[max(pos, n - self.longest + 1):]
        return n - holdback(tail, self.markers), None

    def at(self, data: str, i: int, final: bool) -> str | bool | None:
        """What starts at ``data[i]``: the marker (str), ``True`` when the rest of ``data`` is a
        proper prefix of a marker and more text may complete it, or ``None``."""
        for m in self.markers:  # longest first
            if data.startswith(m, i):
                if not final and any(len(o) > len(data) - i and o.startswith(data[i:])
                                     for o in self.extends[m]):
                    return True  # may still become the longer marker
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


# CallReader.feed status
MORE = 0  # needs more text
DONE = 1  # the call's JSON is complete; position is just after it
STOP = 2  # a stop marker begins at the position (not consumed): the call ends there
#: StreamParser._call_ended only: the object named no tool; its text went out as content
NOT_A_CALL = 3


class _Drafts:
    """Calls the model wrote inside its reasoning, held until the reply shows whether it meant
    them (the README's decision table, "A call counts when the model meant it").

    They count only as the model's final act: nothing but whitespace after them, up to the
    reasoning's end marker (or none) and the end of a reply that was not cut off. Anything
    else the model writes afterwards (more reasoning, an answer, another call after the
    reasoning closed) rejects them, and their text goes to reasoning exactly as written.
    """

    __slots__ = ("after", "closed", "events", "first_index", "in_call", "raw", "space")

    def __init__(self, opener: str, first_index: int) -> None:
        self.first_index = first_index  # the parser's call count when the drafting began
        self.raw = [opener]  # everything since the first drafted call's marker, as written
        self.space: list[str] = []  # reasoning whitespace between and after the calls
        self.events: list[Event] = []  # the drafted calls' events, not yet let out
        self.in_call = True  # a drafted call is being read (its text goes to ``raw``)
        self.closed = False  # the reasoning ended after the calls
        self.after: list[str] = []  # whitespace after the reasoning ended: content

    def calls(self) -> int:
        return sum(1 for ev in self.events if type(ev) is ToolCallStart)

    def complete(self) -> bool:
        """At least one call, and every call ended without being cut off."""
        open_calls: set[int] = set()
        started = False
        for ev in self.events:
            if type(ev) is ToolCallStart:
                open_calls.add(ev.index)
                started = True
            elif type(ev) is ToolCallEnd:
                if ev.truncated:
                    return False
                open_calls.discard(ev.index)
        return started and not open_calls


class StreamParser(MarkerParser):
    """The feed/finish loop shared by the formats: a state machine over ``buffer + text``.

    Subclasses implement :meth:`_step`, one state's handler: it consumes from ``pos``, appends
    events, and returns ``(new_pos, need_more)``. ``need_more`` stops the loop; whatever lies
    after ``new_pos`` is kept for the next feed (a partial marker, never more). With ``final``
    set a handler must consume everything it can; :meth:`_close` then ends what is still open.

    Plain text is read by :meth:`_plain`, which also follows the reasoning block: whether the
    parser is inside it is a flag rather than a state, so a call written inside reasoning
    returns to reasoning without each format having to remember where it came from. Formats
    call :meth:`_plain` from their text state only.

    Reasoning, for every format at once:

    * ``_IN_THINK`` lists the reasoning's end marker and the format's call openers that may
      appear inside reasoning; every marker there but the end marker opens a call. Such a call
      is a *draft* (:class:`_Drafts`): its events and its text are held, never emitted early,
      until the reply shows whether it was the model's final act.
    * A marker in ``_STRAYS`` is a special token out of place: dropped, in text or reasoning,
      and it decides nothing about drafts.
    * A format whose ``_IN_TEXT`` lists its reasoning start marker gets its end marker added
      there too: an end marker in text that is not reasoning is dropped (and counted in
      ``stray_closes``), never shown as content.
    * :meth:`open_reasoning` starts the reply inside reasoning (the chat template opened it);
      :meth:`end_server_reasoning` marks where a server's own reasoning field ended.
    """

    #: markers that end a run of plain text (the format's call openers, ``<think>``, strays)
    _IN_TEXT: ClassVar[Markers]
    #: markers that end a run of reasoning: its end marker, and call openers (drafts)
    _IN_THINK: ClassVar[Markers] = Markers(THINK_END)
    _THINK_START: ClassVar[str] = THINK_START
    _THINK_END: ClassVar[str] = THINK_END
    #: special tokens that mean nothing in text or reasoning: dropped wherever they are met,
    #: never taken for a call opener (a format lists them in ``_IN_TEXT``/``_IN_THINK`` too)
    _STRAYS: ClassVar[frozenset[str]] = frozenset()
    #: whether the format has reasoning markers at all (its ``_IN_TEXT`` lists the start)
    knows_reasoning: ClassVar[bool] = False
    #: whether a call may open the answer without a marker (Llama 3 JSON's ``{``): then
    #: :meth:`_plain` returns the end marker where reasoning ended, so the format can look
    #: at the answer's start
    _ANSWER_STARTS: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        text = cls.__dict__.get("_IN_TEXT")
        if isinstance(text, Markers) and cls._THINK_START in text.markers:
            if cls._THINK_END not in text.markers:
                cls._IN_TEXT = Markers(*text.markers, cls._THINK_END)
        in_text = getattr(cls, "_IN_TEXT", None)
        cls.knows_reasoning = isinstance(in_text, Markers) and \
            cls._THINK_START in in_text.markers

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._buf = ""
        self._finished = False
        self._state = 0
        self._thinking = False
        self._reader: CallReader | None = None  # the JSON call being read, if any
        self._drafts: _Drafts | None = None  # calls drafted inside reasoning, held
        self._lead = False  # opened: a start marker at the very beginning is redundant
        self._boundary = False  # the server's reasoning field ended: decide what follows
        self._out: list[Event] = []  # the events of the current feed (drafts bypass ``out``)
        self._plain_ran = False
        #: drafted calls let out as the model's final act, and kept as reasoning
        self.drafts_fired = 0
        self.drafts_rejected = 0

    # reasoning -------------------------------------------------------------------------------
    def open_reasoning(self, lead: bool = True) -> None:
        super().open_reasoning(lead)
        self._thinking = True
        self._lead = lead

    def end_server_reasoning(self) -> None:
        if self._thinking:
            self._boundary = True

    @property
    def in_reasoning(self) -> bool:
        # an opened reply whose start was never read as text (a format that reads no plain
        # text, or no text at all) never entered its reasoning
        return self._thinking and not self._lead

    def closes_unopened(self, text: str) -> bool:
        if not self.knows_reasoning:
            return False
        i = text.find(self._THINK_END)
        return i >= 0 and text.find(self._THINK_START, 0, i) < 0

    @property
    def at_rest(self) -> bool:
        """Nothing held: every character fed so far has been emitted (the mender's fast path
        may then skip feeding a delta that holds no marker character)."""
        return not self._buf and self._drafts is None and not self._lead and \
            not self._boundary

    # the loop --------------------------------------------------------------------------------
    def feed(self, text: str) -> list[Event]:
        if self._finished or not text:
            return []
        return self._run(text, final=False)

    def finish(self) -> list[Event]:
        if self._finished:
            return []
        out = self._run("", final=True)
        drafts = self._drafts
        self._close(drafts.events if drafts is not None and drafts.in_call else out)
        if drafts is not None and self._drafts is drafts:
            # the reply ended with drafted calls and only whitespace after them: they were the
            # model's final act, unless the reply was cut off or a call was
            if not self.cut_off and drafts.complete():
                self._fire(out)
            else:
                self._reject(out)
        self._buf = ""
        self._finished = True
        return out

    def _run(self, text: str, final: bool) -> list[Event]:
        data = self._buf + text if self._buf else text
        out: list[Event] = []
        self._out = out
        pos = 0
        last = (-1, -1)
        while True:
            drafts = self._drafts
            if drafts is not None and drafts.in_call:
                # inside a drafted call: its events are held, its text kept as written
                start = pos
                self._plain_ran = False
                pos, more = self._step(data, pos, final, drafts.events)
                if not self._plain_ran and pos > start:
                    drafts.raw.append(data[start:pos])
            else:
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

    def _close(self, out: list[Event]) -> None:
        """End of stream: an open JSON call ends with ``truncated=True``. Formats with more
        open state (a name being read, XML arguments) extend this."""
        reader = self._reader
        if reader is not None:
            self._reader = None
            emit_plain(out, reader.close(out, truncated=True) or "", False)

    def _read(self, state: int, markers: Markers) -> None:
        """Go to ``state``, collecting text (a name, key or value) up to one of ``markers``."""
        self._collect = Collector(markers)
        self._state = state

    def _plain(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, str | None]:
        """Text (or reasoning, inside the reasoning block) up to the next marker, emitted as
        soon as it cannot be the start of one.

        Returns the position after the marker and the marker, or ``(end, None)`` when more text
        is needed. The reasoning delimiters are acted on here and never returned (a format's
        text state only ever sees its own markers); the format acts on the others (a stray
        closer it lists is simply dropped). A format whose calls may only open its answer
        (:attr:`_ANSWER_STARTS`) is told where reasoning ended: the end marker is returned
        then (also where a server's reasoning field ended).
        """
        # the feed's own list: when a drafted call has just ended, ``out`` is still its list
        out = self._out
        think_start, think_end = self._THINK_START, self._THINK_END
        while True:
            if self._ANSWER_STARTS and self._thinking:
                pos, tok = self._plain_once(data, pos, final, out)
                if tok is None or not self._thinking:
                    return pos, (think_end if tok is not None else None)
                if tok != think_start and tok != think_end:
                    return pos, tok
                continue
            if self._lead or self._boundary or self._drafts is not None:
                pos, tok = self._plain_reasoning(data, pos, final)
                if tok is None:
                    return pos, None
            else:
                thinking = self._thinking
                end, m = (self._IN_THINK if thinking else self._IN_TEXT).scan(data, pos, final)
                emit_plain(out, data[pos:end], thinking)
                if m is None:
                    return end, None
                tok = m.group()
                self._marker(tok, thinking)
                pos = m.end()
            if tok and tok != think_start and tok != think_end:
                return pos, tok

    def _plain_once(self, data: str, pos: int, final: bool,
                    out: list[Event]) -> tuple[int, str | None]:
        """One step of :meth:`_plain`: up to the next marker (``""``: a decision about the
        reasoning, read on), acted on."""
        if self._lead or self._boundary or self._drafts is not None:
            return self._plain_reasoning(data, pos, final)
        thinking = self._thinking
        end, m = (self._IN_THINK if thinking else self._IN_TEXT).scan(data, pos, final)
        emit_plain(out, data[pos:end], thinking)
        if m is None:
            return end, None
        tok = m.group()
        self._marker(tok, thinking)
        return m.end(), tok

    def _marker(self, tok: str, thinking: bool) -> None:
        """Act on a marker met in text or reasoning (no drafts pending)."""
        if tok == self._THINK_START:
            self._thinking = True
        elif tok == self._THINK_END:
            if thinking:
                self._thinking = False
            else:
                if not self.stray_closes:
                    self.calls_before_stray = self._calls
                self.stray_closes += 1
        elif thinking and tok not in self._STRAYS:
            # a call opener inside reasoning: a draft until the reply shows it was meant
            self._drafts = _Drafts(tok, self._calls)

    def _plain_reasoning(self, data: str, pos: int, final: bool) -> tuple[int, str | None]:
        """:meth:`_plain` while something about reasoning is undecided: the start of a reply
        opened inside reasoning, the end of a server's reasoning field, or drafted calls.

        Emits to the feed's own list (a drafted call's ``out`` holds only its events). Returns
        like :meth:`_plain`, or ``""`` for the marker when it consumed up to ``pos`` and
        :meth:`_plain` should read on."""
        out = self._out
        self._plain_ran = True
        n = len(data)
        if self._lead or self._boundary:
            j = skip_ws(data, pos)
            if j >= n and not final and j - pos < WS_LIMIT:
                return pos, None  # only whitespace so far: wait for what follows it
            if self._lead:
                if data.startswith(self._THINK_START, j):
                    self._lead = False
                    emit_plain(out, data[pos:j], True)
                    return j + len(self._THINK_START), self._THINK_START
                if not final and j < n and n - j < len(self._THINK_START) and \
                        self._THINK_START.startswith(data[j:]):
                    return pos, None
                self._lead = False
            if self._boundary:
                # checked where the content starts, not after its whitespace: vLLM's qwen3
                # parser starts it exactly at the call opener it ended the reasoning at (the
                # space before the opener stays reasoning), while after a dropped end marker
                # the content is what the model wrote next (Qwen3 writes "</think>\n\n")
                hit = self._IN_THINK.at(data, pos, final) if pos < n else None
                if hit is True:
                    return pos, None
                self._boundary = False
                if hit is None:
                    # the server ended its reasoning field where the model wrote the end
                    # marker (which it dropped): the text after it is content
                    self._thinking = False
                    if self._drafts is not None:
                        self._drafts.closed = True
                # at a call opener, the server ended its reasoning at a call the model wrote
                # inside it (vLLM's qwen3 reasoning parser does): still reasoning
        drafts = self._drafts
        if drafts is None:
            return pos, ""  # decided: read on as usual
        drafts.in_call = False  # back in text or reasoning: the drafted call has ended
        thinking = self._thinking
        end, m = (self._IN_THINK if thinking else self._IN_TEXT).scan(data, pos, final)
        text = data[pos:end]
        if text:
            if text.strip(_WS_CHARS):  # the model went on: the drafts were not its final act
                self._reject(out)
                emit_plain(out, text, thinking)
            elif thinking:
                drafts.raw.append(text)
                drafts.space.append(text)
            else:
                drafts.after.append(text)
        if m is None:
            return end, None
        tok = m.group()
        if tok in self._STRAYS:
            return m.end(), tok  # a special token out of place: dropped, decides nothing
        if self._drafts is drafts:
            if thinking:
                if tok == self._THINK_END:
                    self._thinking = False
                    drafts.closed = True
                else:  # another call right after: drafted along with the first
                    drafts.in_call = True
                    drafts.raw.append(tok)
                return m.end(), tok
            if tok == self._THINK_END:  # a second end marker: dropped, decides nothing
                self.stray_closes += 1
                return m.end(), tok
            self._reject(out)  # a call (or anything else marked) after the reasoning ended
        self._marker(tok, thinking)
        return m.end(), tok

    def _reject(self, out: list[Event]) -> None:
        """The drafted calls were not meant: their text goes to reasoning, as written."""
        drafts = self._drafts
        assert drafts is not None
        self._drafts = None
        self.drafts_rejected += max(1, drafts.calls())
        self._calls = drafts.first_index  # the calls that count are numbered without them
        emit_plain(out, "".join(drafts.raw), True)
        emit_plain(out, "".join(drafts.after), False)

    def _fire(self, out: list[Event]) -> None:
        """The drafted calls were the model's final act: let them out."""
        drafts = self._drafts
        assert drafts is not None
        self._drafts = None
        self.drafts_fired += drafts.calls()
        emit_plain(out, "".join(drafts.space), True)
        for ev in drafts.events:
            # text a drafted call's reader gave back (an object that named no tool) was
            # written inside reasoning
            out.append(Reasoning(ev.text) if type(ev) is Text else ev)
        emit_plain(out, "".join(drafts.after), False)

    def _call_ended(self, out: list[Event], status: int) -> int:
        """The open :class:`CallReader` returned DONE or STOP: close it. Returns the status,
        NOT_A_CALL instead of DONE when the reader decided the object was content after all
        (its text has been emitted). Feeding the reader stays in the format's ``_step``, one
        call less per feed on the hot path."""
        reader = self._reader
        assert reader is not None
        self._reader = None
        text = reader.close(out, truncated=False)
        if text is not None:
            emit_plain(out, text, False)
            return NOT_A_CALL
        return status


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


# --- JSON calls with a closing marker ---------------------------------------------------------

# phases
_OBJ_WAIT, _KEY_WAIT, _COLON, _VAL_WAIT, _VALUE, _AFTER_VAL, _FLAT_RAW, _DONE = range(8)
# value roles
_R_KEY, _R_NAME, _R_ARGS, _R_OTHER, _R_RAW, _R_JUNK = range(6)
# value kinds
_K_STRING, _K_CONTAINER, _K_ATOM = range(3)

ENVELOPE_ARG_KEYS = ("arguments", "parameters")
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
        "_arg_keys", "_args_seen", "_atom_re", "_bare", "_body", "_cont_re", "_depth", "_esc",
        "_instr", "_keep_body", "_key", "_kind", "_parser", "_pending", "_phase", "_role",
        "_stops", "_text_if_unnamed",
        "_val", "call_id", "index", "name", "started",
    )

    def __init__(self, parser: MarkerParser, stops: Markers | None = None, *,
                 name: str | None = None, call_id: str | None = None,
                 text_if_unnamed: bool = False,
                 arg_keys: tuple[str, ...] = ENVELOPE_ARG_KEYS) -> None:
        self._parser = parser
        self._stops = stops
        firsts = "".join(sorted(stops.firsts)) if stops else ""
        self._cont_re = re.compile("[" + re.escape('"{}[]' + firsts) + "]")
        self._atom_re = re.compile("[^" + re.escape(_WS_CHARS + ',}]"{[' + firsts) + "]+")
        self._text_if_unnamed = text_if_unnamed
        self._arg_keys = arg_keys  # the envelope's keys for the arguments (Inkling: "args")
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
        elif self._key in self._arg_keys and not self._args_seen:
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


# --- whole JSON call objects, and raw JSON arguments closed by a marker -----------------------

# keys naming the tool, and keys carrying its arguments, in order of preference
NAME_KEYS = ("name", "tool", "tool_name", "function", "function_name")
ARG_KEYS = ("arguments", "parameters", "tool_input", "args", "input", "params")

_DECODER = json.JSONDecoder()
_LENIENT_NAME = re.compile(
    r"""["']?(?:name|tool|tool_name|function|function_name)["']?\s*:\s*["']([^"'\\]+)["']""")
_LENIENT_ARGS = re.compile(
    r"""["']?(?:arguments|parameters|tool_input|args|input|params)["']?\s*:\s*""")


def object_members(text: str) -> dict[str, tuple[Any, str]] | None:
    """Parse a JSON object keeping each member's raw text: key -> (value, raw value text).

    The raw text lets arguments reach the client exactly as the model wrote them (no number
    or escape re-serialization). None when ``text`` is not exactly one JSON object.
    """
    try:
        i = skip_ws(text, 0)
        if text[i] != "{":
            return None
        members: dict[str, tuple[Any, str]] = {}
        i = skip_ws(text, i + 1)
        if text[i] == "}":
            return members if skip_ws(text, i + 1) == len(text) else None
        while True:
            if text[i] != '"':
                return None
            key, i = scanstring(text, i + 1)
            i = skip_ws(text, i)
            if text[i] != ":":
                return None
            i = skip_ws(text, i + 1)
            value, j = _DECODER.raw_decode(text, i)
            members[key] = (value, text[i:j])
            i = skip_ws(text, j)
            if text[i] == ",":
                i = skip_ws(text, i + 1)
                continue
            if text[i] == "}":
                return members if skip_ws(text, i + 1) == len(text) else None
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
            if c in _WS_CHARS:
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
    value is complete is held and kept only if it is not just whitespace. The caller starts
    the call; the reader ends it (``{}`` when no arguments came), at its marker or at finish.
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
        found (the call has then ended)."""
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
            if not self.emitted:
                out.append(ToolCallArgs(self.index, "{}"))
            out.append(ToolCallEnd(self.index))
            return best + len(found), found

    def finish(self, out: list[Event]) -> None:
        """End of stream: the call ends, truncated unless its value was complete."""
        self._close(out)
        out.append(ToolCallEnd(self.index, truncated=not self.complete))

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
            text = text.lstrip(_WS_CHARS)
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
        if rest.strip(_WS_CHARS):
            out.append(ToolCallArgs(self.index, rest))
            self.emitted = True




# --- XML-style arguments, typed by the tool's schema -------------------------------------------

_PY_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "object": (dict,), "array": (list, tuple), "null": (type(None),),
}


def schema_types(schema: Any) -> set[str]:
    """The JSON types a (sub)schema allows, from ``type``, ``anyOf``/``oneOf`` or ``enum``."""
    if not isinstance(schema, dict):
        return set()
    t = schema.get("type")
    if isinstance(t, str):
        return {t}
    if isinstance(t, list):
        return {x for x in t if isinstance(x, str)}
    out: set[str] = set()
    for key in ("anyOf", "oneOf"):
        alts = schema.get(key)
        if isinstance(alts, list):
            for alt in alts:
                out |= schema_types(alt)
    if not out and isinstance(schema.get("enum"), list):
        for v in schema["enum"]:
            out |= {name for name, py in _PY_TYPES.items()
                    if isinstance(v, py) and not (isinstance(v, bool) and name != "boolean")}
    return out


def _fits(value: Any, types: set[str]) -> bool:
    for name in types:
        py = _PY_TYPES.get(name)
        if py is None:
            continue
        if isinstance(value, bool) and name != "boolean":
            continue
        if name == "integer" and isinstance(value, float):
            if value.is_integer():
                return True
            continue
        if isinstance(value, py):
            return True
    return False


def convert_value(raw: str, schema: Any) -> Any:
    """Type one raw parameter value by its schema; the raw string when it cannot be typed
    (validation reports that later, rather than the parser guessing)."""
    types = schema_types(schema)
    if not types or types == {"string"}:
        return raw
    text = raw.strip()
    for parse in (json.loads, literal_eval_quiet):
        try:
            value = parse(text)
        except Exception:  # any parse failure: try the next reading
            continue
        if isinstance(value, tuple):
            value = list(value)
        if _fits(value, types):
            if "integer" in types and isinstance(value, float) and "number" not in types:
                value = int(value)
            return value
    if "boolean" in types and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if "null" in types and text.lower() in ("null", "none"):
        return None
    return raw


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):  # a value only Python can hold: keep it as text
        return json.dumps(str(value), ensure_ascii=False)


def trim_value(raw: str) -> str:
    """Templates put the value on its own line; drop one newline each side, keep the rest."""
    if raw.startswith("\n"):
        raw = raw[1:]
    if raw.endswith("\n"):
        raw = raw[:-1]
    return raw


class ValueTyping(ABC):
    """How a format turns raw XML-style values into JSON text.

    Each model family follows its own reference parser (vLLM's), and those disagree about
    values that do not fit the schema, so the rule is a format's choice (:data:`FITTED` or
    :data:`PARSED`); the member layout, the closing and truncation are shared in
    :class:`XmlArgs`.
    """

    #: whether a call cut off before its first member still opens its arguments object
    opens_when_cut: ClassVar[bool] = False

    @abstractmethod
    def complete(self, raw: str, prop: Any) -> str:
        """JSON text of a complete value (already trimmed) of the parameter schema ``prop``."""

    @abstractmethod
    def partial(self, raw: str, prop: Any) -> str:
        """Text of a value the stream cut off (an unfinished string is left open)."""


class FittedValues(ValueTyping):
    """vLLM's qwen3coder rule: a value is parsed (JSON, then a Python literal) and kept only
    when it fits one of the schema's types; otherwise it stays the raw string."""

    def complete(self, raw: str, prop: Any) -> str:
        return _dumps(convert_value(raw, prop))

    def partial(self, raw: str, prop: Any) -> str:
        types = schema_types(prop)
        return _dumps(raw)[:-1] if not types or "string" in types else raw.strip()


_NOT_STRING = ("integer", "number", "boolean", "object", "array", "null")


def _declared_types(prop: Any) -> set[str]:
    """The types the glm45 rule reads: ``type`` together with ``anyOf``/``oneOf``; an ``enum``
    (with neither) counts as a string only when all its values are strings."""
    if not isinstance(prop, dict):
        return set()
    t = prop.get("type")
    types = {t} if isinstance(t, str) else {x for x in t if isinstance(x, str)} \
        if isinstance(t, list) else set()
    for alt in ("anyOf", "oneOf"):
        for sub in prop.get(alt) or ():
            types |= _declared_types(sub)
    if not types and isinstance(prop.get("enum"), list):
        types = {"string"} if all(isinstance(v, str) for v in prop["enum"]) else set()
    return types


def _is_string(prop: Any) -> bool | None:
    """True/False when the schema says whether the parameter is a string; None when not."""
    types = _declared_types(prop)
    if not types:
        return None
    return "string" in types or not types & set(_NOT_STRING)


class ParsedValues(ValueTyping):
    """vLLM's glm45 rule: a value stays a string when the schema says the parameter is one;
    otherwise it is parsed (JSON, then a Python literal), whatever type that gives, and kept
    as a string only when neither parses."""

    opens_when_cut = True

    def complete(self, raw: str, prop: Any) -> str:
        if _is_string(prop) is not True:
            text = raw.strip()
            for parse in (json.loads, literal_eval_quiet):
                try:
                    return json.dumps(parse(text), ensure_ascii=False, allow_nan=False)
                except Exception:  # any failure means "not this kind of value"
                    continue
        return json.dumps(raw, ensure_ascii=False)

    def partial(self, raw: str, prop: Any) -> str:
        return raw if _is_string(prop) is False else json.dumps(raw, ensure_ascii=False)[:-1]


FITTED = FittedValues()
PARSED = ParsedValues()


class XmlArgs:
    """The JSON arguments of one XML-style call, built one member per complete value and
    emitted as fragments (``{"k": v``, ``, "k2": v2``, ``}``), values typed by the tool's
    schema."""

    __slots__ = ("count", "index", "props", "typing")

    def __init__(self, parser: MarkerParser, name: str, typing: ValueTyping,
                 out: list[Event]) -> None:
        """Start the call (its ToolCallStart goes to ``out``)."""
        self.index = parser.next_index()
        schema = parser.schema_of(name)
        props = schema.get("properties") if schema else None
        self.props: dict[str, Any] = props if isinstance(props, dict) else {}
        self.typing = typing
        self.count = 0
        out.append(ToolCallStart(self.index, name))

    def member(self, key: str, raw: str, out: list[Event],
               typing: ValueTyping | None = None) -> None:
        """One complete ``key``/value pair; ``typing`` overrides the call's rule for this value
        (DSML says per parameter whether its value is a string)."""
        key = key.strip()
        lead = "{" if self.count == 0 else ", "
        self.count += 1
        value = (typing or self.typing).complete(trim_value(raw), self.props.get(key))
        out.append(ToolCallArgs(self.index, f"{lead}{_dumps(key)}: {value}"))

    def end(self, out: list[Event]) -> None:
        out.append(ToolCallArgs(self.index, "}" if self.count else "{}"))
        out.append(ToolCallEnd(self.index))

    def truncate(self, key: str | None, partial: str | None, out: list[Event],
                 typing: ValueTyping | None = None) -> None:
        """The stream ended inside the call (inside the member ``key``, inside its value when
        ``partial`` is given): emit what there is as unterminated JSON, for the repair stage."""
        if key is None:
            frag = "{" if self.count == 0 and self.typing.opens_when_cut else ""
        else:
            key = key.strip()
            frag = ("{" if self.count == 0 else ", ") + _dumps(key) + ": "
            if partial is not None:
                partial = partial[1:] if partial.startswith("\n") else partial
                frag += (typing or self.typing).partial(partial, self.props.get(key))
        if frag:
            out.append(ToolCallArgs(self.index, frag))
        out.append(ToolCallEnd(self.index, truncated=True))
