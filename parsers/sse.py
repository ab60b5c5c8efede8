"""Incremental Server-Sent Events decoder and encoder, sans-I/O.

Bytes go in through :meth:`SSEDecoder.feed` in whatever pieces the network delivers; complete
events come out. Nothing here touches a socket, so every chunk boundary (inside ``data:``, inside a
UTF-8 sequence, between ``\\r`` and ``\\n``) can be tested exhaustively, in the style of h11.

Event data stays as ``bytes``: the relay forwards most events untouched, and ``orjson.loads``
takes bytes directly, so decoding to ``str`` would be wasted work on the hot path. A line is only
split once its terminator has arrived, so a multi-byte character split across chunks is always
whole by the time anyone looks at it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DONE = b"[DONE]"
_NL = b"\n"
_CR = b"\r"
_DATA_SP = b"data: "


#: Default bound on one line and on one event's data (its ``data:`` lines together).
MAX_EVENT_BYTES = 16 * 1024 * 1024


class SSEProtocolError(ValueError):
    """The stream broke a limit: one line longer than ``max_line_bytes``, or one event whose
    ``data:`` lines together pass ``max_event_bytes`` (lines without the blank line that ends
    an event would otherwise pile up for ever).

    ``events`` holds what the same :meth:`SSEDecoder.feed` call had decoded before the limit
    was hit, so that a caller can still deliver them.
    """

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.events: list[SSEEvent | SSEComment] = []


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event. ``data`` is the ``data:`` lines joined by ``\\n``; ``multiline``
    says there was more than one (so that whoever re-emits ``data`` as one line need not
    search it for newlines)."""

    data: bytes
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    multiline: bool = field(default=False, compare=False, repr=False)

    @property
    def is_done(self) -> bool:
        return self.data == DONE


@dataclass(slots=True)
class SSEComment:
    """A ``:`` comment line (keep-alives, toolmend's repair notes)."""

    text: bytes


class SSEDecoder:
    """Turns a byte stream into :class:`SSEEvent` and :class:`SSEComment` items.

    Follows the WHATWG event-stream rules: lines end in ``\\r\\n``, ``\\n`` or ``\\r``; a blank
    line dispatches the event; one leading space after the colon is dropped; unknown fields are
    ignored. Unlike a browser, :meth:`finish` also dispatches an event that lacks its final blank
    line, because servers that close right after ``data: [DONE]`` are common.
    """

    __slots__ = ("_data", "_data_len", "_event", "_id", "_max_event", "_max_line", "_more",
                 "_parts", "_parts_len", "_pending_cr", "_retry", "whole")

    def __init__(self, max_line_bytes: int = MAX_EVENT_BYTES,
                 max_event_bytes: int | None = None) -> None:
        self._parts: list[bytes] = []  # pieces of the current, unterminated line
        self._parts_len = 0
        self._pending_cr = False  # the last byte seen was \r: a following \n belongs to it
        # The current event's data: its first line as it came (the usual event has one line,
        # dispatched without a copy), further lines joined into ``_more`` as they come: one
        # buffer, not a list of small objects that would cost several times their bytes.
        self._data: bytes | None = None
        self._more: bytearray | None = None
        self._data_len = 0  # the current event's data so far, with a newline after each line
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self._max_line = max_line_bytes
        self._max_event = max_line_bytes if max_event_bytes is None else max_event_bytes
        #: the last :meth:`feed` was one whole one-line event and nothing else, so that event
        #: re-encoded is that chunk as it came (a relay may forward the chunk itself)
        self.whole = False

    @property
    def idle(self) -> bool:
        """Between events: nothing of a line or an event is buffered, so a chunk made of whole
        events may be split by whoever knows it is (see ``reply.py``'s fast path)."""
        return (not self._parts and self._data is None and not self._pending_cr
                and self._event is None and self._id is None and self._retry is None)

    def feed(self, chunk: bytes) -> list[SSEEvent | SSEComment]:
        if not chunk:
            self.whole = False
            return []
        # The usual chunk is one whole one-line event (``data: {...}\n\n``, a server's write
        # per token) arriving between events: dispatched at once, without the line machinery.
        data = self.whole_event(chunk)
        if data is not None:
            self.whole = True
            return [SSEEvent(data)]
        self.whole = False
        if self._pending_cr:
            self._pending_cr = False
            if chunk[:1] == _NL:
                chunk = chunk[1:]
                if not chunk:
                    return []
        has_cr = _CR in chunk
        if not has_cr and _NL not in chunk:
            # No terminator: just remember the piece. Joining happens once, at the line's end,
            # so a long line fed one byte at a time stays linear.
            self._parts.append(chunk)
            self._parts_len += len(chunk)
            if self._parts_len > self._max_line:
                self._reset()
                raise SSEProtocolError(f"SSE line longer than {self._max_line} bytes",
                                       self._max_line)
            return []
        if has_cr:
            if chunk[-1:] == _CR:
                self._pending_cr = True
            chunk = chunk.replace(b"\r\n", _NL).replace(_CR, _NL)
        lines = chunk.split(_NL)
        if self._parts:
            self._parts.append(lines[0])
            lines[0] = b"".join(self._parts)
            self._parts.clear()
        tail = lines.pop()
        if tail:
            self._parts.append(tail)
        self._parts_len = len(tail)
        out: list[SSEEvent | SSEComment] = []
        try:
            for line in lines:
                self._line(line, out)
        except SSEProtocolError as e:
            e.events = out
            raise
        return out

    def whole_event(self, chunk: bytes) -> bytes | None:
        """The data of ``chunk`` when it is exactly one whole one-line event (``data: ...``
        and a blank line, nothing else) arriving between events, else None (and nothing is
        consumed): what :meth:`feed` would dispatch for it, without building the event, for a
        caller with a fast path for the usual chunk. Feed it otherwise."""
        if chunk.startswith(_DATA_SP) and chunk.find(_NL) == len(chunk) - 2 and \
                chunk[-1] == 0x0A and _CR not in chunk and len(chunk) - 8 <= self._max_event \
                and self._data is None and not self._parts and not self._pending_cr \
                and self._event is None and self._id is None and self._retry is None:
            return chunk[6:-2]
        return None

    def finish(self) -> list[SSEEvent | SSEComment]:
        """End of stream: flush an unterminated line and an undispatched event."""
        out: list[SSEEvent | SSEComment] = []
        self._pending_cr = False
        try:
            if self._parts:
                line = b"".join(self._parts)
                self._parts.clear()
                self._parts_len = 0
                self._line(line, out)
            self._line(b"", out)
        except SSEProtocolError as e:
            e.events = out
            raise
        return out

    def _line(self, line: bytes, out: list[SSEEvent | SSEComment]) -> None:
        if not line:
            if self._data is not None:
                more = self._more
                out.append(SSEEvent(self._data if more is None else bytes(more), self._event,
                                    self._id, self._retry, more is not None))
                self._data = None
                self._more = None
                self._data_len = 0
            self._event = None
            self._retry = None
            return
        if line[0] == 0x3A:  # ':'
            out.append(SSEComment(line[1:].lstrip(b" ")))
            return
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            # checked here, per line, so the verdict does not depend on how the bytes were split
            size = self._data_len + len(value)
            if size > self._max_event:
                self._reset()
                raise SSEProtocolError(f"SSE event longer than {self._max_event} bytes",
                                       self._max_event)
            self._data_len = size + 1  # the newline that joins the next line
            if self._data is None:
                self._data = value
            else:
                more = self._more
                if more is None:
                    more = self._more = bytearray(self._data)
                more += _NL
                more += value
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\0" not in value:
                self._id = value.decode("utf-8", "replace")
        elif name == b"retry":
            if value.isdigit():
                self._retry = int(value)

    def _reset(self) -> None:
        """Drop what a broken stream had buffered: its memory goes back at once."""
        self._parts = []
        self._parts_len = 0
        self._data = None
        self._more = None
        self._data_len = 0


def encode_event(data: bytes, event: str | None = None) -> bytes:
    """Encode one event; data holding newlines becomes several ``data:`` lines."""
    if _NL in data or _CR in data:
        data = data.replace(b"\r\n", _NL).replace(_CR, _NL)
        body = b"".join(b"data: " + part + _NL for part in data.split(_NL))
    else:
        body = b"data: " + data + _NL
    if event:
        return b"event: " + event.encode() + _NL + body + _NL
    return body + _NL


def encode_comment(text: str | bytes) -> bytes:
    """Encode a comment line, which every SSE client ignores; newlines are flattened."""
    raw = text.encode() if isinstance(text, str) else text
    raw = raw.replace(b"\r", b" ").replace(b"\n", b" ")
    return b": " + raw + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"
