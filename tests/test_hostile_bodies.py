"""Request bodies that parse to many times their size are held a few at a time.

A body of many small JSON values parses to about ten times its size and lives as long as its
request. Past ``large_body_bytes`` (estimated), at most ``max_large_bodies`` are held at once;
one more is refused at once (503 with ``Retry-After``, OpenAI-shaped), and the permit comes back
when the request ends, however it ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from toolmend.server.app import build_app, start_server
from toolmend.server.config import Settings
from toolmend.server.request_body import BYTES_PER_VALUE, LARGE_BODIES, parse_json_body

from .test_hostile_arguments import HostileUpstream, Reply, chunk

MSG = [{"role": "user", "content": "go"}]
# about 40,000 values in 0.6 MB of text: estimated at 4.6 MB parsed
WIDE = {f"k{i:06d}": i for i in range(40_000)}


def body(**extra: Any) -> dict[str, Any]:
    return {"messages": MSG, "metadata_blob": WIDE, **extra}


@pytest.fixture
async def proxy() -> AsyncIterator[Callable[..., Any]]:
    cleanups: list[Any] = []

    async def factory(**settings: Any) -> tuple[HostileUpstream, str, Any]:
        up = HostileUpstream()
        await up.start()
        cleanups.append(up.stop)
        app = build_app(Settings(**{"log_requests": False, "backend": "vllm", **settings}),
                        [up.url])
        runner, port = await start_server(app, "127.0.0.1", 0)
        cleanups.append(runner.cleanup)
        return up, f"http://127.0.0.1:{port}/v1/chat/completions", app

    yield factory
    for fn in reversed(cleanups):
        await fn()


def answer() -> Reply:
    return Reply([chunk({"role": "assistant", "content": "ok"}), chunk({}, "stop")])


def whole_answer() -> Reply:
    return Reply(whole={"id": "c", "object": "chat.completion", "created": 1, "model": "m",
                        "choices": [{"index": 0, "finish_reason": "stop", "message": {
                            "role": "assistant", "content": "ok"}}]})


async def send(url: str, doc: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.post(url, data=orjson.dumps(doc), headers={
            "Content-Type": "application/json"}) as r:
        return r.status, dict(r.headers), await r.read()


def test_parsed_size_is_estimated_from_the_values() -> None:
    raw = orjson.dumps(body())
    sizes: list[int] = []
    parse_json_body(raw, "application/json", admit=sizes.append)
    # 40,000 values in the blob, plus the body's own: 2 members, 1 message, 2 message members
    assert sizes == [len(raw) + (40_000 + 2 + 1 + 2) * BYTES_PER_VALUE]


async def test_large_bodies_beyond_the_permits_are_refused_at_once(
        proxy: Callable[..., Any]) -> None:
    up, url, app = await proxy(large_body_bytes=1_000_000, max_large_bodies=1)
    gate = app[LARGE_BODIES]
    held = Reply(answer().events, hold=asyncio.Event())  # the first one is held upstream
    up.replies.append(held)
    first = asyncio.ensure_future(send(url, body(stream=True)))
    await held.arrived.wait()
    assert gate.held == 1
    status, headers, raw = await send(url, body())
    assert status == 503 and headers["Retry-After"] == "1"
    err = orjson.loads(raw)["error"]
    assert (err["type"], err["param"], err["code"]) == (
        "service_unavailable", None, "too_many_large_bodies")
    assert "max_large_bodies=1, large_body_bytes=1000000" in err["message"]
    up.replies.append(whole_answer())  # a small body is served meanwhile
    status, _, _ = await send(url, {"messages": MSG})
    assert status == 200
    assert held.hold is not None
    held.hold.set()
    status, _, raw = await first
    assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
    assert gate.held == 0  # given back when the response ended
    up.replies.append(whole_answer())
    status, _, _ = await send(url, body())
    assert status == 200 and gate.held == 0


async def test_permit_comes_back_when_the_request_fails(proxy: Callable[..., Any]) -> None:
    up, url, app = await proxy(large_body_bytes=1_000_000, max_large_bodies=1)
    status, _, raw = await send(url, body(messages=[{"role": "robot", "content": "x"}]))
    assert status == 400 and orjson.loads(raw)["error"]["param"] == "messages[0].role"
    assert app[LARGE_BODIES].held == 0
    up.replies.append(whole_answer())
    status, _, _ = await send(url, body())
    assert status == 200


async def test_a_body_large_only_in_its_upper_bound_gives_its_permit_back(
        proxy: Callable[..., Any]) -> None:
    """Commas inside strings count in the estimate made before parsing; once parsed, such a
    body turns out small and holds no permit while its request runs."""
    up, url, app = await proxy(large_body_bytes=1_000_000, max_large_bodies=1)
    prose = {"messages": [{"role": "user", "content": "a, b: c, " * 20_000}], "stream": True}
    held = Reply(answer().events, hold=asyncio.Event())
    up.replies.append(held)
    first = asyncio.ensure_future(send(url, prose))
    await held.arrived.wait()
    assert app[LARGE_BODIES].held == 0
    up.replies.append(whole_answer())
    status, _, _ = await send(url, body())  # a really large one still gets the permit
    assert status == 200
    assert held.hold is not None
    held.hold.set()
    status, _, _ = await first
    assert status == 200


async def test_a_body_of_too_many_values_is_refused_before_it_is_parsed(
        proxy: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The parse of a body of hundreds of thousands of values holds the event loop for
    hundreds of ms; past ``max_body_values`` (estimated from the raw text) it never starts."""
    import toolmend.server.request_body as rb

    parsed: list[int] = []
    real_loads = rb.orjson.loads

    class CountingOrjson:
        JSONDecodeError = orjson.JSONDecodeError

        @staticmethod
        def loads(raw: bytes) -> Any:
            parsed.append(len(raw))
            return real_loads(raw)

    monkeypatch.setattr(rb, "orjson", CountingOrjson)
    up, url, app = await proxy(max_body_values=30_000)
    status, _, raw = await send(url, body())  # 40,000 values
    assert status == 413
    err = orjson.loads(raw)["error"]
    assert (err["code"], err["type"]) == ("too_many_values", "invalid_request_error")
    assert "max_body_values" in err["message"] and "30000" in err["message"]
    assert parsed == []  # refused without a parse
    assert app[LARGE_BODIES].held == 0
    up.replies.append(whole_answer())
    status, _, _ = await send(url, {"messages": MSG, "metadata_blob": {"k": 1}})
    assert status == 200 and len(parsed) == 1  # a small body is parsed and served


async def test_too_many_values_is_refused_before_the_rest_of_the_body_arrives(
        proxy: Callable[..., Any]) -> None:
    """The values are counted as the body arrives: a client that announces 8 MB and sends
    100,000 commas gets its 413 while the rest is still unsent (were the whole body awaited,
    the answer would be the 408 of ``body_timeout``), and the connection is closed."""
    _, url, app = await proxy(max_body_values=30_000, body_timeout=60)
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 8000000\r\n\r\n"
                 b'{"messages": [' + b"1," * 100_000)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in head.lower()
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    err = orjson.loads(await reader.readexactly(length))["error"]
    assert err["code"] == "too_many_values"
    assert "more than 30000" in err["message"]
    assert await reader.read() == b""  # closed by the server
    writer.close()
    assert app[LARGE_BODIES].held == 0
