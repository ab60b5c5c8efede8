"""Hostile inputs: tool schemas, tool-call arguments and request bodies built to hurt.

    python bench/hostile_inputs.py schemas      # /healthz while hostile schemas arrive; RSS
    python bench/hostile_inputs.py bodies       # 8 concurrent 8 MB bodies of 690,000 keys
    python bench/hostile_inputs.py arguments    # buffering 24-90 MB of arguments; the cap
    python bench/hostile_inputs.py validation   # one call's checks on big schemas and args
    python bench/hostile_inputs.py all --write  # all four; replace the section in BENCHMARKS.md

``--python PATH`` runs toolmend (and the in-process parts) with another interpreter, e.g. the
main checkout's, to measure the code before a change the same way. ``--serve-arg`` passes
options to ``toolmend serve`` (repeatable).

schemas: toolmend in front of ``toolmend sim``. A warm-up of ordinary agent requests (six
tools, 5 KB of schemas), run in rounds of 1,000 until a round grows RSS by under 1%, sets the
baseline RSS. Then for ``--seconds`` two hostile clients
send, one after another, (a) the probe's request: 31 tools of 2,800 properties, 8.2 MB, and (b)
one just under the per-request bound: 4 tools of 2,000 properties, 0.74 MB; the property names
change on every request, so no cache helps. Ordinary requests continue meanwhile, and
``/healthz`` is asked every 20 ms. Reported: /healthz p50/p99/max during the hostile phase,
ordinary requests' latency, every outcome, and RSS (toolmend plus its schema workers) after
the warm-up, at its peak, and 60 s after the hostile requests stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from _common import ROOT, Proc, replace_section

SELF = Path(__file__).resolve()
SECTION = "## Hostile inputs"
MSG = [{"role": "user", "content": "What is the weather in Oslo?"}]


def ordinary_tools() -> list[dict[str, Any]]:
    """Six tools an agent might send, about 5 KB of schemas."""
    def fn(name: str, props: dict[str, Any], required: list[str]) -> dict[str, Any]:
        return {"type": "function", "function": {
            "name": name, "description": f"{name.replace('_', ' ')} for the user",
            "parameters": {"type": "object", "properties": props, "required": required,
                           "additionalProperties": False}}}
    s = {"type": "string"}
    return [
        fn("get_weather", {"city": {**s, "description": "city name"},
                           "days": {"type": "integer", "minimum": 1, "maximum": 14},
                           "unit": {"enum": ["celsius", "fahrenheit"]}}, ["city"]),
        fn("read_file", {"path": {**s, "description": "absolute path"},
                         "start": {"type": "integer"}, "end": {"type": "integer"}}, ["path"]),
        fn("write_file", {"path": s, "content": s, "mode": {"enum": ["w", "a"]}},
           ["path", "content"]),
        fn("search", {"query": s, "limit": {"type": "integer", "maximum": 50},
                      "filters": {"type": "object", "properties": {
                          "lang": s, "after": {**s, "format": "date"}}}}, ["query"]),
        fn("run_command", {"command": s, "cwd": s, "timeout": {"type": "number"},
                           "env": {"type": "object", "additionalProperties": s}}, ["command"]),
        fn("create_event", {"title": s, "date": {**s, "format": "date"},
                            "attendees": {"type": "array", "items": {**s, "format": "email"}},
                            "reminder": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
           ["title", "date"]),
    ]


def wide_tools(tools: int, properties: int) -> bytes:
    """A request body with ``tools`` tools of ``properties`` properties each; every property
    name holds the placeholder ``@@@@`` so each request can vary them in one replace."""
    body = {"messages": MSG, "tools": [
        {"type": "function", "function": {"name": f"tool_{t}", "parameters": {
            "type": "object", "properties": {
                f"p@@@@_{t}_{i:05d}_{'x' * 5}": {
                    "type": "string", "description": f"field {i} of tool {t}",
                    "maxLength": 100 + i}
                for i in range(properties)}}}}
        for t in range(tools)]}
    return json.dumps(body, separators=(",", ":")).encode()


def varied(template: bytes) -> bytes:
    return template.replace(b"@@@@", "".join(random.choices(string.ascii_lowercase,
                                                            k=4)).encode())


def tree_rss_mib(pid: int) -> tuple[float, float]:
    """RSS of ``pid`` and of ``pid`` plus its children (the schema workers), in MiB."""
    def rss(p: int) -> float:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    own = rss(pid)
    return own, own + sum(rss(c) for c in children)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def load_average() -> str:
    return f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"


def start(py: str, log_dir: Path, serve_args: list[str]) -> tuple[Proc, Proc]:
    cli = [py, "-c", "from toolmend.server.cli import main; main()"]
    sim = Proc("sim", [*cli, "sim", "--dialect", "vllm", "--port", "0", "--slots", "64",
                       "--ttft", "0"], log_dir)
    tm = Proc("toolmend", [*cli, "serve", "--upstream", sim.url, "--backend", "vllm",
                           "--slots", "64", "--port", "0", "--no-log-requests", *serve_args],
              log_dir, start_timeout=60)
    return sim, tm


# --- schemas ----------------------------------------------------------------------------------

#: the /healthz prober, a process of its own: measured from the benchmark's own event loop, the
#: time that loop spends building and sending 8 MB bodies was counted as toolmend's latency
HEALTHZ_PROBER = """
import http.client, json, select, sys, time, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
out = []
while not select.select([sys.stdin], [], [], 0.02)[0]:
    t = time.perf_counter()
    conn.request("GET", "/healthz")
    conn.getresponse().read()
    out.append((time.perf_counter() - t) * 1000)
print(json.dumps(out))
"""


async def _healthz(session: aiohttp.ClientSession, url: str, stop: asyncio.Event,
                   out: list[float]) -> None:
    """Ask /healthz every 20 ms from another process until ``stop``; its latencies in ms."""
    del session  # the prober has its own connection
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HEALTHZ_PROBER, url, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE)
    await stop.wait()
    stdout, _ = await proc.communicate(b"stop\n")
    out.extend(json.loads(stdout))


async def _ordinary(session: aiohttp.ClientSession, url: str, stop: asyncio.Event,
                    out: list[float], outcomes: Counter[str], count: int | None = None) -> None:
    tools = ordinary_tools()
    n = 0
    while not stop.is_set() and (count is None or n < count):
        body = {"messages": MSG, "tools": tools, "stream": n % 2 == 0}
        t = time.perf_counter()
        async with session.post(url + "/v1/chat/completions", json=body) as r:
            await r.read()
            outcomes[f"ordinary {r.status}"] += 1
        out.append((time.perf_counter() - t) * 1000)
        n += 1


async def _hostile(session: aiohttp.ClientSession, url: str, stop: asyncio.Event,
                   label: str, template: bytes, outcomes: Counter[str],
                   seconds: list[float]) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        try:
            async with session.post(url + "/v1/chat/completions", data=varied(template),
                                    headers={"Content-Type": "application/json"}) as r:
                raw = await r.read()
                code = ""
                if r.status >= 400:
                    try:
                        code = " " + json.loads(raw)["error"]["code"]
                    except (ValueError, KeyError, TypeError):
                        pass
                outcomes[f"{label} {r.status}{code}"] += 1
        except (TimeoutError, aiohttp.ClientError) as e:
            outcomes[f"{label} {type(e).__name__}"] += 1
        seconds.append(time.perf_counter() - t)


async def bench_schemas(py: str, serve_args: list[str], hostile_s: float, settle_s: float,
                        kinds: tuple[str, ...] = ("probe", "under")) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="toolmend-hostile-"))
    sim, tm = start(py, log_dir, serve_args)
    probe = wide_tools(31, 2800)
    under = wide_tools(4, 2000)
    res: dict[str, Any] = {"load": load_average(), "probe_mb": len(probe) / 1e6,
                           "under_mb": len(under) / 1e6}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=900)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            outcomes: Counter[str] = Counter()
            warm: list[float] = []
            # Warm up until RSS is steady: toolmend keeps bounded state per session and agent
            # (8,192 idle sessions in the fair queue, the identity tracker's fingerprints), and
            # ordinary traffic alone fills it over ~6,000 requests, about 10 MB; a baseline
            # taken before that counts it against the hostile requests.
            res["rss_warm"], res["warm_requests"] = tree_rss_mib(tm.pid), 0
            while True:
                await asyncio.gather(*(_ordinary(session, tm.url, asyncio.Event(), warm,
                                                 outcomes, count=250) for _ in range(4)))
                res["warm_requests"] += 1000
                now = tree_rss_mib(tm.pid)
                steady = now[1] <= res["rss_warm"][1] * 1.01
                res["rss_warm"] = now
                if steady and res["warm_requests"] >= 2000:
                    break
            quiet: list[float] = []
            stop = asyncio.Event()
            task = asyncio.ensure_future(_healthz(session, tm.url, stop, quiet))
            await asyncio.sleep(5)
            stop.set()
            await task
            res["healthz_quiet"] = quiet
            outcomes.clear()
            health: list[float] = []
            ordinary: list[float] = []
            took: dict[str, list[float]] = {"probe": [], "under": []}
            stop = asyncio.Event()
            peak = [res["rss_warm"]]

            async def watch() -> None:
                while not stop.is_set():
                    now = tree_rss_mib(tm.pid)
                    peak[0] = (max(peak[0][0], now[0]), max(peak[0][1], now[1]))
                    await asyncio.sleep(0.5)

            senders = {
                "probe": _hostile(session, tm.url, stop, "probe (8.2 MB, 31 tools)", probe,
                                  outcomes, took["probe"]),
                "under": _hostile(session, tm.url, stop, "under the bound (0.74 MB, 4 tools)",
                                  under, outcomes, took["under"])}
            tasks = [asyncio.ensure_future(c) for c in (
                _healthz(session, tm.url, stop, health),
                _ordinary(session, tm.url, stop, ordinary, outcomes),
                *(senders.pop(k) for k in kinds), watch())]
            for unused in senders.values():
                unused.close()
            await asyncio.sleep(hostile_s)
            stop.set()
            await asyncio.gather(*tasks)
            res.update(healthz=health, ordinary=ordinary, outcomes=dict(outcomes), took=took,
                       rss_peak=peak[0], rss_end=tree_rss_mib(tm.pid))
            await asyncio.sleep(settle_s)
            res["rss_after"] = tree_rss_mib(tm.pid)
            res["settle_s"] = settle_s
    finally:
        tm.stop()
        sim.stop()
    return res


def schemas_table(label: str, r: dict[str, Any]) -> str:
    h, q, o = r["healthz"], r["healthz_quiet"], r["ordinary"]
    warm, peak, after = r["rss_warm"], r["rss_peak"], r["rss_after"]
    lines = [
        f"**{label}** (load {r['load']})\n",
        "| measure | value |", "|---|---:|",
        f"| /healthz quiet p50 / p99 (ms) | {pct(q, 50):.1f} / {pct(q, 99):.1f} |",
        f"| /healthz during hostile requests p50 / p99 / max (ms), n={len(h)} | "
        f"{pct(h, 50):.1f} / {pct(h, 99):.1f} / {max(h, default=float('nan')):.0f} |",
        f"| ordinary requests meanwhile p50 / p99 (ms), n={len(o)} | "
        f"{pct(o, 50):.0f} / {pct(o, 99):.0f} |",
    ]
    for kind, secs in r["took"].items():
        if secs:
            lines.append(f"| {kind} request answered in, p50 / max (s), n={len(secs)} | "
                         f"{pct(secs, 50):.2f} / {max(secs):.2f} |")
    lines += [
        f"| RSS after warm-up ({r.get('warm_requests', 400):,} ordinary requests, until steady): "
        f"toolmend / with workers (MiB) | {warm[0]:.0f} / {warm[1]:.0f} |",
        f"| RSS peak: toolmend / with workers (MiB) | {peak[0]:.0f} / {peak[1]:.0f} |",
        f"| RSS {r['settle_s']:.0f} s after: toolmend / with workers (MiB) | "
        f"{after[0]:.0f} / {after[1]:.0f} |",
        f"| RSS {r['settle_s']:.0f} s after vs after warm-up (toolmend with workers) | "
        f"{(after[1] / warm[1] - 1) * 100:+.1f}% |",
        "", "Outcomes: " + ", ".join(f"{k}: {v}" for k, v in sorted(r["outcomes"].items())),
    ]
    return "\n".join(lines) + "\n"


# --- bodies -----------------------------------------------------------------------------------

def wide_body(keys: int) -> bytes:
    blob = ",".join(f'"k{i:06d}":{i % 10}' for i in range(keys))
    return (b'{"messages":[{"role":"user","content":"hi"}],"stream":true,"metadata_blob":{'
            + blob.encode() + b"}}")


async def bench_bodies(py: str, serve_args: list[str], concurrency: int = 8,
                       keys: int = 690_000) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="toolmend-bodies-"))
    cli = [py, "-c", "from toolmend.server.cli import main; main()"]
    # the sim holds every request 3 s before answering: all of them are in flight at once
    sim = Proc("sim", [*cli, "sim", "--dialect", "vllm", "--port", "0", "--slots", "64",
                       "--ttft", "3"], log_dir)
    tm = Proc("toolmend", [*cli, "serve", "--upstream", sim.url, "--backend", "vllm",
                           "--slots", "64", "--port", "0", "--no-log-requests", *serve_args],
              log_dir, start_timeout=60)
    body = wide_body(keys)
    res: dict[str, Any] = {"load": load_average(), "body_mb": len(body) / 1e6, "keys": keys,
                           "concurrency": concurrency}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
            for _ in range(20):
                async with s.post(tm.url + "/v1/chat/completions",
                                  json={"messages": MSG}) as r:
                    await r.read()
            res["rss_before"] = tree_rss_mib(tm.pid)[0]
            outcomes: Counter[str] = Counter()

            async def one() -> None:
                async with s.post(tm.url + "/v1/chat/completions", data=body,
                                  headers={"Content-Type": "application/json"}) as r:
                    raw = await r.read()
                    code = ""
                    if r.status >= 400:
                        code = " " + json.loads(raw)["error"]["code"]
                    outcomes[f"{r.status}{code}"] += 1

            await asyncio.gather(*(one() for _ in range(concurrency)))
            res["outcomes"] = dict(outcomes)
            res["rss_peak"] = tm.peak_rss_mib()
    finally:
        tm.stop()
        sim.stop()
    return res


def bodies_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    out = ["| code | RSS before (MiB) | peak RSS (MiB) | growth (MiB) | outcomes |",
           "|---|---:|---:|---:|---|"]
    for label, r in rows:
        out.append(f"| {label} | {r['rss_before']:.0f} | {r['rss_peak']:.0f} | "
                   f"{r['rss_peak'] - r['rss_before']:.0f} | "
                   + ", ".join(f"{k}: {v}" for k, v in sorted(r["outcomes"].items())) + " |")
    return "\n".join(out) + "\n"


# --- in-process parts (run under --python as a child, so before/after compare) ----------------

ARGUMENTS_CODE = r'''
import json, sys, time
from toolmend.parsers.mender import ChatMender
import toolmend.parsers.mender as m
tools = [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}]
kw = {"max_argument_chars": 1 << 40} if hasattr(m, "MAX_ARGUMENT_CHARS") else {}
rows = []
piece = "x" * 16384
for mb in (24, 48, 72, 90):
    mender = ChatMender("hermes", tools, **kw)
    mender.feed({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c",
        "type": "function", "function": {"name": "w", "arguments": '{"a": "'}}]}}]})
    delta = {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0,
        "function": {"arguments": piece}}]}}]}
    t = time.perf_counter(); worst = 0.0
    for _ in range(mb * 1_000_000 // len(piece)):
        s = time.perf_counter(); mender.feed(delta); worst = max(worst, time.perf_counter() - s)
    rows.append([mb, time.perf_counter() - t, worst])
capped = None
if kw:
    mender = ChatMender("hermes", tools)
    mender.feed({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c",
        "type": "function", "function": {"name": "w", "arguments": '{"a": "'}}]}}]})
    t = time.perf_counter()
    try:
        while True:
            mender.feed(delta)
    except Exception as e:
        capped = [time.perf_counter() - t, str(e)]
print(json.dumps({"rows": rows, "capped": capped}))
'''

VALIDATION_CODE = r'''
import json, random, string, time
from toolmend.parsers.schemas import compile_tools
from toolmend.parsers.validation import validate_call
def ms(f):
    t = time.perf_counter(); f(); return (time.perf_counter() - t) * 1000
r = random.Random(1)
props = {"p" + "".join(r.choices(string.ascii_lowercase, k=10)) + str(i):
         {"type": "string", "description": "field %d" % i, "maxLength": 100 + i}
         for i in range(2800)}
wide = {"type": "object", "properties": props}
rows = {}
rows["compile one 2,800-property schema (240 KB)"] = ms(lambda: compile_tools(
    [{"type": "function", "function": {"name": "t", "parameters": wide}}], cache=None))
ts = compile_tools([{"type": "function", "function": {"name": "t", "parameters": wide}}])
names = list(props)
few = json.dumps({k: "x" for k in names[:10]})
allok = json.dumps({k: "x" for k in names})
allbad = json.dumps({k: 1 for k in names})
rows["valid call, 10 of 2,800 properties"] = ms(lambda: validate_call("t", few, ts))
rows["valid call, all 2,800 properties"] = ms(lambda: validate_call("t", allok, ts))
rows["invalid call, 2,800 errors"] = ms(lambda: validate_call("t", allbad, ts))
rows["invalid call, 2,800 errors, coercion on"] = ms(
    lambda: validate_call("t", allbad, ts, coerce=True))
nest = {"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}}, "$defs": {"n": {
    "anyOf": [{"type": "array", "items": {"$ref": "#/$defs/n"}},
              {"type": "array", "items": {"$ref": "#/$defs/n"}}, {"type": "integer"}]}}}
tn = compile_tools([{"type": "function", "function": {"name": "n", "parameters": nest}}])
inner = "x"
for _ in range(11):
    inner = [inner]
rows["recursive anyOf, arguments 12 deep"] = ms(
    lambda: validate_call("n", json.dumps({"a": inner}), tn, coerce=True))
free = {"type": "object", "additionalProperties": {"type": "integer"}}
tf = compile_tools([{"type": "function", "function": {"name": "f", "parameters": free}}])
big = {f"k{i}": i for i in range(70_000)}
text = json.dumps(big)
rows[f"valid call of {len(text) // 1000} KB, 70,000 values"] = ms(
    lambda: validate_call("f", text, tf))
big["k69999"] = "x"
bad = json.dumps(big)
rows[f"the same with its last value wrong"] = ms(
    lambda: validate_call("f", bad, tf, coerce=True))
print(json.dumps(rows))
'''


def in_child(py: str, code: str) -> Any:
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=3600,
                         cwd=ROOT, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def arguments_table(rows: list[tuple[str, Any]]) -> str:
    out = ["| code | 24 MB (s) | 48 MB (s) | 72 MB (s) | 90 MB (s) | 90 MB vs 24 MB | "
           "slowest delta (ms) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, r in rows:
        t = [row[1] for row in r["rows"]]
        worst = max(row[2] for row in r["rows"]) * 1000
        out.append(f"| {label} | " + " | ".join(f"{x:.2f}" for x in t)
                   + f" | {t[-1] / t[0]:.1f}x | {worst:.1f} |")
    return "\n".join(out) + "\n"


def validation_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    keys = list(rows[0][1])
    out = ["| check (one call, on the event loop) | " + " | ".join(f"{label} (ms)"
                                                               for label, _ in rows) + " |",
           "|---|" + "---:|" * len(rows)]
    for k in keys:
        out.append(f"| {k} | " + " | ".join(f"{r.get(k, float('nan')):.1f}" for _, r in rows)
                   + " |")
    return "\n".join(out) + "\n"


# --- main -------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=("schemas", "bodies", "arguments", "validation", "all"))
    ap.add_argument("--python", default=sys.executable, help="interpreter to run toolmend with")
    ap.add_argument("--before", metavar="PYTHON", help="also measure with this interpreter "
                    "(e.g. the main checkout's venv), labelled 'before'")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG")
    ap.add_argument("--seconds", type=float, default=30.0, help="hostile phase (schemas)")
    ap.add_argument("--settle", type=float, default=60.0, help="wait before the last RSS")
    ap.add_argument("--hostile", default="probe,under",
                    help="schemas: which hostile senders run (probe, under; 'none' for the "
                         "control: ordinary traffic alone)")
    ap.add_argument("--write", action="store_true", help="replace the section in BENCHMARKS.md")
    ap.add_argument("--append", action="store_true",
                    help="with --write: add this run's tables to the section instead")
    ap.add_argument("--label", default="", help="added to each table's label (e.g. an env)")
    a = ap.parse_args()
    runs = ([("before", a.before)] if a.before else []) + [("after", a.python)]
    parts: list[str] = []
    if a.part in ("schemas", "all"):
        text = ""
        kinds = tuple(k for k in a.hostile.split(",") if k not in ("", "none"))
        for label, py in runs:
            r = asyncio.run(bench_schemas(py, a.serve_arg if label == "after" else [],
                                          a.seconds, a.settle, kinds))
            text += schemas_table(f"{label}{a.label}, hostile senders: {a.hostile}", r) + "\n"
        print(text)
        parts.append("### Hostile tool schemas\n\n" + text)
        write(a.write, parts, a.append)
    if a.part in ("bodies", "all"):
        rows = [(label, asyncio.run(bench_bodies(py, a.serve_arg if label == "after" else [])))
                for label, py in runs]
        text = (f"8 concurrent streaming requests, each an 8 MB body of 690,000 small keys "
                f"(the simulated backend holds each 3 s), load {rows[-1][1]['load']}. Peak RSS "
                "is the process's high-water mark.\n\n" + bodies_table(rows))
        print(text)
        parts.append("### Request bodies that parse large\n\n" + text)
        write(a.write, parts, a.append)
    if a.part in ("validation", "all"):
        rows = [(label, in_child(py, VALIDATION_CODE)) for label, py in runs]
        text = ("The work one request or one call puts on the event loop, measured in "
                "process, load " + load_average() + ".\n\n" + validation_table(rows))
        print(text)
        parts.append("### Checking calls against big schemas\n\n" + text)
        write(a.write, parts, a.append)
    if a.part in ("arguments", "all"):
        rows = [(label, in_child(py, ARGUMENTS_CODE)) for label, py in runs]
        text = ("One structured call whose arguments arrive in 16 KB deltas, buffered by the "
                "mender with no cap (to show the growth), load " + load_average() + ".\n\n"
                + arguments_table(rows))
        capped = rows[-1][1]["capped"]
        if capped:
            text += (f"\nWith the default cap, the same call is refused after "
                     f"{capped[0] * 1000:.0f} ms: `{capped[1]}`.\n")
        print(text)
        parts.append("### Buffered tool-call arguments\n\n" + text)
        write(a.write, parts, a.append)
    write(a.write, parts, a.append)


_KEPT: list[str] = []


def write(enabled: bool, parts: list[str], append: bool = False) -> None:
    if enabled and append:
        if not _KEPT:  # what the section holds now, read once, before this run adds to it
            text = (ROOT / "BENCHMARKS.md").read_text()
            start = text.find(SECTION + "\n")
            if start >= 0:
                body = text[start:].split("\n## ", 1)[0]
                _KEPT.append(body.split("\n\n", 2)[2].rstrip() + "\n")
        parts = [*_KEPT, *parts]
    if enabled and parts:
        replace_section(SECTION + "\n\nMeasured by `python bench/hostile_inputs.py all "
                        "--write --before <python running the code before>`; see the script's "
                        "docstring for "
                        "what each part sends. Wall-clock times on a shared 2-core machine "
                        "(the load average is given with each table).\n\n"
                        + "\n".join(parts))


if __name__ == "__main__":
    main()
