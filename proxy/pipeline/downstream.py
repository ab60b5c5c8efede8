"""The client side of one SSE response: lazy start, keep-alives, in-stream errors.

The response is started (status 200 and headers sent) as late as possible, so that an upstream
error that arrives before any output can still be given its real HTTP status. Only a keep-alive
comment or the first output forces the start; after that, errors travel in the stream as
``data: {"error": ...}`` followed by ``data: [DONE]``.

Each writer registers itself on its request (:data:`DOWNSTREAM`), so that the app's error
middleware, the last line of defence, can end a stream that an unforeseen exception left open
in the API's own way instead of appending a second HTTP response to a started one.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web
from aiohttp.http_writer import StreamWriter

from toolmend.parsers.reply import ChatReplyDecoder
from toolmend.parsers.sse import encode_comment
from toolmend.parsers.stream import Output
from toolmend.server.context import RequestContext
from toolmend.server.errors import ProxyError

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
}
KEEPALIVE = encode_comment("keep-alive")
#: Buffered bytes past which a write waits for the client to drain (aiohttp's own mark).
DRAIN_MARK = 0x10000


class ClientGone(Exception):
    """The client closed its connection; stop, release everything, write nothing more."""


class Downstream:
    """The chat-completions client writer: the pipeline's SSE bytes go out as they are.

    A front that speaks another API subclasses it, sets :attr:`reply` to its
    :class:`~toolmend.parsers.reply.ChatReplyDecoder`, and overrides :meth:`write_reply`: the
    pipeline then hands it reply events instead of bytes (see ``parsers/stream.py``)."""

    __slots__ = ("_direct", "_ended", "_ka_handle", "_ka_task", "_lock", "ctx", "interval",
                 "reply", "request", "resp")

    def __init__(self, request: web.Request, ctx: RequestContext, keepalive_interval: float):
        self.request = request
        self.ctx = ctx
        self.interval = keepalive_interval
        headers = dict(SSE_HEADERS)
        headers["X-Request-Id"] = ctx.request_id
        self.resp = web.StreamResponse(status=200, headers=headers)
        self._lock = asyncio.Lock()
        self._ka_task: asyncio.Task[None] | None = None
        self._ka_handle: asyncio.TimerHandle | None = None
        self._ended = False  # the stream's end (done or error) was written
        self._direct: StreamWriter | None = None  # see _direct_writer
        #: set by a front that takes reply events (the pipeline feeds this decoder)
        self.reply: ChatReplyDecoder | None = None
        request[DOWNSTREAM] = self

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def started(self) -> bool:
        return self.resp.prepared

    async def start(self) -> None:
        if self.resp.prepared:
            return
        async with self._lock:
            if not self.resp.prepared:
                self.ctx.status = 200
                try:
                    await self.resp.prepare(self.request)
                except (ConnectionError, RuntimeError) as e:
                    raise ClientGone() from e

    def encode_reply(self, out: Output) -> bytes:
        """The bytes for the pipeline's output: SSE bytes as they are here; a front with
        :attr:`reply` set gets events and overrides this (sync: the relay may call it from
        the upstream socket's own callback, see ``relay.py``)."""
        return out  # type: ignore[return-value]

    async def write_reply(self, out: Output) -> None:
        data = self.encode_reply(out)
        if data:
            await self.write(data)

    def push(self, data: bytes) -> bool:
        """Write now, without waiting: only once :meth:`direct` is True. Returns True when the
        client's buffer is past the drain mark (the caller stops reading the upstream and
        awaits :meth:`drain`). Raises :class:`ClientGone` when the client has left."""
        w = self._direct
        assert w is not None
        transport = w._protocol.transport
        if transport is None or transport.is_closing():
            raise ClientGone()
        n = len(data)
        if not n:
            return False  # an empty chunk would be the body's end: nothing to send
        frame = b"%x\r\n%b\r\n" % (n, data)
        transport.write(frame)
        w.output_size += len(frame)
        w.buffer_size += len(frame)
        self.ctx.bytes_out += n
        return w.buffer_size > DRAIN_MARK

    @property
    def direct(self) -> bool:
        """Whether :meth:`push` may be used (see :func:`_direct_writer`)."""
        return self._direct is not None

    async def drain(self) -> None:
        w = self._direct
        if w is None:
            return
        w.buffer_size = 0
        try:
            await w.drain()
        except (ConnectionError, RuntimeError) as e:
            raise ClientGone() from e

    async def write(self, data: bytes) -> None:
        if self._direct is not None:  # the usual write, once the headers are out
            if data and self.push(data):
                await self.drain()
            return
        if not self.resp.prepared:
            await self.start()
        try:
            await self.resp.write(data)
        except (ConnectionError, RuntimeError) as e:
            raise ClientGone() from e
        self.ctx.bytes_out += len(data)
        if not self._ended:
            self._direct = _direct_writer(self.resp)

    def start_keepalive(self) -> None:
        """Until the first token, send a keep-alive every ``interval`` seconds.

        Until the first one is due only a timer waits (most replies start well before it): a
        task per request, started and cancelled, cost every request a few loop turns."""
        if self.interval > 0 and self._ka_task is None and self._ka_handle is None:
            self._ka_handle = asyncio.get_running_loop().call_later(self.interval, self._ka_due)

    def _ka_due(self) -> None:
        self._ka_handle = None
        if self.ctx.client_first_token_at is None and self._ka_task is None:
            self._ka_task = asyncio.get_running_loop().create_task(self._keepalive())

    async def stop_keepalive(self) -> None:
        handle, self._ka_handle = self._ka_handle, None
        if handle is not None:
            handle.cancel()
        task, self._ka_task = self._ka_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ClientGone):
                await task

    def keepalive_bytes(self) -> bytes:
        """What one keep-alive is: an SSE comment here; a front may send its API's own."""
        return KEEPALIVE

    async def _keepalive(self) -> None:
        """Started when the first keep-alive is due: it, then one every ``interval``."""
        with contextlib.suppress(ClientGone):
            while self.ctx.client_first_token_at is None:
                await self.write(self.keepalive_bytes())
                await asyncio.sleep(self.interval)

    async def fail(self, err: ProxyError) -> web.StreamResponse:
        """Answer with an error: a real status if nothing was sent yet, else in the stream."""
        self.ctx.error_code = err.code
        await self.stop_keepalive()
        if not self.resp.prepared:
            self.ctx.status = err.status
            return err.response()
        if self._ended:
            return self.resp
        self._ended = True
        self._direct = None
        with contextlib.suppress(ClientGone, ConnectionError, RuntimeError):
            await self.write(err.sse())
            await self.resp.write_eof()
        return self.resp

    async def close(self) -> web.StreamResponse:
        await self.stop_keepalive()
        if not self.resp.prepared:
            await self.start()
        self._ended = True
        self._direct = None
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.resp.write_eof()
        return self.resp


def _direct_writer(resp: web.StreamResponse) -> StreamWriter | None:
    """aiohttp's writer, when a chunk may go to its transport in one write instead of through
    four layers of Python (response, writer, chunk framing, lines), else None.

    That is when the body is chunked, uncompressed, of no fixed length, nobody watches the
    chunks, and the headers, which aiohttp holds back to send with the first chunk, are out.
    The writer's own counts are kept, so ``write_eof`` and the drain mark work as before; on
    an aiohttp without these attributes every write simply takes aiohttp's own way.
    """
    w = getattr(resp, "_payload_writer", None)
    if type(w) is not StreamWriter or not w.chunked:
        return None
    if getattr(w, "_compress", 1) is not None or getattr(w, "length", 1) is not None:
        return None
    if getattr(w, "_on_chunk_sent", 1) is not None or getattr(w, "on_body_write", None):
        return None
    if not getattr(w, "_headers_written", False) or getattr(w, "_headers_buf", 1):
        return None
    if not hasattr(w, "buffer_size") or not hasattr(w, "output_size"):
        return None
    return w


class WholeReplyBound:
    """What a front gathers to answer ``stream: false`` from the stream it asked for is bounded
    like any reply read whole (``max_upstream_reply_bytes``, counted on the stream fed in)."""

    __slots__ = ("fed", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.fed = 0

    def add(self, n: int) -> None:
        self.fed += n
        if self.fed > self.limit:
            raise ProxyError(502, f"upstream sent a reply over the limit of {self.limit} bytes "
                             "(max_upstream_reply_bytes)", code="upstream_reply_too_large")


#: The request's client writer, for the error middleware (see the module's docstring).
DOWNSTREAM = web.RequestKey("toolmend_downstream", Downstream)
