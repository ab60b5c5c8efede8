"""The upstream's lean HTTP/1.1 client (``backends/http1.py``) against real sockets.

Raw asyncio servers write exactly the bytes each case needs (split where the case says), so
framing, keep-alive, the failures and their aiohttp-compatible classes are all observed on the
wire rather than assumed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolmend.backends.http1 import HIGH_WATER, Pool, Response

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A TCP server running ``handler`` per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(r, w)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                w.close()

        self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


async def read_request(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await r.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await r.readexactly(length)


async def read_all(resp: Response) -> bytes:
    out = b""
    while chunk := await resp.content.readany():
        out += chunk
    return out


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


async def test_keep_alive_connection_is_reused_and_the_request_is_sent_whole() -> None:
    seen: list[tuple[bytes, bytes]] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(r)
            seen.append((head, body))
            w.write(SSE_HEAD + chunked(b"data: one\n\n", b"data: two\n\n"))
            await w.drain()

    async with RawServer(handler) as srv:
        pool = Pool(limit=4, connect_timeout=5)
        for i in range(3):
            resp = await pool.request("POST", srv.url + "/base", "/v1/chat/completions",
                                      {"Authorization": "Bearer k"}, b'{"n":%d}' % i)
            assert resp.status == 200
            assert resp.headers["content-type"] == "text/event-stream"
            assert await read_all(resp) == b"data: one\n\ndata: two\n\n"
            assert resp.content.is_eof()
            resp.release()
        await pool.close()
    assert srv.connections == 1
    head, body = seen[2]
    assert head.startswith(b"POST /base/v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer k\r\n" in head
    assert b"\r\nContent-Length: 7\r\n" in head
    assert body == b'{"n":2}'


async def test_connection_close_and_unread_bodies_are_not_reused() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(r)
            if b"/close" in head:
                w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
            else:
                w.write(SSE_HEAD + chunked(b"a" * 10))  # no end of message sent: still open
            await w.drain()

    async with RawServer(handler) as srv:
        pool = Pool(limit=4, connect_timeout=5)
        resp = await pool.request("GET", srv.url, "/close", {}, b"")
        assert await read_all(resp) == b"ok"
        resp.release()
        assert pool.stats() == {"open": 0, "idle": 0}
        resp = await pool.request("GET", srv.url, "/open", {}, b"")
        assert await resp.content.readany()
        resp.close()  # abandoned mid-body: the socket closes
        assert pool.stats() == {"open": 0, "idle": 0}
        await pool.close()
    assert srv.connections == 2


async def test_body_without_length_ends_with_the_connection() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n")
        w.write(b'{"a":')
        await w.drain()
        w.write(b"1}")
        await w.drain()

    async with RawServer(handler) as srv:
        pool = Pool(limit=0, connect_timeout=5)
        resp = await pool.request("POST", srv.url, "/x", {}, b"{}")
        assert resp.content_length is None
        assert await read_all(resp) == b'{"a":1}'
        resp.release()
        assert pool.stats()["idle"] == 0
        await pool.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=6),
       cuts=st.lists(st.integers(min_value=1, max_value=300), max_size=12))
def test_chunked_body_split_anywhere_arrives_whole(parts: list[bytes], cuts: list[int]) -> None:
    wire = SSE_HEAD + chunked(*parts)
    points = sorted({c % len(wire) for c in cuts} - {0})
    pieces = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        for p in pieces:
            w.write(p)
            await w.drain()
            await asyncio.sleep(0)  # separate segments, as far as the kernel lets them be

    async def run() -> tuple[bytes, bool]:
        async with RawServer(handler) as srv:
            pool = Pool(limit=1, connect_timeout=5)
            resp = await pool.request("POST", srv.url, "/x", {}, b"{}")
            body = await read_all(resp)
            eof = resp.content.is_eof()
            resp.release()
            await pool.close()
            return body, eof

    assert asyncio.run(run()) == (b"".join(parts), True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=st.binary(min_size=1, max_size=200))
def test_random_bytes_for_an_answer_fail_cleanly(garbage: bytes) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(garbage)
        await w.drain()

    async def run() -> None:
        async with RawServer(handler) as srv:
            pool = Pool(limit=1, connect_timeout=5)
            try:
                resp = await pool.request("POST", srv.url, "/x", {}, b"{}")
            except aiohttp.ClientError:
                pass  # the documented failures, nothing else
            else:
                try:
                    await read_all(resp)
                except aiohttp.ClientError:
                    pass
                resp.close()
            await pool.close()
            assert pool.stats() == {"open": 0, "idle": 0}

    asyncio.run(run())


async def test_drops_raise_what_aiohttp_raises() -> None:
    async def before_head(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)

    async def mid_body(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await w.drain()

    pool = Pool(limit=0, connect_timeout=5)
    async with RawServer(before_head) as srv:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await pool.request("POST", srv.url, "/x", {}, b"{}")
    async with RawServer(mid_body) as srv:
        resp = await pool.request("POST", srv.url, "/x", {}, b"{}")
        assert resp.content_length == 100
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_all(resp)
        resp.close()
    # a port nobody listens on: refused
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(aiohttp.ClientConnectorError) as e:
        await pool.request("POST", f"http://127.0.0.1:{port}", "/x", {}, b"{}")
    assert e.value.port == port and e.value.os_error is not None
    with pytest.raises(aiohttp.ClientError, match="line break"):  # refused before connecting
        await pool.request("POST", f"http://127.0.0.1:{port}", "/x",
                           {"X-Evil": "a\r\nHost: b"}, b"")
    assert pool.stats() == {"open": 0, "idle": 0}
    await pool.close()


def answers(body: bytes) -> Handler:
    """A handler that answers every request on its connection with ``body``, chunked."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await read_request(r)
            w.write(SSE_HEAD + chunked(body))
            await w.drain()

    return handler


async def until_waiting(pool: Pool, n: int) -> None:
    """Until ``n`` requests wait for a connection (each needs a few loop turns to get there)."""
    for _ in range(100):
        if len(pool._waiters) == n:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{len(pool._waiters)} requests wait, not {n}")


async def test_limit_queues_requests_for_a_free_connection() -> None:
    async with RawServer(answers(b"x")) as srv:
        pool = Pool(limit=1, connect_timeout=5)
        first = await pool.request("POST", srv.url, "/x", {}, b"")
        second = asyncio.ensure_future(pool.request("POST", srv.url, "/x", {}, b""))
        await until_waiting(pool, 1)
        assert not second.done() and pool.stats()["open"] == 1  # waiting for the one connection
        assert await read_all(first) == b"x"
        first.release()
        resp = await second
        assert await read_all(resp) == b"x"
        resp.release()
        await pool.close()
    assert srv.connections == 1


async def test_a_body_not_read_stops_the_socket_being_read() -> None:
    piece = b"%x\r\n%s\r\n" % (4096, b"y" * 4096)  # chunks, never the last one

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(SSE_HEAD)
        while True:
            w.write(piece)
            await w.drain()

    async with RawServer(handler) as srv:
        pool = Pool(limit=1, connect_timeout=5)
        resp = await pool.request("POST", srv.url, "/x", {}, b"")
        conn = resp._conn
        assert conn is not None
        paused = asyncio.Event()
        pause = conn.pause

        def pause_and_tell() -> None:
            pause()
            paused.set()

        conn.pause = pause_and_tell  # type: ignore[method-assign]
        if not conn._paused:
            await paused.wait()  # buffered past the mark: reading stopped
        buffered = sum(len(b) for b in resp.content._buf)
        # past the mark by less than one socket read (the event loop reads up to 256 KiB)
        assert HIGH_WATER < buffered <= HIGH_WATER + 256 * 1024
        assert len(await resp.content.readany()) == buffered
        assert not conn._paused  # read: the socket is read again
        resp.close()
        await pool.close()


async def test_a_waiter_woken_then_cancelled_passes_the_connection_on() -> None:
    async with RawServer(answers(b"z")) as srv:
        pool = Pool(limit=1, connect_timeout=5)
        first = await pool.request("POST", srv.url, "/x", {}, b"")
        second = asyncio.ensure_future(pool.request("POST", srv.url, "/x", {}, b""))
        third = asyncio.ensure_future(pool.request("POST", srv.url, "/x", {}, b""))
        await until_waiting(pool, 2)  # both wait for the one connection
        assert await read_all(first) == b"z"
        first.release()  # wakes the second ...
        second.cancel()  # ... which is cancelled before it runs
        async with asyncio.timeout(30):  # a hang fails the test instead of stalling the suite
            resp = await third  # the third gets the connection instead of waiting forever
        assert await read_all(resp) == b"z"
        resp.release()
        assert second.cancelled()
        await pool.close()
    assert srv.connections == 1
