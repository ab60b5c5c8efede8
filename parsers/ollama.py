"""Ollama's native API shapes, translated to and from OpenAI Chat Completions, sans-I/O.

Both directions live here because they are one mapping read two ways:

- toolmend *as* an Ollama server: an Ollama ``/api/chat`` or ``/api/generate`` request becomes an
  OpenAI chat body (:func:`chat_request_to_openai`, :func:`generate_request_to_openai`), so it
  goes through exactly the same mending, validation and queueing as ``/v1/chat/completions``
  (the reply side is ``ollama_emit.py``);
- toolmend *in front of* Ollama's native API: an OpenAI chat body becomes an ``/api/chat`` body
  (:func:`openai_to_ollama_chat`) and Ollama's NDJSON reply becomes OpenAI chunk objects
  (:class:`NDJSONChunks`, :func:`ollama_reply_to_openai`), which the stream pipeline takes as
  they are, so the rest of the pipeline sees an ordinary OpenAI-compatible reply.

The differences that matter: Ollama sends a tool call's ``arguments`` as a JSON *object* and
each call whole, in one line; it has no call ids (newer versions send one, older ones do not),
so a tool result names its tool (``tool_name``) instead of a ``tool_call_id``; sampling
parameters sit in ``options``; token counts and durations (nanoseconds) come on the final
``done`` line rather than in a usage chunk.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson

from .sse import DONE_EVENT, encode_event

#: Ollama ``options`` keys with an OpenAI request parameter of the same meaning.
OPTION_TO_OPENAI = {
    "temperature": "temperature",
    "top_p": "top_p",
    "num_predict": "max_tokens",
    "stop": "stop",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
#: Ollama's "no limit" values for ``num_predict`` (-1 infinite, -2 fill the context).
UNLIMITED_PREDICT = (-1, -2)
NDJSON_MAX_LINE = 16 * 1024 * 1024


class OllamaRequestError(ValueError):
    """The Ollama-shaped request is malformed; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# --- finish reasons --------------------------------------------------------------------------
def done_reason_from_finish(finish: str | None) -> str:
    """Ollama says ``stop`` even when the reply is a tool call; only ``length`` differs."""
    return "length" if finish == "length" else "stop"


def finish_from_done_reason(reason: str | None, had_calls: bool) -> str:
    if had_calls:
        return "tool_calls"
    return "length" if reason == "length" else "stop"


# --- Ollama request -> OpenAI body (toolmend as an Ollama server) ----------------------------
def options_to_openai(options: Any, out: dict[str, Any]) -> None:
    """Copy the ``options`` that OpenAI has a parameter for into ``out``; drop the rest
    (``num_ctx``, ``repeat_penalty``...: the serving process owns them)."""
    if options is None:
        return
    if not isinstance(options, dict):
        raise OllamaRequestError("'options' must be an object", "options")
    for key, target in OPTION_TO_OPENAI.items():
        v = options.get(key)
        if v is None:
            continue
        if key == "num_predict":
            if not isinstance(v, int) or isinstance(v, bool):
                raise OllamaRequestError("options.num_predict must be an integer",
                                         "options.num_predict")
            if v in UNLIMITED_PREDICT or v == 0:
                continue
            if v < 0:
                raise OllamaRequestError("options.num_predict must be positive, -1 or -2",
                                         "options.num_predict")
        elif key == "stop":
            if isinstance(v, str):
                v = [v]
            if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
                raise OllamaRequestError("options.stop must be a list of strings", "options.stop")
            if not v:
                continue
        elif key == "seed":
            if not isinstance(v, int) or isinstance(v, bool):
                raise OllamaRequestError("options.seed must be an integer", "options.seed")
        elif not isinstance(v, int | float) or isinstance(v, bool):
            raise OllamaRequestError(f"options.{key} must be a number", f"options.{key}")
        out[target] = v


def format_to_openai(fmt: Any) -> dict[str, Any] | None:
    """``format: "json"`` is JSON mode; ``format: {schema}`` is structured output."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt}}
    raise OllamaRequestError("'format' must be \"json\" or a JSON Schema object", "format")


def _image_url(data: Any, where: str) -> dict[str, Any]:
    """Ollama images are bare base64; OpenAI wants a data URL, so sniff the type."""
    if not isinstance(data, str) or not data:
        raise OllamaRequestError(f"{where} must be a base64 string", where)
    if data.startswith("data:"):
        url = data
    else:
        try:
            head = base64.b64decode(data[:16] + "=" * (-len(data[:16]) % 4))
        except (binascii.Error, ValueError):
            head = b""
        mime = "image/png" if head.startswith(b"\x89PNG") else (
            "image/gif" if head.startswith(b"GIF8") else (
                "image/webp" if head[8:12] == b"WEBP" else "image/jpeg"))
        url = f"data:{mime};base64,{data}"
    return {"type": "image_url", "image_url": {"url": url}}


def _content_with_images(text: Any, images: Any, where: str) -> Any:
    if text is not None and not isinstance(text, str):
        raise OllamaRequestError(f"{where}.content must be a string", f"{where}.content")
    if not images:
        return text if text is not None else ""
    if not isinstance(images, list):
        raise OllamaRequestError(f"{where}.images must be an array", f"{where}.images")
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    parts += [_image_url(im, f"{where}.images[{i}]") for i, im in enumerate(images)]
    return parts


def _arguments_text(args: Any) -> str:
    if isinstance(args, str):
        return args
    try:
        return orjson.dumps(args if args is not None else {}).decode()
    except TypeError:  # orjson stops at 255 levels of nesting and at integers past 64 bits
        return _dumps_iteratively(args)


def _dumps_iteratively(value: Any) -> str:
    """JSON text of a decoded value of any depth, without recursion (``json.dumps`` recurses,
    and arguments an upstream nests 1,000 levels deep would end in ``RecursionError``). The
    text is faithful; the mender then refuses what nests deeper than its limit."""
    import json

    out: list[str] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Token):
            out.append(item.text)
        elif isinstance(item, dict):
            out.append("{")
            stack.append(_Token("}"))
            for k, (key, v) in reversed(list(enumerate(item.items()))):
                stack.append(v)
                stack.append(_Token(("," if k else "") + json.dumps(str(key),
                                                                    ensure_ascii=False) + ":"))
        elif isinstance(item, list | tuple):
            out.append("[")
            stack.append(_Token("]"))
            for k, v in reversed(list(enumerate(item))):
                stack.append(v)
                if k:
                    stack.append(_Token(","))
        else:
            out.append(json.dumps(item, ensure_ascii=False))
    return "".join(out)


class _Token:
    """Literal text on :func:`_dumps_iteratively`'s stack (never a decoded value)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def messages_to_openai(messages: Any) -> list[dict[str, Any]]:
    """Ollama chat history to OpenAI messages.

    Ollama's history has no call ids (or ids of its own), while OpenAI templates pair each tool
    result with its call by ``tool_call_id``: ids are made up for the calls that lack one and
    each tool result is paired with the earliest unanswered call of its ``tool_name`` (else the
    earliest unanswered call), which is the order agents append results in.
    """
    if not isinstance(messages, list):
        raise OllamaRequestError("'messages' must be an array", "messages")
    out: list[dict[str, Any]] = []
    open_calls: list[tuple[str, str]] = []  # (id, name) of calls not yet answered
    n_ids = 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise OllamaRequestError(f"{where} must be an object", where)
        role = m.get("role")
        if not isinstance(role, str):
            raise OllamaRequestError(f"{where}.role is required", f"{where}.role")
        msg: dict[str, Any] = {"role": role,
                               "content": _content_with_images(m.get("content"), m.get("images"),
                                                               where)}
        if role == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise OllamaRequestError(f"{where}.tool_calls must be an array",
                                         f"{where}.tool_calls")
            tcs = []
            for j, tc in enumerate(calls):
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise OllamaRequestError(f"{where}.tool_calls[{j}].function.name is required",
                                             f"{where}.tool_calls[{j}]")
                cid = tc.get("id") if isinstance(tc.get("id"), str) and tc["id"] else None
                if cid is None:
                    n_ids += 1
                    cid = f"call_{n_ids}"
                open_calls.append((cid, fn["name"]))
                tcs.append({"id": cid, "type": "function",
                            "function": {"name": fn["name"],
                                         "arguments": _arguments_text(fn.get("arguments"))}})
            msg["tool_calls"] = tcs
            if not msg["content"]:
                msg["content"] = None
        elif role == "tool":
            name = m.get("tool_name") or m.get("name")
            cid = m.get("tool_call_id")
            if not isinstance(cid, str) or not cid:
                pick = next((k for k, (_, n) in enumerate(open_calls) if n == name), None)
                if pick is None and open_calls:
                    pick = 0
                if pick is not None:
                    cid = open_calls.pop(pick)[0]
                else:
                    n_ids += 1
                    cid = f"call_{n_ids}"
            else:
                open_calls = [c for c in open_calls if c[0] != cid]
            msg["tool_call_id"] = cid
            if isinstance(name, str) and name:
                msg["name"] = name
        out.append(msg)
    return out


def _common_to_openai(body: dict[str, Any], out: dict[str, Any]) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise OllamaRequestError("'model' must be a string", "model")
    if model:
        out["model"] = model
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise OllamaRequestError("'stream' must be a boolean", "stream")
    out["stream"] = stream
    options_to_openai(body.get("options"), out)
    rf = format_to_openai(body.get("format"))
    if rf is not None:
        out["response_format"] = rf


def chat_request_to_openai(body: dict[str, Any]) -> dict[str, Any]:
    """An Ollama ``/api/chat`` body as an OpenAI chat body (``stream`` as Ollama means it:
    true unless said otherwise)."""
    out: dict[str, Any] = {}
    _common_to_openai(body, out)
    out["messages"] = messages_to_openai(body.get("messages") or [])
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise OllamaRequestError("'tools' must be an array", "tools")
        out["tools"] = [t if t.get("type") else {**t, "type": "function"} for t in tools
                        if isinstance(t, dict)]
    return out


def generate_request_to_openai(body: dict[str, Any]) -> dict[str, Any]:
    """An Ollama ``/api/generate`` body as an OpenAI chat body: ``system`` and ``prompt``
    become the two messages (the backend's chat template applies, as Ollama's own does)."""
    out: dict[str, Any] = {}
    _common_to_openai(body, out)
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise OllamaRequestError("'prompt' must be a string", "prompt")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise OllamaRequestError("'system' must be a string", "system")
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user",
                     "content": _content_with_images(prompt or "", body.get("images"), "body")})
    out["messages"] = messages
    return out


# --- OpenAI body -> Ollama /api/chat (toolmend in front of Ollama's native API) --------------
def _keep_alive_value(keep_alive: str) -> Any:
    """``-1`` and plain numbers go as numbers (seconds), durations like ``30m`` as text."""
    try:
        return int(keep_alive)
    except ValueError:
        try:
            return float(keep_alive)
        except ValueError:
            return keep_alive


def _content_to_ollama(content: Any) -> tuple[str, list[str]]:
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    images: list[str] = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            if isinstance(url, str) and url.startswith("data:") and "," in url:
                images.append(url.split(",", 1)[1])
    return "".join(texts), images


def _arguments_object(text: Any) -> Any:
    if not isinstance(text, str):
        return text if text is not None else {}
    try:
        return orjson.loads(text) if text.strip() else {}
    except orjson.JSONDecodeError:
        return text


def openai_messages_to_ollama(messages: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool_call_id -> tool name, for the results that follow
    for m in messages if isinstance(messages, list) else ():
        if not isinstance(m, dict):
            continue
        role = m.get("role")
        text, images = _content_to_ollama(m.get("content"))
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role,
                               "content": text}
        if images:
            msg["images"] = images
        thinking = m.get("reasoning_content") or m.get("reasoning")
        if role == "assistant" and isinstance(thinking, str) and thinking:
            msg["thinking"] = thinking  # reasoning carried back in the history
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for tc in m["tool_calls"]:
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(fn, dict):
                    continue
                if isinstance(tc.get("id"), str):
                    names[tc["id"]] = fn.get("name", "")
                calls.append({"function": {"name": fn.get("name", ""),
                                           "arguments": _arguments_object(fn.get("arguments"))}})
            msg["tool_calls"] = calls
        elif role == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id") or "")
            if name:
                msg["tool_name"] = name
        out.append(msg)
    return out


def openai_to_ollama_chat(body: dict[str, Any], *, keep_alive: str = "",
                          default_model: str | None = None) -> dict[str, Any]:
    """An OpenAI chat body as an Ollama ``/api/chat`` body."""
    out: dict[str, Any] = {"model": body.get("model") or default_model or "",
                           "messages": openai_messages_to_ollama(body.get("messages")),
                           "stream": body.get("stream") is True}
    tools = body.get("tools")
    if tools and body.get("tool_choice") != "none":
        out["tools"] = tools
    options: dict[str, Any] = {}
    for key, target in OPTION_TO_OPENAI.items():
        v = body.get(target)
        if key == "num_predict":  # the newer name wins, as on vLLM; a null one does not
            mct = body.get("max_completion_tokens")
            if isinstance(mct, int) and not isinstance(mct, bool):
                v = mct
        if v is not None:
            options[key] = [v] if key == "stop" and isinstance(v, str) else v
    if isinstance(body.get("top_k"), int):
        options["top_k"] = body["top_k"]
    if options:
        out["options"] = options
    rf = body.get("response_format")
    if isinstance(rf, dict):
        if rf.get("type") == "json_object":
            out["format"] = "json"
        elif rf.get("type") == "json_schema":
            schema = (rf.get("json_schema") or {}).get("schema")
            if isinstance(schema, dict):
                out["format"] = schema
    kwargs = body.get("chat_template_kwargs")  # the thinking switch, as Ollama's "think"
    if isinstance(kwargs, dict) and isinstance(kwargs.get("enable_thinking"), bool):
        out["think"] = kwargs["enable_thinking"]
    fmt = body.get("format")  # a constrained retry for Ollama sets it (parsers/policy.py)
    if fmt == "json" or isinstance(fmt, dict):
        out["format"] = fmt
    if keep_alive:
        out["keep_alive"] = _keep_alive_value(keep_alive)
    return out


# --- Ollama reply -> OpenAI (toolmend in front of Ollama's native API) -----------------------
def _usage(doc: dict[str, Any]) -> dict[str, int]:
    p = doc.get("prompt_eval_count")
    c = doc.get("eval_count")
    p = p if isinstance(p, int) else 0
    c = c if isinstance(c, int) else 0
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _openai_calls(calls: Any, first_index: int, id_prefix: str) -> list[dict[str, Any]]:
    out = []
    for k, tc in enumerate(calls if isinstance(calls, list) else ()):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict):
            continue
        i = first_index + k
        cid = tc.get("id") if isinstance(tc.get("id"), str) and tc["id"] else f"{id_prefix}{i}"
        out.append({"index": i, "id": cid, "type": "function",
                    "function": {"name": fn.get("name", ""),
                                 "arguments": _arguments_text(fn.get("arguments"))}})
    return out


def ollama_reply_to_openai(doc: dict[str, Any], completion_id: str, created: int,
                           id_prefix: str = "call_") -> dict[str, Any]:
    """A non-streaming ``/api/chat`` answer as a ``chat.completion`` object."""
    m = doc.get("message") if isinstance(doc.get("message"), dict) else {}
    calls = _openai_calls(m.get("tool_calls"), 0, id_prefix)
    msg: dict[str, Any] = {"role": "assistant", "content": m.get("content") or None}
    if calls:
        msg["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
    if m.get("thinking"):
        msg["reasoning_content"] = m["thinking"]
    return {"id": completion_id, "object": "chat.completion", "created": created,
            "model": doc.get("model") or "",
            "choices": [{"index": 0, "message": msg,
                         "finish_reason": finish_from_done_reason(doc.get("done_reason"),
                                                                  bool(calls))}],
            "usage": _usage(doc)}


class NDJSONLines:
    """Split a byte stream into complete lines, whatever the chunking (a line is only handed
    out once its newline arrived, so a UTF-8 sequence is never cut)."""

    __slots__ = ("_max", "_parts", "_size")

    def __init__(self, max_line_bytes: int = NDJSON_MAX_LINE) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._max = max_line_bytes

    def feed(self, data: bytes) -> list[bytes]:
        if b"\n" not in data:
            if data:
                self._parts.append(data)
                self._size += len(data)
                if self._size > self._max:
                    self._parts, self._size = [], 0  # its memory goes back at once
                    raise ValueError(f"NDJSON line longer than {self._max} bytes")
            return []
        lines = data.split(b"\n")
        if self._parts:
            self._parts.append(lines[0])
            lines[0] = b"".join(self._parts)
            self._parts.clear()
        tail = lines.pop()
        if tail:
            self._parts.append(tail)
        self._size = len(tail)
        return [ln for ln in (x.strip() for x in lines) if ln]

    def finish(self) -> list[bytes]:
        rest = b"".join(self._parts).strip()
        self._parts.clear()
        self._size = 0
        return [rest] if rest else []


class NDJSONChunks:
    """Ollama's streaming ``/api/chat`` NDJSON in, OpenAI ``chat.completion.chunk`` objects out.

    Each content line becomes a content delta, ``thinking`` a ``reasoning_content`` delta, each
    whole tool call a start delta carrying all of its arguments (index counted across the
    reply, so parallel calls get distinct indexes), and the ``done`` line the finish chunk and
    a usage chunk from its counts. An ``{"error": ...}`` line becomes an ``{"error": ...}``
    object, which the stream pipeline turns into the client's in-stream error.

    Objects, not SSE: the pipeline takes them as they are (``StreamPipeline.feed_chunks``), so
    a reply from Ollama is parsed once, as NDJSON, and never encoded as SSE to be decoded again.
    """

    __slots__ = ("_calls", "_cid", "_created", "_done", "_id_prefix", "_lines", "_model",
                 "_started")

    def __init__(self, completion_id: str, created: int, model: str = "",
                 id_prefix: str = "call_", max_line_bytes: int = NDJSON_MAX_LINE) -> None:
        self._cid = completion_id
        self._created = created
        self._model = model
        self._id_prefix = id_prefix
        self._lines = NDJSONLines(max_line_bytes)
        self._calls = 0
        self._started = False
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        try:
            lines = self._lines.feed(data)
        except ValueError as e:  # the line bound: what a stream without newlines runs into
            return [self._error(f"upstream sent an {e} (max_upstream_event_bytes)",
                                "upstream_event_too_large")]
        out: list[dict[str, Any]] = []
        for ln in lines:
            self._line(ln, out)
        return out

    def finish(self) -> list[dict[str, Any]]:
        """End of the upstream body; a stream cut before ``done`` yields no finish (the relay
        reports it as incomplete)."""
        out: list[dict[str, Any]] = []
        for ln in self._lines.finish():
            self._line(ln, out)
        return out

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None,
               usage: dict[str, int] | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {"id": self._cid, "object": "chat.completion.chunk",
                               "created": self._created, "model": self._model,
                               "choices": [] if delta is None else
                               [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            doc["usage"] = usage
        return doc

    def _error(self, message: str, code: str) -> dict[str, Any]:
        self._done = True
        return {"error": {"message": message, "type": "upstream_error", "param": None,
                          "code": code}}

    def _line(self, line: bytes, out: list[dict[str, Any]]) -> None:
        if self._done:
            return
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            preview = line[:80].decode("utf-8", "replace")
            out.append(self._error(f"upstream sent a malformed NDJSON line: {preview!r}",
                                   "upstream_malformed_event"))
            return
        if not isinstance(doc, dict):
            out.append(self._error("upstream sent an NDJSON line that is not an object",
                                   "upstream_malformed_event"))
            return
        if doc.get("error") is not None:
            err = doc["error"]
            out.append(self._error(err if isinstance(err, str) else orjson.dumps(err).decode(),
                                   "upstream_error"))
            return
        if isinstance(doc.get("model"), str) and not self._model:
            self._model = doc["model"]
        if not self._started:
            self._started = True
            out.append(self._chunk({"role": "assistant", "content": ""}))
        m = doc.get("message") if isinstance(doc.get("message"), dict) else {}
        if m.get("thinking"):
            out.append(self._chunk({"reasoning_content": m["thinking"]}))
        if m.get("content"):
            out.append(self._chunk({"content": m["content"]}))
        calls = _openai_calls(m.get("tool_calls"), self._calls, self._id_prefix)
        if calls:
            self._calls += len(calls)
            out.append(self._chunk({"tool_calls": calls}))
        if doc.get("done") is True:
            self._done = True
            out.append(self._chunk({}, finish_from_done_reason(doc.get("done_reason"),
                                                               self._calls > 0)))
            out.append(self._chunk(None, usage=_usage(doc)))


class NDJSONToSSE(NDJSONChunks):
    """The same translation as SSE bytes, ``[DONE]`` after the ``done`` line: for a reader of
    OpenAI streams (the proxy itself takes the objects)."""

    __slots__ = ()

    def feed(self, data: bytes) -> bytes:  # type: ignore[override]
        return self._sse(super().feed(data))

    def finish(self) -> bytes:  # type: ignore[override]
        return self._sse(super().finish())

    def _sse(self, chunks: list[dict[str, Any]]) -> bytes:
        parts = [encode_event(orjson.dumps(c)) for c in chunks]
        if parts and self._done and "error" not in chunks[-1]:
            parts.append(DONE_EVENT)
        return b"".join(parts)
