"""Fair queuing benchmark: a tool-loop agent next to a heavy agent, FIFO backend vs toolmend.

``toolmend sim`` plays a FIFO backend with 1 and with 4 slots (its slots are a FIFO semaphore,
like Ollama's or llama-server's queue). A heavy agent keeps 20 long requests outstanding (a
1,000-token prompt and 190 output tokens, about 1 s each); a light agent runs a sequential tool
loop of short steps (12 output tokens, a bounded context, 50 ms of "tool" between steps).
Each scenario runs straight against the sim (FIFO) and through toolmend in front of it, both as
separate processes, so neither shares an event loop with the load generator.

Reported: the light agent's TTFT p50/p99, the heavy agent's output throughput, and Jain's
fairness index of service relative to entitlement. Service is counted the way the scheduler
counts it (prompt tokens + 2 × output tokens, in the measurement window). Entitlement is the
max-min fair share of the service actually delivered: the light agent is entitled to what it
would consume on an idle backend (it cannot use more), capped at half, and the heavy agent to
the rest. A second scenario has two equal-weight agents, both always backlogged, one keeping
12 requests outstanding and the other 4; their entitlement is half each.

Run: ``python bench/fairness.py`` (about 100 s). Prints a markdown table and replaces the
``## Fair queuing`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from _common import free_port, replace_section

ROOT = Path(__file__).resolve().parent.parent
TOOLMEND = [str(Path(sys.executable).with_name("toolmend"))]

TTFT = 0.02
TOKEN_DELAY = 0.004
PREFILL_PER_TOKEN = 0.00025
HEAVY_PROMPT = "lorem ipsum dolor sit amet " * 148  # ~4,000 chars: ~1,000 prompt tokens
HEAVY_TOKENS = 190
HEAVY_OUTSTANDING = 20
LIGHT_TOKENS = 12
LIGHT_PAUSE = 0.05
LIGHT_STEP_GROWTH = "tool result: ok " * 8  # ~128 chars: the last tool round in the context
WARMUP = 1.0


def _prompt_tokens(messages: list[dict[str, str]]) -> int:
    return max(1, sum(len(m["content"]) for m in messages) // 4)  # the sim's own estimate


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def jain(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs or not any(xs):
        return math.nan
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


@dataclass
class Meter:
    """Service and output tokens per agent inside the measurement window."""

    start: float = 0.0
    end: float = math.inf
    service: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def add(self, agent: str, now: float, service: float, tokens: int = 0) -> None:
        if self.start <= now < self.end:
            self.service[agent] = self.service.get(agent, 0.0) + service
            self.tokens[agent] = self.tokens.get(agent, 0) + tokens


async def stream_request(session: aiohttp.ClientSession, url: str, agent: str,
                         messages: list[dict[str, str]], max_tokens: int, meter: Meter,
                         on_first: list[float] | None = None) -> float | None:
    """One streamed chat request; returns seconds to the first content token."""
    t0 = time.perf_counter()
    ttft = None
    prompt = _prompt_tokens(messages)
    body = {"model": "sim-model", "messages": messages, "max_tokens": max_tokens,
            "stream": True}
    async with session.post(url + "/v1/chat/completions", json=body,
                            headers={"X-Agent-Id": agent}) as r:
        if r.status != 200:
            raise RuntimeError(f"{agent}: HTTP {r.status}: {(await r.read())[:200]!r}")
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            if b'"content":"' in line and b'"content":""' not in line:
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - t0
                    meter.add(agent, now, prompt)
                    if on_first is not None:
                        on_first.append(now)
                meter.add(agent, now, 2.0, 1)
    return ttft


async def heavy_agent(session: aiohttp.ClientSession, url: str, agent: str, outstanding: int,
                      meter: Meter, stop: asyncio.Event,
                      firsts: list[float] | None = None) -> None:
    messages = [{"role": "user", "content": HEAVY_PROMPT}]

    async def worker() -> None:
        while not stop.is_set():
            await stream_request(session, url, agent, messages, HEAVY_TOKENS, meter, firsts)

    await asyncio.gather(*(worker() for _ in range(outstanding)))


async def light_agent(session: aiohttp.ClientSession, url: str, agent: str, meter: Meter,
                      stop: asyncio.Event, ttfts: list[float], censored: list[float],
                      max_steps: int | None = None,
                      waits: list[tuple[float, float]] | None = None) -> None:
    messages = [{"role": "system", "content": "You are a coding agent with tools. " * 6},
                {"role": "user", "content": "Fix the failing test."}]
    base = len(messages)
    steps = 0
    while not stop.is_set() and (max_steps is None or steps < max_steps):
        t0 = time.perf_counter()
        task = asyncio.ensure_future(stream_request(session, url, agent, messages,
                                                    LIGHT_TOKENS, meter))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await task
            # the step never got its first token: its TTFT is at least this long
            now = time.perf_counter()
            censored.append(now - t0)
            if waits is not None:
                waits.append((t0, now))
            return
        ttft = task.result()
        if ttft is not None:
            ttfts.append(ttft)
            if waits is not None:
                waits.append((t0, t0 + ttft))
        steps += 1
        # the agent keeps a bounded context (the last tool round), so every step costs the
        # same: the sim has no prefix cache and would otherwise prefill a growing prompt
        del messages[base:]
        messages.append({"role": "assistant", "content": f"calling a tool (step {steps})"})
        messages.append({"role": "tool", "content": LIGHT_STEP_GROWTH})
        await asyncio.sleep(LIGHT_PAUSE)


@dataclass
class RunResult:
    ttfts: list[float]
    censored: list[float]
    service: dict[str, float]
    tokens: dict[str, int]
    seconds: float
    ahead_max: int = 0  # most heavy requests that started while one light step waited


async def run_mixed(url: str, tag: str, window: float) -> RunResult:
    """Heavy agent saturating the backend, light tool loop alongside; measure one window."""
    stop = asyncio.Event()
    t0 = time.perf_counter()
    meter = Meter(start=t0 + WARMUP, end=t0 + WARMUP + window)
    ttfts: list[float] = []
    censored: list[float] = []
    firsts: list[float] = []
    waits: list[tuple[float, float]] = []
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        heavy = asyncio.ensure_future(heavy_agent(session, url, f"heavy-{tag}",
                                                  HEAVY_OUTSTANDING, meter, stop, firsts))
        await asyncio.sleep(0.5)  # the heavy burst is queued first: the deli-counter case
        light = asyncio.ensure_future(light_agent(session, url, f"light-{tag}", meter, stop,
                                                  ttfts, censored, waits=waits))
        await asyncio.sleep(meter.end - time.perf_counter())
        stop.set()
        await light
        heavy.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await heavy
    firsts.sort()
    # A heavy request's first token inside a light step's wait means it ran (at least its
    # prefill) while the light step waited: the one already running may show up, no other.
    ahead = [bisect.bisect_left(firsts, b) - bisect.bisect_right(firsts, a) for a, b in waits]
    return RunResult(ttfts, censored, meter.service, meter.tokens, window, max(ahead, default=0))


async def run_pair(url: str, tag: str, window: float) -> RunResult:
    """Two equal-weight heavy agents, both backlogged, with unequal demand (12 vs 4)."""
    stop = asyncio.Event()
    t0 = time.perf_counter()
    meter = Meter(start=t0 + WARMUP, end=t0 + WARMUP + window)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        tasks = [asyncio.ensure_future(heavy_agent(session, url, f"{name}-{tag}", n, meter,
                                                   stop)) for name, n in (("a", 12), ("b", 4))]
        await asyncio.sleep(meter.end - time.perf_counter())
        stop.set()
        for t in tasks:
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await asyncio.gather(*tasks)
    return RunResult([], [], meter.service, meter.tokens, window)


async def run_idle(url: str, tag: str) -> tuple[list[float], float, float]:
    """Light agent alone (its TTFT and service rate on an idle backend); one long request."""
    stop = asyncio.Event()
    meter = Meter()
    ttfts: list[float] = []
    async with aiohttp.ClientSession() as session:
        t0 = time.perf_counter()
        await light_agent(session, url, f"idle-{tag}", meter, stop, ttfts, [], max_steps=15)
        demand = sum(meter.service.values()) / (time.perf_counter() - t0)
        t1 = time.perf_counter()
        await stream_request(session, url, f"idle-heavy-{tag}",
                             [{"role": "user", "content": HEAVY_PROMPT}], HEAVY_TOKENS, meter)
        long_s = time.perf_counter() - t1
    return ttfts, demand, long_s


async def wait_ready(url: str, path: str, timeout: float = 20.0) -> None:
    end = time.perf_counter() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url + path) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.perf_counter() > end:
                raise RuntimeError(f"{url} did not come up")
            await asyncio.sleep(0.1)


async def wait_drained(sim_url: str, timeout: float = 15.0) -> None:
    """Let the previous run's cancelled requests leave the sim before the next one starts."""
    end = time.perf_counter() + timeout
    async with aiohttp.ClientSession() as s:
        while time.perf_counter() < end:
            async with s.get(sim_url + "/sim/stats") as r:
                if (await r.json())["in_flight"] == 0:
                    return
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def stack(slots: int):  # type: ignore[no-untyped-def]
    sim_port, tm_port = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sim = await asyncio.create_subprocess_exec(
        *TOOLMEND, "sim", "--port", str(sim_port), "--slots", str(slots), "--ttft", str(TTFT),
        "--token-delay", str(TOKEN_DELAY), "--prefill-per-token", str(PREFILL_PER_TOKEN),
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    sim_url = f"http://127.0.0.1:{sim_port}"
    tm = await asyncio.create_subprocess_exec(
        *TOOLMEND, "serve", "--upstream", sim_url, "--port", str(tm_port), "--slots", str(slots),
        "--backend", "vllm", "--no-log-requests", "--log-level", "warning",
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    tm_url = f"http://127.0.0.1:{tm_port}"
    try:
        await wait_ready(sim_url, "/sim/stats")
        await wait_ready(tm_url, "/healthz")
        yield sim_url, tm_url
    finally:
        for p in (tm, sim):
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(p.wait(), 5)


def fairness(r: RunResult, light_demand: float, light: str, heavy: str) -> float:
    """Jain's index of service / entitlement, entitlement = max-min fair share."""
    rate = {k: v / r.seconds for k, v in r.service.items()}
    capacity = rate.get(light, 0.0) + rate.get(heavy, 0.0)
    e_light = min(light_demand, capacity / 2)
    e_heavy = capacity - e_light
    return jain([rate.get(light, 0.0) / e_light, rate.get(heavy, 0.0) / e_heavy])


def informative(xs: list[float], censored: list[float]) -> list[float]:
    """Unfinished steps that tell something: still waiting longer than any finished step took.
    A step merely cut short by the end of the window is dropped."""
    top = max(xs, default=0.0)
    return [c for c in censored if c > top]


def fmt_ms(xs: list[float], censored: list[float], p: float) -> str:
    """A percentile in ms; a lower bound ("≥") when an unfinished step decides it."""
    cens = informative(xs, censored)
    all_ = xs + cens
    if not all_:
        return "n/a"
    v = pct(all_, p)
    bound = bool(cens) and v >= min(cens)
    return f"{'≥' if bound else ''}{v * 1000:,.0f}"


async def main() -> int:
    t_start = time.perf_counter()
    rows: list[str] = []
    goals: list[str] = []
    pair_rows: list[str] = []
    windows = {1: (12.0, 12.0), 4: (10.0, 10.0)}  # (direct, toolmend) seconds measured
    for slots in (1, 4):
        async with stack(slots) as (sim_url, tm_url):
            idle_direct, demand_direct, long_s = await run_idle(sim_url, f"d{slots}")
            idle_tm, demand_tm, _ = await run_idle(tm_url, f"t{slots}")
            idle_p50 = statistics.median(idle_direct)
            res = {}
            for mode, url, demand in (("FIFO (direct)", sim_url, demand_direct),
                                      ("toolmend", tm_url, demand_tm)):
                await wait_drained(sim_url)
                tag = f"{'d' if mode.startswith('FIFO') else 't'}{slots}"
                r = await run_mixed(url, tag, windows[slots][0 if tag[0] == "d" else 1])
                res[mode] = r
                light, heavy = f"light-{tag}", f"heavy-{tag}"
                tput = r.tokens.get(heavy, 0) / r.seconds
                cens = informative(r.ttfts, r.censored)
                rows.append(
                    f"| {slots} | {mode} | {len(r.ttfts)}"
                    f"{f' (+{len(cens)} unfinished)' if cens else ''} | "
                    f"{fmt_ms(r.ttfts, r.censored, 50)} | {fmt_ms(r.ttfts, r.censored, 99)} | "
                    f"{tput:,.0f} | {fairness(r, demand, light, heavy):.3f} |")
            rows.append(f"| {slots} | idle backend (light alone) | {len(idle_direct)} | "
                        f"{idle_p50 * 1000:,.0f} (via toolmend "
                        f"{statistics.median(idle_tm) * 1000:,.0f}) | "
                        f"{pct(idle_direct, 99) * 1000:,.0f} (via toolmend "
                        f"{pct(idle_tm, 99) * 1000:,.0f}) | – | – |")
            fifo, tm = res["FIFO (direct)"], res["toolmend"]
            keep = (tm.tokens.get(f"heavy-t{slots}", 0) / tm.seconds) / max(
                1e-9, fifo.tokens.get(f"heavy-d{slots}", 0) / fifo.seconds)
            p99 = pct(tm.ttfts + informative(tm.ttfts, tm.censored), 99)
            if slots == 4:
                goals.append(f"4 slots: light p99 TTFT {p99 * 1000:,.0f} ms vs 2 × idle "
                             f"{2 * idle_p50 * 1000:,.0f} ms: "
                             f"{'met' if p99 <= 2 * idle_p50 else 'MISSED'}")
                goals.append(f"4 slots: heavy keeps {keep:.0%} of its FIFO throughput "
                             f"(goal ≥ 70%): {'met' if keep >= 0.7 else 'MISSED'}")
            else:
                worst = max(tm.ttfts + informative(tm.ttfts, tm.censored))
                goals.append(f"1 slot: at most {tm.ahead_max} heavy request(s) started while a "
                             f"light step waited (FIFO: {fifo.ahead_max}; goal: only the one "
                             f"already running, ≤ 1): {'met' if tm.ahead_max <= 1 else 'MISSED'}"
                             f"; light worst TTFT {worst * 1000:,.0f} ms, one long request on "
                             f"the idle backend {long_s * 1000:,.0f} ms; heavy keeps "
                             f"{keep:.0%} of its FIFO throughput")
            if slots == 4:
                for mode, url in (("FIFO (direct)", sim_url), ("toolmend", tm_url)):
                    await wait_drained(sim_url)
                    tag = f"p{'d' if mode.startswith('FIFO') else 't'}"
                    r = await run_pair(url, tag, 8.0)
                    sa, sb = r.service.get(f"a-{tag}", 0.0), r.service.get(f"b-{tag}", 0.0)
                    tot = max(1e-9, sa + sb)
                    j = jain([sa / tot / 0.5, sb / tot / 0.5])
                    pair_rows.append(f"| {slots} | {mode} | {sa / tot:.1%} / {sb / tot:.1%} | "
                                     f"{j:.4f} |")
                    if mode == "toolmend":
                        goals.append(f"equal agents: Jain {j:.4f} (goal ≥ 0.99): "
                                     f"{'met' if j >= 0.99 else 'MISSED'}")
    elapsed = time.perf_counter() - t_start
    section = "\n".join([
        "## Fair queuing",
        "",
        f"`python bench/fairness.py` ({elapsed:.0f} s). `toolmend sim` as a FIFO backend; a "
        f"heavy agent keeps {HEAVY_OUTSTANDING} long requests outstanding (~1,000 prompt "
        f"tokens, {HEAVY_TOKENS} output tokens, about 1 s each); a light agent runs a "
        f"sequential tool loop ({LIGHT_TOKENS} output tokens a step, a bounded context, "
        f"{LIGHT_PAUSE * 1000:.0f} ms tool pause). TTFT in ms, throughput in output tokens/s, "
        "fairness = Jain's index of service (prompt + 2 × output tokens) relative to the "
        "max-min fair entitlement. \"≥\": the light agent's step was still waiting when the "
        "window closed.",
        "",
        "| slots | path | light steps | light TTFT p50 | light TTFT p99 | heavy tok/s "
        "| fairness (Jain) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Two equal-weight agents, both always backlogged, keeping 12 and 4 long requests "
        "outstanding (entitled to half each):",
        "",
        "| slots | path | service shares (12 / 4 outstanding) | Jain |",
        "|---|---|---|---|",
        *pair_rows,
        "",
        "Goals (issue 5):",
        "",
        *[f"- {g}" for g in goals],
        "",
    ])
    print(section)
    replace_section(section)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    raise SystemExit(asyncio.run(main()))
