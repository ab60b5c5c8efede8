"""Behind an inference gateway: one toolmend sidecar against three, on the same total load.

Each sidecar is a ``toolmend serve`` process in front of its own ``toolmend sim`` (2 slots,
100 ms to the first token, 20 ms a token), as in a model-server pod. In front of them stands the
test suite's stand-in for the gateway's endpoint picker (``tests/gateway_picker.py``), which
scrapes every sidecar's ``/metrics`` for each request and sends it to the one reporting the
least waiting. Three agents send through it with their fairness id, as a client-side toolmend
with ``--gateway-upstream`` would: a planner running a sequential tool loop (short replies), a
coder keeping 4 requests outstanding and a batch job keeping 8 (longer replies). Every agent
sends the same number of requests in both runs.

Reported, per run: the TTFT p50/p99 of each agent as it saw it, and, sampled every 100 ms, the
queue depth the picker sees (the sum of the sidecars' ``vllm:num_requests_waiting``) against
what is really waiting (requests the picker has forwarded that no backend has started) and the
backends' own queues (which toolmend keeps empty: it never sends a backend more than its
slots).

Run: ``python bench/gateway.py`` (about 2 minutes). Prints a markdown table and replaces the
``## Inference gateway: 1 vs 3 sidecars`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from _common import FIRST_CONTENT, Proc, free_port, replace_section

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.gateway_picker import FAIRNESS, OBJECTIVE, StandInPicker  # noqa: E402

TOOLMEND = [str(Path(sys.executable).with_name("toolmend"))]
SLOTS = 2
#: agent -> (requests outstanding at once, requests in all, output tokens per reply)
AGENTS = {"planner": (1, 16, 8), "coder": (4, 40, 24), "batch": (8, 48, 48)}
TTFT, TOKEN_DELAY = 0.1, 0.02  # a backend slow next to the proxies, as real ones are
SAMPLE_EVERY = 0.1


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


@dataclass
class Run:
    sidecars: int
    ttft: dict[str, list[float]] = field(default_factory=dict)
    seen: list[float] = field(default_factory=list)  # the picker's view: sum of waiting
    waiting: list[float] = field(default_factory=list)  # really waiting somewhere
    backend_queue: list[float] = field(default_factory=list)  # in the backends' own queues
    routed: Counter[int] = field(default_factory=Counter)
    seconds: float = 0.0
    errors: int = 0


async def agent(session: aiohttp.ClientSession, url: str, name: str, run: Run) -> None:
    outstanding, total, tokens = AGENTS[name]
    left = iter(range(total))
    ttfts = run.ttft.setdefault(name, [])

    async def worker() -> None:
        for i in left:
            body = {"model": "sim-model", "stream": True, "max_tokens": tokens,
                    "messages": [{"role": "user", "content": f"{name} step {i}"}]}
            t0 = time.perf_counter()
            first = None
            async with session.post(url + "/v1/chat/completions", json=body,
                                    headers={FAIRNESS: name, OBJECTIVE: "priority-0"}) as r:
                if r.status != 200:
                    run.errors += 1
                    await r.read()
                    continue
                async for chunk in r.content.iter_any():
                    if first is None and FIRST_CONTENT.search(chunk):
                        first = time.perf_counter() - t0
            if first is None:
                run.errors += 1
            else:
                ttfts.append(first * 1000)

    await asyncio.gather(*(worker() for _ in range(outstanding)))


async def sample(session: aiohttp.ClientSession, picker: StandInPicker, sims: list[str],
                 run: Run) -> None:
    async def stats(url: str) -> dict[str, int]:
        async with session.get(url + "/sim/stats") as r:
            return await r.json()

    while True:
        loads, backends = await asyncio.gather(picker.scrape(),
                                               asyncio.gather(*(stats(u) for u in sims)))
        run.seen.append(sum(x.waiting for x in loads))
        running = sum(b["in_flight"] for b in backends)
        run.waiting.append(max(0, picker.outstanding - running))
        run.backend_queue.append(sum(b["queued"] for b in backends))
        await asyncio.sleep(SAMPLE_EVERY)


async def one_run(n: int, log_dir: Path) -> Run:
    run = Run(n)
    procs: list[Proc] = []
    try:
        sims = [Proc(f"sim-{n}-{i}", [*TOOLMEND, "sim", "--port", str(free_port()), "--slots",
                                      str(SLOTS), "--ttft", str(TTFT), "--token-delay",
                                      str(TOKEN_DELAY)],
                     log_dir, start_timeout=60) for i in range(n)]
        procs += sims
        sidecars = [Proc(f"sidecar-{n}-{i}", [
            *TOOLMEND, "serve", "--port", str(free_port()), "--upstream", sim.url,
            "--backend", "vllm", "--slots", str(SLOTS), "--no-express-slot",
            "--trusted-gateways", "127.0.0.1", "--backend-load-interval", "0.05",
            "--no-log-requests"], log_dir, start_timeout=60) for i, sim in enumerate(sims)]
        procs += sidecars
        picker = StandInPicker([s.url.removesuffix("/v1") for s in sidecars])
        await picker.start()
        try:
            async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0)) as session:
                sampler = asyncio.ensure_future(
                    sample(session, picker, [s.url for s in sims], run))
                t0 = time.perf_counter()
                await asyncio.gather(*(agent(session, picker.url, a, run) for a in AGENTS))
                run.seconds = time.perf_counter() - t0
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            run.routed = Counter(d.chosen for d in picker.decisions if d.body)
        finally:
            await picker.stop()
    finally:
        for p in reversed(procs):
            p.stop()
    return run


def table(runs: list[Run]) -> str:
    lines = ["| sidecars (slots) | agent | requests | TTFT p50 ms | TTFT p99 ms |",
             "|---|---|---:|---:|---:|"]
    for run in runs:
        for name in AGENTS:
            xs = run.ttft[name]
            lines.append(f"| {run.sidecars} ({run.sidecars * SLOTS}) | {name} | {len(xs)} | "
                         f"{pct(xs, 50):,.0f} | {pct(xs, 99):,.0f} |")
    lines += ["", "| sidecars | wall s | picker saw waiting (mean / max) | really waiting "
              "(mean / max) | in the backends' own queues (max) | routed to each sidecar |",
              "|---|---:|---:|---:|---:|---|"]
    for run in runs:
        routed = " / ".join(str(run.routed[i]) for i in range(run.sidecars))
        lines.append(f"| {run.sidecars} | {run.seconds:.1f} | "
                     f"{statistics.fmean(run.seen):.1f} / {max(run.seen):.0f} | "
                     f"{statistics.fmean(run.waiting):.1f} / {max(run.waiting):.0f} | "
                     f"{max(run.backend_queue):.0f} | {routed} |")
    return "\n".join(lines)


async def main() -> int:
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        runs = [await one_run(n, Path(tmp)) for n in (1, 3)]
    errors = sum(r.errors for r in runs)
    out = table(runs)
    print(out)
    mix = ", ".join(f"{a} {o} outstanding × {t} requests of {k} tokens"
                    for a, (o, t, k) in AGENTS.items())
    one, three = runs
    ratio = {a: pct(one.ttft[a], 50) / pct(three.ttft[a], 50) for a in AGENTS}
    section = (
        "## Inference gateway: 1 vs 3 sidecars\n\n"
        "`python bench/gateway.py`. Each sidecar is a `toolmend serve` process in front of its "
        f"own `toolmend sim` ({SLOTS} slots, {TTFT * 1000:.0f} ms to the first token, "
        f"{TOKEN_DELAY * 1000:.0f} ms a token); the "
        "test suite's stand-in endpoint picker (`tests/gateway_picker.py`) scrapes every "
        "sidecar's `/metrics` for each request and sends it to the one with the least "
        f"`vllm:num_requests_waiting`. Same load in both runs: {mix}. TTFT as each agent saw "
        f"it; queue depths sampled every {SAMPLE_EVERY * 1000:.0f} ms. Errors: {errors}. "
        f"Everything shares this machine's 2 cores (load average {load:.1f} at the start), "
        "so 3 sidecars gain less than their 3× slots would on 3 machines.\n\n"
        f"{out}\n\n"
        "The picker's view tracks what is really waiting because each sidecar reports its own "
        "queue: the backends' own queues stay empty, so a picker reading only the backends "
        "would see no queue at all. TTFT p50, 1 sidecar over 3: "
        + ", ".join(f"{a} {r:.1f}×" for a, r in ratio.items()) + ".\n")
    replace_section(section)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
