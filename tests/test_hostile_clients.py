"""Hostile clients: a token cap they try to slip past, identity headers that are not text,
sessions that belong to another agent, tickets that outlive their request, slow clients, and
credentials in the start-up banner.

Everything runs over real HTTP (raw sockets where a client misbehaves below HTTP) against a
recording upstream: each test asserts what the upstream actually received, never what toolmend
meant to send.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import sys
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolmend.scheduling.scheduler import Cost, FairScheduler, Ticket
from toolmend.server import auth
from toolmend.server.app import SCHEDULER, _json_line, build_app, start_server
from toolmend.server.config import Settings
from toolmend.server.request_body import OUTPUT_LIMIT_FIELDS, cap_output_tokens
from toolmend.sim.server import SimBackend
from toolmend.telemetry.sessions import SessionTracker, StepRecord, dumps
from toolmend.telemetry.tracing import TELEMETRY, session_trace_id

MSG = [{"role": "user", "content": "hello"}]
ALPHA_KEY = "tm-alpha-1a2b3c4d5e6f"
BRAVO_KEY = "tm-bravo-6f5e4d3c2b1a"
KEYS_TOML = f"""
[keys."{auth.hash_key(ALPHA_KEY)}"]
agent = "alpha"
max_tokens = 64

[keys."{auth.hash_key(BRAVO_KEY)}"]
agent = "bravo"
"""
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


class RecordingSim(SimBackend):
    """The simulator, also keeping every POST exactly as it arrived: path, headers, body."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.posts: list[tuple[str, dict[str, str], dict[str, Any]]] = []

    def app(self) -> web.Application:
        app = super().app()

        @web.middleware
        async def remember(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.method == "POST" and not request.path.startswith("/sim/"):
                raw = await request.read()  # cached: the handler reads it again
                self.posts.append((request.path, {str(k): v for k, v in request.headers.items()},
                                   orjson.loads(raw)))
            return await handler(request)

        app.middlewares.append(remember)
        return app

    def last(self) -> dict[str, Any]:
        return self.posts[-1][2]


@dataclass
class HStack:
    sim: RecordingSim
    url: str
    app: web.Application
    port: int
    clients: list[aiohttp.ClientSession] = field(default_factory=list)

    async def post(self, body: Any, key: str | None = None, path: str = "/v1/chat/completions",
                   **headers: str) -> tuple[int, Any]:
        h = dict(headers)
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        s = aiohttp.ClientSession()
        self.clients.append(s)
        async with s.post(self.url + path, json=body, headers=h) as r:
            raw = await r.read()
            try:
                return r.status, orjson.loads(raw)
            except orjson.JSONDecodeError:
                return r.status, raw

    async def get(self, path: str) -> tuple[int, Any]:
        s = aiohttp.ClientSession()
        self.clients.append(s)
        async with s.get(self.url + path) as r:
            return r.status, orjson.loads(await r.read())


@pytest.fixture
async def make_hstack(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    cleanups: list[Any] = []

    async def factory(dialect: str = "vllm", *, keys: bool = True,
                      sim_kwargs: dict[str, Any] | None = None, **settings: Any) -> HStack:
        sim = RecordingSim(dialect, ttft=0.0, **(sim_kwargs or {}))
        await sim.start()
        cleanups.append(sim.stop)
        s = Settings(**{"log_requests": False, **settings})
        if keys:
            cfg = tmp_path / "toolmend.toml"
            cfg.write_text(KEYS_TOML)
            s.config_path = str(cfg)
        app = build_app(s, [sim.url])
        runner, port = await start_server(app, "127.0.0.1", 0)
        cleanups.append(runner.cleanup)
        h = HStack(sim, f"http://127.0.0.1:{port}", app, port)
        cleanups.append(lambda: asyncio.gather(*(c.close() for c in h.clients)))
        return h

    yield factory
    for fn in reversed(cleanups):
        await fn()


def assert_openai_error(doc: Any, code: str, param: str | None = None) -> dict[str, Any]:
    assert isinstance(doc, dict), doc
    err = doc["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


async def raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` as raw bytes on a fresh connection; everything read until the server
    closes it (the close is the event waited for)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()


def http_post(path: str, body: bytes, *headers: bytes) -> bytes:
    head = [b"POST " + path.encode() + b" HTTP/1.1", b"Host: toolmend",
            b"Content-Type: application/json", b"Content-Length: " + str(len(body)).encode(),
            b"Connection: close", *headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def split_response(raw: bytes) -> tuple[int, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    try:
        return status, orjson.loads(body)
    except orjson.JSONDecodeError:
        return status, body


# --- 1. a keyed agent's token cap, whatever the front and whatever the field -------------------

@pytest.mark.parametrize(("path", "body", "field_sent"), [
    ("/api/chat", {"model": "sim-model", "messages": MSG, "stream": False,
                   "options": {"num_predict": 100_000}}, "max_tokens"),
    ("/api/generate", {"model": "sim-model", "prompt": "hi", "stream": False,
                       "options": {"num_predict": 100_000}}, "max_tokens"),
    ("/api/chat", {"model": "sim-model", "messages": MSG, "stream": False,
                   "options": {"num_predict": -1}}, "max_tokens"),
    ("/v1/chat/completions", {"model": "sim-model", "messages": MSG, "max_tokens": None},
     "max_tokens"),
    ("/v1/chat/completions", {"model": "sim-model", "messages": MSG,
                              "max_completion_tokens": None}, "max_completion_tokens"),
    ("/v1/completions", {"model": "sim-model", "prompt": "hi", "max_tokens": None},
     "max_tokens"),
])
async def test_keyed_cap_reaches_the_upstream_from_every_front(
        make_hstack: Callable[..., Any], path: str, body: dict[str, Any],
        field_sent: str) -> None:
    h = await make_hstack()
    status, doc = await h.post(body, ALPHA_KEY, path)
    assert status == 200, doc
    sent = h.sim.last()
    assert sent[field_sent] == 64
    for name in OUTPUT_LIMIT_FIELDS:  # nothing else asks for more, nor for "no limit"
        assert name not in sent or sent[name] == 64, (name, sent)


async def test_keyed_cap_covers_every_field_a_backend_honours(
        make_hstack: Callable[..., Any]) -> None:
    h = await make_hstack()
    body = {"model": "sim-model", "messages": MSG, "max_tokens": 10, "n_predict": 100_000,
            "max_new_tokens": 100_000, "num_predict": -1, "max_completion_tokens": 9999,
            "options": {"num_predict": 100_000}}
    assert (await h.post(body, ALPHA_KEY))[0] == 200
    sent = h.sim.last()
    assert sent["max_tokens"] == 10  # below the cap: left as asked
    assert sent["n_predict"] == 64 and sent["max_new_tokens"] == 64
    assert sent["num_predict"] == 64 and sent["max_completion_tokens"] == 64
    assert sent["options"] == {"num_predict": 64}
    # n_predict -1 is llama-server's "until the context is full"
    assert (await h.post({"model": "sim-model", "messages": MSG, "n_predict": -1},
                         ALPHA_KEY))[0] == 200
    assert h.sim.last()["n_predict"] == 64 and h.sim.last()["max_tokens"] == 64
    # a key without a cap: bounded by the backend's context (vLLM's max_model_len, 4096) only
    assert (await h.post({"model": "sim-model", "messages": MSG, "n_predict": 3000},
                         BRAVO_KEY))[0] == 200
    assert h.sim.last()["n_predict"] == 3000 and "max_tokens" not in h.sim.last()
    assert (await h.post({"model": "sim-model", "messages": MSG, "n_predict": 100_000},
                         BRAVO_KEY))[0] == 200
    assert h.sim.last()["n_predict"] == 4096 and "max_tokens" not in h.sim.last()


async def test_keyed_cap_reaches_ollama_native_upstream(make_hstack: Callable[..., Any]) -> None:
    h = await make_hstack("ollama", ollama_native=True, backend="ollama")
    body = {"model": "sim-model", "messages": MSG, "max_tokens": 100_000}
    assert (await h.post(body, ALPHA_KEY))[0] == 200
    path, _, sent = h.sim.posts[-1]
    assert path == "/api/chat" and sent["options"]["num_predict"] == 64
    body = {"model": "sim-model", "messages": MSG, "max_completion_tokens": None}
    assert (await h.post(body, ALPHA_KEY))[0] == 200
    assert h.sim.last()["options"]["num_predict"] == 64
    body = {"model": "sim-model", "messages": MSG, "stream": False,
            "options": {"num_predict": 100_000}}
    status, doc = await h.post(body, ALPHA_KEY, "/api/chat")
    assert status == 200, doc
    path, _, sent = h.sim.posts[-1]
    assert path == "/api/chat" and sent["options"]["num_predict"] == 64


async def test_keyed_cap_holds_on_a_validation_retry(make_hstack: Callable[..., Any]) -> None:
    h = await make_hstack()
    h.sim.push({"tool_calls": [{"name": "get_weather", "arguments": {"town": "Oslo"}}]},
               {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]})
    body = {"model": "sim-model", "messages": MSG, "tools": TOOLS, "max_tokens": 100_000}
    status, doc = await h.post(body, ALPHA_KEY)
    assert status == 200, doc
    call = doc["choices"][0]["message"]["tool_calls"][0]["function"]
    assert orjson.loads(call["arguments"]) == {"city": "Oslo"}
    assert len(h.sim.posts) == 2  # the first answer and its retry
    assert [p[2]["max_tokens"] for p in h.sim.posts] == [64, 64]


async def test_keyed_cap_is_shared_by_best_of_n_retries(make_hstack: Callable[..., Any]) -> None:
    """A best-of-n retry asks for ``n`` answers: the key's cap of 64 is shared among them,
    as it is at the door, and the retry's 512-token floor never lifts it."""
    h = await make_hstack(retry_samples=4)
    h.sim.push({"tool_calls": [{"name": "get_weather", "arguments": {"town": "Oslo"}}]},
               {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]})
    body = {"model": "sim-model", "messages": MSG, "tools": TOOLS, "max_tokens": 100_000}
    status, doc = await h.post(body, ALPHA_KEY)
    assert status == 200, doc
    assert len(h.sim.posts) == 2
    retry = h.sim.posts[1][2]
    assert retry.get("n") == 4, retry
    assert retry["max_tokens"] == 16


async def test_keyless_retry_gets_the_floor(make_hstack: Callable[..., Any]) -> None:
    """Without a key the retry of a small ``max_tokens`` gets room for its arguments, where it
    is read as a bare arguments object under a JSON-schema grammar (llama-server)."""
    h = await make_hstack("llamacpp", keys=False)
    h.sim.push({"tool_calls": [{"name": "get_weather", "arguments": {"town": "Oslo"}}]},
               {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]})
    body = {"model": "sim-model", "messages": MSG, "tools": TOOLS, "max_tokens": 140}
    status, doc = await h.post(body, None)
    assert status == 200, doc
    assert [p[2]["max_tokens"] for p in h.sim.posts] == [140, 512]


async def test_keyed_cap_is_shared_by_the_sequences_asked_for(
        make_hstack: Callable[..., Any]) -> None:
    h = await make_hstack()
    body = {"model": "sim-model", "prompt": "hi", "n": 4, "best_of": 8, "max_tokens": 1000}
    assert (await h.post(body, ALPHA_KEY, "/v1/completions"))[0] == 200
    assert h.sim.last()["max_tokens"] == 8  # 64 tokens for the request, over 8 sequences
    body = {"model": "sim-model", "prompt": ["a", "b", "c", "d"], "n": 2, "max_tokens": 1000}
    assert (await h.post(body, ALPHA_KEY, "/v1/completions"))[0] == 200
    assert h.sim.last()["max_tokens"] == 8  # 4 prompts x 2 replies
    status, doc = await h.post({"model": "sim-model", "messages": MSG, "n": 129}, ALPHA_KEY)
    assert status == 400
    assert_openai_error(doc, "too_many_choices", "n")
    status, doc = await h.post({"model": "sim-model", "prompt": ["x"] * 65, "n": 2},
                               BRAVO_KEY, "/v1/completions")
    assert status == 400
    assert_openai_error(doc, "too_many_choices", "prompt")
    assert len(h.sim.posts) == 2


async def test_body_priority_does_not_reach_the_upstream(make_hstack: Callable[..., Any]
                                                         ) -> None:
    h = await make_hstack(keys=False)
    body = {"model": "sim-model", "messages": MSG, "priority": -1000}
    assert (await h.post(body))[0] == 200
    assert "priority" not in h.sim.last()  # X-Priority, held to the agent's ceiling, decides
    h2 = await make_hstack(keys=False, vllm_priority=True)
    assert (await h2.post(body))[0] == 200
    assert h2.sim.last()["priority"] == 0  # the agent's own class, not the body's


def test_cap_output_tokens_rules() -> None:
    body: dict[str, Any] = {"max_tokens": 1.5e12, "n_predict": "9999", "max_new_tokens": True}
    assert cap_output_tokens(body, 64, None)
    assert body == {"max_tokens": 64, "n_predict": 64, "max_new_tokens": 64}
    body = {}
    assert cap_output_tokens(body, 64, None) and body == {"max_tokens": 64}
    body = {"max_tokens": 5}
    assert not cap_output_tokens(body, 64, None) and body == {"max_tokens": 5}
    body = {"max_tokens": 500}  # the key's cap and the context: the lower wins
    assert cap_output_tokens(body, 4096, 100) and body == {"max_tokens": 100}
    # without a key, only numbers above the context are lowered
    body = {"max_tokens": 10**12, "n_predict": -1, "max_completion_tokens": None,
            "max_new_tokens": 10.0**15, "options": {"num_predict": 10**9}}
    assert cap_output_tokens(body, None, 2048)
    assert body == {"max_tokens": 2048, "n_predict": -1, "max_completion_tokens": None,
                    "max_new_tokens": 2048, "options": {"num_predict": 2048}}
    body = {"max_tokens": 10**12}
    assert not cap_output_tokens(body, None, None) and body == {"max_tokens": 10**12}


# --- 15. keyless: capped at the backend's context; the sim bounds its reply --------------------

@pytest.mark.parametrize(("dialect", "context"), [("vllm", 1000), ("llamacpp", 512)])
async def test_keyless_max_tokens_is_capped_at_the_context(make_hstack: Callable[..., Any],
                                                           dialect: str, context: int) -> None:
    h = await make_hstack(dialect, keys=False, slots=2, sim_kwargs={"context": context})
    for name in ("max_tokens", "max_completion_tokens", "n_predict"):
        status, doc = await h.post({"model": "sim-model", "messages": MSG, name: 10**12})
        assert status == 200, doc
        assert h.sim.last()[name] == context
    status, doc = await h.post({"model": "sim-model", "messages": MSG, "max_tokens": 7})
    assert status == 200 and h.sim.last()["max_tokens"] == 7
    assert doc["choices"][0]["finish_reason"] == "length"
    assert doc["usage"]["completion_tokens"] == 7


async def test_sim_bounds_a_huge_reply_by_its_context() -> None:
    sim = SimBackend("vllm", ttft=0.0, context=300)
    await sim.start()
    try:
        async with aiohttp.ClientSession() as s:
            body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 10**12}
            async with s.post(sim.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                doc = await r.json()
            assert doc["choices"][0]["finish_reason"] == "length"
            assert doc["usage"]["completion_tokens"] == 200  # 300 - a 100-token prompt
            for bad in ("lots", 0, -5, 1.5, True):
                async with s.post(sim.url + "/v1/chat/completions",
                                  json={"messages": MSG, "max_tokens": bad}) as r:
                    assert r.status == 400, bad
            async with s.post(sim.url + "/v1/chat/completions", data=b"[1, 2]") as r:
                assert r.status == 400
        assert sim.stats.in_flight == 0
    finally:
        await sim.stop()


async def test_sim_ollama_chat_refuses_bad_json() -> None:
    sim = SimBackend("ollama", ttft=0.0)
    await sim.start()
    try:
        async with aiohttp.ClientSession() as s:
            for raw in (b"{oops", b"[]"):
                async with s.post(sim.url + "/api/chat", data=raw) as r:
                    assert r.status == 400
                    assert "error" in await r.json()
    finally:
        await sim.stop()


# --- 5. identity headers that are not text ------------------------------------------------------

@pytest.mark.parametrize(("header", "value"), [
    (b"X-Agent-Id", b"\xff"), (b"X-Session-Id", b"p\xff"),
    (b"X-Priority", b"\xfe\xff"), (b"X-Toolmend-Deadline-Ms", b"1\xff"),
    (b"X-Toolmend-On-Invalid", b"retry\xc3"), (b"X-Toolmend-Tool-Mode", b"\xc0\xaf"),
])
@pytest.mark.parametrize("keyed", [False, True])
async def test_identity_header_that_is_not_text_is_refused_at_the_door(
        make_hstack: Callable[..., Any], header: bytes, value: bytes, keyed: bool) -> None:
    h = await make_hstack(keys=keyed)
    extra = [b"Authorization: Bearer " + ALPHA_KEY.encode()] if keyed else []
    for path, body in (("/v1/chat/completions", {"messages": MSG, "stream": True}),
                       ("/v1/chat/completions", {"messages": MSG}),
                       ("/api/chat", {"model": "sim-model", "messages": MSG})):
        raw = await raw_exchange(h.port, http_post(path, orjson.dumps(body),
                                                   header + b": " + value, *extra))
        status, doc = split_response(raw)
        assert status == 400, raw
        if path == "/api/chat":  # the Ollama API's shape: the message alone
            assert set(doc) == {"error"} and header.decode() in doc["error"], doc
            continue
        err = assert_openai_error(doc, "invalid_header", header.decode())
        assert header.decode() in err["message"]
    assert h.sim.posts == []  # refused before anything was sent upstream
    status, listing = await h.get("/toolmend/v1/sessions")
    assert status == 200 and listing["data"] == []


async def test_trace_headers_that_are_not_text_are_ignored(
        make_hstack: Callable[..., Any]) -> None:
    h = await make_hstack(keys=False, otlp_endpoint="http://127.0.0.1:9", otlp_timeout=1.0)
    good = b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    for headers in ((b"traceparent: 00-\xff\xfe-01",),
                    (good, b"tracestate: vendor=\xff"),
                    (good, b"tracestate: v=\xc3\xa9t\xc3\xa9")):
        raw = await raw_exchange(h.port, http_post(
            "/v1/chat/completions", orjson.dumps({"messages": MSG}), *headers))
        assert split_response(raw)[0] == 200, raw
        assert "tracestate" not in {k.lower() for k in h.sim.posts[-1][1]}
    status, listing = await h.get("/toolmend/v1/sessions")
    assert status == 200 and len(listing["data"]) >= 1


async def test_admin_key_check_survives_a_key_that_is_not_text(
        make_hstack: Callable[..., Any]) -> None:
    h = await make_hstack(keys=False, admin_key="adm1n")
    for path in (b"/metrics", b"/toolmend/v1/sessions"):
        raw = await raw_exchange(h.port, b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n"
                                 b"Authorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n")
        assert split_response(raw)[0] == 200, raw  # loopback: allowed, key or not


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(agent=st.binary(max_size=40), session=st.binary(max_size=40))
def test_random_identity_bytes_never_give_500(agent: bytes, session: bytes) -> None:
    """Whatever bytes the identity headers carry: 200 or a 4xx, never a 500, and the sessions
    endpoint keeps answering."""
    agent = agent.replace(b"\r", b"").replace(b"\n", b"")
    session = session.replace(b"\r", b"").replace(b"\n", b"")

    async def run() -> None:
        sim = SimBackend("vllm", ttft=0.0)
        await sim.start()
        app = build_app(Settings(log_requests=True, slots=2), [sim.url])
        runner, port = await start_server(app, "127.0.0.1", 0)
        try:
            raw = await raw_exchange(port, http_post(
                "/v1/chat/completions", orjson.dumps({"messages": MSG, "stream": True}),
                b"X-Agent-Id: " + agent, b"X-Session-Id: " + session))
            status = int(raw.split(b" ", 2)[1])
            assert status == 200 or 400 <= status < 500, raw
            raw = await raw_exchange(port, b"GET /toolmend/v1/sessions HTTP/1.1\r\n"
                                     b"Host: t\r\nConnection: close\r\n\r\n")
            assert split_response(raw)[0] == 200, raw
        finally:
            await runner.cleanup()
            await sim.stop()

    asyncio.run(run())


def test_request_log_and_sessions_escape_what_is_not_text() -> None:
    line = orjson.loads(_json_line({"agent_id": "a\udcffb", "status": 200}))
    assert line == {"agent_id": "a\\udcffb", "status": 200}
    tracker = SessionTracker(4)
    tracker.record("p\udcff", "x\udcfe", "header", StepRecord(1, "req_1", 1.0, 2.0, 200))
    docs = orjson.loads(dumps([s.summary() for s in tracker.recent()]))
    assert docs[0]["id"] == "p\\udcff" and docs[0]["agent_id"] == "x\\udcfe"
    assert orjson.loads(dumps({"k": ["\udc80"]})) == {"k": ["\\udc80"]}


async def test_sessions_endpoint_survives_a_record_that_is_not_text(
        make_hstack: Callable[..., Any]) -> None:
    h = await make_hstack(keys=False)
    tel = h.app[TELEMETRY]
    step = StepRecord(1, "req_1", 1.0, 2.0, 200, tool_names=["t\udcff"])
    tel.sessions.record("sess", "agent", "header", step)
    status, listing = await h.get("/toolmend/v1/sessions")
    assert status == 200 and listing["data"][0]["id"] == "sess"
    status, detail = await h.get("/toolmend/v1/sessions/sess")
    assert status == 200 and detail["steps"][0]["tool_names"] == ["t\\udcff"]


# --- 6. a session belongs to its agent ----------------------------------------------------------

async def test_one_key_cannot_write_into_another_agents_session(
        make_hstack: Callable[..., Any]) -> None:
    # spans on (exported nowhere): the upstream gets each step's traceparent
    h = await make_hstack(otlp_endpoint="http://127.0.0.1:9", otlp_timeout=1.0)
    sid = "bravo-private-sess"
    for key in (BRAVO_KEY, BRAVO_KEY, ALPHA_KEY):
        status, doc = await h.post({"model": "sim-model", "messages": MSG}, key,
                                   **{"X-Session-Id": sid})
        assert status == 200, doc
    status, listing = await h.get("/toolmend/v1/sessions")
    assert status == 200
    mine = sorted((d["agent_id"], d["steps"]) for d in listing["data"] if d["id"] == sid)
    assert mine == [("alpha", 1), ("bravo", 2)]
    status, doc = await h.get(f"/toolmend/v1/sessions/{sid}")
    assert status == 409
    assert_openai_error(doc, "ambiguous_session", "agent_id")
    status, bravo = await h.get(f"/toolmend/v1/sessions/{sid}?agent_id=bravo")
    assert status == 200 and bravo["agent_id"] == "bravo" and len(bravo["steps"]) == 2
    status, alpha = await h.get(f"/toolmend/v1/sessions/{sid}?agent_id=alpha")
    assert status == 200 and len(alpha["steps"]) == 1
    status, _ = await h.get(f"/toolmend/v1/sessions/{sid}?agent_id=charlie")
    assert status == 404
    # spans: bravo's two steps share one trace; alpha's step is in a trace of its own
    traces = [p[1]["traceparent"].split("-")[1] for p in h.sim.posts]
    assert traces[0] == traces[1] and traces[2] != traces[0]
    assert set(bravo["trace_ids"]) == {traces[0]} and set(alpha["trace_ids"]) == {traces[2]}


def test_session_trace_id_depends_on_the_agent() -> None:
    a, b = session_trace_id("alpha", "s1"), session_trace_id("bravo", "s1")
    assert a != b and a == session_trace_id("alpha", "s1")
    digest = hashlib.sha256(b"toolmend-session\0alpha\0s1").digest()
    assert a == int.from_bytes(digest[:16], "big")
    assert session_trace_id("a\udcff", "s") > 0  # bytes that are not text still hash


# --- 10. finished tickets are not kept alive ----------------------------------------------------

def _live_tickets() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, Ticket))


async def test_no_ticket_outlives_its_request(make_hstack: Callable[..., Any]) -> None:
    h = await make_hstack(keys=False, slots=2, queue_ttl=300.0)
    before = _live_tickets()
    bodies = [{"model": "sim-model", "messages": MSG, "stream": i % 2 == 0} for i in range(60)]
    results = await asyncio.gather(*(h.post(b) for b in bodies))  # many wait in the queue
    assert [r[0] for r in results] == [200] * 60
    sched = h.app[SCHEDULER]
    assert sched.queued == 0 and sched.in_flight == 0
    assert sched._expiry == []
    assert _live_tickets() == before


def test_scheduler_core_drops_expiry_entries_of_finished_tickets() -> None:
    now = [0.0]
    s = FairScheduler(1, clock=lambda: now[0], express_slot=False)
    refs: list[weakref.ref[Ticket]] = []
    hold = s.submit("long", Cost(10))  # holds the only slot throughout
    waiting = s.submit("w", Cost(10))  # keeps the queue non-empty throughout
    for i in range(500):
        t = s.submit(f"a{i % 7}", Cost(10))
        refs.append(weakref.ref(t))
        s.cancel(t)  # leaves the queue: its expiry entry is stale
        del t
        assert len(s._expiry) <= 2 * s.queued + 64
    gc.collect()
    assert sum(1 for r in refs if r() is not None) <= 2 * s.queued + 64
    s.release(hold)  # "w" runs; the queue is empty
    assert s._expiry == [] and waiting.state.value == "dispatched"
    gc.collect()
    assert all(r() is None for r in refs)
    s.release(waiting)
    # expiry still works after the rebuilds
    a = s.submit("x", Cost(1))
    b = s.submit("y", Cost(1), deadline=5.0)
    now[0] = 6.0
    assert s.expire() == [b]
    s.release(a)


# --- 11. slow clients: header timeout, body timeout, connections per address -------------------

async def _trickle(writer: asyncio.StreamWriter, stop: asyncio.Event) -> None:
    """The slowloris client: one more header line every 50 ms, never the blank line."""
    i = 0
    while not stop.is_set():
        i += 1
        try:
            writer.write(f"X-Slow-{i}: {'a' * 8}\r\n".encode())
            await writer.drain()
        except (ConnectionError, RuntimeError):
            return
        try:
            await asyncio.wait_for(stop.wait(), 0.05)
        except TimeoutError:
            pass


async def test_slowloris_connection_is_closed_after_the_header_timeout(
        make_hstack: Callable[..., Any]) -> None:
    h = await make_hstack(keys=False, header_timeout=0.4)
    loop = asyncio.get_running_loop()
    started = loop.time()  # before the connection exists: the server's clock starts later
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n")
    stop = asyncio.Event()
    trickler = asyncio.create_task(_trickle(writer, stop))
    try:
        raw = await asyncio.wait_for(reader.read(), 30)  # returns once the server closed it
    finally:
        stop.set()
        await trickler
        writer.close()
    assert loop.time() - started >= 0.4
    status, doc = split_response(raw)
    assert status == 408
    assert_openai_error(doc, "header_timeout")
    # a connection that sends nothing at all is closed too
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
    raw = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    assert split_response(raw)[0] == 408
    # and an ordinary request still gets its answer
    assert (await h.post({"messages": MSG}))[0] == 200
    assert h.sim.posts and all(p[0] == "/v1/chat/completions" for p in h.sim.posts)


async def test_header_timeout_on_a_kept_alive_connection(make_hstack: Callable[..., Any]) -> None:
    h = await make_hstack(keys=False, header_timeout=0.4)
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
    body = orjson.dumps({"messages": MSG})
    first = http_post("/v1/chat/completions", body).replace(b"Connection: close",
                                                            b"Connection: keep-alive")
    writer.write(first)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    await reader.readexactly(length)
    # a slow request takes longer than the timeout to send, although data keeps arriving
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\n")
    stop = asyncio.Event()
    trickler = asyncio.create_task(_trickle(writer, stop))
    try:
        raw = await asyncio.wait_for(reader.read(), 30)
    finally:
        stop.set()
        await trickler
        writer.close()
    assert split_response(raw)[0] == 408


async def test_slow_body_gets_408(make_hstack: Callable[..., Any]) -> None:
    h = await make_hstack(keys=False, body_timeout=0.3)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
    raw = await raw_exchange(h.port, head + b'{"messages": ')
    status, doc = split_response(raw)
    assert status == 408
    assert_openai_error(doc, "body_timeout")
    assert h.sim.posts == []


async def test_connections_per_client_address_are_capped(
        make_hstack: Callable[..., Any]) -> None:
    h = await make_hstack(keys=False, max_client_connections=2, limit_loopback_clients=True,
                          header_timeout=0.5)
    idle = [await asyncio.open_connection("127.0.0.1", h.port) for _ in range(2)]
    raw = await raw_exchange(h.port, http_post("/v1/chat/completions",
                                               orjson.dumps({"messages": MSG})))
    status, doc = split_response(raw)
    assert status == 429
    assert_openai_error(doc, "too_many_connections")
    assert h.sim.posts == []
    for reader, writer in idle:  # the header timeout closes the idle ones...
        assert split_response(await asyncio.wait_for(reader.read(), 30))[0] == 408
        writer.close()
    # ...which frees their places
    raw = await raw_exchange(h.port, http_post("/v1/chat/completions",
                                               orjson.dumps({"messages": MSG})))
    assert split_response(raw)[0] == 200


async def test_loopback_is_exempt_from_the_connection_cap_by_default(
        make_hstack: Callable[..., Any]) -> None:
    h = await make_hstack(keys=False, max_client_connections=1)
    idle = [await asyncio.open_connection("127.0.0.1", h.port) for _ in range(3)]
    try:
        results = await asyncio.gather(*(h.post({"messages": MSG}) for _ in range(3)))
        assert [r[0] for r in results] == [200, 200, 200]
    finally:
        for _, w in idle:
            w.close()


def test_identity_text_rules() -> None:
    assert auth.is_text("planner-7") and auth.is_text("agent é 東京")
    for bad in ("a\udcffb", "a\x01b", "tab\there", "del\x7f", "zero\u200bwidth"):
        assert not auth.is_text(bad), bad


def test_which_addresses_count_against_the_cap() -> None:
    g = auth.ConnectionGuard(1.0, 4, exempt=auth.parse_networks(["10.1.0.0/16", "2001:db8::1"]))
    assert g.counted("192.0.2.7") and g.counted("2001:db8::2")
    assert not g.counted("10.1.200.3") and not g.counted("2001:db8::1")
    assert not g.counted("127.0.0.1") and not g.counted("::1")
    assert not g.counted("::ffff:127.0.0.1") and not g.counted(None)
    assert auth.ConnectionGuard(1.0, 4, limit_loopback=True).counted("127.0.0.2")
    assert not auth.ConnectionGuard(1.0, 0).counted("192.0.2.7")  # 0: no cap
    for _ in range(4):
        assert g.admit("192.0.2.7")
    assert not g.admit("192.0.2.7") and g.refused == 1
    g.release("192.0.2.7")
    assert g.admit("192.0.2.7")
    with pytest.raises(ValueError, match="client_limit_exempt"):
        auth.parse_networks(["10.0.0.0/33"])


# --- 12. credentials in an upstream URL never reach stdout --------------------------------------

async def test_banner_does_not_print_upstream_credentials(tmp_path: Path) -> None:
    sim = SimBackend("vllm", ttft=0.0)
    url = await sim.start()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "toolmend", "serve", "--port", "0", "--slots", "1",
        "--upstream", url.replace("http://", "http://agent:s3cr3t-pw@"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=tmp_path)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line.startswith(b"toolmend listening on"), line
        assert b"s3cr3t-pw" not in line and b"agent:" not in line
        assert f"-> {url}".encode() in line
    finally:
        proc.terminate()
        _, err = await proc.communicate()
        await sim.stop()
    assert b"s3cr3t-pw" not in err


def test_collector_credentials_are_not_logged() -> None:
    from toolmend.telemetry.tracing import _build_exporter

    built = _build_exporter(Settings(otlp_endpoint="http://otel:c0ll-pw@127.0.0.1:4318"))
    assert built is not None
    exporter, shown = built
    assert shown == "http://127.0.0.1:4318/v1/traces"
    exporter.shutdown()


async def test_doctor_does_not_print_upstream_credentials() -> None:
    from toolmend.backends.doctor import run_doctor

    sim = SimBackend("vllm", ttft=0.0)
    url = await sim.start()
    try:
        out = await run_doctor(1, [url.replace("http://", "http://agent:s3cr3t-pw@")])
        as_json = await run_doctor(1, [url.replace("http://", "http://agent:s3cr3t-pw@")],
                                   as_json=True)
    finally:
        await sim.stop()
    assert "s3cr3t-pw" not in out and "s3cr3t-pw" not in as_json
    assert f"probe:   {url}: vllm" in out


# --- the simulator's hostile upstream faults (the soak's inputs for items 2, 4, 7, 13, 14) -----

async def test_sim_hostile_faults_do_what_they_say() -> None:
    sim = SimBackend("vllm", ttft=0.0)
    await sim.start()

    def scenario(kind: str, **fault: Any) -> dict[str, Any]:
        return {"fault": {"kind": kind, **fault}}

    async def fetch(stream: bool) -> tuple[int, bytes | None, str | None]:
        body = {"messages": MSG, "stream": stream}
        async with aiohttp.ClientSession() as s:
            try:
                async with s.post(sim.url + "/v1/chat/completions", json=body) as r:
                    try:
                        return r.status, await r.read(), None
                    except aiohttp.ClientError as e:
                        return r.status, None, e.__class__.__name__
            except aiohttp.ClientError as e:
                return 0, None, e.__class__.__name__

    try:
        sim.push(scenario("headers_then_reset"))
        status, raw, err = await fetch(True)
        assert status == 200 and raw is None and err is not None
        sim.push(scenario("headers_then_stall", seconds=0.05))
        status, raw, err = await fetch(True)
        assert status == 200 and raw is None and err is not None
        sim.push(scenario("reset_mid_body"))
        status, raw, err = await fetch(False)
        assert status == 200 and err == "ClientPayloadError"
        sim.push(scenario("invalid_utf8"))
        status, raw, _ = await fetch(True)
        assert raw is not None and b"bad \xff\xfe bytes \xc3" in raw
        assert raw.endswith(b"data: [DONE]\n\n")
        sim.push(scenario("huge_line", size=3 * 1024 * 1024))
        status, raw, _ = await fetch(True)
        assert raw is not None and max(len(x) for x in raw.split(b"\n")) > 3 * 1024 * 1024
        sim.push(scenario("unterminated_event", size=2 * 1024 * 1024))
        status, raw, _ = await fetch(True)
        assert raw is not None and len(raw) >= 2 * 1024 * 1024 - 64 and b"\n\n" not in raw
        sim.push(scenario("huge_body", size=5 * 1024 * 1024))
        status, raw, _ = await fetch(False)
        assert raw is not None
        assert len(orjson.loads(raw)["choices"][0]["message"]["content"]) == 5 * 1024 * 1024
    finally:
        await sim.stop()
