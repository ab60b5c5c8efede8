"""The upstream's hot path: a lean HTTP/1.1 client over pooled keep-alive connections.

Every chat request toolmend relays is one POST to the backend and one streamed answer. aiohttp's
client does that with a request object, a response object, a payload registry lookup, a writer
task, a connector and a stream reader whose every chunk passes through half a dozen Python
calls; measured, that was about a fifth of toolmend's CPU per request. Here the same exchange
is one ``asyncio.Protocol`` per connection: the request goes out in a single write, httptools
(llhttp, the parser Node.js uses) parses the answer in C, and each body chunk lands in a
:class:`Body` buffer that the relay reads with :meth:`Body.readany`.

The failures look exactly like aiohttp's (``ClientConnectorError``, ``ServerDisconnectedError``,
``ClientOSError``, ``ClientPayloadError``, ``ConnectionTimeoutError``), so the upstream's
failover, stale keep-alive resend and error mapping treat both clients alike. The small GETs
(probes, model lists, detection) stay on aiohttp: they are not on the hot path.

Flow control: a body buffers at most :data:`HIGH_WATER` bytes before the socket stops being
read, so a slow client stalls the backend instead of growing memory.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httptools
from aiohttp.client_reqrep import ConnectionKey

#: Bytes a body buffers before the connection stops reading (aiohttp's default, 64 KiB).
HIGH_WATER = 1 << 16
#: An idle pooled connection older than this is closed instead of reused (aiohttp's default).
KEEPALIVE_SECONDS = 30.0


class Origin:
    """Where a URL's requests go: scheme, host, port, and the bytes of its Host header."""

    __slots__ = ("host", "host_header", "is_ssl", "key", "port", "prefix")

    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.is_ssl = u.scheme == "https"
        self.host = u.hostname
        default = 443 if self.is_ssl else 80
        self.port = u.port or default
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if self.port == default else f"{host}:{self.port}"
        self.key = (u.scheme, self.host, self.port)
        self.prefix = u.path.rstrip("/")

    def connection_key(self) -> ConnectionKey:
        return ConnectionKey(self.host, self.port, self.is_ssl, True, None, None, None, None)


class Body:
    """A response body as it arrives; ``readany`` returns everything buffered, or waits."""

    __slots__ = ("_buf", "_conn", "_eof", "_exc", "_sink", "_size", "_waiter")

    def __init__(self, conn: _Connection) -> None:
        self._sink: Callable[[bytes], None] | None = None
        self._buf: list[bytes] = []
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._conn = conn

    def is_eof(self) -> bool:
        return self._eof and not self._buf

    async def readany(self) -> bytes:
        """The bytes buffered since the last read, at least one; ``b""`` at the end."""
        if not self._buf:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            self._waiter = w = self._conn.loop.create_future()
            try:
                await w
            finally:
                self._waiter = None
            if not self._buf:
                if self._exc is not None:
                    raise self._exc
                return b""
        buf = self._buf
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        buf.clear()
        if self._size > HIGH_WATER:
            self._conn.resume()
        self._size = 0
        return data

    # diverted: chunks handed over as they arrive ---------------------------------------------
    def divert(self, sink: Callable[[bytes], None]) -> bytes:
        """From now on, hand each chunk to ``sink`` as it arrives, from the connection's own
        ``data_received``, instead of buffering it for :meth:`readany`: no task wakes up per
        chunk. Returns what was buffered before (the caller feeds it to ``sink`` first). The
        consumer waits in :meth:`wait` for the end, an error, or its own :meth:`wake`."""
        buf = self._buf
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        buf.clear()
        self._size = 0
        self._conn.resume()
        self._sink = sink
        return data

    def undivert(self) -> None:
        self._sink = None

    @property
    def ended(self) -> bool:
        """The body ended, whole or not (after :meth:`wait`: see :meth:`raise_error`)."""
        return self._eof or self._exc is not None

    def raise_error(self) -> None:
        if self._exc is not None:
            raise self._exc

    async def wait(self) -> None:
        """Until the body ends, fails, or :meth:`wake` is called."""
        if self._eof or self._exc is not None:
            return
        self._waiter = w = self._conn.loop.create_future()
        try:
            await w
        finally:
            self._waiter = None

    def wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def pause(self) -> None:
        """Stop reading the socket (the consumer cannot take more now)."""
        self._conn.pause()

    def resume(self) -> None:
        self._conn.resume()

    # fed by the connection
    def _feed(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None:
            sink(data)
            return
        self._buf.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER:
            self._conn.pause()
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _end(self, exc: BaseException | None = None) -> None:
        if self._eof or self._exc is not None:
            return
        if exc is None:
            self._eof = True
        else:
            self._exc = exc
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)


class Response:
    """Status, headers (names lower-cased), ``content_length`` and the :class:`Body`."""

    __slots__ = ("_conn", "content", "content_length", "headers", "status")

    def __init__(self, conn: _Connection, status: int, headers: dict[str, str]) -> None:
        self._conn = conn
        self.status = status
        self.headers = headers
        length = headers.get("content-length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self.content = Body(conn)

    def release(self) -> None:
        """The body was read to the end: the connection goes back to the pool (if it may)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.done(reuse=self.content.is_eof())

    def close(self) -> None:
        """Unfinished: close the connection, so the backend sees the client leave at once."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.done(reuse=False)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; httptools calls the ``on_*`` methods from ``feed_data``."""

    def __init__(self, pool: Pool, origin: Origin, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.idle_since = 0.0
        self._head: asyncio.Future[Response] | None = None
        self._headers: dict[str, str] = {}
        self._response: Response | None = None
        self._complete = False  # the current response's message ended
        self._until_close = False  # no length, not chunked: the body ends with the connection
        self._keep_alive = False  # the answer allows the connection to be reused
        self._paused = False

    # asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # no request asks to upgrade: treat as garbage
            self._fail(aiohttp.ClientError("upstream switched protocols unasked"))
        except httptools.HttpParserError as e:
            if self._response is None:
                self._fail(aiohttp.ClientError(f"invalid HTTP response: {e}"))
            else:
                self._fail(aiohttp.ClientPayloadError(f"Response payload is not completed: {e}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool._forget(self)
        resp = self._response
        if resp is not None and not self._complete:
            if self._until_close and exc is None:
                self._complete = True
                resp.content._end()
            else:
                resp.content._end(aiohttp.ClientPayloadError(
                    "Response payload is not completed: the connection closed"
                    + (f" ({exc.__class__.__name__}: {exc})" if exc else "")))
        head = self._head
        if head is not None and not head.done():
            head.set_exception(aiohttp.ServerDisconnectedError() if exc is None else
                               aiohttp.ClientOSError(getattr(exc, "errno", None) or 0,
                                                     str(exc)))

    # httptools callbacks ---------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        headers, self._headers = self._headers, {}
        if status < 200:  # an interim answer (100 Continue): the real one follows
            return
        resp = self._response = Response(self, status, headers)
        self._keep_alive = self.parser.should_keep_alive()  # read now: reset once it completes
        self._until_close = (status not in (204, 304) and "content-length" not in headers
                             and "chunked" not in headers.get("transfer-encoding", "").lower())
        head = self._head
        if head is not None and not head.done():
            head.set_result(resp)

    def on_body(self, body: bytes) -> None:
        resp = self._response
        if resp is not None:
            resp.content._feed(body)

    def on_message_complete(self) -> None:
        resp = self._response
        if resp is None:
            return  # the end of an interim answer
        self._complete = True
        resp.content._end()

    # ours --------------------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        head = self._head
        if head is not None and not head.done():
            head.set_exception(exc)
        elif self._response is not None:
            self._response.content._end(exc)
        self.close()

    def send(self, head: bytes, body: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None
        self._head = fut = self.loop.create_future()
        self._response = None
        self._complete = self._until_close = self._keep_alive = False
        self.transport.writelines((head, body))  # no copy of a large body
        return fut

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.lost:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.lost:
            self._paused = False
            self.transport.resume_reading()

    def done(self, *, reuse: bool) -> None:
        """The exchange is over (read to the end, or abandoned)."""
        self._head = None
        if reuse and self._complete and self._keep_alive and not self.lost \
                and not self._until_close:
            self._response = None
            self.resume()
            self.pool._idle_push(self)
        else:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()
        self.pool._forget(self)


class Pool:
    """Keep-alive connections per origin, at most ``limit`` open at once (0: no limit)."""

    def __init__(self, *, limit: int, connect_timeout: float | None) -> None:
        self.limit = limit
        self.connect_timeout = connect_timeout or None  # 0: none, as aiohttp reads it
        self._origins: dict[str, Origin] = {}
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    def origin(self, base_url: str) -> Origin:
        o = self._origins.get(base_url)
        if o is None:
            o = self._origins[base_url] = Origin(base_url)
        return o

    async def request(self, method: str, base_url: str, path: str, headers: dict[str, str],
                      body: bytes) -> Response:
        """Send one request and wait for its status and headers; the body streams after."""
        origin = self.origin(base_url)
        lines = [f"{method} {origin.prefix}{path} HTTP/1.1\r\nHost: {origin.host_header}\r\n"]
        for k, v in headers.items():
            lines.append(f"{k}: {v}\r\n")
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        head = "".join(lines)
        if head.count("\n") != len(lines) + 2 or head.count("\r") != len(lines) + 2:
            raise aiohttp.ClientError("a request header holds a line break; not sent")
        conn = await self._acquire(origin)
        try:
            return await conn.send(head.encode(), body)  # as aiohttp writes them: UTF-8
        except BaseException:
            conn.close()
            raise

    async def _acquire(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        while True:
            idle = self._idle.get(origin.key)
            now = loop.time()
            while idle:
                conn = idle.pop()  # the most recently used: the least likely to be stale
                if conn.lost or conn.transport is None or conn.transport.is_closing():
                    self._forget(conn)
                    continue
                if now - conn.idle_since > KEEPALIVE_SECONDS:
                    conn.close()
                    continue
                return conn
            if not self.limit or len(self._open) < self.limit:
                return await self._connect(origin, loop)
            w = loop.create_future()
            self._waiters.append(w)
            try:
                await w
            except BaseException:
                if w in self._waiters:
                    self._waiters.remove(w)
                elif w.done() and not w.cancelled():
                    self._wake()  # woken, then cancelled: the free connection is someone else's
                raise

    async def _connect(self, origin: Origin, loop: asyncio.AbstractEventLoop) -> _Connection:
        ctx: ssl.SSLContext | None = None
        if origin.is_ssl:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            ctx = self._ssl
        conn = _Connection(self, origin, loop)
        self._open.add(conn)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(lambda: conn, origin.host, origin.port, ssl=ctx)
        except TimeoutError as e:
            self._forget(conn)
            raise aiohttp.ConnectionTimeoutError(
                f"Connection timeout to host {origin.host}:{origin.port}") from e
        except OSError as e:
            self._forget(conn)
            raise aiohttp.ClientConnectorError(origin.connection_key(), e) from e
        except BaseException:
            self._forget(conn)
            if conn.transport is not None:
                conn.transport.close()
            raise
        return conn

    def _idle_push(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        conn.idle_since = conn.loop.time()
        self._idle.setdefault(conn.origin.key, deque()).append(conn)
        self._wake()

    def _forget(self, conn: _Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            idle = self._idle.get(conn.origin.key)
            if idle and conn in idle:
                idle.remove(conn)
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._open):
            if conn.transport is not None and not conn.lost:
                conn.transport.close()
        self._open.clear()
        self._idle.clear()

    def stats(self) -> dict[str, Any]:
        return {"open": len(self._open), "idle": sum(len(d) for d in self._idle.values())}
