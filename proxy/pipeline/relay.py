"""Moving one request's bytes between the upstream and the client.

Thin on purpose: every decision about the bytes lives in ``parsers/stream.py``. What lives here
is I/O discipline: never buffer a stream (each upstream read is written as soon as it is
processed, and ``write`` waits for the client to drain, so a slow reader stalls the upstream
read instead of growing memory), close the upstream the moment the client leaves, and turn every
failure into an OpenAI-shaped error at the right place (status line or in-stream event).

That includes failures nobody foresaw: once the client has a 200 and part of a stream, an
exception that escaped would leave it with a cut chunked body and no ``[DONE]``, so the stream's
edge catches everything, logs it, and ends the stream with an ``internal_error`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from toolmend.backends.http1 import Body
from toolmend.backends.upstream import UpstreamCall, UpstreamClient
from toolmend.parsers.stream import INVALID_UTF8_NOTE, StreamPipeline, UpstreamStreamError
from toolmend.pipeline.downstream import ClientGone, Downstream
from toolmend.pipeline.whole_reply import fold_stream
from toolmend.server.context import RequestContext
from toolmend.server.errors import ProxyError, normalize_upstream_error

JsonTransform = Callable[[dict[str, Any]], Any]  # may return an awaitable

log = logging.getLogger("toolmend.pipeline.relay")
#: Repair kind recorded when upstream output held invalid UTF-8 (replaced with U+FFFD).
INVALID_UTF8 = "invalid_utf8"


async def relay_stream(request: web.Request, ctx: RequestContext, up: UpstreamClient, path: str,
                       body: bytes, pipeline: StreamPipeline, keepalive_interval: float,
                       down: Downstream | None = None,
                       finisher: Callable[[StreamPipeline], Awaitable[bytes]] | None = None
                       ) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    if down is None:
        down = Downstream(request, ctx, keepalive_interval)
        down.start_keepalive()
    stats = pipeline.stats
    try:
        async with up.call(path, body, headers=ctx.upstream_headers) as call:
            ctx.upstream_headers_at = loop.time()
            if call.status >= 400:
                return await down.fail(await call.error())
            # bytes out (the chat front) go straight to the writer: one coroutine less per chunk
            write = down.write_reply if down.reply is not None else down.write
            chunks = call.chunks()
            async for chunk in chunks:
                out = pipeline.feed(chunk) if type(chunk) is bytes else \
                    pipeline.feed_chunks(chunk)  # type: ignore[arg-type]
                if stats.first_token and ctx.upstream_first_token_at is None:
                    ctx.upstream_first_token_at = loop.time()
                if out:
                    await write(out)  # type: ignore[arg-type]
                    if ctx.client_first_token_at is None and stats.first_token:
                        ctx.client_first_token_at = loop.time()
                    if ctx.first_tool_call_at is None and stats.tool_calls:
                        ctx.first_tool_call_at = loop.time()
                    if down.direct and (body := call.divertable()) is not None:
                        await chunks.aclose()
                        await _diverted(body, call, pipeline, ctx, down, loop)
                        break
            if not stats.saw_done and not stats.finish_reasons:
                raise ProxyError(502, "upstream ended the stream before it was complete "
                                 "(no finish_reason, no [DONE])", code="upstream_incomplete")
            out = pipeline.finish()
        _record(ctx, pipeline)
        if out:
            await down.write_reply(out)
        if pipeline.awaiting_retry and finisher is not None:
            out = await finisher(pipeline)  # the upstream call is closed; the slot is kept
            await down.write_reply(out)
        if ctx.first_tool_call_at is None and stats.tool_calls:
            ctx.first_tool_call_at = loop.time()
        return await down.close()
    except UpstreamStreamError as e:
        _record(ctx, pipeline)
        with contextlib.suppress(ClientGone):
            if e.pending:
                await down.write_reply(e.pending)
        return await down.fail(_stream_error(e))
    except ProxyError as e:
        _record(ctx, pipeline)
        return await down.fail(e)
    except ClientGone:
        _record(ctx, pipeline)
        ctx.status = 499
        ctx.error_code = "client_disconnected"
        await down.stop_keepalive()
        return down.resp
    except Exception as e:  # the safety net: a bug must not cut the client's stream
        _record(ctx, pipeline)
        log.exception("request %s failed while relaying %s", ctx.request_id, path)
        return await down.fail(internal_error(e))
    finally:
        ctx.finished_at = loop.time()


async def _diverted(body: Body, call: UpstreamCall, pipeline: StreamPipeline,
                    ctx: RequestContext, down: Downstream,
                    loop: asyncio.AbstractEventLoop) -> None:
    """The rest of the stream, each chunk handled where it arrives: in the upstream socket's
    ``data_received``, mended, encoded and written to the client's transport there, with no
    task woken per chunk (what the loop above costs: the body's reader, the chunk generator,
    this coroutine and the write coroutines, every chunk).

    Taken once the client's headers are out and its writer takes direct writes (so a chunk's
    write never waits). The same discipline holds: when the client's buffer passes the drain
    mark the upstream socket stops being read until it drains; a failure, raised inside the
    callback, stops the diversion and is raised here, where the loop above would have raised
    it; the timeouts are the call's, as before.
    """
    stats = pipeline.stats
    feed = pipeline.feed
    encode = down.encode_reply
    push = down.push
    moved = call.moved
    failure: list[BaseException] = []
    must_drain = False

    def sink(chunk: bytes) -> None:
        nonlocal must_drain
        try:
            moved()
            out = feed(chunk)
            if stats.first_token and ctx.upstream_first_token_at is None:
                ctx.upstream_first_token_at = loop.time()
            if out:
                data = encode(out)
                if data and push(data):
                    must_drain = True
                    body.pause()
                    body.wake()
                if ctx.client_first_token_at is None and stats.first_token:
                    ctx.client_first_token_at = loop.time()
                if ctx.first_tool_call_at is None and stats.tool_calls:
                    ctx.first_tool_call_at = loop.time()
        except BaseException as e:  # raised below, in the relay's own task
            failure.append(e)
            body.undivert()
            body.pause()
            body.wake()

    first = body.divert(sink)
    try:
        if first:
            sink(first)
        while True:
            if failure:
                raise failure[0]
            if must_drain:
                must_drain = False
                await down.drain()
                body.resume()
                continue
            if body.ended:
                break
            try:
                await body.wait()
            except BaseException as e:  # a timeout cancels the wait: as the loop's read
                call.raise_failure(e)
        try:
            body.raise_error()
        except BaseException as e:
            call.raise_failure(e)
    finally:
        body.undivert()


async def relay_json(ctx: RequestContext, up: UpstreamClient, path: str, body: bytes,
                     transform: JsonTransform | None = None, *,
                     as_stream: bool = False) -> web.Response:
    """A non-streaming reply; ``as_stream``: the request asked the upstream for a stream, which
    is folded into the reply object first (see ``whole_reply.py``)."""
    loop = asyncio.get_running_loop()
    try:
        async with up.call(path, body, headers=ctx.upstream_headers) as call:
            ctx.upstream_headers_at = loop.time()
            raw = await call.read_all()
            status = call.status
        if status >= 400:
            raise normalize_upstream_error(status, raw)
        try:
            if as_stream:
                obj, replaced = fold_stream(raw)
                note_invalid_utf8(ctx, replaced)
            else:
                obj = _loads_reply(ctx, raw)
        except orjson.JSONDecodeError:
            raise ProxyError(502, "upstream sent a response that is not JSON",
                             code="upstream_bad_response") from None
        if not isinstance(obj, dict):
            raise ProxyError(502, "upstream sent a JSON response that is not an object",
                             code="upstream_bad_response")
        ctx.upstream_first_token_at = ctx.client_first_token_at = loop.time()
        if transform is not None:
            result = transform(obj)
            obj = await result if inspect.isawaitable(result) else result
        if isinstance(obj.get("usage"), dict):
            ctx.usage = obj["usage"]
        for c in obj.get("choices") or ():
            if isinstance(c, dict) and c.get("finish_reason"):
                ctx.finish_reasons.append(c["finish_reason"])
        ctx.status = 200
        headers = {"X-Request-Id": ctx.request_id}
        notes = ctx.repair_notes
        if ctx.invalid_utf8:
            notes = [INVALID_UTF8_NOTE, *notes]
        if notes:
            headers["X-Toolmend-Repairs"] = "; ".join(notes)[:4000].replace("\n", " ")
        return web.Response(body=orjson.dumps(obj), content_type="application/json",
                            headers=headers)
    except ProxyError as e:
        ctx.status = e.status
        ctx.error_code = e.code
        return e.response()
    finally:
        ctx.finished_at = loop.time()


def internal_error(e: BaseException) -> ProxyError:
    """What the client is told about a failure toolmend did not foresee (the log has more)."""
    return ProxyError(500, f"internal error in toolmend ({e.__class__.__name__}); see its log",
                      code="internal_error")


def _loads_reply(ctx: RequestContext, raw: bytes) -> Any:
    """Parse a whole upstream reply; invalid UTF-8 in it is replaced, counted and reported
    (the reply is re-encoded anyway, so only a reply that needs it pays)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            raw.decode()
        except UnicodeDecodeError:
            obj = orjson.loads(raw.decode("utf-8", "replace"))
            note_invalid_utf8(ctx, 1)
            return obj
        raise


def note_invalid_utf8(ctx: RequestContext, events: int) -> None:
    """Record replaced invalid UTF-8: a count for the metric, one repair for the trace."""
    if not events:
        return
    if not ctx.invalid_utf8:
        ctx.repairs.append({"kind": INVALID_UTF8, "events": events})
    ctx.invalid_utf8 = events


def _record(ctx: RequestContext, pipeline: StreamPipeline) -> None:
    st = pipeline.stats
    ctx.usage = st.usage
    ctx.finish_reasons = st.finish_reasons
    if st.model and not ctx.response_model:
        ctx.response_model = st.model
    note_invalid_utf8(ctx, st.invalid_utf8)


def _stream_error(e: UpstreamStreamError) -> ProxyError:
    if e.final:
        doc = orjson.loads(e.body)["error"]
        extra = {k: v for k, v in doc.items() if k not in ("message", "type", "param", "code")}
        return ProxyError(e.status, doc["message"], code=doc.get("code"), param=doc.get("param"),
                          type=doc.get("type"), extra=extra)
    err = normalize_upstream_error(e.status, e.body)
    if err.code == "upstream_error" and e.status == 500:
        err.code = "upstream_stream_error"
    return err
