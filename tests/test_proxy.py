"""The proxy core end to end: the openai SDK -> toolmend -> simulated backend, over real HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import openai
import orjson
import pytest

from .conftest import Stack, StackFactory

MSG = [{"role": "user", "content": "hello"}]


def client(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.v1, api_key="unused", max_retries=0, timeout=20)


async def sse_lines(resp: aiohttp.ClientResponse) -> list[bytes]:
    return (await resp.read()).split(b"\n")


@pytest.mark.parametrize("dialect", ["vllm", "llamacpp", "ollama"])
async def test_non_streaming_chat(make_stack: StackFactory, dialect: str) -> None:
    stack = await make_stack(dialect)
    stack.sim.push({"content": "Hi there, agent."})
    r = await client(stack).chat.completions.with_raw_response.create(model="sim-model",
                                                                     messages=MSG)
    assert r.headers["x-request-id"].startswith("req_")
    done = r.parse()
    assert done.choices[0].message.content == "Hi there, agent."
    assert done.usage is not None and done.usage.completion_tokens > 0


@pytest.mark.parametrize("dialect", ["vllm", "llamacpp", "ollama"])
async def test_streaming_chat_strips_usage_unless_asked(make_stack: StackFactory,
                                                       dialect: str) -> None:
    stack = await make_stack(dialect)
    text = "Streaming works, even with ünïcödé 🌍 and \"quotes\"."
    stack.sim.push({"content": text}, {"content": text})
    c = client(stack)
    chunks = [ch async for ch in await c.chat.completions.create(
        model="sim-model", messages=MSG, stream=True)]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert all(ch.usage is None for ch in chunks)
    assert all(ch.choices for ch in chunks)
    # toolmend asked the upstream for usage although the client did not
    assert stack.sim.stats.bodies[-1]["stream_options"] == {"include_usage": True}

    chunks = [ch async for ch in await c.chat.completions.create(
        model="sim-model", messages=MSG, stream=True, stream_options={"include_usage": True})]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text


async def test_structured_tool_call_passes_through(stack: Stack) -> None:
    stack.sim.push({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]})
    # declared: a call to a tool the request did not declare is refused (test_undeclared_calls)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    chunks = [ch async for ch in await client(stack).chat.completions.create(
        model="sim-model", messages=MSG, stream=True, tools=tools)]  # type: ignore[arg-type]
    args = "".join(tc.function.arguments or "" for ch in chunks if ch.choices
                   for tc in ch.choices[0].delta.tool_calls or [])
    assert orjson.loads(args) == {"city": "Oslo"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_byte_level_splits_reach_client_intact(stack: Stack) -> None:
    text = "Ünïcode 🌍 split at every byte boundary the wire likes — ✓."
    stack.sim.push({"content": text, "wire_split_seed": 7})
    chunks = [ch async for ch in await client(stack).chat.completions.create(
        model="sim-model", messages=MSG, stream=True)]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text


async def test_legacy_completions_stream_and_whole(stack: Stack) -> None:
    c = client(stack)
    stack.sim.push({"content": "once upon a time"}, {"content": "once upon a time"})
    whole = await c.completions.create(model="sim-model", prompt="Tell me")
    assert whole.choices[0].text == "once upon a time"
    parts = [ch async for ch in await c.completions.create(model="sim-model", prompt="Tell me",
                                                            stream=True)]
    assert "".join(p.choices[0].text for p in parts if p.choices) == "once upon a time"


async def test_models_health_ready(stack: Stack) -> None:
    models = await client(stack).models.list()
    assert [m.id for m in models.data] == ["sim-model"]
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.url + "/healthz") as r:
            assert r.status == 200
        async with s.get(stack.url + "/readyz") as r:
            assert r.status == 200
            assert (await r.json())["models"] == ["sim-model"]
        stack.sim.loading = True
        async with s.get(stack.url + "/readyz") as r:
            assert r.status == 503
            assert "Loading model" in (await r.json())["reason"]


async def test_readyz_and_models_when_upstream_is_down(make_stack: StackFactory) -> None:
    stack = await make_stack()
    await stack.sim.stop()
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.url + "/readyz") as r:
            assert r.status == 503
        async with s.get(stack.url + "/v1/models") as r:
            assert r.status == 502
            assert (await r.json())["error"]["code"] == "upstream_unreachable"


async def test_unknown_path_and_method_are_openai_shaped(stack: Stack) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.url + "/v1/nope") as r:
            assert r.status == 404
            err = (await r.json())["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert "/v1/nope" in err["message"]
        async with s.get(stack.url + "/v1/chat/completions") as r:
            assert r.status == 405
            assert (await r.json())["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(("body", "ctype", "status", "needle"), [
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b"[1, 2]", "application/json", 400, "must be a JSON object"),
    (b'{"model": "m"}', "application/json", 400, "'messages' is required"),
    (b'{"messages": []}', "application/json", 400, "non-empty array"),
    (b'{"messages": [{"content": "x"}]}', "application/json", 400, "messages[0].role"),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', "application/json", 400,
     "messages[0].role must be one of"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "application/json",
     400, "'stream' must be a boolean"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
     "application/json", 400, "'max_tokens'"),
    (b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}',
     "application/json", 400, "tools[0].function.name"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "text/plain", 415,
     "unsupported content type"),
    (b"", "application/json", 400, "empty"),
    (b"[" * 100 + b"]" * 100, "application/json", 400, "JSON"),
])
async def test_bad_input_is_refused_clearly(stack: Stack, body: bytes, ctype: str, status: int,
                                            needle: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.v1 + "/chat/completions", data=body,
                          headers={"Content-Type": ctype}) as r:
            assert r.status == status
            err = (await r.json())["error"]
            assert needle in err["message"]
    assert stack.sim.stats.requests == 0  # nothing bad reached the backend


async def test_body_over_limit_is_413(make_stack: StackFactory) -> None:
    stack = await make_stack(max_body_bytes=10_000)
    big = {"messages": [{"role": "user", "content": "x" * 20_000}]}
    with pytest.raises(openai.APIStatusError) as ei:
        await client(stack).chat.completions.create(model="m", messages=big["messages"])
    assert ei.value.status_code == 413
    assert "limit" in ei.value.message
    assert stack.sim.stats.requests == 0


async def test_sdk_sees_bad_request_type(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        await client(stack).chat.completions.create(model="m", messages=[])
    assert ei.value.param == "messages"


@pytest.mark.parametrize(("status", "exc"), [(429, openai.RateLimitError),
                                              (500, openai.InternalServerError),
                                              (503, openai.InternalServerError)])
@pytest.mark.parametrize("dialect", ["vllm", "llamacpp", "ollama", "llama-cpp-python"])
async def test_upstream_errors_keep_status_and_get_openai_shape(
        make_stack: StackFactory, dialect: str, status: int, exc: type[Exception]) -> None:
    stack = await make_stack(dialect)
    stack.sim.push({"fault": {"kind": "status", "status": status, "message": "boom here"}})
    with pytest.raises(exc) as ei:
        await client(stack).chat.completions.create(model="m", messages=MSG, stream=True)
    assert ei.value.status_code == status  # type: ignore[attr-defined]
    assert "boom here" in ei.value.message  # type: ignore[attr-defined]


async def test_upstream_unreachable_is_502(make_stack: StackFactory) -> None:
    stack = await make_stack()
    await stack.sim.stop()
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as ei:
            await client(stack).chat.completions.create(model="m", messages=MSG, stream=stream)
        assert ei.value.status_code == 502
        assert "unreachable" in ei.value.message


@pytest.mark.parametrize(("fault", "code"), [
    ({"kind": "reset", "after": 3}, "upstream_disconnected"),
    ({"kind": "malformed", "after": 3}, "upstream_malformed_event"),
    ({"kind": "truncated", "after": 3}, None),
    ({"kind": "error_event", "after": 3, "message": "CUDA out of memory"},
     "upstream_stream_error"),
])
async def test_error_after_streaming_began_is_an_event_then_done(
        stack: Stack, fault: dict[str, object], code: str | None) -> None:
    stack.sim.push({"content": "one two three four five six seven", "fault": fault})
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.v1 + "/chat/completions",
                          json={"messages": MSG, "stream": True}) as r:
            assert r.status == 200
            raw = await r.read()
    events = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    err = orjson.loads(events[-2])["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    if code:
        assert err["code"] == code
    # what arrived before the fault was relayed, not lost
    assert b'"content":"one"' in raw or b'"content": "one"' in raw


async def test_first_byte_timeout(make_stack: StackFactory) -> None:
    stack = await make_stack(first_byte_timeout=0.3, keepalive_interval=5)
    stack.sim.push({"content": "late", "ttft": 3})
    # had toolmend waited for the reply, the client would have got "late" after 3 s
    with pytest.raises(openai.APIStatusError) as ei:
        await client(stack).chat.completions.create(model="m", messages=MSG, stream=True)
    assert ei.value.status_code == 504
    assert "sent nothing within 0.3 s" in ei.value.message
    # and it gave up on the upstream request, before the upstream sent anything
    await _wait_for(lambda: bool(stack.sim.stats.disconnects))
    assert stack.sim.stats.chunks_sent == 0


async def test_idle_timeout_mid_stream(make_stack: StackFactory) -> None:
    stack = await make_stack(idle_timeout=0.3)
    stack.sim.push({"content": "a b c d e f", "fault": {"kind": "stall", "after": 2,
                                                        "seconds": 5}})
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.v1 + "/chat/completions",
                          json={"messages": MSG, "stream": True}) as r:
            raw = await r.read()
    assert b"upstream_idle_timeout" in raw
    assert raw.endswith(b"data: [DONE]\n\n")


async def test_total_timeout_on_endless_stream(make_stack: StackFactory) -> None:
    stack = await make_stack(total_timeout=0.5)
    stack.sim.push({"fault": {"kind": "endless"}, "token_delay": 0.001})
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.v1 + "/chat/completions",
                          json={"messages": MSG, "stream": True}) as r:
            raw = await r.read()
    assert b"upstream_total_timeout" in raw


async def test_connect_timeout(make_stack: StackFactory) -> None:
    import socket

    # A listener whose accept queue is full: further SYNs are dropped, connect() hangs.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        try:
            f.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(f)
    try:
        from toolmend.server.app import build_app, start_server
        from toolmend.server.config import Settings

        app = build_app(Settings(connect_timeout=0.3, log_requests=False),
                        [f"http://127.0.0.1:{port}"])
        runner, pport = await start_server(app, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(f"http://127.0.0.1:{pport}/v1/chat/completions",
                                  json={"messages": MSG}) as r:
                    err = (await r.json())["error"]
            assert r.status == 504, err
            assert err["code"] == "upstream_connect_timeout"
        finally:
            await runner.cleanup()
    finally:
        for f in fillers:
            f.close()
        lsock.close()


async def test_keepalive_comments_before_first_token(make_stack: StackFactory) -> None:
    stack = await make_stack(keepalive_interval=0.1)
    stack.sim.push({"content": "ok", "ttft": 0.65})
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.v1 + "/chat/completions",
                          json={"messages": MSG, "stream": True}) as r:
            raw = await r.read()
    head, _, rest = raw.partition(b"data: ")
    assert head.count(b": keep-alive\n\n") >= 3
    assert b"keep-alive" not in rest  # none after the first token
    assert b"\"content\":\"ok\"" in rest


async def _wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("phase", ["prefill", "mid-stream"])
async def test_client_disconnect_closes_upstream(stack: Stack, phase: str) -> None:
    # neither upstream reply would ever end by itself: only toolmend can close it
    if phase == "prefill":
        stack.sim.push({"content": "never", "ttft": 3600})
    else:
        stack.sim.push({"fault": {"kind": "endless"}, "token_delay": 0.01})
    session = aiohttp.ClientSession()
    request = asyncio.ensure_future(session.post(stack.v1 + "/chat/completions",
                                                 json={"messages": MSG, "stream": True}))
    if phase == "mid-stream":
        resp = await request
        await resp.content.readuntil(b"tick")
        resp.close()
    else:
        # no response headers yet: toolmend holds them until output or a keep-alive is due
        await _wait_for(lambda: stack.sim.stats.in_flight == 1)
        request.cancel()
    await session.close()
    await _wait_for(lambda: bool(stack.sim.stats.disconnects), timeout=10)
    await _wait_for(lambda: stack.sim.stats.in_flight == 0)
    assert len(stack.sim.stats.disconnects) == 1


async def _until_still(read: Callable[[], int], turns: int = 200) -> int:
    """Wait until ``read()`` stops changing: the same value over ``turns`` event-loop turns in
    a row (each turn handles every socket that is ready, so a flow that can move does)."""
    last, still = read(), 0
    for _ in range(1_000_000):
        await asyncio.sleep(0)
        now = read()
        still = still + 1 if now == last else 0
        last = now
        if still >= turns:
            return now
    raise AssertionError("the value never settled")


async def test_slow_reader_does_not_grow_memory(stack: Stack) -> None:
    """A client that stops reading stalls the upstream instead of filling toolmend's memory."""
    big = "x" * 2000
    stack.sim.push({"chunks": [big] * 25_000, "ttft": 0})  # ~50 MB of content
    session = aiohttp.ClientSession(read_bufsize=2**16)
    resp = await session.post(stack.v1 + "/chat/completions",
                              json={"messages": MSG, "stream": True})
    await resp.content.readexactly(1000)
    # not reading: the upstream moves until every buffer on the way is full, then stops
    sent_while_paused = await _until_still(lambda: stack.sim.stats.bytes_sent)
    assert sent_while_paused < 25_000_000, sent_while_paused
    assert stack.sim.stats.in_flight == 1  # stalled, not finished
    resp.close()
    await session.close()


async def test_upstream_connections_are_kept_alive_and_reused(stack: Stack) -> None:
    c = client(stack)
    await c.chat.completions.create(model="m", messages=MSG)  # warm: start-up probes are done
    opened = len(stack.sim.stats.connections)
    for stream in (True, False, True, True, False, True):
        r = await c.chat.completions.create(model="m", messages=MSG, stream=stream)
        if stream:
            _ = [ch async for ch in r]  # type: ignore[union-attr]
    assert len(stack.sim.stats.peers) == 7
    assert len(stack.sim.stats.connections) == opened  # every request rode a pooled connection


async def test_stale_keepalive_connection_is_retried_transparently(make_stack: StackFactory
                                                                   ) -> None:
    """A server that closes an idle keep-alive connection just as the next request arrives
    (llama-server does) must not cost the agent a 502: nothing reached the model yet."""
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        on_this_connection = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length")), b"0"))
                await reader.readexactly(length)
                on_this_connection += 1
                if on_this_connection > 1:  # the idle close racing the reuse
                    writer.close()
                    return
                served += head.startswith(b"POST")  # not the start-up discovery probes
                body = (b'data: {"id":"c","object":"chat.completion.chunk","model":"m",'
                        b'"choices":[{"index":0,"delta":{"content":"ok"},'
                        b'"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    from toolmend.server.app import build_app, start_server
    from toolmend.server.config import Settings

    app = build_app(Settings(log_requests=False, backend="vllm", slots=4),
                    [f"http://127.0.0.1:{port}"])
    runner, pport = await start_server(app, "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.post(f"http://127.0.0.1:{pport}/v1/chat/completions",
                                  json={"messages": MSG, "stream": True}) as r:
                    raw = await r.read()
                assert r.status == 200 and b'"ok"' in raw and b"error" not in raw, raw
        assert served == 3
    finally:
        await runner.cleanup()
        server.close()
