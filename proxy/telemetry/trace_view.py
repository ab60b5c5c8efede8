"""``toolmend trace``: recent agent sessions as per-step timelines in the terminal.

Reads ``GET /toolmend/v1/sessions[/{id}]`` of a running toolmend and draws, for each step, where
its time went: the agent's own tool time before the step, the wait in toolmend's queue, the time
to the first token, and generation. The bar makes the dominant cost of a loop visible at a glance
(a long grey run is the agent's tools, a long yellow one is the queue); the Jaeger (and, with
``--phoenix-url``, Phoenix) link opens the same session as one trace. The table takes the width of
the terminal, also when piped, and wraps cells rather than cutting them.
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
    from rich.console import Console, ConsoleOptions, RenderResult
    from rich.table import Table
    from rich.text import Text

BAR_WIDTH = 40
VISIBLE_MS = 1.0  # a segment this long gets at least one cell; shorter ones read as "0 ms"
# segment: (label, colour); the order they are drawn in, left to right
SEGMENTS = (("tool", "grey50"), ("queue", "yellow"), ("ttft", "red"), ("gen", "green"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("session", nargs="?", help="session id (default: the most recent sessions)")
    p.add_argument("--agent", default=None,
                   help="the agent whose SESSION to show, when several agents use that id")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="toolmend base URL")
    p.add_argument("--jaeger-url", default="http://127.0.0.1:16686", help="Jaeger UI base URL")
    p.add_argument("--phoenix-url", default=None,
                   help="Phoenix UI base URL, e.g. http://127.0.0.1:6006, for Phoenix links too")
    p.add_argument("--width", type=int, default=None,
                   help="columns to draw in (default: the terminal's, even when piped)")
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


def _bar(step: dict[str, Any], scale_ms: float, width: int = BAR_WIDTH) -> Text:
    from rich.text import Text

    parts = {"tool": step.get("tool_time_ms"), "queue": step.get("queue_ms"),
             "gen": step.get("generation_ms")}
    ttft, queue = step.get("ttft_ms"), step.get("queue_ms") or 0.0
    parts["ttft"] = None if ttft is None else max(0.0, ttft - queue)
    bar = Text()
    for label, colour in SEGMENTS:
        v = parts.get(label) or 0.0
        cells = round(v / scale_ms * width) if scale_ms > 0 else 0
        if v >= VISIBLE_MS and cells == 0:  # short but real: one cell, so it is not lost
            cells = 1
        bar.append("█" * cells, style=colour)
    return bar


MIN_BAR = 12  # narrower than this, the timeline bars move below the table
#: The table's columns (header, justify): the step's numbers, then what happened in it.
NUMBERS = (("step", "right"), ("time", "left"), ("tool", "right"), ("queue", "right"),
           ("TTFT", "right"), ("gen", "right"), ("in/out", "right"))
OUTCOME = (("tools called", "left"), ("status", "left"))
LEGEND = {"tool": "agent tool time", "queue": "queue", "ttft": "to first token",
          "gen": "generation"}


def render_session(s: dict[str, Any], jaeger: str, phoenix: str | None = None) -> SessionView:
    """A session as a renderable that lays itself out for the width it is printed at."""
    return SessionView(s, jaeger, phoenix)


class SessionView:
    """One session's steps in a panel: the table, the legend and the trace links.

    Laid out when printed, for the width rich gives it, so that no column is ever cut. A table
    is only given the width it asks for (its natural width), so rich never has to squeeze it;
    what does not fit moves instead: wide, everything is one row per step with its timeline
    bar; narrower (80 columns), the tools called and the status go to a second table under the
    numbers, where they have the whole width and wrap between names; narrower still, the bars
    get their own block too. From 80 columns up nothing is cut or folded (a tool name longer
    than the whole table could be aside); below that, rich folds what it must.
    """

    def __init__(self, s: dict[str, Any], jaeger: str, phoenix: str | None = None) -> None:
        self.s = s
        self.jaeger = jaeger
        self.phoenix = phoenix

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.console import Group
        from rich.measure import Measurement
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        s = self.s
        steps = s.get("steps") or []
        scale = max(((st.get("tool_time_ms") or 0) + (st.get("duration_ms") or 0)
                     for st in steps), default=0.0)
        inner = max(1, options.max_width - 4)  # the panel's borders and padding
        opts = options.update_width(inner)

        def room_for_bars(table: Table) -> int:
            return inner - Measurement.get(console, opts, table).maximum - 1

        def bars(width: int) -> list[Text]:
            return [_bar(st, scale, min(BAR_WIDTH, width)) for st in steps]

        parts: list[Any] = []
        room = room_for_bars(_table(steps, NUMBERS + OUTCOME))
        if room >= MIN_BAR:
            parts.append(_table(steps, NUMBERS + OUTCOME, bars(room)))
        else:
            room = room_for_bars(_table(steps, NUMBERS))
            parts.append(_table(steps, NUMBERS, bars(room) if room >= MIN_BAR else None))
            parts.append(_table(steps, NUMBERS[:1] + OUTCOME))
            if room < MIN_BAR:
                block = Table.grid(padding=(0, 1))
                block.add_column(justify="right", no_wrap=True)
                block.add_column(no_wrap=True)
                for st, bar in zip(steps, bars(inner - 8), strict=True):
                    block.add_row(f"step {st.get('step') or '?'}", bar)
                parts.append(block)
        legend = Text()
        for label, colour in SEGMENTS:
            legend.append("█ ", style=colour).append(LEGEND[label] + "   ")
        parts.append(legend)
        for tid in s.get("trace_ids") or []:
            parts.append(Text(f"Jaeger: {self.jaeger.rstrip('/')}/trace/{tid}", style="cyan",
                              overflow="fold"))
            if self.phoenix:
                parts.append(Text(f"Phoenix: {self.phoenix.rstrip('/')}/redirects/traces/{tid}",
                                  style="cyan", overflow="fold"))
        if not s.get("trace_ids"):
            parts.append(Text("(tracing is off: start toolmend with --otlp-endpoint for trace "
                              "links)", style="dim"))
        title = f"session {s.get('id')}  agent {s.get('agent_id')}  ({s.get('source')}, " \
                f"{len(steps)} steps)"
        yield Panel(Group(*parts), title=title, title_align="left", padding=(0, 1),
                    expand=False)


def _cells(st: dict[str, Any]) -> dict[str, Any]:
    from rich.text import Text

    status = str(st.get("status"))
    if st.get("error"):
        status += f" {st['error']}"
    if st.get("repairs"):
        status += f" ({st['repairs']} repaired)"
    if st.get("retries"):
        status += f" ({st['retries']} retried)"
    return {
        "step": str(st.get("step") or "?"),
        "time": time.strftime("%H:%M:%S", time.localtime(st.get("started") or 0)),
        "tool": _ms(st.get("tool_time_ms")), "queue": _ms(st.get("queue_ms")),
        "TTFT": _ms(st.get("ttft_ms")), "gen": _ms(st.get("generation_ms")),
        "in/out": f"{st.get('input_tokens') or '-'}/{st.get('output_tokens') or '-'}",
        "tools called": ", ".join(st.get("tool_names") or []),
        "status": Text(status, style="red" if (st.get("status") or 0) >= 400 else ""),
    }


def _table(steps: list[dict[str, Any]], columns: tuple[tuple[str, str], ...],
           bars: list[Text] | None = None) -> Table:
    """The steps' ``columns``, and a timeline column when ``bars`` are given.

    Collapsed padding (one space between columns) and short headers keep the numbers narrow
    enough for an 80-column terminal with room for the bars.
    """
    from rich.table import Table

    t = Table(expand=False, box=None, padding=(0, 1), collapse_padding=True, pad_edge=False)
    for col, just in columns:
        t.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]
    if bars is not None:
        t.add_column("timeline", justify="left", no_wrap=True)
    for i, st in enumerate(steps):
        cells = _cells(st)
        row = [cells[col] for col, _ in columns]
        t.add_row(*row, *([bars[i]] if bars is not None else []))
    return t


def terminal_width() -> int | None:
    """The width of the terminal the user is looking at, or None when there is none.

    rich sizes itself from stdout alone and falls back to 80 columns when stdout is piped
    (``toolmend trace | less``, ``| tee``), although the terminal is still there on stderr or
    stdin. ``COLUMNS`` wins, as everywhere.
    """
    import os

    cols = os.environ.get("COLUMNS", "")
    if cols.isdigit() and int(cols) > 0:
        return int(cols)
    for fd in (1, 2, 0):
        try:
            cols = os.get_terminal_size(fd).columns
        except OSError:
            continue
        if cols > 0:
            return cols
    return None


def run(args: argparse.Namespace, console: Console | None = None) -> int:
    import os

    from rich.console import Console

    if console is None:
        width = args.width or terminal_width()
        console = Console(width=width) if width else Console()
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
        console.print(render_session(s, args.jaeger_url, args.phoenix_url))
    return 0
