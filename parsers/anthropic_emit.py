"""Reply events in, Anthropic Messages out (the SSE event sequence, or the whole message), sans-I/O.

The Anthropic front reads the mended chat stream through ``ChatReplyDecoder`` and hands the
events here. A streamed reply is the documented sequence::

    message_start
      content_block_start / content_block_delta* / content_block_stop   (per block)
    message_delta   (stop_reason, stop_sequence, usage)
    message_stop

with ``ping`` events while the request waits (the front sends them: :meth:`ping`), and an
``error`` event as the last one when the reply fails. Blocks are ``text`` (``text_delta``),
``tool_use`` (``input_json_delta``; the id is a fresh ``toolu_...``) and, when the request
asked for thinking, ``thinking`` (``thinking_delta``, then one ``signature_delta`` when the
block ends, because the signature covers the whole text). Reasoning the request did not ask
for is not shown.

``message_start`` cannot know the prompt's token count yet (the backend reports usage at the
end): it carries the front's estimate, and ``message_delta`` the real counts (cumulative, which
is how the SDKs read them).

Whole (non-streaming) replies run the same state machine in accumulating mode;
:meth:`MessagesEncoder.message` is the reply object.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import orjson

from .anthropic_wire import Mac, thinking_signature
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

#: Anthropic's error types by HTTP status (the status toolmend would answer with).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
               408: "timeout_error", 413: "request_too_large", 415: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 503: "overloaded_error",
               504: "timeout_error", 529: "overloaded_error"}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, extra: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    """``{"type": "error", "error": {"type", "message"}}``; ``extra`` adds toolmend's own
    fields (``code``, and for an invalid tool call ``tool`` and ``pointer``), which Anthropic
    clients ignore and people read."""
    err: dict[str, Any] = {"type": error_type(status), "message": message}
    if extra:
        err.update({k: v for k, v in extra.items() if v is not None and k not in err})
    return {"type": "error", "error": err}


#: a streamed text delta around its index and its text (what ``sse`` makes of it, key for key)
_TEXT_DELTA_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
_TEXT_DELTA_MID = b',"delta":{"type":"text_delta","text":"'
_TEXT_DELTA_TAIL = b'"}}\n\n'


def sse(name: bytes, obj: dict[str, Any]) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def stop_reason(finish: Finish | None, had_tool_use: bool,
                stop_sequences: tuple[str, ...]) -> tuple[str, str | None]:
    """``stop_reason`` and ``stop_sequence`` from the chat finish reason."""
    reason = finish.reason if finish is not None else "stop"
    if reason == "length":
        return "max_tokens", None
    if reason in ("tool_calls", "function_call") or had_tool_use:
        return "tool_use", None
    if reason == "content_filter":
        return "refusal", None
    seq = finish.stop_sequence if finish is not None else None
    if seq is not None and seq in stop_sequences:
        return "stop_sequence", seq
    return "end_turn", None


class MessagesEncoder:
    """``feed`` reply events, get Anthropic SSE bytes (or, with ``stream=False``, nothing until
    :meth:`message`). ``mac`` signs thinking text; ``new_tool_id`` makes ``toolu_`` ids."""

    __slots__ = ("_block", "_blocks", "_done", "_finish", "_hide", "_index", "_input_estimate",
                 "_mac", "_model", "_new_tool_id", "_pieces", "_started", "_stops", "_stream",
                 "_thinking", "_thought", "_tool_use", "_usage", "failure", "id", "notes")

    def __init__(self, message_id: str, model: str, *, mac: Mac,
                 new_tool_id: Callable[[], str], stream: bool = True, thinking: bool = False,
                 hide_thinking: bool = False, stop_sequences: tuple[str, ...] = (),
                 input_estimate: int = 0) -> None:
        self.id = message_id
        self._model = model
        self._mac = mac
        self._new_tool_id = new_tool_id
        self._stream = stream
        self._thinking = thinking
        self._hide = hide_thinking
        self._stops = stop_sequences
        self._input_estimate = input_estimate
        self._started = False  # message_start went out
        self._done = False  # an error ended the reply
        self._index = -1  # the open block's index
        self._block: dict[str, Any] | None = None  # the open block (whole mode: in _blocks)
        self._blocks: list[dict[str, Any]] = []  # whole mode: the content
        self._thought: list[str] = []  # the open thinking block's text, for its signature
        self._tool_use = False
        self._finish: Finish | None = None
        self._usage: Usage | None = None
        self._pieces = 0  # text, reasoning and argument pieces: the count when usage is missing
        self.notes: list[str] = []  # repair notes (whole mode puts them in a header)
        #: an error the stream itself carried (a malformed upstream chunk): the reply failed,
        #: and a whole reply is answered with it instead of a half message
        self.failure: Error | None = None

    # --- input ---------------------------------------------------------------------------------
    def feed(self, events: Iterable[ReplyEvent]) -> bytes:
        parts: list[bytes] = []
        for ev in events:
            if self._done:
                break
            if isinstance(ev, TextJSON):
                self._text(ev.text, parts, ev.raw)
            elif isinstance(ev, Text):
                self._text(ev.text, parts)
            elif isinstance(ev, ToolCallArgs):
                self._args(ev.fragment, parts)
            elif isinstance(ev, Reasoning):
                self._reasoning(ev.text, parts)
            elif isinstance(ev, ToolCallStart):
                self._tool_start(ev, parts)
            elif isinstance(ev, ToolCallEnd):
                self._close(parts)
            elif isinstance(ev, Usage):
                self._usage = ev
            elif isinstance(ev, Finish):
                self._close(parts)
                self._finish = ev
            elif isinstance(ev, Note):
                self.notes.append(ev.text)
                if self._stream:
                    note = ev.text.replace("\n", " ").replace("\r", " ")
                    parts.append(b": toolmend " + note.encode() + b"\n\n")
            elif isinstance(ev, Error):
                self.failure = ev
                parts.append(self.error(ev.status, ev.message, {"code": ev.code}))
        return b"".join(parts)

    def _start(self, parts: list[bytes]) -> None:
        if self._started:
            return
        self._started = True
        if self._stream:
            msg = {"id": self.id, "type": "message", "role": "assistant", "model": self._model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self._input_estimate, "output_tokens": 0}}
            parts.append(sse(b"message_start", {"type": "message_start", "message": msg}))

    def _open(self, block: dict[str, Any], parts: list[bytes]) -> None:
        self._close(parts)
        self._start(parts)
        self._index += 1
        self._block = block
        if self._stream:
            parts.append(sse(b"content_block_start", {"type": "content_block_start",
                                                      "index": self._index,
                                                      "content_block": block}))
        else:
            self._blocks.append(block)

    def _delta(self, delta: dict[str, Any], parts: list[bytes]) -> None:
        parts.append(sse(b"content_block_delta", {"type": "content_block_delta",
                                                  "index": self._index, "delta": delta}))

    def _close(self, parts: list[bytes]) -> None:
        block = self._block
        if block is None:
            return
        self._block = None
        kind = block["type"]
        if kind == "thinking":
            text = "".join(self._thought)
            self._thought.clear()
            sig = thinking_signature(text, self._mac, hidden=self._hide)
            if self._stream:
                self._delta({"type": "signature_delta", "signature": sig}, parts)
            else:
                block["thinking"] = "" if self._hide else text
                block["signature"] = sig
        elif not self._stream:
            if kind == "text":
                block["text"] = "".join(block.pop("_parts"))
            elif kind == "tool_use":
                block["input"] = _input_object("".join(block.pop("_parts")))
        if self._stream:
            parts.append(sse(b"content_block_stop", {"type": "content_block_stop",
                                                     "index": self._index}))

    def _text(self, text: str, parts: list[bytes], raw: bytes | None = None) -> None:
        """``raw``: the text as a JSON string's body needing no escape (:class:`TextJSON`); a
        streamed delta is then assembled around it (the bytes ``sse`` would make, with no dict
        built and dumped)."""
        if not text:
            return
        self._pieces += 1
        block = self._block
        if block is None or block["type"] != "text":
            self._open({"type": "text", "text": ""} if self._stream
                       else {"type": "text", "text": "", "_parts": []}, parts)
            block = self._block
        if self._stream:
            if raw is None:
                self._delta({"type": "text_delta", "text": text}, parts)
            else:
                parts.append(b"".join((_TEXT_DELTA_HEAD, str(self._index).encode(),
                                       _TEXT_DELTA_MID, raw, _TEXT_DELTA_TAIL)))
        else:
            block["_parts"].append(text)  # type: ignore[index]

    def _reasoning(self, text: str, parts: list[bytes]) -> None:
        if not text:
            return
        self._pieces += 1
        if not self._thinking:
            return  # the request did not ask for thinking: not shown
        block = self._block
        if block is None or block["type"] != "thinking":
            self._open({"type": "thinking", "thinking": "", "signature": ""}, parts)
        self._thought.append(text)
        if self._stream and not self._hide:
            self._delta({"type": "thinking_delta", "thinking": text}, parts)

    def _tool_start(self, ev: ToolCallStart, parts: list[bytes]) -> None:
        self._tool_use = True
        block: dict[str, Any] = {"type": "tool_use", "id": self._new_tool_id(),
                                 "name": ev.name, "input": {}}
        if not self._stream:
            block["_parts"] = []
        self._open(block, parts)

    def _args(self, text: str, parts: list[bytes]) -> None:
        block = self._block
        if not text or block is None or block["type"] != "tool_use":
            return
        self._pieces += 1
        if self._stream:
            self._delta({"type": "input_json_delta", "partial_json": text}, parts)
        else:
            block["_parts"].append(text)

    # --- output --------------------------------------------------------------------------------
    def ping(self) -> bytes:
        """A ``ping`` while the request waits (after ``message_start``, as Anthropic sends)."""
        parts: list[bytes] = []
        self._start(parts)
        parts.append(b'event: ping\ndata: {"type":"ping"}\n\n')
        return b"".join(parts)

    def error(self, status: int, message: str, extra: dict[str, Any] | None = None) -> bytes:
        """The in-stream ``error`` event; the reply ends with it."""
        self._done = True
        return sse(b"error", error_body(status, message, extra))

    def _usage_doc(self) -> dict[str, Any]:
        u = self._usage
        prompt = u.prompt_tokens if u is not None and u.prompt_tokens is not None \
            else self._input_estimate
        cached = u.cached_tokens if u is not None and u.cached_tokens else 0
        output = u.completion_tokens if u is not None and u.completion_tokens is not None \
            else self._pieces
        return {"input_tokens": max(0, prompt - cached), "output_tokens": output,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}

    def finish(self) -> bytes:
        """Streaming: the closing events (``message_delta`` with the stop reason and usage,
        ``message_stop``); nothing after an error."""
        if self._done:
            return b""
        parts: list[bytes] = []
        self._close(parts)
        self._start(parts)
        self._done = True
        reason, seq = stop_reason(self._finish, self._tool_use, self._stops)
        parts.append(sse(b"message_delta", {"type": "message_delta",
                                            "delta": {"stop_reason": reason,
                                                      "stop_sequence": seq},
                                            "usage": self._usage_doc()}))
        parts.append(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
        return b"".join(parts)

    def message(self) -> dict[str, Any]:
        """Whole mode: the reply object."""
        self._close([])
        reason, seq = stop_reason(self._finish, self._tool_use, self._stops)
        return {"id": self.id, "type": "message", "role": "assistant", "model": self._model,
                "content": self._blocks, "stop_reason": reason, "stop_sequence": seq,
                "usage": self._usage_doc()}


def _input_object(text: str) -> Any:
    """A call's arguments as the ``input`` object. The mender guarantees a JSON object (unless
    the policy is ``pass``); anything else is handed over raw rather than dropped, so the failure
    is loud."""
    if not text.strip():
        return {}
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
