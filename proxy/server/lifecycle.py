"""Readiness and draining as a gateway expects them.

An inference gateway (or any Kubernetes Service) sends a pod work while its readiness probe
passes, and on scale-down or rollout sends it SIGTERM and stops routing to it, a little later.
So:

- ``/readyz`` is false while the backend loads (see app.readyz), while toolmend drains, and
  while every backend slot is wedged: held by a request that has shown no progress (no first
  token, then no output) for ``wedged_after`` seconds. A pod whose every slot is stuck takes
  no new work; one stuck slot among several still does.
- On SIGTERM (:func:`drain`), toolmend takes no new request (503 ``draining`` with
  ``Retry-After``, so the gateway or the client tries another pod), tells every queued request
  to go elsewhere now (the same 503 when nothing was sent yet; for a stream that already has
  its 200 and keep-alives, an in-stream error with the code ``draining``, then ``[DONE]``),
  and lets the requests in flight finish within ``drain_grace`` seconds. What is still running
  after that is cut when the server stops.

The health, readiness and observability endpoints answer as usual while draining: the kubelet
must see "alive but not ready", and the picker may still scrape.

``POST /toolmend/v1/drain`` (loopback or the admin key) starts the same drain and answers once
it is over. It is for Kubernetes' native sidecars: the kubelet signals a pod's main container
first and a sidecar only after the main container has exited, so a toolmend sidecar would
receive SIGTERM when its backend is already gone. The model server's ``preStop`` hook calls
this endpoint instead, and the backend stops only once toolmend has drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from toolmend.server import auth
from toolmend.server.context import RequestContext
from toolmend.server.errors import ProxyError
from toolmend.server.keys import CTX, SCHEDULER, SETTINGS

log = logging.getLogger("toolmend.server.lifecycle")

DRAIN_RETRY_AFTER = 1  # seconds: another pod can take it now


def draining_error() -> ProxyError:
    """What a request that toolmend will not serve any more gets, before or in its stream."""
    return ProxyError(503, "toolmend is shutting down and takes no new work; retry, another "
                      "replica will serve it", code="draining",
                      headers={"Retry-After": str(DRAIN_RETRY_AFTER)},
                      extra={"retry_after": DRAIN_RETRY_AFTER})


@dataclass(slots=True)
class _Seen:
    """One API request in progress, and when its output last moved (for wedged slots)."""

    ctx: RequestContext
    bytes_out: int = 0
    moved_at: float | None = None


class Lifecycle:
    """The app's API requests in progress, the draining flag, and the wedged-slot check."""

    def __init__(self, wedged_after: float) -> None:
        self.wedged_after = wedged_after
        self.draining = False
        self.active: dict[str, _Seen] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain: asyncio.Task[int] | None = None

    def enter(self, ctx: RequestContext) -> None:
        self.active[ctx.request_id] = _Seen(ctx)
        self._idle.clear()

    def leave(self, ctx: RequestContext) -> None:
        self.active.pop(ctx.request_id, None)
        if not self.active:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()

    def wedged(self, now: float) -> int:
        """Requests holding a backend slot that showed no progress for ``wedged_after``
        seconds. Progress: the first upstream token, then bytes written to the client after
        the first token (keep-alives, which flow before it, do not count), as seen at the
        previous call (readiness probes come every few seconds; the bound is minutes)."""
        if self.wedged_after <= 0:
            return 0
        stuck = 0
        for seen in self.active.values():
            ctx = seen.ctx
            if ctx.dispatched_at is None or ctx.finished_at is not None:
                continue
            last = max(ctx.dispatched_at, ctx.upstream_first_token_at or 0.0)
            if ctx.client_first_token_at is not None:
                if ctx.bytes_out != seen.bytes_out:
                    seen.bytes_out, seen.moved_at = ctx.bytes_out, now
                last = max(last, ctx.client_first_token_at, seen.moved_at or 0.0)
            stuck += now - last > self.wedged_after
        return stuck


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)


@web.middleware
async def track_requests(request: web.Request, handler: Any) -> web.StreamResponse:
    """Count the API requests in progress; while draining, refuse new ones."""
    life = request.app.get(LIFECYCLE)
    if life is None or request.path.startswith(auth.OPEN_PATHS):
        return await handler(request)
    if life.draining:
        raise draining_error()
    ctx = request[CTX]
    life.enter(ctx)
    try:
        return await handler(request)
    finally:
        life.leave(ctx)


def install(app: web.Application) -> Lifecycle:
    life = Lifecycle(app[SETTINGS].wedged_after)
    app[LIFECYCLE] = life
    app.router.add_post("/toolmend/v1/drain", drain_handler)
    return life


def _local_or_admin(request: web.Request) -> None:
    key = request.app[SETTINGS].admin_key
    header = request.headers.get("Authorization", "")
    if key and header.startswith("Bearer ") and hmac.compare_digest(
            header[7:].strip().encode("utf-8", "surrogatepass"), key.encode()):
        return
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address((request.remote or "").split("%", 1)[0]).is_loopback:
            return
    raise ProxyError(403, f"{request.path} is served to loopback clients only, or with the "
                     "admin key", code="forbidden")


async def drain_handler(request: web.Request) -> web.Response:
    """Drain now (as on SIGTERM) and answer when it is over: 200 once every request finished,
    503 when the grace period ended with some still in progress."""
    _local_or_admin(request)
    left = await drain(request.app, request.app[SETTINGS].drain_grace)
    return web.json_response({"drained": left == 0, "in_progress": left},
                             status=200 if left == 0 else 503)


def not_ready(app: web.Application) -> str | None:
    """Why ``/readyz`` must say no for toolmend's own reasons (None: no such reason)."""
    life = app.get(LIFECYCLE)
    if life is None:
        return None
    if life.draining:
        return "draining: toolmend is shutting down"
    sched = app.get(SCHEDULER)
    slots = getattr(sched, "slots", 0)
    if slots and life.wedged(asyncio.get_running_loop().time()) >= slots:
        return (f"every backend slot ({slots}) is held by a request without progress for "
                f"over {life.wedged_after:g} s (wedged_after)")
    return None


async def drain(app: web.Application, grace: float) -> int:
    """Stop taking work, refuse what is queued, and wait up to ``grace`` seconds for the
    requests in flight. Returns how many were still in progress when the wait ended. A drain
    already under way (the preStop hook's, then SIGTERM) is waited for, not started again."""
    life = app[LIFECYCLE]
    if life._drain is None:
        life._drain = asyncio.ensure_future(_drain(app, life, grace))
    return await asyncio.shield(life._drain)


async def _drain(app: web.Application, life: Lifecycle, grace: float) -> int:
    life.draining = True
    sched = app.get(SCHEDULER)
    refused = sched.drain(draining_error) if sched is not None else 0
    log.info("draining: %d queued requests told to retry elsewhere, %d in progress, up to "
             "%g s to finish", refused, len(life.active), grace)
    if grace > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await life.idle()
    left = len(life.active)
    if left:
        log.warning("drain grace of %g s is over: %d requests in progress are cut", grace, left)
    else:
        log.info("drained: every request finished")
    return left
