"""Auto-detection of the server behind a URL, against real HTTP servers.

Every simulated dialect is started with :class:`SimBackend`; SGLang and TGI, which the simulator
does not imitate, get a two-route stand-in with their discovery answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from toolmend.backends.detect import Probe, classify, describe, detect
from toolmend.server.app import build_app, start_server
from toolmend.server.config import Settings
from toolmend.sim.server import SimBackend

Starter = Callable[..., Any]


@pytest.fixture
async def start() -> AsyncIterator[Starter]:
    cleanups: list[Any] = []

    async def sim(dialect: str, **kw: Any) -> SimBackend:
        s = SimBackend(dialect, **kw)
        await s.start()
        cleanups.append(s.stop)
        return s

    yield sim
    for fn in reversed(cleanups):
        await fn()


@pytest.fixture
async def serve_app() -> AsyncIterator[Starter]:
    runners: list[web.AppRunner] = []

    async def factory(routes: dict[str, Any]) -> str:
        app = web.Application()
        for path, doc in routes.items():
            async def handler(request: web.Request, doc: Any = doc) -> web.Response:
                return web.json_response(doc)
            app.router.add_get(path, handler)
        runner, port = await start_server(app, "127.0.0.1", 0)
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield factory
    for r in runners:
        await r.cleanup()


@pytest.mark.parametrize(("dialect", "kind", "slots"), [
    ("vllm", "vllm", None),
    ("llamacpp", "llamacpp", 3),
    ("ollama", "ollama", None),
    ("llama-cpp-python", "llama-cpp-python", 1),
    ("openai", "openai", None),
])
async def test_each_simulated_dialect_is_recognised(start: Starter, dialect: str, kind: str,
                                                    slots: int | None) -> None:
    sim = await start(dialect, model="m-" + dialect, slots=3)
    d = await detect(sim.url)
    assert d.kind == kind
    assert d.model == "m-" + dialect
    assert d.slots == slots
    assert not d.loading


async def test_llama_server_details_come_from_props(start: Starter) -> None:
    sim = await start("llamacpp", slots=2)
    d = await detect(sim.url + "/v1")  # the OpenAI base URL works too
    assert (d.kind, d.slots) == ("llamacpp", 2)
    assert d.details["n_ctx"] == 2048
    assert d.details["supports_tools"] is True


async def test_vllm_version_reported(start: Starter) -> None:
    d = await detect((await start("vllm")).url)
    assert d.details["version"] == "0.32.0"
    assert d.details["max_model_len"] == 4096


async def test_sglang_and_tgi(serve_app: Starter) -> None:
    sglang = await serve_app({"/get_model_info": {"model_path": "Qwen/Qwen3-8B",
                                                  "is_generation": True},
                              "/v1/models": {"data": [{"id": "Qwen/Qwen3-8B",
                                                       "owned_by": "sglang"}]}})
    tgi = await serve_app({"/info": {"model_id": "Qwen/Qwen3-8B", "version": "3.3.4",
                                     "max_concurrent_requests": 128}})
    d = await detect(sglang)
    assert (d.kind, d.model) == ("sglang", "Qwen/Qwen3-8B")
    d = await detect(tgi)
    assert (d.kind, d.model, d.slots) == ("tgi", "Qwen/Qwen3-8B", 128)
    assert d.details["version"] == "3.3.4"


async def test_embedded_backend_signature(serve_app: Starter) -> None:
    url = await serve_app({"/v1/models": {"data": [{"id": "gemma", "owned_by": "toolmend"}]}})
    d = await detect(url)
    assert (d.kind, d.model, d.slots) == ("embedded", "gemma", 1)


async def test_override_wins_but_keeps_what_was_seen(start: Starter) -> None:
    sim = await start("vllm")
    d = await detect(sim.url, "openai")
    assert d.kind == "openai"
    assert d.details["detected"] == "vllm"
    assert "forced by --backend" in describe(sim.url, d)


async def test_nothing_listening() -> None:
    d = await detect("http://127.0.0.1:9", timeout=1.0)
    assert d.kind == "unknown"
    assert d.details["reason"] == "no answer on any discovery endpoint"


async def test_loading_backend_is_reported(start: Starter) -> None:
    sim = await start("llamacpp", loading=True)
    d = await detect(sim.url)
    assert d.kind == "llamacpp"
    assert d.loading
    assert "still loading" in describe(sim.url, d)


def test_classify_is_pure() -> None:
    probes = {p: Probe() for p in ("/", "/api/version", "/props", "/version", "/get_model_info",
                                   "/info", "/v1/models", "/health")}
    probes["/"] = Probe(200, None, "Ollama is running")
    assert classify(probes).kind == "ollama"
    probes["/"] = Probe(404, None, "")
    probes["/v1/models"] = Probe(200, {"data": [{"id": "x", "owned_by": "me"}]}, "")
    assert classify(probes).kind == "llama-cpp-python"
    probes["/v1/models"] = Probe(200, {"data": "nonsense"}, "")
    d = classify(probes)
    assert d.kind == "unknown" and "matches no known server" in d.details["reason"]


# through toolmend ------------------------------------------------------------------------------

async def _toolmend(upstream: str, **kw: Any) -> tuple[web.AppRunner, str]:
    app = build_app(Settings(log_requests=False, **kw), [upstream])
    runner, port = await start_server(app, "127.0.0.1", 0)
    return runner, f"http://127.0.0.1:{port}"


async def test_readyz_reports_the_backend(start: Starter) -> None:
    sim = await start("llamacpp", slots=4, model="qwen")
    runner, url = await _toolmend(sim.url)
    try:
        async with aiohttp.ClientSession() as s, s.get(url + "/readyz") as r:
            doc = await r.json()
        assert r.status == 200 and doc["ready"] is True
        assert doc["backend"]["kind"] == "llamacpp"
        assert doc["backend"]["slots"] == 4
        assert doc["backend"]["model"] == "qwen"
    finally:
        await runner.cleanup()


async def test_readyz_while_loading_then_ready(start: Starter) -> None:
    sim = await start("llamacpp", loading=True)
    runner, url = await _toolmend(sim.url)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/readyz") as r:
                doc = await r.json()
            assert r.status == 503 and doc["backend"]["details"]["loading"] is True
            sim.loading = False
            async with s.get(url + "/readyz") as r:  # a loading verdict is not cached
                doc = await r.json()
            assert r.status == 200 and doc["backend"]["details"].get("loading") is None
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("stream", [False, True])
async def test_requests_wait_for_a_loading_backend(start: Starter, stream: bool) -> None:
    sim = await start("llamacpp", loading=True)
    runner, url = await _toolmend(sim.url)
    loop = asyncio.get_running_loop()
    loop.call_later(0.6, setattr, sim, "loading", False)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "stream": stream}
    try:
        t0 = loop.time()
        async with aiohttp.ClientSession() as s, \
                s.post(url + "/v1/chat/completions", json=body) as r:
            raw = await r.read()
        assert r.status == 200, raw
        assert loop.time() - t0 >= 0.5
        assert sim.stats.requests >= 2  # refused while loading, then served
        assert (b"[DONE]" in raw) if stream else (b'"choices"' in raw)
    finally:
        await runner.cleanup()


async def test_loading_wait_gives_up_after_loading_timeout(start: Starter) -> None:
    sim = await start("llamacpp", loading=True)
    runner, url = await _toolmend(sim.url, loading_timeout=0.5)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with aiohttp.ClientSession() as s, \
                s.post(url + "/v1/chat/completions", json=body) as r:
            doc = await r.json()
        assert r.status == 503
        assert "Loading model" in doc["error"]["message"]
    finally:
        await runner.cleanup()
