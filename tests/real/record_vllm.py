"""Record the real vLLM server's replies to the reasoning cases, for the fast suite.

``python -m tests.real.record_vllm [URL]`` sends every case of ``reasoning_cases.py`` straight to
a vLLM server started as ``tests/real/stacks.py`` starts it (with no URL, it starts one), in the
shapes toolmend asks for: ``tool_choice: "auto"`` (what toolmend relays when it trusts the
server's parsers), streamed and not, and ``tool_choice: "none"`` streamed with special tokens kept
(what it asks for when it bypasses them). Each stream is saved as the list of its chunks'
``choices[0]`` (delta and finish reason), each whole reply as its ``choices[0]``, in
``fixtures/vllm/reasoning.json``; ``tests/test_server_tool_parser.py`` replays them from a
stand-in server. Run it again when the vLLM version changes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp

from . import stacks
from .reasoning_cases import CASES, Case, tokens_through

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "fixtures" / "vllm" / "reasoning.json"


async def think_bias(session: aiohttp.ClientSession, url: str) -> dict[str, int]:
    """``logit_bias`` that makes the constrained model write ``<think>`` and ``</think>`` as
    their single tokens (without it, Gemma spells them out character by character, which
    vLLM's reasoning parser rightly takes as plain text)."""
    async with session.post(url + "/tokenize", json={
            "model": "gemma", "prompt": "<think></think>", "add_special_tokens": False}) as r:
        doc = await r.json()
    tokens = doc["tokens"]
    if len(tokens) != 2:
        raise AssertionError(f"<think></think> is {tokens}, not two single tokens")
    return {str(t): 100 for t in tokens}


async def max_tokens(session: aiohttp.ClientSession, url: str, case: Case,
                     bias: dict[str, int]) -> int:
    """The case's ``max_tokens``: measured from the tokens of the whole reply when the case is
    cut after a prefix (greedy and constrained, the reply's tokens are the same every time)."""
    if not case.cut_after:
        return case.max_tokens
    body = {"model": "gemma", "tool_choice": "none", "logprobs": True,
            **case.request(logit_bias=bias)}
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        doc = await r.json()
    tokens = [t["token"] for t in doc["choices"][0]["logprobs"]["content"]]
    return tokens_through(tokens, case.cut_after)


async def ask(session: aiohttp.ClientSession, url: str, case: Case, bias: dict[str, int], *,
              stream: bool, tool_choice: str, limit: int) -> Any:
    body = {"model": "gemma", "stream": stream, "tool_choice": tool_choice,
            **case.request(logit_bias=bias, max_tokens=limit)}
    if tool_choice == "none":
        body["skip_special_tokens"] = False
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        raw = await r.read()
        if r.status != 200:
            raise AssertionError(f"{case.name}: HTTP {r.status}: {raw[:300]!r}")
    if not stream:
        choice = json.loads(raw)["choices"][0]
        return {k: choice[k] for k in ("message", "finish_reason")}
    out = []
    for line in raw.decode().splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                c = chunk["choices"][0]
                out.append({"delta": c.get("delta") or {}, "finish_reason": c.get("finish_reason")})
    return out


async def record(url: str) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        bias = await think_bias(s, url)
        async with s.get(url + "/version") as r:
            version = (await r.json())["version"]
        cases: dict[str, Any] = {}
        for case in CASES:
            limit = await max_tokens(s, url, case, bias)
            cases[case.name] = {
                "text": case.text, "max_tokens": limit,
                "trust_stream": await ask(s, url, case, bias, stream=True, tool_choice="auto",
                                          limit=limit),
                "trust_whole": await ask(s, url, case, bias, stream=False, tool_choice="auto",
                                         limit=limit),
                "bypass_stream": await ask(s, url, case, bias, stream=True, tool_choice="none",
                                           limit=limit),
            }
            print(case.name, flush=True)
    return {"vllm_version": version, "server": "tests/real/stacks.py start_vllm",
            "logit_bias": bias, "cases": cases}


def main(argv: list[str]) -> int:
    server = None
    if argv:
        url = argv[0].rstrip("/")
    else:
        server = stacks.start_vllm(ready_timeout=2400)
        url = server.url
    try:
        doc = asyncio.run(record(url))
    finally:
        if server is not None:
            server.stop()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
