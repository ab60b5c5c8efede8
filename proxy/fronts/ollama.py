"""toolmend answering as an Ollama server, whatever stack is behind it.

Many agent setups speak Ollama's native API. Rather than a second pipeline, each ``/api/chat``
and ``/api/generate`` request is translated into an OpenAI chat body and handed to the same
``forward`` (``pipeline/forward.py``) as ``/v1/chat/completions`` (so repair, validation, fair
queuing and tracing all apply), with one difference: the client writer is
:class:`OllamaDownstream`, which rewrites the mended OpenAI stream as Ollama NDJSON
(``parsers/ollama_emit.py``). Non-streaming requests run the same streaming path and are
answered with the accumulated object, as Ollama itself does.

Errors take Ollama's shape, ``{"error": "text"}``, with the real status before the reply starts
and as an ``{"error": ...}`` line after.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from typing import Any

import orjson
from aiohttp import web

from toolmend.parsers.ollama import (
    OllamaRequestError,
    chat_request_to_openai,
    generate_request_to_openai,
)
from toolmend.parsers.ollama_emit import Durations, OllamaEmitter
from toolmend.parsers.reply import ReplyEvent, reply_size
from toolmend.parsers.stream import Output
from toolmend.pipeline.downstream import ClientGone, Downstream, WholeReplyBound
from toolmend.pipeline.forward import forward, read_json_request
from toolmend.server.context import RequestContext
from toolmend.server.errors import ProxyError
from toolmend.server.keys import CTX, SETTINGS, UPSTREAM
from toolmend.server.request_body import check_chat_body, check_counts

NDJSON = "application/x-ndjson"
#: /api/ps reports models as loaded until this far ahead (toolmend does not unload them).
PS_EXPIRY = "2318-01-01T00:00:00Z"


#: errors on these paths take Ollama's shape, wherever they are raised (fronts/__init__.py)
ERROR_PATHS = ("/api/",)


def ollama_error(err: ProxyError) -> web.Response:
    """Ollama's error body: the message alone under ``error``."""
    resp = web.Response(status=err.status, body=orjson.dumps({"error": err.message}),
                        content_type="application/json", headers=err.headers)
    if err.closes_connection:  # the body was not read whole: the connection is not reusable
        resp.force_close()
    return resp


def _now_rfc3339() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"


class OllamaDownstream(Downstream):
    """The client writer for Ollama requests: NDJSON instead of SSE, no keep-alives (NDJSON
    has no comment line, and Ollama clients parse every line), and for ``stream: false`` one
    JSON object at the end.

    ``stream: false`` gathers the whole reply in memory, so what it gathers is bounded like any
    reply read whole (``max_upstream_reply_bytes``, counted on the stream fed in)."""

    __slots__ = ("_bound", "emitter", "whole")

    def __init__(self, request: web.Request, ctx: RequestContext, emitter: OllamaEmitter,
                 *, stream: bool) -> None:
        super().__init__(request, ctx, 0.0)
        self.resp.headers["Content-Type"] = NDJSON
        self.emitter = emitter
        self.reply = emitter.decoder  # the pipeline feeds the emitter's decoder: events in
        self.whole = not stream
        self._bound = (WholeReplyBound(request.app[SETTINGS].max_upstream_reply_bytes)
                       if self.whole else None)

    def encode_reply(self, out: Output) -> bytes:
        events: list[ReplyEvent] = out  # type: ignore[assignment]  # reply mode: events
        if self._bound is not None:
            self._bound.add(reply_size(events))
        return self.emitter.feed_events(events)

    async def fail(self, err: ProxyError) -> web.StreamResponse:
        self.ctx.error_code = err.code
        await self.stop_keepalive()
        if not self.resp.prepared:
            self.ctx.status = err.status
            return ollama_error(err)
        if self._ended:
            return self.resp
        self._ended = True
        with contextlib.suppress(ClientGone, ConnectionError, RuntimeError):
            await super().write(self.emitter.error_line(err.message))
            await self.resp.write_eof()
        return self.resp

    async def close(self) -> web.StreamResponse:
        tail = self.emitter.finish(self._durations())
        if self.whole and self.emitter.error is not None:
            self.ctx.status = 502
            self.ctx.error_code = "upstream_bad_response"
            return ollama_error(ProxyError(502, self.emitter.error,
                                           code="upstream_bad_response"))
        if self.whole:
            self.ctx.status = 200
            self.ctx.bytes_out += len(tail)
            return web.Response(body=tail, content_type="application/json",
                                headers={"X-Request-Id": self.ctx.request_id})
        await super().write(tail)
        return await super().close()

    def _durations(self) -> Durations:
        ctx = self.ctx
        now = asyncio.get_running_loop().time()
        start = ctx.dispatched_at or ctx.started
        first = ctx.upstream_first_token_at or now

        def ns(a: float, b: float) -> int:
            return max(0, int((b - a) * 1e9))

        return Durations(total=ns(ctx.started, now), load=ns(ctx.started, start),
                         prompt_eval=ns(start, first), eval=ns(first, now))


async def _answer(request: web.Request, kind: str) -> web.StreamResponse:
    """``/api/chat`` and ``/api/generate``: translate, run the OpenAI path, translate back."""
    ctx: RequestContext = request[CTX]
    try:
        body = await read_json_request(request, any_content_type=True)
        try:
            openai = (chat_request_to_openai(body) if kind == "chat"
                      else generate_request_to_openai(body))
        except OllamaRequestError as e:
            raise ProxyError(400, str(e), param=e.param, code="invalid_request") from None
        model = body.get("model") if isinstance(body.get("model"), str) else ""
        stream = openai["stream"]
        if (kind == "chat" and not openai["messages"]) or (
                kind == "generate" and not body.get("prompt") and not body.get("images")):
            # Ollama's "load the model" request: nothing to generate
            return _loaded(model, kind, stream)
        settings = request.app[SETTINGS]
        check_counts(openai, settings.max_messages, settings.max_tools)
        check_chat_body(openai)
        emitter = OllamaEmitter(kind, model or "", _now_rfc3339(), stream=stream)
        openai["stream"] = True  # one path for both: Ollama accumulates a stream too
        openai["stream_options"] = {"include_usage": True}  # the done line's counts

        def make_down(req: web.Request, c: RequestContext, _interval: float) -> Downstream:
            return OllamaDownstream(req, c, emitter, stream=stream)

        resp = await forward(request, openai, "/v1/chat/completions", make_down)
    except ProxyError as e:
        ctx.status, ctx.error_code = e.status, e.code
        return ollama_error(e)
    return resp


def _loaded(model: str, kind: str, stream: bool) -> web.Response:
    doc: dict[str, Any] = {"model": model, "created_at": _now_rfc3339()}
    if kind == "chat":
        doc["message"] = {"role": "assistant", "content": ""}
    else:
        doc["response"] = ""
    doc.update({"done": True, "done_reason": "load"})
    raw = orjson.dumps(doc)
    if stream:
        return web.Response(body=raw + b"\n", content_type=NDJSON)
    return web.Response(body=raw, content_type="application/json")


async def api_chat(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "chat")


async def api_generate(request: web.Request) -> web.StreamResponse:
    return await _answer(request, "generate")


# --- discovery -------------------------------------------------------------------------------
async def _model_ids(request: web.Request) -> list[str]:
    doc = await request.app[UPSTREAM].get_json("/v1/models")
    data = doc.get("data") if isinstance(doc, dict) else None
    return [m["id"] for m in data or () if isinstance(m, dict) and isinstance(m.get("id"), str)]


def _details() -> dict[str, Any]:
    return {"parent_model": "", "format": "gguf", "family": "", "families": None,
            "parameter_size": "", "quantization_level": ""}


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _same_model(asked: str, have: str) -> bool:
    """Ollama names carry a tag (``:latest`` when none was given)."""
    def norm(n: str) -> str:
        return n[:-7] if n.endswith(":latest") else n
    return norm(asked) == norm(have)


async def api_tags(request: web.Request) -> web.Response:
    ids = await _discover(request, _model_ids)
    if isinstance(ids, web.Response):
        return ids
    now = _now_rfc3339()
    return _json({"models": [{"name": m, "model": m, "modified_at": now, "size": 0,
                              "digest": _digest(m), "details": _details()} for m in ids]})


async def api_ps(request: web.Request) -> web.Response:
    ids = await _discover(request, _model_ids)
    if isinstance(ids, web.Response):
        return ids
    ctx_len = await _context_length(request)
    models = []
    for m in ids:
        doc: dict[str, Any] = {"name": m, "model": m, "size": 0, "digest": _digest(m),
                               "details": _details(), "expires_at": PS_EXPIRY, "size_vram": 0}
        if ctx_len:
            doc["context_length"] = ctx_len
        models.append(doc)
    return _json({"models": models})


async def api_show(request: web.Request) -> web.Response:
    ctx: RequestContext = request[CTX]
    try:
        body = await read_json_request(request, any_content_type=True)
    except ProxyError as e:
        ctx.status, ctx.error_code = e.status, e.code
        return ollama_error(e)
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        return ollama_error(ProxyError(400, "model is required", param="model"))
    ids = await _discover(request, _model_ids)
    if isinstance(ids, web.Response):
        return ids
    found = next((m for m in ids if _same_model(name, m)), None)
    if found is None:
        return ollama_error(ProxyError(404, f"model '{name}' not found", code="model_not_found"))
    detected = await request.app[UPSTREAM].detect()
    info: dict[str, Any] = {"general.architecture": detected.kind,
                            "general.basename": found}
    ctx_len = await _context_length(request)
    if ctx_len:
        info[f"{detected.kind}.context_length"] = ctx_len
    return _json({"modelfile": f"# served by {detected.kind} behind toolmend\nFROM {found}\n",
                  "parameters": "", "template": "", "details": _details(),
                  "model_info": info, "capabilities": ["completion", "tools"],
                  "modified_at": _now_rfc3339()})


async def api_pull(request: web.Request) -> web.Response:
    """toolmend cannot pull models, but clients pull a model they do not see in ``/api/tags``
    (Codex's ``--oss`` mode does): a model the backend serves is "pulled" at once; any other
    gets a 404 that says where the model must be loaded, and which ones are served."""
    ctx: RequestContext = request[CTX]
    try:
        body = await read_json_request(request, any_content_type=True)
    except ProxyError as e:
        ctx.status, ctx.error_code = e.status, e.code
        return ollama_error(e)
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        return ollama_error(ProxyError(400, "model is required", param="model"))
    ids = await _discover(request, _model_ids)
    if isinstance(ids, web.Response):
        return ids
    stream = body.get("stream") is not False
    if not any(_same_model(name, m) for m in ids):
        served = ", ".join(ids[:20]) or "none"
        err = ProxyError(404, f"model '{name[:128]}' is not served by the backend behind "
                         "toolmend, which cannot pull models: load it on the backend, or use "
                         f"one it serves ({served})", code="model_not_found")
        if not stream:
            return ollama_error(err)
        # as Ollama reports a failed pull: an error line in the progress stream, which
        # clients show (Codex prints only the status of a refused request)
        ctx.error_code = err.code
        return web.Response(body=orjson.dumps({"error": err.message}) + b"\n",
                            content_type=NDJSON)
    doc = orjson.dumps({"status": "success"})
    if not stream:
        return web.Response(body=doc, content_type="application/json")
    return web.Response(body=doc + b"\n", content_type=NDJSON)


async def api_version(request: web.Request) -> web.Response:
    """The Ollama version toolmend answers as (``ollama_version``, default
    :data:`~toolmend.server.config.OLLAMA_VERSION`): clients gate features on it."""
    return _json({"version": request.app[SETTINGS].ollama_version})


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def _context_length(request: web.Request) -> int | None:
    return (await request.app[UPSTREAM].detect()).context_length


async def _discover(request: web.Request, fn: Any) -> Any:
    try:
        return await fn(request)
    except ProxyError as e:
        request[CTX].status, request[CTX].error_code = e.status, e.code
        return ollama_error(e)


def _json(doc: Any) -> web.Response:
    return web.Response(body=orjson.dumps(doc), content_type="application/json")


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/chat", api_chat)
    r.add_post("/api/generate", api_generate)
    r.add_get("/api/tags", api_tags)
    r.add_get("/api/version", api_version)
    r.add_post("/api/show", api_show)
    r.add_post("/api/pull", api_pull)
    r.add_get("/api/ps", api_ps)
    r.add_get("/", root)


error_response = ollama_error
