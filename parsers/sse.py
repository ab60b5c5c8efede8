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

from dataclasses import dataclass

DONE = b"[DONE]"
_NL = b"\n"
_CR = b"\r"


class SSEProtocolError(ValueError):
    """The stream broke a limit (for example, one line larger than ``max_line_bytes``)."""


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event. ``data`` is the ``data:`` lines joined by ``\\n``."""

    data: bytes
    event: str | None = None
    id: str | None = None
    retry: int | None = None

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

    __slots__ = ("_data", "_event", "_id", "_max_line", "_parts", "_parts_len", "_pending_cr",
                 "_retry")

    def __init__(self, max_line_bytes: int = 16 * 1024 * 1024) -> None:
        self._parts: list[bytes] = []  # pieces of the current, unterminated line
        self._parts_len = 0
        self._pending_cr = False  # the last byte seen was \r: a following \n belongs to it
        self._data: list[bytes] = []
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self._max_line = max_line_bytes

    def feed(self, chunk: bytes) -> list[SSEEvent | SSEComment]:
        if not chunk:
            return []
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
                raise SSEProtocolError(f"SSE line longer than {self._max_line} bytes")
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
        for line in lines:
            self._line(line, out)
        return out

    def finish(self) -> list[SSEEvent | SSEComment]:
        """End of stream: flush an unterminated line and an undispatched event."""
        out: list[SSEEvent | SSEComment] = []
        if self._parts:
            line = b"".join(self._parts)
            self._parts.clear()
            self._parts_len = 0
            self._line(line, out)
        self._line(b"", out)
        self._pending_cr = False
        return out

    def _line(self, line: bytes, out: list[SSEEvent | SSEComment]) -> None:
        if not line:
            if self._data:
                out.append(SSEEvent(_NL.join(self._data), self._event, self._id, self._retry))
                self._data = []
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
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\0" not in value:
                self._id = value.decode("utf-8", "replace")
        elif name == b"retry":
            if value.isdigit():
                self._retry = int(value)


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
