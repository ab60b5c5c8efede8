"""``toolmend trace``: recent agent sessions as per-step timelines in the terminal.

Reads ``GET /toolmend/v1/sessions[/{id}]`` of a running toolmend and draws, for each step, where
its time went: the agent's own tool time before the step, the wait in toolmend's queue, the time
to the first token, and generation. The bar makes the dominant cost of a loop visible at a glance
(a long grey run is the agent's tools, a long yellow one is the queue); the Jaeger link opens the
same session as one trace.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # rich is imported when drawing, so ``toolmend --help`` stays quick
    from rich.console import Console
    from rich.panel import Panel
    from rich.text import Text

BAR_WIDTH = 40
# segment: (label, colour); the order they are drawn in, left to right
SEGMENTS = (("tool", "grey50"), ("queue", "yellow"), ("ttft", "red"), ("gen", "green"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("session", nargs="?", help="session id (default: the most recent sessions)")
    p.add_argument("--agent", default=None,
                   help="the agent whose SESSION to show, when several agents use that id")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="toolmend base URL")
    p.add_argument("--jaeger-url", default="http://127.0.0.1:16686", help="Jaeger UI base URL")
    p.add_argument("--limit", type=int, default=5, help="sessions to show without SESSION")
    p.add_argument("--admin-key", default=None,
                   help="bearer key for a non-loopback toolmend (env TOOLMEND_ADMIN_KEY)")
    p.add_argument("--json", action="store_true", help="print the raw JSON instead")


def _get(url: str, key: str | None) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def fetch(base: str, session: str | None, limit: int, key: str | None,
          agent: str | None = None) -> list[dict[str, Any]]:
    """The sessions to show, each with its steps. Sessions belong to agents (two agents may use
    the same session id), so each is fetched with its agent."""
    api = base.rstrip("/") + "/toolmend/v1/sessions"

    def one(sid: str, agent_id: str | None) -> Any:
        url = f"{api}/{urllib.parse.quote(sid, safe='')}"
        if agent_id is not None:
            url += "?agent_id=" + urllib.parse.quote(agent_id, safe="")
        return _get(url, key)

    if session:
        return [one(session, agent)]
    listing = _get(f"{api}?limit={limit}", key)
    return [one(s["id"], s.get("agent_id")) for s in listing.get("data", [])]


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:.2f} s" if v >= 1000 else f"{v:.0f} ms"


def _bar(step: dict[str, Any], scale_ms: float) -> Text:
    from rich.text import Text

    parts = {"tool": step.get("tool_time_ms"), "queue": step.get("queue_ms"),
             "gen": step.get("generation_ms")}
    ttft, queue = step.get("ttft_ms"), step.get("queue_ms") or 0.0
    parts["ttft"] = None if ttft is None else max(0.0, ttft - queue)
    bar = Text()
    for label, colour in SEGMENTS:
        v = parts.get(label) or 0.0
        cells = round(v / scale_ms * BAR_WIDTH) if scale_ms > 0 else 0
        if v > 0 and cells == 0:
            cells = 1
        bar.append("█" * cells, style=colour)
    return bar


def render_session(s: dict[str, Any], jaeger: str) -> Panel:
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    steps = s.get("steps") or []
    scale = max(((st.get("tool_time_ms") or 0) + (st.get("duration_ms") or 0)
                 for st in steps), default=0.0)
    t = Table(expand=False, box=None, padding=(0, 1))
    for col, just in (("step", "right"), ("time", "left"), ("tool", "right"),
                      ("queue", "right"), ("TTFT", "right"), ("gen", "right"),
                      ("tokens in/out", "right"), ("tools called", "left"),
                      ("status", "left"), ("timeline", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for st in steps:
        status = str(st.get("status"))
        if st.get("error"):
            status += f" {st['error']}"
        if st.get("repairs"):
            status += f" ({st['repairs']} repaired)"
        tokens = f"{st.get('input_tokens') or '-'}/{st.get('output_tokens') or '-'}"
        t.add_row(str(st.get("step") or "?"),
                  time.strftime("%H:%M:%S", time.localtime(st.get("started") or 0)),
                  _ms(st.get("tool_time_ms")), _ms(st.get("queue_ms")), _ms(st.get("ttft_ms")),
                  _ms(st.get("generation_ms")), tokens, ", ".join(st.get("tool_names") or []),
                  Text(status, style="red" if (st.get("status") or 0) >= 400 else ""),
                  _bar(st, scale))
    legend = Text("  ")
    for label, colour in SEGMENTS:
        legend.append("█ ", style=colour).append(
            {"tool": "agent tool time", "queue": "queue", "ttft": "to first token",
             "gen": "generation"}[label] + "   ")
    links = Text()
    for tid in s.get("trace_ids") or []:
        links.append(f"  Jaeger: {jaeger.rstrip('/')}/trace/{tid}\n", style="cyan")
    if not s.get("trace_ids"):
        links.append("  (tracing is off: start toolmend with --otlp-endpoint for Jaeger "
                     "links)\n", style="dim")
    title = f"session {s.get('id')}  agent {s.get('agent_id')}  ({s.get('source')}, " \
            f"{len(steps)} steps)"
    return Panel(Group(t, legend, links), title=title, title_align="left")


def run(args: argparse.Namespace, console: Console | None = None) -> int:
    import os

    from rich.console import Console

    console = console or Console()
    key = args.admin_key or os.environ.get("TOOLMEND_ADMIN_KEY") or None
    try:
        sessions = fetch(args.url, args.session, args.limit, key, getattr(args, "agent", None))
    except urllib.error.HTTPError as e:
        msg = e.read().decode("utf-8", "replace")
        try:
            msg = json.loads(msg)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        console.print(f"[red]toolmend trace: {e.code} from {args.url}: {msg}[/red]")
        return 1
    except (urllib.error.URLError, OSError) as e:
        console.print(f"[red]toolmend trace: cannot reach {args.url}: {e}[/red]")
        return 1
    if args.json:
        console.print_json(json.dumps(sessions))
        return 0
    if not sessions:
        console.print("no agent sessions yet: send a chat request through toolmend first")
        return 0
    for s in sessions:
        console.print(render_session(s, args.jaeger_url))
    return 0
