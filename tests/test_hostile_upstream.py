"""A hostile upstream: an aiohttp server whose every answer is scripted to fail at one point.

Each test puts toolmend in front of :class:`Hostile`, lets the upstream break at a chosen place
(before its headers, after them but before any body byte, in the middle of a body or a stream,
with keep-alive comments already sent to the client or not, on one replica of two), and reads
toolmend's answer with a strict raw HTTP/1.1 client (:func:`raw_post`) that refuses a cut or
malformed chunked body and any byte after the end of the response. The client must get the
OpenAI-shaped outcome (the real status while nothing was sent, else an error event and
``[DONE]``), and afterwards the fair queue, the event loop's tasks and the upstream connection
pool must be back at their baseline (the helpers of ``test_faults.py``).
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web

from toolmend.server.app import SCHEDULER, UPSTREAM, build_app, start_server
from toolmend.server.config import Settings

from .test_faults import FStack, _until, error_of

MSG = [{"role": "user", "content": "hello"}]
KEEPALIVE = b": keep-alive"

# --- the hostile upstream ----------------------------------------------------------------------


@dataclass
class HostileStats:
    """What the upstream saw. ``in_flight`` has the name test_faults' baseline check reads."""

    requests: int = 0
    in_flight: int = 0
    ports: list[int] = field(default_factory=list)  # the replica (listening port) of each request
    bodies: list[dict[str, Any]] = field(default_factory=list)
    written: list[int] = field(default_factory=list)  # body bytes each scripted act got out
    broken: list[bool] = field(default_factory=list)  # whether the act's connection broke


Act = Callable[[web.Request, "Hostile"], Awaitable[web.StreamResponse]]


class Hostile:
    """A real aiohttp upstream on one or more ports (replicas) that plays scripted acts in
    order, one per request, whichever port it arrives on; with no act left, a plain reply.

    ``gate`` lets an act wait for the client's side of the test (for example, until the client
    has read a keep-alive comment) instead of sleeping. ``handler_cancellation`` is on, so an
    act still running when toolmend closes the connection ends at once, as a real server's
    generation would.
    """

    def __init__(self, replicas: int = 1) -> None:
        self.replicas = replicas
        self.acts: deque[Act] = deque()
        self.stats = HostileStats()
        self.gate = asyncio.Event()
        self.urls: list[str] = []
        self._runner: web.AppRunner | None = None  # the name test_faults' baseline check reads

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/api/chat", self._handle)
        app.router.add_get("/v1/models", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        for _ in range(self.replicas):
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.urls.append(f"http://127.0.0.1:{port}")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def push(self, *acts: Act) -> None:
        self.acts.extend(acts)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        s = self.stats
        s.requests += 1
        assert request.transport is not None
        s.ports.append(request.transport.get_extra_info("sockname")[1])
        s.bodies.append(orjson.loads(raw) if raw else {})
        if self.acts:
            act = self.acts.popleft()
        elif request.path == "/api/chat":  # toolmend speaking Ollama's native API to it
            act = stream_bytes(lambda: iter([NDJSON_WARM]), content_type="application/x-ndjson")
        else:
            act = sse_reply(content("warm"))
        s.in_flight += 1
        try:
            return await act(request, self)
        finally:
            s.in_flight -= 1


# --- what the acts send ------------------------------------------------------------------------

def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return b"data: " + orjson.dumps({
        "id": "chatcmpl-h", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"


def content(text: str) -> bytes:
    return chunk({"content": text})


FINISH = chunk({}, "stop") + b"data: [DONE]\n\n"
NDJSON_WARM = (b'{"model":"m","message":{"role":"assistant","content":"warm"},"done":false}\n'
               b'{"model":"m","message":{"role":"assistant","content":""},"done":true,'
               b'"done_reason":"stop","prompt_eval_count":1,"eval_count":1}\n')
SSE = {"Content-Type": "text/event-stream"}


def reply_json(text: str) -> bytes:
    return orjson.dumps({"id": "chatcmpl-h", "object": "chat.completion", "created": 1,
                         "model": "m", "choices": [{"index": 0, "message": {
                             "role": "assistant", "content": text}, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                   "total_tokens": 2}})


async def _send(resp: web.StreamResponse, up: Hostile, pieces: Iterable[bytes]) -> bool:
    """Write pieces; record how much got out and whether the connection broke first (an error
    on write, or the handler cancelled because toolmend closed the connection)."""
    written = 0
    done = False
    try:
        for p in pieces:
            await resp.write(p)
            written += len(p)
        done = True
    except (ConnectionError, RuntimeError):
        pass
    finally:
        up.stats.written.append(written)
        up.stats.broken.append(not done)
    return done


def sse_reply(*events: bytes, gate: bool = False, finish: bool = True) -> Act:
    """A 200 event stream: the events, then the finish chunk and ``[DONE]``."""

    async def act(request: web.Request, up: Hostile) -> web.StreamResponse:
        if gate:
            await up.gate.wait()
        resp = web.StreamResponse(headers=SSE)
        await resp.prepare(request)
        if await _send(resp, up, [*events, FINISH] if finish else list(events)):
            await resp.write_eof()
        return resp

    return act


def json_reply(body: bytes, status: int = 200, *, length: bool = True) -> Act:
    """A whole answer, with a Content-Length or chunked (a server that does not say)."""

    async def act(request: web.Request, up: Hostile) -> web.StreamResponse:
        if length:
            resp = web.StreamResponse(status=status, headers={
                "Content-Type": "application/json", "Content-Length": str(len(body))})
        else:
            resp = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        step = 64 * 1024
        if await _send(resp, up, [body[i:i + step] for i in range(0, len(body), step)]):
            await resp.write_eof()
        return resp

    return act


def reset_before_headers(*, gate: bool = False) -> Act:
    """Take the request, then drop the connection without a byte of answer."""

    async def act(request: web.Request, up: Hostile) -> web.StreamResponse:
        if gate:
            await up.gate.wait()
        assert request.transport is not None
        request.transport.abort()
        return web.Response(status=500)  # never sent: the connection is gone

    return act


def headers_then(fate: str, *, gate: bool = False, stream: bool = True,
                 body: bytes = b"") -> Act:
    """Send the status line and headers (and ``body``, a first part), then ``fate``: "drop"
    closes the connection, "stall" waits until toolmend gives up and closes it.

    The drop is a close (FIN), not an abort (RST): an RST may make the receiving kernel discard
    what it had not handed over yet, headers included, which would turn this failure point into
    the one before the headers."""

    async def act(request: web.Request, up: Hostile) -> web.StreamResponse:
        if stream:
            resp = web.StreamResponse(headers=SSE)
        else:
            resp = web.StreamResponse(headers={"Content-Type": "application/json",
                                               "Content-Length": "100000"})
        await resp.prepare(request)  # a StreamResponse sends its headers at once
        if body:
            await resp.write(body)
        if gate:
            await up.gate.wait()
        if fate == "drop":
            assert request.transport is not None
            request.transport.close()
            return resp
        await asyncio.Event().wait()  # stalls until cancelled by toolmend's close
        raise AssertionError("unreachable")

    return act


def stream_bytes(pieces: Callable[[], Iterator[bytes]], *,
                 content_type: str = "text/event-stream") -> Act:
    """A 200 whose body is whatever the generator yields, for as long as it yields."""

    async def act(request: web.Request, up: Hostile) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        await resp.prepare(request)
        if await _send(resp, up, pieces()):
            await resp.write_eof()
        return resp

    return act


# --- a strict raw client -----------------------------------------------------------------------

@dataclass
class Raw:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes  # de-chunked

    @property
    def events(self) -> list[bytes]:
        return [ln[6:] for ln in self.body.split(b"\n") if ln.startswith(b"data: ")]


_CHUNK_SIZE = re.compile(rb"[0-9a-fA-F]+\r\n")


async def raw_post(base: str, path: str, body: dict[str, Any], *,
                   open_gate: tuple[bytes, asyncio.Event] | None = None,
                   method: str = "POST") -> Raw:
    """One request on its own connection (``Connection: close``), read byte by byte.

    A chunked body must be well formed to its terminating zero-size chunk, and nothing may
    follow the response (a second response appended to a started stream is the classic way
    to corrupt one). ``open_gate`` sets an event once the body so far contains a needle.
    """
    host, port = base.removeprefix("http://").split(":")
    data = orjson.dumps(body) if method == "POST" else b""
    async with asyncio.timeout(30):  # a hang fails the test instead of stalling the suite
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                         "Connection: close\r\n\r\n".encode() + data)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            m = re.fullmatch(r"HTTP/1\.1 (\d{3}) .*", lines[0])
            assert m, lines[0]
            headers = {}
            for ln in lines[1:]:
                if ln:
                    k, _, v = ln.partition(":")
                    headers[k.strip().lower()] = v.strip()
            out = bytearray()
            if headers.get("transfer-encoding") == "chunked":
                while True:
                    try:
                        size_line = await reader.readuntil(b"\r\n")
                    except asyncio.IncompleteReadError as e:
                        raise AssertionError(f"chunked body cut after {bytes(out[-300:])!r}"
                                             ) from e
                    assert _CHUNK_SIZE.fullmatch(size_line), size_line[:100]
                    size = int(size_line, 16)
                    if size == 0:
                        assert await reader.readexactly(2) == b"\r\n"  # no trailers
                        break
                    out += await reader.readexactly(size)
                    assert await reader.readexactly(2) == b"\r\n", "chunk not closed by CRLF"
                    if open_gate is not None and open_gate[0] in out:
                        open_gate[1].set()
            elif "content-length" in headers:
                out += await reader.readexactly(int(headers["content-length"]))
            else:
                raise AssertionError(f"no framing in {headers}")
            rest = await reader.read()
            assert rest == b"", f"bytes after the end of the response: {rest[:300]!r}"
        finally:
            writer.close()
    return Raw(int(m.group(1)), headers, bytes(out))


def chat(stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MSG, "stream": stream, **extra}


def assert_stream_error(r: Raw, code: str) -> dict[str, Any]:
    """Started stream ended by one error event and ``[DONE]``; all of it valid UTF-8."""
    r.body.decode("utf-8")
    err = error_of(r.status, r.body, stream_started=True)
    assert err["code"] == code, err
    assert r.events.count(b"[DONE]") == 1
    assert r.headers["content-type"].startswith("text/event-stream")
    return err


def assert_status_error(r: Raw, status: int, code: str) -> dict[str, Any]:
    err = error_of(r.status, r.body, stream_started=False)
    assert r.status == status, (r.status, r.body[:300])
    assert err["code"] == code, err
    return err


# --- the stack ---------------------------------------------------------------------------------

@pytest.fixture
async def make_hstack() -> AsyncIterator[Callable[..., Awaitable[FStack]]]:
    cleanups: list[Any] = []

    async def factory(replicas: int = 1, **settings: Any) -> FStack:
        up = Hostile(replicas)
        await up.start()
        cleanups.append(up.stop)
        app = build_app(Settings(**{"log_requests": False, "backend": "openai", "slots": 4,
                                    "loading_timeout": 0.0, "health_interval": 0.0,
                                    **settings}), up.urls)
        runner, port = await start_server(app, "127.0.0.1", 0)
        cleanups.append(runner.cleanup)
        st = FStack(up, f"http://127.0.0.1:{port}", app, set(), 0)  # type: ignore[arg-type]
        for _ in range(replicas):  # every replica's pooled connection is in the baseline
            r = await raw_post(st.url, "/v1/chat/completions", chat())
            assert r.status == 200 and b"warm" in r.body
        await _until(lambda: up.stats.in_flight == 0 and app[SCHEDULER].in_flight == 0)
        up.stats = HostileStats()
        st.mark_baseline()
        return st

    yield factory
    for fn in reversed(cleanups):
        await fn()


def hostile(st: FStack) -> Hostile:
    assert isinstance(st.sim, Hostile)
    return st.sim


# --- item 2: every failure point, one replica --------------------------------------------------

# (name, acts, toolmend settings, status when nothing was sent yet, code, upstream requests)
STREAM_FAULTS: list[tuple[str, Callable[[bool], list[Act]], dict[str, Any], int, str, int]] = [
    # a drop before any answer may be a stale keep-alive connection: resent twice, then refused
    ("before headers", lambda g: [reset_before_headers(gate=g), reset_before_headers(),
                                  reset_before_headers()], {}, 502, "upstream_disconnected", 3),
    ("after headers", lambda g: [headers_then("drop", gate=g)], {}, 502,
     "upstream_disconnected", 1),
    ("after headers, stalls", lambda g: [headers_then("stall", gate=g)],
     {"first_byte_timeout": 1.0}, 504, "upstream_first_byte_timeout", 1),
]


@pytest.mark.parametrize("keepalives", [False, True], ids=["quiet", "keep-alives sent"])
@pytest.mark.parametrize(("name", "acts", "settings", "status", "code", "requests"),
                         STREAM_FAULTS, ids=[f[0] for f in STREAM_FAULTS])
async def test_stream_fails_before_any_output(make_hstack: Callable[..., Any], name: str,
                                              acts: Callable[[bool], list[Act]],
                                              settings: dict[str, Any], status: int, code: str,
                                              requests: int, keepalives: bool) -> None:
    """Nothing of the answer was sent: the real status, or, once keep-alive comments had
    started the 200, an error event and ``[DONE]`` in a well-formed chunked body."""
    st = await make_hstack(keepalive_interval=0.02 if keepalives else 0.0, **settings)
    up = hostile(st)
    up.push(*acts(keepalives))
    r = await raw_post(st.url, "/v1/chat/completions", chat(),
                       open_gate=(KEEPALIVE, up.gate) if keepalives else None)
    if keepalives:
        assert r.body.startswith(KEEPALIVE)
        assert_stream_error(r, code)
    else:
        assert_status_error(r, status, code)
    assert up.stats.requests == requests
    await st.assert_baseline()


async def test_stream_fails_mid_stream(make_hstack: Callable[..., Any]) -> None:
    st = await make_hstack()
    up = hostile(st)
    # a body that ends cleanly but without a finish reason or [DONE]
    up.push(sse_reply(content("one"), content(" two"), finish=False))
    r = await raw_post(st.url, "/v1/chat/completions", chat())
    assert_stream_error(r, "upstream_incomplete")
    assert b'"content":"one"' in r.body and b'"content":" two"' in r.body

    async def reset_mid_stream(request: web.Request, h: Hostile) -> web.StreamResponse:
        resp = web.StreamResponse(headers=SSE)
        await resp.prepare(request)
        await resp.write(content("four") + content(" five"))
        await h.gate.wait()  # the client has them: the reset cannot take them back
        assert request.transport is not None
        request.transport.abort()
        return resp

    up.push(reset_mid_stream)
    r = await raw_post(st.url, "/v1/chat/completions", chat(),
                       open_gate=(b'"content":" five"', up.gate))
    assert_stream_error(r, "upstream_disconnected")
    assert b'"content":"four"' in r.body
    assert up.stats.requests == 2  # never resent once output had begun
    await st.assert_baseline()


WHOLE_FAULTS: list[tuple[str, list[Act], dict[str, Any], int, str, int]] = [
    ("before headers", [reset_before_headers() for _ in range(3)], {}, 502,
     "upstream_disconnected", 3),
    ("after headers", [headers_then("drop", stream=False)], {}, 502, "upstream_disconnected",
     1),
    ("mid-body", [headers_then("drop", stream=False, body=b'{"id": "chatcmpl-h", "cho')], {},
     502, "upstream_disconnected", 1),
    ("mid-body, stalls", [headers_then("stall", stream=False, body=b'{"id": "chat')],
     {"first_byte_timeout": 0.5}, 504, "upstream_first_byte_timeout", 1),
]


@pytest.mark.parametrize(("name", "acts", "settings", "status", "code", "requests"),
                         WHOLE_FAULTS, ids=[f[0] for f in WHOLE_FAULTS])
async def test_whole_reply_fails(make_hstack: Callable[..., Any], name: str, acts: list[Act],
                                 settings: dict[str, Any], status: int, code: str,
                                 requests: int) -> None:
    st = await make_hstack(**settings)
    up = hostile(st)
    up.push(*acts)
    r = await raw_post(st.url, "/v1/chat/completions", chat(stream=False))
    assert_status_error(r, status, code)
    assert r.headers["content-type"].startswith("application/json")
    assert up.stats.requests == requests
    await st.assert_baseline()


# --- item 2: replica failover after the headers ------------------------------------------------

@pytest.mark.parametrize("keepalives", [False, True], ids=["quiet", "keep-alives sent"])
async def test_failover_after_headers(make_hstack: Callable[..., Any], keepalives: bool) -> None:
    """The first replica sends its headers and drops; nothing of its answer was used, so the
    second replica answers and the client sees one clean reply."""
    st = await make_hstack(replicas=2, keepalive_interval=0.02 if keepalives else 0.0)
    up = hostile(st)
    up.push(headers_then("drop", gate=keepalives), sse_reply(content("pong")))
    r = await raw_post(st.url, "/v1/chat/completions", chat(),
                       open_gate=(KEEPALIVE, up.gate) if keepalives else None)
    assert r.status == 200
    assert b'"error"' not in r.body
    assert r.events.count(b"[DONE]") == 1 and r.events[-1] == b"[DONE]"
    assert r.body.count(b'"content":"pong"') == 1
    assert up.stats.requests == 2 and len(set(up.stats.ports)) == 2
    replicas = st.app[UPSTREAM].replicas
    dropped = next(rep for rep in replicas if rep.url.endswith(f":{up.stats.ports[0]}"))
    assert not dropped.healthy and "ClientPayloadError" in dropped.last_error
    await st.assert_baseline()


async def test_failover_mid_body(make_hstack: Callable[..., Any]) -> None:
    """A whole reply cut mid-body: the client has nothing yet, so another replica is asked."""
    st = await make_hstack(replicas=2)
    up = hostile(st)
    up.push(headers_then("drop", stream=False, body=b'{"id": "x", "choi'),
            json_reply(reply_json("pong")))
    r = await raw_post(st.url, "/v1/chat/completions", chat(stream=False))
    assert r.status == 200
    assert orjson.loads(r.body)["choices"][0]["message"]["content"] == "pong"
    assert up.stats.requests == 2 and len(set(up.stats.ports)) == 2
    await st.assert_baseline()


# --- item 4: whatever fails after the stream began ends it cleanly -----------------------------

class Boom(RuntimeError):
    """An exception nobody foresaw, injected into toolmend's own code."""


def scripted(*steps: bytes | None, status: int = 200) -> Act:
    """An event stream written step by step; ``None`` waits for the gate. Every step is
    flushed before the next, so the client can see it before what follows is even sent."""

    async def act(request: web.Request, up: Hostile) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, headers=SSE)
        await resp.prepare(request)
        try:
            for step in steps:
                if step is None:
                    await up.gate.wait()
                else:
                    await resp.write(step)  # straight to the socket: aiohttp keeps no buffer
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # toolmend hung up: what is being tested
        return resp

    return act


@pytest.mark.parametrize("when", ["before anything", "after keep-alives", "after output"])
async def test_unforeseen_exception_mid_stream(make_hstack: Callable[..., Any],
                                               monkeypatch: pytest.MonkeyPatch,
                                               when: str) -> None:
    """An exception in the middle of the relay: a 500 while nothing was sent, else an
    ``internal_error`` event and ``[DONE]``; the upstream connection and the slot released."""
    from toolmend.parsers.stream import StreamPipeline

    real_feed = StreamPipeline.feed

    def feed(self: StreamPipeline, data: bytes) -> bytes:
        if b"explode" in data:
            raise Boom("injected")
        return real_feed(self, data)

    monkeypatch.setattr(StreamPipeline, "feed", feed)
    st = await make_hstack(keepalive_interval=0.02 if when == "after keep-alives" else 0.0)
    up = hostile(st)
    steps = {"before anything": [content("explode")],
             "after keep-alives": [None, content("explode")],
             "after output": [content("one"), None, content("explode")]}[when]
    up.push(scripted(*steps, FINISH))
    needle = KEEPALIVE if when == "after keep-alives" else b'"content":"one"'
    r = await raw_post(st.url, "/v1/chat/completions", chat(), open_gate=(needle, up.gate))
    if when == "before anything":
        err = assert_status_error(r, 500, "internal_error")
    else:
        err = assert_stream_error(r, "internal_error")
    assert "Boom" in err["message"]
    if when == "after output":
        assert b'"content":"one"' in r.body
    await st.assert_baseline()


@pytest.mark.parametrize("front", ["openai", "ollama"])
async def test_exception_escaping_the_handler_ends_the_stream(
        make_hstack: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, front: str) -> None:
    """The last line of defence, the app's error middleware: an exception that escapes the
    handler after its stream began ends that stream in the API's own way, instead of a second
    HTTP response appended to the first."""
    import toolmend.pipeline.forward as forward_module

    async def broken_relay(request: web.Request, ctx: Any, up: Any, path: str, body: bytes,
                           pipeline: Any, keepalive_interval: float, down: Any = None,
                           finisher: Any = None) -> web.StreamResponse:
        await down.write_reply(pipeline.feed(content("partial")))  # as the relay writes
        raise Boom("after the stream began")

    st = await make_hstack()
    monkeypatch.setattr(forward_module, "relay_stream", broken_relay)
    if front == "openai":
        r = await raw_post(st.url, "/v1/chat/completions", chat())
        err = assert_stream_error(r, "internal_error")
        assert "Boom" in err["message"] and b'"content":"partial"' in r.body
    else:
        r = await raw_post(st.url, "/api/chat", {"model": "m", "messages": MSG})
        lines = [orjson.loads(ln) for ln in r.body.splitlines()]
        assert r.status == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        assert lines[0]["message"]["content"] == "partial"
        assert lines[-1] == {"error": "internal error in toolmend (Boom); see its log"}
    assert hostile(st).stats.requests == 0
    await st.assert_baseline()


async def test_ollama_front_malformed_delta_after_output(make_hstack: Callable[..., Any]
                                                         ) -> None:
    """A delta that is not an object goes through the relay untouched; the Ollama front's
    decoder names it, and Ollama's error line ends the reply."""
    st = await make_hstack()
    up = hostile(st)
    up.push(scripted(content("hi"), None,
                     b'data: {"id":"x","choices":[{"index":0,"delta":"oops"}]}\n\n', FINISH))
    r = await raw_post(st.url, "/api/chat", {"model": "m", "messages": MSG},
                       open_gate=(b'"content":"hi"', up.gate))
    lines = [orjson.loads(ln) for ln in r.body.splitlines()]
    assert r.status == 200 and lines[0]["message"]["content"] == "hi"
    assert lines[-1] == {"error": "upstream sent a malformed chunk: its delta is not an object"}
    await st.assert_baseline()



async def test_ollama_front_malformed_delta_whole_reply(make_hstack: Callable[..., Any]
                                                        ) -> None:
    """The same broken delta with ``stream: false``: a 502 in Ollama's shape, no half reply."""
    st = await make_hstack()
    up = hostile(st)
    up.push(scripted(content("hi"),
                     b'data: {"id":"x","choices":[{"index":0,"delta":"oops"}]}\n\n', FINISH))
    r = await raw_post(st.url, "/api/chat", {"model": "m", "messages": MSG, "stream": False})
    assert r.status == 502
    assert orjson.loads(r.body) == {
        "error": "upstream sent a malformed chunk: its delta is not an object"}
    await st.assert_baseline()

SCOPED_REF_TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {
    "$id": "https://example.com/root.json", "type": "object",
    "properties": {"q": {"$id": "sub/", "$ref": "#/definitions/q"}},
    "definitions": {"q": {"type": "string"}}}}}
PLAIN_TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"q": {}}}}}


def tool_call(arguments: str) -> bytes:
    return chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                  "function": {"name": "lookup", "arguments": arguments}}]})


@pytest.mark.parametrize("trigger", ["scoped $id and $ref", "arguments nested 1,100 deep"])
async def test_known_triggers_never_cut_the_stream(make_hstack: Callable[..., Any],
                                                   trigger: str) -> None:
    """Two causes found by the probe. Whether a cause is refused at the door (a 4xx before
    anything is sent) or met mid-stream, the client gets an OpenAI-shaped error: never a cut
    stream, never a second response."""
    st = await make_hstack(keepalive_interval=0.02)
    up = hostile(st)
    if trigger == "scoped $id and $ref":
        tool, args = SCOPED_REF_TOOL, '{"q": "x"}'
    else:
        tool, args = PLAIN_TOOL, '{"q": ' + "[" * 1100 + "]" * 1100 + "}"
    up.push(scripted(None, tool_call(args), chunk({}, "tool_calls"), b"data: [DONE]\n\n"))
    r = await raw_post(st.url, "/v1/chat/completions", chat(tools=[tool]),
                       open_gate=(KEEPALIVE, up.gate))
    if r.status != 200:
        assert 400 <= r.status < 500
        error_of(r.status, r.body, stream_started=False)
    else:
        error_of(r.status, r.body, stream_started=True)
        assert r.events.count(b"[DONE]") == 1
    up.gate.set()
    await st.assert_baseline()


# --- item 4's SSE-line cause and item 7: bounded upstream events -------------------------------

LIMIT = 64 * 1024
FLOOD = 32 * 1024 * 1024  # far more than toolmend may read, and than socket buffers hold


def _long_line(prefix: bytes) -> Callable[[], Iterator[bytes]]:
    def gen() -> Iterator[bytes]:
        yield prefix + b"data: "
        for _ in range(FLOOD // LIMIT):
            yield b"x" * LIMIT
    return gen


def _no_blank_line(prefix: bytes) -> Callable[[], Iterator[bytes]]:
    line = b'data: {"a": 1}\n'
    block = line * (LIMIT // len(line))

    def gen() -> Iterator[bytes]:
        yield prefix
        for _ in range(FLOOD // len(block)):
            yield block
    return gen


@pytest.mark.parametrize("shape", ["one endless line", "data lines, no blank line"])
@pytest.mark.parametrize("after_output", [False, True], ids=["first", "after output"])
async def test_upstream_event_over_the_limit(make_hstack: Callable[..., Any], shape: str,
                                             after_output: bool) -> None:
    st = await make_hstack(max_upstream_event_bytes=LIMIT)
    up = hostile(st)
    prefix = content("before") if after_output else b""
    up.push(stream_bytes(_long_line(prefix) if shape == "one endless line"
                         else _no_blank_line(prefix)))
    r = await raw_post(st.url, "/v1/chat/completions", chat())
    if after_output:
        err = assert_stream_error(r, "upstream_event_too_large")
        assert b'"content":"before"' in r.body
    else:
        err = assert_status_error(r, 502, "upstream_event_too_large")
    assert f"limit of {LIMIT} bytes" in err["message"]
    # toolmend stopped reading and hung up long before the upstream was done
    assert up.stats.broken == [True] and up.stats.written[0] < FLOOD
    await st.assert_baseline()


async def test_multi_line_event_within_the_limit(make_hstack: Callable[..., Any]) -> None:
    """An event whose JSON spans several ``data:`` lines is legal SSE: it is relayed as one
    event the client can parse, not cut at its first line."""
    st = await make_hstack()
    up = hostile(st)
    up.push(sse_reply(b'data: {"id":"c","object":"chat.completion.chunk","created":1,\n'
                      b'data: "model":"m","choices":[{"index":0,"delta":{"content":"multi"},\n'
                      b'data: "finish_reason":null}]}\n\n'))
    r = await raw_post(st.url, "/v1/chat/completions", chat())
    docs = [orjson.loads(e) for e in client_events(r.body) if e != b"[DONE]"]
    assert [d["choices"][0]["delta"].get("content") for d in docs if d["choices"]] == [
        "multi", None]
    await st.assert_baseline()


def client_events(body: bytes) -> list[bytes]:
    from toolmend.parsers.sse import SSEDecoder, SSEEvent

    dec = SSEDecoder()
    return [e.data for e in [*dec.feed(body), *dec.finish()] if isinstance(e, SSEEvent)]


async def test_ollama_native_ndjson_line_over_the_limit(make_hstack: Callable[..., Any]
                                                        ) -> None:
    st = await make_hstack(backend="ollama", ollama_native=True, max_upstream_event_bytes=LIMIT)
    up = hostile(st)

    def gen() -> Iterator[bytes]:
        yield b'{"model":"m","message":{"role":"assistant","content":"before"},"done":false}\n'
        yield b'{"model":"m","message":{"role":"assistant","content":"'
        for _ in range(FLOOD // LIMIT):
            yield b"x" * LIMIT

    up.push(stream_bytes(gen, content_type="application/x-ndjson"))
    r = await raw_post(st.url, "/v1/chat/completions", chat())
    err = assert_stream_error(r, "upstream_event_too_large")
    assert f"longer than {LIMIT} bytes" in err["message"]
    assert b'"content":"before"' in r.body
    assert up.stats.broken == [True] and up.stats.written[0] < FLOOD
    await st.assert_baseline()


# --- item 13: invalid UTF-8 from the upstream ---------------------------------------------------

#: Latin-1 é, two bytes that never occur in UTF-8, a UTF-8-encoded surrogate.
BAD = b"caf\xe9 \xff\xfe ok \xed\xa0\x80"
#: What the client reads instead: one U+FFFD for each byte that starts no valid sequence.
BAD_FIXED = "caf\ufffd \ufffd\ufffd ok \ufffd\ufffd\ufffd"
NOTE = b": toolmend replaced invalid UTF-8 from the upstream with U+FFFD"


def with_bytes(event: bytes, raw: bytes) -> bytes:
    return event.replace(b"@@", raw)


def _contents(body: bytes) -> str:
    out = []
    for e in client_events(body):
        if e != b"[DONE]":
            for c in orjson.loads(e).get("choices") or ():
                out.append(c["delta"].get("content") or "")
    return "".join(out)


async def _metric(st: FStack, name: str, labels: dict[str, str] | None = None,
                  want: float | None = None) -> float | None:
    """A sample from toolmend's registry, once the request's recording has caught up."""
    from toolmend.telemetry.tracing import TELEMETRY

    reg = st.app[TELEMETRY].metrics.registry
    if want is not None:
        await _until(lambda: reg.get_sample_value(name, labels or {}) == want)
    return reg.get_sample_value(name, labels or {})


@pytest.mark.parametrize("path", ["relayed as is", "with finish and usage", "mended (tools)"])
async def test_invalid_utf8_in_stream(make_hstack: Callable[..., Any], path: str) -> None:
    st = await make_hstack()
    up = hostile(st)
    body = chat()
    if path == "relayed as is":
        events = [content("good "), with_bytes(content("@@"), BAD), content(" end")]
    elif path == "with finish and usage":
        body["stream_options"] = {"include_usage": True}
        events = [content("good "), with_bytes(chunk({"content": "@@"}, "stop"), BAD),
                  b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
                  b'"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,'
                  b'"total_tokens":3}}\n\n', b"data: [DONE]\n\n"]
    else:
        body["tools"] = [PLAIN_TOOL]
        events = [content("good "), with_bytes(content("@@"), BAD), content(" end")]
    up.push(sse_reply(*events, finish=path != "with finish and usage"))
    r = await raw_post(st.url, "/v1/chat/completions", body)
    assert r.status == 200
    r.body.decode("utf-8")  # strict: the stream is labelled charset=utf-8
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    want = "good " + BAD_FIXED + ("" if path == "with finish and usage" else " end")
    assert _contents(r.body) == want
    assert r.body.count(NOTE) == 1
    assert b'"error"' not in r.body
    assert await _metric(st, "toolmend_upstream_invalid_utf8_total", want=1.0) == 1.0
    assert await _metric(st, "toolmend_repairs_total", {"kind": "invalid_utf8"}, want=1.0)
    await st.assert_baseline()


async def test_invalid_utf8_reported_in_the_trace(make_hstack: Callable[..., Any],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    from toolmend.telemetry import names as names
    from toolmend.telemetry.tracing import TELEMETRY

    from .test_telemetry import Receiver, attrs

    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    rec = Receiver()
    rapp = web.Application()
    rapp.router.add_post("/v1/traces", rec.handle)
    rrunner = web.AppRunner(rapp)
    await rrunner.setup()
    site = web.TCPSite(rrunner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        st = await make_hstack(otlp_endpoint=f"http://127.0.0.1:{port}")
        hostile(st).push(sse_reply(with_bytes(content("@@"), BAD)))
        r = await raw_post(st.url, "/v1/chat/completions", chat())
        assert r.status == 200 and r.body.count(NOTE) == 1
        assert await st.app[TELEMETRY].flush(5.0)
        server = [s for s in rec.spans if s.kind == Span.SPAN_KIND_SERVER][-1]
        assert attrs(server)[names.TM_REPAIR_KINDS] == ["invalid_utf8"]
        assert [(e.name, attrs(e)) for e in server.events if e.name == names.EV_REPAIRED] == [
            (names.EV_REPAIRED, {names.EV_ATTR_KIND: "invalid_utf8"})]
        # (no baseline check here: the exporter's keep-alive connection to the receiver, in
        # this same loop, is the receiver's task, not toolmend's)
    finally:
        await rrunner.cleanup()


async def test_invalid_utf8_counted_per_event(make_hstack: Callable[..., Any]) -> None:
    st = await make_hstack()
    up = hostile(st)
    up.push(sse_reply(with_bytes(content("@@"), b"\xc3"), content("ok"),
                      with_bytes(content("@@"), b"a\x80b"), with_bytes(content("@@"), b"\xf0")))
    r = await raw_post(st.url, "/v1/chat/completions", chat())
    assert _contents(r.body) == "\ufffdoka\ufffdb\ufffd"
    assert r.body.count(NOTE) == 1  # said once, counted each time
    assert await _metric(st, "toolmend_upstream_invalid_utf8_total", want=3.0) == 3.0
    await st.assert_baseline()


async def test_invalid_utf8_in_whole_reply(make_hstack: Callable[..., Any]) -> None:
    st = await make_hstack()
    up = hostile(st)
    up.push(json_reply(with_bytes(reply_json("@@"), BAD)))
    r = await raw_post(st.url, "/v1/chat/completions", chat(stream=False))
    assert r.status == 200
    assert orjson.loads(r.body)["choices"][0]["message"]["content"] == BAD_FIXED
    assert "invalid UTF-8" in r.headers["x-toolmend-repairs"]
    assert await _metric(st, "toolmend_upstream_invalid_utf8_total", want=1.0) == 1.0
    await st.assert_baseline()


async def test_invalid_utf8_on_the_ollama_front(make_hstack: Callable[..., Any]) -> None:
    st = await make_hstack()
    up = hostile(st)
    up.push(sse_reply(with_bytes(content("@@"), BAD)))
    r = await raw_post(st.url, "/api/chat", {"model": "m", "messages": MSG})
    lines = [orjson.loads(ln) for ln in r.body.decode("utf-8").splitlines()]
    assert lines[0]["message"]["content"] == BAD_FIXED and lines[-1]["done"] is True
    await st.assert_baseline()


# --- item 14: replies read whole are bounded ----------------------------------------------------

@pytest.mark.parametrize("length", [True, False], ids=["Content-Length", "chunked"])
async def test_whole_reply_over_the_limit(make_hstack: Callable[..., Any], length: bool) -> None:
    st = await make_hstack(max_upstream_reply_bytes=1024 * 1024)
    up = hostile(st)
    up.push(json_reply(reply_json("x" * FLOOD), length=length))
    r = await raw_post(st.url, "/v1/chat/completions", chat(stream=False))
    err = assert_status_error(r, 502, "upstream_reply_too_large")
    assert "limit of 1048576 bytes" in err["message"]
    assert up.stats.broken == [True] and up.stats.written[0] < FLOOD
    await st.assert_baseline()


@pytest.mark.parametrize("status", [500, 503])
async def test_huge_error_body_is_cut(make_hstack: Callable[..., Any], status: int) -> None:
    """Only the status and the first words of an error body reach the client: the rest is
    never read."""
    st = await make_hstack()
    up = hostile(st)
    up.push(json_reply(b'{"error": {"message": "' + b"e" * FLOOD + b'"}}', status=status,
                       length=False))
    r = await raw_post(st.url, "/v1/chat/completions", chat())
    err = error_of(r.status, r.body, stream_started=False)
    assert r.status == status
    assert err["message"].startswith('upstream: {"error": {"message": "eee')
    assert len(err["message"]) <= len("upstream: ") + 2000
    assert up.stats.broken == [True] and up.stats.written[0] < FLOOD
    await st.assert_baseline()


async def test_model_list_over_the_limit(make_hstack: Callable[..., Any]) -> None:
    st = await make_hstack(max_upstream_reply_bytes=1024 * 1024)
    up = hostile(st)
    models = orjson.dumps({"object": "list", "data": [
        {"id": f"model-{i:08d}", "object": "model"} for i in range(FLOOD // 40)]})
    up.push(json_reply(models, length=False))
    r = await raw_post(st.url, "/v1/models", {}, method="GET")
    assert_status_error(r, 502, "upstream_reply_too_large")
    assert up.stats.broken == [True]
    await st.assert_baseline()


async def test_ollama_whole_reply_over_the_limit(make_hstack: Callable[..., Any]) -> None:
    """``stream: false`` on the Ollama front gathers a whole reply: bounded the same way."""
    st = await make_hstack(max_upstream_reply_bytes=1024 * 1024)
    up = hostile(st)
    piece = content("y" * 4000)

    def gen() -> Iterator[bytes]:
        for _ in range(FLOOD // len(piece)):
            yield piece

    up.push(stream_bytes(gen))
    r = await raw_post(st.url, "/api/chat", {"model": "m", "messages": MSG, "stream": False})
    assert r.status == 502
    assert orjson.loads(r.body) == {"error": "upstream sent a reply over the limit of 1048576 "
                                             "bytes (max_upstream_reply_bytes)"}
    assert up.stats.broken == [True] and up.stats.written[0] < FLOOD
    await st.assert_baseline()


# --- siblings: discovery answers are read whole ------------------------------------------------

async def test_discovery_answer_in_pieces_is_read_whole(make_hstack: Callable[..., Any]) -> None:
    """A model list that arrives in several pieces is parsed whole (a single ``read(n)`` used
    to return only the first piece, and the server went unrecognised)."""
    from toolmend.backends.detect import detect

    st = await make_hstack()
    up = hostile(st)
    models = orjson.dumps({"object": "list", "data": [
        {"id": f"model-{i:05d}", "object": "model", "owned_by": "vllm"} for i in range(2000)]})
    assert 64 * 1024 < len(models) < 256 * 1024

    async def trickle(request: web.Request, h: Hostile) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        step = len(models) // 4 + 1
        for i in range(0, len(models), step):
            await resp.write(models[i:i + step])
            for _ in range(3):  # let the reader wake up between the pieces
                await asyncio.sleep(0)
        await resp.write_eof()
        return resp

    up.push(trickle)
    d = await detect(up.urls[0])
    assert (d.kind, d.model) == ("vllm", "model-00000")
