"""Load and soak: many concurrent streaming requests through toolmend to ``toolmend sim``.

    python bench/load.py                      # 1,000 concurrent streams for 60 s
    python bench/load.py --quick              # the same for 15 s
    python bench/load.py --soak               # 10 minutes with random faults mixed in
    python bench/load.py --soak --duration 60 # a short soak (any length)
    python bench/load.py --hostile-each       # each hostile input of the soak alone, its cost
    python bench/load.py --quick --write      # also replace "## Load and soak" in BENCHMARKS.md

Three processes: the simulated backend, toolmend, and this load generator (uvloop). Every
worker sends one streaming chat request after another. A small group of probe workers sends
the same requests straight to the simulator in the same run, so the TTFT that toolmend adds
is measured against a baseline that shares the load generator's own latency.

toolmend runs with ``--slots`` equal to the concurrency: the fair queue's job is to hold
requests back when the backend is full, which would be measured as latency here. The simulator
has as many slots too.

Reported: errors (any non-200, error event, missing ``[DONE]``, exception or timeout), TTFT
p50/p99 through toolmend and direct, the added p99, relayed chunks per second, toolmend's RSS
at start, peak and after the run, and (soak) the outcome of every fault kind.

The soak also mixes in the hostile inputs of issue 14 (``hostile.py``: a bypassed token cap,
upstreams that fail after their headers, schema and argument bombs, identity headers that are
not UTF-8, another agent's session, slowloris, a huge upstream reply...), sent by
``--hostile-workers`` workers of their own while the load runs. Every fault and hostile input
has the outcomes that mean it was handled; anything else is listed as unexpected. The soak
reports ``/healthz`` latency (p50/p99/max, sampled every 100 ms) during the run, and RSS at
the start, at the peak, and ``--settle`` seconds after the load stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import hostile

ROOT = Path(__file__).resolve().parent.parent
BENCH_MD = ROOT / "BENCHMARKS.md"
SECTION = "## Load and soak"
SOAK_SECTION = "## Soak with hostile inputs"
_TOKEN = re.compile(rb'"content":"[^"]')

# Faults the soak mixes in: scenario name -> scenario (served by name: "#scenario:NAME")
FAULTS: dict[str, dict[str, Any]] = {
    # served by name, so toolmend's two resends of a dropped request are refused too
    "refuse": {"fault": {"kind": "refuse"}},
    "reset": {"content": "one two three four five six", "fault": {"kind": "reset", "after": 3}},
    "stall_first_byte": {"content": "late reply", "fault": {"kind": "stall", "seconds": 30}},
    "stall_mid_stream": {"content": "one two three four", "fault": {"kind": "stall",
                                                                     "after": 2,
                                                                     "seconds": 30}},
    "status_429": {"fault": {"kind": "status", "status": 429, "message": "busy"}},
    "status_500": {"fault": {"kind": "status", "status": 500, "message": "kaputt"}},
    "status_503": {"fault": {"kind": "status", "status": 503, "message": "overloaded"}},
    "malformed": {"content": "one two three four", "fault": {"kind": "malformed", "after": 2}},
    "truncated": {"content": "one two three four", "fault": {"kind": "truncated", "after": 2}},
    "endless": {"fault": {"kind": "endless"}, "token_delay": 0.05},
    "error_event": {"content": "one two three", "fault": {"kind": "error_event", "after": 2,
                                                          "message": "CUDA out of memory"}},
}
# What each fault must end as, with the soak's timeouts (first byte 3 s, keep-alive comments
# every 1 s: a stall before the first byte ends as an in-stream error, after the keep-alives
# opened the stream).
EXPECTED: dict[str, frozenset[str]] = {
    # refused before anything was sent: a 502; refused after the request waited for a slot
    # long enough for keep-alives to open the stream: an in-stream error
    "refuse": frozenset({"HTTP 502", "in-stream error"}),
    "reset": frozenset({"in-stream error"}),
    "stall_first_byte": frozenset({"in-stream error"}),
    "stall_mid_stream": frozenset({"in-stream error"}),
    "status_429": frozenset({"HTTP 429"}),
    "status_500": frozenset({"HTTP 500"}),
    "status_503": frozenset({"HTTP 503"}),
    "malformed": frozenset({"in-stream error"}),
    "truncated": frozenset({"in-stream error"}),
    "endless": frozenset({"in-stream error"}),
    "error_event": frozenset({"in-stream error"}),
    "client disconnect": frozenset({"client left mid-stream"}),
}
SIM_CONTEXT = 4096  # the simulator's context length (vLLM dialect)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


@dataclass
class Stats:
    ttft: list[float] = field(default_factory=list)
    requests: int = 0
    ok: int = 0
    chunks: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)  # soak: "fault -> outcome"
    hostile: Counter[tuple[int, str, str]] = field(default_factory=Counter)  # item, name, outcome
    hostile_seconds: dict[tuple[int, str], float] = field(default_factory=dict)  # longest
    unexpected: Counter[str] = field(default_factory=Counter)  # "what -> outcome"

    def record_hostile(self, h: hostile.Hostile, outcome: str, took: float) -> None:
        self.hostile[(h.item, h.name, outcome)] += 1
        key = (h.item, h.name)
        self.hostile_seconds[key] = max(self.hostile_seconds.get(key, 0.0), took)
        if outcome not in h.expect:
            self.unexpected[f"{h.item}. {h.name} -> {outcome}"] += 1


async def wait_http(url: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"{url} did not come up")
            await asyncio.sleep(0.1)


async def one(session: aiohttp.ClientSession, url: str, stats: Stats, measure: bool,
              fault: str | None = None, abandon: bool = False,
              headers: dict[str, str] | None = None) -> None:
    """One streaming request; classify its outcome."""
    text = "hello" if fault is None else f"hello #scenario:{fault}"
    body = {"model": "sim-model", "stream": True,
            "messages": [{"role": "user", "content": text}]}
    t0 = time.perf_counter()
    stats.requests += 1
    first: float | None = None
    head = b""
    tail = b""
    chunks = 0
    outcome = "?"
    try:
        async with session.post(url, json=body, headers=headers) as r:
            if r.status != 200:
                doc = await r.read()
                shaped = _openai_error(doc)
                outcome = f"HTTP {r.status}" + ("" if shaped else " (not OpenAI-shaped)")
            else:
                async for piece in r.content.iter_any():
                    chunks += piece.count(b"data: ")
                    if first is None:
                        head += piece
                        if _TOKEN.search(head):
                            first = time.perf_counter()
                            if abandon:
                                outcome = "client left mid-stream"
                                break
                    tail = (tail + piece)[-4096:]
                else:
                    if not tail.rstrip().endswith(b"data: [DONE]"):
                        outcome = "no [DONE]"
                    elif b'data: {"error"' in tail:
                        ev = tail.rsplit(b'data: {"error"', 1)[1].split(b"\n", 1)[0]
                        shaped = _openai_error(b'{"error"' + ev)
                        outcome = "in-stream error" + ("" if shaped else " (not OpenAI-shaped)")
                    else:
                        outcome = "clean finish"
    except TimeoutError:
        outcome = "client timeout"
    except aiohttp.ClientError as e:
        outcome = f"exception {e.__class__.__name__}"
    stats.chunks += chunks
    if fault is not None or abandon:
        what = fault or "client disconnect"
        stats.outcomes[f"{what} -> {outcome}"] += 1
        if outcome not in EXPECTED.get(what, ()):
            stats.unexpected[f"{what} -> {outcome}"] += 1
        return
    if outcome == "clean finish":
        stats.ok += 1
        if measure and first is not None:
            stats.ttft.append(first - t0)
    else:
        stats.errors[outcome] += 1


def _openai_error(raw: bytes) -> bool:
    try:
        err = json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err)


async def worker(session: aiohttp.ClientSession, url: str, stats: Stats, stop_at: float,
                 measure_after: float, fault_rate: float, rng: random.Random,
                 stagger: float, headers: dict[str, str] | None = None) -> None:
    # Every reply takes the same time, so workers started together would stay in lockstep
    # and hit toolmend as one herd per reply; a random start spreads them for good.
    await asyncio.sleep(rng.uniform(0, stagger))
    while time.monotonic() < stop_at:
        fault = None
        abandon = False
        if fault_rate:
            x = rng.random()
            if x < fault_rate:
                fault = rng.choice(sorted(FAULTS))
            elif x < fault_rate * 1.4:
                abandon = True
        await one(session, url, stats, time.monotonic() >= measure_after, fault, abandon,
                  headers)


async def sample_rss(pid: int, out: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        out.append(rss_mb(pid))
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except TimeoutError:
            pass


@dataclass
class Health:
    """``/healthz`` latencies while the soak runs, and answers of the sessions endpoint."""

    healthz: list[float] = field(default_factory=list)
    healthz_failed: Counter[str] = field(default_factory=Counter)
    sessions_status: Counter[int] = field(default_factory=Counter)


async def sample_health(url: str, out: Health, stop: asyncio.Event) -> None:
    """GET /healthz every 100 ms on a connection of its own (the latency an orchestrator's
    probe would see), and /toolmend/v1/sessions every second (item 5: one bad session id
    must not break it for everyone)."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=2)) as s:
        n = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                async with s.get(url + "/healthz") as r:
                    await r.read()
                    if r.status == 200:
                        out.healthz.append(time.perf_counter() - t0)
                    else:
                        out.healthz_failed[f"HTTP {r.status}"] += 1
                n += 1
                if n % 10 == 0:
                    async with s.get(url + "/toolmend/v1/sessions?limit=1000") as r:
                        await r.read()
                        out.sessions_status[r.status] += 1
            except (aiohttp.ClientError, TimeoutError) as e:
                out.healthz_failed[e.__class__.__name__] += 1
            try:
                await asyncio.wait_for(stop.wait(), 0.1)
            except TimeoutError:
                pass


async def sim_stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(url + "/sim/stats") as r:
        return dict(await r.json())


async def scrape(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("toolmend_requests_in_flight", "toolmend_queue_depth"):
            if line.startswith(name + " ") or line.startswith(name + "{"):
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


@dataclass
class Procs:
    sim: subprocess.Popen[bytes]
    tm: subprocess.Popen[bytes]
    sim_url: str
    tm_url: str
    fixtures: Path
    banner: str = ""  # toolmend's first line on stdout

    def stop(self) -> None:
        for p in (self.tm, self.sim):
            p.send_signal(signal.SIGTERM)
        for p in (self.tm, self.sim):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.fixtures, ignore_errors=True)


def start(args: argparse.Namespace) -> Procs:
    """The simulator (with the fault scenarios as fixtures) and toolmend, as two processes."""
    sim_port, tm_port = free_port(), free_port()
    fixtures = Path(tempfile.mkdtemp(prefix="toolmend-load-"))
    scenarios = dict(FAULTS)
    if args.soak:
        scenarios.update(hostile.scenarios(args.hostile_scale))
    for name, sc in scenarios.items():
        (fixtures / f"{name}.json").write_text(json.dumps({"name": name, **sc}))
    exe = [sys.executable, "-m", "toolmend"]
    sim = subprocess.Popen([*exe, "sim", "--port", str(sim_port), "--slots",
                            str(args.concurrency * 2), "--ttft", str(args.ttft),
                            "--token-delay", str(args.token_delay), "--tokens",
                            str(args.tokens), "--fixtures", str(fixtures),
                            "--context", str(SIM_CONTEXT)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # slots = concurrency and no express slot: nothing waits in toolmend's queue, so the
    # numbers are the relay's, not the fair queue's (whose job is to make requests wait)
    serve = [*exe, "serve", "--upstream", f"http://127.0.0.1:{sim_port}", "--backend", "vllm",
             "--port", str(tm_port), "--slots", str(args.concurrency), "--no-express-slot",
             "--max-queue", str(args.concurrency * 4), "--max-queue-per-agent",
             str(args.concurrency * 4), "--no-log-requests", "--log-level", "warning",
             "--max-connections", str(args.concurrency * 2)]
    if args.soak:
        serve += ["--first-byte-timeout", "3", "--idle-timeout", "3", "--total-timeout", "15",
                  "--loading-timeout", "0", "--keepalive-interval", "1",
                  "--header-timeout", str(args.header_timeout)]
        keys = fixtures / "keys.toml"
        keys.write_text(hostile.keys_toml())
        serve += ["--config", str(keys)]
        # item 12: credentials in the upstream URL, which the banner must not print
        i = serve.index("--upstream") + 1
        serve[i] = serve[i].replace("http://", f"http://soak:{hostile.UPSTREAM_SECRET}@")
    tm = subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return Procs(sim, tm, f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{tm_port}",
                 fixtures)


def read_banner(tm: subprocess.Popen[bytes], timeout: float = 20.0) -> str:
    """toolmend's first stdout line (the banner); stdout is drained afterwards so that the
    child never blocks on a full pipe."""
    assert tm.stdout is not None
    fd = tm.stdout.fileno()
    seen = b""
    end = time.monotonic() + timeout
    while b"\n" not in seen and time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            piece = os.read(fd, 4096)
            if not piece:
                break
            seen += piece
    drain = tm.stdout

    def discard() -> None:
        while drain.read(65536):
            pass

    threading.Thread(target=discard, daemon=True).start()
    return seen.split(b"\n", 1)[0].decode("utf-8", "replace")


async def run(args: argparse.Namespace, procs: Procs) -> dict[str, Any]:
    tm, tm_url, sim_url = procs.tm, procs.tm_url, procs.sim_url
    procs.banner = read_banner(tm)
    await wait_http(sim_url + "/v1/models")
    await wait_http(tm_url + "/healthz")
    rss_fresh = rss_mb(tm.pid)
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60 if args.soak else 30)
    # the soak's toolmend has API keys (item 1 needs a capped one): ordinary traffic uses one
    # without a cap
    headers = hostile.auth(hostile.LOAD_KEY) if args.soak else None
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        warm = Stats()
        await asyncio.gather(*(one(session, tm_url + "/v1/chat/completions", warm, False,
                                   headers=headers)
                               for _ in range(min(200, args.concurrency))))
        await asyncio.sleep(1.0)
        rss_start = rss_mb(tm.pid)
        cpu_start = cpu_seconds(tm.pid)
        via, direct = Stats(), Stats()
        rss: list[float] = []
        health = Health()
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(tm.pid, rss, stop))
        prober = asyncio.create_task(sample_health(tm_url, health, stop))
        t0 = time.monotonic()
        stop_at = t0 + args.duration
        stagger = args.ttft + args.tokens * args.token_delay  # one reply's duration
        measure_after = t0 + min(stagger, args.duration / 4)  # after the ramp-up
        probes = max(10, args.concurrency // 20)
        rng = random.Random(7)
        fault_rate = args.fault_rate if args.soak else 0.0
        tasks = [worker(session, tm_url + "/v1/chat/completions", via, stop_at,
                        measure_after, fault_rate, random.Random(rng.random()), stagger,
                        headers)
                 for _ in range(args.concurrency)]
        tasks += [worker(session, sim_url + "/v1/chat/completions", direct, stop_at,
                         measure_after, 0.0, random.Random(rng.random()), stagger)
                  for _ in range(probes)]
        if args.soak and args.hostile_workers:
            hctx = hostile.Ctx(session, tm_url, int(tm_url.rsplit(":", 1)[1]),
                               args.hostile_scale, args.header_timeout, SIM_CONTEXT)
            rotation = hostile.Rotation(random.Random(rng.random()))
            tasks += [hostile.hostile_worker(hctx, stop_at, rotation, via.record_hostile)
                      for _ in range(args.hostile_workers)]
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t0
        cpu_used = cpu_seconds(tm.pid) - cpu_start
        stop.set()
        await prober
        rss_end_of_load = rss_mb(tm.pid)
        peak_during = max(rss or [0])
        # idle: let connections and buffers go, then measure what stays
        stop = asyncio.Event()
        sampler2 = asyncio.create_task(sample_rss(tm.pid, rss, stop))
        await asyncio.sleep(args.settle)
        stop.set()
        await sampler, sampler2
        rss_end = rss_mb(tm.pid)
        after = await scrape(tm_url)
        upstream = await sim_stats(sim_url)
    if args.soak:
        leaked = hostile.UPSTREAM_SECRET in procs.banner
        outcome = "banner shows credentials" if leaked else "banner redacted"
        via.hostile[(12, "upstream URL with user:password@", outcome)] += 1
        if leaked or not procs.banner:
            via.unexpected[f"12. banner -> {outcome or 'no banner'}"] += 1
        asked = int(upstream.get("max_asked", 0))
        outcome = "within the context" if asked <= SIM_CONTEXT else "over the context"
        via.hostile[(15, f"largest output limit the upstream got: {asked:,}", outcome)] += 1
        if asked > SIM_CONTEXT:
            via.unexpected[f"15. upstream was asked for {asked:,} tokens"] += 1
        for what, n in via.errors.items():  # ordinary traffic must not suffer either
            via.unexpected[f"ordinary request -> {what}"] += n
        bad = {st: n for st, n in health.sessions_status.items() if st != 200}
        if bad:
            via.unexpected[f"5. GET /toolmend/v1/sessions -> {bad}"] += sum(bad.values())
    hz = [1000 * x for x in health.healthz]
    return {
        "mode": "soak" if args.soak else ("quick" if args.quick else "full"),
        "concurrency": args.concurrency, "probes": probes, "duration_s": round(elapsed, 1),
        "sim": {"ttft_s": args.ttft, "token_delay_s": args.token_delay,
                "tokens": args.tokens},
        "requests": via.requests, "ok": via.ok, "errors": dict(via.errors),
        "direct_requests": direct.requests, "direct_errors": dict(direct.errors),
        "ttft_ms": {"via_p50": 1000 * pct(via.ttft, 50), "via_p99": 1000 * pct(via.ttft, 99),
                    "direct_p50": 1000 * pct(direct.ttft, 50),
                    "direct_p99": 1000 * pct(direct.ttft, 99)},
        "added_ttft_p99_ms": 1000 * (pct(via.ttft, 99) - pct(direct.ttft, 99)),
        "added_ttft_p50_ms": 1000 * (pct(via.ttft, 50) - pct(direct.ttft, 50)),
        "chunks_per_s": via.chunks / elapsed,
        "toolmend_cpu_us_per_chunk": 1e6 * cpu_used / max(1, via.chunks),
        "rss_mb": {"fresh": rss_fresh, "start": rss_start, "peak": max(rss or [0]),
                   "peak_during_load": peak_during, "end_of_load": rss_end_of_load,
                   "end": rss_end, "settle_s": args.settle},
        "after": after,
        "outcomes": dict(sorted(via.outcomes.items())),
        "healthz_ms": {"samples": len(hz), "p50": pct(hz, 50), "p99": pct(hz, 99),
                       "max": max(hz or [float("nan")]),
                       "failed": dict(health.healthz_failed)},
        "sessions_endpoint": {str(k): v for k, v in health.sessions_status.items()},
        "hostile": [{"item": i, "input": n, "outcome": o, "count": c,
                     "expected": o in _expect(i, n),
                     "longest_s": round(via.hostile_seconds.get((i, n), 0.0), 2)}
                    for (i, n, o), c in sorted(via.hostile.items())],
        "unexpected": dict(sorted(via.unexpected.items())),
        "upstream_max_asked": upstream.get("max_asked"),
    }


def _expect(item: int, name: str) -> frozenset[str]:
    for h in hostile.CATALOGUE:
        if (h.item, h.name) == (item, name):
            return h.expect
    return frozenset({"banner redacted", "within the context"})


async def run_each(args: argparse.Namespace, procs: Procs) -> str:
    """``--hostile-each``: every hostile input once, alone (no load), with the worst /healthz
    latency while it ran and toolmend's RSS after it: which input costs what."""
    procs.banner = read_banner(procs.tm)
    await wait_http(procs.sim_url + "/v1/models")
    await wait_http(procs.tm_url + "/healthz")
    lines = [f"toolmend RSS at start: {rss_mb(procs.tm.pid):.0f} MB; banner "
             + ("redacted" if hostile.UPSTREAM_SECRET not in procs.banner else
                "SHOWS THE UPSTREAM CREDENTIALS"), "",
             "| item | hostile input | outcome | took | /healthz worst | RSS after |",
             "|---|---|---|---|---|---|"]
    async with aiohttp.ClientSession() as session:
        ctx = hostile.Ctx(session, procs.tm_url, int(procs.tm_url.rsplit(":", 1)[1]),
                          args.hostile_scale, args.header_timeout, SIM_CONTEXT)
        for h in hostile.CATALOGUE:
            health = Health()
            stop = asyncio.Event()
            prober = asyncio.create_task(sample_health(procs.tm_url, health, stop))
            t0 = time.monotonic()
            outcome = await h.run(ctx)
            took = time.monotonic() - t0
            stop.set()
            await prober
            worst = max(health.healthz or [0.0]) * 1000
            if health.healthz_failed:
                worst = float("inf")
            mark = "" if outcome in h.expect else " **unexpected**"
            lines.append(f"| {h.item} | {h.name} | {outcome}{mark} | {took:.1f} s | "
                         f"{worst:,.0f} ms | {rss_mb(procs.tm.pid):.0f} MB |")
            print(lines[-1], file=sys.stderr, flush=True)  # progress; the table comes last
    return "\n".join(lines)


def report(r: dict[str, Any]) -> str:
    t, m = r["ttft_ms"], r["rss_mb"]
    lines = [
        f"**{r['mode']}**: {r['concurrency']} concurrent streams through toolmend for "
        f"{r['duration_s']} s (+{r['probes']} direct probe streams), sim TTFT "
        f"{r['sim']['ttft_s'] * 1000:.0f} ms, {r['sim']['tokens']} tokens at "
        f"{r['sim']['token_delay_s'] * 1000:.0f} ms each; toolmend `--slots "
        f"{r['concurrency']}`.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| requests through toolmend | {r['requests']:,} ({r['ok']:,} clean) |",
        f"| errors | {sum(r['errors'].values())} {r['errors'] or ''} |",
        f"| TTFT p50 / p99 via toolmend | {t['via_p50']:.1f} / {t['via_p99']:.1f} ms |",
        f"| TTFT p50 / p99 direct | {t['direct_p50']:.1f} / {t['direct_p99']:.1f} ms |",
        f"| added TTFT p50 / p99 | {r['added_ttft_p50_ms']:.1f} / "
        f"{r['added_ttft_p99_ms']:.1f} ms |",
        f"| relayed chunks/s | {r['chunks_per_s']:,.0f} |",
        f"| toolmend CPU per chunk | {r['toolmend_cpu_us_per_chunk']:.0f} µs |",
        f"| toolmend RSS fresh / start / peak / end | {m['fresh']:.0f} / {m['start']:.0f} / "
        f"{m['peak']:.0f} / {m['end']:.0f} MB ({m['settle_s']:.0f} s after the load) |",
        f"| after the run: in flight, queued | "
        f"{r['after'].get('toolmend_requests_in_flight', 0):.0f}, "
        f"{r['after'].get('toolmend_queue_depth', 0):.0f} |",
    ]
    hz = r["healthz_ms"]
    if hz["samples"]:
        lines.append(f"| /healthz p50 / p99 / max during the run | {hz['p50']:.1f} / "
                     f"{hz['p99']:.1f} / {hz['max']:.1f} ms ({hz['samples']:,} probes"
                     + (f", failed {hz['failed']}" if hz["failed"] else "") + ") |")
    if r["mode"] == "soak":
        lines.append(f"| unexpected outcomes | {sum(r['unexpected'].values())} |")
    if r["outcomes"]:
        lines += ["", "| fault (soak) | outcome | count |", "|---|---|---|"]
        for k, n in r["outcomes"].items():
            fault, outcome = k.split(" -> ", 1)
            mark = "" if outcome in EXPECTED.get(fault, ()) else " **unexpected**"
            lines.append(f"| {fault} | {outcome}{mark} | {n} |")
    if r.get("hostile"):
        lines += ["", "| issue 14 item | hostile input | outcome | count | longest |",
                  "|---|---|---|---|---|"]
        for h in r["hostile"]:
            mark = "" if h["expected"] else " **unexpected**"
            lines.append(f"| {h['item']} | {h['input']} | {h['outcome']}{mark} | "
                         f"{h['count']} | {h['longest_s']:.1f} s |")
    if r.get("unexpected"):
        lines += ["", "Unexpected outcomes:", ""]
        lines += [f"- {k}: {n}" for k, n in r["unexpected"].items()]
    return "\n".join(lines)


def write_section(body: str, section: str = SECTION) -> None:
    """Replace (or append) this script's section of BENCHMARKS.md, re-read right before."""
    text = BENCH_MD.read_text() if BENCH_MD.exists() else "# Benchmarks\n"
    block = f"{section}\n\n{body.strip()}\n"
    start = text.find(section + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + block
    else:
        nxt = text.find("\n## ", start + len(section))
        text = text[:start] + block + ("\n" + text[nxt + 1:] if nxt >= 0 else "")
    BENCH_MD.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds of load (default: 60; --quick 15; --soak 600)")
    ap.add_argument("--quick", action="store_true", help="15 s")
    ap.add_argument("--soak", action="store_true",
                    help="10 minutes (or --duration) with faults and hostile inputs mixed in")
    ap.add_argument("--fault-rate", type=float, default=0.05,
                    help="soak: share of requests that hit a fault (plus 40%% as many "
                    "client disconnects)")
    ap.add_argument("--hostile-workers", type=int, default=3,
                    help="soak: workers sending issue 14's hostile inputs alongside the load, "
                    "taking turns through them (heavy ones one at a time; 0: none)")
    ap.add_argument("--hostile-scale", type=float, default=1.0,
                    help="soak: size of the hostile payloads relative to the issue's (8 MB "
                    "schemas, 97 MB events, 100 MB replies at 1.0)")
    ap.add_argument("--hostile-each", action="store_true",
                    help="run every hostile input once, alone, and report what each costs")
    ap.add_argument("--header-timeout", type=float, default=5.0,
                    help="soak: toolmend's --header-timeout, which the slowloris input meets")
    ap.add_argument("--settle", type=float, default=None,
                    help="seconds of idle after the load before the last RSS reading "
                    "(default: 60 for the soak, 5 otherwise)")
    ap.add_argument("--ttft", type=float, default=0.05, help="sim: seconds to first token")
    ap.add_argument("--token-delay", type=float, default=0.2, help="sim: seconds per token")
    ap.add_argument("--tokens", type=int, default=16, help="sim: tokens per reply")
    ap.add_argument("--json", help="also write the raw result here")
    ap.add_argument("--write", action="store_true", help="replace the section in BENCHMARKS.md")
    args = ap.parse_args()
    if args.duration is None:
        args.duration = 600.0 if args.soak else 15.0 if args.quick else 60.0
    if args.settle is None:
        args.settle = 60.0 if args.soak else 5.0
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.hostile_each:
        args.soak, args.concurrency = True, 4
        procs = start(args)
        try:
            print(asyncio.run(run_each(args, procs)))
        finally:
            procs.stop()
        return
    procs = start(args)
    try:
        r = asyncio.run(run(args, procs))
    finally:
        procs.stop()
    text = report(r)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    if args.write:  # the soak has a section of its own: it must not replace the load table
        write_section(text, SOAK_SECTION if args.soak else SECTION)


if __name__ == "__main__":
    main()
