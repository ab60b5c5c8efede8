"""The aiohttp application: routes, the error and access-log middleware, start and cleanup.

Handlers are short: read and check the body, pick the pipeline, hand over to ``relay``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from toolmend.backends.detect import detect
from toolmend.backends.launcher import LAUNCHED
from toolmend.backends.upstream import UpstreamClient
from toolmend.parsers.stream import StreamPipeline
from toolmend.pipeline.downstream import DOWNSTREAM, ClientGone, Downstream
from toolmend.pipeline.mending import ChatMending
from toolmend.pipeline.mending import record as record_mending
from toolmend.pipeline.relay import relay_json, relay_stream
from toolmend.pipeline.validating import install_schema_compiler, request_toolset
from toolmend.scheduling.scheduler import (
    DEADLINE_HEADER,
    PRIORITY_HEADER,
    FairScheduler,
    estimate_cost,
    parse_deadline,
    probe_slots,
    scheduler_from_settings,
)
from toolmend.server import auth, identity, memory
from toolmend.server.config import Settings
from toolmend.server.context import RequestContext, new_request_id
from toolmend.server.errors import ProxyError
from toolmend.server.request_body import (
    LARGE_BODIES,
    LargeBodies,
    ask_for_usage,
    cap_output_tokens,
    check_chat_body,
    check_completion_body,
    check_counts,
    client_wants_usage,
    read_json_body,
    release_large_bodies,
    wants_stream,
)
from toolmend.telemetry import tracing as telemetry
from toolmend.telemetry.tracing import TELEMETRY

log = logging.getLogger("toolmend")
access_log = logging.getLogger("toolmend.access")

SETTINGS = web.AppKey("settings", Settings)
UPSTREAM = web.AppKey("upstream", UpstreamClient)
SCHEDULER = web.AppKey("scheduler", FairScheduler)
CTX = web.RequestKey("ctx", RequestContext)


async def _read_body(request: web.Request, limit: int, timeout: float = 0.0) -> bytes:
    """The whole body, within ``limit`` bytes and ``timeout`` seconds (``body_timeout``: a
    client trickling its body holds a connection and a buffer as long as it likes otherwise)."""
    length = request.content_length
    if length is not None and length > limit:
        raise ProxyError(413, f"request body of {length} bytes is over the limit of {limit} bytes",
                         code="body_too_large")
    try:
        async with asyncio.timeout(timeout if timeout > 0 else None):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ProxyError(413, f"request body is over the limit of {limit} bytes",
                         code="body_too_large") from None
    except TimeoutError:
        raise ProxyError(408, f"the request body did not arrive within {timeout:g} s "
                         "(body_timeout)", code="body_timeout",
                         headers={"Connection": "close"}) from None


async def _json_request(request: web.Request, *, any_content_type: bool = False
                        ) -> dict[str, Any]:
    """``any_content_type``: Ollama clients (``curl -d``) send JSON under any type."""
    settings = request.app[SETTINGS]
    raw = await _read_body(request, settings.max_body_bytes, settings.body_timeout)
    ctype = ("application/json" if any_content_type
             else request.headers.get("Content-Type", "application/json"))
    body = await read_json_body(raw, ctype,
                                admit=lambda size: request.app[LARGE_BODIES].admit(request,
                                                                                    size))
    ctx: RequestContext = request[CTX]
    ident = identity.resolve(request, body)  # the trust table: see identity.py
    ctx.agent_id, ctx.session_id = ident.agent, ident.session
    ctx.extra[identity.IDENTITY_KEY] = ident
    auth.check_body(request, body)
    model = body.get("model")
    ctx.model = model if isinstance(model, str) else None
    return body


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await _json_request(request)
    settings = request.app[SETTINGS]
    check_counts(body, settings.max_messages, settings.max_tools)
    check_chat_body(body)
    return await _forward(request, body, "/v1/chat/completions")


async def completions(request: web.Request) -> web.StreamResponse:
    body = await _json_request(request)
    check_completion_body(body)
    return await _forward(request, body, "/v1/completions")


DownstreamFactory = Callable[[web.Request, RequestContext, float], Downstream]


async def _forward(request: web.Request, body: dict[str, Any], path: str,
                   make_down: DownstreamFactory | None = None) -> web.StreamResponse:
    """Queue, relay, mend. ``make_down`` replaces the SSE client writer (the Ollama front
    passes one that rewrites the mended stream as NDJSON), so every front shares this path."""
    settings = request.app[SETTINGS]
    up = request.app[UPSTREAM]
    sched = request.app[SCHEDULER]
    ctx: RequestContext = request[CTX]
    ctx.stream = wants_stream(body)
    # The one place where the output is bounded: after the front's translation, before the
    # cost estimate, the mender (retries copy the body) and the upstream wire's own translation
    # (Ollama's native API reads these fields), so no front or wire can bypass it.
    detected = up.detected
    cap_output_tokens(body, auth.output_cap(request),
                      detected.context_length if detected is not None else None)
    request.app[TELEMETRY].prepare(request, ctx, body)
    priority = sched.resolve_priority(ctx.agent_id, request.headers.get(PRIORITY_HEADER))
    deadline = parse_deadline(request.headers.get(DEADLINE_HEADER), sched.clock())
    if settings.vllm_priority:
        body["priority"] = -priority  # vLLM serves lower values first
    else:  # a client's own "priority" would reach a priority-scheduling server past the
        body.pop("priority", None)  # policy that X-Priority is held to
    mending = None
    if path == "/v1/chat/completions":
        # without tools only structured calls are checked, and their retry (plain text) is the
        # same on every backend: no need to know which one it is
        backend = settings.backend if settings.backend != "auto" or not body.get("tools") \
            else (await up.detect()).kind
        toolset = await request_toolset(request.app, body, settings)  # off the loop if large
        mending = ChatMending.for_request(settings, body, ctx, request.headers, backend, toolset)
    if not ctx.stream:
        raw = orjson.dumps(mending.upstream_body() if mending else body)
        async with sched.slot(ctx, estimate_cost(body, raw), priority=priority,
                              deadline=deadline):
            return await relay_json(ctx, up, path, raw,
                                    mending.json_transform(up, path) if mending else None,
                                    as_stream=mending is not None and mending.whole_as_stream)
    mender = mending.mender() if mending else None
    pipeline = StreamPipeline(client_wants_usage(body), mender, settings.max_upstream_event_bytes)
    ask_for_usage(body)
    raw = orjson.dumps(mending.upstream_body() if mending else body)
    down = (make_down or Downstream)(request, ctx, settings.keepalive_interval)
    down.start_keepalive()  # keep-alives flow while the request waits for a slot
    try:
        async with sched.slot(ctx, estimate_cost(body, raw), priority=priority,
                              deadline=deadline) as grant:
            # output is charged from the pipeline's event count, read only when the
            # scheduler decides: nothing added to the per-chunk path
            grant.track(lambda: pipeline.stats.events)
            try:
                return await relay_stream(request, ctx, up, path, raw, pipeline,
                                          settings.keepalive_interval, down,
                                          mending.finisher(up, path) if mending else None)
            finally:
                record_mending(ctx, mender)
    except ProxyError as e:  # refused (429) or out of time (503) in the queue
        return await down.fail(e)
    finally:
        await down.stop_keepalive()


async def models(request: web.Request) -> web.Response:
    up = request.app[UPSTREAM]
    doc = await up.get_json("/v1/models")
    return web.Response(body=orjson.dumps(doc), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the upstream answers its model list with at least one model.

    ``backend`` says what kind of server was detected behind the upstream URL. With several
    replicas, each is probed and listed; ready when at least one is.
    """
    up = request.app[UPSTREAM]
    launched = request.app.get(LAUNCHED)
    if launched is not None and launched.state != "ready":
        # a child toolmend started (--launch) that is loading or restarting: say so, and do
        # not probe a port nobody listens on
        return web.json_response({"ready": False, "upstream": up.base_url(),
                                  "reason": launched.reason, "launched": launched.status()},
                                 status=503)
    if len(up.replicas) > 1:
        await up.check_health()
    backend = (await up.detect()).as_dict()
    if launched is not None:
        backend["launched"] = launched.status()
    if len(up.replicas) > 1:
        backend["replicas"] = [r.as_dict() for r in up.replicas]
    try:
        doc = await up.get_json("/v1/models", timeout=3.0)
    except ProxyError as e:
        return web.json_response({"ready": False, "upstream": up.base_url(), "reason": e.message,
                                  "backend": backend}, status=503)
    data = doc.get("data") if isinstance(doc, dict) else None
    names = [m.get("id") for m in data or () if isinstance(m, dict)]
    if not names:
        return web.json_response({"ready": False, "upstream": up.base_url(),
                                  "reason": "upstream lists no loaded model",
                                  "backend": backend}, status=503)
    return web.json_response({"ready": True, "upstream": up.base_url(), "models": names,
                              "backend": backend})


@web.middleware
async def context_and_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Give every request a context and an id; turn every failure into the OpenAI shape.

    A failure after a stream's headers went out cannot have a status line any more: it ends
    that stream in the API's own way instead (:func:`_end_started_stream`).
    """
    loop = asyncio.get_running_loop()
    ctx = RequestContext(new_request_id(), request.path, loop.time(), client=request.remote or "")
    request[CTX] = ctx
    err: ProxyError | None = None
    try:
        resp = await handler(request)
    except ProxyError as e:
        err = _detached(e)
    except web.HTTPException as e:
        if e.status == 404:
            err = ProxyError(404, f"no route for {request.method} {request.path}",
                             code="not_found")
        elif e.status == 405:
            err = ProxyError(405, f"method {request.method} not allowed on {request.path}",
                             code="method_not_allowed")
        elif e.status == 413:
            err = ProxyError(413, "request body too large", code="body_too_large")
        else:
            err = ProxyError(e.status, e.reason or "error", code="http_error")
    except asyncio.CancelledError:
        ctx.status = 499
        ctx.error_code = ctx.error_code or "client_disconnected"
        _log_request(request, ctx)
        raise
    except ClientGone:  # the client left mid-stream; nothing more can reach it
        ctx.status, ctx.error_code = 499, "client_disconnected"
        gone = request.get(DOWNSTREAM)
        resp = gone.resp if gone is not None else web.Response(status=499)
    except Exception as e:
        log.exception("unhandled error in %s", request.path)
        err = ProxyError(500, f"internal error in toolmend ({e.__class__.__name__}); see its "
                         "log", code="internal_error")
    else:
        down = request.get(DOWNSTREAM)
        if down is not None and down.started and not down.ended and resp is not down.resp:
            # a second response after the stream began would corrupt it: end the stream
            log.error("%s answered anew after its stream had started", request.path)
            err = ProxyError(500, "internal error in toolmend; see its log",
                             code="internal_error")
    if err is not None:
        ctx.error_code = err.code
        started = await _end_started_stream(request, err)
        if started is not None:
            resp = started
        else:
            ctx.status = err.status
            resp = err.response()
            if err.status == 408:  # a body that never arrived: the connection is not reusable
                resp.force_close()
    if not ctx.status:
        ctx.status = resp.status
    if not resp.prepared:
        resp.headers.setdefault("X-Request-Id", ctx.request_id)
    _log_request(request, ctx)
    return resp


def _detached(e: ProxyError) -> ProxyError:
    """The error without its traceback and context. Kept in the middleware's locals, they made
    a reference cycle (this frame, the error, its traceback, this frame) that held everything
    the failed request's frames held, its parsed body among them, until a full garbage
    collection: after a burst of refused 8 MB bodies, 50 MB stayed for minutes."""
    e.__traceback__ = None
    e.__context__ = None
    e.__cause__ = None
    return e


async def _end_started_stream(request: web.Request,
                              err: ProxyError) -> web.StreamResponse | None:
    """The safety net at the stream's edge: when the client already has a 200 and part of a
    stream, end it with the API's error event (``[DONE]`` after it, or Ollama's error line)."""
    down = request.get(DOWNSTREAM)
    if down is None or not down.started:
        return None
    return await down.fail(err)


def _log_request(request: web.Request, ctx: RequestContext) -> None:
    settings = request.app[SETTINGS]
    if not settings.log_requests or request.path in ("/healthz", "/readyz", "/metrics"):
        return
    end = ctx.finished_at or asyncio.get_running_loop().time()
    line = {
        "ts": round(time.time(), 3), "request_id": ctx.request_id, "agent_id": ctx.agent_id,
        "method": request.method, "path": request.path, "status": ctx.status,
        "model": ctx.model, "stream": ctx.stream, "error": ctx.error_code,
        "ttft_ms": ctx.ms(ctx.client_first_token_at), "duration_ms": ctx.ms(end),
        "upstream_ttft_ms": ctx.ms(ctx.upstream_first_token_at),
        "bytes_out": ctx.bytes_out,
    }
    if ctx.usage:
        line["prompt_tokens"] = ctx.usage.get("prompt_tokens")
        line["completion_tokens"] = ctx.usage.get("completion_tokens")
    access_log.info(_json_line(line))


def _json_line(doc: dict[str, Any]) -> str:
    """One JSON log line; a value that is not valid text (a lone surrogate from undecodable
    bytes that got this far) is escaped rather than losing the line or failing the request."""
    try:
        return orjson.dumps(doc).decode()
    except TypeError:
        return orjson.dumps({k: _escaped(v) for k, v in doc.items()}).decode()


def _escaped(v: Any) -> Any:
    if isinstance(v, str):
        return v.encode("utf-8", "backslashreplace").decode("utf-8")
    return v


async def _size_scheduler(app: web.Application) -> None:
    up = app[UPSTREAM]
    # What is upstream, probed before the first request (also with --slots given: the context
    # length bounds max_tokens), on connections of its own that close at once: an idle probe
    # connection left in the request pool could be one the server has just dropped when a
    # request takes it.
    async with aiohttp.ClientSession() as probes:
        up.detected = await detect(up.base_url(), up.backend, session=probes,
                                   api_key=app[SETTINGS].api_key)
    slots = await probe_slots(up, app[SETTINGS])
    app[SCHEDULER].set_slots(slots)
    log.info("fair queue: %d backend slots", slots)


async def _start_upstream(app: web.Application) -> None:
    app[UPSTREAM].start(warmup=app[SETTINGS].warmup)  # replica health checks, warm-up


async def _close_upstream(app: web.Application) -> None:
    await app[UPSTREAM].close()


def build_app(settings: Settings, upstream_urls: list[str] | None = None) -> web.Application:
    urls = upstream_urls if upstream_urls is not None else settings.upstream
    app = web.Application(client_max_size=settings.max_body_bytes,
                          middlewares=[telemetry.middleware(CTX), release_large_bodies,
                                       context_and_errors, auth.require_key])
    app[SETTINGS] = settings
    app[UPSTREAM] = UpstreamClient(urls, settings)
    app[SCHEDULER] = scheduler_from_settings(settings)
    app[LARGE_BODIES] = LargeBodies(settings.large_body_bytes, settings.max_large_bodies)
    app[auth.KEYRING] = auth.load_keys(settings.config_path)
    auth.apply_weights(app[SCHEDULER].policies, app[auth.KEYRING])
    app.on_startup.append(_size_scheduler)
    app.on_startup.append(_start_upstream)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    from toolmend.fronts.ollama import add_routes as add_ollama_routes  # it imports this module

    add_ollama_routes(app)
    telemetry.setup(app, settings)
    install_schema_compiler(app, settings)
    memory.install(app)  # large schemas and bodies: their freed pages go back to the system
    app.on_cleanup.append(_close_upstream)
    return app


async def start_server(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner and the bound port (useful with port 0)."""
    settings = app.get(SETTINGS)  # other apps (the embedded backend, test peers) have none
    limit = settings.max_header_bytes if settings is not None else 8190
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           max_line_size=limit, max_field_size=limit)
    await runner.setup()
    auth.shape_parser_errors(runner, auth.ConnectionGuard.from_settings(settings)
                             if settings is not None else None)
    site = web.TCPSite(runner, host, port, backlog=2048)
    await site.start()
    bound = port
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        bound = server.sockets[0].getsockname()[1]
    return runner, bound
