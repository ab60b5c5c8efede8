"""Client side of the real-stack tests: what an agent sees, read two ways.

- :func:`sdk_stream` reads with the openai SDK and accumulates the way agent frameworks do
  (concatenating every ``name``, ``id`` and ``arguments`` fragment), so a server that repeats
  the name in every chunk shows up as ``get_weatherget_weather``;
- :func:`raw_stream` reads the SSE bytes itself, to see what the SDK hides or refuses: SSE
  comments (toolmend's repair notes), an ``error`` event, deprecated ``function_call`` deltas.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai

from .stacks import Server

TOOL_MODE = "X-Toolmend-Tool-Mode"
ON_INVALID = "X-Toolmend-On-Invalid"

WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city",
    "parameters": WEATHER_SCHEMA}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TOOLS = [WEATHER, TIME]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]
_REGEX_SPECIAL = set("\\.^$*+?{}[]()|")


def literal(text: str) -> str:
    """A regex matching exactly ``text``: the only output the model is then allowed to write
    (``structured_outputs: {"regex": ...}`` with greedy decoding)."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("\\n")
        elif ch in _REGEX_SPECIAL:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def few_shot(question: str = "What is the weather in Lima?") -> list[dict[str, Any]]:
    """Two earlier tool-call rounds in the history: a base model then makes a real, unforced
    call of its own (measured on Gemma 270M), which a plain question does not get."""
    msgs: list[dict[str, Any]] = []
    for i, city in enumerate(("Oslo", "Paris")):
        msgs += [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call_{i}", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": '{"temp_c": 12}'},
            {"role": "assistant", "content": f"It is 12 °C in {city}."},
        ]
    msgs.append({"role": "user", "content": question})
    return msgs


@dataclass
class Proxy:
    """toolmend started in front of one real server."""

    url: str
    server: Server
    app: Any = None  # the aiohttp Application, to look at its scheduler

    @property
    def v1(self) -> str:
        return self.url + "/v1"


@dataclass
class Streamed:
    """A stream as an SDK-style accumulator sees it."""

    calls: list[dict[str, str]] = field(default_factory=list)
    content: str = ""
    finish: str | None = None
    function_call_deltas: int = 0  # deprecated ``function_call`` fragments seen
    chunks: int = 0

    def args(self, i: int = 0) -> Any:
        return json.loads(self.calls[i]["arguments"])


def client(base_v1: str, timeout: float = 300) -> openai.AsyncOpenAI:
    """No retries: a retried request would hide what the first answer was."""
    return openai.AsyncOpenAI(base_url=base_v1, api_key="unused", max_retries=0,
                              timeout=timeout)


async def sdk_stream(base_v1: str, *, headers: dict[str, str] | None = None,
                     **body: Any) -> Streamed:
    body.setdefault("model", "gemma")
    out = Streamed()
    calls: dict[int, dict[str, str]] = {}
    async with client(base_v1) as c:
        stream = await c.chat.completions.create(stream=True, extra_headers=headers or {},
                                                 **body)
        async for ch in stream:
            _accumulate(out, calls, ch)
    out.calls = [calls[i] for i in sorted(calls)]
    return out


def _accumulate(out: Streamed, calls: dict[int, dict[str, str]], ch: Any) -> None:
    """Fold one chunk in the way agent frameworks do: every fragment is concatenated."""
    out.chunks += 1
    for c in ch.choices:
        d = c.delta
        out.content += d.content or ""
        if d.function_call is not None:
            out.function_call_deltas += 1
        for tc in d.tool_calls or ():
            slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            slot["id"] += tc.id or ""
            if tc.function is not None:
                slot["name"] += tc.function.name or ""
                slot["arguments"] += tc.function.arguments or ""
        out.finish = c.finish_reason or out.finish


@dataclass
class RawStream:
    """Every SSE event and comment of one streamed response, and its HTTP status."""

    status: int
    events: list[Any] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    done: bool = False
    body: Any = None  # the JSON body when the response was not a stream (an early error)

    @property
    def error(self) -> dict[str, Any] | None:
        if isinstance(self.body, dict) and "error" in self.body:
            return self.body["error"]
        for e in self.events:
            if isinstance(e, dict) and "error" in e:
                return e["error"]
        return None

    @property
    def finish(self) -> str | None:
        reason = None
        for e in self.events:
            for c in (e.get("choices") or ()) if isinstance(e, dict) else ():
                reason = c.get("finish_reason") or reason
        return reason

    def tool_calls(self) -> list[dict[str, str]]:
        calls: dict[int, dict[str, str]] = {}
        for e in self.events:
            for c in (e.get("choices") or ()) if isinstance(e, dict) else ():
                for tc in (c.get("delta") or {}).get("tool_calls") or ():
                    slot = calls.setdefault(tc.get("index", 0),
                                            {"id": "", "name": "", "arguments": ""})
                    fn = tc.get("function") or {}
                    slot["id"] += tc.get("id") or ""
                    slot["name"] += fn.get("name") or ""
                    slot["arguments"] += fn.get("arguments") or ""
        return [calls[i] for i in sorted(calls)]

    def content(self) -> str:
        return "".join((c.get("delta") or {}).get("content") or ""
                       for e in self.events if isinstance(e, dict)
                       for c in e.get("choices") or ())


async def raw_stream(base_v1: str, body: dict[str, Any], *,
                     headers: dict[str, str] | None = None, timeout: float = 300) -> RawStream:
    body = {"model": "gemma", "stream": True, **body}
    t = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=t) as s, \
            s.post(base_v1 + "/chat/completions", json=body, headers=headers or {}) as r:
        out = RawStream(r.status)
        if "text/event-stream" not in r.headers.get("Content-Type", ""):
            out.body = await r.json(content_type=None)
            return out
        buf = b""
        async for piece in r.content.iter_any():
            buf += piece
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode("utf-8").rstrip("\r")
                if text.startswith(":"):
                    out.comments.append(text[1:].strip())
                elif text.startswith("data:"):
                    data = text[5:].strip()
                    if data == "[DONE]":
                        out.done = True
                    elif data:
                        out.events.append(json.loads(data))
        return out


async def post_json(base_v1: str, body: dict[str, Any], *,
                    headers: dict[str, str] | None = None,
                    timeout: float = 300) -> tuple[int, Any]:
    """A non-streaming request; status and JSON body (errors included, unlike the SDK)."""
    body = {"model": "gemma", **body}
    t = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=t) as s, \
            s.post(base_v1 + "/chat/completions", json=body, headers=headers or {}) as r:
        return r.status, await r.json(content_type=None)
