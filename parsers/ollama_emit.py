"""OpenAI SSE (as toolmend sends it to a client) in, Ollama NDJSON out, sans-I/O: the Ollama
front's encoder of reply events (``reply.py``).

When toolmend answers as an Ollama server, the request runs through the same pipeline as
``/v1/chat/completions``; this emitter sits where the client socket would be and rewrites the
mended stream: content and thinking as ``message`` lines as they arrive, each tool call as one
whole object (``arguments`` a JSON object) once it is complete, and the final ``done`` line with
token counts from the usage chunk and durations in nanoseconds. Non-streaming requests use the
same emitter in accumulating mode and get the one final object.

Durations are not measured here (no clocks in ``parsers/``): the caller passes them to
:meth:`OllamaEmitter.finish`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .ollama import done_reason_from_finish
from .reply import (
    ChatReplyDecoder,
    Error,
    Finish,
    Reasoning,
    ReplyEvent,
    Text,
    TextJSON,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)


@dataclass(slots=True)
class Durations:
    """Nanoseconds, as Ollama reports them. ``load`` is toolmend's queue wait (the closest
    thing to Ollama's model load: time before the backend started on the request)."""

    total: int = 0
    load: int = 0
    prompt_eval: int = 0
    eval: int = 0


@dataclass(slots=True)
class _Call:
    id: str
    name: str
    arguments: list[str]


def arguments_object(text: str) -> Any:
    """A call's arguments as the object Ollama clients expect.

    The mender guarantees JSON (unless the policy is ``pass``); text that still is not a JSON
    object is handed over as the raw string rather than dropped, so the failure is loud."""
    try:
        obj = orjson.loads(text) if text.strip() else {}
    except orjson.JSONDecodeError:
        return text
    return obj


class OllamaEmitter:
    """``feed`` client-bound SSE bytes, get NDJSON bytes; ``finish`` gives the closing line.

    The stream is read as reply events (:class:`~.reply.ChatReplyDecoder`); this class is the
    Ollama encoder of those events. ``kind`` is ``chat`` (``message`` objects) or ``generate``
    (``response`` text). With ``stream=False`` nothing is emitted until ``finish``, which
    returns the whole reply.
    """

    __slots__ = ("_call", "_content", "_created_at", "_emitted_calls", "_finish",
                 "_kind", "_model", "_out_calls", "_stream", "_text_head", "_text_tail",
                 "_thinking", "_usage",
                 "chunks", "decoder", "error")

    def __init__(self, kind: str, model: str, created_at: str, *, stream: bool = True) -> None:
        if kind not in ("chat", "generate"):
            raise ValueError(f"kind must be chat or generate, not {kind!r}")
        self._kind = kind
        self._model = model
        self._created_at = created_at
        self._stream = stream
        self.decoder = ChatReplyDecoder(splice_text=True)  # its events are this encoder's alone
        self._call: _Call | None = None  # the call being assembled
        self._out_calls: list[dict[str, Any]] = []
        self._emitted_calls = 0
        self._content: list[str] = []
        self._thinking: list[str] = []
        self._finish: str | None = None
        self._usage: Usage | None = None
        self.chunks = 0  # content/thinking pieces seen: the token estimate without usage
        # a streamed content line is these around the text (what _line writes, key for key)
        common = b'{"model":' + orjson.dumps(model) + b',"created_at":' + \
            orjson.dumps(created_at)
        if kind == "chat":
            self._text_head = common + b',"message":{"role":"assistant","content":'
            self._text_tail = b'},"done":false}\n'
        else:
            self._text_head = common + b',"response":'
            self._text_tail = b',"done":false}\n'
        self.error: str | None = None  # an in-stream error event that went by

    # --- input -------------------------------------------------------------------------------
    def feed(self, data: bytes) -> bytes:
        """Chat SSE bytes in (decoded by :attr:`decoder`), NDJSON out."""
        return self.feed_events(self.decoder.feed(data))

    def feed_events(self, events: list[ReplyEvent]) -> bytes:
        """Reply events in (the stream pipeline's output for this front), NDJSON out."""
        parts: list[bytes] = []
        self._events(events, parts)
        return b"".join(parts)

    def _events(self, events: list[ReplyEvent], parts: list[bytes]) -> None:
        for ev in events:
            kind = type(ev)
            if kind is Text or kind is TextJSON:
                self.chunks += 1
                if self._stream:  # the usual line, its fixed parts encoded once
                    # TextJSON's bytes are the JSON string's body as it is
                    value = orjson.dumps(ev.text) if kind is Text else \
                        b'"' + ev.raw + b'"'  # type: ignore[union-attr]
                    parts.append(self._text_head + value + self._text_tail)
                else:
                    self._content.append(ev.text)  # type: ignore[union-attr]
            elif kind is Reasoning:
                self.chunks += 1
                self._thinking.append(ev.text)
                self._line({"thinking": ev.text}, parts)
            elif kind is ToolCallStart:
                self._call = _Call(ev.id or f"call_{ev.index}", ev.name, [])
            elif kind is ToolCallArgs:
                if self._call is not None:
                    self._call.arguments.append(ev.fragment)
            elif kind is ToolCallEnd:
                self._emit_call(parts)
            elif kind is Usage:
                self._usage = ev
            elif kind is Finish:
                self._finish = ev.reason
            elif kind is Error:
                # a broken upstream event the relay passed on: the reply ends with Ollama's
                # error line, and nothing follows it (``finish`` adds no done line)
                self.error = ev.message
                if self._stream:
                    parts.append(self.error_line(ev.message))

    def _emit_call(self, parts: list[bytes]) -> None:
        """Ollama sends each tool call whole, ``arguments`` an object, once it is complete."""
        c, self._call = self._call, None
        if c is None:
            return
        obj = {"id": c.id, "function": {"index": self._emitted_calls, "name": c.name,
                                        "arguments": arguments_object("".join(c.arguments))}}
        self._emitted_calls += 1
        self._out_calls.append(obj)
        if self._kind == "chat":
            self._line({"content": "", "tool_calls": [obj]}, parts)

    def _line(self, fields: dict[str, Any], parts: list[bytes]) -> None:
        if not self._stream:
            return
        if self._kind == "chat":
            doc = {"model": self._model, "created_at": self._created_at,
                   "message": {"role": "assistant", "content": "", **fields}, "done": False}
        else:
            doc = {"model": self._model, "created_at": self._created_at,
                   "response": fields.get("content", ""), "done": False}
            if fields.get("thinking"):
                doc["thinking"] = fields["thinking"]
        parts.append(orjson.dumps(doc) + b"\n")

    # --- output ------------------------------------------------------------------------------
    @property
    def finish_reason(self) -> str | None:
        return self._finish

    def finish(self, durations: Durations | None = None) -> bytes:
        """The closing ``done: true`` line (streaming) or the whole reply object."""
        parts: list[bytes] = []
        if self.error is not None:
            return b""
        self._events(self.decoder.finish(), parts)
        if self.error is not None:
            return b"".join(parts)
        d = durations or Durations()
        usage = self._usage or Usage()
        prompt = usage.prompt_tokens
        completion = usage.completion_tokens
        doc: dict[str, Any] = {"model": self._model, "created_at": self._created_at}
        whole = not self._stream
        if self._kind == "chat":
            msg: dict[str, Any] = {"role": "assistant",
                                   "content": "".join(self._content) if whole else ""}
            if whole and self._thinking:
                msg["thinking"] = "".join(self._thinking)
            if whole and self._out_calls:
                msg["tool_calls"] = self._out_calls
            doc["message"] = msg
        else:
            doc["response"] = "".join(self._content) if whole else ""
            if whole and self._thinking:
                doc["thinking"] = "".join(self._thinking)
        doc.update({
            "done": True, "done_reason": done_reason_from_finish(self._finish),
            "total_duration": d.total, "load_duration": d.load,
            "prompt_eval_count": prompt if isinstance(prompt, int) else 0,
            "prompt_eval_duration": d.prompt_eval,
            "eval_count": completion if isinstance(completion, int) else
            self.chunks + self._emitted_calls,
            "eval_duration": d.eval,
        })
        parts.append(orjson.dumps(doc) + (b"\n" if self._stream else b""))
        return b"".join(parts)

    def error_line(self, message: str) -> bytes:
        """Ollama's in-stream failure: one ``{"error": ...}`` line."""
        return orjson.dumps({"error": message}) + b"\n"
