"""Marker-triggered format detection for models whose name says nothing.

Until a known start marker appears, text streams through (holding back only a possible marker
prefix). The first marker picks the format and hands the rest of the output to that format's
parser. The markers are the formats' own (``ToolFormat.markers`` and ``reasoning_markers``, read
from the registry). A marker several formats declare (``<tool_call>``: Hermes, Qwen3-Coder and
GLM) is decided by the first non-space text after it, as the formats declare it
(``ToolFormat.marker_follows``: ``{`` Hermes, ``<function=`` Qwen3-Coder, anything else GLM).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .events import Event
from .formats import FORMATS, ToolFormat, make_parser
from .formats._stream import THINK_END, THINK_START, WS_LIMIT, Markers, emit_plain, skip_ws
from .formats.base import MarkerParser


@dataclass(frozen=True, slots=True)
class SharedMarker:
    """How a marker several formats declare is decided by the text after it."""

    follows: tuple[tuple[str, str], ...]  # (what comes next, format), in registry order
    if_empty: str  # the format when nothing follows the marker
    otherwise: str  # the format that takes whatever the others do not

    def decide(self, after: str, final: bool) -> str | None:
        """The format for ``after`` (the text after the marker, without leading whitespace),
        or None while more text could still change the answer."""
        if not after:
            return self.if_empty
        for prefix, fmt in self.follows:
            if after.startswith(prefix):
                return fmt
        if not final and any(p.startswith(after[:len(p)]) for p, _ in self.follows):
            return None  # could still become one of the prefixes
        return self.otherwise


def shared_marker(marker: str, owners: list[ToolFormat]) -> SharedMarker:
    """The rule for a marker the ``owners`` all declare, from their ``marker_follows``."""
    names = [f.name for f in owners]
    follows = [(p, f.name) for f in owners for p in f.marker_follows if p]
    catch_all = [f.name for f in owners if not f.marker_follows]
    if len(catch_all) != 1:
        raise ValueError(f"marker {marker!r} is shared by {names}: exactly one of them must "
                         "leave marker_follows empty (it takes whatever the others do not)")
    for i, (p, f) in enumerate(follows):
        for q, g in follows[i + 1:]:
            if p.startswith(q) or q.startswith(p):
                raise ValueError(f"marker {marker!r}: {f!r} and {g!r} both claim what starts "
                                 f"with {min(p, q, key=len)!r}")
    empty = [f.name for f in owners if "" in f.marker_follows]
    if len(empty) > 1:
        raise ValueError(f"marker {marker!r}: {empty} all claim a reply that ends after it")
    return SharedMarker(tuple(follows), empty[0] if empty else catch_all[0], catch_all[0])


def start_markers(formats: Iterable[ToolFormat]) -> tuple[dict[str, str],
                                                           dict[str, SharedMarker]]:
    """Start marker -> the format it picks (``""`` for a shared one), and the shared markers'
    rules."""
    formats = list(formats)
    owners: dict[str, list[ToolFormat]] = {}
    for fmt in formats:
        for m in fmt.markers:
            owners.setdefault(m, []).append(fmt)
    for fmt in formats:
        for m in fmt.reasoning_markers:
            if m in owners:
                raise ValueError(f"reasoning marker {m!r} of {fmt.name!r} is also a marker of "
                                 f"{[f.name for f in owners[m]]}")
            owners[m] = [fmt]
    start = {m: f[0].name if len(f) == 1 else "" for m, f in owners.items()}
    shared = {m: shared_marker(m, f) for m, f in owners.items() if len(f) > 1}
    return start, shared


#: start marker -> the format it picks ("" when several formats share it: see SHARED_MARKERS)
START_MARKERS, SHARED_MARKERS = start_markers(FORMATS.values())
_MARKERS = tuple(START_MARKERS)
#: formats that do not follow ``<think>`` reasoning: their start marker inside reasoning is
#: reasoning text, so a call written there can never fire
_NOT_IN_REASONING = frozenset(f.name for f in FORMATS.values() if not f.calls_in_reasoning)
# Until a format is chosen, ``<think>`` reasoning is followed here; a start marker met inside it
# hands the rest to the chosen format still inside reasoning, where the call is a draft.
_IN_TEXT = Markers(*_MARKERS, THINK_START, THINK_END)
_IN_THINK = Markers(*_MARKERS, THINK_END)
_DECIDE_LIMIT = 64  # characters after a shared marker to wait for a decision


class AutoParser(MarkerParser):
    name = "auto"
    knows_reasoning = True

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._buf = ""  # held text: a possible marker prefix, or a shared marker awaiting decision
        self._inner: MarkerParser | None = None
        self._deciding = ""  # the shared marker held until what follows it decides
        self._thinking = False
        self._lead = False  # opened: a <think> at the very start is redundant
        self._boundary = False  # the server's reasoning field ended: decide what follows

    @property
    def chosen(self) -> str | None:
        return self._inner.name if self._inner is not None else None

    # reasoning -------------------------------------------------------------------------------
    def open_reasoning(self, lead: bool = True) -> None:
        super().open_reasoning(lead)
        if self._inner is not None:
            self._inner.open_reasoning(lead)
            return
        self._thinking = True
        self._lead = lead

    def end_server_reasoning(self) -> None:
        if self._inner is not None:
            self._inner.end_server_reasoning()
        elif self._thinking:
            self._boundary = True

    @property
    def in_reasoning(self) -> bool:
        return self._inner.in_reasoning if self._inner is not None else self._thinking

    @property
    def at_rest(self) -> bool:
        if self._inner is not None:
            return self._inner.at_rest
        return not self._buf and not self._deciding and not self._lead and not self._boundary

    def closes_unopened(self, text: str) -> bool:
        i = text.find(THINK_END)
        return i >= 0 and text.find(THINK_START, 0, i) < 0

    @property  # type: ignore[override]
    def stray_closes(self) -> int:
        return self._strays + (self._inner.stray_closes if self._inner is not None else 0)

    @stray_closes.setter
    def stray_closes(self, value: int) -> None:
        self._strays = value

    # the loop --------------------------------------------------------------------------------
    def feed(self, text: str) -> list[Event]:
        if self._inner is not None:
            return self._inner.feed(text)
        out: list[Event] = []
        buf = self._buf + text
        self._buf = ""
        if self._deciding:
            return self._decide(buf, out, final=False)
        return self._scan(buf, out, final=False)

    def _scan(self, buf: str, out: list[Event], final: bool) -> list[Event]:
        pos = 0
        n = len(buf)
        while True:
            if self._lead or self._boundary:
                j = skip_ws(buf, pos)
                if j >= n and not final and j - pos < WS_LIMIT:
                    self._buf = buf[pos:]
                    return out
                if self._lead:
                    self._lead = False
                    if buf.startswith(THINK_START, j):
                        emit_plain(out, buf[pos:j], True)
                        pos = j + len(THINK_START)
                        continue
                    if not final and j < n and THINK_START.startswith(buf[j:]):
                        self._lead = True
                        self._buf = buf[pos:]
                        return out
                if self._boundary:
                    # where the content starts, not after its whitespace (see _stream.py)
                    hit = _IN_THINK.at(buf, pos, final) if pos < n else None
                    if hit is True:
                        self._buf = buf[pos:]
                        return out
                    self._boundary = False
                    if hit is None:
                        self._thinking = False
            thinking = self._thinking
            end, m = (_IN_THINK if thinking else _IN_TEXT).scan(buf, pos, final)
            emit_plain(out, buf[pos:end], thinking)
            if m is None:
                self._buf = buf[end:]
                return out
            tok = m.group()
            if tok == THINK_START:
                self._thinking = True
                pos = m.end()
                continue
            if tok == THINK_END:
                if thinking:
                    self._thinking = False
                else:
                    self.stray_closes += 1  # a close without an open: dropped from content
                pos = m.end()
                continue
            fmt = START_MARKERS[tok]
            if thinking and fmt in _NOT_IN_REASONING:
                emit_plain(out, tok, True)
                pos = m.end()
                continue
            rest = buf[m.start():]
            if fmt:
                self._switch(fmt)
                out.extend(self._inner.feed(rest))  # type: ignore[union-attr]
                return out
            self._deciding = tok
            return self._decide(rest, out, final)

    def _decide(self, buf: str, out: list[Event], final: bool) -> list[Event]:
        after = buf[len(self._deciding):].lstrip()
        if not after and not final and len(buf) < _DECIDE_LIMIT:
            self._buf = buf
            return out
        fmt = SHARED_MARKERS[self._deciding].decide(after, final)
        if fmt is None:
            self._buf = buf
            return out
        self._deciding = ""
        self._buf = ""
        self._switch(fmt)
        out.extend(self._inner.feed(buf))  # type: ignore[union-attr]
        return out

    def _switch(self, fmt: str) -> None:
        self._inner = make_parser(fmt, self.tools)
        self._inner.cut_off = self.cut_off
        if self._thinking:  # the marker came inside reasoning: the chosen format goes on there
            self._inner.open_reasoning(lead=False)

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self._inner is None and not self._deciding:
            buf, self._buf = self._buf, ""
            self._scan(buf, out, final=True)
        if self._inner is None and self._deciding:
            self._decide(self._buf, out, final=True)
        if self._inner is not None:
            self._inner.cut_off = self.cut_off
            out.extend(self._inner.finish())
            return out
        emit_plain(out, self._buf, self._thinking)
        self._buf = ""
        return out
