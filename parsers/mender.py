"""The tool-call mender: upstream chat chunks in, clean OpenAI chunks out. Sans-I/O.

Two sources of tool calls meet here:

- **markers in content**: a backend without a tool parser (or with one that leaks split
  markers) sends ``<tool_call>...`` as text; a :class:`MarkerParser` for the model's format
  turns it into calls, holding back only a possible marker prefix;
- **structured deltas**: a backend that parses calls itself sends ``tool_calls`` fragments,
  with each server's own bugs — ids and names repeated or missing, every call at index 0, the
  argument tail duplicated, ``function_call`` sent beside ``tool_calls``.

Both are reassembled into :class:`PendingCall` objects; a finished call's arguments are
repaired (``repair.py``) and, when a checker is given, validated, then emitted the OpenAI way:
a first fragment with ``index``, ``id``, ``type``, ``name`` and ``arguments: ""``, then the
arguments. In ``buffered`` mode (the default) a call is emitted once complete and checked; in
``incremental`` mode fragments stream as they arrive and only a closing suffix can be added
at the end.

The hot-path contract with ``stream.py``: :meth:`wants` looks at the raw event bytes and says
whether the event can matter. A plain content delta with no character that could start a
marker, while the parser is idle in text, is forwarded untouched without being parsed; while
it is idle inside reasoning, the same delta is forwarded with its ``"content"`` key renamed
(:attr:`ChatMender.rekey`), so a thinking reply costs about what a plain one does.

Reasoning (see ``parsers/reasoning.py`` and the README's decision table): a server's own
reasoning field (``reasoning_content``, ``reasoning``) passes through under its own name and is
never parsed for calls; reasoning toolmend separates from content goes to the field chosen per
server or request. A call the model drafts inside reasoning is held by the format parser until
the reply shows it was meant (``_stream.StreamParser``), in buffered and incremental mode alike.

A request that declared no tools gets a ``structured_only`` mender: its text is never parsed for
markers (a ``<tool_call>`` there is the model's own business), and until a structured call
shows up it wants only events that carry one (:func:`carries_call`, a few byte searches), so
plain chat is forwarded exactly as without a mender. The call itself then goes through the same
checks as any other, and finds no tool declared.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .arguments import ArgumentText
from .autodetect import START_MARKERS, AutoParser
from .events import Event, Reasoning, Text, ToolCallArgs, ToolCallEnd, ToolCallStart
from .formats import FORMATS, format_for_model, make_parser
from .formats._stream import THINK_START
from .formats.base import MarkerParser
from .reasoning import DEFAULT_FIELD, FIELDS, SERVER_FIELDS, ReasoningSignals
from .repair import (
    MAX_ARGUMENT_DEPTH,
    Repair,
    clean_name,
    closing_suffix,
    depth_message,
    forget_parsed,
    repair_arguments,
    too_deep,
)

_ALNUM = string.ascii_letters + string.digits

#: Default bound on one call's argument text, in characters. Everything after the stream
#: (repair, validation, re-encoding) costs time on the event loop in proportion to it; real
#: calls, even ones writing a whole file, are far smaller.
MAX_ARGUMENT_CHARS = 1 << 20
#: How much model text a marker parser may hold (beyond the arguments) before it has let any
#: out: marker strings, names, whitespace.
_MARKUP_ALLOWANCE = 64 * 1024

# Bytes that can begin a marker, per format (searched in the raw event after "content"), as
# each format declares them (``ToolFormat.triggers``); for detection by markers ("auto"), the
# first character of every start marker and of ``<think>``.
# A JSON-escaped character (\uXXXX) always sends the event to the parser.
DEFAULT_TRIGGERS = (b"<",)
TRIGGERS: dict[str, tuple[bytes, ...]] = {
    **{name: fmt.triggers for name, fmt in FORMATS.items()},
    "auto": tuple(sorted({m[0].encode() for m in (*START_MARKERS, THINK_START)})),
}
_ESCAPE = b"\\u"
_CONTENT = b'"content":'
_REASONING_KEY = b'"reasoning'  # "reasoning" and "reasoning_content"
_USAGE = b'"usage"'
_USAGE_NULL = (b'"usage":null', b'"usage": null')
#: how reasoning toolmend separated is written back into content (reasoning_field "content")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_STRUCTURE = (b'"tool_calls"', b'"function_call"')
_FINISH_NULL = (b'"finish_reason":null', b'"finish_reason": null')
_SKIP = b" \t\r\n:"
_SHARED = b"_call"  # in both _STRUCTURE keys


def _string_end(data: bytes, i: int) -> int:
    """Where the JSON string value that starts at ``data[i:]`` (after a key's colon) ends, so a
    marker search stays inside it: a marker character such as ``]`` (MiniMax-M3's) is in every
    chunk's envelope after the content (``}]}``), and found there it had every event parsed.
    Where that is not certain (not a string, or a backslash in it), the end of the event."""
    while data[i:i + 1] == b" ":
        i += 1
    if data[i:i + 1] != b'"':
        return len(data)
    end = data.find(b'"', i + 1)
    if end < 0 or data.find(b"\\", i + 1, end) >= 0:
        return len(data)
    return end


def carries_call(data: bytes) -> bool:
    """Whether a raw chunk carries a structured call: a ``tool_calls`` or ``function_call`` key
    whose value is not ``null`` or ``[]`` (SGLang sends ``"tool_calls": null`` in every delta).
    A key inside a string value cannot match: its quotes would be escaped.

    One search decides a plain chunk (both keys share ``_call``): this runs on every event of a
    request without tools, so it must cost next to nothing."""
    if data.find(_SHARED) < 0:
        return False
    for key in _STRUCTURE:
        i = data.find(key)
        while i >= 0:
            j = i + len(key)
            n = len(data)
            while j < n and data[j] in _SKIP:
                j += 1
            head = data[j:j + 1]
            if head == b"[":
                k = j + 1
                while k < n and data[k] in _SKIP:
                    k += 1
                if data[k:k + 1] != b"]":
                    return True
            elif head not in (b"n", b""):
                return True
            i = data.find(key, j)
    return False


class _TextOnly(MarkerParser):
    """The parser of a ``structured_only`` mender: text is text."""

    name = "none"

    @property
    def at_rest(self) -> bool:
        return True  # it never holds anything

    def feed(self, text: str) -> list[Event]:
        return [Text(text)] if text else []

    def finish(self) -> list[Event]:
        return []


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


@dataclass
class PendingCall:
    """One tool call being reassembled, from markers or from structured deltas."""

    name: str = ""
    id: str | None = None
    args: ArgumentText = field(default_factory=ArgumentText)  # appended to in linear time
    truncated: bool = False
    complete: bool = False
    source: str = "structured"  # or "markers"
    upstream_index: int | None = None
    out_index: int = -1
    dropped: bool = False  # an extra call under parallel_tool_calls: false; never emitted
    started_out: bool = False  # incremental mode: the first fragment was sent
    sent_args: int = 0  # incremental mode: characters of arguments already sent
    repairs: list[Repair] = field(default_factory=list)

    @property
    def arguments(self) -> str:
        return self.args.text()

    @arguments.setter
    def arguments(self, text: str) -> None:
        self.args = ArgumentText(text)


@dataclass(slots=True)
class CheckResult:
    """What a call checker (schema validation) decided for one finished call."""

    ok: bool
    arguments: str | None = None  # replacement arguments (coerced), when changed
    notes: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None  # OpenAI-shaped error body when the call is refused
    retry: Any = None  # an opaque retry plan: hold the call, the proxy asks the upstream again


CallChecker = Callable[[str, str], CheckResult]
ReplyChecker = Callable[[list[str]], CheckResult]


@dataclass
class HeldCall:
    """A call (or, with ``call`` None, a reply missing its call) waiting for a retry."""

    call: PendingCall | None
    retry: Any


class StreamError(Exception):
    """A finished call was refused; the stream must end with this error."""

    def __init__(self, body: dict[str, Any], notes: list[str] | None = None) -> None:
        super().__init__(body.get("error", {}).get("message", "invalid tool call"))
        self.body = body
        self.notes = notes or []  # what happened before the refusal (retries sent), reported


class ChatMender:
    """Per-request mender for ``chat.completion.chunk`` streams (choice 0).

    Reasoning options:

    * ``reasoning_open``: the reply starts inside reasoning (the chat template opened it), or
      not; None decides it from ``reasoning_signals`` and the model name the upstream reports
      (see ``parsers/reasoning.py``). Not applied once the server sent its own reasoning field
      before any content: the server split the reply itself.
    * ``reasoning_field``: where reasoning toolmend separates goes: ``reasoning_content``,
      ``reasoning``, ``drop`` or ``content`` (wrapped in ``<think>``...``</think>``).
    * ``resplit_server_reasoning``: the text of the upstream's ``reasoning``/``reasoning_content``
      deltas is not passed through but taken as raw reply text that starts inside reasoning,
      followed by the content deltas, and re-split here with the format's parser and the
      decision table. For servers whose own split is wrong: vLLM's qwen3 reasoning parser ends
      reasoning at a ``<tool_call>`` drafted inside ``<think>``. Where the server's reasoning
      field ends, its reasoning is taken to have ended too (the server dropped the end
      marker), unless the content goes on with one of the format's call markers: then the
      server ended reasoning at a call the model drafted, and the text is still reasoning.
    """

    def __init__(self, fmt: str | None, tools: list[dict[str, Any]] | None = None, *,
                 mode: str = "buffered", checker: CallChecker | None = None,
                 reply_checker: ReplyChecker | None = None,
                 model_hint: str | None = None, single_call: bool = False,
                 reasoning_open: bool | None = None,
                 reasoning_signals: ReasoningSignals | None = None,
                 reasoning_field: str = DEFAULT_FIELD,
                 resplit_server_reasoning: bool = False,
                 structured_only: bool = False,
                 max_argument_chars: int = MAX_ARGUMENT_CHARS,
                 max_argument_depth: int = MAX_ARGUMENT_DEPTH) -> None:
        # The format may be decided late, from the model name the upstream reports in its
        # first chunk: an agent often sends a placeholder model name.
        self._fmt = None if fmt in (None, "", "auto") else fmt
        self._tools = tools
        self._model_hint = model_hint
        self.format = ""
        self._parser: MarkerParser | None = None
        self.mode = mode
        self.checker = checker
        self.reply_checker = reply_checker
        self.single_call = single_call  # parallel_tool_calls: false, which servers ignore
        self.structured_only = structured_only  # a request without tools (see the docstring)
        self.max_argument_chars = max_argument_chars
        self.max_argument_depth = max_argument_depth
        self._unreleased = 0  # content the marker parser has taken without letting any out
        self._released = False  # the last feed let text out or ended a call
        self.held: list[HeldCall] = []  # calls waiting for a retry (buffered mode only)
        self._pending_finish: str | None = None
        self._triggers: tuple[bytes, ...] = DEFAULT_TRIGGERS
        self._idle = False  # parser is in plain text with nothing held (see wants)
        self._envelope: dict[str, Any] | None = None
        self._calls: list[PendingCall] = []
        self._current: PendingCall | None = None  # open structured call
        self._marker_calls: dict[int, PendingCall] = {}
        self._next_out = 0
        self._finished = False
        self.repairs: list[dict[str, Any]] = []  # for the trace: kind, call, before, after
        self.tool_names: list[str] = []
        self.finish_reason: str | None = None
        # reasoning
        self._reasoning_open = reasoning_open
        self._signals = reasoning_signals or ReasoningSignals()
        if reasoning_field not in FIELDS:
            raise ValueError(f"reasoning_field must be one of {FIELDS}, got {reasoning_field!r}")
        self.reasoning_field = reasoning_field
        self.resplit = resplit_server_reasoning
        self._server_key: str | None = None  # the server's reasoning field, when re-split
        self._server_key_bytes: bytes | None = None  # its JSON key, for the fast path
        self.opens_reasoning = False  # the decision, once the model is known
        self.open_signal = ""  # what decided it
        self._content_seen = False
        self._server_reasoning = False  # the upstream sent its own reasoning field
        self._wrapped = False  # reasoning_field "content": a <think> was written, not closed
        self._idle_reasoning = False  # parser at rest inside reasoning (see wants)
        self._think_triggers: tuple[bytes, ...] = (b"<", b"[")
        #: for :meth:`wants`' callers: the key a declined event's ``"content":`` becomes (the
        #: parser is at rest inside reasoning), or None to forward the event as it is
        self.rekey: bytes | None = None

    @property
    def parser(self) -> MarkerParser:
        if self._parser is None:
            self._choose(None)
        assert self._parser is not None
        return self._parser

    def _choose(self, upstream_model: str | None) -> None:
        if self.structured_only:
            self._parser = _TextOnly()
            self._triggers = ()
            return
        fmt = self._fmt or format_for_model(upstream_model) or \
            format_for_model(self._model_hint) or "auto"
        self.format = fmt
        self._parser = AutoParser(self._tools) if fmt == "auto" else make_parser(fmt, self._tools)
        self._triggers = TRIGGERS.get(fmt, DEFAULT_TRIGGERS)
        think = getattr(type(self._parser), "_IN_THINK", None)
        if think is not None:
            self._think_triggers = tuple(sorted(c.encode() for c in think.firsts))
        if self._reasoning_open is not None:
            self.opens_reasoning = self._reasoning_open
            self.open_signal = "reasoning_open"
        else:
            self.opens_reasoning, self.open_signal = self._signals.decide(
                upstream_model, self._model_hint)

    def retry_options(self) -> dict[str, Any]:
        """How to read a retried reply to the same request (:func:`mend_message`'s arguments):
        the format the request was given, the model name it asked for, and the reasoning
        signals, since the retry's prompt ends the way the first one did (a template that
        opened reasoning opens it again). Where this reply was found to start inside reasoning
        (a non-streamed one that closed reasoning it never opened), the retry does too."""
        return {"fmt": self._fmt, "model": self._model_hint,
                "reasoning_signals": self._signals, "reasoning_open": self._reasoning_open}

    def start_inside_reasoning(self) -> None:
        """Take the reply to start inside reasoning (before any content is fed): for a whole
        reply that closes reasoning it never opened (see :func:`mend_message`)."""
        self._reasoning_open = True
        self.opens_reasoning = True
        self.open_signal = "an end marker without a start"

    # hot path ----------------------------------------------------------------------------------
    def wants(self, data: bytes) -> bool:
        if self.structured_only and not self._calls:
            return carries_call(data)  # nothing else matters until a call shows up
        if self._idle_reasoning:
            return self._wants_in_reasoning(data)
        if not self._idle:
            return True
        if b'"finish_reason"' in data and _FINISH_NULL[0] not in data and \
                _FINISH_NULL[1] not in data:
            return True
        return self.wants_unfinished(data)

    def wants_unfinished(self, data: bytes) -> bool:
        """:meth:`wants` for an event the caller has seen to carry no finish reason (none, or
        null): the same answer without searching for it again."""
        if self.structured_only and not self._calls:
            return carries_call(data)
        if self._idle_reasoning:
            return self._wants_in_reasoning(data)
        if not self._idle:
            return True
        if self.resplit and _REASONING_KEY in data:
            return True
        if _SHARED in data:
            for s in _STRUCTURE:
                if s in data:
                    return True
        # may the content string hold a marker? (_string_end written out for the usual
        # compact JSON: this runs for every token of every reply)
        i = data.find(_CONTENT)
        if i < 0:
            return False  # role-only, reasoning or usage: nothing to mend
        i += 10
        if data.find(_ESCAPE, i) >= 0:
            return True
        if data[i:i + 1] == b'"':  # the usual compact JSON; else the general way
            end = data.find(b'"', i + 1)
            if end < 0 or data.find(b"\\", i + 1, end) >= 0:
                end = len(data)
        else:
            end = _string_end(data, i)
        for t in self._triggers:
            if data.find(t, i, end) >= 0:
                return True
        return False

    def wants_content(self, text: str) -> bool:
        """:meth:`wants_unfinished` for a chunk *object* whose delta holds only ``text`` as
        content (and perhaps a role): what a wire decoder that makes objects (Ollama's NDJSON)
        hands the pipeline. The same rules, read from the decoded text (no JSON escapes)."""
        if self.structured_only and not self._calls:
            return False  # content never carries a structured call
        if self._idle_reasoning:
            if self._server_reasoning and not self._content_seen and text:
                return True  # the server's reasoning field ended here: decided in feed
            triggers = self._think_triggers
        elif not self._idle:
            return True
        else:
            triggers = self._triggers
        if not text:
            return False
        data = text.encode()
        for t in triggers:
            if t in data:
                return True
        return False

    @property
    def rekey_field(self) -> str | None:
        """:attr:`rekey` as a field name, for chunk objects."""
        return None if self.rekey is None else self.rekey[1:-2].decode()

    def _wants_in_reasoning(self, data: bytes) -> bool:
        """:meth:`wants` while the parser is at rest inside reasoning it separated: a content
        delta with no character of a reasoning marker is reasoning as it stands, and is
        forwarded with its key renamed (:attr:`rekey`) instead of being parsed; so is, when
        re-splitting, a delta of the server's own reasoning field (its key unchanged)."""
        for s in _STRUCTURE:
            if s in data:
                return True
        if b'"finish_reason"' in data and _FINISH_NULL[0] not in data and \
                _FINISH_NULL[1] not in data:
            return True
        if _USAGE in data and _USAGE_NULL[0] not in data and _USAGE_NULL[1] not in data:
            return True  # the pipeline may re-encode it: the key must be renamed in feed
        i = data.find(_CONTENT)
        if i >= 0:
            if data.find(_CONTENT, i + 10) >= 0 or data.find(_REASONING_KEY) >= 0:
                return True  # another "content" key (logprobs) or reasoning beside it
            if self._server_reasoning and not self._content_seen and \
                    not data.startswith(b'""', i + 10):
                return True  # the server's reasoning field ended here: decided in feed
            i += 10
        else:
            key = self._server_key_bytes
            j = data.find(key) if key is not None else -1
            if j < 0 or data.count(_REASONING_KEY) != 1:
                return _REASONING_KEY in data  # the server's own reasoning: decided in feed
            # re-split: the server's reasoning field alone, bound for that same field while the
            # parser rests inside reasoning, is forwarded as it came unless it may hold a marker
            i = j + len(key)
        if data.find(_ESCAPE, i) >= 0:
            return True
        end = _string_end(data, i)
        for t in self._think_triggers:
            if data.find(t, i, end) >= 0:
                return True
        return False

    # chunks ------------------------------------------------------------------------------------
    def feed(self, chunk: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
        out: list[dict[str, Any]] = []
        notes: list[str] = []
        if self._envelope is None:
            self._envelope = {k: v for k, v in chunk.items() if k not in ("choices", "usage")}
        if self._parser is None:
            model = chunk.get("model")
            self._choose(model if isinstance(model, str) else None)
        choices = chunk.get("choices")
        if not choices or not isinstance(choices, list):
            out.append(chunk)  # the usage chunk, or an odd empty one: passed as it is
            return out, notes
        choice = choices[0] if isinstance(choices[0], dict) else {}
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = {}
        role = delta.get("role")
        if "reasoning" in delta or "reasoning_content" in delta:
            self._server_field(delta, out, notes)
        content = delta.get("content")
        if isinstance(content, str) and content:
            if not self._content_seen:
                self._first_content()
            self._released = False
            self._events(self.parser.feed(content), out, notes, count_idle=len(content))
            self._bound_held(content)
        elif role and not out:
            out.append(self._chunk({"role": role, "content": ""}))
        tcs = delta.get("tool_calls")
        fc = delta.get("function_call")
        if isinstance(tcs, list) and tcs:
            for tc in tcs:
                if isinstance(tc, dict):
                    self._structured(tc, out, notes)
        elif isinstance(fc, dict):
            # the deprecated single-call form; treated as call 0 when no tool_calls came along
            self._structured({"index": 0, "function": fc, "_legacy": True}, out, notes)
        reason = choice.get("finish_reason")
        if reason:
            self._finish(reason, out, notes)
        extra = {k: v for k, v in chunk.items() if k == "usage" and v}
        if extra and out:
            out[-1] = {**out[-1], **extra}
        elif extra:
            out.append({**self._base(), "choices": [], **extra})
        return out, notes

    def _server_field(self, delta: dict[str, Any], out: list[dict[str, Any]],
                      notes: list[str]) -> None:
        """The upstream's own reasoning field: passed through under its own name, never parsed
        for calls; or, with ``resplit_server_reasoning``, fed to the parser as raw text."""
        fields = {k: delta[k] for k in SERVER_FIELDS if isinstance(delta.get(k), str)
                  and delta[k]}
        if not fields:
            return
        if self.resplit:
            # both names at once carry the same text (servers in transition send both)
            text = fields.get("reasoning") or fields["reasoning_content"]
            if self._server_key is None:  # re-split reasoning stays in the server's field
                self._server_key = "reasoning" if "reasoning" in fields else "reasoning_content"
                if len(fields) == 1:  # see _wants_in_reasoning
                    self._server_key_bytes = b'"' + self._server_key.encode() + b'":'
            if not self._server_reasoning and not self._content_seen:
                self.parser.open_reasoning()
                self.open_signal = "the server's reasoning field"
            self._server_reasoning = True
            self._events(self.parser.feed(text), out, notes, count_idle=len(text))
            return
        self._server_reasoning = True
        self._close_wrap(out)
        out.append(self._chunk(fields))

    def _first_content(self) -> None:
        self._content_seen = True
        if self._server_reasoning:
            if self.resplit:
                self.parser.end_server_reasoning()
            return  # the server split the reply itself: its content is the answer
        if self.opens_reasoning:
            self.parser.open_reasoning()

    def finish(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The upstream ended without a finish chunk: flush what is held."""
        out: list[dict[str, Any]] = []
        notes: list[str] = []
        if self.structured_only and self._envelope is None:
            return out, notes  # never fed: the stream went by untouched, its end included
        if not self._finished:
            self._finish(None, out, notes)
        return out, notes

    # internals ---------------------------------------------------------------------------------
    def _base(self) -> dict[str, Any]:
        return dict(self._envelope or {"object": "chat.completion.chunk"})

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        c = self._base()
        c["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        return c

    def _bound_held(self, content: str) -> None:
        """A marker parser holds a call it has not finished (formats that emit a call whole
        keep all of its text): bound that by the arguments cap, counting the content fed since
        the parser last let text out or ended a call (exact to within one delta)."""
        self._unreleased = 0 if self._released else self._unreleased + len(content)
        if self._unreleased > self.max_argument_chars + _MARKUP_ALLOWANCE:
            raise StreamError(invalid_call_error(
                self._open_marker_name(), f"the tool call is longer than the limit of "
                f"{self.max_argument_chars} characters of arguments (max_argument_chars)"))

    def _open_marker_name(self) -> str:
        return next(reversed(self._marker_calls.values())).name if self._marker_calls else ""

    def _add_arguments(self, call: PendingCall, fragment: str) -> None:
        call.args.add(fragment)
        if call.args.size > self.max_argument_chars:
            raise StreamError(invalid_call_error(
                call.name, f"arguments are longer than the limit of {self.max_argument_chars} "
                "characters (max_argument_chars)"))

    def _events(self, events: list[Event], out: list[dict[str, Any]], notes: list[str],
                count_idle: int = -1) -> None:
        text_len = 0
        reasoning_len = 0
        only_text = True
        only_reasoning = True
        for ev in events:
            if type(ev) is Text:
                text_len += len(ev.text)
                only_reasoning = False
                self._released = True
                if self._wrapped:
                    self._close_wrap(out)
                out.append(self._chunk({"content": ev.text}))
            elif type(ev) is Reasoning:
                only_text = False
                self._released = True
                reasoning_len += len(ev.text)
                self._reasoning(ev.text, out)
            elif type(ev) is ToolCallStart:
                only_text = only_reasoning = False
                self._close_wrap(out)
                self._close_structured(out, notes)
                call = PendingCall(name=ev.name, id=ev.id, source="markers",
                                   dropped=self.single_call and bool(self._calls))
                self._marker_calls[ev.index] = call
                self._calls.append(call)
                if self.mode == "incremental":
                    self._emit_start(call, out)
            elif type(ev) is ToolCallArgs:
                only_text = only_reasoning = False
                call = self._marker_calls.get(ev.index)
                if call is not None:
                    self._add_arguments(call, ev.fragment)
                    if self.mode == "incremental":
                        self._emit_args(call, out)
            elif type(ev) is ToolCallEnd:
                only_text = only_reasoning = False
                self._released = True
                call = self._marker_calls.pop(ev.index, None)
                if call is not None:
                    call.truncated = ev.truncated
                    self._complete(call, out, notes)
        if count_idle >= 0:
            # idle: the parser holds nothing (not merely "as much text out as came in": a
            # held "<" released while the next "<" is held is that too, and a delta let past
            # the parser then would overtake the held one)
            self._idle = only_text and text_len == count_idle and self.parser.at_rest
            field = self._server_key or self.reasoning_field
            idle_reasoning = only_reasoning and reasoning_len == count_idle and \
                field != "drop" and self.parser.at_rest and self.parser.in_reasoning
            self._idle_reasoning = idle_reasoning
            if idle_reasoning and field != "content":
                self.rekey = b'"' + field.encode() + b'":'
            else:
                self.rekey = None

    def _reasoning(self, text: str, out: list[dict[str, Any]]) -> None:
        """Reasoning toolmend separated, to the field chosen for it (re-split reasoning of a
        server's own field: to that field, as the server's reasoning always goes)."""
        field = self._server_key or self.reasoning_field
        if field == "drop":
            return
        if field == "content":
            if not self._wrapped:
                self._wrapped = True
                text = THINK_OPEN + text
            out.append(self._chunk({"content": text}))
            return
        out.append(self._chunk({field: text}))

    def _close_wrap(self, out: list[dict[str, Any]]) -> None:
        if self._wrapped:
            self._wrapped = False
            out.append(self._chunk({"content": THINK_CLOSE}))

    def _structured(self, tc: dict[str, Any], out: list[dict[str, Any]],
                    notes: list[str]) -> None:
        fn = tc.get("function") if isinstance(tc.get("function"), dict) else {}
        name = fn.get("name") if isinstance(fn.get("name"), str) else None
        args = fn.get("arguments")
        if args is not None and not isinstance(args, str):
            args = self._object_arguments(args, name)
        cid = tc.get("id") if isinstance(tc.get("id"), str) and tc.get("id") else None
        index = tc.get("index") if isinstance(tc.get("index"), int) else None
        cur = self._current
        new = cur is None
        if cur is not None:
            if index is not None and cur.upstream_index is not None and \
                    index != cur.upstream_index:
                new = True
            elif cid and cur.id and cid != cur.id:
                new = True  # Ollama: every call at index 0, told apart by id
            elif name and cur.name and name != cur.name and cur.args.size:
                new = True
            elif name and cur.name == name and cur.args.size and not cid and \
                    args is not None and _is_complete_json(args) and cur.args.whole_json():
                new = True  # a second whole call to the same tool, without id or index
        if new:
            self._close_structured(out, notes)
            cur = PendingCall(name=name or "", id=cid, upstream_index=index,
                              dropped=self.single_call and bool(self._calls))
            self._current = cur
            self._calls.append(cur)
        else:
            assert cur is not None
            if name and not cur.name:
                cur.name = name
            if cid and not cur.id:
                cur.id = cid
        assert cur is not None
        if args:
            self._add_arguments(cur, args)
        if self.mode == "incremental" and cur.name:
            if not cur.started_out:
                self._emit_start(cur, out)
            self._emit_args(cur, out)

    def _object_arguments(self, args: Any, name: str | None) -> str:
        """Arguments some servers (Ollama) send as an object, as JSON text."""
        import orjson

        try:
            return orjson.dumps(args).decode()
        except TypeError:  # beyond orjson: integers over 64 bits, or nesting past 255 levels
            import json

            try:
                return json.dumps(args, ensure_ascii=False, separators=(",", ":"))
            except (RecursionError, ValueError, TypeError):
                raise StreamError(invalid_call_error(
                    name or "", depth_message(self.max_argument_depth))) from None

    def _close_structured(self, out: list[dict[str, Any]], notes: list[str]) -> None:
        cur = self._current
        if cur is not None:
            self._current = None
            self._complete(cur, out, notes)

    def _finish(self, reason: str | None, out: list[dict[str, Any]], notes: list[str]) -> None:
        self._finished = True
        parser = self.parser
        parser.cut_off = reason == "length"
        self._events(parser.finish(), out, notes)
        self._close_wrap(out)
        self._reasoning_notes(parser, notes)
        for call in list(self._marker_calls.values()):
            call.truncated = True
            self._complete(call, out, notes)
        self._marker_calls.clear()
        if reason == "length" and self._current is not None:
            self._current.truncated = True  # the cut fell inside the last structured call
        self._close_structured(out, notes)
        if self.reply_checker is not None:
            verdict = self.reply_checker(self.tool_names + [h.call.name for h in self.held
                                                            if h.call is not None])
            notes.extend(verdict.notes)
            if verdict.error is not None:
                raise StreamError(verdict.error)
            if verdict.retry is not None:
                self.held.append(HeldCall(None, verdict.retry))
        if self.held:
            self._pending_finish = reason or "stop"  # sent by close(), after the retries
            return
        out.append(self._finish_chunk(reason, notes))

    def _reasoning_notes(self, parser: MarkerParser, notes: list[str]) -> None:
        """What the client should know about how the reply's reasoning was split."""
        inner = getattr(parser, "_inner", None) or parser
        rejected = getattr(inner, "drafts_rejected", 0)
        fired = getattr(inner, "drafts_fired", 0)
        if rejected:
            notes.append(f"kept {rejected} tool call(s) drafted inside reasoning as reasoning: "
                         "the model went on after them")
            self.repairs.append({"kind": "drafted_call_kept_as_reasoning", "call": -1,
                                 "before": rejected, "after": 0})
        if fired:
            notes.append(f"emitted {fired} tool call(s) written inside reasoning: they were "
                         "the model's final act")
        if parser.in_reasoning:
            why = f" (taken to start there: {self.open_signal})" if parser.reasoning_opened \
                and self.open_signal else ""
            notes.append(f"the reply ended inside reasoning{why}; it never closed it, so all "
                         "of its text after the start went to reasoning")
        if parser.stray_closes:
            sent = inner.calls_before_stray
            calls = f", and {sent} tool call(s) written before it were already emitted" \
                if sent else ""
            notes.append(f"dropped {parser.stray_closes} reasoning end marker(s) that closed no "
                         f"reasoning; the text before was already sent as content{calls} (the "
                         "chat template probably opened reasoning: see reasoning_open_models)")
            self.repairs.append({"kind": "reasoning_end_without_start", "call": -1,
                                 "before": parser.stray_closes, "after": 0})

    def _finish_chunk(self, reason: str | None, notes: list[str]) -> dict[str, Any]:
        emitted = any(c.out_index >= 0 for c in self._calls)
        final = reason
        if emitted and reason in (None, "stop", "eos", "function_call", "tool_calls"):
            if reason not in (None, "tool_calls"):
                notes.append(f"repaired finish_reason {reason!r} -> 'tool_calls'")
            final = "tool_calls"
        elif final is None:
            final = "stop"
        elif final in ("tool_calls", "function_call") and not emitted:
            # every call was answered in text instead (a retry asked for it): none is left
            notes.append(f"repaired finish_reason {reason!r} -> 'stop'")
            final = "stop"
        self.finish_reason = final
        return self._chunk({}, final)

    def resolve(self, held: HeldCall, name: str | None, arguments: str | None,
                text: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
        """Emit the replacement for a held call (``name`` None: the retry produced no call;
        ``text``: a plain answer asked for instead, as under ``tool_choice: "none"``)."""
        out: list[dict[str, Any]] = []
        notes: list[str] = []
        if text:
            out.append(self._chunk({"content": text}))
        if name:
            call = held.call or PendingCall(source="retry")
            if held.call is None:
                self._calls.append(call)
            call.name, call.arguments, call.truncated = name, arguments or "", False
            self.tool_names.append(call.name)
            self._emit_start(call, out)
            if call.arguments:
                out.append(self._tool_chunk(call, {"arguments": call.arguments}))
        return out, notes

    def close(self) -> tuple[list[dict[str, Any]], list[str]]:
        """After the retries: the finish chunk that :meth:`_finish` held back."""
        notes: list[str] = []
        self.held.clear()
        return [self._finish_chunk(self._pending_finish, notes)], notes

    def _complete(self, call: PendingCall, out: list[dict[str, Any]], notes: list[str]) -> None:
        if call.complete:
            return
        call.complete = True
        if call.dropped:
            notes.append(f"dropped an extra call to {call.name or '?'}: parallel_tool_calls "
                         "is false")
            self.repairs.append({"kind": "extra_call_dropped", "call": -1,
                                 "before": len(call.arguments), "after": 0})
            return
        name, changed = clean_name(call.name)
        if changed:
            self._record(call, Repair("name_markup", len(call.name), len(name)), notes)
            call.name = name
        if not call.name:
            raise StreamError(invalid_call_error(
                "", f"the model wrote a tool call without a function name: "
                f"{call.arguments[:200]!r}"))
        streamed = call.arguments
        if too_deep(streamed, self.max_argument_depth):
            raise StreamError(invalid_call_error(call.name,
                                                 depth_message(self.max_argument_depth)))
        if self.mode == "incremental" and call.truncated and call.sent_args:
            suffix = closing_suffix(streamed)
            if suffix:  # what was streamed stays true: the repair only appends
                self._record(call, Repair("truncated_closed", len(streamed),
                                          len(streamed) + len(suffix)), notes)
                call.arguments = streamed + suffix
                call.truncated = False
                streamed = call.arguments
        result = repair_arguments(streamed, truncated=call.truncated, max_depth=None)
        for r in result.repairs:
            self._record(call, r, notes)
        args = result.text if result.ok else streamed
        if self.checker is None and not result.ok:
            raise StreamError(invalid_call_error(call.name, result.error or "invalid arguments"))
        if self.checker is not None:
            try:
                verdict = self.checker(call.name, args)
            finally:
                forget_parsed()
            notes.extend(verdict.notes)
            if verdict.error is not None:
                raise StreamError(verdict.error)
            if verdict.retry is not None and self.mode == "buffered":
                call.arguments = args
                self.held.append(HeldCall(call, verdict.retry))
                return
            if verdict.arguments is not None:
                args = verdict.arguments
        self.tool_names.append(call.name)
        if self.mode == "incremental":
            if not call.started_out:
                self._emit_start(call, out)
            if args.startswith(streamed[:call.sent_args]) and len(args) >= call.sent_args:
                tail = args[call.sent_args:]
                if tail:
                    out.append(self._tool_chunk(call, {"arguments": tail}))
            elif args != streamed:
                # the client already holds text that no appended suffix can make right, and
                # incremental mode cannot retract: an explicit error, never a silent bad call
                raise StreamError(invalid_call_error(
                    call.name, "arguments were streamed (incremental mode) before they could "
                    f"be repaired; the streamed text is not valid: {streamed[:200]!r}"))
            return
        self._emit_start(call, out)
        if args:
            out.append(self._tool_chunk(call, {"arguments": args}))

    def _record(self, call: PendingCall, r: Repair, notes: list[str]) -> None:
        call.repairs.append(r)
        idx = call.out_index if call.out_index >= 0 else self._next_out
        self.repairs.append({"kind": r.kind, "call": idx, "before": r.before,
                             "after": r.after})
        notes.append(f"repaired call {idx} {call.name or '?'}: {r.note()}")

    def _emit_start(self, call: PendingCall, out: list[dict[str, Any]]) -> None:
        if call.started_out or call.dropped:
            return
        call.started_out = True
        call.out_index = self._next_out
        self._next_out += 1
        if not call.id:
            call.id = new_call_id()
        out.append(self._tool_chunk(call, {"name": clean_name(call.name)[0], "arguments": ""},
                                    first=True))

    def _emit_args(self, call: PendingCall, out: list[dict[str, Any]]) -> None:
        if not call.started_out:
            return
        pending = call.args.tail(call.sent_args)
        if pending:
            call.sent_args = call.args.size
            out.append(self._tool_chunk(call, {"arguments": pending}))

    def _tool_chunk(self, call: PendingCall, function: dict[str, Any],
                    first: bool = False) -> dict[str, Any]:
        tc: dict[str, Any] = {"index": call.out_index}
        if first:
            tc["id"] = call.id
            tc["type"] = "function"
        tc["function"] = function
        return self._chunk({"tool_calls": [tc]})


def invalid_call_error(name: str, message: str, pointer: str = "") -> dict[str, Any]:
    """The OpenAI-shaped error a client gets instead of a tool call that cannot be mended."""
    return {"error": {"message": f"tool call {name!r}: {message}", "type": "invalid_tool_call",
                      "param": None, "code": "invalid_tool_call", "tool": name,
                      "pointer": pointer, "validator_message": message}}


def _is_complete_json(text: str) -> bool:
    import orjson

    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


def mend_message(message: dict[str, Any], finish_reason: str | None, fmt: str | None,
                 tools: list[dict[str, Any]] | None, checker: CallChecker | None = None,
                 model: str | None = None, reply_checker: ReplyChecker | None = None, *,
                 max_argument_chars: int = MAX_ARGUMENT_CHARS,
                 max_argument_depth: int = MAX_ARGUMENT_DEPTH, model_hint: str | None = None,
                 **reasoning: Any) -> tuple[dict[str, Any], str | None, ChatMender]:
    """Non-streaming: the same repair applied to a whole ``choices[0].message``.

    Runs the message through the streaming mender as one chunk, so both paths share every
    rule, then folds the emitted chunks back into one message. ``model`` is the model name the
    upstream reported, ``model_hint`` the one the request asked for (``model`` when not given).
    """
    m = ChatMender(fmt, tools, checker=checker, reply_checker=reply_checker,
                   model_hint=model_hint or model,
                   max_argument_chars=max_argument_chars,
                   max_argument_depth=max_argument_depth, **reasoning)
    chunks, _ = feed_whole(m, message, finish_reason, model)
    return fold_chunks(message, chunks), m.finish_reason, m


def feed_whole(mender: ChatMender, message: dict[str, Any], finish_reason: str | None,
               model: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Feed a whole (non-streamed) ``message`` as one chunk.

    With the whole reply at hand, a reasoning end marker that closes reasoning the reply never
    opened is seen before anything is emitted: the reply started inside reasoning the chat
    template opened, so it is read that way from its start (streamed, that text has already
    gone out as content by the time the marker arrives).
    """
    chunk: dict[str, Any] = {"choices": [{"index": 0, "delta": message_as_delta(message),
                                          "finish_reason": finish_reason or "stop"}]}
    if model is not None:
        chunk["model"] = model
    content = message.get("content")
    if isinstance(content, str) and content:
        if mender._parser is None:
            mender._choose(model)
        if not mender.opens_reasoning and not _server_reasoning(message) and \
                mender.parser.closes_unopened(content):
            mender.start_inside_reasoning()
    return mender.feed(chunk)


def _server_reasoning(message: dict[str, Any]) -> bool:
    return any(isinstance(message.get(k), str) and message[k] for k in SERVER_FIELDS)


def message_as_delta(message: dict[str, Any]) -> dict[str, Any]:
    """A whole ``message`` as one streaming ``delta``, so non-streaming replies take the same
    path through the mender as streamed ones (tool calls get their positional index)."""
    delta: dict[str, Any] = {"role": "assistant"}
    for key in ("content", "reasoning_content", "reasoning", "tool_calls", "function_call"):
        if message.get(key) is not None:
            delta[key] = message[key]
    if isinstance(delta.get("tool_calls"), list):
        delta["tool_calls"] = [{**tc, "index": i} for i, tc in enumerate(delta["tool_calls"])
                               if isinstance(tc, dict)]
    return delta


def fold_chunks(message: dict[str, Any], chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Fold emitted chunks back into one assistant message (the non-streaming shape)."""
    content: list[str] = []
    reasoning: dict[str, list[str]] = {}
    calls: dict[int, dict[str, Any]] = {}
    for c in chunks:
        for ch in c.get("choices") or ():
            d = ch.get("delta") or {}
            if d.get("content"):
                content.append(d["content"])
            for key in SERVER_FIELDS:
                if d.get(key):
                    reasoning.setdefault(key, []).append(d[key])
            for tc in d.get("tool_calls") or ():
                slot = calls.setdefault(tc["index"], {"id": tc.get("id"), "type": "function",
                                                      "function": {"name": "",
                                                                   "arguments": ""}})
                fn = tc.get("function") or {}
                if fn.get("name"):
                    slot["function"]["name"] = fn["name"]
                slot["function"]["arguments"] += fn.get("arguments") or ""
    out = {k: v for k, v in message.items() if k not in ("function_call", "tool_calls",
                                                          *SERVER_FIELDS)}
    out["role"] = "assistant"
    out["content"] = "".join(content) or None
    for key, parts in reasoning.items():
        out[key] = "".join(parts)
    if calls:
        out["tool_calls"] = [calls[i] for i in sorted(calls)]
    return out
