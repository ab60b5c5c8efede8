"""The aiohttp application: routes, the error and access-log middleware, start and cleanup.

Handlers are short: read and check the body, pick the pipeline, hand over to ``relay``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from toolmend import fronts
from toolmend.backends import vllm_priority
from toolmend.backends.detect import detect
from toolmend.backends.launcher import LAUNCHED
from toolmend.backends.upstream import UpstreamClient
from toolmend.pipeline.downstream import DOWNSTREAM, ClientGone
from toolmend.pipeline.validating import install_schema_compiler
from toolmend.scheduling.scheduler import (
    probe_slots,
    scheduler_from_settings,
)
from toolmend.server import access_log, auth, gateway, lifecycle, memory
from toolmend.server.config import Settings
from toolmend.server.context import RequestContext, new_request_id
from toolmend.server.errors import ProxyError
from toolmend.server.keys import CTX, SCHEDULER, SETTINGS, UPSTREAM
from toolmend.server.request_body import (
    LARGE_BODIES,
    LargeBodies,
    release_large_bodies,
)
from toolmend.telemetry import model_server
from toolmend.telemetry import tracing as telemetry

log = logging.getLogger("toolmend")

__all__ = ["CTX", "SCHEDULER", "SETTINGS", "UPSTREAM", "build_app", "start_server"]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the upstream answers its model list with at least one model.

    ``backend`` says what kind of server was detected behind the upstream URL. With several
    replicas, each is probed and listed; ready when at least one is.
    """
    up = request.app[UPSTREAM]
    why = lifecycle.not_ready(request.app)  # draining, or every slot wedged
    if why is not None:
        return web.json_response({"ready": False, "upstream": up.base_url(), "reason": why},
                                 status=503)
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
            resp = fronts.error_response(request.path, err)
            if err.closes_connection:  # the body was not read whole: the connection is not reusable
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
    access_log.emit(_json_line(line))


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
        if up.detected.kind == "vllm" and app[SETTINGS].vllm_priority:  # does it take them?
            await vllm_priority.configure(app[SETTINGS], probes, up.base_url(),
                                          up.detected.model)
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
                                       context_and_errors, lifecycle.track_requests,
                                       auth.require_key])
    app[SETTINGS] = settings
    app[UPSTREAM] = UpstreamClient(urls, settings)
    app[SCHEDULER] = scheduler_from_settings(settings)
    app[LARGE_BODIES] = LargeBodies(settings.large_body_bytes, settings.max_large_bodies)
    app[auth.KEYRING] = auth.load_keys(settings.config_path)
    app[gateway.GATEWAY] = gateway.GatewayConfig.from_settings(settings)
    lifecycle.install(app)
    auth.apply_weights(app[SCHEDULER].policies, app[auth.KEYRING])
    app.on_startup.append(_size_scheduler)
    app.on_startup.append(_start_upstream)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    fronts.add_routes(app)  # every API agents speak, registered in one place
    tel = telemetry.setup(app, settings)
    model_server.install(app, tel.metrics.registry)  # the load an endpoint picker reads
    install_schema_compiler(app, settings)
    memory.install(app)  # large schemas and bodies: their freed pages go back to the system
    app.on_cleanup.append(_close_upstream)
    return app


async def start_server(app: web.Application, host: str, port: int, *,
                       shutdown_timeout: float = 60.0) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner and the bound port (useful with port 0).
    ``shutdown_timeout``: seconds the runner's cleanup lets handlers still running finish."""
    settings = app.get(SETTINGS)  # other apps (the embedded backend, test peers) have none
    limit = settings.max_header_bytes if settings is not None else 8190
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           max_line_size=limit, max_field_size=limit,
                           shutdown_timeout=shutdown_timeout)
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
