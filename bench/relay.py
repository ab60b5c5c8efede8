"""Relay overhead: what toolmend adds to a streaming request, against ``toolmend sim`` on loopback.

What is measured, and why
-------------------------
An agent feels a proxy in two ways: a later first token, and CPU that the serving host no
longer has. So, in one run, at 1, 16, 64 and 256 concurrent streams, the same load goes

* ``direct``   client → sim,
* ``toolmend`` client → ``toolmend serve`` → sim, everything on: the request offers a tool,
  so the tool-call mender watches the stream; usage is requested upstream and stripped; fair
  queue, telemetry and access log run as configured by default,
* ``bare``     client → a minimal aiohttp byte relay → sim (``iter_any`` in, ``write`` out:
  the floor for any Python proxy, which DESIGN.md's budget of 1.5× is measured against),

and for each we record:

* **TTFT**: time from sending the request to the first chunk with non-empty ``content``, as
  the client sees it. "Added" is proxied minus direct at the same percentile. Rounds of the
  three paths alternate (and rotate their order) so that drift in the machine's load hits all
  of them alike.
* **relayed chunks/s**: SSE events the client received per wall-clock second, counted in a
  window where every stream is running (after a staggered ramp, before the drain).
* **CPU per relayed chunk** of the relay process, from ``/proc/<pid>/stat`` utime+stime over
  the same window, and its inverse, chunks per CPU-second: the "chunks/s on one core" that
  the relay could sustain if it had a core to itself (the machine here is shared, so wall-clock
  throughput alone would mostly measure the neighbours).
* **peak RSS** of the relay process (``VmHWM`` from ``/proc/<pid>/status``), after each level.
* **errors**: non-200 answers, exceptions, streams without ``[DONE]`` or with a wrong number of
  events.

Sim, relay and load client are separate processes so that their work does not share one event
loop. The client is this process: aiohttp with a raw SSE reader (it only counts ``data: ``
markers and looks for the first content), because a full SDK would be the bottleneck.
Stream starts are staggered over one request's duration so that the load is steady rather
than a synchronized burst every request.

Run ``python bench/relay.py`` (five to seven minutes) or ``--quick`` (one to two); it prints
markdown tables and replaces the ``## Relay overhead`` section of BENCHMARKS.md. The processes'
logs are kept in a temporary folder (printed) only when something failed.

``--undeclared`` measures something narrower, side by side: tool-less chat (the requests offer
no tools) through two ``toolmend serve`` processes that differ in one setting, the check of
calls on such requests off (``--undeclared-calls pass``: no mender, as before the check
existed) and on (``refuse``, the default: a mender that looks at events carrying a structured
call, and at nothing else). Same sim, same load, rounds alternating; per round the relay's CPU
per chunk, so that the rounds of one path show the noise the difference between the paths has
to stand out from. Loopback numbers on a shared machine are noisy, so the same comparison is
also made in-process, without sockets or other processes: the per-request work of one
streamed tool-less reply (choosing the mending, the stream pipeline over every event,
recording), check off and on, alternating, in CPU time. It replaces the ``## Tool-less chat:
the undeclared-call check`` section.

``--fc`` fits the relay's CPU cost per front as ``cpu(n) = F + n·c``: F the fixed cost of one
request, c the marginal cost of one chunk. Each path (the bare relay, and toolmend on each
front it serves: chat, Ollama, Anthropic Messages, Responses) runs replies of 10 and of 250
tokens at 16 closed-loop streams against one sim per length; the relay process's CPU-seconds
over a window, divided by the requests completed in it, gives cpu(10) and cpu(250), hence
c = (cpu(250) − cpu(10)) / 240 and F = cpu(10) − 10·c. Rounds alternate the paths (rotating
their order), and the medians over rounds are reported beside the bare relay's. It replaces the
``## Cost per request and per chunk, per front`` section.

``--fc --fronts chat,anthropic`` runs only those fronts beside the bare relay (a quick check
while working on one front); it prints its table and leaves BENCHMARKS.md as it is.

``--fc --litellm`` adds LiteLLM's proxy to the same run, as three more paths on the same load:
its chat completions, its Anthropic Messages bridge and its Responses bridge, in front of the
same sims (see ``litellm_proxy.py``: a pinned LiteLLM in a cached venv of its own, made on the
first such run). Its process's CPU time is measured as toolmend's, and its rows go to the
``### LiteLLM on the same load`` subsection. A run without ``--litellm`` keeps that subsection
as it was.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from _common import BENCHMARKS, CLK_TCK, FIRST_CONTENT, Proc, replace_section
from aiohttp import web

SELF = Path(__file__).resolve()
SECTION = "## Relay overhead"
UNDECLARED_SECTION = "## Tool-less chat: the undeclared-call check"
UNDECLARED_MODES = ("off", "on")
FC_SECTION = "## Cost per request and per chunk, per front"
FC_LENGTHS = (10, 250)
FC_STREAMS = 16
GOAL_FC_FIXED = 1.5  # toolmend's F within 1.5x the bare relay's, on every front
GOAL_FC_CHUNK = 1.3  # and c within 1.3x  # --undeclared-calls pass / refuse
LEVELS = (1, 16, 64, 256)
MODES = ("direct", "toolmend", "bare")
DATA = b"data: "
DONE_TAIL = b"data: [DONE]\n\n"
TOOLS = (b',"tools":[{"type":"function","function":{"name":"get_weather",'
         b'"description":"Current weather in a city","parameters":{"type":"object",'
         b'"properties":{"city":{"type":"string"}},"required":["city"]}}}]')
HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}

# Goals from issue 2 and from DESIGN.md's performance model.
GOAL_LEVEL = 64
GOAL_P50_ADDED_MS = 1.0
GOAL_P99_ADDED_MS = 5.0
GOAL_CHUNKS_PER_CORE = 20_000
GOAL_BARE_RATIO = 1.5
GOAL_ERROR_LEVEL = 256


# --- processes ------------------------------------------------------------------------------

def machine_cpu_busy() -> float:
    """Busy CPU-seconds of the whole machine so far (all cores), from /proc/stat."""
    parts = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(x) for x in parts]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / CLK_TCK


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def own_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# --- the bare relay (runs as its own process: ``relay.py --bare-relay URL``) ----------------

async def _bare_relay(upstream: str) -> None:
    """The floor: upstream bytes are written to the client as they come, nothing else."""
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with session.post(upstream + request.path, data=body, headers=HEADERS) as up:
            resp = web.StreamResponse(status=up.status, headers={
                "Content-Type": up.headers.get("Content-Type", "text/event-stream")})
            await resp.prepare(request)
            async for piece in up.content.iter_any():
                await resp.write(piece)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=2048)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"bare relay on http://127.0.0.1:{port} -> {upstream}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await session.close()


# --- the load client ------------------------------------------------------------------------

@dataclass(slots=True)
class Sample:
    started: float
    ttft: float | None
    error: str | None


@dataclass
class Round:
    mode: str
    streams: int
    samples: list[Sample] = field(default_factory=list)
    window: float = 0.0  # seconds of the measurement window
    events: int = 0  # client-received SSE events in the window
    relay_cpu: float = 0.0  # CPU-seconds of the relay process in the window
    sim_cpu: float = 0.0
    client_cpu: float = 0.0
    machine_cpu: float = 0.0


class Client:
    """Runs rounds of streaming requests; counts events as they arrive."""

    def __init__(self, tokens: int, request_seconds: float, tools: bool) -> None:
        self.expected_events = tokens + 3  # role chunk, tokens, finish chunk, [DONE]
        self.request_seconds = request_seconds
        self.events = 0
        # An agent's request offers tools, and that is what switches toolmend's mender on.
        self.body = (b'{"model":"sim-model","stream":true,'
                     b'"messages":[{"role":"user","content":"Say something."}]'
                     + (TOOLS if tools else b"") + b"}")
        self.sessions: dict[str, aiohttp.ClientSession] = {}

    def session(self, mode: str) -> aiohttp.ClientSession:
        if mode not in self.sessions:
            self.sessions[mode] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=300, sock_connect=10))
        return self.sessions[mode]

    async def close(self) -> None:
        for s in self.sessions.values():
            await s.close()

    async def stream(self, session: aiohttp.ClientSession, url: str) -> Sample:
        t0 = time.perf_counter()
        ttft: float | None = None
        head = b""
        tail = b""
        end = b""
        n = 0
        try:
            async with session.post(url, data=self.body, headers=HEADERS) as resp:
                if resp.status != 200:
                    await resp.read()
                    return Sample(t0, None, f"HTTP {resp.status}")
                async for piece in resp.content.iter_any():
                    if ttft is None:
                        head += piece
                        if FIRST_CONTENT.search(head):
                            ttft = time.perf_counter() - t0
                            head = b""
                    # a 5-byte tail cannot hold a whole marker, so nothing is counted twice
                    buf = tail + piece
                    k = buf.count(DATA)
                    n += k
                    self.events += k
                    tail = buf[-5:]
                    end = (end + piece)[-len(DONE_TAIL):]
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            return Sample(t0, ttft, f"{e.__class__.__name__}: {e}"[:120])
        if end != DONE_TAIL:
            return Sample(t0, ttft, "no [DONE]")
        if n != self.expected_events:
            return Sample(t0, ttft, f"{n} events, expected {self.expected_events}")
        if ttft is None:
            return Sample(t0, None, "no content")
        return Sample(t0, ttft, None)

    async def run_round(self, mode: str, url: str, streams: int, window: float,
                        relay: Proc | None, sim: Proc) -> Round:
        """``streams`` workers, starts staggered over one request; then a timed window."""
        rnd = Round(mode, streams)
        session = self.session(mode)
        t0 = time.perf_counter()
        ramp = self.request_seconds * (streams - 1) / streams
        win_start = t0 + ramp
        win_end = win_start + window

        async def worker(i: int) -> None:
            await asyncio.sleep(self.request_seconds * i / streams)
            while True:
                s = await self.stream(session, url)
                if s.started >= win_start - 1e-3:
                    rnd.samples.append(s)
                if time.perf_counter() >= win_end:
                    return

        def snapshot() -> tuple[float, int, float, float, float, float]:
            return (time.perf_counter(), self.events, relay.cpu_seconds() if relay else 0.0,
                    sim.cpu_seconds(), own_cpu(), machine_cpu_busy())

        async def measure() -> None:
            await asyncio.sleep(max(0.0, win_start - time.perf_counter()))
            a = snapshot()
            await asyncio.sleep(max(0.0, win_end - time.perf_counter()))
            b = snapshot()
            rnd.window = b[0] - a[0]
            rnd.events = b[1] - a[1]
            rnd.relay_cpu, rnd.sim_cpu, rnd.client_cpu, rnd.machine_cpu = (
                b[2] - a[2], b[3] - a[3], b[4] - a[4], b[5] - a[5])

        await asyncio.gather(measure(), *(worker(i) for i in range(streams)))
        return rnd

    async def warm_up(self, mode: str, url: str, streams: int) -> list[str]:
        session = self.session(mode)
        got = await asyncio.gather(*(self.stream(session, url) for _ in range(streams)))
        return [s.error for s in got if s.error]


# --- statistics and reporting ---------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    v = sorted(values)
    pos = (len(v) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


@dataclass
class ModeResult:
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0
    requests: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    window: float = 0.0
    events: int = 0
    relay_cpu: float = 0.0
    sim_cpu: float = 0.0
    client_cpu: float = 0.0
    machine_cpu: float = 0.0

    def add(self, r: Round) -> None:
        for s in r.samples:
            self.requests += 1
            if s.error:
                self.errors += 1
                self.error_kinds[s.error] = self.error_kinds.get(s.error, 0) + 1
            elif s.ttft is not None:
                self.ttfts.append(s.ttft)
        self.window += r.window
        self.events += r.events
        self.relay_cpu += r.relay_cpu
        self.sim_cpu += r.sim_cpu
        self.client_cpu += r.client_cpu
        self.machine_cpu += r.machine_cpu

    def p(self, q: float) -> float:
        return percentile(self.ttfts, q) * 1000

    @property
    def chunks_per_s(self) -> float:
        return self.events / self.window if self.window else float("nan")

    @property
    def us_per_chunk(self) -> float:
        return self.relay_cpu / self.events * 1e6 if self.events else float("nan")

    @property
    def chunks_per_core(self) -> float:
        return self.events / self.relay_cpu if self.relay_cpu else float("nan")


@dataclass
class LevelResult:
    streams: int
    modes: dict[str, ModeResult]
    rss_mib: dict[str, float]
    warmup_errors: dict[str, int]

    def added(self, mode: str, q: float) -> float:
        return self.modes[mode].p(q) - self.modes["direct"].p(q)


def _f(x: float, digits: int = 2) -> str:
    return "n/a" if x != x else f"{x:,.{digits}f}"


def _signed(x: float) -> str:
    return "n/a" if x != x else f"{x:+.2f}"


def render(levels: list[LevelResult], cfg: argparse.Namespace, started: str,
           load_before: str) -> str:
    out: list[str] = []
    out.append(
        f"Measured {started} by `python bench/relay.py{' --quick' if cfg.quick else ''}`: "
        f"{machine_line()} `toolmend sim --dialect vllm --slots {cfg.slots} --ttft {cfg.ttft} "
        f"--token-delay {cfg.token_delay} --tokens {cfg.tokens}`, `toolmend serve --backend vllm "
        f"--slots {cfg.slots}` with its defaults otherwise; requests "
        f"{'without tools' if cfg.no_tools else 'offer one tool, so the mender is on'} and get "
        f"{cfg.tokens} plain-text tokens back; per level and path "
        f"{cfg.rounds} round(s) with a {cfg.window:g} s window ({cfg.window * 3:g} s at 1 "
        f"stream), paths alternating. Load average before the run: {load_before}. "
        "Sim, relay and client are separate processes on the same 2 cores, and the machine was "
        "shared with other work, so wall-clock numbers are noisy.")
    out.append("")
    out.append("Time to first content chunk, as the client sees it (ms). "
               "Added = through the relay minus direct, same percentile, same run.")
    out.append("")
    out.append("| streams | n (direct / toolmend / bare) | direct p50 | direct p99 "
               "| toolmend added p50 | toolmend added p99 | bare added p50 | bare added p99 |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for lv in levels:
        m = lv.modes
        out.append(
            f"| {lv.streams} | {len(m['direct'].ttfts)} / {len(m['toolmend'].ttfts)} / "
            f"{len(m['bare'].ttfts)} | {_f(m['direct'].p(0.5))} | {_f(m['direct'].p(0.99))} "
            f"| {_signed(lv.added('toolmend', 0.5))} | {_signed(lv.added('toolmend', 0.99))} "
            f"| {_signed(lv.added('bare', 0.5))} | {_signed(lv.added('bare', 0.99))} |")
    out.append("")
    out.append("Throughput and cost. Chunks/s is SSE events received by the client per "
               "wall-clock second with all streams running; CPU is the relay process's own "
               "utime+stime over the same window; chunks per CPU-second is what one core "
               "would sustain. Peak RSS is VmHWM of the relay process after the level.")
    out.append("")
    out.append("| streams | chunks/s direct | chunks/s toolmend | chunks/s bare "
               "| toolmend µs CPU/chunk | bare µs CPU/chunk | toolmend ÷ bare "
               "| toolmend chunks/CPU-s | toolmend peak RSS MiB | bare peak RSS MiB "
               "| errors (direct / toolmend / bare) |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for lv in levels:
        m = lv.modes
        t, b = m["toolmend"], m["bare"]
        ratio = t.us_per_chunk / b.us_per_chunk if b.events and t.events else float("nan")
        errs = " / ".join(f"{m[k].errors + lv.warmup_errors.get(k, 0)}" for k in MODES)
        out.append(
            f"| {lv.streams} | {_f(m['direct'].chunks_per_s, 0)} | {_f(t.chunks_per_s, 0)} "
            f"| {_f(b.chunks_per_s, 0)} | {_f(t.us_per_chunk, 1)} | {_f(b.us_per_chunk, 1)} "
            f"| {_f(ratio)}× | {_f(t.chunks_per_core, 0)} | {_f(lv.rss_mib['toolmend'], 1)} "
            f"| {_f(lv.rss_mib['bare'], 1)} | {errs} |")
    out.append("")
    out.append("CPU in use during the windows (cores; machine = all processes on the box):")
    out.append("")
    out.append("| streams | path | sim | relay | client | machine |")
    out.append("|---:|---|---:|---:|---:|---:|")
    for lv in levels:
        for k in MODES:
            r = lv.modes[k]
            w = r.window or float("nan")
            relay = "–" if k == "direct" else _f(r.relay_cpu / w)
            out.append(f"| {lv.streams} | {k} | {_f(r.sim_cpu / w)} | {relay} "
                       f"| {_f(r.client_cpu / w)} | {_f(r.machine_cpu / w)} |")
    out.append("")
    out.extend(goal_lines(levels))
    kinds = {(lv.streams, k): lv.modes[k].error_kinds for lv in levels for k in MODES
             if lv.modes[k].error_kinds}
    if kinds:
        out.append("")
        out.append("Errors seen: " + "; ".join(
            f"{k} at {s} streams: " + ", ".join(f"{n}× {e}" for e, n in v.items())
            for (s, k), v in kinds.items()))
    return "\n".join(out) + "\n"


def goal_lines(levels: list[LevelResult]) -> list[str]:
    by = {lv.streams: lv for lv in levels}
    lines = ["Goals:", ""]

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    if GOAL_LEVEL in by:
        lv = by[GOAL_LEVEL]
        a50, a99 = lv.added("toolmend", 0.5), lv.added("toolmend", 0.99)
        lines.append(f"- p50 added TTFT ≤ {GOAL_P50_ADDED_MS:g} ms at {GOAL_LEVEL} streams: "
                     f"{_signed(a50)} ms, {verdict(a50 <= GOAL_P50_ADDED_MS)}")
        lines.append(f"- p99 added TTFT ≤ {GOAL_P99_ADDED_MS:g} ms at {GOAL_LEVEL} streams: "
                     f"{_signed(a99)} ms, {verdict(a99 <= GOAL_P99_ADDED_MS)}")
    events = sum(lv.modes["toolmend"].events for lv in levels)
    cpu = sum(lv.modes["toolmend"].relay_cpu for lv in levels)
    bare_events = sum(lv.modes["bare"].events for lv in levels)
    bare_cpu = sum(lv.modes["bare"].relay_cpu for lv in levels)
    busiest = max(levels, key=lambda lv: lv.streams) if levels else None
    if busiest is not None and busiest.modes["toolmend"].relay_cpu:
        # A relay's capacity shows at its busiest: there one wake-up serves many events, as it
        # would on a core of its own at full load. Light levels pay a wake-up per event.
        per_core = busiest.modes["toolmend"].chunks_per_core
        lines.append(f"- ≥ {GOAL_CHUNKS_PER_CORE:,} relayed chunks/s on one core (chunks per "
                     f"toolmend CPU-second at the busiest level, {busiest.streams} streams): "
                     f"{per_core:,.0f}, {verdict(per_core >= GOAL_CHUNKS_PER_CORE)}")
    if events and cpu and bare_events and bare_cpu:
        ratio = (cpu / events) / (bare_cpu / bare_events)
        lines.append(f"- CPU per chunk ≤ {GOAL_BARE_RATIO:g}× the bare relay (DESIGN.md; all "
                     "levels together): "
                     f"{cpu / events * 1e6:.1f} µs vs {bare_cpu / bare_events * 1e6:.1f} µs "
                     f"= {ratio:.2f}×, {verdict(ratio <= GOAL_BARE_RATIO)}")
    if GOAL_ERROR_LEVEL in by:
        lv = by[GOAL_ERROR_LEVEL]
        n = lv.modes["toolmend"].errors + lv.warmup_errors.get("toolmend", 0)
        lines.append(f"- no errors at {GOAL_ERROR_LEVEL} streams through toolmend: {n} errors "
                     f"in {lv.modes['toolmend'].requests} requests, {verdict(n == 0)}")
    cores = os.cpu_count() or 1
    starved: list[str] = []
    for lv in levels:
        busy = [k for k in MODES if lv.modes[k].window
                and lv.modes[k].machine_cpu / lv.modes[k].window >= 0.9 * cores]
        if busy:
            starved.append(str(lv.streams) if len(busy) == len(MODES)
                           else f"{lv.streams} ({', '.join(busy)})")
    if starved:
        lines.append("")
        lines.append(f"Caveat: the machine's {cores} cores were at least 90% busy (all "
                     f"processes, from /proc/stat) during the rounds at {', '.join(starved)} "
                     "streams. There the latency numbers mostly show CPU starvation shared with "
                     "other work, which hurts the process that needs more CPU most; the "
                     "CPU-per-chunk numbers are the robust ones.")
    return lines


def machine_line() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}.")


def write_section(body: str, path: Path = BENCHMARKS) -> None:
    replace_section(f"{SECTION}\n\n{body}", path,
                    new_file=f"# Benchmarks\n\nMachine: {machine_line()}\n")


# --- driver ---------------------------------------------------------------------------------

async def run(cfg: argparse.Namespace) -> list[LevelResult]:
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    load_before = load_average()
    log_dir = Path(tempfile.mkdtemp(prefix="toolmend-bench-"))
    py = sys.executable
    procs: list[Proc] = []
    client: Client | None = None
    keep_logs = True
    try:
        sim = Proc("sim", [py, "-c", "from toolmend.server.cli import main; main()", "sim",
                           "--dialect", "vllm", "--port", "0", "--slots", str(cfg.slots),
                           "--ttft", str(cfg.ttft), "--token-delay", str(cfg.token_delay),
                           "--tokens", str(cfg.tokens)], log_dir)
        procs.append(sim)
        # toolmend is told the sim's real slot count, so its fair queue never holds a request
        # back: this measures the relay, not queueing (that has its own benchmark).
        tm = Proc("toolmend", [py, "-c", "from toolmend.server.cli import main; main()", "serve",
                               "--upstream", sim.url, "--backend", "vllm",
                               "--slots", str(cfg.slots), "--host", "127.0.0.1", "--port", "0"],
                  log_dir)
        procs.append(tm)
        bare = Proc("bare", [py, str(SELF), "--bare-relay", sim.url],
                    log_dir)
        procs.append(bare)
        relays: dict[str, Proc | None] = {"direct": None, "toolmend": tm, "bare": bare}
        urls = {"direct": sim.url, "toolmend": tm.url, "bare": bare.url}
        urls = {k: v + "/v1/chat/completions" for k, v in urls.items()}
        request_seconds = cfg.ttft + cfg.tokens * cfg.token_delay
        client = Client(cfg.tokens, request_seconds, not cfg.no_tools)
        print(f"# sim {sim.url}  toolmend {tm.url} (pid {tm.pid})  bare {bare.url} "
              f"(pid {bare.pid})  logs {log_dir}", file=sys.stderr, flush=True)
        results: list[LevelResult] = []
        for streams in cfg.levels:
            modes = {k: ModeResult() for k in MODES}
            warm = {}
            for k in MODES:
                warm[k] = len(await client.warm_up(k, urls[k], streams))
            window = cfg.window * (3 if streams == 1 else 1)
            for i in range(cfg.rounds):
                order = MODES[i % 3:] + MODES[:i % 3]
                for k in order:
                    r = await client.run_round(k, urls[k], streams, window, relays[k], sim)
                    modes[k].add(r)
                    print(f"# {streams:>3} streams round {i + 1} {k:<8} "
                          f"n={len(r.samples):<5} chunks/s={r.events / r.window:>8,.0f} "
                          f"relay cpu={r.relay_cpu:.2f}s", file=sys.stderr, flush=True)
            rss = {"toolmend": tm.peak_rss_mib(), "bare": bare.peak_rss_mib()}
            results.append(LevelResult(streams, modes, rss, warm))
        table = render(results, cfg, started, load_before)
        print(table)
        if not cfg.no_write:
            write_section(table)
            print(f"# wrote the {SECTION!r} section of {BENCHMARKS}", file=sys.stderr)
        keep_logs = any(m.errors for lv in results for m in lv.modes.values()) or any(
            n for lv in results for n in lv.warmup_errors.values())
        return results
    finally:
        if client is not None:
            await client.close()
        for p in reversed(procs):
            p.stop()
        if not keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)


# --- tool-less chat: the undeclared-call check off and on ---------------------------------------

async def run_undeclared(cfg: argparse.Namespace) -> dict[int, dict[str, list[Round]]]:
    """Both toolmend processes in front of one sim, requests without tools, rounds alternating
    between them; returns the rounds per level and path."""
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    load_before = load_average()
    log_dir = Path(tempfile.mkdtemp(prefix="toolmend-bench-"))
    py = sys.executable
    procs: list[Proc] = []
    client: Client | None = None
    keep_logs = True
    try:
        sim = Proc("sim", [py, "-c", "from toolmend.server.cli import main; main()", "sim",
                           "--dialect", "vllm", "--port", "0", "--slots", str(cfg.slots),
                           "--ttft", str(cfg.ttft), "--token-delay", str(cfg.token_delay),
                           "--tokens", str(cfg.tokens)], log_dir)
        procs.append(sim)
        relays: dict[str, Proc] = {}
        for mode, value in zip(UNDECLARED_MODES, ("pass", "refuse"), strict=True):
            relays[mode] = Proc(f"toolmend-{mode}", [
                py, "-c", "from toolmend.server.cli import main; main()", "serve", "--upstream",
                sim.url, "--backend", "vllm", "--slots", str(cfg.slots), "--host", "127.0.0.1",
                "--port", "0", "--undeclared-calls", value], log_dir)
            procs.append(relays[mode])
        urls = {k: p.url + "/v1/chat/completions" for k, p in relays.items()}
        client = Client(cfg.tokens, cfg.ttft + cfg.tokens * cfg.token_delay, tools=False)
        results: dict[int, dict[str, list[Round]]] = {}
        for streams in cfg.levels:
            results[streams] = {k: [] for k in UNDECLARED_MODES}
            for k in UNDECLARED_MODES:
                await client.warm_up(k, urls[k], streams)
            window = cfg.window * (3 if streams == 1 else 1)
            for i in range(cfg.rounds):
                order = UNDECLARED_MODES if i % 2 == 0 else UNDECLARED_MODES[::-1]
                for k in order:
                    r = await client.run_round(k, urls[k], streams, window, relays[k], sim)
                    results[streams][k].append(r)
                    print(f"# {streams:>3} streams round {i + 1} check {k:<3} "
                          f"n={len(r.samples):<5} µs/chunk={_per_chunk([r]):.1f}",
                          file=sys.stderr, flush=True)
        table = render_undeclared(results, cfg, started, load_before)
        cost = pipeline_cost(cfg.tokens, 300 if cfg.quick else 1000, 6 if cfg.quick else 10)
        table += "\n" + render_pipeline_cost(cost, cfg.tokens, 300 if cfg.quick else 1000)
        busiest = max(results)
        relay_off = percentile([_per_chunk([r]) for r in results[busiest]["off"]], 0.5)
        extra = (min(cost["on"]) - min(cost["off"])) / (cfg.tokens + 3)
        table += (f"\nSet against the whole relay's CPU per chunk with the check off at "
                  f"{busiest} streams ({relay_off:.1f} µs, median round), that in-process "
                  f"difference is {extra / relay_off * 100:+.1f}%.\n")
        print(table)
        if not cfg.no_write:
            replace_section(f"{UNDECLARED_SECTION}\n\n{table}", BENCHMARKS,
                            new_file=f"# Benchmarks\n\nMachine: {machine_line()}\n")
            print(f"# wrote the {UNDECLARED_SECTION!r} section of {BENCHMARKS}",
                  file=sys.stderr)
        keep_logs = any(s.error for lv in results.values() for rs in lv.values()
                        for r in rs for s in r.samples)
        return results
    finally:
        if client is not None:
            await client.close()
        for p in reversed(procs):
            p.stop()
        if not keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)


def pipeline_cost(tokens: int, requests: int, repeats: int) -> dict[str, list[float]]:
    """CPU µs per request of the in-process work one streamed tool-less reply costs, check off
    (``undeclared_calls = "pass"``) and on, in ``repeats`` alternating runs of ``requests``."""
    import orjson

    from toolmend.parsers.stream import StreamPipeline
    from toolmend.pipeline.mending import ChatMending, record
    from toolmend.server.config import Settings
    from toolmend.server.context import RequestContext

    def event(delta: dict[str, object], finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1,
            "model": "sim-model", "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                               "finish_reason": finish}]}) + b"\n\n"

    events = [event({"role": "assistant", "content": ""})]
    events += [event({"content": f"tok{i} "}) for i in range(tokens)]
    events += [event({}, "stop"), b"data: " + orjson.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1,
        "model": "sim-model", "choices": [], "usage": {"prompt_tokens": 9,
                                                       "completion_tokens": tokens}}) + b"\n\n",
        b"data: [DONE]\n\n"]
    body = {"model": "sim-model", "stream": True,
            "messages": [{"role": "user", "content": "Say something."}]}
    settings = {"off": Settings(undeclared_calls="pass"), "on": Settings()}

    def serve(mode: str) -> None:
        ctx = RequestContext("req", "/v1/chat/completions", 0.0)
        mending = ChatMending.for_request(settings[mode], body, ctx, None, "vllm")
        mender = mending.mender() if mending else None
        pipeline = StreamPipeline(False, mender)
        for ev in events:
            pipeline.feed(ev)
        pipeline.finish()
        record(ctx, mender)

    out: dict[str, list[float]] = {k: [] for k in UNDECLARED_MODES}
    for k in UNDECLARED_MODES:  # warm-up
        for _ in range(requests // 10):
            serve(k)
    for i in range(repeats):
        for k in UNDECLARED_MODES if i % 2 == 0 else UNDECLARED_MODES[::-1]:
            t0 = time.process_time()
            for _ in range(requests):
                serve(k)
            out[k].append((time.process_time() - t0) / requests * 1e6)
    return out


def render_pipeline_cost(cost: dict[str, list[float]], tokens: int, requests: int) -> str:
    chunks = tokens + 3
    best = {k: min(v) for k, v in cost.items()}
    spread = max(max(v) / min(v) - 1 for v in cost.values())
    ratio = best["on"] / best["off"]
    return (
        "In-process, without sockets: the per-request work of one streamed tool-less reply of "
        f"{tokens} tokens ({chunks} events: mending chosen, stream pipeline over every event, "
        f"finish, recording), {requests} requests per run, runs alternating; CPU time "
        "(time.process_time), µs per request, best run and all runs.\n\n"
        "| check | best µs/request | µs/chunk | all runs (µs/request) |\n"
        "|---|---:|---:|---|\n"
        + "".join(f"| {k} (`--undeclared-calls {v}`) | {best[k]:.1f} | {best[k] / chunks:.3f} "
                  f"| {', '.join(f'{x:.1f}' for x in cost[k])} |\n"
                  for k, v in zip(UNDECLARED_MODES, ("pass", "refuse"), strict=True))
        + f"\nOn ÷ off (best runs): {ratio:.3f}×, {best['on'] - best['off']:+.1f} µs per "
        f"request ({(best['on'] - best['off']) / chunks:+.3f} µs per chunk); runs of one "
        f"path spread {spread * 100:.1f}%: "
        f"{'within noise' if abs(ratio - 1) <= spread else 'beyond noise'}.\n")


def _per_chunk(rounds: list[Round]) -> float:
    """Relay CPU per client-received chunk, in µs, over the given rounds together."""
    events = sum(r.events for r in rounds)
    return sum(r.relay_cpu for r in rounds) / events * 1e6 if events else float("nan")


def _ttft(rounds: list[Round], q: float) -> float:
    return percentile([s.ttft for r in rounds for s in r.samples
                       if s.ttft is not None and not s.error], q) * 1000


def render_undeclared(results: dict[int, dict[str, list[Round]]], cfg: argparse.Namespace,
                      started: str, load_before: str) -> str:
    out = [
        f"Measured {started} by `python bench/relay.py --undeclared"
        f"{' --quick' if cfg.quick else ''}`: {machine_line()} `toolmend sim --dialect vllm "
        f"--slots {cfg.slots} --ttft {cfg.ttft} --token-delay {cfg.token_delay} --tokens "
        f"{cfg.tokens}`; two `toolmend serve --backend vllm --slots {cfg.slots}` in front of "
        "it, one with `--undeclared-calls pass` (check off: no mender on tool-less requests, "
        "as before the check) and one with the default `refuse` (check on); requests without "
        f"tools, {cfg.tokens} plain-text tokens back; {cfg.rounds} round(s) per level and "
        f"path with a {cfg.window:g} s window ({cfg.window * 3:g} s at 1 stream), the two "
        f"paths alternating. Load average before the run: {load_before}. The machine was "
        "shared with other work.",
        "",
        "| streams | n (off / on) | TTFT p50 off / on (ms) | TTFT p99 off / on (ms) "
        "| median µs CPU/chunk off | median µs CPU/chunk on | on ÷ off (medians) "
        "| per-round µs/chunk off | per-round µs/chunk on | errors (off / on) |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    verdicts: list[str] = []
    for streams, by in results.items():
        off, on = by["off"], by["on"]
        per_round = {k: [_per_chunk([r]) for r in by[k]] for k in UNDECLARED_MODES}
        # medians of the rounds: one round starved by the neighbours does not decide
        ratio = percentile(per_round["on"], 0.5) / percentile(per_round["off"], 0.5)
        errors = {k: sum(1 for r in by[k] for s in r.samples if s.error)
                  for k in UNDECLARED_MODES}
        n = {k: sum(1 for r in by[k] for s in r.samples if not s.error)
             for k in UNDECLARED_MODES}
        out.append(
            f"| {streams} | {n['off']} / {n['on']} | {_f(_ttft(off, 0.5))} / "
            f"{_f(_ttft(on, 0.5))} | {_f(_ttft(off, 0.99))} / {_f(_ttft(on, 0.99))} "
            f"| {_f(percentile(per_round['off'], 0.5), 1)} "
            f"| {_f(percentile(per_round['on'], 0.5), 1)} | {_f(ratio)}× "
            f"| {', '.join(_f(x, 1) for x in per_round['off'])} "
            f"| {', '.join(_f(x, 1) for x in per_round['on'])} "
            f"| {errors['off']} / {errors['on']} |")
        # noise: how far apart the rounds of one path are; the check is within noise when
        # the two paths are no further apart than that
        spread = max((max(v) / min(v) - 1) for v in per_round.values() if v and min(v) > 0)
        within = abs(ratio - 1) <= spread
        verdicts.append(f"{streams} streams: on ÷ off = {_f(ratio)}×, rounds of one path "
                        f"{spread * 100:.0f}% apart: "
                        f"{'within noise' if within else 'beyond noise'}")
    out.append("")
    out.append("Within noise means the check's cost (on ÷ off − 1) is no larger than the spread "
               "between rounds of the same path (largest ÷ smallest − 1): " +
               "; ".join(verdicts) + ".")
    return "\n".join(out) + "\n"


# --- cost per request (F) and per chunk (c), per front ---------------------------------------

_MSG = b'"messages":[{"role":"user","content":"Say something."}]'
#: front -> (path, body, bytes that end a complete reply). Every body offers a tool, so the
#: mender runs, as it does for an agent.
FC_FRONTS: dict[str, tuple[str, bytes, bytes]] = {
    "chat": ("/v1/chat/completions",
             b'{"model":"sim-model","stream":true,' + _MSG + TOOLS + b"}", b"data: [DONE]"),
    "ollama": ("/api/chat", b'{"model":"sim-model","stream":true,' + _MSG + TOOLS + b"}",
               b'"done":true'),
    "anthropic": ("/v1/messages",
                  b'{"model":"sim-model","stream":true,"max_tokens":1024,' + _MSG
                  + b',"tools":[{"name":"get_weather","description":"Current weather",'
                  b'"input_schema":{"type":"object","properties":{"city":{"type":"string"}},'
                  b'"required":["city"]}}]}', b"message_stop"),
    "responses": ("/v1/responses",
                  b'{"model":"sim-model","stream":true,"input":"Say something.",'
                  b'"tools":[{"type":"function","name":"get_weather","description":"Current '
                  b'weather","parameters":{"type":"object","properties":{"city":{"type":'
                  b'"string"}},"required":["city"]}}]}', b"response.completed"),
}


@dataclass
class FcRound:
    requests: int = 0
    cpu: float = 0.0
    errors: int = 0

    @property
    def us_per_request(self) -> float:
        return self.cpu / self.requests * 1e6 if self.requests else float("nan")


async def _fc_round(session: aiohttp.ClientSession, url: str, body: bytes, end: bytes,
                    relay: Proc, window: float) -> FcRound:
    """16 closed-loop streams; the relay's CPU over the window per request completed in it."""
    rnd = FcRound()
    stop_at = 0.0
    counting = False

    async def one() -> None:
        async with session.post(url, data=body, headers=HEADERS) as r:
            raw = await r.read()
            if r.status != 200 or end not in raw:
                rnd.errors += 1
                return
        if counting:
            rnd.requests += 1

    async def worker() -> None:
        while True:  # at least one request each: a slow round still counts some
            await one()
            if time.perf_counter() >= stop_at:
                return

    # the window opens once every stream is running and closes when the last one ends, so
    # every request counted had all of its CPU inside the window
    workers = [asyncio.create_task(one()) for _ in range(FC_STREAMS)]
    await asyncio.gather(*workers)
    counting = True
    # from here: a relay slower than the window (LiteLLM's replies of 250 tokens at 16 streams)
    # still gets its window after the first round of requests, instead of none
    stop_at = time.perf_counter() + window
    cpu0 = relay.cpu_seconds()
    await asyncio.gather(*(worker() for _ in range(FC_STREAMS)))
    rnd.cpu = relay.cpu_seconds() - cpu0
    return rnd


def _fit(cpu10: float, cpu250: float) -> tuple[float, float]:
    lo, hi = FC_LENGTHS
    c = (cpu250 - cpu10) / (hi - lo)
    return cpu10 - lo * c, c


async def run_fc(cfg: argparse.Namespace) -> dict[str, tuple[float, float]]:
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    load_before = load_average()
    log_dir = Path(tempfile.mkdtemp(prefix="toolmend-bench-fc-"))
    py = sys.executable
    procs: list[Proc] = []
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                    timeout=aiohttp.ClientTimeout(total=120))
    ok = False
    try:
        relays: dict[tuple[str, int], Proc] = {}
        for n in FC_LENGTHS:
            sim = Proc(f"sim{n}", [py, "-m", "toolmend", "sim", "--dialect", "vllm", "--port",
                                   "0", "--slots", "512", "--ttft", str(cfg.ttft),
                                   "--token-delay", str(cfg.token_delay), "--tokens", str(n)],
                       log_dir)
            procs.append(sim)
            tm = Proc(f"toolmend{n}", [py, "-m", "toolmend", "serve", "--upstream", sim.url,
                                       "--backend", "vllm", "--slots", "512", "--port", "0"],
                      log_dir)
            bare = Proc(f"bare{n}", [py, str(SELF), "--bare-relay", sim.url], log_dir)
            procs += [tm, bare]
            relays[("toolmend", n)] = tm
            relays[("bare", n)] = bare
            relays[("sim", n)] = sim
        if cfg.litellm:
            _start_litellm(relays, log_dir, procs)
        paths = ["bare"]
        for front, (path, body, end) in FC_FRONTS.items():
            if cfg.fronts and front not in cfg.fronts:
                continue
            async with session.post(relays[("toolmend", 10)].url + path, data=body,
                                    headers=HEADERS) as r:
                raw = await r.read()
            if r.status == 200 and end in raw:
                paths.append(front)
            else:
                print(f"# front {front}: not served ({r.status}); left out", file=sys.stderr)
        if cfg.litellm:
            paths += await _litellm_paths(session, relays)
        cpu: dict[tuple[str, int], list[float]] = {}
        errors = 0
        path_errors: dict[str, int] = {}
        for i in range(cfg.rounds):
            order = paths[i % len(paths):] + paths[:i % len(paths)]
            for p in order:
                for n in FC_LENGTHS:
                    if p == "bare":
                        relay = relays[("bare", n)]
                        path, body, end = FC_FRONTS["chat"]
                    elif p in LITELLM_PATHS:
                        relay, path, body, end = _litellm_target(p, n, relays)
                    else:
                        relay = relays[("toolmend", n)]
                        path, body, end = FC_FRONTS[p]
                        # Messages requires max_tokens, and the sim writes that many tokens
                        body = body.replace(b'"max_tokens":1024', b'"max_tokens":%d' % n)
                    r = await _fc_round(session, relay.url + path, body, end, relay, cfg.window)
                    errors += r.errors
                    path_errors[p] = path_errors.get(p, 0) + r.errors
                    cpu.setdefault((p, n), []).append(r.us_per_request)
                    print(f"# round {i + 1} {p:<10} n={n:<4} requests={r.requests:<5} "
                          f"cpu/request={r.us_per_request:8.0f} us errors={r.errors}",
                          file=sys.stderr, flush=True)
        fits = {p: _fit(percentile(cpu[(p, 10)], 0.5), percentile(cpu[(p, 250)], 0.5))
                for p in paths}
        ours = {p: f for p, f in fits.items() if p not in LITELLM_PATHS}
        table = render_fc(ours, cpu, cfg, started, load_before,
                          sum(e for p, e in path_errors.items() if p not in LITELLM_PATHS))
        table = with_litellm_subsection(table, fits, cpu, path_errors, cfg, started)
        print(table)
        if not cfg.no_write:
            replace_section(table)
            print(f"# wrote the {FC_SECTION!r} section of {BENCHMARKS}", file=sys.stderr)
        ok = errors == 0
        return fits
    finally:
        await session.close()
        for p in reversed(procs):
            p.stop()
        if ok:
            shutil.rmtree(log_dir, ignore_errors=True)


def render_fc(fits: dict[str, tuple[float, float]], cpu: dict[tuple[str, int], list[float]],
              cfg: argparse.Namespace, started: str, load_before: str, errors: int) -> str:
    bare_f, bare_c = fits["bare"]
    lines = [
        FC_SECTION, "",
        f"Measured {started} by `python bench/relay.py --fc` ({machine_line()}; load before "
        f"{load_before}). Method: the relay process's CPU time per request for replies of "
        f"{FC_LENGTHS[0]} and {FC_LENGTHS[1]} tokens at {FC_STREAMS} closed-loop streams "
        f"(sim: {cfg.ttft * 1000:g} ms to first token, {cfg.token_delay * 1000:g} ms per "
        f"token), fitted as `cpu(n) = F + n·c`; medians over {cfg.rounds} rounds, paths "
        "alternating. Every request offers a tool, so toolmend's mender runs. The bare relay "
        "relays chat completions; each toolmend front is compared with it.", "",
        "| path | F per request (µs) | c per chunk (µs) | F / bare | c / bare "
        f"| cpu({FC_LENGTHS[0]}) µs | cpu({FC_LENGTHS[1]}) µs |",
        "|---|---|---|---|---|---|---|",
    ]
    for p, (f, c) in fits.items():
        name = "bare aiohttp relay" if p == "bare" else f"toolmend, {p} front"
        ratio_f = "1" if p == "bare" else f"{f / bare_f:.2f}×"
        ratio_c = "1" if p == "bare" else f"{c / bare_c:.2f}×"
        lines.append(f"| {name} | {f:,.0f} | {c:.1f} | {ratio_f} | {ratio_c} "
                     f"| {percentile(cpu[(p, 10)], 0.5):,.0f} "
                     f"| {percentile(cpu[(p, 250)], 0.5):,.0f} |")
    lines += ["", f"Goals (DESIGN.md): F within {GOAL_FC_FIXED}× and c within {GOAL_FC_CHUNK}× "
              "the bare relay's, on every front."]
    for p, (f, c) in fits.items():
        if p == "bare":
            continue
        okf, okc = f <= GOAL_FC_FIXED * bare_f, c <= GOAL_FC_CHUNK * bare_c
        lines.append(f"- {p}: F {f / bare_f:.2f}× ({'met' if okf else 'NOT met'}), "
                     f"c {c / bare_c:.2f}× ({'met' if okc else 'NOT met'})")
    lines += ["", f"Errors (non-200 or incomplete replies): {errors}.", ""]
    return "\n".join(lines)


# --- LiteLLM on the same load (--fc --litellm) ----------------------------------------------

LITELLM_SUBSECTION = "### LiteLLM on the same load"
#: path name -> the toolmend front whose request it sends
LITELLM_PATHS = {"litellm-chat": "chat", "litellm-anthropic": "anthropic",
                 "litellm-responses": "responses"}


def _start_litellm(relays: dict[tuple[str, int], Proc], log_dir: Path,
                   procs: list[Proc]) -> None:
    """One LiteLLM proxy per reply length, in front of the same sim as that length's toolmend.

    Imported here: LiteLLM's venv is made (once) only when the benchmark is asked for it.
    """
    from litellm_proxy import LiteLLMProc

    for n in FC_LENGTHS:
        proc = LiteLLMProc(f"litellm{n}", relays[("sim", n)].url, log_dir)
        procs.append(proc)
        relays[("litellm", n)] = proc


def _litellm_target(p: str, n: int, relays: dict[tuple[str, int], Proc]
                    ) -> tuple[Proc, str, bytes, bytes]:
    path, body, end = FC_FRONTS[LITELLM_PATHS[p]]
    return (relays[("litellm", n)], path,
            body.replace(b'"max_tokens":1024', b'"max_tokens":%d' % n), end)


async def _litellm_paths(session: aiohttp.ClientSession,
                         relays: dict[tuple[str, int], Proc]) -> list[str]:
    """LiteLLM's paths that answer a complete reply; one that does not is left out, said why."""
    served = []
    for p in LITELLM_PATHS:
        for n in FC_LENGTHS:
            relay, path, body, end = _litellm_target(p, n, relays)
            async with session.post(relay.url + path, data=body, headers=HEADERS) as r:
                raw = await r.read()
            if r.status != 200 or end not in raw:
                print(f"# {p} (n={n}): no complete reply ({r.status}: {raw[:300]!r}); left out",
                      file=sys.stderr)
                break
        else:
            served.append(p)
    return served


def _litellm_version() -> str:
    from litellm_proxy import LITELLM_VERSION

    return LITELLM_VERSION


def render_litellm(fits: dict[str, tuple[float, float]],
                   cpu: dict[tuple[str, int], list[float]], path_errors: dict[str, int],
                   cfg: argparse.Namespace, started: str) -> str:
    """LiteLLM's rows against the bare relay's and toolmend's on the same front, same run.

    Self-contained (its own date; the same run's bare and toolmend numbers in the reading):
    a later run of toolmend's rows alone keeps this subsection as it is.
    """
    bare_f, bare_c = fits["bare"]
    lines = [
        LITELLM_SUBSECTION, "",
        f"Measured {started} by `python bench/relay.py --fc --litellm`: LiteLLM's proxy "
        f"(`litellm[proxy]=={_litellm_version()}`, one worker; its defaults, except that the "
        "remote cost map and telemetry are off, as offline, and that it starts without a master "
        "key, as toolmend runs here) in front of the same sims as a `hosted_vllm/` model, on the "
        "same load, its paths alternating with toolmend's and the bare relay's; its process's "
        "CPU time measured as toolmend's. Its chat path relays chat completions; its Messages "
        "and Responses paths bridge to the sim's chat completions. Medians over "
        f"{cfg.rounds} rounds; the ratios are to the bare relay and toolmend of the same run, "
        "whose numbers the reading gives (the table above may come from another run).", "",
        "| path | F per request (µs) | c per chunk (µs) | F / bare | c / bare "
        "| c / toolmend's same front | cpu(10) µs | cpu(250) µs | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p, front in LITELLM_PATHS.items():
        if p not in fits:
            lines.append(f"| LiteLLM, {front} | not served | | | | | | | |")
            continue
        f, c = fits[p]
        tm = fits.get(front)
        vs_tm = f"{c / tm[1]:.1f}×" if tm else "n/a"
        lines.append(f"| LiteLLM, {front} ({FC_FRONTS[front][0]}) | {f:,.0f} | {c:,.1f} "
                     f"| {f / bare_f:.2f}× | {c / bare_c:.2f}× | {vs_tm} "
                     f"| {percentile(cpu[(p, FC_LENGTHS[0])], 0.5):,.0f} "
                     f"| {percentile(cpu[(p, FC_LENGTHS[1])], 0.5):,.0f} "
                     f"| {path_errors.get(p, 0)} |")
    lines += ["", _litellm_reading(fits)]
    return "\n".join(lines) + "\n"


#: LiteLLM's CPU per chunk (µs) on an earlier measurement on these machines, for comparison
LITELLM_EARLIER_C = {"chat": 845, "anthropic": 936, "responses": 1123}


def _litellm_reading(fits: dict[str, tuple[float, float]]) -> str:
    """The numbers above in words: LiteLLM against toolmend on the same front, and the bare
    relay."""
    parts = []
    for p, front in LITELLM_PATHS.items():
        if p not in fits or front not in fits:
            continue
        (f, c), (tf, tc) = fits[p], fits[front]
        parts.append(f"on {front}, LiteLLM costs {c:,.0f} µs per chunk (toolmend "
                     f"{tc:,.0f}: {c / tc:.1f}×) and {f:,.0f} µs per request (toolmend "
                     f"{tf:,.0f}: {f / tf:.1f}×)")
    if not parts:
        return "Reading: no LiteLLM path answered with complete replies."
    earlier = ", ".join(f"{LITELLM_EARLIER_C[front]:,} µs on {front}"
                        for front in LITELLM_PATHS.values())
    return ("Reading: " + "; ".join(parts) + f". In the same run the bare relay cost "
            f"{fits['bare'][1]:.0f} µs per chunk and {fits['bare'][0]:,.0f} µs per request. "
            "An earlier measurement on "
            f"these machines had LiteLLM at {earlier} per chunk.")


def with_litellm_subsection(table: str, fits: dict[str, tuple[float, float]],
                            cpu: dict[tuple[str, int], list[float]],
                            path_errors: dict[str, int], cfg: argparse.Namespace,
                            started: str) -> str:
    """The section: this run's table, then the subsections BENCHMARKS.md already has under it
    (earlier runs and their readings, written by hand: a new run must not drop them), then
    LiteLLM's subsection at its end: this run's rows with ``--litellm``; without, the one the
    file has (dated by its own run), so that a run of toolmend's rows alone keeps LiteLLM's."""
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else ""
    kept: list[str] = []
    old_litellm = ""
    head = text.find("\n" + FC_SECTION + "\n")
    if head >= 0:
        body = text[head + 1:]
        nxt = body.find("\n## ", 1)
        body = body[:nxt + 1] if nxt > 0 else body
        for sub in body.split("\n### ")[1:]:
            sub = "### " + sub.rstrip("\n") + "\n"
            if sub.startswith(LITELLM_SUBSECTION + "\n"):
                old_litellm = sub
            else:
                kept.append(sub)
    sub = render_litellm(fits, cpu, path_errors, cfg, started) if cfg.litellm else old_litellm
    parts = [table.rstrip("\n") + "\n", *kept]
    if sub:
        parts.append(sub.rstrip("\n") + "\n")
    return "\n".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="short run (about a minute)")
    ap.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")],
                    default=list(LEVELS), help="concurrent streams, comma-separated")
    ap.add_argument("--rounds", type=int, help="rounds per path and level (default 3; quick 1)")
    ap.add_argument("--window", type=float,
                    help="seconds of measurement per round (default 4; quick 2; ×3 at 1 stream)")
    ap.add_argument("--slots", type=int, default=512)
    ap.add_argument("--ttft", type=float, default=0.02)
    ap.add_argument("--token-delay", type=float, default=0.005)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--no-tools", action="store_true",
                    help="send requests without tools (toolmend then only watches for "
                         "structured calls, see --undeclared)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    ap.add_argument("--undeclared", action="store_true",
                    help="tool-less chat through toolmend with the undeclared-call check off "
                         "and on, side by side")
    ap.add_argument("--fc", action="store_true",
                    help="fit CPU per request (F) and per chunk (c) for each front against the "
                         "bare relay")
    ap.add_argument("--litellm", action="store_true",
                    help="with --fc: LiteLLM's proxy (pinned, in a cached venv of its own) on "
                         "the same load, its chat, Messages and Responses paths")
    ap.add_argument("--fronts", type=lambda s: s.split(","), default=None,
                    help="with --fc: only these fronts (comma-separated: "
                         f"{','.join(FC_FRONTS)}); the table is then printed, not written")
    ap.add_argument("--bare-relay", metavar="UPSTREAM", help=argparse.SUPPRESS)
    cfg = ap.parse_args(argv)
    if cfg.rounds is None:
        cfg.rounds = 1 if cfg.quick else 3
    if cfg.window is None:
        cfg.window = 2.0 if cfg.quick else 4.0
    if cfg.litellm and not cfg.fc:
        ap.error("--litellm goes with --fc")
    if cfg.fronts:
        unknown = sorted(set(cfg.fronts) - set(FC_FRONTS))
        if unknown or not cfg.fc:
            ap.error(f"--fronts goes with --fc and takes {','.join(FC_FRONTS)}")
        cfg.no_write = True  # a partial table must not replace the section of record
    return cfg


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop  # same loop as `toolmend serve`, for the client and the bare relay

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if cfg.bare_relay:
        asyncio.run(_bare_relay(cfg.bare_relay.rstrip("/")))
        return
    if cfg.undeclared:
        asyncio.run(run_undeclared(cfg))
        return
    if cfg.fc:
        asyncio.run(run_fc(cfg))
        return
    asyncio.run(run(cfg))


if __name__ == "__main__":
    main()
