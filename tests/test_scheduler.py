"""FairScheduler as a state machine on a virtual clock: every rule, no sleeps."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from toolmend.scheduling.scheduler import (
    AgentPolicies,
    AgentPolicy,
    Cost,
    FairScheduler,
    Limits,
    TicketState,
    estimate_cost,
    load_agent_policies,
    parse_deadline,
    policies_from_dict,
)
from toolmend.server.context import RequestContext
from toolmend.server.errors import ProxyError

BIG = Cost(1000, 500)  # a long request: never small
SMALL = Cost(40, 16)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        self.now += s


def make(slots: int = 1, clock: Clock | None = None, **kw: object) -> tuple[FairScheduler, Clock]:
    clock = clock or Clock()
    kw.setdefault("express_slot", False)
    kw.setdefault("agent_cap", False)
    return FairScheduler(slots, clock=clock, **kw), clock  # type: ignore[arg-type]


def finish(s: FairScheduler, t: object, out: int = 0) -> list:
    return s.release(t, output_tokens=out)  # type: ignore[arg-type]


# --- counters -----------------------------------------------------------------------------

def test_input_charged_at_dispatch_output_twice_divided_by_weight() -> None:
    pol = AgentPolicies({"w2": AgentPolicy(weight=2.0)})
    s, _ = make(2, policies=pol)
    a = s.submit("a", Cost(100, 50))
    assert s.counter("a") == 100
    b = s.submit("w2", Cost(100, 50))
    assert s.counter("w2") == 100 + 50  # lifted to where a left the backlog, then charged
    a.charge_output(10)
    b.charge_output(10)
    assert s.counter("a") == 120 and s.counter("w2") == 160
    finish(s, a, out=30)  # usage replaces the streamed count
    assert s.counter("a") == 160


def test_tracked_progress_is_read_only_when_deciding() -> None:
    s, _ = make(1)
    t = s.submit("a", Cost(10, 100))
    events = [0]
    t.track(lambda: events[0])
    events[0] = 25
    assert s.counter("a") == 10 + 50  # counter() polls
    events[0] = 40
    s.release(t)  # no usage: the last count is final
    assert s.counter("a") == 10 + 80


def test_usage_raises_a_short_estimate_but_never_refunds() -> None:
    s, _ = make(1)
    t = s.submit("a", Cost(100, 10))
    s.release(t, prompt_tokens=160, output_tokens=5)
    assert s.counter("a") == 160 + 10
    t = s.submit("a", Cost(100, 10))
    t.charge_output(8)
    s.release(t, prompt_tokens=60, output_tokens=5)
    assert s.counter("a") == 170 + 100 + 16


def test_least_served_backlogged_agent_goes_next() -> None:
    s, _ = make(1)
    first = s.submit("heavy", BIG)
    heavy = [s.submit("heavy", BIG) for _ in range(3)]
    light = s.submit("light", Cost(10, 10))
    # light was lifted to heavy's counter, but heavy's running request then charged more
    first.charge_output(100)
    nxt = finish(s, first, out=100)
    assert nxt == [light]
    nxt = finish(s, light, out=10)
    assert nxt == [heavy[0]]


def test_counter_lift_no_banked_credit() -> None:
    s, _ = make(1)
    running = s.submit("a", BIG)
    for _ in range(5):
        s.submit("a", BIG)
    a_counter = s.counter("a")
    s.submit("idle_since_ever", SMALL)
    # lifted to the least counter among the backlogged: no credit for time spent idle
    assert s.counter("idle_since_ever") == a_counter
    finish(s, running)


def test_lift_without_backlog_uses_last_to_leave() -> None:
    s, _ = make(1)
    t = s.submit("a", Cost(500, 1))
    finish(s, t)
    late = s.submit("b", Cost(10, 1))  # nobody is backlogged; a left the backlog at 500
    assert s.counter("b") == 500 + 10
    finish(s, late)


def test_lift_never_lowers_a_counter() -> None:
    s, _ = make(1)
    running = s.submit("a", Cost(100, 1))
    s.submit("b", Cost(100, 1))
    running.charge_output(5000)
    s.submit("a", Cost(10, 1))  # b is backlogged at 100: a keeps its 10100
    assert s.counter("a") == 10100


def test_weights_share_service_in_proportion() -> None:
    pol = AgentPolicies({"gold": AgentPolicy(weight=3.0)})
    s, _ = make(1, policies=pol, limits=Limits(max_queue_per_agent=1000, max_queue=5000))
    tickets = {n: [s.submit(n, Cost(100, 10)) for _ in range(200)] for n in ("gold", "plain")}
    done = {"gold": 0, "plain": 0}
    running = [t for ts in tickets.values() for t in ts if t.state is TicketState.DISPATCHED]
    for _ in range(200):
        t = running.pop()
        done[t.agent] += 1
        running.extend(finish(s, t, out=0))
    assert done["gold"] / done["plain"] == pytest.approx(3.0, rel=0.05)


def test_equal_agents_alternate() -> None:
    s, _ = make(1)
    first = s.submit("a", Cost(100, 1))
    for _ in range(4):
        s.submit("a", Cost(100, 1))
        s.submit("b", Cost(100, 1))
    order = []
    t = first
    for _ in range(8):
        (t,) = finish(s, t)
        order.append(t.agent)
    # b was lifted level with a when it arrived (a's first request is not owed back to b)
    assert order == ["a", "b"] * 4


# --- priority and order ---------------------------------------------------------------------

def test_strict_priority_between_classes() -> None:
    pol = AgentPolicies({"vip": AgentPolicy(priority=5)})
    s, _ = make(1, policies=pol)
    hold = s.submit("low", BIG)
    lows = [s.submit("low", BIG) for _ in range(3)]
    vip = [s.submit("vip", BIG) for _ in range(3)]
    order = []
    t = hold
    for _ in range(6):
        (t,) = finish(s, t, out=1000)  # vip's counter grows far beyond low's: class still wins
        order.append(t)
    assert order == vip + lows


def test_fifo_within_one_agent_and_priority_jumps_its_own_queue() -> None:
    s, _ = make(1)
    hold = s.submit("a", BIG)
    q = [s.submit("a", Cost(10 * (i + 1), 1)) for i in range(4)]
    urgent = s.submit("a", Cost(10, 1), priority=3)
    order = []
    t = hold
    for _ in range(5):
        (t,) = finish(s, t)
        order.append(t)
    assert order == [urgent, *q]


def test_x_priority_is_capped_by_the_agents_ceiling() -> None:
    pol = policies_from_dict({"boss": {"priority": 1, "max_priority": 3},
                              "*": {"priority": 0}})
    s, _ = make(1, policies=pol)
    assert s.resolve_priority("boss", None) == 1
    assert s.resolve_priority("boss", "9") == 3
    assert s.resolve_priority("boss", "-2") == -2
    assert s.resolve_priority("anyone", "7") == 0
    with pytest.raises(ProxyError) as e:
        s.resolve_priority("anyone", "high")
    assert e.value.status == 400


# --- caps and the express slot ----------------------------------------------------------------

def test_never_more_in_flight_than_slots_random_walk() -> None:
    rng = random.Random(7)
    s, clock = make(3, express_slot=True, agent_cap=True,
                    limits=Limits(max_queue_per_agent=50, max_queue=100, queue_ttl=30))
    live = []
    for _ in range(3000):
        clock.advance(rng.random() * 0.2)
        r = rng.random()
        if r < 0.45:
            try:
                live.append(s.submit(rng.choice("abcd"), rng.choice([BIG, SMALL])))
            except ProxyError:
                pass
        elif live:
            t = live.pop(rng.randrange(len(live)))
            if r < 0.55 or t.state is not TicketState.DISPATCHED:
                s.cancel(t)
            else:
                s.release(t)
        s.expire()
        assert 0 <= s.in_flight <= s.slots
        assert s.in_flight == sum(1 for t in live if t.state is TicketState.DISPATCHED)
        assert s.queued == sum(1 for t in live if t.state is TicketState.QUEUED)


def test_agent_cap_slots_minus_one_while_another_agent_is_active() -> None:
    s, clock = make(4, agent_cap=True)
    b = s.submit("b", BIG)
    finish(s, b)  # b is now active for agent_idle_after seconds
    heavy = [s.submit("a", BIG) for _ in range(6)]
    assert sum(t.state is TicketState.DISPATCHED for t in heavy) == 3
    clock.advance(11)  # b went quiet: a alone may use every slot
    s.expire()
    extra = finish(s, heavy[0])
    assert s.in_flight == 4 and len(extra) == 2


def test_agent_cap_off_with_a_single_agent_or_one_slot() -> None:
    s, _ = make(4, agent_cap=True)
    heavy = [s.submit("a", BIG) for _ in range(6)]
    assert sum(t.state is TicketState.DISPATCHED for t in heavy) == 4
    s1, _ = make(1, agent_cap=True)
    s1.submit("b", SMALL)
    assert s1.submit("a", SMALL).state is TicketState.QUEUED
    assert s1.in_flight == 1


def test_express_slot_is_kept_for_small_requests() -> None:
    s, _ = make(4, express_slot=True)
    s.release(s.submit("b", SMALL))  # small traffic seen: the express slot is held back
    heavy = [s.submit("a", BIG) for _ in range(6)]
    assert s.in_flight == 3  # large requests leave the express slot free
    light = s.submit("b", SMALL)
    assert light.state is TicketState.DISPATCHED and light.express
    assert s.express_total == 1
    # a small request may also use a regular slot; the express one stays for the last
    finish(s, heavy[0])
    assert s.in_flight == 3


def test_express_slot_stays_free_without_small_traffic_by_default() -> None:
    s, clock = make(4, express_slot=True, limits=Limits(queue_ttl=1e6))
    heavy = [s.submit("a", BIG) for _ in range(6)]
    clock.advance(3600)
    s.release(heavy[0])
    assert s.in_flight == 3


def test_express_slot_is_lent_out_while_no_small_requests_come() -> None:
    s, clock = make(4, express_slot=True, express_lend_after=10.0)
    s.release(s.submit("b", SMALL))
    heavy = [s.submit("a", BIG) for _ in range(6)]
    assert s.in_flight == 3
    clock.advance(11)  # no small request for express_lend_after seconds
    s.release(heavy[0])
    assert s.in_flight == 4
    light = s.submit("b", SMALL)  # the next small one waits once, and re-arms the reservation
    assert light.state is TicketState.QUEUED
    assert s.release(heavy[1]) == [light]
    s.release(heavy[2])
    assert s.in_flight == 3


def test_tie_after_lift_goes_to_the_agent_with_less_waiting() -> None:
    s, _ = make(1)
    running = s.submit("heavy", Cost(100, 10))
    for _ in range(5):
        s.submit("heavy", Cost(100, 10))
    running.charge_output(10)  # all charged before the light agent arrives
    light = s.submit("light", Cost(10, 10))
    assert s.counter("light") == s.counter("heavy")
    assert s.release(running, output_tokens=10, prompt_tokens=40) == [light]


def test_small_means_small_max_tokens_and_small_prompt_growth() -> None:
    s, _ = make(2, express_slot=True, express_max_prompt_tokens=100, express_max_tokens=50)
    assert not s.submit("a", Cost(20, None)).small  # no max_tokens: could run for long
    assert not s.submit("b", Cost(20, 51)).small
    assert not s.submit("loop", Cost(3000, 20)).small  # first step: the whole prompt is new
    s2, _ = make(2, express_slot=True, express_max_prompt_tokens=100, express_max_tokens=50)
    s2.release(s2.submit("x", SMALL))
    s2.submit("x", BIG)
    for n in (50, 120, 200):  # a tool loop: the conversation grows a little each step
        t = s2.submit("loop", Cost(n, 20))
        assert t.small and t.state is TicketState.DISPATCHED and t.express
        s2.release(t)
    assert s2.submit("loop", Cost(5000, 20)).small is False
    # a burst of the same prompt is not a loop: with a request outstanding, all of it counts
    s3, _ = make(4, express_slot=True, express_max_prompt_tokens=100, express_max_tokens=50)
    burst = [s3.submit("burst", Cost(1000, 20)) for _ in range(3)]
    assert [t.small for t in burst] == [False, False, False]


def test_express_off_below_two_slots() -> None:
    s, _ = make(1, express_slot=True)
    assert not s.express
    s.submit("a", BIG)
    assert s.submit("b", SMALL).state is TicketState.QUEUED


def test_set_slots_dispatches_waiting_requests() -> None:
    s, _ = make(1)
    ts = [s.submit("a", BIG) for _ in range(4)]
    assert s.in_flight == 1
    assert len(s.set_slots(3)) == 2
    assert [t.state for t in ts].count(TicketState.DISPATCHED) == 3


# --- limits ---------------------------------------------------------------------------------

def test_per_agent_queue_limit_gives_429_with_retry_after() -> None:
    s, _ = make(1, limits=Limits(max_queue_per_agent=2))
    s.submit("a", BIG)
    s.submit("a", BIG)
    s.submit("a", BIG)
    with pytest.raises(ProxyError) as e:
        s.submit("a", BIG)
    assert e.value.status == 429 and e.value.code == "agent_queue_full"
    assert int(e.value.headers["Retry-After"]) >= 1
    assert e.value.body()["error"]["type"] == "rate_limit_error"
    assert s.submit("b", BIG).state is TicketState.QUEUED  # other agents unaffected
    assert s.rejections["agent_queue_full"] == 1


def test_policy_max_queue_overrides_the_global_limit() -> None:
    s, _ = make(1, policies=AgentPolicies({"tiny": AgentPolicy(max_queue=0)}))
    s.submit("x", BIG)
    with pytest.raises(ProxyError):
        s.submit("tiny", SMALL)


def test_total_queue_limit_and_retry_after_grows_with_the_queue() -> None:
    s, clock = make(1, limits=Limits(max_queue=4, max_queue_per_agent=10))
    t = s.submit("a", BIG)
    clock.advance(10)
    finish(s, t)  # requests hold a slot for a while: the estimate learns it
    for agent in "abcde":
        s.submit(agent, BIG)  # one runs, four wait
    with pytest.raises(ProxyError) as e:
        s.submit("f", BIG)
    assert e.value.status == 429 and e.value.code == "queue_full"
    assert int(e.value.headers["Retry-After"]) >= 4
    assert s.rejections["queue_full"] == 1


def test_queue_ttl_expires_waiting_requests_with_503() -> None:
    s, clock = make(1, limits=Limits(queue_ttl=30))
    hold = s.submit("a", BIG)
    waiting = s.submit("b", BIG)
    clock.advance(29)
    assert s.expire() == []
    clock.advance(2)
    assert s.expire() == [waiting]
    assert waiting.state is TicketState.EXPIRED and s.queued == 0
    assert s.rejections["queue_timeout"] == 1
    assert finish(s, hold) == []  # an expired request never dispatches


def test_expired_requests_are_dropped_before_dispatch() -> None:
    s, clock = make(1, limits=Limits(queue_ttl=5))
    hold = s.submit("a", BIG)
    late = s.submit("b", BIG)
    fresh = s.submit("c", BIG)
    clock.advance(3)
    fresh2 = s.submit("c", BIG)
    clock.advance(3)  # late and fresh are past their TTL, fresh2 is not
    assert finish(s, hold) == [fresh2]
    assert late.state is fresh.state is TicketState.EXPIRED


def test_deadline_header_shortens_the_wait() -> None:
    s, clock = make(1, limits=Limits(queue_ttl=300))
    hold = s.submit("a", BIG)
    t = s.submit("b", BIG, deadline=parse_deadline("1500", clock()))
    clock.advance(1.6)
    assert s.expire() == [t]
    assert t.expiry_code == "deadline_exceeded"
    assert s.rejections["deadline_exceeded"] == 1
    finish(s, hold)


def test_zero_deadline_runs_now_or_fails_now() -> None:
    s, clock = make(1)
    ok = s.submit("a", BIG, deadline=clock())
    assert ok.state is TicketState.DISPATCHED
    with pytest.raises(ProxyError) as e:
        s.submit("b", BIG, deadline=clock())
    assert e.value.status == 503 and e.value.code == "deadline_exceeded"
    assert s.queued == 0


def test_bad_deadline_header_is_400() -> None:
    for bad in ("soon", "-5", "nan"):
        with pytest.raises(ProxyError) as e:
            parse_deadline(bad, 0.0)
        assert e.value.status == 400
    assert parse_deadline(None, 5.0) is None
    assert parse_deadline("250", 5.0) == pytest.approx(5.25)


# --- cancellation in every state --------------------------------------------------------------

def test_cancel_while_queued_leaves_at_once_and_never_dispatches() -> None:
    s, _ = make(1)
    hold = s.submit("a", BIG)
    gone = s.submit("b", BIG)
    nxt = s.submit("c", BIG)
    assert s.queue_depths() == {"b": 1, "c": 1}
    assert s.cancel(gone) == []
    assert gone.state is TicketState.CANCELLED and s.queue_depths() == {"c": 1}
    assert finish(s, hold) == [nxt]
    assert gone.dispatched_at is None


def test_cancel_while_dispatched_frees_the_slot_for_the_next() -> None:
    s, _ = make(1)
    running = s.submit("a", BIG)
    waiting = s.submit("b", BIG)
    assert s.cancel(running) == [waiting]
    assert running.state is TicketState.RELEASED and s.in_flight == 1


def test_release_twice_and_cancel_after_release_are_harmless() -> None:
    s, clock = make(1)
    a = s.submit("a", BIG)
    b = s.submit("b", BIG)
    assert finish(s, a) == [b]
    assert finish(s, a) == [] and s.cancel(a) == []
    assert s.in_flight == 1
    expired = s.submit("c", BIG, deadline=clock() + 1)
    clock.advance(2)
    assert s.expire() == [expired]
    assert s.cancel(expired) == [] and s.release(expired) == []
    assert s.in_flight == 1 and s.queued == 0
    s.release(b)
    assert s.in_flight == 0


def test_releasing_always_dispatches_the_next() -> None:
    s, _ = make(2)
    ts = [s.submit("a" if i % 2 else "b", BIG) for i in range(10)]
    done = 0
    running = [t for t in ts if t.state is TicketState.DISPATCHED]
    while running:
        running.extend(finish(s, running.pop(0)))
        done += 1
        assert s.in_flight == min(2, 10 - done)
    assert done == 10


# --- metrics --------------------------------------------------------------------------------

def test_metrics_are_plain_attributes() -> None:
    s, clock = make(1)
    waits: list[tuple[str, float]] = []
    s.wait_observers.append(lambda agent, w: waits.append((agent, w)))
    hold = s.submit("a", BIG)
    t = s.submit("b", BIG)
    clock.advance(2.5)
    finish(s, hold)
    stats = s.agent_stats()
    assert stats["b"].wait_seconds_total == pytest.approx(2.5)
    assert stats["b"].in_flight == 1 and stats["a"].dispatched == 1
    assert waits == [("a", 0.0), ("b", 2.5)]
    assert s.in_flight == 1 and s.queued == 0 and s.dispatched_total == 2
    finish(s, t)


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
