"""The client writer's one-write path (``Downstream.write`` past the first chunk), on a real
aiohttp server: the bytes a client receives are exactly what was written, framed as aiohttp
frames them, for HTTP/1.1 (chunked) and HTTP/1.0 (not chunked: aiohttp's own way) alike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from toolmend.pipeline.downstream import DRAIN_MARK, Downstream
from toolmend.server.context import RequestContext

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PIECES = [b"data: one\n\n", b"data: two\n\n", b"", b"data: " + b"x" * 70_000 + b"\n\n",
          b"data: [DONE]\n\n"]


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, list[Downstream]]]:
    seen: list[Downstream] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        down = Downstream(request, RequestContext("req_1", "/", 0.0), 0)
        seen.append(down)
        for piece in PIECES:
            if piece:
                await down.write(piece)
        return await down.close()

    runner, port = await _serve(handler)
    yield port, seen
    await runner.cleanup()


async def _serve(handler: Handler) -> tuple[web.AppRunner, int]:
    """A real aiohttp server answering ``GET /`` with ``handler``; its runner and port."""
    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def _raw(port: int, version: str) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET / HTTP/{version}\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await r.read()
    w.close()
    return data


def _dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        n = int(size_line, 16)
        if n == 0:
            assert body == b"\r\n"
            return out
        out += body[:n]
        assert body[n:n + 2] == b"\r\n"
        body = body[n + 2:]


async def test_http11_stream_is_chunked_and_whole(server: tuple[int, list[Downstream]]) -> None:
    port, seen = server
    raw = await _raw(port, "1.1")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert _dechunk(body) == b"".join(PIECES)
    down = seen[0]
    assert down.ctx.bytes_out == sum(len(p) for p in PIECES)
    assert len(PIECES[3]) > DRAIN_MARK  # one piece passes the drain mark on its own
    assert down._direct is None  # closed: the stream's end went aiohttp's way


async def test_http10_stream_is_not_chunked(server: tuple[int, list[Downstream]]) -> None:
    port, _ = server
    raw = await _raw(port, "1.0")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"chunked" not in head
    assert body == b"".join(PIECES)


async def test_direct_writer_is_chosen_after_the_headers_are_out() -> None:
    chosen: list[bool] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        down = Downstream(request, RequestContext("req_1", "/", 0.0), 0)
        chosen.append(down._direct is not None)
        await down.write(b"data: a\n\n")  # the headers go out with this one
        chosen.append(down._direct is not None)
        await down.write(b"")  # nothing: never the chunked body's end
        await down.write(b"data: b\n\n")
        chosen.append(down._direct is not None)
        return await down.close()

    runner, port = await _serve(handler)
    raw = await _raw(port, "1.1")
    await runner.cleanup()
    assert chosen == [False, True, True]
    assert _dechunk(raw.partition(b"\r\n\r\n")[2]) == b"data: a\n\ndata: b\n\n"
