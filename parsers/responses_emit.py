"""Reply events in, OpenAI Responses API out (streaming events or the whole object), sans-I/O.

The mended reply reaches the Responses front as reply events (``reply.py``); this encoder turns
them into the API's semantic stream, in the order the API defines:

``response.created``, ``response.in_progress``, then for each output item
``response.output_item.added``, its part (``response.content_part.added`` or
``response.reasoning_summary_part.added``), its deltas (``response.output_text.delta``,
``response.reasoning_summary_text.delta`` / ``response.reasoning_text.delta``,
``response.function_call_arguments.delta``), their ``.done`` events, ``response.output_item.done``;
finally ``response.completed`` (``response.incomplete`` when the output cap cut the reply, with
``incomplete_details``), or ``response.failed`` when the reply failed. Every event carries a
``sequence_number`` counting from 0, and is written as ``event: <type>`` plus ``data: <json>``
as OpenAI does. The same state builds the whole ``response`` object for ``stream: false``.

Reasoning goes out as a summary when the request asked for one (``reasoning.summary``: a local
model writes no separate summary, so the summary is the reasoning itself) and as
``reasoning_text`` content otherwise. With ``seal`` (the request's
``include: ["reasoning.encrypted_content"]``), each reasoning item also carries the reasoning
sealed by the caller, which the next request may bring back.

No clocks and no randomness here: the caller passes the creation time and an id factory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from .reply import (
    Error,
    Finish,
    Note,
    Reasoning,
    ReplyEvent,
    Text,
    TextJSON,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from .sse import encode_comment

__all__ = ["ResponsesEncoder", "usage_object"]

#: chat finish reasons that make a response ``incomplete``, with the API's reason for it
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}

_TEXT_DELTA = b"response.output_text.delta"
_REASONING_DELTA = b"response.reasoning_text.delta"
_SUMMARY_DELTA = b"response.reasoning_summary_text.delta"
_ARGS_DELTA = b"response.function_call_arguments.delta"

Seal = Callable[[str], str]
NewId = Callable[[str], str]


def usage_object(u: Usage | None) -> dict[str, Any] | None:
    """Chat usage as the Responses ``usage`` object (``None`` when the backend sent none)."""
    if u is None or (u.prompt_tokens is None and u.completion_tokens is None):
        return None
    inp = u.prompt_tokens or 0
    outp = u.completion_tokens or 0
    return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": u.cached_tokens or 0},
            "output_tokens": outp,
            "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens or 0},
            "total_tokens": inp + outp}


class _Item:
    """One output item while it is open: its kind, id, index and the text gathered so far."""

    __slots__ = ("call_id", "head", "id", "index", "kind", "name", "parts")

    def __init__(self, kind: str, item_id: str, index: int) -> None:
        self.kind = kind  # message | reasoning | function_call
        self.id = item_id
        self.index = index
        self.parts: list[str] = []
        self.name = ""
        self.call_id = ""
        #: the fields every delta event of this item starts with, encoded once
        self.head = b'"item_id":' + orjson.dumps(item_id) + b',"output_index":' + \
            str(index).encode()


class ResponsesEncoder:
    """``feed`` reply events, get the API's SSE bytes; ``finish`` or ``fail`` at the end.

    ``base`` is the response object's fixed fields (id, created_at, model and the request's
    echoed parameters); :meth:`response` is the object at any moment. With ``stream=False``
    nothing is encoded and only the object is built.
    """

    __slots__ = ("_base", "_error", "_finish", "_item", "_new_id", "_output", "_seal", "_seq",
                 "_status", "_stream", "_summary", "_usage", "notes")

    def __init__(self, base: dict[str, Any], *, new_id: NewId, stream: bool = True,
                 summary: bool = False, seal: Seal | None = None) -> None:
        self._base = base
        self._new_id = new_id
        self._stream = stream
        self._summary = summary
        self._seal = seal
        self._seq = 0
        self._output: list[dict[str, Any]] = []
        self._item: _Item | None = None
        self._usage: Usage | None = None
        self._finish: Finish | None = None
        self._status = "in_progress"
        self._error: dict[str, Any] | None = None
        self.notes: list[str] = []

    # --- the response object -----------------------------------------------------------------
    @property
    def status(self) -> str:
        return self._status

    @property
    def ended(self) -> bool:
        return self._status != "in_progress"

    def response(self) -> dict[str, Any]:
        doc = dict(self._base)
        doc["status"] = self._status
        doc["error"] = self._error
        reason = _INCOMPLETE.get(self._finish.reason) if self._finish else None
        doc["incomplete_details"] = {"reason": reason} if self._status == "incomplete" else None
        doc["output"] = list(self._output)
        doc["usage"] = usage_object(self._usage)
        return doc

    # --- events in ---------------------------------------------------------------------------
    def start(self) -> bytes:
        """``response.created`` and ``response.in_progress``: the stream's first two events."""
        if not self._stream:
            return b""
        snap = orjson.dumps(self.response())  # the same object twice: dumped once
        out = []
        for kind in (b"response.created", b"response.in_progress"):
            out.append(b"".join((b"event: ", kind, b'\ndata: {"type":"', kind,
                                 b'","sequence_number":', str(self._seq).encode(),
                                 b',"response":', snap, b"}\n\n")))
            self._seq += 1
        return b"".join(out)

    def feed(self, events: list[ReplyEvent]) -> bytes:
        out: list[bytes] = []
        for ev in events:
            t = type(ev)
            if t is TextJSON:
                self._text(ev.text, out, ev.raw)  # type: ignore[union-attr]
            elif t is Text:
                self._text(ev.text, out)  # type: ignore[union-attr]
            elif t is Reasoning:
                self._reasoning(ev.text, out)  # type: ignore[union-attr]
            elif t is ToolCallStart:
                self._call_start(ev, out)  # type: ignore[arg-type]
            elif t is ToolCallArgs:
                self._call_args(ev.fragment, out)  # type: ignore[union-attr]
            elif t is ToolCallEnd:
                self._close(out)
            elif t is Usage:
                self._usage = ev  # type: ignore[assignment]
            elif t is Finish:
                self._finish = ev  # type: ignore[assignment]
            elif t is Note:
                self.notes.append(ev.text)  # type: ignore[union-attr]
                if self._stream:
                    out.append(encode_comment("toolmend " + ev.text))  # type: ignore[union-attr]
            elif t is Error:
                out.append(self.fail(ev.code or "upstream_error", ev.message))  # type: ignore
        return b"".join(out)

    def finish(self) -> bytes:
        """The reply ended: close the open item, then ``response.completed`` (or
        ``response.incomplete`` when the output cap or a filter cut it)."""
        if self.ended:
            return b""
        out: list[bytes] = []
        self._close(out)
        reason = self._finish.reason if self._finish else "stop"
        self._status = "incomplete" if reason in _INCOMPLETE else "completed"
        if self._stream:
            out.append(self._event(f"response.{self._status}", {"response": self.response()}))
        return b"".join(out)

    def fail(self, code: str, message: str) -> bytes:
        """The reply failed: ``response.failed`` with the error. An item still open is shown
        as ``incomplete``, with what it had; it gets no ``.done`` events."""
        if self.ended:
            return b""
        item = self._item
        if item is not None:
            self._item = None
            self._output.append(self._item_doc(item, "incomplete"))
        self._status = "failed"
        self._error = {"code": code, "message": message}
        if not self._stream:
            return b""
        return self._event("response.failed", {"response": self.response()})

    # --- items -------------------------------------------------------------------------------
    def _open(self, kind: str, prefix: str, out: list[bytes]) -> _Item:
        self._close(out)
        item = self._item = _Item(kind, self._new_id(prefix), len(self._output))
        return item

    def _text(self, text: str, out: list[bytes], raw: bytes | None = None) -> None:
        """``raw``: the text as a JSON string's body needing no escape (:class:`TextJSON`)."""
        item = self._item
        if item is None or item.kind != "message":
            item = self._open("message", "msg", out)
            if self._stream:
                out.append(self._added(item))
                out.append(self._event("response.content_part.added", {
                    "item_id": item.id, "output_index": item.index, "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": []}}))
        item.parts.append(text)
        if self._stream:
            out.append(self._delta(_TEXT_DELTA, item, b',"content_index":0', text,
                                   b',"logprobs":[]}\n\n', raw))

    def _reasoning(self, text: str, out: list[bytes]) -> None:
        item = self._item
        summary = self._summary
        if item is None or item.kind != "reasoning":
            item = self._open("reasoning", "rs", out)
            if self._stream:
                out.append(self._added(item))
                if summary:
                    out.append(self._event("response.reasoning_summary_part.added", {
                        "item_id": item.id, "output_index": item.index, "summary_index": 0,
                        "part": {"type": "summary_text", "text": ""}}))
                else:
                    out.append(self._event("response.content_part.added", {
                        "item_id": item.id, "output_index": item.index, "content_index": 0,
                        "part": {"type": "reasoning_text", "text": ""}}))
        item.parts.append(text)
        if self._stream:
            if summary:
                out.append(self._delta(_SUMMARY_DELTA, item, b',"summary_index":0', text,
                                       b"}\n\n"))
            else:
                out.append(self._delta(_REASONING_DELTA, item, b',"content_index":0', text,
                                       b"}\n\n"))

    def _call_start(self, ev: ToolCallStart, out: list[bytes]) -> None:
        item = self._open("function_call", "fc", out)
        item.name = ev.name
        item.call_id = ev.id or self._new_id("call")
        if self._stream:
            out.append(self._added(item))

    def _call_args(self, text: str, out: list[bytes]) -> None:
        item = self._item
        if item is None or item.kind != "function_call":
            return  # the decoder starts every call before its arguments
        item.parts.append(text)
        if self._stream:
            out.append(self._delta(_ARGS_DELTA, item, b"", text, b"}\n\n"))

    def _close(self, out: list[bytes]) -> None:
        item, self._item = self._item, None
        if item is None:
            return
        doc = self._item_doc(item, "completed")
        self._output.append(doc)
        if not self._stream:
            return
        base = {"item_id": item.id, "output_index": item.index}
        if item.kind == "message":
            part = doc["content"][0]
            out.append(self._event("response.output_text.done", {
                **base, "content_index": 0, "text": part["text"], "logprobs": []}))
            out.append(self._event("response.content_part.done", {
                **base, "content_index": 0, "part": part}))
        elif item.kind == "reasoning":
            if self._summary:
                part = doc["summary"][0]
                out.append(self._event("response.reasoning_summary_text.done", {
                    **base, "summary_index": 0, "text": part["text"]}))
                out.append(self._event("response.reasoning_summary_part.done", {
                    **base, "summary_index": 0, "part": part}))
            else:
                part = doc["content"][0]
                out.append(self._event("response.reasoning_text.done", {
                    **base, "content_index": 0, "text": part["text"]}))
                out.append(self._event("response.content_part.done", {
                    **base, "content_index": 0, "part": part}))
        else:
            out.append(self._event("response.function_call_arguments.done", {
                **base, "name": item.name, "arguments": doc["arguments"]}))
        out.append(self._event("response.output_item.done", {
            "output_index": item.index, "item": doc}))

    def _added(self, item: _Item) -> bytes:
        return self._event("response.output_item.added", {
            "output_index": item.index, "item": self._item_doc(item, "in_progress", empty=True)})

    def _item_doc(self, item: _Item, status: str, *, empty: bool = False) -> dict[str, Any]:
        text = "" if empty else "".join(item.parts)
        if item.kind == "message":
            return {"type": "message", "id": item.id, "status": status, "role": "assistant",
                    "content": [] if empty else [{"type": "output_text", "text": text,
                                                  "annotations": [], "logprobs": []}]}
        if item.kind == "function_call":
            return {"type": "function_call", "id": item.id, "call_id": item.call_id,
                    "name": item.name, "arguments": text, "status": status}
        doc: dict[str, Any] = {"type": "reasoning", "id": item.id, "summary": []}
        if not empty:
            if self._summary:
                doc["summary"] = [{"type": "summary_text", "text": text}]
            else:
                doc["content"] = [{"type": "reasoning_text", "text": text}]
            if self._seal is not None and status == "completed":
                doc["encrypted_content"] = self._seal(text)
        return doc

    def _delta(self, kind: bytes, item: _Item, index_field: bytes, text: str,
               tail: bytes, raw: bytes | None = None) -> bytes:
        """A delta event, the hot path: its bytes assembled around the one value that changes
        (the same JSON as :meth:`_event` would make, with no dict built and dumped); ``raw``,
        when given, is ``text`` as a JSON string's body already."""
        seq = self._seq
        self._seq += 1
        return b"".join((b"event: ", kind, b'\ndata: {"type":"', kind, b'","sequence_number":',
                         str(seq).encode(), b",", item.head, index_field, b',"delta":',
                         orjson.dumps(text) if raw is None else b'"' + raw + b'"', tail))

    def _event(self, kind: str, fields: dict[str, Any]) -> bytes:
        fields["type"] = kind
        fields["sequence_number"] = self._seq
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(fields) + b"\n\n"
