"""The relay's diverted path (``relay._diverted``): past the first chunk, each upstream chunk is
handled in the upstream socket's callback. These tests make sure it is the path taken, and that
a whole stream, a slow client and every mid-stream failure come out as on the task's path."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import Stack, StackFactory
from toolmend.pipeline import relay

MSG = [{"role": "user", "content": "hello"}]
STORY = "Once upon a time " * 40
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture
def diverted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the streams that took the diverted path."""
    taken: list[int] = []
    real = relay._diverted

    async def counting(*a: Any, **kw: Any) -> None:
        taken.append(1)
        await real(*a, **kw)

    monkeypatch.setattr(relay, "_diverted", counting)
    return taken


async def _stream(st: Stack, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.post(st.url + path, json=body) as r:
        return r.status, await r.read()


def _chat_text(raw: bytes) -> str:
    text = ""
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            for c in orjson.loads(line[6:]).get("choices") or ():
                text += (c.get("delta") or {}).get("content") or ""
    return text


@pytest.mark.parametrize("tools", [False, True])
async def test_whole_chat_stream_takes_the_diverted_path(make_stack: StackFactory,
                                                         diverted: list[int],
                                                         tools: bool) -> None:
    st = await make_stack()
    st.sim.push({"content": STORY})
    body: dict[str, Any] = {"messages": MSG, "stream": True}
    if tools:
        body["tools"] = TOOLS
    status, raw = await _stream(st, "/v1/chat/completions", body)
    assert status == 200 and diverted == [1]
    assert _chat_text(raw) == STORY
    assert raw.endswith(b"data: [DONE]\n\n")


async def test_messages_stream_takes_the_diverted_path(make_stack: StackFactory,
                                                       diverted: list[int]) -> None:
    st = await make_stack()
    st.sim.push({"content": STORY})
    status, raw = await _stream(st, "/v1/messages", {"model": "m", "max_tokens": 500,
                                                     "messages": MSG, "stream": True})
    assert status == 200 and diverted == [1]
    text = "".join(orjson.loads(line[6:])["delta"]["text"] for line in raw.split(b"\n")
                   if line.startswith(b"data: {") and b'"text_delta"' in line)
    assert text == STORY
    assert raw.rstrip().endswith(b'data: {"type":"message_stop"}')


@pytest.mark.parametrize(("scenario", "settings", "code"), [
    # the chunks come apart (token_delay), so the fault is not in the read that diverts
    ({"content": STORY, "fault": {"kind": "reset", "after": 3}, "token_delay": 0.01}, {},
     "upstream_disconnected"),
    ({"content": STORY, "fault": {"kind": "stall", "after": 3, "seconds": 30},
      "token_delay": 0.01}, {"idle_timeout": 0.3}, "upstream_idle_timeout"),
    ({"content": STORY, "fault": {"kind": "malformed", "after": 3}, "token_delay": 0.01}, {},
     "upstream_malformed_event"),
    ({"content": STORY, "fault": {"kind": "error_event", "after": 3, "message": "CUDA OOM"},
      "token_delay": 0.01}, {}, "upstream_stream_error"),
    ({"fault": {"kind": "endless"}, "token_delay": 0.002}, {"total_timeout": 0.5},
     "upstream_total_timeout"),
], ids=["reset", "stall", "malformed", "error event", "endless"])
async def test_mid_stream_failures_on_the_diverted_path(make_stack: StackFactory,
                                                        diverted: list[int],
                                                        scenario: dict[str, Any],
                                                        settings: dict[str, Any],
                                                        code: str) -> None:
    st = await make_stack(**settings)
    st.sim.push(scenario)
    status, raw = await _stream(st, "/v1/chat/completions", {"messages": MSG, "stream": True})
    assert status == 200 and diverted == [1]
    errors = [orjson.loads(line[6:])["error"] for line in raw.split(b"\n")
              if line.startswith(b'data: {"error"')]
    assert [e["code"] for e in errors] == [code]
    assert raw.endswith(b"data: [DONE]\n\n")
    assert st.sim.stats.in_flight == 0 or scenario["fault"]["kind"] == "stall"
