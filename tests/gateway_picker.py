"""A stand-in for an inference gateway and its endpoint picker: test and benchmark scaffolding.

Not a product feature, and far less than the real one (Envoy with the Gateway API Inference
Extension's endpoint picker): enough to check that toolmend sidecars speak the picker's side of
the model-server protocol. For every request it scrapes each endpoint's ``/metrics`` afresh,
reads the gauges the real picker reads by default (``vllm:num_requests_waiting``,
``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``), sends the request to the endpoint
with the least waiting (then the fewest running, then the emptiest KV cache; ties in turn), and
relays the answer as it streams. It logs each decision with what it saw, and the fairness id and
objective each request arrived with.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

WAITING, RUNNING, KV = ("vllm:num_requests_waiting", "vllm:num_requests_running",
                        "vllm:kv_cache_usage_perc")
FAIRNESS, OBJECTIVE = "x-gateway-inference-fairness-id", "x-gateway-inference-objective"
#: request headers passed on to the endpoint (the rest are hop-by-hop or the client's own)
PASSED = ("Content-Type", "Accept", FAIRNESS, OBJECTIVE, "traceparent", "tracestate")


@dataclass(frozen=True, slots=True)
class Load:
    waiting: float
    running: float
    kv: float | None


@dataclass(frozen=True, slots=True)
class Decision:
    loads: tuple[Load, ...]  # as scraped for this request, one per endpoint
    chosen: int
    fairness_id: str | None
    objective: str | None
    body: bytes


def parse_load(text: str) -> Load:
    # only the three gauges' lines reach the parser: a sidecar's /metrics also holds its
    # latency histograms, and the picker reads every endpoint for every request
    lines = "\n".join(line for line in text.splitlines() if line.startswith("vllm:"))
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(lines + "\n"):
        if family.name in (WAITING, RUNNING, KV) and family.samples:
            values[family.name] = sum(s.value for s in family.samples)
    return Load(values[WAITING], values[RUNNING], values.get(KV))


@dataclass
class StandInPicker:
    endpoints: list[str]
    decisions: list[Decision] = field(default_factory=list)
    outstanding: int = 0  # requests forwarded whose answer has not ended
    _turn: itertools.count[int] = field(default_factory=itertools.count)
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None
    url: str = ""

    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("POST", "/{tail:.*}", self._forward)
        app.router.add_route("GET", "/{tail:.*}", self._forward)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def scrape(self) -> tuple[Load, ...]:
        assert self._session is not None

        async def one(base: str) -> Load:
            async with self._session.get(base + "/metrics") as r:  # type: ignore[union-attr]
                assert r.status == 200, f"{base}/metrics answered {r.status}"
                return parse_load(await r.text())

        return tuple(await asyncio.gather(*(one(e) for e in self.endpoints)))

    def choose(self, loads: tuple[Load, ...]) -> int:
        def key(i: int) -> tuple[float, float, float]:
            x = loads[i]
            return (x.waiting, x.running, x.kv if x.kv is not None else 0.0)

        best = min(key(i) for i in range(len(loads)))
        tied = [i for i in range(len(loads)) if key(i) == best]
        return tied[next(self._turn) % len(tied)]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        loads = await self.scrape()
        chosen = self.choose(loads)
        self.decisions.append(Decision(loads, chosen, request.headers.get(FAIRNESS),
                                       request.headers.get(OBJECTIVE), body))
        headers = {k: v for k in PASSED if (v := request.headers.get(k)) is not None}
        self.outstanding += 1
        try:
            async with self._session.request(request.method,
                                             self.endpoints[chosen] + request.path_qs,
                                             data=body or None, headers=headers) as up:
                resp = web.StreamResponse(status=up.status)
                for k in ("Content-Type", "Retry-After"):
                    if k in up.headers:
                        resp.headers[k] = up.headers[k]
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        finally:
            self.outstanding -= 1
