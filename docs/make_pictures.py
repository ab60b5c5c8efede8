"""Regenerate the pictures in docs/images/: an agent session as Phoenix shows it, and as
``toolmend trace`` draws it.

    python docs/make_pictures.py            # from the repository root, in the project's venv

It runs the viewer tier's session (``tests/viewer/agent_session.py``: three steps through
toolmend in front of ``toolmend sim``, a repaired call, a validation retry, a wait in the queue
behind another agent), slowed down so that every part of the timeline is wide enough to see,
against a real Phoenix set up as the tests set it up (``tests/viewer/phoenix.py``, its own
cached venv). Then it takes the pictures with headless Chromium, Debian's ``chromium``, which it
installs with apt-get when it is missing (so run it as root, or install chromium first):

- ``phoenix-trace.png``: the session's trace in Phoenix, step 2 selected, its attributes open;
- ``phoenix-events.png``: the same step's events (queued, dispatched, the failed validation and
  the retry);
- ``toolmend-trace.png``: ``toolmend trace`` for the same session, rendered by rich's SVG export
  and photographed by the same Chromium.

Chromium runs with a fresh profile and everything that would reach the network off, and is
driven over the DevTools protocol (clicks on a tab, waits for text to appear) with aiohttp's
websocket client, so the script needs nothing beyond the test dependencies.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make tests/ importable
    sys.path.insert(0, str(ROOT))

from tests.viewer.agent_session import run_session, start_sim  # noqa: E402
from tests.viewer.phoenix import start_phoenix  # noqa: E402

IMAGES = ROOT / "docs" / "images"
PROJECT = "toolmend"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--mute-audio",
                  # nothing but this machine: a page that asks for anything else gets nothing
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")
# The session, slowed down to be seen: model and queue in hundreds of milliseconds.
SIM_TTFT, SIM_TOKEN_DELAY = 0.25, 0.02
QUEUE_HOLD, TOOL_WORK = 0.6, 0.4
TERMINAL_COLUMNS = 150


def ensure_chromium() -> str:
    """Debian's chromium, installed with apt-get if it is not there yet."""
    found = shutil.which("chromium")
    if found:
        return found
    print("installing chromium with apt-get ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium", "fonts-dejavu-core"]
    if subprocess.call(install, env=env) != 0:
        subprocess.check_call(["apt-get", "update", "-q"], env=env)
        subprocess.check_call(install, env=env)
    found = shutil.which("chromium")
    if not found:
        raise SystemExit("apt-get installed chromium but it is not on PATH")
    return found


# --- a small DevTools-protocol client ------------------------------------------------------------
class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, chromium: str) -> None:
        self.chromium = chromium
        # chromium's helpers may still write into the profile as it exits
        self.profile = tempfile.TemporaryDirectory(prefix="toolmend-chromium-",
                                                   ignore_cleanup_errors=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._next_id = 0

    async def __aenter__(self) -> Browser:
        log = Path(self.profile.name) / "chromium.log"
        self._log = log.open("wb")
        self.proc = subprocess.Popen(  # noqa: ASYNC220 (started once, returns at once)
            [self.chromium, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile.name}/profile",
             "--remote-debugging-port=0", "about:blank"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        port = await self._devtools_port(Path(self.profile.name) / "profile")
        self.http = aiohttp.ClientSession()
        async with self.http.get(f"http://127.0.0.1:{port}/json/list") as r:
            pages = [t for t in await r.json() if t["type"] == "page"]
        self.ws = await self.http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    async def _devtools_port(self, profile: Path, timeout: float = 60.0) -> int:
        """Chromium writes the port it picked to DevToolsActivePort in the profile."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            f = profile / "DevToolsActivePort"
            if f.is_file() and f.read_text().strip():
                return int(f.read_text().split()[0])
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            await asyncio.sleep(0.1)
        raise RuntimeError("chromium did not open its DevTools port")

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.http is not None:
            await self.http.close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.profile.cleanup()

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        assert self.ws is not None
        self._next_id += 1
        mine = self._next_id
        await self.ws.send_json({"id": mine, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=60)
            if msg.get("id") == mine:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result") or {})

    async def eval(self, expression: str) -> Any:
        r = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                            awaitPromise=True)
        return (r.get("result") or {}).get("value")

    async def open(self, url: str, width: int, height: int) -> None:
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                        deviceScaleFactor=1, mobile=False)
        await self.send("Page.navigate", url=url)

    async def wait_for_text(self, text: str, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        probe = f"document.body && document.body.innerText.includes({json.dumps(text)})"
        while not await self.eval(probe):
            if time.monotonic() > end:
                raise RuntimeError(f"the page never showed {text!r}")
            await asyncio.sleep(0.2)

    async def click_text(self, selector: str, text: str, timeout: float = 60.0) -> None:
        """Click the first element matching ``selector`` whose text starts with ``text``, as
        soon as the page has one."""
        js = (f"(() => {{ const el = [...document.querySelectorAll({json.dumps(selector)})]"
              f".find(e => e.innerText.trim().startsWith({json.dumps(text)}));"
              " if (!el) return false; el.click(); return true; })()")
        end = time.monotonic() + timeout
        while not await self.eval(js):
            if time.monotonic() > end:
                raise RuntimeError(f"no {selector} with text {text!r} to click")
            await asyncio.sleep(0.2)

    async def type_into(self, selector: str, text: str) -> None:
        """Focus the element matching ``selector`` and type ``text`` as a keyboard would."""
        if not await self.eval(f"(() => {{ const el = document.querySelector("
                               f"{json.dumps(selector)}); if (!el) return false; el.focus();"
                               " return true; })()"):
            raise RuntimeError(f"no {selector} to type into")
        await self.send("Input.insertText", text=text)

    async def screenshot(self, path: Path) -> None:
        await asyncio.sleep(0.5)  # let the last layout and fonts settle
        r = await self.send("Page.captureScreenshot", format="png")
        await asyncio.to_thread(path.write_bytes, base64.b64decode(r["data"]))
        print(f"wrote {path.relative_to(ROOT)}", flush=True)


# --- the session and the pictures ----------------------------------------------------------------
async def record_session(phoenix_url: str) -> tuple[str, dict[str, Any]]:
    """Run the session through toolmend into Phoenix; its id and toolmend's own view of it."""
    from toolmend.server.app import SCHEDULER, build_app, start_server
    from toolmend.server.config import Settings

    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "50"
    os.environ["OTEL_RESOURCE_ATTRIBUTES"] = f"openinference.project.name={PROJECT}"
    sim = start_sim(ttft=SIM_TTFT, token_delay=SIM_TOKEN_DELAY)
    try:
        app = build_app(Settings(log_requests=False, otlp_endpoint=phoenix_url, slots=1,
                                 express_slot=False), [sim.url])
        runner, port = await start_server(app, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{port}"
        sid = f"picnic-{uuid.uuid4().hex[:6]}"
        try:
            await run_session(url, app[SCHEDULER], session_id=sid,
                              hold=lambda: asyncio.sleep(QUEUE_HOLD),
                              tool_work=lambda: asyncio.sleep(TOOL_WORK))
            async with aiohttp.ClientSession() as http, \
                    http.get(f"{url}/toolmend/v1/sessions/{sid}") as r:
                doc = await r.json()
        finally:
            await runner.cleanup()  # exports the session's span
    finally:
        sim.stop()
    return sid, doc


async def phoenix_spans(phoenix_url: str, trace_id: str, count: int) -> list[dict[str, Any]]:
    """The trace's spans once Phoenix has ingested all ``count`` of them."""
    end = time.monotonic() + 60
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{phoenix_url}/v1/projects/{PROJECT}/spans",
                                params={"trace_id": trace_id, "limit": "100"}) as r:
                spans = (await r.json())["data"] if r.status == 200 else []
            if len(spans) >= count:
                return list(spans)
            if time.monotonic() > end:
                raise RuntimeError(f"Phoenix shows {len(spans)} of {count} spans")
            await asyncio.sleep(0.2)


async def phoenix_pictures(browser: Browser, phoenix_url: str, trace_id: str) -> None:
    spans = await phoenix_spans(phoenix_url, trace_id, 7)
    (step2,) = [s for s in spans if s["attributes"].get("toolmend.loop.step") == 2]
    await browser.open(f"{phoenix_url}/redirects/spans/{step2['context']['span_id']}", 1600,
                       1000)
    await browser.wait_for_text(step2["context"]["span_id"])  # the span's own pane
    await browser.click_text('[role="tab"]', "Attributes")
    await browser.wait_for_text("toolmend.queue.wait_ms")
    # toolmend's own attributes first: filter the table the way a person would
    with contextlib.suppress(RuntimeError):
        await browser.click_text('button[aria-label="Search JSON keys and values"]', "",
                                 timeout=5)
    await browser.type_into('input[placeholder="Search attributes"]', "toolmend.")
    await browser.wait_for_text("toolmend.agent.tool_time_ms")
    await browser.screenshot(IMAGES / "phoenix-trace.png")
    await browser.click_text('[role="tab"]', "Events")
    await browser.wait_for_text("validation_failed")
    await browser.screenshot(IMAGES / "phoenix-events.png")


async def terminal_picture(browser: Browser, session: dict[str, Any]) -> None:
    """``toolmend trace`` as a terminal of TERMINAL_COLUMNS shows it (rich's SVG export)."""
    from rich.console import Console
    from rich.terminal_theme import MONOKAI

    from toolmend.telemetry.trace_view import render_session

    console = Console(record=True, width=TERMINAL_COLUMNS, force_terminal=True,
                      color_system="truecolor", file=io.StringIO())
    console.print(render_session(session, "http://127.0.0.1:16686", "http://127.0.0.1:6006"))
    svg = console.export_svg(title="toolmend trace", theme=MONOKAI)
    # rich's SVG fetches Fira Code from a CDN; the local monospace font is used instead
    svg = re.sub(r"@font-face\s*\{[^}]*\}", "", svg)
    m = re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"', svg)
    width, height = (int(float(v)) + 1 for v in m.groups()) if m else (1600, 800)
    with tempfile.TemporaryDirectory(prefix="toolmend-svg-") as tmp:
        page = Path(tmp) / "trace.html"
        page.write_text("<!doctype html><html><body style='margin:0;background:#fff'>"
                        f"{svg}</body></html>")
        await browser.open(page.as_uri(), width, height)
        await browser.wait_for_text(session["id"])
        await browser.screenshot(IMAGES / "toolmend-trace.png")


async def main_async(args: argparse.Namespace) -> int:
    chromium = ensure_chromium()
    IMAGES.mkdir(parents=True, exist_ok=True)
    phoenix = None if args.phoenix_url else start_phoenix()
    url = args.phoenix_url or phoenix.url  # type: ignore[union-attr]
    try:
        print(f"phoenix at {url}", flush=True)
        sid, doc = await record_session(url)
        (trace_id,) = doc["trace_ids"]
        print(f"session {sid}: trace {trace_id}", flush=True)
        async with Browser(chromium) as browser:
            await phoenix_pictures(browser, url, trace_id)
            await terminal_picture(browser, doc)
        if args.keep and phoenix is not None:
            print(f"Phoenix stays up at {url} until Ctrl-C", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                phoenix.proc.wait()
    finally:
        if phoenix is not None:
            phoenix.stop()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", action="store_true", help="keep Phoenix running afterwards")
    p.add_argument("--phoenix-url", help="use this running Phoenix instead of starting one")
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
