"""Events produced by the marker parsers: small, immutable, cheap (h11 style)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class Text:
    """Plain content for the client."""

    text: str


@dataclass(slots=True, frozen=True)
class Reasoning:
    """Thinking text (``<think>``...), sent to the client as ``reasoning_content``."""

    text: str


@dataclass(slots=True, frozen=True)
class ToolCallStart:
    """A tool call begins. ``index`` counts calls from 0 within one reply."""

    index: int
    name: str
    id: str | None = None  # kept when the format carries one (Kimi K2, Mistral [CALL_ID])


@dataclass(slots=True, frozen=True)
class ToolCallArgs:
    """A fragment of the call's arguments, as JSON text. Concatenated, the fragments of one
    call are its arguments exactly as the model wrote them (or, for XML-style formats, the JSON
    the parser built from them); repair and validation happen later, on the whole."""

    index: int
    fragment: str


@dataclass(slots=True, frozen=True)
class ToolCallEnd:
    """The call is complete (its closing marker was seen, or the stream ended: then
    ``truncated`` is true)."""

    index: int
    truncated: bool = False


Event = Text | Reasoning | ToolCallStart | ToolCallArgs | ToolCallEnd
