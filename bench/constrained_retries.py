"""Constrained retries on a real backend: how many invalid tool calls reach the agent, fixed.

The workload (``tests/real/retry_workload.py``): four tools with real constraints (patterns
for times and airport codes, dates with ``format: date`` and a pattern, integer and number
ranges, enums, a nested object, ``additionalProperties: false``, e-mail, UUID and date-time
formats, a nullable ``anyOf``), a few-shot history of four earlier calls (~1,600 prompt tokens)
and one question per request, phrased the way people write (``7pm``, ``February 30th``,
``from Tokyo to Berlin``), streamed, ``tool_choice: auto``, temperature 0.7, the request's
number as its seed, the same body on every path.

Paths, side by side on the same requests:

* ``direct``: the backend itself;
* ``retry``: through toolmend, ``--on-invalid retry --max-retries 1``: one retry, constrained
  by the tool's schema translated for the backend's grammar engine;
* ``retry2``: the same with ``--max-retries 2``: a second attempt whose correction quotes the
  validator's message and the value, for what the grammar cannot hold;
* ``best2``/``best3``: one retry asking ``n: 2``/``n: 3`` choices (``--retry-samples``); the
  first valid wins (llama-server allows ``n`` up to its slot count: 2 here).

Every delivered call is judged by ``retry_workload.judge`` (the jsonschema library with format
functions of its own, not toolmend's). Per path: valid calls, invalid calls delivered, clear
errors (toolmend's ``invalid_tool_call`` event), replies without a call, retries (toolmend's
``retry`` comments), the retry success rate (retried requests that delivered a valid call) and
the latency a retry adds: the request's time through toolmend minus the same seeded request's
time direct, for the retried requests, next to the direct time (one generation).

Run ``python bench/constrained_retries.py`` (llama-server: ~1 h on 2 shared cores for 240
requests); ``--backends vllm`` for vLLM; ``--requests``/``--paths`` to size it. It prints the
tables and replaces the ``## Constrained retries`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from _common import BENCHMARKS, replace_section

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.real import stacks  # noqa: E402
from tests.real.retry_workload import judge, request  # noqa: E402
from toolmend.server.app import build_app, start_server  # noqa: E402
from toolmend.server.config import Settings  # noqa: E402

SECTION = "## Constrained retries"
PATHS = {"direct": None, "retry": (1, 1), "retry2": (2, 1), "best2": (1, 2), "best3": (1, 3)}


@dataclass
class Outcome:
    seed: int
    path: str
    verdict: str  # valid | invalid | error | nocall | failed
    retries: int
    elapsed: float
    detail: str = ""


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, verdict: str) -> int:
        return sum(1 for o in self.outcomes if o.verdict == verdict)


async def stream(url: str, body: dict[str, Any]) -> tuple[list[dict[str, str]], int, str | None,
                                                           float]:
    """Send one streamed request; the calls it delivered, toolmend's retry comments, the error
    event's message (if any) and the time to the end of the stream."""
    calls: dict[int, dict[str, str]] = {}
    retries = 0
    error = None
    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as s, \
            s.post(url + "/v1/chat/completions", json=body) as r:
        if "text/event-stream" not in r.headers.get("Content-Type", ""):
            doc = await r.json(content_type=None)
            return [], 0, json.dumps(doc)[:200], time.perf_counter() - started
        buf = b""
        async for piece in r.content.iter_any():
            buf += piece
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.startswith(b": toolmend retry "):
                    retries += 1
                elif line.startswith(b"data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"].get("message", "error")
                    for c in event.get("choices") or ():
                        for tc in (c.get("delta") or {}).get("tool_calls") or ():
                            slot = calls.setdefault(tc.get("index", 0),
                                                    {"name": "", "arguments": ""})
                            fn = tc.get("function") or {}
                            slot["name"] += fn.get("name") or ""
                            slot["arguments"] += fn.get("arguments") or ""
    return [calls[i] for i in sorted(calls)], retries, error, time.perf_counter() - started


async def one(url: str, seed: int, path: str) -> Outcome:
    try:
        calls, retries, error, elapsed = await stream(url, request(seed))
    except (aiohttp.ClientError, TimeoutError) as e:
        return Outcome(seed, path, "failed", 0, 0.0, repr(e))
    if error is not None:
        return Outcome(seed, path, "error", retries, elapsed, error)
    if not calls:
        return Outcome(seed, path, "nocall", retries, elapsed)
    problems = [p for c in calls if (p := judge(c["name"], c["arguments"])) is not None]
    if problems:
        return Outcome(seed, path, "invalid", retries, elapsed, problems[0])
    return Outcome(seed, path, "valid", retries, elapsed)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


def table(backend: str, tallies: dict[str, Tally]) -> str:
    direct = {o.seed: o for o in tallies["direct"].outcomes} if "direct" in tallies else {}
    one_generation = statistics.median(o.elapsed for o in direct.values()) if direct else 0.0
    rows = ["| path | requests | valid calls | invalid delivered | clear errors | no call | "
            "retries | retried requests | retry success | added latency median / p90 (s) | "
            "added / one generation (median) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for path, t in tallies.items():
        retried = [o for o in t.outcomes if o.retries]
        fixed = sum(1 for o in retried if o.verdict == "valid")
        added = [o.elapsed - direct[o.seed].elapsed for o in retried if o.seed in direct]
        rate = f"{fixed}/{len(retried)} ({100 * fixed / len(retried):.0f}%)" if retried else "-"
        lat = (f"{statistics.median(added):.2f} / {_pct(added, 0.9):.2f}" if added else "-")
        ratio = (f"{statistics.median(added) / one_generation:.2f}x"
                 if added and one_generation else "-")
        rows.append(f"| {backend} {path} | {len(t.outcomes)} | {t.count('valid')} | "
                    f"{t.count('invalid')} | {t.count('error')} | {t.count('nocall')} | "
                    f"{sum(o.retries for o in t.outcomes)} | {len(retried)} | {rate} | {lat} | "
                    f"{ratio} |")
    rows.append(f"\nOne generation (median time of a request direct): {one_generation:.2f} s.")
    return "\n".join(rows)


def reasons(tallies: dict[str, Tally]) -> str:
    out = []
    for path, t in tallies.items():
        counted = Counter(_reason(o) for o in t.outcomes if o.verdict in ("invalid", "error"))
        if counted:
            top = "; ".join(f"{n}× {r}" for r, n in counted.most_common(6))
            out.append(f"- {path}: {top}")
    return "\n".join(out)


def _reason(o: Outcome) -> str:
    text = o.detail
    for marker in ("does not match", "is not a", "is greater than", "is less than",
                   "is not one of", "not JSON", "is too long", "Additional properties",
                   "is a required property", "is not of type", "no tool call"):
        if marker in text:
            where = text.split(":", 1)[0] if text.startswith("/") else ""
            if "at /" in text:
                where = text.split("at ", 1)[1].split(":", 1)[0]
            return f"{where} {marker}".strip()
    return text[:60]


async def run_backend(backend: str, server_url: str, seeds: list[int], paths: list[str],
                      concurrency: int, progress: Path) -> dict[str, Tally]:
    runners = []
    urls: dict[str, str] = {}
    for path in paths:
        if PATHS[path] is None:
            urls[path] = server_url
            continue
        retries, samples = PATHS[path]  # type: ignore[misc]
        app = build_app(Settings(on_invalid="retry", max_retries=retries,
                                 retry_samples=samples, log_requests=False), [server_url])
        runner, port = await start_server(app, "127.0.0.1", 0)
        runners.append(runner)
        urls[path] = f"http://127.0.0.1:{port}"
    tallies = {p: Tally() for p in paths}
    gate = asyncio.Semaphore(concurrency)

    async def per_seed(seed: int) -> None:
        async with gate:
            order = paths if seed % 2 == 0 else list(reversed(paths))  # drift hits all alike
            for path in order:
                o = await one(urls[path], seed, path)
                tallies[path].outcomes.append(o)
                with progress.open("a") as f:
                    f.write(json.dumps({"backend": backend, "t": time.time(), **o.__dict__})
                            + "\n")

    try:
        await asyncio.gather(*(per_seed(s) for s in seeds))
    finally:
        for r in runners:
            await r.cleanup()
    for t in tallies.values():
        t.outcomes.sort(key=lambda o: o.seed)
    return tallies


def start(backend: str, threads: int = 0) -> stacks.Server:
    if backend == "llama-server":
        # 2 slots of 4,096 tokens: the few-shot prompts are ~1,600
        return stacks.start_llama_server(slots=2, n_ctx=8192,
                                         extra_args=("-t", str(threads)) if threads else ())
    return stacks.start_vllm(max_model_len=4096)


def from_progress(path: Path, backend: str, paths: list[str]) -> tuple[dict[str, Tally], float]:
    """The tallies of the seeds every path answered, and the minutes the run took (from the
    file's own times: first and last line written)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["backend"] == backend and r["path"] in paths]
    times = [r.pop("t") for r in rows]
    by_seed: dict[int, dict[str, Outcome]] = {}
    for r in rows:
        r.pop("backend")
        by_seed.setdefault(r["seed"], {})[r["path"]] = Outcome(**r)
    tallies = {p: Tally() for p in paths}
    for seed in sorted(by_seed):
        if set(by_seed[seed]) == set(paths):
            for p in paths:
                tallies[p].outcomes.append(by_seed[seed][p])
    return tallies, (max(times) - min(times)) / 60 if times else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="llama-server")
    p.add_argument("--requests", type=int, default=240)
    p.add_argument("--first-seed", type=int, default=1000)
    p.add_argument("--paths", default="direct,retry,retry2,best2")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--url", help="an already running backend (one --backends) instead of "
                                 "starting one")
    p.add_argument("--progress", default="/tmp/toolmend-constrained-retries.jsonl")
    p.add_argument("--threads", type=int, default=0,
                   help="llama-server threads (-t); 1 keeps decoding steady on a shared machine")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--from-progress", action="store_true",
                   help="make the tables from the --progress file of an earlier (or cut) run: "
                        "the seeds every path answered")
    p.add_argument("--compare", default="",
                   help="with --from-progress: a second table of these paths, over the seeds "
                        "they all answered (e.g. direct,retry,retry2,best2 on a subset)")
    p.add_argument("--note", default="", help="a paragraph added to the section (set-up)")
    args = p.parse_args()
    paths = args.paths.split(",")
    seeds = list(range(args.first_seed, args.first_seed + args.requests))
    sections = []
    for backend in args.backends.split(","):
        started = time.monotonic()
        if args.from_progress:
            tallies, minutes = from_progress(Path(args.progress), backend, paths)
            seeds = sorted({o.seed for o in tallies[paths[0]].outcomes})
        else:
            server = None if args.url else start(backend, args.threads)
            url = args.url or server.url  # type: ignore[union-attr]
            try:
                tallies = asyncio.run(run_backend(backend, url, seeds, paths,
                                                  args.concurrency, Path(args.progress)))
            finally:
                if server is not None:
                    server.stop()
            minutes = (time.monotonic() - started) / 60
        text = table(backend, tallies)
        why = reasons(tallies)
        print(text, "\n", why, f"\n({minutes:.0f} min)", flush=True)
        sections.append(f"### {backend}\n\n{text}\n\nWhat the invalid and refused calls got "
                        f"wrong (judge's or toolmend's first error):\n\n{why}\n\n"
                        f"{len(seeds)} requests per path, {minutes:.0f} min.\n")
        if args.from_progress and args.compare:
            compared, _ = from_progress(Path(args.progress), backend, args.compare.split(","))
            n = len(next(iter(compared.values())).outcomes)
            text = table(backend, compared)
            print(text, "\n", reasons(compared), flush=True)
            sections.append(f"Second attempt against best-of-n, on the first {n} requests "
                            f"(every path answered them):\n\n{text}\n\n"
                            f"{reasons(compared)}\n")
    if args.no_write:
        return
    body = (f"{SECTION}\n\n"
            f"`python bench/constrained_retries.py --backends {args.backends} --requests "
            f"{args.requests} --paths {args.paths}` on {platform.machine()}, "
            f"{platform.python_version()}, real Gemma 3 270M (Q4_K_M), 2 shared cores. Each "
            "request is streamed with `tool_choice: auto`, temperature 0.7 and its own seed, "
            "the same body on every path; calls are judged by the jsonschema library with "
            "format functions written in the benchmark (not toolmend's). Paths: `retry` = one "
            "retry constrained by the translated schema; `retry2` = up to two, the second "
            "quoting the validator's message and value; `best2` = one retry with `n: 2`. "
            "Added latency: the request through toolmend minus the same seeded request direct, "
            "over the retried requests." + (f" {args.note}" if args.note else "") + "\n\n"
            + "\n".join(sections))
    replace_section(body, BENCHMARKS)


if __name__ == "__main__":
    main()
