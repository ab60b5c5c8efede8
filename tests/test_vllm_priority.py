"""Request priorities for vLLM: the start-up probe, the setting it settles, the values sent."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from toolmend.backends.vllm_priority import (
    REFUSAL,
    doctor_note,
    probe,
    settle,
    upstream_priority,
)
from toolmend.scheduling.fair_queue import Cost, FairQueue
from toolmend.server.app import build_app, start_server
from toolmend.server.config import Settings
from toolmend.server.keys import SETTINGS
from toolmend.sim.server import SimBackend

from .queue_sim import Clock

# what vLLM answers a non-zero priority without --scheduling-policy priority (the versions
# that check it; the V1 engine accepts the field and ignores it)
REFUSED = {"object": "error", "message": f"{REFUSAL}.", "type": "BadRequestError",
           "param": None, "code": 400}


class PickySim(SimBackend):
    """The simulator as a vLLM that refuses request priorities, like one started without
    ``--scheduling-policy priority`` on a version that checks."""

    refused = 0

    def app(self) -> web.Application:
        app = super().app()

        @web.middleware
        async def refuse(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.method == "POST" and (await request.json()).get("priority", 0) != 0:
                self.refused += 1
                return web.json_response(REFUSED, status=400)
            return await handler(request)

        app.middlewares.append(refuse)
        return app


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    """A fake upstream answering ``POST /v1/completions`` with a given status and body."""
    runners: list[web.AppRunner] = []

    async def factory(status: int, body: dict[str, Any]) -> str:
        async def handle(request: web.Request) -> web.Response:
            return web.json_response(body, status=status)

        app = web.Application()
        app.router.add_post("/v1/completions", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    yield factory
    for r in runners:
        await r.cleanup()


async def test_probe_reads_accepted_refused_and_unknown(serve: Callable[..., Any]) -> None:
    ok = await serve(200, {"choices": [{"text": "0"}]})
    refused = await serve(400, REFUSED)
    other = await serve(400, {"object": "error", "message": "model not found"})
    broken = await serve(500, {})
    async with aiohttp.ClientSession() as s:
        assert await probe(s, ok, "m") is True
        assert await probe(s, refused, "m") is False
        assert await probe(s, other, "m") is None
        assert await probe(s, broken, "m") is None
        assert await probe(s, "http://127.0.0.1:9", "m") is None  # nothing listens


def test_settle_never_sends_what_vllm_refuses() -> None:
    s = Settings(vllm_priority=True)
    assert "is ignored" in settle(s, False) and s.vllm_priority is False
    s = Settings(vllm_priority=True)
    assert settle(s, True).startswith("vLLM accepts") and s.vllm_priority is True
    s = Settings(vllm_priority=True)
    assert settle(s, None).endswith("sending them (--vllm-priority)") and s.vllm_priority


def test_doctor_notes() -> None:
    assert "--scheduling-policy priority" in (doctor_note(False) or "")
    assert "start toolmend with --vllm-priority" in (doctor_note(True) or "")
    assert doctor_note(None) is None


def test_upstream_priority_keeps_classes_strict_and_loop_steps_first() -> None:
    assert [upstream_priority(c, loop) for c in (1, 0, -1) for loop in (True, False)] == \
        [-3, -2, -1, 0, 1, 2]


def test_loop_step_is_decided_as_submit_would_without_changing_anything() -> None:
    q = FairQueue(1, clock=Clock())
    assert q.loop_step("a", "s", Cost(100, 10))  # a first step with a short prompt
    assert not q.loop_step("a", "s", Cost(5000, 10))  # its whole prompt is new
    assert not q.loop_step("a", "s", Cost(100, None))  # no max_tokens: could run for long
    q.release(q.submit("a", Cost(5000, 10), session="s"))
    assert q.loop_step("a", "s", Cost(5100, 10))  # grew by 100 since its last step
    assert q.counter("a") == 5000  # nothing was charged by asking
    q.submit("a", Cost(5100, 10), session="s")
    assert not q.loop_step("a", "s", Cost(5100, 10))  # with one outstanding: a burst


@pytest.mark.parametrize(("sim_class", "option", "sent", "probes"), [
    (SimBackend, True, True, 1), (PickySim, True, False, 1), (SimBackend, False, False, 0)])
async def test_toolmend_sends_priorities_only_to_a_vllm_that_takes_them(
        sim_class: type[SimBackend], option: bool, sent: bool, probes: int) -> None:
    sim = sim_class("vllm")
    await sim.start()
    app = build_app(Settings(log_requests=False, vllm_priority=option), [sim.url])
    runner, port = await start_server(app, "127.0.0.1", 0)
    try:
        assert app[SETTINGS].vllm_priority is sent
        # one token, asked only with the option on (a refused probe never reaches generation)
        assert sim.stats.requests + getattr(sim, "refused", 0) == probes
        async with aiohttp.ClientSession() as s, s.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "sim-model", "max_tokens": 4,
                      "messages": [{"role": "user", "content": "hi"}]},
                headers={"X-Agent-Id": "a"}) as r:
            assert r.status == 200, await r.text()
        body = sim.stats.bodies[-1]
        if sent:
            assert body["priority"] == -1  # class 0, a loop step: ahead of class 0's long ones
        else:
            assert "priority" not in body
    finally:
        await runner.cleanup()
        await sim.stop()


def test_launching_vllm_turns_priorities_on() -> None:
    from toolmend.backends.doctor import Hardware
    from toolmend.backends.launcher import apply_plan, plan_launch

    hw = Hardware("Linux", "x86_64", 8, 64 * 1024)
    settings = Settings()
    apply_plan(settings, plan_launch("vllm", port=8123, hw=hw, model="Qwen/Qwen3-4B"))
    assert settings.vllm_priority is True
    settings = Settings()  # the user's own policy wins, and then toolmend sends none
    apply_plan(settings, plan_launch("vllm", port=8123, hw=hw, model="Qwen/Qwen3-4B",
                                     extra_args=["--scheduling-policy", "fcfs"]))
    assert settings.vllm_priority is False
