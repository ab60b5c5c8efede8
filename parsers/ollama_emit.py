"""OpenAI SSE (as toolmend sends it to a client) in, Ollama NDJSON out, sans-I/O.

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
from .sse import DONE, SSEComment, SSEDecoder


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

    ``kind`` is ``chat`` (``message`` objects) or ``generate`` (``response`` text). With
    ``stream=False`` nothing is emitted until ``finish``, which returns the whole reply.
    """

    __slots__ = ("_calls", "_content", "_created_at", "_decoder", "_emitted_calls", "_finish",
                 "_kind", "_model", "_out_calls", "_stream", "_thinking", "_usage",
                 "chunks", "error")

    def __init__(self, kind: str, model: str, created_at: str, *, stream: bool = True) -> None:
        if kind not in ("chat", "generate"):
            raise ValueError(f"kind must be chat or generate, not {kind!r}")
        self._kind = kind
        self._model = model
        self._created_at = created_at
        self._stream = stream
        self._decoder = SSEDecoder()
        self._calls: dict[int, _Call] = {}
        self._out_calls: list[dict[str, Any]] = []
        self._emitted_calls = 0
        self._content: list[str] = []
        self._thinking: list[str] = []
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self.chunks = 0  # content/thinking pieces seen: the token estimate without usage
        self.error: str | None = None  # an in-stream error event that went by

    # --- input -------------------------------------------------------------------------------
    def feed(self, data: bytes) -> bytes:
        parts: list[bytes] = []
        for ev in self._decoder.feed(data):
            if type(ev) is SSEComment or ev.data == DONE:
                continue  # keep-alives and repair notes have no NDJSON form
            try:
                obj = orjson.loads(ev.data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                self._chunk(obj, parts)
        return b"".join(parts)

    def _chunk(self, obj: dict[str, Any], parts: list[bytes]) -> None:
        if obj.get("error") is not None:
            err = obj["error"]
            self.error = err.get("message") if isinstance(err, dict) else str(err)
            return
        if isinstance(obj.get("usage"), dict):
            self._usage = obj["usage"]
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            thinking = delta.get("reasoning_content") or delta.get("reasoning")
            if thinking:
                self.chunks += 1
                self._thinking.append(thinking)
                self._line({"thinking": thinking}, parts)
            if delta.get("content"):
                self.chunks += 1
                self._content.append(delta["content"])
                self._line({"content": delta["content"]}, parts)
            for tc in delta.get("tool_calls") or ():
                self._tool_delta(tc, parts)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
                self._flush_calls(None, parts)

    def _tool_delta(self, tc: Any, parts: list[bytes]) -> None:
        if not isinstance(tc, dict):
            return
        index = tc.get("index", 0)
        fn = tc.get("function") or {}
        call = self._calls.get(index)
        if call is None:
            # a new call: every lower-indexed one is complete, so it can go out now
            self._flush_calls(index, parts)
            call = self._calls[index] = _Call(tc.get("id") or f"call_{index}", "", [])
        elif tc.get("id") and not call.id:
            call.id = tc["id"]
        if fn.get("name"):
            call.name += fn["name"]
        if fn.get("arguments"):
            call.arguments.append(fn["arguments"])

    def _flush_calls(self, below: int | None, parts: list[bytes]) -> None:
        ready = sorted(i for i in self._calls if below is None or i < below)
        if not ready:
            return
        objs = []
        for i in ready:
            c = self._calls.pop(i)
            objs.append({"id": c.id, "function": {"index": self._emitted_calls, "name": c.name,
                                                  "arguments": arguments_object(
                                                      "".join(c.arguments))}})
            self._emitted_calls += 1
        self._out_calls += objs
        if self._kind == "chat":
            self._line({"content": "", "tool_calls": objs}, parts)

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
        self._flush_calls(None, parts)
        d = durations or Durations()
        usage = self._usage or {}
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
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
