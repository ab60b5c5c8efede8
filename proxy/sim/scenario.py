"""A scripted response for the simulated backend: what the "model" says and how it misbehaves.

A scenario is plain data (JSON in ``fixtures/``), so tests, benchmarks, the demo and users
script the simulator the same way.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

_TOKEN = re.compile(r"\s*[^\s]{1,5}|\s+", re.S)

FAULTS = ("refuse", "reset", "stall", "status", "malformed", "truncated", "endless",
          "error_event",
          # waits, its slot held, until the test opens the sim's gate (SimBackend.open_gate):
          # before the first token (after 0) or after ``after`` chunks
          "hold",
          # hostile upstreams (each strikes right after the response headers): stop there by
          # reset or stall, reset in the middle of a non-streaming body, send one SSE event of
          # ``size`` bytes of data: lines that never ends, one SSE line of ``size`` bytes,
          # content that is not UTF-8, or a non-streaming reply of ``size`` bytes
          "headers_then_reset", "headers_then_stall", "reset_mid_body", "unterminated_event",
          "huge_line", "invalid_utf8", "huge_body")


@dataclass
class Fault:
    kind: str
    after: int = 0  # chunks sent before the fault strikes (stream faults)
    status: int = 500  # for kind "status"
    seconds: float = 3600.0  # for kind "stall"
    message: str = "simulated failure"
    times: int = 1  # consecutive requests the fault strikes (a proxy may resend)
    size: int = 0  # bytes, for the faults that send a lot

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fault:
        if d.get("kind") not in FAULTS:
            raise ValueError(f"fault kind must be one of {FAULTS}, got {d.get('kind')!r}")
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class SimToolCall:
    name: str
    arguments: str  # raw argument text, exactly as the model would produce it
    id: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SimToolCall:
        args = d.get("arguments", "{}")
        if not isinstance(args, str):
            import json
            args = json.dumps(args, ensure_ascii=False)
        return cls(name=d["name"], arguments=args, id=d.get("id"))


@dataclass
class Scenario:
    """One scripted reply.

    ``content`` is streamed as content deltas (raw text, markers and all, as a backend without a
    tool parser would). ``tool_calls`` are streamed as structured deltas in the dialect's own
    shape. ``chunks`` gives the exact content deltas instead of automatic token-like splitting.
    ``quirks`` turn on a real server's known bugs (see ``dialects.py``).
    """

    name: str = "default"
    content: str = ""
    reasoning: str = ""
    tool_calls: list[SimToolCall] = field(default_factory=list)
    chunks: list[str] | None = None
    finish_reason: str | None = None
    ttft: float | None = None
    token_delay: float | None = None
    prompt_tokens: int | None = None
    fault: Fault | None = None
    quirks: dict[str, Any] = field(default_factory=dict)
    wire_split_seed: int | None = None  # write each event's bytes in random small pieces
    match: str | None = None  # pick this scenario when the last user message contains it
    # ... and/or when the conversation holds exactly this many tool results: scripts an agent
    # loop step by step, independent of how many requests a client (or a retry) makes
    step: int | None = None

    def __post_init__(self) -> None:
        if self.chunks is not None and not self.content:
            self.content = "".join(self.chunks)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scenario:
        d = dict(d)
        sc = cls()
        for k in ("name", "content", "reasoning", "finish_reason", "ttft", "token_delay",
                  "prompt_tokens", "wire_split_seed", "match", "step"):
            if k in d:
                setattr(sc, k, d[k])
        if "chunks" in d:
            sc.chunks = [str(c) for c in d["chunks"]]
            if not sc.content:
                sc.content = "".join(sc.chunks)
        sc.tool_calls = [SimToolCall.from_dict(t) for t in d.get("tool_calls", ())]
        if d.get("fault"):
            sc.fault = Fault.from_dict(d["fault"])
        sc.quirks = dict(d.get("quirks", {}))
        return sc

    def content_pieces(self) -> list[str]:
        if self.chunks is not None:
            return [c for c in self.chunks if c]
        return split_tokens(self.content)

    def final_reason(self) -> str:
        if self.finish_reason:
            return self.finish_reason
        return "tool_calls" if self.tool_calls else "stop"


def split_tokens(text: str) -> list[str]:
    """Cut text into token-sized pieces (about one short word each), losslessly."""
    return _TOKEN.findall(text) if text else []


def random_cuts(data: bytes, rng: random.Random, max_piece: int = 7) -> list[bytes]:
    out = []
    i = 0
    while i < len(data):
        n = rng.randint(1, max_piece)
        out.append(data[i:i + n])
        i += n
    return out


LOREM = ("Local models are fast enough for agents when the proxy in front of them keeps "
         "tool calls intact and the queue fair . ").split(" ")


def lorem(n_tokens: int) -> list[str]:
    words = [w for w in LOREM if w]
    return [(" " if i else "") + words[i % len(words)] for i in range(n_tokens)]
