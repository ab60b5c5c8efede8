"""Real backends: what toolmend costs in front of real llama-server and real vLLM.

On a real backend generation dominates: tens of milliseconds per token on these CPUs, against
tens of microseconds of relay work per chunk. So toolmend must be invisible here: the TTFT it
adds should sit inside the run-to-run noise of direct requests, and tokens/s should not move.

What is measured
----------------
The backends are the project's own real stacks (``tests/real/stacks.py``, same set-up as the
real-stack tests): llama.cpp's llama-server with 2 slots, and vLLM's CPU build, both serving
the Gemma 3 270M model. toolmend runs as its own process (``toolmend serve``) with everything
on: the requests offer tools, so the tool-call mender watches every stream; usage is asked
upstream; fair queue sized from the backend; access log on.

Each agent sends streaming chat requests one after another (an agent loop), with
``ignore_eos`` so every reply is exactly ``--tokens`` long. Levels: 1 agent and ``--agents``
concurrent agents. Paths alternate per round (direct, toolmend; then toolmend, direct) so
drift in the shared machine's load hits both alike. Recorded per request:

* **TTFT**: request sent → first chunk with non-empty ``content``, at the client;
* **decode tok/s** of one stream: output tokens after the first / time from first to last;
* **total tok/s**: all output tokens of a round / its wall time (what the backend delivered).

"noise" is the spread (max − min) of the per-round TTFT medians of the direct path: an added
TTFT smaller than that is not distinguishable from the backend's own variation.

Run ``python bench/real_backends.py`` (about 12 minutes once the stacks are built; set-up of a
fresh vLLM is much longer, see tests/real); ``--backends llama-server`` for one. It prints a
markdown table and replaces the ``## Real backends`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
from _common import BENCHMARKS, free_port, replace_section

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.real import stacks  # noqa: E402  (the repo root must be importable first)

SECTION = "## Real backends"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


@dataclass
class Sample:
    ttft: float
    tokens: int
    decode_tps: float


@dataclass
class Round:
    path: str
    agents: int
    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0
    errors: int = 0

    @property
    def total_tps(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall if self.wall else 0.0


class Toolmend:
    """``toolmend serve`` in its own process, so its work does not share the client's loop."""

    def __init__(self, upstream: str, log_dir: Path) -> None:
        self.port = free_port()
        self.log = (log_dir / f"toolmend-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from toolmend.server.cli import main; main()", "serve",
             "--upstream", upstream, "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"

    async def ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"toolmend exited {self.proc.returncode}")
                try:
                    async with s.get(self.url + "/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError("toolmend not ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def one_request(session: aiohttp.ClientSession, url: str, tokens: int,
                      agent: int) -> Sample:
    body = {"model": "gemma", "messages": [{"role": "user", "content": PROMPT}],
            "tools": TOOLS, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = 0.0
    chunks = 0
    usage_tokens = 0
    async with session.post(url, data=orjson.dumps(body),
                            headers={"Content-Type": "application/json",
                                     "X-Agent-Id": f"agent-{agent}"}) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
        buf = b""
        async for piece in r.content.iter_any():
            buf += piece
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                doc = orjson.loads(line[6:])
                if doc.get("usage"):
                    usage_tokens = doc["usage"].get("completion_tokens") or usage_tokens
                for c in doc.get("choices") or ():
                    if (c.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        chunks += 1
    if not first:
        raise RuntimeError("no content")
    n = usage_tokens or chunks
    span = last - first
    return Sample(first - t0, n, (n - 1) / span if span > 0 else 0.0)


async def run_round(url: str, path: str, agents: int, per_agent: int, tokens: int) -> Round:
    rnd = Round(path, agents)
    timeout = aiohttp.ClientTimeout(total=600)
    # A new connection per request on both paths: llama-server closes idle keep-alive
    # connections, and a pooled one it has closed fails the next request (a client artefact,
    # not a server error). Loopback connects cost well under a millisecond.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        async def agent(i: int) -> None:
            for _ in range(per_agent):
                try:
                    rnd.samples.append(await one_request(session, url, tokens, i))
                except (aiohttp.ClientError, RuntimeError, TimeoutError) as e:
                    print(f"#   error: {e}", file=sys.stderr)
                    rnd.errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(agent(i) for i in range(agents)))
        rnd.wall = time.perf_counter() - t0
    return rnd


def p50(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def bench_backend(name: str, server: stacks.Server, cfg: argparse.Namespace,
                        log_dir: Path) -> list[str]:
    tm = Toolmend(server.url, log_dir)
    try:
        await tm.ready()
        urls = {"direct": server.v1 + "/chat/completions",
                "toolmend": tm.url + "/v1/chat/completions"}
        for path in ("direct", "toolmend"):  # warm both: prompt cache, connections, compile
            await run_round(urls[path], path, 1, 1, cfg.tokens)
        rows = []
        for agents in (1, cfg.agents):
            rounds: dict[str, list[Round]] = {"direct": [], "toolmend": []}
            for i in range(cfg.rounds):
                order = ("direct", "toolmend") if i % 2 == 0 else ("toolmend", "direct")
                for path in order:
                    r = await run_round(urls[path], path, agents, cfg.per_agent, cfg.tokens)
                    rounds[path].append(r)
                    print(f"# {name} {agents} agent(s) round {i + 1} {path:<8} "
                          f"ttft p50 {p50([s.ttft for s in r.samples]) * 1000:.0f} ms "
                          f"total {r.total_tps:.1f} tok/s errors {r.errors}",
                          file=sys.stderr, flush=True)
            rows.append(render_level(name, agents, rounds))
        return rows
    finally:
        tm.stop()


def render_level(name: str, agents: int, rounds: dict[str, list[Round]]) -> str:
    def stats(path: str) -> tuple[float, float, float, float, int]:
        rs = rounds[path]
        ttfts = [s.ttft for r in rs for s in r.samples]
        decode = [s.decode_tps for r in rs for s in r.samples]
        total = statistics.mean(r.total_tps for r in rs)
        medians = [p50([s.ttft for s in r.samples]) for r in rs if r.samples]
        noise = max(medians) - min(medians) if medians else float("nan")
        return p50(ttfts), p50(decode), total, noise, sum(r.errors for r in rs)

    d_ttft, d_dec, d_tot, d_noise, d_err = stats("direct")
    t_ttft, t_dec, t_tot, _, t_err = stats("toolmend")
    added = (t_ttft - d_ttft) * 1000
    verdict = "within noise" if abs(added) <= d_noise * 1000 else "ABOVE noise"
    return (f"| {name} | {agents} | {d_ttft * 1000:,.0f} | {t_ttft * 1000:,.0f} | "
            f"{added:+,.1f} ({verdict}) | {d_noise * 1000:,.0f} | {d_dec:.1f} / {t_dec:.1f} | "
            f"{d_tot:.1f} / {t_tot:.1f} | {d_err + t_err} |")


def write_section(body: str, path: Path = BENCHMARKS) -> None:
    replace_section(f"{SECTION}\n\n{body}", path)


async def run(cfg: argparse.Namespace) -> str:
    started = time.strftime("%Y-%m-%d")
    log_dir = Path(tempfile.mkdtemp(prefix="toolmend-bench-real-"))
    rows: list[str] = []
    notes: list[str] = []
    for name in cfg.backends:
        t0 = time.monotonic()
        server = stacks.STARTERS[name]()
        notes.append(f"{name} ready in {server.started_in:.0f} s "
                     f"(set-up and start {time.monotonic() - t0:.0f} s)")
        try:
            rows += await bench_backend(name, server, cfg, log_dir)
        finally:
            server.stop()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    header = (
        f"`python bench/real_backends.py` — {started}, {os.cpu_count()} cores (shared), "
        f"Python {platform.python_version()}; Gemma 3 270M Q4_K_M (vLLM: converted to bf16). "
        f"Streaming chat requests offering one tool, {cfg.tokens} output tokens each "
        f"(`ignore_eos`), {cfg.per_agent} sequential requests per agent, {cfg.rounds} "
        f"alternating rounds per path. TTFT p50 in ms; tok/s as direct / through toolmend. "
        f"Load average at the end: {load}. " + "; ".join(notes) + ". With several agents "
        "the TTFT includes waiting for a slot (llama-server has 2; vLLM batches them all).\n\n"
        "| backend | agents | TTFT direct | TTFT toolmend | added | noise (direct rounds) "
        "| decode tok/s per stream | total tok/s | errors |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    return header + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--backends", nargs="+", default=["llama-server", "vllm"],
                    choices=["llama-server", "vllm"])
    ap.add_argument("--agents", type=int, default=4, help="the 'several agents' level")
    ap.add_argument("--per-agent", type=int, default=3, help="sequential requests per agent")
    ap.add_argument("--tokens", type=int, default=48, help="output tokens per request")
    ap.add_argument("--rounds", type=int, default=4, help="rounds per path and level")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    cfg = ap.parse_args(argv)
    table = asyncio.run(run(cfg))
    print(table)
    if not cfg.no_write:
        write_section(table)
        print(f"# wrote the {SECTION!r} section of {BENCHMARKS}", file=sys.stderr)


if __name__ == "__main__":
    main()
