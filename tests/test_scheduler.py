"""FairScheduler, the fair queue's asyncio driver: ``slot()``, the hold timer, and how it is
built from the settings and the request's headers. The rules themselves: test_fair_queue.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from toolmend.scheduling.scheduler import (
    AgentPolicy,
    Cost,
    FairScheduler,
    Limits,
    TicketState,
    estimate_cost,
    load_agent_policies,
    parse_deadline,
)
from toolmend.scheduling.service import ServiceModel
from toolmend.server.context import RequestContext
from toolmend.server.errors import ProxyError

from .queue_sim import Clock, fixed_service

BIG = Cost(1000, 500)


def make(slots: int = 1, clock: Clock | None = None, **kw: object) -> tuple[FairScheduler, Clock]:
    clock = clock or Clock()
    kw.setdefault("express_slot", False)
    return FairScheduler(slots, clock=clock, **kw), clock  # type: ignore[arg-type]


# --- configuration ----------------------------------------------------------------------------

def test_agents_sections_from_the_config_file(tmp_path: Path) -> None:
    f = tmp_path / "toolmend.toml"
    f.write_text('port = 9000\n[agents.planner]\nweight = 2\npriority = 1\n'
                 'max-priority = 2\n[agents."*"]\nmax_queue = 8\n')
    pol = load_agent_policies(f)
    assert pol.get("planner") == AgentPolicy(weight=2.0, priority=1, max_priority=2)
    assert pol.get("other").max_queue == 8
    assert load_agent_policies("").get("x") == AgentPolicy()
    f.write_text("[agents.x]\nweight = 0\n")
    with pytest.raises(ValueError, match="weight"):
        load_agent_policies(f)
    f.write_text("[agents.x]\nspeed = 3\n")
    with pytest.raises(ValueError, match="unknown key 'speed'"):
        load_agent_policies(f)


def test_settings_keep_the_config_path_and_new_options(tmp_path: Path) -> None:
    from toolmend.server.config import Settings

    f = tmp_path / "t.toml"
    f.write_text("slots = 2\nqueue_ttl = 5\n[agents.a]\nweight = 3\n")
    st = Settings.load(config_path=str(f), environ={"TOOLMEND_EXPRESS_SLOT": "false"})
    assert st.slots == 2 and st.queue_ttl == 5.0 and st.express_slot is False
    assert st.config_path == str(f)
    from toolmend.scheduling.scheduler import scheduler_from_settings

    s = scheduler_from_settings(st)
    assert s.slots == 2 and not s.express and s.policies.get("a").weight == 3.0


def test_estimate_cost() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 32}
    c = estimate_cost(body, b"x" * 480)
    assert c == Cost(120, 32)
    assert estimate_cost({"max_completion_tokens": True}, b"").max_tokens is None


# --- the asyncio wrapper ----------------------------------------------------------------------

def _ctx(agent: str) -> RequestContext:
    ctx = RequestContext("req", "/v1/chat/completions", 0.0)
    ctx.agent_id = agent
    return ctx


async def test_slot_waits_then_runs_and_releases() -> None:
    s, _ = make(1)
    order: list[str] = []

    async def job(agent: str, gate: asyncio.Event) -> None:
        ctx = _ctx(agent)
        async with s.slot(ctx, BIG):
            order.append(agent)
            assert ctx.dispatched_at is not None and ctx.queued_at is not None
            await gate.wait()

    g1, g2 = asyncio.Event(), asyncio.Event()
    t1 = asyncio.create_task(job("a", g1))
    t2 = asyncio.create_task(job("b", g2))
    await asyncio.sleep(0)
    assert order == ["a"] and s.queued == 1
    g1.set()
    await t1
    await asyncio.sleep(0)
    assert order == ["a", "b"]
    g2.set()
    await t2
    assert s.in_flight == 0 and s.queued == 0


async def test_slot_cancelled_while_queued_never_runs() -> None:
    s, _ = make(1)
    hold = s.submit("a", BIG)
    ran = []

    async def job() -> None:
        async with s.slot(_ctx("b"), BIG):
            ran.append(True)

    task = asyncio.create_task(job())
    await asyncio.sleep(0)
    assert s.queued == 1
    task.cancel()
    # the slot frees before the waiter has run its cleanup: it must still not dispatch
    assert s.release(hold) == []
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ran == [] and s.queued == 0 and s.in_flight == 0


async def test_slot_cancelled_while_running_frees_the_slot() -> None:
    s, _ = make(1)

    async def job() -> None:
        async with s.slot(_ctx("a"), BIG):
            await asyncio.Event().wait()

    task = asyncio.create_task(job())
    await asyncio.sleep(0)
    assert s.in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert s.in_flight == 0


async def test_slot_expiry_wakes_the_waiter_with_503() -> None:
    s, clock = make(1, limits=Limits(queue_ttl=10))
    s.submit("a", BIG)

    async def job() -> None:
        async with s.slot(_ctx("b"), BIG):
            pass

    task = asyncio.create_task(job())
    await asyncio.sleep(0)
    clock.advance(11)
    s.expire()
    with pytest.raises(ProxyError) as e:
        await task
    assert e.value.status == 503 and e.value.code == "queue_timeout"


async def test_slot_charges_usage_from_the_context() -> None:
    s, _ = make(1)
    ctx = _ctx("a")
    async with s.slot(ctx, Cost(100, 10)):
        ctx.usage = {"prompt_tokens": 120, "completion_tokens": 7}
    assert s.counter("a") == 120 + 14


async def test_slot_queues_by_session_and_learns_the_backends_speed() -> None:
    s, clock = make(1, service=ServiceModel())
    ctx = _ctx("a")
    ctx.session_id = "s1"
    async with s.slot(ctx, Cost(100, 10)) as t:
        assert t.session == "s1"
        assert ctx.dispatched_at is not None
        ctx.upstream_first_token_at = ctx.dispatched_at + 0.25
        clock.advance(0.5)
    assert s.service.first_token(100) == pytest.approx(0.25)


async def test_a_lapsed_hold_wakes_the_waiting_request() -> None:
    """The timer the driver arms for a held slot: when the session it was held for is late,
    the request held back runs without any other event."""
    s, clock = make(2, express_slot=True, service=fixed_service())
    step = s.submit("light", Cost(50, 3))
    clock.advance(0.04)
    s.release(step, output_tokens=3)
    clock.advance(0.02)
    step = s.submit("light", Cost(60, 3))  # its tool time, 0.02 s, is measured
    s.submit("heavy", Cost(300, 30))  # runs beside light's step
    started = asyncio.Event()

    async def heavy_waits() -> None:
        async with s.slot(_ctx("heavy"), Cost(300, 30)):
            started.set()

    task = asyncio.create_task(heavy_waits())
    await asyncio.sleep(0)
    assert s.queued == 1
    clock.advance(0.04)
    assert s.release(step, output_tokens=3) == []  # held for light, back in 0.02 s
    assert s.held_for() == [("light", "light")] and s.next_hold_lapse() is not None
    clock.advance(0.05)  # light is late
    await started.wait()
    await task
    assert s.held_for() == [] and s.next_hold_lapse() is None and s._timer is None


async def test_the_hold_timer_is_dropped_when_the_session_comes_back() -> None:
    s, clock = make(2, express_slot=True, service=fixed_service())
    step = s.submit("light", Cost(50, 3))
    clock.advance(0.04)
    s.release(step, output_tokens=3)
    clock.advance(0.02)
    step = s.submit("light", Cost(60, 3))
    heavy = [s.submit("heavy", Cost(300, 30)) for _ in range(2)]
    clock.advance(0.04)
    s.release(step, output_tokens=3)
    assert s._timer is not None
    clock.advance(0.02)
    assert s.submit("light", Cost(70, 3)).express
    assert s._timer is None and heavy[1].state is TicketState.QUEUED


# --- request headers --------------------------------------------------------------------------

def test_deadline_header_shortens_the_wait() -> None:
    s, clock = make(1, limits=Limits(queue_ttl=300))
    hold = s.submit("a", BIG)
    t = s.submit("b", BIG, deadline=parse_deadline("1500", clock()))
    clock.advance(1.6)
    assert s.expire() == [t]
    assert t.expiry_code == "deadline_exceeded"
    assert s.rejections["deadline_exceeded"] == 1
    s.release(hold)


def test_bad_deadline_header_is_400() -> None:
    for bad in ("soon", "-5", "nan"):
        with pytest.raises(ProxyError) as e:
            parse_deadline(bad, 0.0)
        assert e.value.status == 400
    assert parse_deadline(None, 5.0) is None
    assert parse_deadline("250", 5.0) == pytest.approx(5.25)
