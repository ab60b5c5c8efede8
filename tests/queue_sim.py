"""A virtual backend for the fair queue's core: slots that hold each request for a known time,
agents that loop or flood, all on an injected clock. Nothing sleeps; runs are deterministic.

The tests use it to check what the rules add up to over many steps (who waits how long, who gets
how much work done), where a single scripted step cannot show it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from toolmend.scheduling.fair_queue import Cost, FairQueue, Ticket, TicketState
from toolmend.scheduling.service import ServiceModel


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        self.now += s


class FixedService(ServiceModel):
    """The backend's speed as the test states it: nothing learnt from finished requests."""

    def observe(self, prompt_tokens: int, output_tokens: int, seconds: float,
                first_token_after: float | None = None) -> None:
        pass


def fixed_service(first_token: float = 0.01, decode: float = 0.01) -> FixedService:
    return FixedService(decode=decode, first_token_base=first_token, prefill_per_token=0.0)


class _Waiter:
    """Stands where the asyncio future would: starts the request when the queue grants it."""

    def __init__(self, start: Callable[[], None]) -> None:
        self._start = start
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, result: None, /) -> None:
        self._done = True
        self._start()

    def set_exception(self, exception: BaseException, /) -> None:
        self._done = True


@dataclass
class Step:
    agent: str
    session: str
    cost: Cost
    seconds: float  # how long the backend holds the slot
    submitted: float = 0.0
    started: float | None = None
    ticket: Ticket | None = None


@dataclass
class VirtualBackend:
    """Events on a heap; ``FairQueue`` decides, this plays the backend and the hold timer."""

    queue: FairQueue
    clock: Clock
    done: list[Step] = field(default_factory=list)
    _events: list[tuple[float, int, Callable[[], None]]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    _armed: float | None = None
    busy: dict[str, float] = field(default_factory=dict)  # slot-seconds per agent

    def at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._seq), fn))

    def send(self, step: Step, then: Callable[[Step], None]) -> None:
        step.submitted = self.clock()

        def start() -> None:
            step.started = self.clock()
            self.at(step.started + step.seconds, finish)

        def finish() -> None:
            assert step.ticket is not None
            self.queue.release(step.ticket, output_tokens=step.cost.max_tokens)
            self.busy[step.agent] = self.busy.get(step.agent, 0.0) + step.seconds
            self.done.append(step)
            then(step)

        t = self.queue.submit(step.agent, step.cost, session=step.session)
        step.ticket = t
        if t.state is TicketState.DISPATCHED:
            start()
        else:
            t.future = _Waiter(start)
        self._arm()

    def _arm(self) -> None:
        at = self.queue.next_hold_lapse()
        if at is not None and at != self._armed:
            self._armed = at

            def lapse() -> None:
                if self._armed == at:
                    self._armed = None
                self.queue.wake()

            self.at(at, lapse)

    def run(self, until: float) -> None:
        while self._events and self._events[0][0] <= until:
            when, _, fn = heapq.heappop(self._events)
            self.clock.now = max(self.clock.now, when)
            fn()
            self._arm()
        self.clock.now = until


def flood(vb: VirtualBackend, agent: str, outstanding: int, cost: Cost, seconds: float) -> None:
    """An agent that keeps ``outstanding`` requests in the queue, sending the next at once."""

    def again(_: Step) -> None:
        vb.send(Step(agent, agent, cost, seconds), again)

    for _ in range(outstanding):
        vb.send(Step(agent, agent, cost, seconds), again)


def loop(vb: VirtualBackend, agent: str, steps_per_task: int, growth: int, output: int,
         seconds: float, tool_time: float) -> None:
    """A tool loop: a task of ``steps_per_task`` sequential steps, each adding ``growth`` prompt
    tokens and asking for ``output`` tokens, ``tool_time`` between steps; then the next task in
    a new session."""
    state = {"task": 0, "step": 0}

    def send() -> None:
        step = state["step"] + 1
        cost = Cost(growth * step, output)
        vb.send(Step(agent, f"{agent}-{state['task']}", cost, seconds), after)

    def after(_: Step) -> None:
        state["step"] += 1
        if state["step"] == steps_per_task:
            state["task"] += 1
            state["step"] = 0
        vb.at(vb.clock() + tool_time, send)

    send()


def work(steps: list[Step], agent: str, since: float, growth: int, output: int) -> float:
    """An agent's work (new prompt tokens + 2 × output) in steps started since ``since``, as the
    test counts it."""
    return sum(growth + 2 * output for s in steps
               if s.agent == agent and s.started is not None and s.started >= since)


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))
