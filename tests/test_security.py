"""Security: API keys and identity, credentials that never leave, limits, no upstream choice.

Everything runs over real HTTP against the simulated backend; refusals are checked for the
OpenAI error shape and for never having reached the backend.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from toolmend.server import auth
from toolmend.server.app import SCHEDULER, build_app, start_server
from toolmend.server.config import Settings
from toolmend.sim.server import SimBackend
from toolmend.telemetry.tracing import TELEMETRY

from .conftest import Stack, StackFactory

MSG = [{"role": "user", "content": "hello"}]
PLANNER_KEY = "tm-planner-9f8e7d6c5b4a"
CODER_KEY = "tm-coder-0a1b2c3d4e5f"
UPSTREAM_KEY = "UPSTREAM-CREDENTIAL-5ec7e7"
CONTENT_SECRET = "MESSAGE-CONTENT-c0ffee42"
KEYS_TOML = f"""
[keys."{auth.hash_key(PLANNER_KEY)}"]
agent = "planner"
weight = 3.0
models = ["sim-model", "small-model"]
max_tokens = 64

[keys."{auth.hash_key(CODER_KEY)}"]
agent = "coder"
"""


class HeaderSim(SimBackend):
    """The simulator, also remembering each POST's headers (what toolmend sent upstream)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.headers: list[dict[str, str]] = []

    def app(self) -> web.Application:
        app = super().app()

        @web.middleware
        async def remember(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.method == "POST":
                self.headers.append({str(k): v for k, v in request.headers.items()})
            return await handler(request)

        app.middlewares.append(remember)
        return app


@dataclass
class KStack:
    sim: HeaderSim
    url: str
    app: web.Application
    sessions: list[aiohttp.ClientSession] = field(default_factory=list)

    async def post(self, body: Any, key: str | None = None, path: str = "/v1/chat/completions",
                   **headers: str) -> tuple[int, dict[str, Any] | bytes, dict[str, str]]:
        h = dict(headers)
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        s = aiohttp.ClientSession()
        self.sessions.append(s)
        async with s.post(self.url + path, json=body, headers=h) as r:
            raw = await r.read()
            ctype = r.headers.get("Content-Type", "")
            doc = orjson.loads(raw) if ctype.startswith("application/json") else raw
            return r.status, doc, {str(k): v for k, v in r.headers.items()}


@pytest.fixture
async def make_kstack(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    cleanups: list[Any] = []

    async def factory(toml: str = KEYS_TOML, **settings: Any) -> KStack:
        sim = HeaderSim("vllm", ttft=0.0)
        await sim.start()
        cleanups.append(sim.stop)
        cfg = tmp_path / "toolmend.toml"
        cfg.write_text(toml)
        s = Settings(**{"log_requests": False, **settings})
        s.config_path = str(cfg)
        app = build_app(s, [sim.url])
        runner, port = await start_server(app, "127.0.0.1", 0)
        cleanups.append(runner.cleanup)
        k = KStack(sim, f"http://127.0.0.1:{port}", app)
        cleanups.append(lambda: asyncio.gather(*(x.close() for x in k.sessions)))
        return k

    yield factory
    for fn in reversed(cleanups):
        await fn()


def assert_openai_error(doc: Any, code: str) -> dict[str, Any]:
    assert isinstance(doc, dict), doc
    err = doc["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["code"] == code, err
    return err


# --- keys and identity --------------------------------------------------------------------------

async def test_keys_required_and_checked(make_kstack: Callable[..., Any]) -> None:
    k = await make_kstack()
    body = {"model": "sim-model", "messages": MSG}
    for key in (None, "", "wrong-key", PLANNER_KEY[:-1], PLANNER_KEY + "x"):
        status, doc, headers = await k.post(body, key)
        assert status == 401
        err = assert_openai_error(doc, "invalid_api_key")
        assert err["type"] == "authentication_error"
        assert headers["WWW-Authenticate"].startswith("Bearer")
    status, doc, _ = await k.post(body, None, Authorization=f"Basic {PLANNER_KEY}")
    assert status == 401
    assert k.sim.stats.requests == 0  # nothing unauthenticated reached the backend
    status, doc, _ = await k.post(body, PLANNER_KEY)
    assert status == 200, doc
    async with aiohttp.ClientSession() as s:
        async with s.get(k.url + "/v1/models") as r:
            assert r.status == 401
        async with s.get(k.url + "/v1/models",
                         headers={"Authorization": f"Bearer {CODER_KEY}"}) as r:
            assert r.status == 200
        async with s.get(k.url + "/healthz") as r:  # probes need no key
            assert r.status == 200
        async with s.get(k.url + "/metrics") as r:  # own gate: loopback or the admin key
            assert r.status == 200


async def test_refusals_on_the_ollama_api_take_ollama_shape(
        make_kstack: Callable[..., Any]) -> None:
    """A refusal raised before the Ollama front's handler runs (the key check) is still in
    Ollama's shape: the message alone under ``error``, which Ollama clients show."""
    k = await make_kstack()
    status, doc, _ = await k.post({"model": "sim-model", "messages": MSG}, "wrong-key",
                                  path="/api/chat")
    assert status == 401
    assert doc == {"error": "the API key is not valid"}
    status, doc, _ = await k.post({"model": "sim-model", "messages": MSG}, "wrong-key")
    assert status == 401 and doc["error"]["code"] == "invalid_api_key"  # OpenAI's elsewhere
    assert k.sim.stats.requests == 0


async def test_model_allow_list(make_kstack: Callable[..., Any]) -> None:
    k = await make_kstack()
    status, doc, _ = await k.post({"model": "big-model", "messages": MSG}, PLANNER_KEY)
    assert status == 403
    err = assert_openai_error(doc, "model_not_allowed")
    assert err["param"] == "model" and err["type"] == "permission_error"
    status, doc, _ = await k.post({"messages": MSG}, PLANNER_KEY)  # no model: not allowed
    assert status == 403
    assert k.sim.stats.requests == 0
    status, _, _ = await k.post({"model": "small-model", "messages": MSG}, PLANNER_KEY)
    assert status == 200
    status, _, _ = await k.post({"model": "anything", "messages": MSG}, CODER_KEY)
    assert status == 200  # no models list: any model


async def test_keyed_client_cannot_claim_another_agent(make_kstack: Callable[..., Any]) -> None:
    k = await make_kstack()
    body = {"model": "sim-model", "messages": MSG, "user": "coder"}
    status, doc, _ = await k.post(body, PLANNER_KEY, **{"X-Agent-Id": "coder"})
    assert status == 403
    assert_openai_error(doc, "agent_id_mismatch")
    assert k.sim.stats.requests == 0
    status, _, _ = await k.post(body, PLANNER_KEY, **{"X-Agent-Id": "planner"})
    assert status == 200
    status, _, _ = await k.post(body, PLANNER_KEY)  # "user": "coder" is not an identity either
    assert status == 200
    stats = k.app[SCHEDULER].agent_stats()
    assert stats["planner"].dispatched == 2
    assert "coder" not in stats
    assert k.app[SCHEDULER].policies.get("planner").weight == 3.0  # the key's weight


async def _until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < end, "condition not reached"
        await asyncio.sleep(0.01)


async def test_key_agent_reaches_the_queue(make_kstack: Callable[..., Any]) -> None:
    """The key's agent is the identity the fair queue sees while the request waits."""
    k = await make_kstack(slots=1, express_slot=False)
    k.sim.push({"content": "slow", "ttft": 1.0}, {"content": "next"})
    first = asyncio.ensure_future(k.post({"model": "m", "messages": MSG, "stream": True},
                                         CODER_KEY))
    sched = k.app[SCHEDULER]
    await _until(lambda: sched.in_flight == 1)
    second = asyncio.ensure_future(k.post({"model": "sim-model", "messages": MSG,
                                           "stream": True}, PLANNER_KEY))
    await _until(lambda: sched.queued == 1)
    stats = sched.agent_stats()
    assert stats["planner"].queued == 1 and stats["coder"].in_flight == 1
    assert (await first)[0] == 200 and (await second)[0] == 200


async def test_max_tokens_is_clamped_per_key(make_kstack: Callable[..., Any]) -> None:
    k = await make_kstack()
    for asked, sent in ((10_000, 64), (5, 5), (None, 64)):
        body: dict[str, Any] = {"model": "sim-model", "messages": MSG}
        if asked is not None:
            body["max_tokens"] = asked
        status, _, _ = await k.post(body, PLANNER_KEY)
        assert status == 200
        assert k.sim.stats.bodies[-1]["max_tokens"] == sent
    body = {"model": "sim-model", "messages": MSG, "max_completion_tokens": 9999}
    assert (await k.post(body, PLANNER_KEY))[0] == 200
    assert k.sim.stats.bodies[-1]["max_completion_tokens"] == 64
    body = {"model": "sim-model", "messages": MSG, "max_tokens": 3000}
    assert (await k.post(body, CODER_KEY))[0] == 200  # no cap on this key (under the context)
    assert k.sim.stats.bodies[-1]["max_tokens"] == 3000


def test_lookup_compares_every_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = auth.keys_from_dict({auth.hash_key(f"k{i}"): {"agent": f"a{i}"} for i in range(5)})
    calls: list[int] = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for token in ("k0", "k4", "nope"):
        calls.clear()
        ring.lookup(token)
        assert len(calls) == 5  # no early exit on a match or a miss
    key = ring.lookup("k3")
    assert key is not None and key.agent == "a3"


@pytest.mark.parametrize(("table", "needle"), [
    ({PLANNER_KEY: {"agent": "x"}}, "SHA-256 hex digest"),
    ({auth.hash_key("a"): {"agent": "x", "wieght": 2}}, "unknown key 'wieght'"),
    ({auth.hash_key("a"): {}}, "agent is required"),
    ({auth.hash_key("a"): {"agent": "x", "weight": 0}}, "weight"),
    ({auth.hash_key("a"): {"agent": "x", "models": "m"}}, "models"),
    ({auth.hash_key("a"): {"agent": "x", "max_tokens": -1}}, "max_tokens"),
])
def test_bad_keys_config_is_refused(table: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        auth.keys_from_dict(table)


async def test_sessions_endpoint_is_loopback_or_admin_key() -> None:
    from aiohttp.test_utils import make_mocked_request

    from toolmend.server.errors import ProxyError
    from toolmend.telemetry.tracing import Telemetry, sessions_handler

    def request(remote: str, **headers: str) -> web.Request:
        app = web.Application()
        app[TELEMETRY] = Telemetry(Settings(admin_key="adm1n"))

        class Transport:
            def get_extra_info(self, name: str, default: Any = None) -> Any:
                return (remote, 1234) if name == "peername" else default

            def is_closing(self) -> bool:
                return False

        return make_mocked_request("GET", "/toolmend/v1/sessions", headers=headers, app=app,
                                   transport=Transport())

    assert (await sessions_handler(request("127.0.0.1"))).status == 200
    for headers in ({}, {"Authorization": f"Bearer {PLANNER_KEY}"},
                    {"Authorization": "Bearer adm1"}):
        with pytest.raises(ProxyError) as e:
            await sessions_handler(request("192.168.7.7", **headers))
        assert e.value.status == 403
    assert (await sessions_handler(request("192.168.7.7",
                                           Authorization="Bearer adm1n"))).status == 200


def test_binds_loopback_by_default() -> None:
    assert Settings().host == "127.0.0.1"


# --- credentials and content never leave ------------------------------------------------------

async def test_upstream_credential_and_content_never_leak(
        make_kstack: Callable[..., Any], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    spans: list[bytes] = []

    async def traces(request: web.Request) -> web.Response:
        spans.append(await request.read())
        return web.Response(body=b"", content_type="application/x-protobuf")

    rapp = web.Application()
    rapp.router.add_post("/v1/traces", traces)
    rrunner = web.AppRunner(rapp)
    await rrunner.setup()
    site = web.TCPSite(rrunner, "127.0.0.1", 0)
    await site.start()
    otlp = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    caplog.set_level(logging.DEBUG)
    try:
        k = await make_kstack(api_key=UPSTREAM_KEY, otlp_endpoint=otlp, log_requests=True)
        k.sim.push({"content": "fine"}, {"content": "streamed"},
                   {"fault": {"kind": "status", "status": 401, "message": "bad credentials"}},
                   {"content": "a b c", "fault": {"kind": "reset", "after": 1}},
                   {"tool_calls": [{"name": "f", "arguments": "{broken"}]})
        body = {"model": "sim-model", "messages": [
            {"role": "system", "content": CONTENT_SECRET},
            {"role": "user", "content": CONTENT_SECRET}]}
        tools = [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"q": {"type": "string"}}}}}]
        out: list[bytes] = []
        for extra in ({}, {"stream": True}, {}, {"stream": True},
                      {"stream": True, "tools": tools}):
            _status, doc, headers = await k.post({**body, **extra}, CODER_KEY)
            out.append(doc if isinstance(doc, bytes) else orjson.dumps(doc))
            out.append(orjson.dumps(headers))
        async with aiohttp.ClientSession() as s:
            for path in ("/readyz", "/metrics", "/toolmend/v1/sessions"):
                async with s.get(k.url + path) as r:
                    out.append(await r.read())
        assert await k.app[TELEMETRY].flush(5.0)
        # the upstream got the upstream key, never the client's key
        assert all(h.get("Authorization") == f"Bearer {UPSTREAM_KEY}" for h in k.sim.headers)
        assert not any(CODER_KEY in orjson.dumps(h).decode() for h in k.sim.headers)
    finally:
        await rrunner.cleanup()
    logs = "\n".join(f"{r.name} {r.getMessage()} {r.args!r}" for r in caplog.records)
    assert "toolmend.access" in logs  # request logging was on
    assert spans  # and spans were exported
    for blob in (*out, logs.encode(), *spans):
        assert UPSTREAM_KEY.encode() not in blob
        assert CODER_KEY.encode() not in blob
    for blob in (logs.encode(), *spans):  # content is neither logged nor traced by default
        assert CONTENT_SECRET.encode() not in blob


# --- limits -----------------------------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "t", "parameters": {"type": "object"}}}


def _tool(name: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": params}}


def _nested(depth: int) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        s = {"type": "object", "properties": {"x": s}}
    return s


def _deep_list(depth: int) -> list[Any]:
    v: list[Any] = []
    for _ in range(depth):
        v = [v]
    return v


@pytest.mark.parametrize(("body", "code", "needle"), [
    ({"messages": MSG * 11}, "too_many_messages", "max_messages"),
    ({"messages": MSG, "tools": [_tool(f"t{i}", {}) for i in range(6)]}, "too_many_tools",
     "max_tools"),
    ({"messages": MSG, "tools": [_tool("big", {"type": "object", "description": "x" * 5000})]},
     "invalid_tool_schema", "limit"),
    ({"messages": MSG, "tools": [_tool("deep", _nested(12))]}, "invalid_tool_schema", "deep"),
    ({"messages": MSG, "tools": [_tool("redos", {"type": "object", "properties": {
        "q": {"type": "string", "pattern": "^(?=(a+)+$)\\1b"}}})]}, "invalid_tool_schema",
     "RE2"),
    ({"messages": MSG, "tools": [_tool("long", {"type": "object", "properties": {
        "q": {"type": "string", "pattern": "a" * 300}}})]}, "invalid_tool_schema",
     "longer than the limit"),
    ({"messages": MSG, "x": _deep_list(80)}, "nesting_too_deep", "64 levels"),
])
async def test_limits_refuse_with_openai_shaped_400(
        make_stack: StackFactory, body: dict[str, Any], code: str, needle: str) -> None:
    stack: Stack = await make_stack(max_messages=10, max_tools=5, max_schema_bytes=2048,
                                    max_schema_depth=16, max_pattern_bytes=256)
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.v1 + "/chat/completions", json=body) as r:
            assert r.status == 400
            err = assert_openai_error(await r.json(), code)
            assert needle in err["message"], err
    assert stack.sim.stats.requests == 0


async def test_oversized_header_is_an_openai_shaped_400(make_stack: StackFactory) -> None:
    stack = await make_stack(max_header_bytes=1024)
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.v1 + "/chat/completions", json={"messages": MSG},
                          headers={"X-Agent-Id": "a" * 2000}) as r:
            assert r.status == 400
            assert r.headers["Content-Type"].startswith("application/json")
            assert_openai_error(await r.json(), "headers_too_large")
        async with s.post(stack.v1 + "/chat/completions", json={"messages": MSG},
                          headers={"X-Agent-Id": "a" * 900}) as r:
            assert r.status == 200  # under the limit: served
    assert stack.sim.stats.requests == 1


async def test_requests_cannot_choose_the_upstream(make_stack: StackFactory) -> None:
    """Neither the model name nor any header sends the request anywhere but the configured
    upstream: a canary server that would receive a redirected request sees nothing."""
    canary = SimBackend("vllm")
    await canary.start()
    try:
        stack = await make_stack()
        hostile_models = ["http://169.254.169.254/latest/meta-data/", canary.url,
                          canary.url + "/v1/chat/completions", "//" + canary.url[7:],
                          "../../../etc/passwd", "sim-model@" + canary.url[7:]]
        headers = {"X-Forwarded-Host": canary.url[7:], "X-Upstream": canary.url,
                   "X-Original-URL": canary.url, "X-Rewrite-URL": canary.url,
                   "Forwarded": f"host={canary.url[7:]}", "X-Toolmend-Upstream": canary.url}
        async with aiohttp.ClientSession() as s:
            for model in hostile_models:
                async with s.post(stack.v1 + "/chat/completions", headers=headers,
                                  json={"model": model, "messages": MSG}) as r:
                    assert r.status == 200
        assert stack.sim.stats.requests == len(hostile_models)
        assert canary.stats.requests == 0
    finally:
        await canary.stop()


async def test_credentials_in_upstream_url_never_shown(make_stack) -> None:  # type: ignore[no-untyped-def]
    """``http://user:secret@host`` authenticates to the upstream but is never displayed."""
    import aiohttp as _aiohttp

    from toolmend.server.app import build_app, start_server
    from toolmend.server.config import Settings
    from toolmend.sim.server import SimBackend

    sim = SimBackend("vllm")
    await sim.start()
    host = sim.url.removeprefix("http://")
    app = build_app(Settings(log_requests=False), [f"http://agent:s3cr3t@{host}"])
    runner, port = await start_server(app, "127.0.0.1", 0)
    try:
        async with _aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/readyz") as r:
                ready = await r.text()
            async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                              json={"messages": [{"role": "user", "content": "hi"}]}) as r:
                reply = await r.text()
        await sim.stop()
        async with _aiohttp.ClientSession() as s:  # now unreachable: the error names the URL
            async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                              json={"messages": [{"role": "user", "content": "hi"}]}) as r:
                error = await r.text()
        for text in (ready, reply, error):
            assert "s3cr3t" not in text and "agent:" not in text
        assert host in error
        # the upstream did get them
        assert any(a and a.startswith("Basic ") for a in sim.stats.authorizations)
    finally:
        await runner.cleanup()
        await sim.stop()
