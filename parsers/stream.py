"""The per-request stream pipeline, sans-I/O: upstream SSE bytes in, client SSE bytes out.

The relay in ``proxy/`` only moves bytes; every decision about them is made here, so it is
tested without sockets. The hot path decides from the raw event bytes: most events are plain
content deltas that need no change and are re-emitted as they came (one concatenation, no JSON
parse). Only an event that can matter is parsed: one carrying usage, an error, a finish reason,
or anything the tool-call mender asks to see.

Two outputs, one pipeline. For a chat-completions client the output is SSE bytes, and an
event that needs no change is forwarded as the very chunk that came. Every other front
(Ollama, Anthropic Messages, Responses) passes a :class:`~.reply.ChatReplyDecoder` as
``reply``, and gets reply events instead: the mender's chunk objects go to the decoder as
objects, and a forwarded event's payload is decoded once, so no front encodes SSE only to
decode it again.

The client's stream is labelled ``charset=utf-8``, so that promise is kept here too: an ASCII
event (the usual case) costs one ``isascii`` scan, any other one a decode, and only an event
that really holds invalid UTF-8 is rewritten (U+FFFD, counted in ``stats.invalid_utf8``, said
once in a comment). What the upstream may send is bounded as well: one line and one event at
most ``max_event_bytes``, beyond which the stream ends with ``upstream_event_too_large``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from .mender import StreamError
from .reply import ChatReplyDecoder, Note, ReplyEvent
from .sse import (
    DONE,
    DONE_EVENT,
    MAX_EVENT_BYTES,
    SSEComment,
    SSEDecoder,
    SSEProtocolError,
    encode_comment,
    encode_event,
)

_USAGE = b'"usage"'
_USAGE_NULL = (b'"usage":null', b'"usage": null')
_FINISH = b'"finish_reason"'
_FINISH_NULL = (b'"finish_reason":null', b'"finish_reason": null')
_ERROR = b'"error"'
#: The repair note sent (once per stream) when upstream output was not valid UTF-8.
INVALID_UTF8_NOTE = "replaced invalid UTF-8 from the upstream with U+FFFD"
_CONTENT_KEY = b'"content":'

Output = bytes | list[ReplyEvent]
"""What the pipeline hands the client writer: SSE bytes, or reply events (``reply`` mode)."""


class EventMender(Protocol):
    """What the tool-call mender offers the pipeline (see ``parsers/mender.py``).

    ``wants(data)`` is the cheap raw-bytes test; only when it is true is the event parsed and
    handed to ``feed``. Both ``feed`` and ``finish`` return chunk objects to emit, in order, and
    SSE comment texts (repair notes) to emit before them.
    """

    def wants(self, data: bytes) -> bool: ...


    #: when not None, an event ``wants`` declined has its ``"content":`` key renamed to this
    #: (the mender is at rest inside reasoning it separates: the text is reasoning as it is)
    rekey: bytes | None

    def feed(self, chunk: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]: ...

    def finish(self) -> tuple[list[dict[str, Any]], list[str]]: ...


class UpstreamStreamError(Exception):
    """The upstream sent an error event inside a 200 stream."""

    def __init__(self, status: int, body: bytes, final: bool = False) -> None:
        super().__init__(body[:200])
        self.status = status
        self.body = body
        self.final = final  # body is already toolmend's own OpenAI-shaped error
        self.pending: bytes | list[ReplyEvent] = b""  # output decoded before the error


@dataclass
class StreamStats:
    events: int = 0
    first_token: bool = False
    usage: dict[str, Any] | None = None
    finish_reasons: list[str] = field(default_factory=list)
    saw_done: bool = False
    tool_calls: int = 0  # tool calls emitted to the client so far
    model: str | None = None
    invalid_utf8: int = 0  # upstream events whose invalid UTF-8 was replaced with U+FFFD


class StreamPipeline:
    """Decode upstream SSE, strip what the client did not ask for, mend, re-encode.

    ``include_usage`` is whether the *client* asked for the usage chunk; toolmend always asks
    the upstream for it, reads it, and drops it here when the client did not want it.
    ``max_event_bytes`` bounds one upstream line and one event (``max_upstream_event_bytes``).
    """

    __slots__ = ("_decoder", "_include_usage", "_max_event", "_mender", "_reply", "_stopped",
                 "_wants_plain", "awaiting_retry", "stats")

    def __init__(self, include_usage: bool, mender: EventMender | None = None,
                 max_event_bytes: int = MAX_EVENT_BYTES,
                 reply: ChatReplyDecoder | None = None) -> None:
        self._decoder = SSEDecoder(max_event_bytes, max_event_bytes)
        self._reply = reply  # reply mode: events out instead of SSE bytes
        self._max_event = max_event_bytes
        self._include_usage = include_usage
        self._mender = mender
        # a mender may answer more cheaply for an event without a finish reason (see _plain)
        self._wants_plain = getattr(mender, "wants_unfinished", None) or getattr(
            mender, "wants", None)
        self._stopped = False
        self.awaiting_retry = False  # the mender holds calls: the proxy retries, then close()
        self.stats = StreamStats()

    def feed(self, chunk: bytes) -> Output:
        """What to write to the client for this upstream chunk (may be empty)."""
        if self._stopped:
            return self._join([])
        decoder = self._decoder
        data = decoder.whole_event(chunk)
        # The usual event needs nothing but counting: not [DONE] nor an error, first token
        # seen, no usage or finish reason to read, nothing for the mender, a JSON object in
        # ASCII. Only reads; whatever it declines goes the general way (_loop). Written out
        # here, not in helpers: this runs for every token of every reply.
        if data is not None and self.stats.first_token and data != DONE and \
                data.find(_ERROR, 0, 12) < 0 and \
                (_USAGE not in data or _USAGE_NULL[0] in data or _USAGE_NULL[1] in data) and \
                (_FINISH not in data or _FINISH_NULL[0] in data or _FINISH_NULL[1] in data) and \
                (self._mender is None or (self._mender.rekey is None
                                          and not self._wants_plain(data))) and \
                data.startswith(b"{") and data.endswith(b"}") and data.isascii():
            self.stats.events += 1
            reply = self._reply
            if reply is None:
                return chunk  # the usual event, forwarded as it came
            out: list[ReplyEvent] = []
            if not (reply.splice_text and reply.plain_text(data, out)):
                reply.payload(data, out)
            return out
        try:
            events = decoder.feed(chunk)
        except SSEProtocolError as e:
            raise self._too_large(e) from None
        return self._events(events, chunk if decoder.whole else None)

    def feed_chunks(self, chunks: list[dict[str, Any]]) -> Output:
        """What to write to the client for chunk objects a backend's wire decoder made (Ollama's
        NDJSON): the same rules as for SSE events, without encoding them first."""
        if self._stopped or not chunks:
            return self._join([])
        return self._run(self._objects, chunks)

    def _objects(self, chunks: list[dict[str, Any]], parts: list[Any],
                 whole: bytes | None = None) -> None:
        stats = self.stats
        mender = self._mender
        for obj in chunks:
            stats.events += 1
            if obj.get("error") is not None:
                raise UpstreamStreamError(500, orjson.dumps(obj))
            if not stats.first_token:
                stats.first_token = _chunk_has_token(obj)
            self._observe(obj)
            if not self._include_usage and obj.get("usage"):
                if not obj.get("choices"):
                    continue  # the usage chunk the client did not ask for
                obj.pop("usage", None)
            if mender is not None:
                # as for SSE events: plain text the mender would pass unchanged skips it
                text = _content_only(obj)
                if text is None or mender.wants_content(text):
                    chunks_out, notes = mender.feed(obj)
                    self._emit(chunks_out, notes, parts)
                    stats.tool_calls = len(mender.tool_names)
                    continue
                field = mender.rekey_field
                if field is not None:  # at rest inside reasoning: the text is reasoning
                    delta = obj["choices"][0]["delta"]
                    delta[field] = delta.pop("content")
            self._emit([obj], [], parts)

    def finish(self) -> Output:
        """End of the upstream body: flush the decoder and the mender, end with ``[DONE]``."""
        if self._stopped:
            return self._join([])
        try:
            events = self._decoder.finish()
        except SSEProtocolError as e:
            raise self._too_large(e) from None
        out = self._events(events)
        if self._stopped:
            return out
        parts: list[Any] = list(out) if self._reply is not None else [out] if out else []
        if self._mender is not None:
            try:
                chunks, notes = self._mender.finish()
            except StreamError as e:
                self._stopped = True
                raise UpstreamStreamError(502, orjson.dumps(e.body), final=True) from None
            self._emit(chunks, notes, parts)
            self.stats.tool_calls = len(self._mender.tool_names)
            if self._mender.held:
                self.awaiting_retry = True
                self._stopped = True
                return self._join(parts)
        if self._reply is None:
            parts.append(DONE_EVENT)
        self._stopped = True
        return self._join(parts)

    def _join(self, parts: list[Any]) -> Output:
        return parts if self._reply is not None else b"".join(parts)

    def _too_large(self, e: SSEProtocolError) -> UpstreamStreamError:
        """An upstream line or event over the bound: the client gets what came before it,
        then a clear upstream error (never a crash of the request)."""
        pending = self._events(e.events)  # may raise its own UpstreamStreamError first
        self._stopped = True
        err = UpstreamStreamError(502, orjson.dumps({"error": {
            "message": f"upstream sent an SSE event or line over the limit of {e.limit} bytes "
                       "(max_upstream_event_bytes)",
            "type": "upstream_error", "param": None, "code": "upstream_event_too_large"}}),
            final=True)
        err.pending = pending
        return err

    def emit(self, chunks: list[dict[str, Any]], notes: list[str], done: bool = False
             ) -> Output:
        """Encode chunks produced outside the upstream stream (a retry's replacement call)."""
        parts: list[Any] = []
        self._emit(chunks, notes, parts)
        if self._mender is not None:
            self.stats.tool_calls = len(self._mender.tool_names)
        if done and self._reply is None:
            parts.append(DONE_EVENT)
        return self._join(parts)

    def _events(self, events: list[Any], whole: bytes | None = None) -> Output:
        """``whole``: the upstream chunk, when it was exactly the one event in ``events``."""
        if not events or self._stopped:
            return self._join([])
        return self._run(self._loop, events, whole)

    def _run(self, step: Any, items: list[Any], whole: bytes | None = None) -> Output:
        """One step over decoded input; on an error, what was made before it is kept as the
        error's ``pending`` output, and the pipeline stops."""
        parts: list[Any] = []
        try:
            step(items, parts, whole)
        except UpstreamStreamError as e:
            e.pending = self._join(parts)  # what was decoded before the error still goes out
            self._stopped = True
            raise
        except StreamError as e:  # the mender refused a finished tool call
            err = UpstreamStreamError(502, orjson.dumps(e.body), final=True)
            err.pending = self._join(parts)
            self._stopped = True
            raise err from None
        return self._join(parts)

    def _loop(self, events: list[Any], parts: list[Any], whole: bytes | None = None) -> None:
        stats = self.stats
        mender = self._mender
        reply = self._reply
        for ev in events:
            if type(ev) is SSEComment:
                continue  # upstream keep-alives are the upstream's business
            data: bytes = ev.data
            if data == DONE:
                stats.saw_done = True
                continue
            stats.events += 1
            if ev.event == "error" or data.find(_ERROR, 0, 12) >= 0:
                raise UpstreamStreamError(500, data)
            if not stats.first_token:
                stats.first_token = _has_token(data)
            if mender is not None:
                if mender.wants(data):
                    obj = self._parse(data, True, parts)
                    if obj is not None:
                        chunks, notes = mender.feed(obj)
                        self._emit(chunks, notes, parts)
                        stats.tool_calls = len(mender.tool_names)
                    continue
                if mender.rekey is not None:
                    data = data.replace(_CONTENT_KEY, mender.rekey, 1)
            if (_USAGE in data and not _is_null(data, _USAGE_NULL)) or (
                    _FINISH in data and not _is_null(data, _FINISH_NULL)):
                obj = self._parse(data, False, parts)
                if obj is None:
                    continue
                if obj is not _UNCHANGED:
                    if reply is not None:
                        reply.chunk(obj, parts)
                    else:
                        parts.append(encode_event(orjson.dumps(obj)))
                    continue
                plain = False  # a usage or finish the reply decoder must read
            elif not (data.startswith(b"{") and data.endswith(b"}")):
                raise UpstreamStreamError(502, _malformed(data))
            else:
                plain = True
            if not data.isascii():  # ASCII, the usual case, pays one scan; the rest a decode
                try:
                    data.decode()
                except UnicodeDecodeError:
                    data = self._repair_utf8(data, parts)
            if reply is not None:
                # the usual text event, as on feed's fast path: spliced when the front takes it
                if not (plain and reply.splice_text and reply.plain_text(data, parts)):
                    reply.payload(data, parts)
                continue
            if ev.multiline:  # an event sent as several data: lines stays one event
                parts.append(encode_event(data))
                continue
            if whole is not None and data is ev.data:
                parts.append(whole)  # unchanged: the upstream chunk itself, not a copy of it
                continue
            parts.append(b"data: " + data + b"\n\n")

    def _emit(self, chunks: list[dict[str, Any]], notes: list[str], parts: list[Any]) -> None:
        reply = self._reply
        if reply is not None:
            parts.extend(Note(note) for note in notes)
            for c in chunks:
                reply.chunk(c, parts)
            return
        for note in notes:
            parts.append(encode_comment("toolmend " + note))
        for c in chunks:
            parts.append(encode_event(orjson.dumps(c)))

    def _observe(self, obj: dict[str, Any]) -> None:
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.stats.usage = usage
        if self.stats.model is None and isinstance(obj.get("model"), str):
            self.stats.model = obj["model"]
        for choice in obj.get("choices") or ():
            if isinstance(choice, dict) and choice.get("finish_reason"):
                self.stats.finish_reasons.append(choice["finish_reason"])

    def _parse(self, data: bytes, want_obj: bool, parts: list[Any]) -> Any:
        """Parse one event and apply the usage rule.

        Returns None to drop the event (the usage-only chunk the client did not ask for),
        ``_UNCHANGED`` to forward the raw bytes, or the modified object to re-encode. An event
        that only parses once its invalid UTF-8 is replaced is always re-encoded.
        """
        try:
            obj = orjson.loads(data)
            fixed = False
        except orjson.JSONDecodeError:
            if _is_utf8(data):
                raise UpstreamStreamError(502, _malformed(data)) from None
            try:
                obj = orjson.loads(self._repair_utf8(data, parts))
            except orjson.JSONDecodeError:
                raise UpstreamStreamError(502, _malformed(data)) from None
            fixed = True
        if not isinstance(obj, dict):
            raise UpstreamStreamError(502, _malformed(data))
        choices = obj.get("choices")
        if choices is not None and not (isinstance(choices, list) and
                                        all(isinstance(c, dict) for c in choices)):
            # not a chunk at all: refuse it here rather than let the mender trip over it
            raise UpstreamStreamError(502, _malformed(data))
        self._observe(obj)
        if self._include_usage or not obj.get("usage"):
            return obj if want_obj or fixed else _UNCHANGED
        if obj.get("choices"):
            obj.pop("usage", None)  # usage riding on a content chunk: strip just the field
            return obj
        return None

    def _repair_utf8(self, data: bytes, parts: list[Any]) -> bytes:
        """Replace each invalid UTF-8 sequence with U+FFFD, count it, and say so once.

        The stream is labelled ``charset=utf-8``; passing the bytes through would hand the
        client's decoder something it may reject or mangle. Only JSON's ASCII punctuation
        structures an event, so the replacement never changes the event's shape.
        """
        if not self.stats.invalid_utf8:
            parts.append(encode_comment("toolmend " + INVALID_UTF8_NOTE) if self._reply is None
                         else Note(INVALID_UTF8_NOTE))
        self.stats.invalid_utf8 += 1
        return data.decode("utf-8", "replace").encode()


def _is_utf8(data: bytes) -> bool:
    """Valid UTF-8? (The C decoder is the fastest check the standard library has.)"""
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _is_null(data: bytes, needles: tuple[bytes, bytes]) -> bool:
    return needles[0] in data or needles[1] in data


def _has_token(data: bytes) -> bool:
    """True when an event carries generated output: non-empty content, reasoning or a tool call."""
    if b'"tool_calls"' in data or b'"function_call"' in data:
        return b'"tool_calls":null' not in data and b'"tool_calls":[]' not in data
    for key in (b'"content":"', b'"text":"', b'"reasoning_content":"', b'"reasoning":"',
                b'"content": "', b'"text": "'):
        i = data.find(key)
        if i >= 0 and data[i + len(key):i + len(key) + 1] not in (b'"', b""):
            return True
    return False


def _content_only(obj: dict[str, Any]) -> str | None:
    """The content of a chunk object that carries nothing else: one choice, no finish reason,
    no usage, a delta of ``content`` (and perhaps ``role``); else None."""
    choices = obj.get("choices")
    if obj.get("usage") or type(choices) is not list or len(choices) != 1:
        return None
    choice = choices[0]
    if type(choice) is not dict or choice.get("finish_reason") is not None:
        return None
    delta = choice.get("delta")
    if type(delta) is not dict:
        return None
    text = delta.get("content")
    if type(text) is not str or len(delta) > 2 or (len(delta) == 2 and "role" not in delta):
        return None
    return text


def _chunk_has_token(obj: dict[str, Any]) -> bool:
    """:func:`_has_token` for a chunk object."""
    for choice in obj.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and (delta.get("content") or delta.get("reasoning_content")
                                        or delta.get("reasoning") or delta.get("tool_calls")):
            return True
    return False


def _malformed(data: bytes) -> bytes:
    preview = data[:80].decode("utf-8", "replace")
    return orjson.dumps({"error": {"message": f"upstream sent a malformed event: {preview!r}",
                                   "type": "upstream_error", "param": None,
                                   "code": "upstream_malformed_event"}})


_UNCHANGED: Any = object()
