"""The fair queue's core as a state machine on a virtual clock: every rule, no sleeps."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from toolmend.scheduling.fair_queue import Cost, FairQueue, Limits, TicketState
from toolmend.scheduling.policy import AgentPolicies, AgentPolicy, policies_from_dict
from toolmend.server.errors import ProxyError

from .queue_sim import Clock, VirtualBackend, fixed_service, flood, jain, loop, work

BIG = Cost(1000, 500)  # a long request
SMALL = Cost(40, 16)


def make(slots: int = 1, clock: Clock | None = None, **kw: object) -> tuple[FairQueue, Clock]:
    clock = clock or Clock()
    kw.setdefault("express_slot", False)
    return FairQueue(slots, clock=clock, **kw), clock  # type: ignore[arg-type]


def finish(s: FairQueue, t: object, out: int = 0) -> list:
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

    class Stats:
        events = 0

    meter = Stats()
    t.track_events(meter)
    meter.events = 25
    assert s.counter("a") == 10 + 50  # counter() polls
    meter.events = 40
    s.release(t)  # no usage: the last count is final
    assert s.counter("a") == 10 + 80
    meter.events = 1000
    assert s.counter("a") == 10 + 80  # released: no longer read


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


# --- bounds -------------------------------------------------------------------------------

def test_never_more_in_flight_than_slots_random_walk() -> None:
    rng = random.Random(7)
    s, clock = make(3, express_slot=True, service=fixed_service(),
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


def test_tie_after_lift_goes_to_the_agent_with_less_waiting() -> None:
    s, _ = make(1)
    running = s.submit("heavy", Cost(100, 10))
    for _ in range(5):
        s.submit("heavy", Cost(100, 10))
    running.charge_output(10)  # all charged before the light agent arrives
    light = s.submit("light", Cost(10, 10))
    assert s.counter("light") == s.counter("heavy")
    assert s.release(running, output_tokens=10, prompt_tokens=100) == [light]


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


def test_zero_deadline_runs_now_or_fails_now() -> None:
    s, clock = make(1)
    ok = s.submit("a", BIG, deadline=clock())
    assert ok.state is TicketState.DISPATCHED
    with pytest.raises(ProxyError) as e:
        s.submit("b", BIG, deadline=clock())
    assert e.value.status == 503 and e.value.code == "deadline_exceeded"
    assert s.queued == 0


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




# --- work per session step --------------------------------------------------------------------

def test_work_is_the_prompt_growth_since_the_sessions_last_step_plus_output() -> None:
    s, _ = make(1)
    t = s.submit("a", Cost(1000, 10), session="s1")
    assert s.counter("a") == 1000  # a session's first step: its whole prompt is new
    finish(s, t, out=10)
    assert s.counter("a") == 1020
    t = s.submit("a", Cost(1100, 10), session="s1")
    assert s.counter("a") == 1120  # only the 100 tokens the conversation grew by
    finish(s, t, out=10)
    t = s.submit("a", Cost(1100, 10), session="s2")
    assert s.counter("a") == 2240  # another session of the same agent starts from nothing
    finish(s, t)


def test_a_prompt_that_does_not_continue_counts_whole() -> None:
    s, _ = make(1)
    finish(s, s.submit("a", Cost(1000, 10)))
    finish(s, s.submit("a", Cost(400, 10)))  # shorter: not a continuation of the last step
    assert s.counter("a") == 1400
    finish(s, s.submit("a", Cost(400, 10)))  # a resend of the same step: nothing new
    assert s.counter("a") == 1400


def test_requests_sent_together_in_one_session_count_every_prompt_whole() -> None:
    s, _ = make(4)
    for _ in range(3):
        s.submit("burst", Cost(1000, 20), session="s")
    assert s.counter("burst") == 3000


def test_usage_replaces_the_estimates() -> None:
    s, _ = make(1)
    t = s.submit("a", Cost(100, 10))
    s.release(t, prompt_tokens=160, output_tokens=5)
    assert s.counter("a") == 160 + 10
    t = s.submit("a", Cost(130, 10))  # estimated growth 30
    assert s.counter("a") == 200
    s.release(t, prompt_tokens=250, output_tokens=5)  # the backend counted 90 new tokens
    assert s.counter("a") == 260 + 10
    t = s.submit("a", Cost(150, 10))  # estimated growth 20
    t.charge_output(8)  # the stream's events: more than the tokens
    s.release(t, prompt_tokens=255, output_tokens=5)  # 5 new, 5 out by usage
    assert s.counter("a") == 275 + 10
    t = s.submit("a", Cost(160, 10))
    t.charge_output(8)
    s.release(t)  # no usage: the estimates stand
    assert s.counter("a") == 285 + 10 + 16


def test_equal_work_in_3_and_in_30_steps_costs_the_same() -> None:
    counters = []
    for steps, growth, output in ((3, 600, 100), (30, 60, 10)):
        s, clock = make(1)
        prompt = 0
        for _ in range(steps):
            prompt += growth
            t = s.submit("agent", Cost(prompt, output), session="task")
            clock.advance(0.05)
            finish(s, t, out=output)
            clock.advance(0.02)  # its tool time
        counters.append(s.counter("agent"))
    assert counters == [2400, 2400]


def _loop_back_after(tool_time: float) -> float:
    """The light agent's counter when it returns from ``tool_time`` while heavy is ahead."""
    s, clock = make(1)
    h1 = s.submit("heavy", Cost(1000, 100))
    l1 = s.submit("light", Cost(50, 3))  # lifted to where heavy left the backlog: 1000
    assert s.counter("light") == 1000
    assert finish(s, h1, out=100) == [l1]  # heavy 1200 (one long request's worth of work)
    s.submit("heavy", Cost(2000, 100))  # its conversation grew by 1000
    s.submit("heavy", Cost(2000, 100))
    clock.advance(0.03)
    finish(s, l1, out=3)  # light 1056; heavy's next request runs: heavy 2200
    assert (s.counter("light"), s.counter("heavy")) == (1056, 2200)
    clock.advance(tool_time)
    s.submit("light", Cost(60, 3))
    return s.counter("light")


def test_a_session_back_from_its_tool_time_keeps_its_credit() -> None:
    # lifting it to heavy's 2200 at every step would tax thirty small steps ten times as
    # much as three large ones; it keeps up to one long request's worth (1200) of credit
    assert _loop_back_after(0.02) == 1056


def test_a_session_back_after_agent_idle_after_is_lifted() -> None:
    assert _loop_back_after(11.0) == 2200  # idle, not looping: no banked credit


def test_loop_credit_is_at_most_one_long_request() -> None:
    s, clock = make(1)
    finish(s, s.submit("light", Cost(50, 3)), out=3)  # light 56
    h = s.submit("heavy", Cost(1000, 100))  # heavy starts level with light (50) and runs
    finish(s, h, out=100)  # heavy 1250: one long request is 1200 of work
    for _ in range(3):
        s.submit("heavy", Cost(2000, 100))  # heavy 2250 (grew by 1000), two waiting
    clock.advance(0.02)
    s.submit("light", Cost(60, 3))  # 56 is more than 1200 behind heavy's 2250: lifted to 1050
    assert s.counter("light") == 1050


# --- holding a slot for a returning loop step ----------------------------------------------------
#
# The backend's speed is given: 10 ms to the first token, then 10 ms a token. A heavy request
# (30 tokens) holds its slot 0.30 s; a light step (3 tokens) 0.03 s.

HEAVY = Cost(300, 30)


def _light_looping(slots: int = 2, tool_time: float = 0.02, step_time: float = 0.04,
                   **kw: object) -> tuple[FairQueue, Clock, list]:
    """light has done one step and measured one tool time; its second step runs from 1000.06
    beside heavy's first request (to 1000.36) with three more of heavy's waiting."""
    kw.setdefault("express_slot", True)
    s, clock = make(slots, service=fixed_service(), **kw)
    step1 = s.submit("light", Cost(50, 3))
    clock.advance(0.04)
    finish(s, step1, out=3)
    clock.advance(tool_time)
    step2 = s.submit("light", Cost(60, 3))
    assert step2.state is TicketState.DISPATCHED
    heavy = [s.submit("heavy", HEAVY) for _ in range(4)]
    clock.advance(step_time)
    return s, clock, [step2, *heavy]


def test_a_slot_is_held_for_a_loop_step_expected_back_before_a_long_request_would_end() -> None:
    s, clock, (step2, *heavy) = _light_looping(slots=2)
    assert heavy[0].state is TicketState.DISPATCHED and s.in_flight == 2
    # 1000.10: light is back at 1000.12 (0.02 s idle), heavy's next would hold the slot 0.30 s,
    # and the other slot frees at 1000.36: 0.24 s of waiting saved, 0.15 s beyond one turnover
    assert finish(s, step2, out=3) == []
    assert s.in_flight == 1 and s.held_for() == [("light", "light")]
    assert s.next_hold_lapse() == pytest.approx(1000.12 + 0.002 + 0.005)
    clock.advance(0.02)
    step3 = s.submit("light", Cost(70, 3))
    assert step3.state is TicketState.DISPATCHED and step3.express
    assert s.held_for() == [] and s.holds_total == 1 and s.express_total == 1
    assert s.held_seconds_total == pytest.approx(0.02)
    light = s.agent_stats()["light"]
    assert light.service_tokens == 50 + 6 + 10 + 6 + 10  # the held time is not work
    assert light.held_seconds == pytest.approx(0.02)


def test_a_hold_lapses_when_the_session_is_late() -> None:
    s, clock, (step2, *heavy) = _light_looping(slots=2)
    finish(s, step2, out=3)
    clock.advance(0.026)
    assert s.wake() == []  # 1000.126: still within its slack
    clock.advance(0.001)
    assert s.wake() == [heavy[1]]
    assert s.held_for() == [] and s.next_hold_lapse() is None
    assert s.held_seconds_total == pytest.approx(0.027)
    step3 = s.submit("light", Cost(70, 3))  # it waits for a turnover like anyone
    assert step3.state is TicketState.QUEUED


def test_no_hold_when_another_slot_turns_over_soon() -> None:
    # light's step ends at 1000.30; heavy's running request frees the other slot at 1000.36:
    # light, back at 1000.32, would wait 0.04 s, less than a turnover (0.15 s)
    s, _, (step2, *heavy) = _light_looping(slots=2, step_time=0.24)
    assert finish(s, step2, out=3) == [heavy[1]]
    assert s.held_for() == []


def test_no_hold_when_the_session_is_back_later_than_the_request_would_take() -> None:
    s, _, (step2, *heavy) = _light_looping(slots=2, tool_time=0.4)
    assert finish(s, step2, out=3) == [heavy[1]]  # light takes 0.4 s, heavy's request 0.3 s


def test_no_hold_before_a_tool_time_was_measured() -> None:
    s, clock = make(2, express_slot=True, service=fixed_service())
    step1 = s.submit("light", Cost(50, 3))
    heavy = [s.submit("heavy", HEAVY) for _ in range(3)]
    clock.advance(0.04)
    assert finish(s, step1, out=3) == [heavy[1]]  # nothing is held on a guess


def test_no_hold_for_an_agent_that_would_not_win_the_slot() -> None:
    pol = AgentPolicies({"heavy": AgentPolicy(weight=100.0)})  # heavy's counter barely moves
    s, _, (step2, *heavy) = _light_looping(slots=2, policies=pol)
    assert (s.counter("light"), s.counter("heavy")) == (66, 69)
    assert finish(s, step2, out=3) == [heavy[1]]  # light at 72 when its step ends: ahead


def test_no_hold_against_a_higher_priority_class() -> None:
    pol = AgentPolicies({"heavy": AgentPolicy(priority=1)})
    s, _, (step2, *heavy) = _light_looping(slots=2, policies=pol)
    assert finish(s, step2, out=3) == [heavy[1]]


def test_no_hold_with_holds_turned_off() -> None:
    s, _, (step2, *heavy) = _light_looping(slots=2, express_slot=False)
    assert finish(s, step2, out=3) == [heavy[1]]


def test_crowd_of_sessions_between_steps_changes_no_hold_and_leaves_when_late() -> None:
    """A dispatch looks only at other agents' sessions between steps: 300 one-step sessions of
    the agent whose request would take the slot (the crowd an agent with many one-step sessions
    leaves) change nothing in the hold for light's loop, and once late (agent_idle_after, 10 s,
    plus its slack) they leave."""
    s, clock = make(2, express_slot=True, service=fixed_service())
    for i in range(300):
        finish(s, s.submit("heavy", Cost(10, 3), session=f"one-step-{i}"), out=3)
    step1 = s.submit("light", Cost(50, 3))
    clock.advance(0.04)
    finish(s, step1, out=3)
    clock.advance(0.02)
    step2 = s.submit("light", Cost(60, 3))
    heavy = [s.submit("heavy", HEAVY) for _ in range(4)]
    clock.advance(0.04)
    assert len(s._loopers) == 300
    assert heavy[0].state is TicketState.DISPATCHED
    assert finish(s, step2, out=3) == []  # held for light, as without the crowd
    assert s.held_for() == [("light", "light")]
    clock.advance(10 + 1 + 0.005)  # every one of the crowd is late now, and light too
    assert s.wake() == [heavy[1]]
    assert len(s._loopers) == 0


def test_one_slot_is_held_too() -> None:
    s, clock = make(1, express_slot=True, service=fixed_service())
    step1 = s.submit("light", Cost(50, 3))
    clock.advance(0.04)
    finish(s, step1, out=3)
    heavy = [s.submit("heavy", HEAVY) for _ in range(3)]  # heavy 350, running to 1000.34
    clock.advance(0.02)
    step2 = s.submit("light", Cost(60, 3))
    clock.advance(0.28)
    assert finish(s, heavy[0], out=30) == [step2]  # light is behind heavy
    clock.advance(0.03)
    assert finish(s, step2, out=3) == []  # the only slot waits 0.02 s for light's next step
    clock.advance(0.02)
    assert s.submit("light", Cost(70, 3)).express
    assert heavy[1].state is TicketState.QUEUED


def test_a_request_too_short_to_be_held_against_takes_the_held_slot() -> None:
    s, _, (step2, *heavy) = _light_looping(slots=2)
    finish(s, step2, out=3)
    assert s.held_for() == [("light", "light")]
    quick = s.submit("other", Cost(20, 1))  # 0.01 s: done before light is back (0.02 s)
    assert quick.state is TicketState.DISPATCHED
    assert heavy[1].state is TicketState.QUEUED


def test_one_agent_alone_on_three_slots_keeps_three_in_flight() -> None:
    s, clock = make(3, express_slot=True, service=fixed_service())
    for _ in range(3):  # its own tool loop: small steps with a measured tool time
        t = s.submit("solo", Cost(50, 3), session="loop")
        clock.advance(0.03)
        finish(s, t, out=3)
        clock.advance(0.01)
    burst = [s.submit("solo", HEAVY, session="batch") for _ in range(5)]
    assert s.in_flight == 3 and s.held_for() == []
    clock.advance(0.3)
    assert finish(s, burst[0], out=30) == [burst[3]]  # never held against its own agent
    assert s.in_flight == 3


# --- what the rules add up to (a virtual backend, many steps) -----------------------------------

def test_flood_on_two_slots_light_waits_little_and_heavy_keeps_its_slots() -> None:
    """The 2-slot flood of bench/fairness.py on the virtual backend: heavy keeps 8 requests of
    0.30 s waiting; light loops on 0.04 s steps with 0.02 s of tool time."""
    s, clock = make(2, express_slot=True, service=fixed_service())
    vb = VirtualBackend(s, clock)
    flood(vb, "heavy", 8, HEAVY, 0.30)
    clock.advance(0.5)
    loop(vb, "light", 1000, 10, 3, 0.04, 0.02)
    vb.run(1030.5)
    waits = sorted(st.started - st.submitted for st in vb.done if st.agent == "light")
    assert len(waits) > 100
    assert waits[int(0.9 * len(waits))] <= 0.2  # p90: about one turnover (0.15 s)
    # FIFO would give heavy nearly all of 2 slots × 30 s; it keeps at least 80% of that
    assert vb.busy["heavy"] >= 0.8 * 2 * 30


@pytest.mark.parametrize("holds", [True, False])
def test_equal_work_in_3_and_30_steps_shares_one_slot_evenly(holds: bool) -> None:
    """Agents with equal tasks, one in 3 large steps and one in 30 small ones, 10 ms of tool
    time each, on one slot: with holds their work per second is equal; without, the small steps
    always find the slot taken by a large one."""
    s, clock = make(1, express_slot=holds, service=fixed_service(decode=0.004))
    vb = VirtualBackend(s, clock)
    loop(vb, "three", 3, 600, 100, 0.01 + 0.004 * 100, 0.01)
    loop(vb, "thirty", 30, 60, 10, 0.01 + 0.004 * 10, 0.01)
    vb.run(1020.0)
    rates = [work(vb.done, "three", 1002.0, 600, 100),
             work(vb.done, "thirty", 1002.0, 60, 10)]
    if holds:
        assert jain(rates) >= 0.99
    else:
        assert jain(rates) < 0.7


# --- the sessions in their tool time, by return time ---------------------------------------------

class _Stub:
    """What _Loopers reads of a session: its agent and its return and lapse times."""

    def __init__(self, agent: str, back: float, lapse: float) -> None:
        self.agent, self._back, self._lapse = agent, back, lapse

    def back_at(self, default: float) -> float:
        return self._back

    def lapse_at(self, default: float) -> float:
        return self._lapse


@given(st.lists(st.tuples(st.sampled_from(["add", "discard", "prune", "ask"]),
                          st.integers(0, 30), st.floats(0, 100), st.floats(0, 20)),
                max_size=200))
def test_loopers_due_before_is_every_session_due_back_before_the_horizon(
        ops: list[tuple[str, int, float, float]]) -> None:
    from toolmend.scheduling.fair_queue import _Loopers

    loopers = _Loopers(1.0)
    sessions: dict[int, _Stub] = {}
    inside: dict[_Stub, float] = {}  # the reference: session -> back at, for those inside
    for op, k, x, y in ops:
        if op == "add":
            s = sessions.get(k)
            if s is None or s not in inside:
                s = sessions[k] = _Stub(f"agent{k % 7}", x, x + y)
            loopers.add(s)
            inside.setdefault(s, s._back)
        elif op == "discard" and k in sessions:
            loopers.discard(sessions[k])
            inside.pop(sessions[k], None)
        elif op == "prune":
            loopers.prune(x)
            for s in [s for s in inside if x >= s._lapse - 1e-4]:
                del inside[s]
        else:
            got = sorted((back, id(s)) for back, s in loopers.due_before(x))
            assert got == sorted((back, id(s)) for s, back in inside.items() if back < x)
        assert len(loopers) == len(inside)
