"""Hostile upstream: what toolmend's memory and its client see when the upstream floods it.

Each case runs against a fresh ``toolmend serve`` child (so that its peak RSS, ``VmHWM`` from
``/proc``, belongs to that case alone), in front of an aiohttp upstream in this process that
answers according to the request's ``model``:

* ``sse-no-blank``: 97 MB of ``data:`` lines with no blank line to end the event,
* ``sse-long-line``: one 100 MB SSE line with no newline,
* ``whole-100mb``: a 100 MB non-streaming reply with its Content-Length, and
  ``whole-100mb-chunked`` the same without (chunked, so its size is only known by reading),
* ``ndjson-no-newline`` is not here: the Ollama line bound has a test (tests/).

For each: the client's outcome (status, the error code in the body or the stream, whether the
chunked body was well formed), the RSS after a warm-up of ordinary requests, the peak during the
case and the RSS after it, and the wall time.

``--micro`` times ``StreamPipeline.feed`` per event, sans-I/O, for plain ASCII content events,
valid non-ASCII ones and events with invalid UTF-8: the price of the UTF-8 check on the fast
path.

``--python PATH`` measures the toolmend installed in another interpreter (for example another
checkout's venv), so before and after can be compared side by side. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from _common import Proc
from aiohttp import web

SELF = Path(__file__).resolve()
MB = 1024 * 1024
CASES = {"sse-no-blank": 97 * MB, "sse-long-line": 100 * MB, "whole-100mb": 100 * MB,
         "whole-100mb-chunked": 100 * MB}


def _chunk(text: str) -> bytes:
    return b"data: " + orjson.dumps({
        "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}) + b"\n\n"


FINISH = b"data: " + orjson.dumps({
    "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) + b"\n\ndata: [DONE]\n\n"


async def upstream(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    case = body.get("model")
    size = CASES.get(case, 0)
    if case.startswith("whole-100mb"):
        head = (b'{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{'
                b'"index":0,"message":{"role":"assistant","content":"')
        tail = b'"},"finish_reason":"stop"}]}'
        block = b"x" * (64 * 1024)
        n = size // len(block)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if case == "whole-100mb":
            resp.content_length = len(head) + n * len(block) + len(tail)
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            await resp.write(head)
            for _ in range(n):
                await resp.write(block)
            await resp.write(tail)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return resp
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    try:
        if case == "sse-no-blank":
            await resp.write(_chunk("before"))
            block = b'data: {"a": 1}\n' * 4096
            for _ in range(size // len(block)):
                await resp.write(block)
        elif case == "sse-long-line":
            await resp.write(_chunk("before") + b"data: ")
            block = b"x" * (64 * 1024)
            for _ in range(size // len(block)):
                await resp.write(block)
        else:
            await resp.write(_chunk("hello") + FINISH)
        await resp.write_eof()
    except (ConnectionError, RuntimeError):
        pass  # toolmend hung up
    return resp


def _rss(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


async def _ask(url: str, case: str) -> tuple[str, float]:
    body = {"model": case, "messages": [{"role": "user", "content": "hi"}],
            "stream": not case.startswith("whole")}
    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        try:
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                raw = await r.read()
                status = r.status
        except aiohttp.ClientPayloadError as e:
            return f"cut stream ({e.__class__.__name__})", time.monotonic() - t0
        except TimeoutError:
            return "never ended (client gave up after 60 s)", time.monotonic() - t0
    took = time.monotonic() - t0
    code = None
    if status >= 400:
        try:
            code = orjson.loads(raw)["error"]["code"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            code = "not JSON"
        return f"{status} {code}", took
    events = [ln[6:] for ln in raw.split(b"\n") if ln.startswith(b"data: ")]
    done = events[-1:] == [b"[DONE]"]
    for e in events:
        if e.startswith(b'{"error"'):
            code = orjson.loads(e)["error"]["code"]
    if not body["stream"]:
        return f"200, {len(raw) / MB:.0f} MB relayed", took
    return (f"200, in-stream {code}" if code else "200") + ("" if done else ", no [DONE]"), took


async def run_cases(py: str) -> list[dict[str, Any]]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    up = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    log_dir = Path(tempfile.mkdtemp(prefix="toolmend-hostile-"))
    rows = []
    try:
        for case in CASES:
            tm = Proc("toolmend", [py, "-m", "toolmend", "serve",
                                   "--upstream", up, "--backend", "openai", "--slots", "4",
                                   "--port", "0", "--no-log-requests"], log_dir)
            try:
                for _ in range(20):
                    await _ask(tm.url, "warm")
                before = _rss(tm.pid)["VmRSS"]
                outcome, took = await _ask(tm.url, case)
                after = _rss(tm.pid)
                rows.append({"case": case, "outcome": outcome, "seconds": round(took, 2),
                             "rss_before": before, "rss_peak": after["VmHWM"],
                             "rss_after": after["VmRSS"]})
                print(f"# {rows[-1]}", file=sys.stderr, flush=True)
            finally:
                tm.stop()
    finally:
        await runner.cleanup()
        shutil.rmtree(log_dir, ignore_errors=True)
    return rows


def micro() -> dict[str, float]:
    """ns per event of StreamPipeline.feed, best of 7, 20,000 events per run."""
    from toolmend.parsers.stream import StreamPipeline

    events = {
        "ascii": _chunk("hello world, a plain token"),
        "non-ascii": _chunk("h\u00e9llo w\u00f6rld, \u4e16\u754c token"),
        "invalid utf-8": _chunk("hello @@ token").replace(b"@@", b"\xff\xfe"),
    }
    out = {}
    for name, ev in events.items():
        stream = ev * 20000
        pieces = [stream[i:i + 4096] for i in range(0, len(stream), 4096)]
        best = float("inf")
        for _ in range(7):
            p = StreamPipeline(True)
            t0 = time.perf_counter_ns()
            for piece in pieces:
                p.feed(piece)
            best = min(best, (time.perf_counter_ns() - t0) / 20000)
        out[name] = round(best)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter whose toolmend is measured (default: this one)")
    ap.add_argument("--micro", action="store_true", help="only the per-event microbenchmark")
    ap.add_argument("--micro-json", action="store_true", help=argparse.SUPPRESS)
    cfg = ap.parse_args()
    if cfg.micro_json:
        print(json.dumps(micro()))
        return
    res = subprocess.run([cfg.python, str(SELF), "--micro-json"], capture_output=True,
                         text=True, check=True)
    m = json.loads(res.stdout)
    print(f"StreamPipeline.feed per event ({cfg.python}):\n")
    print("| event | ns per event |\n|---|---:|")
    for k, v in m.items():
        print(f"| {k} | {v:,} |")
    if cfg.micro:
        return
    rows = asyncio.run(run_cases(cfg.python))
    print("\n| case | client's outcome | s | RSS after warm-up MiB | peak MiB | after MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['outcome']} | {r['seconds']} | {r['rss_before']:.0f} | "
              f"{r['rss_peak']:.0f} | {r['rss_after']:.0f} |")


if __name__ == "__main__":
    main()
