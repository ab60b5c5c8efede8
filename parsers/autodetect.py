"""Marker-triggered format detection for models whose name says nothing.

Until a known start marker appears, text streams through (holding back only a possible marker
prefix). The first marker picks the format and hands the rest of the output to that format's
parser. ``<tool_call>`` is shared by Hermes, Qwen3-Coder and GLM: the first non-space character
after it decides (``{`` Hermes, ``<function=`` Qwen3-Coder, a name GLM).
"""

from __future__ import annotations

from typing import Any

from .events import Event
from .formats import make_parser
from .formats.base import MarkerParser, holdback, text_event

SHARED_TOOL_CALL = "<tool_call>"
START_MARKERS: dict[str, str] = {
    SHARED_TOOL_CALL: "",  # decided by what follows
    "[TOOL_CALLS]": "mistral",
    "<|python_tag|>": "llama3_json",
    "<|python_start|>": "pythonic",
    "<｜tool▁calls▁begin｜>": "deepseek_v31",
    "<｜tool▁call▁begin｜>": "deepseek_v31",
    "<|tool_call|>": "granite",
    "<|tool_calls_section_begin|>": "kimi_k2",
    "<start_function_call>": "functiongemma",
    "<minimax:tool_call>": "minimax_m2",
    "<|channel|>": "gpt_oss",
}
_MARKERS = tuple(START_MARKERS)
_DECIDE_LIMIT = 64  # characters after <tool_call> to wait for a decision


class AutoParser(MarkerParser):
    name = "auto"

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._buf = ""  # held text: a possible marker prefix, or <tool_call> awaiting decision
        self._inner: MarkerParser | None = None
        self._deciding = False

    @property
    def chosen(self) -> str | None:
        return self._inner.name if self._inner is not None else None

    def feed(self, text: str) -> list[Event]:
        if self._inner is not None:
            return self._inner.feed(text)
        out: list[Event] = []
        buf = self._buf + text
        if self._deciding:
            return self._decide(buf, out, final=False)
        best = -1
        best_marker = ""
        for m in _MARKERS:
            i = buf.find(m)
            if i >= 0 and (best < 0 or i < best):
                best, best_marker = i, m
        if best < 0:
            keep = holdback(buf, _MARKERS)
            text_event(buf[:len(buf) - keep], out)
            self._buf = buf[len(buf) - keep:]
            return out
        text_event(buf[:best], out)
        rest = buf[best:]
        fmt = START_MARKERS[best_marker]
        if fmt:
            self._switch(fmt)
            out.extend(self._inner.feed(rest))  # type: ignore[union-attr]
            self._buf = ""
            return out
        self._deciding = True
        return self._decide(rest, out, final=False)

    def _decide(self, buf: str, out: list[Event], final: bool) -> list[Event]:
        after = buf[len(SHARED_TOOL_CALL):].lstrip()
        if not after and not final and len(buf) < _DECIDE_LIMIT:
            self._buf = buf
            return out
        if after.startswith("<function="):
            fmt = "qwen3_coder"
        elif after.startswith("{") or not after or after.startswith("["):
            fmt = "hermes"
        elif "<function=".startswith(after[:10]) and not final:
            self._buf = buf  # could still become <function=
            return out
        else:
            fmt = "glm45"
        self._deciding = False
        self._buf = ""
        self._switch(fmt)
        out.extend(self._inner.feed(buf))  # type: ignore[union-attr]
        return out

    def _switch(self, fmt: str) -> None:
        self._inner = make_parser(fmt, self.tools)

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self._inner is None and self._deciding:
            self._decide(self._buf, out, final=True)
        if self._inner is not None:
            out.extend(self._inner.finish())
            return out
        text_event(self._buf, out)
        self._buf = ""
        return out
