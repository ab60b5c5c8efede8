"""Identity across an inference gateway, both ways (proxy/server/gateway.py).

In front of a gateway, toolmend sends the agent as ``x-gateway-inference-fairness-id`` and the
priority class as an InferenceObjective name; behind a trusted one, it reads them back as the
agent and the class. Each case runs the real proxy in front of the sim and reads what the sim
received (headers, and the class in vLLM's ``priority`` field) or what toolmend recorded.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import Stack, StackFactory
from toolmend.server.app import build_app, start_server
from toolmend.server.config import Settings
from toolmend.server.gateway import GatewayConfig
from toolmend.sim.server import SimBackend

MSG = [{"role": "user", "content": "plan the trip"}]
FAIR = "x-gateway-inference-fairness-id"
OBJ = "x-gateway-inference-objective"


async def chat(url: str, headers: dict[str, str] | None = None, status: int = 200,
               stream: bool = False) -> Any:
    async with aiohttp.ClientSession() as s, s.post(
            url + "/v1/chat/completions", headers=headers or {},
            json={"model": "sim-model", "messages": MSG, "stream": stream}) as r:
        body = await r.read()
        assert r.status == status, body
        return body


async def sessions(url: str) -> list[dict[str, Any]]:
    while True:  # a step is recorded once its reply was written: wait for it
        async with aiohttp.ClientSession() as s, s.get(url + "/toolmend/v1/sessions") as r:
            data = (await r.json())["data"]
        if data:
            return data
        await asyncio.sleep(0.01)


# --- in front of a gateway ----------------------------------------------------------------------

async def test_gateway_upstream_gets_the_agent_and_the_objective(
        make_stack: StackFactory) -> None:
    stack = await make_stack(gateway_upstream=True)
    await chat(stack.url, {"X-Agent-Id": "planner"})
    sent = stack.sim.stats.headers[-1]
    assert sent[FAIR] == "planner"
    assert sent[OBJ] == "priority-0"


async def test_objective_names_come_from_the_table_and_lower_classes_travel(
        make_stack: StackFactory) -> None:
    stack = await make_stack(gateway_upstream=True, objectives=["-1=batch-sheddable"])
    await chat(stack.url, {"X-Agent-Id": "batch", "X-Priority": "-1"})
    assert stack.sim.stats.headers[-1][OBJ] == "batch-sheddable"
    await chat(stack.url, {"X-Agent-Id": "batch", "X-Priority": "-2"})
    assert stack.sim.stats.headers[-1][OBJ] == "priority--2"


async def test_header_names_are_configurable(make_stack: StackFactory) -> None:
    stack = await make_stack(gateway_upstream=True, fairness_header="x-tenant",
                             objective_header="x-llm-d-inference-objective")
    await chat(stack.url, {"X-Agent-Id": "coder"}, stream=True)
    sent = stack.sim.stats.headers[-1]
    assert sent["x-tenant"] == "coder"
    assert sent["x-llm-d-inference-objective"] == "priority-0"
    assert FAIR not in sent and OBJ not in sent


async def test_a_client_cannot_pick_its_fairness_id_through_toolmend(
        make_stack: StackFactory) -> None:
    stack = await make_stack(gateway_upstream=True)
    await chat(stack.url, {"X-Agent-Id": "planner", FAIR: "someone-else", OBJ: "realtime"})
    sent = stack.sim.stats.headers[-1]
    assert sent[FAIR] == "planner" and sent[OBJ] == "priority-0"


async def test_no_gateway_headers_without_the_setting(stack: Stack) -> None:
    await chat(stack.url, {"X-Agent-Id": "planner", FAIR: "planner"})
    sent = stack.sim.stats.headers[-1]
    assert FAIR not in sent and OBJ not in sent


# --- behind a gateway ---------------------------------------------------------------------------

async def test_a_trusted_gateway_names_agent_and_class(make_stack: StackFactory) -> None:
    stack = await make_stack(trusted_gateways=["127.0.0.0/8"], vllm_priority=True,
                             objectives=["7=realtime"])
    # the objective is final: above the ceiling X-Priority is held to (0), and over X-Agent-Id
    await chat(stack.url, {FAIR: "team-a", OBJ: "realtime", "X-Agent-Id": "other",
                           "X-Priority": "1"})
    [rec] = await sessions(stack.url)
    assert rec["agent_id"] == "team-a"
    # vLLM serves lower values first: -(2 x class), one less for a loop step
    assert stack.sim.stats.bodies[-1]["priority"] == -14


async def test_a_trusted_gateway_default_objective_names(make_stack: StackFactory) -> None:
    stack = await make_stack(trusted_gateways=["127.0.0.1"], vllm_priority=True)
    await chat(stack.url, {FAIR: "team-b", OBJ: "priority-3"})
    assert stack.sim.stats.bodies[-1]["priority"] == -6
    await chat(stack.url, {FAIR: "team-b", OBJ: "no-such-objective"})
    assert stack.sim.stats.bodies[-1]["priority"] == 0  # the agent's own class


async def test_without_an_objective_x_priority_still_counts(make_stack: StackFactory) -> None:
    stack = await make_stack(trusted_gateways=["127.0.0.1"], vllm_priority=True)
    await chat(stack.url, {FAIR: "team-c", "X-Priority": "-4"})
    assert stack.sim.stats.bodies[-1]["priority"] == 8


async def test_an_untrusted_sender_is_not_believed(make_stack: StackFactory) -> None:
    stack = await make_stack(trusted_gateways=["10.0.0.0/8"], vllm_priority=True)
    await chat(stack.url, {FAIR: "team-a", OBJ: "priority-9", "X-Agent-Id": "me"})
    [rec] = await sessions(stack.url)
    assert rec["agent_id"] == "me"
    assert stack.sim.stats.bodies[-1]["priority"] == 0


async def test_an_empty_or_non_text_fairness_id_falls_through(make_stack: StackFactory) -> None:
    stack = await make_stack(trusted_gateways=["127.0.0.1"])
    await chat(stack.url, {FAIR: "   ", "X-Agent-Id": "fallback"})
    [rec] = await sessions(stack.url)
    assert rec["agent_id"] == "fallback"


async def test_both_ways_toolmend_behind_toolmend() -> None:
    """A toolmend in front of a gateway, and one behind it: the agent and the class survive
    the hop (the inner one plays the model-server sidecar, trusting the outer one)."""
    sim = SimBackend("vllm", ttft=0.0)
    await sim.start()
    inner_conf = Settings(log_requests=False, trusted_gateways=["127.0.0.1"],
                          vllm_priority=True, objectives=["-1=sheddable"])
    inner, inner_port = await start_server(build_app(inner_conf, [sim.url]), "127.0.0.1", 0)
    outer_conf = Settings(log_requests=False, gateway_upstream=True, backend="vllm",
                          objectives=["-1=sheddable"])
    inner_url = f"http://127.0.0.1:{inner_port}"
    outer, outer_port = await start_server(build_app(outer_conf, [inner_url]), "127.0.0.1", 0)
    try:
        await chat(f"http://127.0.0.1:{outer_port}",
                   {"X-Agent-Id": "nightly-batch", "X-Priority": "-1"})
        [rec] = await sessions(inner_url)
        assert rec["agent_id"] == "nightly-batch"
        assert sim.stats.bodies[-1]["priority"] == 2
    finally:
        await outer.cleanup()
        await inner.cleanup()
        await sim.stop()


# --- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "named"), [
    ({"objectives": ["ten=realtime"]}, "objectives"),
    ({"objectives": ["10"]}, "objectives"),
    ({"objectives": ["10=Real Time"]}, "objectives"),
    ({"objectives": ["1=a", "1=b"]}, "priority 1 is named twice"),
    ({"objectives": ["1=a", "2=a"]}, "two priorities"),
    ({"trusted_gateways": ["10.0.0.0/33"]}, "trusted_gateways"),
    ({"fairness_header": "bad header"}, "fairness_header"),
    ({"objective_header": ""}, "objective_header"),
])
def test_bad_gateway_options_are_named(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        GatewayConfig.from_settings(Settings(**kwargs))


def test_objective_names_both_ways() -> None:
    gw = GatewayConfig.from_settings(Settings(objectives=["10=realtime", "-1=sheddable"]))
    assert gw.objective(10) == "realtime"
    assert gw.objective(-1) == "sheddable"
    assert gw.objective(3) == "priority-3"
    assert gw.priority("realtime") == 10
    assert gw.priority("priority--5") == -5
    assert gw.priority("priority-") is None
    assert gw.priority("Realtime") is None


@given(st.integers(min_value=-10**9 + 1, max_value=10**9 - 1))
def test_every_class_round_trips(p: int) -> None:
    gw = GatewayConfig()
    assert gw.priority(gw.objective(p)) == p


@given(st.text(max_size=300))
def test_any_objective_text_is_a_class_or_none(text: str) -> None:
    p = GatewayConfig().priority(text)
    assert p is None or isinstance(p, int)


@given(st.lists(st.text(max_size=40), max_size=5))
def test_any_objectives_option_parses_or_is_refused_by_name(entries: list[str]) -> None:
    try:
        gw = GatewayConfig.from_settings(Settings(objectives=entries))
    except ValueError as e:
        assert "objectives" in str(e)
    else:
        for p, name in gw.names.items():
            assert gw.priority(name) == p
