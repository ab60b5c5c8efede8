"""The path every front shares: read the request, queue for a slot, relay and mend.

A front parses its API's request into the internal chat request (an OpenAI chat body) and calls
:func:`forward` with a client writer of its own (``make_down``) that encodes the mended reply in
its API's wire format. Repair, validation, the output cap, fair queuing and tracing therefore
apply to every front alike, and no front can bypass them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from toolmend.backends.vllm_priority import upstream_priority
from toolmend.parsers.stream import StreamPipeline
from toolmend.pipeline.downstream import Downstream
from toolmend.pipeline.mending import ChatMending
from toolmend.pipeline.mending import record as record_mending
from toolmend.pipeline.relay import relay_json, relay_stream
from toolmend.pipeline.validating import request_toolset
from toolmend.scheduling.scheduler import (
    DEADLINE_HEADER,
    PRIORITY_HEADER,
    estimate_cost,
    parse_deadline,
    request_cost,
)
from toolmend.server import auth, gateway, identity
from toolmend.server.context import RequestContext
from toolmend.server.errors import ProxyError
from toolmend.server.keys import CTX, SCHEDULER, SETTINGS, UPSTREAM
from toolmend.server.request_body import (
    LARGE_BODIES,
    ask_for_usage,
    cap_output_tokens,
    client_wants_usage,
    estimate_values,
    read_json_body,
    wants_stream,
)
from toolmend.telemetry.tracing import TELEMETRY

#: a body up to this size that has arrived whole is taken in one piece (counting its values in
#: one go takes well under a millisecond); a larger one is read and counted piece by piece
WHOLE_BODY_BYTES = 256 * 1024


async def read_body(request: web.Request, limit: int, timeout: float = 0.0,
                    max_values: int = 0) -> tuple[bytes, int]:
    """The whole body, within ``limit`` bytes and ``timeout`` seconds (``body_timeout``: a
    client trickling its body holds a connection and a buffer as long as it likes otherwise),
    and an upper bound of the JSON values it holds (:func:`estimate_values`).

    The values are counted piece by piece as the body arrives, so a body of millions of values
    is never scanned in one go on the event loop (8 MB took 20-50 ms to count whole, the longest
    step the loop ran while such bodies arrived), and past ``max_values`` it is refused at once:
    the rest is never kept."""
    length = request.content_length
    if length is not None and length > limit:
        raise ProxyError(413, f"request body of {length} bytes is over the limit of {limit} bytes",
                         code="body_too_large")
    if not request.can_read_body:
        # read already (by a middleware in front of toolmend's, or none at all): aiohttp keeps
        # what it read, and the bounds above hold for it
        raw = await request.read()
        return raw, estimate_values(raw)
    content = request.content
    if content.is_eof() and content.total_bytes <= WHOLE_BODY_BYTES:
        # the whole body came with the headers (the usual agent request): take it as it is,
        # without a timeout to arm or a piece-by-piece read
        raw = content.read_nowait()
        return raw, _bounded(len(raw), 1 + raw.count(b",") + raw.count(b":"), limit,
                             max_values)
    parts: list[bytes] = []
    size = 0
    values = 1
    try:
        async with asyncio.timeout(timeout if timeout > 0 else None):
            async for piece in content.iter_any():
                size += len(piece)
                values = _bounded(size, values + piece.count(b",") + piece.count(b":"),
                                  limit, max_values)
                parts.append(piece)
    except TimeoutError:
        raise ProxyError(408, f"the request body did not arrive within {timeout:g} s "
                         "(body_timeout)", code="body_timeout",
                         headers={"Connection": "close"}) from None
    return b"".join(parts), values


def _bounded(size: int, values: int, limit: int, max_values: int) -> int:
    """``values``, once the body so far (``size`` bytes) is known to be within the bounds."""
    if size > limit:
        raise ProxyError(413, f"request body is over the limit of {limit} bytes",
                         code="body_too_large", headers={"Connection": "close"})
    if max_values and values > max_values:
        raise ProxyError(413, f"request body holds more than {max_values} JSON values, "
                         "estimated from its commas and colons (max_body_values)",
                         code="too_many_values", headers={"Connection": "close"})
    return values


async def read_json_request(request: web.Request, *, any_content_type: bool = False,
                            identify: bool = True) -> dict[str, Any]:
    """``any_content_type``: Ollama clients (``curl -d``) send JSON under any type.
    ``identify=False``: the front calls :func:`identify_request` itself, on its translated
    body (the fingerprint reads chat ``messages``)."""
    settings = request.app[SETTINGS]
    raw, values = await read_body(request, settings.max_body_bytes, settings.body_timeout,
                                  settings.max_body_values)
    ctype = ("application/json" if any_content_type
             else request.headers.get("Content-Type", "application/json"))
    body = await read_json_body(raw, ctype,
                                admit=lambda size: request.app[LARGE_BODIES].admit(request,
                                                                                    size),
                                max_values=settings.max_body_values, values=values)
    if identify:
        identify_request(request, body)
    return body


def identify_request(request: web.Request, body: dict[str, Any]) -> None:
    """Agent and session by the trust table (identity.py), the key's model allow-list, and the
    model on the context."""
    ctx: RequestContext = request[CTX]
    ident = identity.resolve(request, body)  # the trust table: see identity.py
    ctx.agent_id, ctx.session_id = ident.agent, ident.session
    ctx.identity = ident
    auth.check_body(request, body)
    model = body.get("model")
    ctx.model = model if isinstance(model, str) else None


DownstreamFactory = Callable[[web.Request, RequestContext, float], Downstream]


async def forward(request: web.Request, body: dict[str, Any], path: str,
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
    if detected is not None and detected.kind not in ("unknown", "loading"):
        ctx.backend = detected.kind
    elif settings.backend != "auto":
        ctx.backend = settings.backend
    ctx.key_output_cap = auth.output_cap(request)
    ctx.context_length = detected.context_length if detected is not None else None
    cap_output_tokens(body, ctx.key_output_cap, ctx.context_length)
    request.app[TELEMETRY].prepare(request, ctx, body)
    gw = gateway.config(request.app)
    priority = gw.gateway_priority(request) if gw is not None else None
    if priority is None:  # a trusted gateway's objective is final; else X-Priority, capped
        priority = sched.resolve_priority(ctx.agent_id, request.headers.get(PRIORITY_HEADER))
    if gw is not None:
        gw.stamp(ctx, priority)  # in front of a gateway: agent and objective go with it
    deadline = parse_deadline(request.headers.get(DEADLINE_HEADER), sched.clock())
    if settings.vllm_priority:  # the class, and loop steps first within it (vllm_priority.py)
        body["priority"] = upstream_priority(priority, sched.loop_step(
            ctx.agent_id, ctx.session_id, request_cost(body, request.content_length)))
    else:  # a client's own "priority" would reach a priority-scheduling server past the
        body.pop("priority", None)  # policy that X-Priority is held to
    mending = None
    if path == "/v1/chat/completions":
        # without tools only structured calls are checked, and their retry (plain text) is the
        # same on every backend: no need to know which one it is
        backend = settings.backend if settings.backend != "auto" or not body.get("tools") \
            else (await up.detect()).kind
        toolset = await request_toolset(request.app, body, settings)  # off the loop if large
        if backend != "auto":
            ctx.backend = backend
        mending = ChatMending.for_request(settings, body, ctx, request.headers, backend, toolset)
    if not ctx.stream:
        raw = orjson.dumps(mending.upstream_body() if mending else body)
        async with sched.slot(ctx, estimate_cost(body, raw), priority=priority,
                              deadline=deadline):
            return await relay_json(ctx, up, path, raw,
                                    mending.json_transform(up, path) if mending else None,
                                    as_stream=mending is not None and mending.whole_as_stream)
    mender = mending.mender() if mending else None
    down = (make_down or Downstream)(request, ctx, settings.keepalive_interval)
    # a front with a reply decoder gets events from the pipeline, not SSE bytes to decode
    pipeline = StreamPipeline(client_wants_usage(body), mender, settings.max_upstream_event_bytes,
                              down.reply)
    ask_for_usage(body)
    raw = orjson.dumps(mending.upstream_body() if mending else body)
    down.start_keepalive()  # keep-alives flow while the request waits for a slot
    try:
        async with sched.slot(ctx, estimate_cost(body, raw), priority=priority,
                              deadline=deadline) as grant:
            # output is charged from the pipeline's event count, read only when the
            # scheduler decides: nothing added to the per-chunk path
            grant.track_events(pipeline.stats)
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


