"""The reply model: one typed stream of events between the mended reply and every front.

The mender's output is a chat-completions stream (that is also what the fast path relays to a
chat-completions client untouched). Every other front (Ollama, Anthropic Messages, Responses)
reads that stream through :class:`ChatReplyDecoder` as events, and its own encoder turns the
events into its API's wire format. The events are the parser events of :mod:`.events` (text,
reasoning, tool-call start, argument fragment, tool-call end) plus the reply-level ones below
(usage, finish, error, repair note), so a front never looks at a chat chunk.

What the decoder guarantees to an encoder, whatever the chunking of the stream it reads:

- a tool call is ``ToolCallStart`` (with its id and whole name), then its ``ToolCallArgs``
  fragments in order, then ``ToolCallEnd``; calls do not interleave, and every started call is
  ended before ``Finish``;
- ``Finish`` comes at most once, after all text and calls; ``Usage`` may come before or after
  it (OpenAI sends usage in a chunk of its own after the finish chunk);
- an ``Error`` is the stream's end: nothing follows it.

Sans-I/O, in the style of h11: ``feed`` bytes, get events; ``finish`` at the end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from .events import Reasoning, Text, ToolCallArgs, ToolCallEnd, ToolCallStart
from .sse import DONE, SSEComment, SSEDecoder

__all__ = [
    "ChatReplyDecoder",
    "Error",
    "Finish",
    "Note",
    "Reasoning",
    "ReplyEvent",
    "Text",
    "TextJSON",
    "ToolCallArgs",
    "ToolCallEnd",
    "ToolCallStart",
    "Usage",
    "chat_reply_events",
    "reply_size",
]

#: The repair notes toolmend writes into a stream as SSE comments start with this.
_NOTE_PREFIX = b"toolmend "


@dataclass(slots=True, frozen=True)
class Usage:
    """Token counts, as the backend reported them (``None`` where it did not)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None
    cached_tokens: int | None = None


@dataclass(slots=True, frozen=True)
class Finish:
    """Why the reply ended, in chat-completions terms: ``stop``, ``length``, ``tool_calls``,
    ``content_filter`` (or whatever the backend said). ``stop_sequence`` is the stop string
    that ended it, when the backend reported one."""

    reason: str
    stop_sequence: str | None = None


@dataclass(slots=True, frozen=True)
class Error:
    """The reply failed; ``code`` and ``type`` are OpenAI's, ``status`` the HTTP status the
    failure maps to. Each front shapes it in its own API's error form."""

    message: str
    code: str | None = None
    type: str | None = None
    status: int = 502
    param: str | None = None


@dataclass(slots=True, frozen=True)
class Note:
    """A repair toolmend made (``repaired arguments of get_weather``): fronts that have a place
    for notes show them; the others drop them."""

    text: str


@dataclass(slots=True, frozen=True)
class TextJSON:
    """Text given as the body of a JSON string that needs no escape (``raw``: ASCII, no quote,
    backslash or control character): the upstream chunk's own bytes, which a streaming encoder
    puts into its event as they are, byte for byte what encoding :attr:`text` would give.

    Only a decoder whose front asked for it (:attr:`ChatReplyDecoder.splice_text`) makes these,
    for the usual chunk, so that plain text is neither decoded nor encoded again per token."""

    raw: bytes

    @property
    def text(self) -> str:
        return self.raw.decode("ascii")


ReplyEvent = Text | TextJSON | Reasoning | ToolCallStart | ToolCallArgs | ToolCallEnd | Usage \
    | Finish | Error | Note

#: choice 0's delta holding content first; with the text's closing quote followed by the
#: delta's end, content is all it holds
_CONTENT_DELTA = b'"choices":[{"index":0,"delta":{"content":"'
#: what a JSON string would have to escape (or has escaped): such text takes the general way
_ESCAPED = re.compile(rb'[\x00-\x1f\\]')


def _usage(obj: dict[str, Any]) -> Usage:
    def num(v: Any) -> int | None:
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    details = obj.get("completion_tokens_details")
    prompt_details = obj.get("prompt_tokens_details")
    return Usage(
        prompt_tokens=num(obj.get("prompt_tokens")),
        completion_tokens=num(obj.get("completion_tokens")),
        reasoning_tokens=num(details.get("reasoning_tokens")) if isinstance(details, dict)
        else None,
        cached_tokens=num(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict)
        else None)


def _error(err: Any) -> Error:
    if isinstance(err, dict):
        msg = err.get("message")
        code = err.get("code")
        status = err.get("status") if isinstance(err.get("status"), int) else 502
        return Error(message=msg if isinstance(msg, str) else orjson.dumps(err).decode(),
                     code=code if isinstance(code, str) else None,
                     type=err.get("type") if isinstance(err.get("type"), str) else None,
                     status=status,
                     param=err.get("param") if isinstance(err.get("param"), str) else None)
    return Error(message=str(err))


class _Call:
    __slots__ = ("args", "id", "name", "started")

    def __init__(self, call_id: str) -> None:
        self.id = call_id
        self.name = ""
        self.args: list[str] = []  # fragments seen before the start could be emitted
        self.started = False


class ChatReplyDecoder:
    """Chat-completions chunks (SSE bytes, or chunk objects) in, :data:`ReplyEvent` out.

    Only choice 0 is read: every toolmend front asks the backend for one choice. Call ids the
    stream lacks are made up as ``call_<index>``; a front with its own id scheme replaces them.
    """

    __slots__ = ("_calls", "_current", "_done", "_finish", "_sse", "_usage_seen", "splice_text")

    def __init__(self, *, splice_text: bool = False) -> None:
        #: the consumer takes :class:`TextJSON` (see :meth:`plain_text`)
        self.splice_text = splice_text
        self._sse = SSEDecoder()
        self._calls: dict[int, _Call] = {}
        self._current: int | None = None  # the index of the open (started, not ended) call
        self._finish: Finish | None = None
        self._done = False  # an error or the finish went out: the stream is over
        self._usage_seen = False

    # --- input ---------------------------------------------------------------------------------
    def feed(self, data: bytes) -> list[ReplyEvent]:
        out: list[ReplyEvent] = []
        payload = self._sse.whole_event(data)
        if payload is not None:  # one whole event: the most usual chunk of all
            self.payload(payload, out)
            return out
        # The usual chunk is whole one-line events (``data: {...}\n\n``), as toolmend's own
        # stream writes them: split it here, without the general decoder's line machinery.
        if data[-2:] == b"\n\n" and b"\r" not in data and self._sse.idle:
            pieces = data.split(b"\n\n")
            pieces.pop()
            payloads = []
            for piece in pieces:
                if piece[:6] != b"data: " or b"\n" in piece:
                    break
                payloads.append(piece[6:])
            else:
                for payload in payloads:
                    self.payload(payload, out)
                return out
        for ev in self._sse.feed(data):
            if type(ev) is SSEComment:
                if ev.text.startswith(_NOTE_PREFIX):
                    out.append(Note(ev.text[len(_NOTE_PREFIX):].decode("utf-8", "replace")))
                continue
            self.payload(ev.data, out)
        return out

    def payload(self, payload: bytes, out: list[ReplyEvent]) -> None:
        """One SSE event's data (a chunk's JSON, or ``[DONE]``): the stream pipeline hands its
        events here directly, so a front never sees SSE bytes."""
        if payload == DONE:
            return
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if isinstance(obj, dict):
            self.chunk(obj, out)

    def plain_text(self, payload: bytes, out: list[ReplyEvent]) -> bool:
        """The usual chunk without parsing it: when choice 0's delta holds content text alone,
        needing no escape, add it as :class:`TextJSON` and say True. The caller has seen the
        chunk carry nothing else that counts (no error, usage or finish reason: the stream
        pipeline's plain events) and the text has no quote in it, so the first quote ends it.
        Anything else is False, for :meth:`payload`."""
        if self._current is not None or self._done or self._finish is not None:
            return False
        i = payload.find(_CONTENT_DELTA)
        if i < 0:
            return False
        i += len(_CONTENT_DELTA)
        end = payload.find(b'"', i)
        if end < 0 or payload[end + 1:end + 2] != b"}" or _ESCAPED.search(payload, i, end):
            return False
        raw = payload[i:end]
        if not raw.isascii():
            return False
        if raw:
            out.append(TextJSON(raw))
        return True

    def chunk(self, obj: dict[str, Any], out: list[ReplyEvent]) -> None:
        """One chunk object (already parsed)."""
        if self._done and self._finish is None:
            return  # after an error nothing counts
        if obj.get("error") is not None:
            self._close_call(out)
            out.append(_error(obj["error"]))
            self._done = True
            self._finish = None
            return
        usage = obj.get("usage")
        choices = obj.get("choices") or ()
        for choice in choices:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._choice(choice, out)
        if isinstance(usage, dict) and not self._usage_seen:
            self._usage_seen = True
            out.append(_usage(usage))

    def _choice(self, choice: dict[str, Any], out: list[ReplyEvent]) -> None:
        if self._finish is not None:
            return
        delta = choice.get("delta")
        if delta is None:
            delta = choice.get("message")  # a whole reply read as one chunk
            if delta is None:
                delta = {}
        if not isinstance(delta, dict):
            self._close_call(out)
            out.append(Error("upstream sent a malformed chunk: its delta is not an object",
                             code="upstream_bad_response", type="upstream_error", status=502))
            self._done = True
            return
        thinking = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(thinking, str) and thinking:
            self._close_call(out)
            out.append(Reasoning(thinking))
        content = delta.get("content")
        if isinstance(content, str) and content:
            self._close_call(out)
            out.append(Text(content))
        for tc in delta.get("tool_calls") or ():
            if isinstance(tc, dict):
                self._tool_delta(tc, out)
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            self._close_call(out)
            stop = choice.get("stop_reason")  # vLLM names the stop string that ended it
            self._finish = Finish(reason, stop if isinstance(stop, str) else None)
            out.append(self._finish)
            self._done = True

    def _tool_delta(self, tc: dict[str, Any], out: list[ReplyEvent]) -> None:
        index = tc.get("index", 0)
        if not isinstance(index, int):
            index = 0
        fn = tc.get("function") if isinstance(tc.get("function"), dict) else {}
        call = self._calls.get(index)
        if call is None:
            self._close_call(out)  # a new call: the open one is complete
            call = self._calls[index] = _Call(tc.get("id") or f"call_{index}")
            self._current = index
        elif index != self._current:
            return  # a late fragment of a call already ended: the mender never sends one
        if isinstance(tc.get("id"), str) and tc["id"] and not call.started:
            call.id = tc["id"]
        name = fn.get("name")
        if isinstance(name, str) and name and not call.started:
            call.name += name
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            if not call.started and call.name:
                call.started = True
                out.append(ToolCallStart(index, call.name, call.id))
                out.extend(ToolCallArgs(index, a) for a in call.args)
                call.args.clear()
            if call.started:
                out.append(ToolCallArgs(index, args))
            else:
                call.args.append(args)

    def _close_call(self, out: list[ReplyEvent]) -> None:
        index = self._current
        if index is None:
            return
        self._current = None
        call = self._calls[index]
        if not call.started:
            call.started = True
            out.append(ToolCallStart(index, call.name, call.id))
            out.extend(ToolCallArgs(index, a) for a in call.args)
            call.args.clear()
        out.append(ToolCallEnd(index))

    # --- end -----------------------------------------------------------------------------------
    def finish(self) -> list[ReplyEvent]:
        """The stream ended: close what is open. A stream without a finish reason ends with
        ``Finish("stop")`` (or ``tool_calls`` when calls went by) so that every front can close
        its reply; whether such a stream counts as complete is the relay's judgement, not this
        decoder's."""
        out: list[ReplyEvent] = []
        for ev in self._sse.finish():
            if type(ev) is not SSEComment and ev.data != DONE:
                try:
                    obj = orjson.loads(ev.data)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    self.chunk(obj, out)
        if not self._done:
            self._close_call(out)
            self._finish = Finish("tool_calls" if self._calls else "stop")
            out.append(self._finish)
            self._done = True
        return out

    @property
    def finish_reason(self) -> str | None:
        return self._finish.reason if self._finish is not None else None


def reply_size(events: list[ReplyEvent]) -> int:
    """Characters of reply the events carry (text, reasoning, call names and arguments): what
    a front that gathers a whole reply counts against ``max_upstream_reply_bytes``."""
    n = 0
    for ev in events:
        kind = type(ev)
        if kind is Text or kind is Reasoning:
            n += len(ev.text)  # type: ignore[union-attr]
        elif kind is TextJSON:
            n += len(ev.raw)  # type: ignore[union-attr]
        elif kind is ToolCallArgs:
            n += len(ev.fragment)  # type: ignore[union-attr]
        elif kind is ToolCallStart:
            n += len(ev.name)  # type: ignore[union-attr]
    return n


def chat_reply_events(reply: dict[str, Any]) -> list[ReplyEvent]:
    """A whole (non-streaming) chat-completions reply object as the same events."""
    dec = ChatReplyDecoder()
    out: list[ReplyEvent] = []
    if reply.get("error") is not None:
        dec.chunk(reply, out)
        return out
    for choice in reply.get("choices") or ():
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            msg = choice.get("message") if isinstance(choice.get("message"), dict) else {}
            calls = [dict(tc, index=tc.get("index", i))
                     for i, tc in enumerate(msg.get("tool_calls") or ()) if isinstance(tc, dict)]
            dec.chunk({"choices": [{"index": 0, "delta": {**msg, "tool_calls": calls},
                                    "finish_reason": choice.get("finish_reason")
                                    or ("tool_calls" if calls else "stop"),
                                    "stop_reason": choice.get("stop_reason")}]}, out)
    if isinstance(reply.get("usage"), dict):
        dec.chunk({"usage": reply["usage"]}, out)
    out.extend(dec.finish())
    return out
