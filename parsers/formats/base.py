"""The one interface every tool-call format implements, and the scanning primitives under it.

A format is one small class in one file (SGLang's detector habit), with its markers as named
constants at the top. ``feed(text)`` takes the next piece of model output (any size, split
anywhere) and returns events; ``finish()`` ends the stream. Both must be linear: per-call cost
proportional to the new text, never to everything seen so far.

Split invariance is the contract: for any way of cutting the same output into pieces, the
concatenated Text, the tool calls (name, id, concatenated argument fragments) and the
Reasoning text are identical. Text is released as soon as it cannot be the start of a marker
(see :func:`holdback`).

Reasoning is part of the contract too (see ``_stream.StreamParser``): a parser knows where its
format's reasoning starts and ends, can be told that the reply starts inside reasoning
(:meth:`MarkerParser.open_reasoning`: the chat template opened it), and never lets a call the
model drafted inside its reasoning out as a call unless the reply shows it was meant.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from ..events import Event, Text


class MarkerParser(ABC):
    """Base class of the per-format parsers."""

    #: the format's name, as used by ``--tool-format`` and the registry
    name: ClassVar[str]

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        # The request's ``tools`` (OpenAI shape). Formats that type values by schema
        # (Qwen3-Coder XML, GLM) or that must recognize a tool name (generic JSON) use it.
        self.tools = tools or []
        self.tool_names = {t.get("function", {}).get("name") for t in self.tools
                           if isinstance(t, dict)}
        self._calls = 0  # tool calls started so far; the next ToolCallStart's index
        #: set before :meth:`finish` when the reply was cut off (finish ``length``): a call the
        #: model drafted inside reasoning can then never count as its final act
        self.cut_off = False
        #: reasoning end markers seen in text that was not reasoning (dropped from the text),
        #: and the calls the reply had started before the first of them
        self.stray_closes = 0
        self.calls_before_stray = 0
        #: :meth:`open_reasoning` was called: the reply was taken to start inside reasoning
        self.reasoning_opened = False

    @abstractmethod
    def feed(self, text: str) -> list[Event]:
        """Consume the next piece of model output."""

    @abstractmethod
    def finish(self) -> list[Event]:
        """End of output: release held text; an open call ends with ``truncated=True``."""

    def open_reasoning(self, lead: bool = True) -> None:
        """The reply starts inside reasoning: the chat template wrote the opening marker into
        the prompt, so the output only closes it. With ``lead``, an opening marker the model
        writes anyway at the very start is taken as redundant. Formats without reasoning
        ignore this."""
        self.reasoning_opened = True

    def end_server_reasoning(self) -> None:
        """The server's own reasoning field ended here (the text fed so far came from it, the
        text fed next from its content field). Formats without reasoning ignore this."""
        return None

    @property
    def in_reasoning(self) -> bool:
        """Whether the output so far ends inside reasoning."""
        return False

    @property
    def at_rest(self) -> bool:
        """Nothing held: every character fed so far has been emitted. Conservative default."""
        return False

    def closes_unopened(self, text: str) -> bool:
        """Whether ``text``, a whole reply, closes reasoning it never opened: the mark of a
        reply that started inside reasoning the chat template opened."""
        return False

    def next_index(self) -> int:
        i = self._calls
        self._calls += 1
        return i

    def schema_of(self, name: str) -> dict[str, Any] | None:
        for t in self.tools:
            fn = t.get("function") if isinstance(t, dict) else None
            if isinstance(fn, dict) and fn.get("name") == name:
                p = fn.get("parameters")
                return p if isinstance(p, dict) else None
        return None


@functools.lru_cache(maxsize=512)
def marker_prefixes(markers: tuple[str, ...]) -> tuple[frozenset[str], int]:
    """Every proper prefix of every marker, and the longest marker's length.

    Computed once per marker set (the sets are module constants or built once per parser), so
    that :func:`holdback` is a handful of set lookups instead of a marker-by-marker search.
    """
    prefixes = frozenset(m[:n] for m in markers for n in range(1, len(m)))
    return prefixes, max((len(m) for m in markers), default=0)


def holdback(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some marker.

    That suffix must be held back: the next piece may complete the marker. Only the last
    ``len(longest marker) - 1`` characters are examined, so the cost is bounded by the marker
    length, not by ``len(text)``; each length is one lookup in the markers' prefix set.
    """
    if not text:
        return 0
    prefixes, longest = marker_prefixes(markers)
    for n in range(min(len(text), longest - 1), 0, -1):
        if text[-n:] in prefixes:
            return n
    return 0


def text_event(text: str, out: list[Event]) -> None:
    """Append a Text event unless empty (callers stay branch-free)."""
    if text:
        out.append(Text(text))


class JsonScanner:
    """Finds where one JSON value ends in a stream, without parsing it.

    Tracks only what matters for boundaries: string state, escapes, bracket depth. Feed it
    characters as they arrive; :meth:`feed` returns the number of characters consumed up to and
    including the end of the value (or -1 if the value is still open). Linear and
    allocation-free per character. Used by every format whose calls are raw JSON, so that a
    ``"</tool_call>"`` inside a string value is not mistaken for the closing marker.
    """

    __slots__ = ("depth", "done", "escape", "in_string", "started")

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.started = False
        self.done = False

    def feed(self, text: str) -> int:
        i = 0
        n = len(text)
        while i < n:
            c = text[i]
            i += 1
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.in_string = False
                    if self.depth == 0 and self.started:
                        self.done = True
                        return i
                continue
            if c == '"':
                self.in_string = True
                self.started = True
            elif c in "{[":
                self.depth += 1
                self.started = True
            elif c in "}]":
                self.depth -= 1
                if self.depth <= 0 and self.started:
                    self.done = True
                    return i
        return -1
