"""The fair queue in front of the backend's slots, as a state machine on an injected clock.

Local servers run requests first-come-first-served (Ollama, llama-server's slot queue, vLLM by
default), so one agent's burst of long requests makes every other agent wait behind all of it.
toolmend owns the queue instead: it never sends the backend more requests than it has slots,
and picks which waiting request goes next.

**Who goes next.** The Virtual Token Counter (Sheng et al., "Fairness in Serving Large Language
Models", OSDI 2024): each agent has one account of work, divided by its weight, and the
backlogged agent with the least goes next. Priority classes are strict; within one agent
requests stay in order.

**Work is counted per session step.** A step's work is its new prompt tokens (the growth since
the session's previous step, whose prefix the backend may have cached; the whole prompt for a
session's first step or for requests sent while the session has others outstanding) plus its
output tokens (×2: decoding costs more per token). All the steps of a session charge the same
account, so an agent that splits a task into many small steps pays what one doing it in a few
large steps pays.

**No banked credit, but no toll on loops.** An agent that becomes backlogged is lifted to the
least counter among the backlogged, so idle time is not saved up as credit. A session coming
back from its own tool time (within ``agent_idle_after``) is not idle, though: it keeps up to
one long request's worth of credit. Lifting it at every step would charge a loop of thirty
small steps ten times the toll of a loop of three large ones.

**No slot wasted.** Every free slot goes to a waiting request, with one exception, decided each
time a slot frees: a slot is held back for a session in its tool time between two small steps
(a loop step: small prompt growth, small ``max_tokens``) of another agent, only when

- that session is expected back (its last step's end plus its recent tool times, the longest of
  the last few; before it has any, ``agent_idle_after``: nothing is held on a guess) sooner
  than the request that would take the slot would hold it (its prompt and ``max_tokens`` at
  the backend's measured speed, :class:`~toolmend.scheduling.service.ServiceModel`);
- it pays: the wait it saves the session (from its return to the next expected turnover of
  another slot), less ``S / slots`` (``S`` that request's service time: slots running such
  requests free up about that often, so a wait that long is the normal lot of any request),
  is at least the time the slot stands idle until the session is back;
- its agent would win the slot by its counter anyway (it is owed service).

A hold is not work: the account is charged for tokens alone, so the same task costs the same
whether its steps were held for or not. A hold lapses when the session is late. An agent alone
is never held against: it gets every slot.

Everything here is synchronous: ``submit`` / ``release`` / ``cancel`` / ``expire`` / ``wake``
change the state and return the tickets they dispatched; ``next_hold_lapse`` says when
``wake`` must be called. :mod:`toolmend.scheduling.scheduler` drives it from asyncio.
"""

from __future__ import annotations

import enum
import heapq
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from toolmend.scheduling.policy import AgentPolicies, AgentPolicy
from toolmend.scheduling.service import ServiceModel
from toolmend.server.errors import ProxyError, bad_request

INPUT_WEIGHT = 1.0  # charge per new prompt token
OUTPUT_WEIGHT = 2.0  # charge per generated token
PRIORITY_HEADER = "X-Priority"
MAX_IDLE_AGENTS = 4096  # idle agents' state kept; beyond it the oldest idle ones are forgotten
MAX_IDLE_SESSIONS = 8192  # the same for sessions
GAP_HISTORY = 4  # tool times remembered per session; the prediction is the longest of them
HOLD_SLACK = 0.1  # a hold lapses this fraction of the predicted tool time after the return...
HOLD_SLACK_MIN = 0.005  # ...plus this many seconds
CREDIT_DECAY = 0.99  # per finished request: how fast "one long request's worth" forgets


class TicketState(enum.Enum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RELEASED = "released"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class Waiter(Protocol):
    """What a queued ticket's waiter offers (an asyncio future does); the core never awaits."""

    def done(self) -> bool: ...

    def set_result(self, result: None, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


@dataclass(frozen=True, slots=True)
class Cost:
    """What the queue knows about a request before it runs: estimated prompt tokens and the
    client's ``max_tokens`` (None when unset)."""

    prompt_tokens: int
    max_tokens: int | None = None


@dataclass(eq=False, slots=True, weakref_slot=True)
class Ticket:
    """One request's place in the queue; once dispatched it is the grant of a slot.

    ``charge_output(n)`` charges generated tokens as they stream; ``track_events(meter)``
    instead gives a counter (``meter.events``) the queue reads itself when it next decides (so
    the relay's hot path does no extra work at all). ``small``: a loop step (small prompt
    growth and ``max_tokens``); ``express``: it took a slot that was held for it.
    """

    seq: int
    agent: str
    session: str
    priority: int
    cost: Cost
    growth: int
    sequential: bool
    small: bool
    submitted_at: float
    expires_at: float
    expiry_code: str
    state: TicketState = TicketState.QUEUED
    dispatched_at: float | None = None
    released_at: float | None = None
    expected: float = math.inf  # seconds it is expected to hold its slot
    express: bool = False
    charged_in: float = 0.0
    charged_out: int = 0
    meter: Any = None  # an object whose ``events`` counts the output so far (track_events)
    future: Waiter | None = None
    _owner: FairQueue | None = None

    @property
    def waited(self) -> float | None:
        if self.dispatched_at is None:
            return None
        return self.dispatched_at - self.submitted_at

    def charge_output(self, n: int) -> None:
        if self._owner is not None and n > 0 and self.state is TicketState.DISPATCHED:
            self._owner._charge_out(self, self.charged_out + n)

    def track_events(self, meter: Any) -> None:
        """Charge output from ``meter.events``: read as an attribute when the queue decides,
        with no call per running request."""
        self.meter = meter

    def _abandoned(self) -> bool:
        fut = self.future
        return fut is not None and fut.done()


@dataclass(eq=False, slots=True)
class _Session:
    """One agent session's loop: its steps' prompts and the tool time between them."""

    key: str
    agent: _Agent
    queued: int = 0
    in_flight: int = 0
    last_prompt: int = 0  # estimated prompt tokens of its latest step
    last_usage_prompt: int | None = None  # the same, as the backend counted it
    released_at: float | None = None  # end of its latest step: its tool time starts there
    gaps: deque[float] = field(default_factory=lambda: deque(maxlen=GAP_HISTORY))
    loop_step: bool = False  # its latest step was small
    priority: int = 0
    held_since: float | None = None  # a slot is held for it since then
    last_seen: float = 0.0

    def tool_time(self, default: float) -> float:
        """Its predicted tool time: the longest of the last few measured, else ``default``."""
        return max(self.gaps) if self.gaps else default

    def back_at(self, default: float) -> float:
        assert self.released_at is not None  # only sessions between steps are asked
        return self.released_at + self.tool_time(default)

    def lapse_at(self, default: float) -> float:
        """A slot held for it stops being held then: it is late."""
        return self.back_at(default) + HOLD_SLACK * self.tool_time(default) + HOLD_SLACK_MIN


@dataclass(eq=False, slots=True)
class _Agent:
    name: str
    policy: AgentPolicy
    counter: float = 0.0
    queues: dict[int, deque[Ticket]] = field(default_factory=dict)
    queued: int = 0
    in_flight: int = 0
    last_seen: float = 0.0
    sessions: dict[str, _Session] = field(default_factory=dict)
    # metrics
    dispatched: int = 0
    wait_total: float = 0.0
    wait_max: float = 0.0
    service: float = 0.0  # unweighted tokens charged (new input ×1 + output ×2)
    held: float = 0.0  # seconds slots were held back for it

    def head(self) -> Ticket | None:
        best: Ticket | None = None
        for q in self.queues.values():
            if q and (best is None or q[0].priority > best.priority):
                best = q[0]
        return best


class _Loopers:
    """Sessions in their tool time after a small step (they may get a slot held for them),
    grouped by agent, with their lapse times in a heap.

    While a session is here its return and lapse times cannot change (its tool times and the
    end of its last step change only when it submits or is released, and a submit takes it
    out), so they are computed once, when it comes in. A dispatch then prunes the lapsed ones
    from the heap and looks only at other agents' sessions: sorting every session between
    steps on every dispatch cost O(n log n) per request once thousands of short sessions were
    in their tool time."""

    __slots__ = ("_backs", "_heap", "_seq", "by_agent", "default", "n")

    def __init__(self, default: float) -> None:
        self.default = default  # tool time of a session that has no measured one yet
        #: agent -> session -> (back at, lapse at, entry number)
        self.by_agent: dict[_Agent, dict[_Session, tuple[float, float, int]]] = {}
        self._heap: list[tuple[float, int, _Session]] = []  # by lapse time
        #: by return time: a dispatch looks only at the sessions due back before its request
        #: would be done (:meth:`due_before`), not at every session in its tool time
        self._backs: list[tuple[float, int, _Session]] = []
        self._seq = 0
        self.n = 0

    def __bool__(self) -> bool:
        return self.n > 0

    def __len__(self) -> int:
        return self.n

    def __contains__(self, s: _Session) -> bool:
        return s in self.by_agent.get(s.agent, ())

    def add(self, s: _Session) -> None:
        group = self.by_agent.setdefault(s.agent, {})
        if s in group:
            return
        self._seq += 1
        lapse = s.lapse_at(self.default)
        back = s.back_at(self.default)
        group[s] = (back, lapse, self._seq)
        self.n += 1
        heap = self._heap
        heapq.heappush(heap, (lapse, self._seq, s))
        heapq.heappush(self._backs, (back, self._seq, s))
        if len(heap) > 2 * self.n + 64:  # entries of sessions that left: drop them
            self._heap = self._live(heap)
        if len(self._backs) > 2 * self.n + 64:
            self._backs = self._live(self._backs)

    def _live(self, heap: list[tuple[float, int, _Session]]) -> list[tuple[float, int, _Session]]:
        """``heap`` without the entries of sessions that have left (or come in again since)."""
        live = [e for e in heap if self._entry(e[2]) == e[1]]
        heapq.heapify(live)
        return live

    def discard(self, s: _Session) -> None:
        group = self.by_agent.get(s.agent)
        if group is not None and group.pop(s, None) is not None:
            self.n -= 1
            if not group:
                del self.by_agent[s.agent]

    def _entry(self, s: _Session) -> int:
        group = self.by_agent.get(s.agent)
        got = group.get(s) if group is not None else None
        return got[2] if got is not None else -1

    def prune(self, now: float) -> None:
        """Drop the sessions that are late: not coming back soon after all."""
        heap = self._heap
        while heap and now >= heap[0][0] - 1e-4:
            _, seq, s = heapq.heappop(heap)
            if self._entry(s) == seq:
                self.discard(s)
        backs = self._backs  # the earliest returns are the first to lapse or leave
        while backs and self._entry(backs[0][2]) != backs[0][1]:
            heapq.heappop(backs)

    def due_before(self, horizon: float) -> list[tuple[float, _Session]]:
        """``(back at, session)`` of every session here due back before ``horizon``: a walk of
        the heap's top, which never goes below an entry due at or after it."""
        heap = self._backs
        n = len(heap)
        out: list[tuple[float, _Session]] = []
        stack = [0] if n else []
        while stack:
            i = stack.pop()
            back, seq, s = heap[i]
            if back >= horizon:
                continue  # and so is every entry below it
            if self._entry(s) == seq:
                out.append((back, s))
            j = 2 * i + 1
            if j < n:
                stack.append(j)
                if j + 1 < n:
                    stack.append(j + 1)
        return out


@dataclass(frozen=True, slots=True)
class AgentSnapshot:
    """Per-agent numbers for /metrics."""

    queued: int
    in_flight: int
    dispatched: int
    wait_seconds_total: float
    wait_seconds_max: float
    service_tokens: float
    counter: float
    held_seconds: float = 0.0


@dataclass(slots=True)
class Limits:
    max_queue: int = 1024
    max_queue_per_agent: int = 64
    queue_ttl: float = 300.0


class FairQueue:
    """The fair queue's state machine (see the module docstring for the rules).

    Readable state for metrics: ``slots``, ``in_flight``, ``queued``, ``rejections`` (by reason),
    ``dispatched_total``, ``express_total`` (dispatches into a held slot), ``holds_total``,
    ``held_seconds_total``, ``queue_depths()``, ``agent_stats()``; and ``wait_observers``
    (called with agent and seconds waited at each dispatch) for histograms.
    """

    def __init__(self, slots: int, *, policies: AgentPolicies | None = None,
                 limits: Limits | None = None, express_slot: bool = True,
                 express_max_prompt_tokens: int = 512, express_max_tokens: int = 256,
                 agent_idle_after: float = 10.0, service: ServiceModel | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.policies = policies or AgentPolicies()
        self.limits = limits or Limits()
        self.express_enabled = express_slot
        self.express_max_prompt_tokens = express_max_prompt_tokens
        self.express_max_tokens = express_max_tokens
        self.agent_idle_after = agent_idle_after
        self.service = service or ServiceModel()
        self.slots = 0
        self.in_flight = 0
        self.queued = 0
        self.dispatched_total = 0
        self.express_total = 0
        self.holds_total = 0
        self.held_seconds_total = 0.0
        self.rejections: Counter[str] = Counter()
        self.wait_observers: list[Callable[[str, float], None]] = []
        self._agents: dict[str, _Agent] = {}
        self._sessions = 0
        self._backlogged: dict[str, _Agent] = {}
        self._running: set[Ticket] = set()
        self._loopers = _Loopers(agent_idle_after)  # in their tool time after a small step
        self._held: set[_Session] = set()  # a slot is held for these now
        # Expiry times of queued tickets. A ticket that leaves the queue (dispatched, cancelled,
        # expired) leaves its entry behind, and entries hold tickets: _unqueue clears the heap
        # whenever the queue empties and rebuilds it once stale entries outnumber live ones,
        # so a finished ticket is not kept alive for queue_ttl (amortized O(1) per request).
        self._expiry: list[tuple[float, int, Ticket]] = []
        self._last_left = 0.0  # counter of the agent that last left the backlog
        self._big = 0.0  # work of one long request, recently (the credit a loop may keep)
        self._seq = 0
        self._occupancy = 1.0  # moving average of seconds a request holds its slot
        # why nothing may be dispatched right now (a launched backend restarting), or None
        self.paused: str | None = None
        self.set_slots(slots)

    # configuration ---------------------------------------------------------------------------
    def set_slots(self, slots: int) -> list[Ticket]:
        """Change the slot count (known only after probing the backend); may dispatch."""
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        return self._dispatch(self.clock())

    def pause(self, reason: str) -> None:
        """Dispatch nothing until :meth:`resume`: the backend is down (a launched child is being
        restarted). Requests keep queueing and wait up to their time-to-live, then get 503 with
        ``reason`` in the message, instead of failing at once against a closed port."""
        self.paused = reason

    def resume(self) -> list[Ticket]:
        self.paused = None
        return self._dispatch(self.clock())

    @property
    def express(self) -> bool:
        """Whether slots may be held for loop steps at all."""
        return self.express_enabled

    def resolve_priority(self, agent: str, requested: str | None) -> int:
        """The class a request runs in: the agent's own, or ``X-Priority`` up to its ceiling."""
        policy = self.policies.get(agent)
        if requested is None or not requested.strip():
            return policy.priority
        try:
            value = int(requested.strip())
        except ValueError:
            raise bad_request(f"{PRIORITY_HEADER} must be an integer, got {requested[:32]!r}",
                              param=PRIORITY_HEADER, code="invalid_priority") from None
        return min(value, policy.priority_ceiling)

    # the state machine -----------------------------------------------------------------------
    def submit(self, agent: str, cost: Cost, *, session: str | None = None,
               priority: int | None = None, deadline: float | None = None) -> Ticket:
        """Queue a request (and dispatch it at once if it may run). Raises 429 or 503.

        ``session``: the agent session it is a step of (None: the agent's only one).
        ``deadline`` is an absolute clock time by which the request must have been dispatched.
        """
        now = self.clock()
        a = self._agent(agent)
        policy = a.policy
        if priority is None:
            priority = policy.priority
        agent_limit = policy.max_queue if policy.max_queue is not None \
            else self.limits.max_queue_per_agent
        if a.queued >= agent_limit:
            self.rejections["agent_queue_full"] += 1
            raise self._too_many(f"agent {agent!r} already has {a.queued} requests waiting "
                                 f"(limit {agent_limit})", "agent_queue_full",
                                 a.queued, self.slots)
        if self.queued >= self.limits.max_queue:
            self.rejections["queue_full"] += 1
            raise self._too_many(f"{self.queued} requests are waiting for the backend "
                                 f"(limit {self.limits.max_queue})", "queue_full",
                                 self.queued, self.slots)
        expires_at, code = now + self.limits.queue_ttl, "queue_timeout"
        if deadline is not None and deadline <= expires_at:
            expires_at, code = deadline, "deadline_exceeded"
        s = self._session(a, agent if session is None else session)
        sequential = s.queued == 0 and s.in_flight == 0
        in_loop = sequential and s.released_at is not None \
            and now - s.released_at <= self.agent_idle_after
        if in_loop:
            assert s.released_at is not None
            s.gaps.append(now - s.released_at)  # the agent's own tool time
        self._loopers.discard(s)
        growth = cost.prompt_tokens - s.last_prompt \
            if sequential and cost.prompt_tokens >= s.last_prompt else cost.prompt_tokens
        s.last_prompt = cost.prompt_tokens
        small = (cost.max_tokens is not None and cost.max_tokens <= self.express_max_tokens
                 and growth <= self.express_max_prompt_tokens)
        s.loop_step, s.priority, s.last_seen = small, priority, now
        self._seq += 1
        t = Ticket(self._seq, agent, s.key, priority, cost, growth, sequential, small, now,
                   expires_at, code, _owner=self)
        if a.queued == 0:
            self._poll()
            self._lift(a, in_loop)
        a.queues.setdefault(priority, deque()).append(t)
        a.queued += 1
        s.queued += 1
        a.last_seen = now
        self.queued += 1
        self._backlogged[agent] = a
        if expires_at > now:
            heapq.heappush(self._expiry, (expires_at, t.seq, t))
        self._dispatch(now)
        if t.state is TicketState.QUEUED and expires_at <= now:
            # no time to wait at all (deadline 0, or ttl 0): run now or not at all
            self._expire_one(t)
            raise self._expired_error(t)
        return t

    def release(self, t: Ticket, *, output_tokens: int | None = None,
                prompt_tokens: int | None = None,
                first_token_after: float | None = None) -> list[Ticket]:
        """The request is over: free its slot and dispatch the next. Safe to call twice.

        The token counts, when the backend reported them (usage), replace the estimates (the
        prompt's as growth since the session's previous step);
        ``first_token_after`` (seconds from dispatch) teaches the service model the backend's
        speed.
        """
        if t.state is not TicketState.DISPATCHED:
            return []
        now = self.clock()
        a = self._agents[t.agent]
        s = a.sessions[t.session]
        if t.meter is not None:
            self._charge_out(t, t.meter.events)
        # What the backend counted (usage) replaces the estimates, both ways: the prompt
        # estimate counts the body's JSON, and the streamed count its framing events (a role
        # chunk, the finish, the usage itself), which would overcharge small steps the most.
        if output_tokens is not None and output_tokens != t.charged_out:
            self._charge_out(t, output_tokens)
        if prompt_tokens is not None:
            last = s.last_usage_prompt
            growth = prompt_tokens - last if t.sequential and last is not None \
                and prompt_tokens >= last else prompt_tokens
            s.last_usage_prompt = prompt_tokens
            if growth != t.charged_in:
                self._charge(a, (growth - t.charged_in) * INPUT_WEIGHT)
                t.charged_in = growth
        t.state = TicketState.RELEASED
        t.released_at = now
        t.meter = None
        self._running.discard(t)
        self.in_flight -= 1
        a.in_flight -= 1
        s.in_flight -= 1
        a.last_seen = s.last_seen = now
        if t.dispatched_at is not None:
            held = now - t.dispatched_at
            self._occupancy += 0.1 * (held - self._occupancy)
            self.service.observe(t.cost.prompt_tokens, t.charged_out, held, first_token_after)
        work = t.charged_in * INPUT_WEIGHT + t.charged_out * OUTPUT_WEIGHT
        self._big = max(work, self._big * CREDIT_DECAY)
        if s.queued == 0 and s.in_flight == 0:
            s.released_at = now
            if s.loop_step:
                self._loopers.add(s)
        self._forget_idle()
        return self._dispatch(now)

    def cancel(self, t: Ticket) -> list[Ticket]:
        """The client left: drop the request from the queue, or free its slot if it had one."""
        if t.state is TicketState.QUEUED:
            self._unqueue(t, TicketState.CANCELLED)
            return self._dispatch(self.clock())
        if t.state is TicketState.DISPATCHED:
            return self.release(t)
        return []

    def expire(self, now: float | None = None) -> list[Ticket]:
        """Drop every queued request whose time-to-live or deadline has passed."""
        now = self.clock() if now is None else now
        out: list[Ticket] = []
        while self._expiry and self._expiry[0][0] <= now:  # re-read: _unqueue may rebuild it
            _, _, t = heapq.heappop(self._expiry)
            if t.state is TicketState.QUEUED:
                self._expire_one(t)
                if t.future is not None and not t.future.done():
                    t.future.set_exception(self._expired_error(t))
                out.append(t)
        return out

    def wake(self) -> list[Ticket]:
        """Decide again now: a hold may have lapsed (see :meth:`next_hold_lapse`)."""
        return self._dispatch(self.clock())

    def next_hold_lapse(self) -> float | None:
        """When the earliest slot held back stops being held, if its session is not back."""
        if not self._held:
            return None
        return min(s.lapse_at(self.agent_idle_after) for s in self._held)

    def _expire_one(self, t: Ticket) -> None:
        self._unqueue(t, TicketState.EXPIRED)
        self.rejections[t.expiry_code] += 1

    def next_expiry(self) -> float | None:
        """Earliest time a queued request may expire (possibly early: entries are lazy)."""
        return self._expiry[0][0] if self._expiry else None

    # reading (metrics) -----------------------------------------------------------------------
    def queue_depths(self) -> dict[str, int]:
        return {name: a.queued for name, a in self._backlogged.items()}

    def agent_stats(self) -> dict[str, AgentSnapshot]:
        self._poll()
        return {n: AgentSnapshot(a.queued, a.in_flight, a.dispatched, a.wait_total, a.wait_max,
                                 a.service, a.counter, a.held)
                for n, a in self._agents.items()}

    def counter(self, agent: str) -> float:
        self._poll()
        a = self._agents.get(agent)
        return a.counter if a is not None else 0.0

    def loop_step(self, agent: str, session: str | None, cost: Cost) -> bool:
        """Whether a request would be a small loop step if submitted now (as :meth:`submit`
        decides ``Ticket.small``), without changing anything: for a priority the backend must
        receive before the request is queued."""
        a = self._agents.get(agent)
        s = a.sessions.get(agent if session is None else session) if a is not None else None
        last = s.last_prompt if s is not None and not s.queued and not s.in_flight else None
        growth = cost.prompt_tokens - last \
            if last is not None and cost.prompt_tokens >= last else cost.prompt_tokens
        return (cost.max_tokens is not None and cost.max_tokens <= self.express_max_tokens
                and growth <= self.express_max_prompt_tokens)

    def held_for(self) -> list[tuple[str, str]]:
        """(agent, session) of every session a slot is being held for now."""
        return sorted((s.agent.name, s.key) for s in self._held)

    # internals -------------------------------------------------------------------------------
    def _agent(self, name: str) -> _Agent:
        a = self._agents.get(name)
        if a is None:
            a = self._agents[name] = _Agent(name, self.policies.get(name),
                                            counter=self._last_left)
        return a

    def _session(self, a: _Agent, key: str) -> _Session:
        s = a.sessions.get(key)
        if s is None:
            s = a.sessions[key] = _Session(key, a)
            self._sessions += 1
        return s

    def _lift(self, a: _Agent, in_loop: bool) -> None:
        """No banked credit: a newly backlogged agent starts level with the least served,
        or, back from its own tool time, at most one long request's worth below it."""
        others = [b.counter for b in self._backlogged.values() if b is not a]
        floor = min(others) if others else self._last_left
        if in_loop:
            floor -= self._big / a.policy.weight
        if a.counter < floor:
            a.counter = floor

    def _charge(self, a: _Agent, tokens: float) -> None:
        a.service += tokens
        a.counter += tokens / a.policy.weight

    def _charge_out(self, t: Ticket, total: int) -> None:
        delta = total - t.charged_out
        if delta:
            t.charged_out = total
            self._charge(self._agents[t.agent], delta * OUTPUT_WEIGHT)

    def _poll(self) -> None:
        """Charge streamed output of running requests; done only when a decision needs it."""
        for t in self._running:
            meter = t.meter
            if meter is not None and meter.events > t.charged_out:
                self._charge_out(t, meter.events)

    def _candidates(self) -> list[tuple[_Agent, Ticket]]:
        """Backlogged agents' next requests, best first: class, counter, then the agent with
        less running and less waiting (ties after a lift go to the loop, not the burst)."""
        keyed = []
        for a in self._backlogged.values():
            t = a.head()
            if t is not None:
                keyed.append(((-t.priority, a.counter, a.in_flight, a.queued, t.seq), a, t))
        keyed.sort(key=lambda k: k[0])
        return [(a, t) for _, a, t in keyed]

    def _pick(self) -> tuple[_Agent, Ticket] | None:
        best: tuple[_Agent, Ticket] | None = None
        best_key: tuple[int, float, int, int, int] | None = None
        for a in self._backlogged.values():
            t = a.head()
            if t is None:
                continue
            key = (-t.priority, a.counter, a.in_flight, a.queued, t.seq)
            if best_key is None or key < best_key:
                best, best_key = (a, t), key
        return best

    def _expected(self, t: Ticket) -> float:
        return self.service.expect(t.cost.prompt_tokens, t.cost.max_tokens)

    def _returning(self, a: _Agent, t: Ticket, now: float) -> list[_Session]:
        """Sessions a free slot is worth holding back for, against ``t`` taking it."""
        service = self._expected(t)
        turnover = service / self.slots
        next_free: float | None = None  # when the next running request ends, if asked
        loopers = self._loopers
        loopers.prune(now)
        found: list[tuple[float, str, _Session]] = []
        # a session due back after the request would be done is never worth holding for
        for back, s in loopers.due_before(now + service):
            b = s.agent
            if b is a or b.counter > a.counter:
                continue  # never against its own agent, nor for one that would not win
            if s.priority < t.priority:
                continue
            idle = max(0.0, back - now)  # what holding costs the slot
            if idle >= service:
                continue  # the request would be done before the session is back
            if next_free is None:
                next_free = min((r.dispatched_at + r.expected for r in self._running
                                 if r.dispatched_at is not None), default=math.inf)
            if next_free - max(now, back) - turnover < idle:
                continue  # it saves less wait than it costs: another slot turns over soon
            found.append((back, s.key, s))
        found.sort(key=lambda e: (e[0], e[1]))
        return [e[2] for e in found]

    def _dispatch(self, now: float) -> list[Ticket]:
        if self._expiry and self._expiry[0][0] <= now:
            self.expire(now)
        out: list[Ticket] = []
        holding: set[_Session] = set()
        polled = False
        while self.in_flight < self.slots and self._backlogged and self.paused is None:
            if not polled:
                self._poll()
                polled = True
            choice = self._pick()
            if choice is None:
                break
            a, t = choice
            if t._abandoned():  # its waiter was cancelled and has not run its cleanup yet
                self._unqueue(t, TicketState.CANCELLED)
                continue
            free = self.slots - self.in_flight
            if self.express and self._loopers:
                choice = self._hold_or_pass(a, t, free, now, holding)
                if choice is None:
                    break
                a, t = choice
            self._start(a, t, now)
            out.append(t)
        self._settle_holds(holding, now)
        self._on_change()
        return out

    def _hold_or_pass(self, a: _Agent, t: Ticket, free: int, now: float,
                      holding: set[_Session]) -> tuple[_Agent, Ticket] | None:
        """The request to start in a free slot, or None to keep the free slots held.

        When the best request is held back, one that the hold does not apply to (short enough,
        or of the held-for agent) may still take the slot."""
        back = self._returning(a, t, now)
        if len(back) < free:
            return a, t
        holding.update(back[:free])
        for ca, ct in self._candidates():
            if ct is not t and not ct._abandoned() \
                    and len(self._returning(ca, ct, now)) < free:
                return ca, ct
        return None

    def _settle_holds(self, holding: set[_Session], now: float) -> None:
        """Start the new holds, end the ones no longer held."""
        for s in self._held - holding:
            self._end_hold(s, now)
        for s in holding - self._held:
            s.held_since = now
            self._held.add(s)
            self.holds_total += 1

    def _end_hold(self, s: _Session, now: float) -> None:
        self._held.discard(s)
        if s.held_since is not None:
            seconds = max(0.0, now - s.held_since)
            s.agent.held += seconds
            self.held_seconds_total += seconds
        s.held_since = None

    def _start(self, a: _Agent, t: Ticket, now: float) -> None:
        s = a.sessions[t.session]
        self._unqueue(t, TicketState.DISPATCHED)
        t.dispatched_at = now
        t.expected = self._expected(t)
        t.express = s in self._held
        if t.express:
            self._end_hold(s, now)
        self.in_flight += 1
        a.in_flight += 1
        s.in_flight += 1
        self._running.add(t)
        t.charged_in = t.growth
        self._charge(a, t.growth * INPUT_WEIGHT)
        if a.queued == 0:
            self._last_left = a.counter
        wait = now - t.submitted_at
        a.dispatched += 1
        a.wait_total += wait
        a.wait_max = max(a.wait_max, wait)
        self.dispatched_total += 1
        self.express_total += t.express
        for observe in self.wait_observers:
            observe(a.name, wait)
        if t.future is not None and not t.future.done():
            t.future.set_result(None)

    def _on_change(self) -> None:
        """Hook for the driver: the state changed (a hold may have started or ended)."""

    def _unqueue(self, t: Ticket, state: TicketState) -> None:
        a = self._agents[t.agent]
        q = a.queues.get(t.priority)
        if q:
            if q[0] is t:
                q.popleft()
            else:
                q.remove(t)
            if not q:
                del a.queues[t.priority]
        a.queued -= 1
        a.sessions[t.session].queued -= 1
        self.queued -= 1
        if a.queued == 0:
            self._backlogged.pop(a.name, None)
        t.state = state
        self._prune_expiry()

    def _prune_expiry(self) -> None:
        """Drop the expiry entries of tickets no longer queued (see ``_expiry``)."""
        heap = self._expiry
        if self.queued == 0:
            heap.clear()
        elif len(heap) > 2 * self.queued + 64:
            self._expiry = [e for e in heap if e[2].state is TicketState.QUEUED]
            heapq.heapify(self._expiry)

    def _forget_idle(self) -> None:
        """Bound the state kept for agents and sessions that have nothing outstanding."""
        if self._sessions > MAX_IDLE_SESSIONS:
            idle = sorted((s.last_seen, id(s), s) for a in self._agents.values()
                          for s in a.sessions.values()
                          if not s.queued and not s.in_flight and s not in self._held)
            for _, _, s in idle[:self._sessions - MAX_IDLE_SESSIONS // 2]:
                self._loopers.discard(s)
                del s.agent.sessions[s.key]
                self._sessions -= 1
        if len(self._agents) <= MAX_IDLE_AGENTS:
            return
        idle_agents = sorted((a.last_seen, n) for n, a in self._agents.items()
                             if not a.queued and not a.in_flight
                             and not any(s in self._held for s in a.sessions.values()))
        for _, n in idle_agents[:len(self._agents) - MAX_IDLE_AGENTS // 2]:
            a = self._agents.pop(n)
            for s in a.sessions.values():
                self._loopers.discard(s)
            self._sessions -= len(a.sessions)

    def retry_after(self, ahead: int, slots: int) -> int:
        """Seconds until ``ahead`` queued requests should have drained through ``slots``."""
        return max(1, min(3600, math.ceil(self._occupancy * (ahead + 1) / max(1, slots))))

    def _too_many(self, message: str, code: str, ahead: int, slots: int) -> ProxyError:
        after = self.retry_after(ahead, slots)
        return ProxyError(429, f"{message}; retry in about {after} s", code=code,
                          headers={"Retry-After": str(after)})

    def _expired_error(self, t: Ticket) -> ProxyError:
        waited = self.clock() - t.submitted_at
        if t.expiry_code == "deadline_exceeded":
            msg = f"the request's deadline passed after {waited:.1f} s waiting for a backend slot"
        else:
            msg = (f"no backend slot became free within the queue time limit "
                   f"({self.limits.queue_ttl:g} s)")
        if self.paused:
            msg += f": {self.paused}"
        return ProxyError(503, msg, code=t.expiry_code,
                          headers={"Retry-After": str(self.retry_after(self.queued, self.slots))})
