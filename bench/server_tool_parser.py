"""What bypassing vLLM's tool parser costs: ``server_tool_parser`` trust vs bypass, side by side.

In bypass mode (the default on vLLM) toolmend asks for the reply as raw text and does the work
vLLM's parsers did: it parses the calls out of ``content`` and re-splits the ``reasoning``
field, so reasoning deltas are parsed instead of relayed untouched; a non-streaming request is
fetched as a stream and folded. This measures whether that makes a request more expensive.

Two parts:

* **toolmend's CPU per request, in process** (always): the real vLLM replies recorded in
  ``fixtures/vllm/reasoning.json`` (the same reply in the two shapes vLLM gives it: parsed, for
  ``tool_choice: "auto"``; raw, for ``"none"``) go through the exact objects the proxy uses
  (``ChatMending`` with default settings, ``StreamPipeline``; ``fold_stream`` and the
  non-streaming mender), one upstream event per read. Best of 5 runs of 200 requests each.
* **the real server** (``--real URL`` of a vLLM started as ``tests/real/stacks.py`` starts it,
  or ``--real start``): two ``toolmend serve`` processes in front of it, one per mode,
  alternating, streamed and not; wall time per request at the client and the toolmend
  process's CPU per request (``/proc/<pid>/stat``), medians over the rounds. Direct requests in
  the two shapes show vLLM's own side.

Run ``python bench/server_tool_parser.py [--real URL|start] [--write]``; ``--write`` replaces the
``## Bypassing the server's tool parser`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from _common import BENCHMARKS, CLK_TCK, free_port, replace_section

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.real import stacks  # noqa: E402
from tests.real.helpers import ASK, TOOLS, literal  # noqa: E402
from tests.real.reasoning_cases import MEANT  # noqa: E402
from toolmend.parsers.mender import feed_whole, fold_chunks  # noqa: E402
from toolmend.parsers.stream import StreamPipeline  # noqa: E402
from toolmend.pipeline.mending import ChatMending  # noqa: E402
from toolmend.pipeline.whole_reply import fold_stream  # noqa: E402
from toolmend.server.config import Settings  # noqa: E402
from toolmend.server.context import RequestContext  # noqa: E402

SECTION = "## Bypassing the server's tool parser"
RECORDED = json.loads((ROOT / "fixtures" / "vllm" / "reasoning.json").read_text())
MODEL = "gemma-3-270m"
#: a longer thinking reply for the real-server part: about 600 characters of reasoning
LONG = ("<think>The user asks for the weather in Bergen. " + " ".join(
    f"Step {i}: the forecast tool needs a city name, and Bergen is a city in Norway."
    for i in range(1, 8)) + f"</think>\n\n{MEANT}")


# --- part A: toolmend's own CPU ----------------------------------------------------------------

def _sse(steps: list[dict[str, Any]]) -> list[bytes]:
    out = []
    for step in steps:
        chunk = {"id": "chatcmpl-rec", "object": "chat.completion.chunk", "created": 1,
                 "model": MODEL, "choices": [{"index": 0, "logprobs": None, **step}]}
        out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    out.append(b"data: " + orjson.dumps({"id": "chatcmpl-rec", "object": "chat.completion.chunk",
                                         "created": 1, "model": MODEL, "choices": [],
                                         "usage": {"prompt_tokens": 241,
                                                   "completion_tokens": 90}}) + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


def _mending(setting: str, stream: bool) -> ChatMending:
    body = {"model": "gemma", "messages": ASK, "tools": TOOLS, "stream": stream}
    ctx = RequestContext("bench", "/v1/chat/completions", 0.0)
    return ChatMending(Settings(server_tool_parser=setting), body, ctx, {}, "vllm")


def _stream_once(setting: str, events: list[bytes]) -> int:
    m = _mending(setting, True)
    p = StreamPipeline(False, m.mender())
    n = 0
    for ev in events:
        n += len(p.feed(ev))
    return n + len(p.finish())


def _whole_once(setting: str, raw: bytes) -> int:
    m = _mending(setting, False)
    if m.whole_as_stream:
        obj = fold_stream(raw)
    else:
        obj = orjson.loads(raw)
    choice = obj["choices"][0]
    mender = m.mender()
    chunks, _ = feed_whole(mender, choice["message"], choice.get("finish_reason"), MODEL)
    return len(orjson.dumps(fold_chunks(choice["message"], chunks)))


def _best_us(fn: Any, *args: Any, n: int = 200, runs: int = 5) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.process_time()
        for _ in range(n):
            fn(*args)
        best = min(best, (time.process_time() - t0) / n)
    return best * 1e6


def part_a() -> list[str]:
    rows = ["| reply (recorded on vLLM 0.32) | chunks trust / bypass | streamed: trust µs | "
            "bypass µs | ratio | whole: trust µs | bypass µs | ratio |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    ratios_s: list[float] = []
    ratios_w: list[float] = []
    for name, case in RECORDED["cases"].items():
        trust_ev = _sse(case["trust_stream"])
        bypass_ev = _sse(case["bypass_stream"])
        trust_json = orjson.dumps({"id": "c", "object": "chat.completion", "created": 1,
                                   "model": MODEL,
                                   "choices": [{"index": 0, **case["trust_whole"]}]})
        bypass_raw = b"".join(bypass_ev)
        s_t = _best_us(_stream_once, "trust", trust_ev)
        s_b = _best_us(_stream_once, "auto", bypass_ev)
        w_t = _best_us(_whole_once, "trust", trust_json)
        w_b = _best_us(_whole_once, "auto", bypass_raw)
        ratios_s.append(s_b / s_t)
        ratios_w.append(w_b / w_t)
        rows.append(f"| {name} | {len(trust_ev) - 2} / {len(bypass_ev) - 2} | {s_t:,.0f} | "
                    f"{s_b:,.0f} | {s_b / s_t:.2f} | {w_t:,.0f} | {w_b:,.0f} | "
                    f"{w_b / w_t:.2f} |")
        print(rows[-1], flush=True)
    rows.append(f"| **geometric mean** | | | | **{_gmean(ratios_s):.2f}** | | | "
                f"**{_gmean(ratios_w):.2f}** |")
    return rows


def _gmean(xs: list[float]) -> float:
    return float(statistics.geometric_mean(xs))


# --- part B: the real server -------------------------------------------------------------------

def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of one process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_cpu(pid: int) -> float:
    """CPU seconds of every live descendant of ``pid`` (vLLM's engine process and its
    helpers), from /proc."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    total, todo = 0.0, [c for c, pp in parent.items() if pp == pid]
    while todo:
        c = todo.pop()
        try:
            total += proc_cpu(c)
        except OSError:
            continue
        todo += [g for g, pp in parent.items() if pp == c]
    return total


class Toolmend:
    """``toolmend serve`` in its own process, so its CPU can be read from /proc."""

    def __init__(self, upstream: str, setting: str, log_dir: Path) -> None:
        self.port = free_port()
        self.log = (log_dir / f"toolmend-{setting}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from toolmend.server.cli import main; main()", "serve",
             "--upstream", upstream, "--host", "127.0.0.1", "--port", str(self.port),
             "--server-tool-parser", setting, "--no-log-requests"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)

    async def ready(self, timeout: float = 60) -> None:
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


async def _bias(s: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with s.post(url + "/tokenize", json={"model": "gemma", "prompt": "<think></think>",
                                               "add_special_tokens": False}) as r:
        return {str(t): 100 for t in (await r.json())["tokens"]}


async def _one(s: aiohttp.ClientSession, base: str, text: str, bias: dict[str, int],
               stream: bool, shape: dict[str, Any]) -> float:
    body = {"model": "gemma", "messages": ASK, "tools": TOOLS, "max_tokens": 300,
            "temperature": 0, "structured_outputs": {"regex": literal(text)},
            "logit_bias": bias, "stream": stream, **shape}
    t0 = time.perf_counter()
    async with s.post(base + "/v1/chat/completions", json=body) as r:
        raw = await r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {raw[:200]!r}")
    return time.perf_counter() - t0


async def part_b(url: str, rounds: int, per: int, vllm_pid: int) -> list[str]:
    texts = {"drafted call (issue 13)": RECORDED["cases"]["drafted_call_then_call"]["text"],
             "long thinking, then a call": LONG}
    log_dir = Path(tempfile.mkdtemp(prefix="toolmend-bench-stp-"))
    procs = {m: Toolmend(url, m, log_dir) for m in ("trust", "auto")}
    rows = ["| reply | way | wall s, direct vLLM auto / none | wall s, toolmend trust / bypass "
            "| toolmend CPU ms | vLLM API server CPU ms | toolmend + API server CPU ms | "
            "vLLM engine CPU s |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    try:
        for p in procs.values():
            await p.ready()
        timeout = aiohttp.ClientTimeout(total=900)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            bias = await _bias(s, url)
            for label, text in texts.items():
                for stream in (True, False):
                    wall: dict[str, list[float]] = {k: [] for k in
                                                    ("direct-auto", "direct-none", "trust",
                                                     "auto")}
                    # CPU summed over all rounds, then per request (10 ms clock ticks)
                    cpu = {"trust": 0.0, "auto": 0.0}
                    vcpu = {"trust": 0.0, "auto": 0.0}
                    ecpu = {"trust": 0.0, "auto": 0.0}
                    for r in range(rounds):
                        order = ["trust", "auto"] if r % 2 == 0 else ["auto", "trust"]
                        for mode in order:
                            p = procs[mode]
                            c0, v0, e0 = p.cpu(), proc_cpu(vllm_pid), children_cpu(vllm_pid)
                            for _ in range(per):
                                wall[mode].append(await _one(s, p.url, text, bias, stream, {}))
                            cpu[mode] += p.cpu() - c0
                            vcpu[mode] += proc_cpu(vllm_pid) - v0
                            ecpu[mode] += children_cpu(vllm_pid) - e0
                        for shape in ("auto", "none"):
                            wall[f"direct-{shape}"].append(await _one(
                                s, url, text, bias, stream,
                                {"tool_choice": shape} | ({"skip_special_tokens": False}
                                                          if shape == "none" else {})))
                    med = {k: statistics.median(v) for k, v in wall.items()}
                    n = rounds * per
                    tm = {k: v / n * 1e3 for k, v in cpu.items()}
                    vm = {k: v / n * 1e3 for k, v in vcpu.items()}
                    em = {k: v / n for k, v in ecpu.items()}
                    rows.append(
                        f"| {label} | {'streamed' if stream else 'whole'} | "
                        f"{med['direct-auto']:.2f} / {med['direct-none']:.2f} | "
                        f"{med['trust']:.2f} / {med['auto']:.2f} | "
                        f"{tm['trust']:.0f} / {tm['auto']:.0f} | "
                        f"{vm['trust']:.0f} / {vm['auto']:.0f} | "
                        f"{tm['trust'] + vm['trust']:.0f} / {tm['auto'] + vm['auto']:.0f} | "
                        f"{em['trust']:.2f} / {em['auto']:.2f} |")
                    print(rows[-1], flush=True)
    finally:
        for p in procs.values():
            p.stop()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", default="", metavar="URL|start",
                    help="also measure on a real vLLM (its base URL, or 'start' to start one)")
    ap.add_argument("--vllm-pid", type=int, default=0,
                    help="with --real URL: the pid of that vLLM's API server process")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per", type=int, default=2, help="requests per mode per round")
    ap.add_argument("--write", action="store_true", help="replace the section in BENCHMARKS.md")
    args = ap.parse_args()
    load = os.getloadavg()
    a = part_a()
    b: list[str] = []
    server = None
    if args.real:
        url, pid = args.real, args.vllm_pid
        if url == "start":
            server = stacks.start_vllm(ready_timeout=2400)
            url, pid = server.url, server.proc.pid
        if not pid:
            ap.error("--real URL needs --vllm-pid")
        try:
            b = asyncio.run(part_b(url.rstrip("/"), args.rounds, args.per, pid))
        finally:
            if server is not None:
                server.stop()
    section = [
        SECTION, "",
        f"`python bench/server_tool_parser.py{' --real URL' if b else ''} --write` — "
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores (shared; load average "
        f"{load[0]:.1f} at the start), Python {platform.python_version()}. "
        "`server_tool_parser` trust (vLLM's own tool and reasoning parsers) against bypass "
        "(toolmend asks for raw text and parses it; the default on vLLM).", "",
        "toolmend's CPU per request, in process: the real vLLM 0.32 replies recorded in "
        "`fixtures/vllm/reasoning.json` through the proxy's own objects (default settings, "
        "validation on), one upstream event per read; best of 5 × 200 requests. "
        "Whole replies: trust parses vLLM's JSON, bypass folds the stream it asked for.", "",
        *a, "",
    ]
    if b:
        section += [
            f"On the real server (Gemma 3 270M, vLLM 0.32 CPU with `--reasoning-parser qwen3`), "
            f"{args.rounds} alternating rounds × {args.per} requests per mode; wall time at the "
            "client (median); CPU per request (all rounds' total over the requests; trust / "
            "bypass) from /proc, of toolmend's process, of vLLM's API server process (where its "
            "tool and reasoning parsers run) and of vLLM's engine processes (the model):", "",
            *b, ""]
    text = "\n".join(section)
    print(text)
    if args.write:
        replace_section(text, BENCHMARKS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
