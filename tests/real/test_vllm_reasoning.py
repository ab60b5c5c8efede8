"""A call the model drafts inside its reasoning never fires: proved on the real vLLM server.

vLLM 0.32 (CPU build) runs with its qwen3 reasoning parser and structured outputs inside
reasoning (``stacks.VLLM_REASONING_ARGS``, the same launch as every vLLM test). Each reply is
forced with ``structured_outputs: {"regex": ...}``; a ``logit_bias`` on the ``<think>`` and
``</think>`` tokens makes the constrained model write them as the single tokens the converted
tokenizer has for them (``convert_gguf.py``), since vLLM's reasoning parser only acts on those
tokens. Then vLLM splits the reply the way it does for any Qwen3-style model:

- its reasoning parser ends the reasoning at ``<tool_call>`` written inside ``<think>``;
- with ``tool_choice: "auto"``, its hermes parser then emits the drafted call as a real call,
  next to the real one, and drops the text between them (the ``direct`` controls below);
- through toolmend (``server_tool_parser`` auto: bypass on vLLM), the agent gets exactly the
  calls the model meant, the drafted call's text stays reasoning, and no ``</think>`` is left in
  ``content``: streamed (buffered and incremental) and not.

The cases and their expected client output are ``reasoning_cases.py``: the README's decision
table, row by row, where the real server can be made to produce the row.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest

from .helpers import TOOL_MODE, post_json, raw_stream
from .reasoning_cases import BY_NAME, CASES, Case, tokens_through
from .stacks import Server

pytestmark = pytest.mark.real

WAYS = ["buffered", "incremental", "whole"]


@pytest.fixture(scope="session")
def think_bias(vllm: Server) -> dict[str, int]:
    """``logit_bias`` for the ``<think>`` and ``</think>`` tokens; asserting on the way that the
    served tokenizer has each as one token."""
    req = urllib.request.Request(
        vllm.url + "/tokenize", headers={"Content-Type": "application/json"},
        data=json.dumps({"model": "gemma", "prompt": "<think></think>",
                         "add_special_tokens": False}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        doc = json.loads(r.read())
    assert len(doc["tokens"]) == 2, doc
    return {str(t): 100 for t in doc["tokens"]}


_limits: dict[str, int] = {}


async def body_for(vllm: Server, case: Case, bias: dict[str, int], **extra: Any
                   ) -> dict[str, Any]:
    """The case's request; a case cut by ``max_tokens`` gets the count measured from the
    tokens of its whole reply (once per session)."""
    limit = case.max_tokens
    if case.cut_after:
        if case.name not in _limits:
            status, doc = await post_json(vllm.v1, case.request(
                logit_bias=bias, logprobs=True, tool_choice="none"))
            assert status == 200, doc
            tokens = [t["token"] for t in doc["choices"][0]["logprobs"]["content"]]
            _limits[case.name] = tokens_through(tokens, case.cut_after)
        limit = _limits[case.name]
    return case.request(logit_bias=bias, max_tokens=limit, **extra)


def view_stream(raw: Any) -> dict[str, Any]:
    """What the agent got from a stream: calls (name, parsed arguments), each reasoning field,
    content, finish reason."""
    assert raw.error is None, raw.error
    assert raw.done
    fields: dict[str, str] = {}
    for e in raw.events:
        for c in e.get("choices") or ():
            for k in ("reasoning", "reasoning_content", "content"):
                text = (c.get("delta") or {}).get(k)
                if text:
                    fields[k] = fields.get(k, "") + text
    calls = [{"name": c["name"], "arguments": json.loads(c["arguments"])}
             for c in raw.tool_calls()]
    return {"calls": calls, **{k: v for k, v in fields.items() if k != "content"},
            "content": fields.get("content", ""), "finish": raw.finish}


def view_whole(doc: dict[str, Any]) -> dict[str, Any]:
    choice = doc["choices"][0]
    msg = choice["message"]
    calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
             for c in msg.get("tool_calls") or ()]
    return {"calls": calls, **{k: msg[k] for k in ("reasoning", "reasoning_content")
                               if msg.get(k)},
            "content": msg.get("content") or "", "finish": choice["finish_reason"]}


def expected(case: Case) -> dict[str, Any]:
    out: dict[str, Any] = {"calls": case.calls}
    if case.reasoning:
        out["reasoning"] = case.reasoning
    out.update(content=case.content, finish=case.finish)
    return out


async def through(base_v1: str, body: dict[str, Any], way: str) -> dict[str, Any]:
    if way == "whole":
        status, doc = await post_json(base_v1, body)
        assert status == 200, doc
        return view_whole(doc)
    return view_stream(await raw_stream(base_v1, body, headers={TOOL_MODE: way}))


async def test_reasoning_tokens_are_single_tokens_vllm_splits_at(vllm: Server,
                                                                 think_bias: dict[str, int]
                                                                 ) -> None:
    """Control for the set-up: a plain thinking reply is split by vLLM itself at the
    ``</think>`` token, and the end marker is gone from ``content``."""
    case = BY_NAME["thinking_then_text"]
    direct = view_stream(await raw_stream(vllm.v1, await body_for(vllm, case, think_bias)))
    assert direct == {"calls": [], "reasoning": "No tool is needed for this.",
                      "content": "It is sunny in Bergen.", "finish": "stop"}


async def test_vllm_fires_the_drafted_call(vllm: Server, think_bias: dict[str, int]) -> None:
    """The bug, on the real server, streamed and not: the call drafted inside ``<think>`` comes
    out as a real call beside the real one, and `` but no.</think>`` is gone."""
    case = BY_NAME["drafted_call_then_call"]
    body = await body_for(vllm, case, think_bias)
    both = {"calls": [{"name": "get_time", "arguments": {"city": "Bergen"}},
                      {"name": "get_weather", "arguments": {"city": "Bergen"}}],
            "reasoning": "The user asks about the weather. I could call ", "content": "",
            "finish": "tool_calls"}
    assert view_stream(await raw_stream(vllm.v1, body)) == both
    status, doc = await post_json(vllm.v1, body)
    assert status == 200, doc
    assert view_whole(doc) == both


@pytest.mark.parametrize("way", WAYS)
async def test_drafted_call_never_fires_through_toolmend(make_proxy: Any, vllm: Server,
                                                         think_bias: dict[str, int],
                                                         way: str) -> None:
    """The issue's case: exactly one call, ``get_weather {"city": "Bergen"}``; the drafted
    ``get_time`` text is in the reasoning field; no ``</think>`` in ``content``."""
    case = BY_NAME["drafted_call_then_call"]
    proxy = await make_proxy(vllm)
    got = await through(proxy.v1, await body_for(vllm, case, think_bias), way)
    assert got == {
        "calls": [{"name": "get_weather", "arguments": {"city": "Bergen"}}],
        "reasoning": 'The user asks about the weather. I could call <tool_call>\n{"name": '
                     '"get_time", "arguments": {"city": "Bergen"}}\n</tool_call> but no.',
        "content": "", "finish": "tool_calls"}
    assert "</think>" not in got["content"]


ROWS = [c for c in CASES if c.name != "drafted_call_then_call"]


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("case", ROWS, ids=[c.name for c in ROWS])
async def test_decision_table_on_the_real_server(make_proxy: Any, vllm: Server,
                                                 think_bias: dict[str, int], case: Case,
                                                 way: str) -> None:
    """Every row of the decision table the real server can be made to produce, and the two
    plain thinking replies, through toolmend in front of vLLM's own reasoning split."""
    proxy = await make_proxy(vllm)
    got = await through(proxy.v1, await body_for(vllm, case, think_bias), way)
    assert got == expected(case)
    assert "</think>" not in got["content"]


async def test_trust_relays_vllms_own_split(make_proxy: Any, vllm: Server,
                                            think_bias: dict[str, int]) -> None:
    """``server_tool_parser = "trust"`` keeps the requests as the client sent them and relays
    vLLM's parsed calls: the drafted call fires, as it does without toolmend."""
    case = BY_NAME["drafted_call_then_call"]
    proxy = await make_proxy(vllm, server_tool_parser="trust")
    got = await through(proxy.v1, await body_for(vllm, case, think_bias), "buffered")
    assert [c["name"] for c in got["calls"]] == ["get_time", "get_weather"]
