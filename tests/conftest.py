"""Shared fixtures: a simulated backend and toolmend in front of it, both real HTTP servers."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from toolmend.server.app import build_app, start_server
from toolmend.server.config import Settings
from toolmend.sim.server import SimBackend


@dataclasses.dataclass
class Stack:
    sim: SimBackend
    url: str  # toolmend base URL, e.g. http://127.0.0.1:PORT
    settings: Settings
    app: web.Application | None = None  # toolmend's app, for tests that wait on its state

    @property
    def v1(self) -> str:
        return self.url + "/v1"


StackFactory = Callable[..., Any]


@pytest.fixture
async def make_stack() -> AsyncIterator[StackFactory]:
    """Start a sim and a toolmend in front of it; everything is torn down after the test."""
    cleanups: list[Any] = []

    async def factory(dialect: str = "vllm", *, sim_kwargs: dict[str, Any] | None = None,
                      **settings_kwargs: Any) -> Stack:
        sim = SimBackend(dialect, **(sim_kwargs or {}))
        await sim.start()
        cleanups.append(sim.stop)
        settings = Settings(**{"log_requests": False, **settings_kwargs})
        app = build_app(settings, [sim.url])
        runner, port = await start_server(app, "127.0.0.1", 0)
        cleanups.append(runner.cleanup)
        return Stack(sim, f"http://127.0.0.1:{port}", settings, app)

    yield factory
    for fn in reversed(cleanups):
        await fn()


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack()
