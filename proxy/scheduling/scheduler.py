"""Per-agent fair queuing in front of the backend's slots.

Local servers run requests first-come-first-served (Ollama, llama-server's slot queue, vLLM by
default), so one agent's burst of long requests makes every other agent wait behind all of it.
toolmend owns the queue instead: it never sends the backend more requests than it has slots,
and picks which waiting request goes next.

The choice follows the Virtual Token Counter (Sheng et al., "Fairness in Serving Large Language
Models", OSDI 2024): each agent has a service counter, charged input tokens at dispatch (×1) and
output tokens as they stream (×2, since decoding costs more per token), divided by the agent's
weight. The backlogged agent with the smallest counter goes next. An agent that becomes
backlogged has its counter lifted to the smallest counter among the backlogged (or to the
counter of the agent that last left the backlog), so idle time is not banked as credit. Priority
classes are strict; within one agent requests stay in order.

Fair queuing alone cannot help an agent running a tool loop: it sends one request, waits for
the answer, runs a tool, sends the next, so it is never backlogged and every step lands behind
whatever holds the slots. Two protections cover that: while more than one agent is active, no
agent holds more than ``slots − 1`` slots, and one slot is reserved for small requests (short
prompt growth, small ``max_tokens``), the express slot.

The core (``submit`` / ``release`` / ``cancel`` / ``expire``) is a synchronous state machine on
an injected clock, so every rule is tested without sleeping; ``slot()`` is the thin asyncio
wrapper the request handler uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import math
import time
import tomllib
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolmend.server.errors import ProxyError, bad_request

if TYPE_CHECKING:
    from toolmend.backends.upstream import UpstreamClient
    from toolmend.server.config import Settings
    from toolmend.server.context import RequestContext

INPUT_WEIGHT = 1.0  # VTC's charge per prompt token
OUTPUT_WEIGHT = 2.0  # VTC's charge per generated token
DEADLINE_HEADER = "X-Toolmend-Deadline-Ms"
PRIORITY_HEADER = "X-Priority"
DEFAULT_AGENT = "*"  # [agents."*"]: the policy of every agent not named
MAX_IDLE_AGENTS = 4096  # idle agents' state kept; beyond it the oldest idle ones are forgotten

# Slots per backend when neither the user nor the backend says (Ollama serves one request at a
# time unless OLLAMA_NUM_PARALLEL is raised; llama-server's default is 4 slots with
# --parallel auto; vLLM and SGLang batch continuously and take many).
# The embedded llama-cpp-python server holds one lock around its model: one at a time.
DEFAULT_SLOTS = {"ollama": 1, "llamacpp": 4, "vllm": 64, "sglang": 64, "embedded": 1}
FALLBACK_SLOTS = 4


# --- per-agent policy ([agents.NAME] in the config file) ------------------------------------

@dataclass(frozen=True, slots=True)
class AgentPolicy:
    """How one agent is treated: its share, its class, how high it may ask, how much it may queue.

    ``priority``: higher classes are served strictly first. ``max_priority``: the highest value
    the agent may ask for with ``X-Priority`` (it may always ask for less). ``max_queue``: its own
    queue limit, or None for the global per-agent limit.
    """

    weight: float = 1.0
    priority: int = 0
    max_priority: int | None = None
    max_queue: int | None = None

    @property
    def priority_ceiling(self) -> int:
        return self.priority if self.max_priority is None else self.max_priority


@dataclass(slots=True)
class AgentPolicies:
    by_agent: dict[str, AgentPolicy] = field(default_factory=dict)
    default: AgentPolicy = field(default_factory=AgentPolicy)

    def get(self, agent: str) -> AgentPolicy:
        return self.by_agent.get(agent, self.default)


_POLICY_KEYS = {"weight": float, "priority": int, "max_priority": int, "max_queue": int}


def policies_from_dict(agents: dict[str, Any], source: str = "config") -> AgentPolicies:
    """Build policies from the ``agents`` table; errors name the exact key, like config.py's."""
    out = AgentPolicies()
    for name, table in agents.items():
        where = f"{source}: [agents.{name}]"
        if not isinstance(table, dict):
            raise ValueError(f"{where} must be a table")
        kw: dict[str, Any] = {}
        for key, raw in table.items():
            k = key.replace("-", "_")
            kind = _POLICY_KEYS.get(k)
            if kind is None:
                raise ValueError(f"{where}: unknown key {key!r}; one of {sorted(_POLICY_KEYS)}")
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                raise ValueError(f"{where}: {key} must be a number, got {raw!r}")
            if kind is int and raw != int(raw):
                raise ValueError(f"{where}: {key} must be an integer, got {raw!r}")
            kw[k] = kind(raw)
        if kw.get("weight", 1.0) <= 0:
            raise ValueError(f"{where}: weight must be greater than 0")
        if kw.get("max_queue", 1) < 0:
            raise ValueError(f"{where}: max_queue must be 0 or more")
        policy = AgentPolicy(**kw)
        if name == DEFAULT_AGENT:
            out.default = policy
        else:
            out.by_agent[name] = policy
    return out


def load_agent_policies(path: str | Path | None) -> AgentPolicies:
    """Read ``[agents.NAME]`` tables from the TOML config (config.py skips table sections)."""
    if not path:
        return AgentPolicies()
    p = Path(path)
    data = tomllib.loads(p.read_text())
    agents = data.get("agents", {})
    if not isinstance(agents, dict):
        raise ValueError(f"{p}: 'agents' must be a table of [agents.NAME] sections")
    return policies_from_dict(agents, str(p))


# --- requests in the queue --------------------------------------------------------------------

class TicketState(enum.Enum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RELEASED = "released"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Cost:
    """What the scheduler knows about a request before it runs: estimated prompt tokens and
    the client's ``max_tokens`` (None when unset)."""

    prompt_tokens: int
    max_tokens: int | None = None


@dataclass(eq=False, slots=True, weakref_slot=True)
class Ticket:
    """One request's place in the scheduler; once dispatched it is the grant of a slot.

    ``charge_output(n)`` charges generated tokens as they stream; ``track(fn)`` instead gives a
    counter the scheduler reads itself when it next decides (so the relay's hot path does no
    extra work at all).
    """

    seq: int
    agent: str
    priority: int
    cost: Cost
    small: bool
    submitted_at: float
    expires_at: float
    expiry_code: str
    state: TicketState = TicketState.QUEUED
    dispatched_at: float | None = None
    released_at: float | None = None
    express: bool = False  # dispatched while only the express slot was free
    charged_in: float = 0.0
    charged_out: int = 0
    progress: Callable[[], int] | None = None
    future: asyncio.Future[None] | None = None
    _owner: FairScheduler | None = None

    @property
    def waited(self) -> float | None:
        if self.dispatched_at is None:
            return None
        return self.dispatched_at - self.submitted_at

    def charge_output(self, n: int) -> None:
        if self._owner is not None and n > 0 and self.state is TicketState.DISPATCHED:
            self._owner._charge_out(self, self.charged_out + n)

    def track(self, progress: Callable[[], int]) -> None:
        self.progress = progress

    def _abandoned(self) -> bool:
        fut = self.future
        return fut is not None and fut.done()


@dataclass(slots=True)
class _Agent:
    name: str
    policy: AgentPolicy
    counter: float = 0.0
    queues: dict[int, deque[Ticket]] = field(default_factory=dict)
    queued: int = 0
    in_flight: int = 0
    last_seen: float = 0.0
    last_prompt: int = 0
    # metrics
    dispatched: int = 0
    wait_total: float = 0.0
    wait_max: float = 0.0
    service: float = 0.0  # unweighted tokens charged (input ×1 + output ×2)

    def head(self) -> Ticket | None:
        best: Ticket | None = None
        for q in self.queues.values():
            if q and (best is None or q[0].priority > best.priority):
                best = q[0]
        return best


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


@dataclass(slots=True)
class Limits:
    max_queue: int = 1024
    max_queue_per_agent: int = 64
    queue_ttl: float = 300.0


# --- the scheduler --------------------------------------------------------------------------

class FairScheduler:
    """VTC fair queue with priority classes, a per-agent cap and an express slot.

    Readable state for metrics: ``slots``, ``in_flight``, ``queued``, ``rejections`` (by reason),
    ``dispatched_total``, ``express_total``, ``queue_depths()``, ``agent_stats()``; and
    ``wait_observers`` (called with agent and seconds waited at each dispatch) for histograms.
    """

    def __init__(self, slots: int, *, policies: AgentPolicies | None = None,
                 limits: Limits | None = None, agent_cap: bool = True,
                 express_slot: bool = True, express_max_prompt_tokens: int = 512,
                 express_max_tokens: int = 256, express_lend_after: float = 0.0,
                 agent_idle_after: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.policies = policies or AgentPolicies()
        self.limits = limits or Limits()
        self.agent_cap_enabled = agent_cap
        self.express_enabled = express_slot
        self.express_max_prompt_tokens = express_max_prompt_tokens
        self.express_max_tokens = express_max_tokens
        self.express_lend_after = express_lend_after
        self.agent_idle_after = agent_idle_after
        self.slots = 0
        self.in_flight = 0
        self.queued = 0
        self.dispatched_total = 0
        self.express_total = 0
        self.rejections: Counter[str] = Counter()
        self.wait_observers: list[Callable[[str, float], None]] = []
        self._agents: dict[str, _Agent] = {}
        self._backlogged: dict[str, _Agent] = {}  # insertion order is irrelevant; keys matter
        self._running: set[Ticket] = set()
        self._slots_taken: set[int] = set()  # slot numbers held (asyncio driver, for traces)
        # Expiry times of queued tickets. A ticket that leaves the queue (dispatched, cancelled,
        # expired) leaves its entry behind, and entries hold tickets: _unqueue clears the heap
        # whenever the queue empties and rebuilds it once stale entries outnumber live ones,
        # so a finished ticket is not kept alive for queue_ttl (amortized O(1) per request).
        self._expiry: list[tuple[float, int, Ticket]] = []
        self._last_left = 0.0  # counter of the agent that last left the backlog
        self._seq = 0
        self._hold = 1.0  # moving average of seconds a request holds its slot (for Retry-After)
        self._last_small_at = -math.inf
        # why nothing may be dispatched right now (a launched backend restarting), or None
        self.paused: str | None = None
        self._refusal: Callable[[], ProxyError] | None = None  # set by drain()
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

    def drain(self, refusal: Callable[[], ProxyError]) -> int:
        """The server is going away: dispatch nothing more, fail every queued request with
        ``refusal()`` (better retried elsewhere now than cut later) and refuse new ones.
        Requests already dispatched keep their slots. Returns how many were refused."""
        self.pause("draining")
        self._refusal = refusal
        queued = [t for a in self._backlogged.values() for q in a.queues.values() for t in q]
        for t in queued:
            self._unqueue(t, TicketState.CANCELLED)
            self.rejections["draining"] += 1
            if t.future is not None and not t.future.done():
                t.future.set_exception(refusal())
        return len(queued)

    def resume(self) -> list[Ticket]:
        self.paused = None
        return self._dispatch(self.clock())

    @property
    def express(self) -> bool:
        return self.express_enabled and self.slots >= 2

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
    def submit(self, agent: str, cost: Cost, *, priority: int | None = None,
               deadline: float | None = None) -> Ticket:
        """Queue a request (and dispatch it at once if it may run). Raises 429 or 503.

        ``deadline`` is an absolute clock time by which the request must have been dispatched.
        """
        if self._refusal is not None:
            self.rejections["draining"] += 1
            raise self._refusal()
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
                                 a.queued, max(1, self._cap(a, now)))
        if self.queued >= self.limits.max_queue:
            self.rejections["queue_full"] += 1
            raise self._too_many(f"{self.queued} requests are waiting for the backend "
                                 f"(limit {self.limits.max_queue})", "queue_full",
                                 self.queued, self.slots)
        expires_at, code = now + self.limits.queue_ttl, "queue_timeout"
        if deadline is not None and deadline <= expires_at:
            expires_at, code = deadline, "deadline_exceeded"
        # Prompt growth is what a sequential loop adds to the conversation since its previous
        # step (whose prefix the backend may have cached). Requests sent while the agent has
        # others outstanding are a burst, not a loop: their whole prompt counts.
        sequential = a.queued == 0 and a.in_flight == 0
        growth = cost.prompt_tokens - a.last_prompt \
            if sequential and cost.prompt_tokens >= a.last_prompt else cost.prompt_tokens
        a.last_prompt = cost.prompt_tokens
        small = (cost.max_tokens is not None and cost.max_tokens <= self.express_max_tokens
                 and growth <= self.express_max_prompt_tokens)
        if small:
            self._last_small_at = now
        self._seq += 1
        t = Ticket(self._seq, agent, priority, cost, small, now, expires_at, code, _owner=self)
        if a.queued == 0:
            self._poll()
            self._lift(a)
        a.queues.setdefault(priority, deque()).append(t)
        a.queued += 1
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
                prompt_tokens: int | None = None) -> list[Ticket]:
        """The request is over: free its slot and dispatch the next. Safe to call twice.

        The token counts, when the backend reported them (usage), replace the estimates.
        """
        if t.state is not TicketState.DISPATCHED:
            return []
        now = self.clock()
        a = self._agents[t.agent]
        if t.progress is not None:
            with contextlib.suppress(Exception):
                self._charge_out(t, t.progress())
        # Counters only grow: usage raises an estimate that was short but never refunds one
        # that was long. A refund could drop a running agent's counter below the level a newly
        # arrived agent was lifted to, and the newcomer would wait behind one more request.
        if output_tokens is not None and output_tokens > t.charged_out:
            self._charge_out(t, output_tokens)
        if prompt_tokens is not None and prompt_tokens > t.charged_in:
            delta = prompt_tokens - t.charged_in
            t.charged_in = prompt_tokens
            self._charge(a, delta * INPUT_WEIGHT)
        t.state = TicketState.RELEASED
        t.released_at = now
        t.progress = None
        self._running.discard(t)
        self.in_flight -= 1
        a.in_flight -= 1
        a.last_seen = now
        if t.dispatched_at is not None:
            self._hold += 0.1 * (now - t.dispatched_at - self._hold)
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
                                 a.service, a.counter) for n, a in self._agents.items()}

    def counter(self, agent: str) -> float:
        self._poll()
        a = self._agents.get(agent)
        return a.counter if a is not None else 0.0

    def active_agents(self, now: float | None = None) -> int:
        now = self.clock() if now is None else now
        horizon = now - self.agent_idle_after
        return sum(1 for a in self._agents.values()
                   if a.queued or a.in_flight or a.last_seen >= horizon)

    # internals -------------------------------------------------------------------------------
    def _agent(self, name: str) -> _Agent:
        a = self._agents.get(name)
        if a is None:
            a = self._agents[name] = _Agent(name, self.policies.get(name),
                                            counter=self._last_left)
        return a

    def _lift(self, a: _Agent) -> None:
        """No banked credit: a newly backlogged agent starts level with the least served."""
        others = [b.counter for b in self._backlogged.values() if b is not a]
        floor = min(others) if others else self._last_left
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
            if t.progress is not None:
                try:
                    n = t.progress()
                except Exception:
                    continue
                if n > t.charged_out:
                    self._charge_out(t, n)

    def _cap(self, a: _Agent, now: float) -> int:
        if self.agent_cap_enabled and self.slots >= 2 and a.in_flight >= self.slots - 1 \
                and self.active_agents(now) > 1:
            return self.slots - 1
        return self.slots

    def _pick(self, now: float) -> tuple[_Agent, Ticket] | None:
        free = self.slots - self.in_flight
        # With lending on, the express slot is held back only while small requests are about,
        # so a backend serving nothing but long requests keeps all its slots; the price is that
        # the first small request after a quiet spell waits for one release.
        lend = self.express_lend_after
        large_ok = free > 1 or not self.express or \
            (lend > 0 and now - self._last_small_at > lend)
        best: tuple[_Agent, Ticket] | None = None
        best_key: tuple[int, float, int, int, int] | None = None
        for a in self._backlogged.values():
            t = a.head()
            if t is None:
                continue
            if not (t.small or large_ok):
                continue
            if a.in_flight >= self._cap(a, now):
                continue
            # ties (a newly backlogged agent is lifted level with the least served) go to the
            # agent with less running and less waiting: the tool loop, not the burst
            key = (-t.priority, a.counter, a.in_flight, a.queued, t.seq)
            if best_key is None or key < best_key:
                best, best_key = (a, t), key
        return best

    def _dispatch(self, now: float) -> list[Ticket]:
        if self._expiry and self._expiry[0][0] <= now:
            self.expire(now)
        out: list[Ticket] = []
        polled = False
        while self.in_flight < self.slots and self._backlogged and self.paused is None:
            if not polled:
                self._poll()
                polled = True
            choice = self._pick(now)
            if choice is None:
                break
            a, t = choice
            if t._abandoned():  # its waiter was cancelled and has not run its cleanup yet
                self._unqueue(t, TicketState.CANCELLED)
                continue
            self._unqueue(t, TicketState.DISPATCHED)
            t.dispatched_at = now
            t.express = self.express and self.slots - self.in_flight == 1 and t.small
            self.in_flight += 1
            a.in_flight += 1
            self._running.add(t)
            t.charged_in = t.cost.prompt_tokens
            self._charge(a, t.cost.prompt_tokens * INPUT_WEIGHT)
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
            out.append(t)
        return out

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
        if len(self._agents) <= MAX_IDLE_AGENTS:
            return
        idle = sorted((a.last_seen, n) for n, a in self._agents.items()
                      if not a.queued and not a.in_flight)
        for _, n in idle[:len(self._agents) - MAX_IDLE_AGENTS // 2]:
            del self._agents[n]

    def retry_after(self, ahead: int, slots: int) -> int:
        """Seconds until ``ahead`` queued requests should have drained through ``slots``."""
        return max(1, min(3600, math.ceil(self._hold * (ahead + 1) / max(1, slots))))

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

    def _take_slot_number(self) -> int:
        """The lowest slot number nobody holds: which of the backend's slots a request ran in,
        for its span (``toolmend.slot``). Numbers past ``slots`` appear only while the slot
        count shrinks under running requests."""
        n = 0
        while n in self._slots_taken:
            n += 1
        self._slots_taken.add(n)
        return n

    # asyncio ---------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def slot(self, ctx: RequestContext, cost: Cost, *, priority: int | None = None,
                   deadline: float | None = None) -> AsyncIterator[Ticket]:
        """Wait for a slot for ``ctx.agent_id``'s request, hold it for the body, then release.

        Stamps ``ctx.queued_at`` / ``ctx.dispatched_at``. A waiter cancelled while queued
        (the client went away) leaves the queue at once and never dispatches. At the end the
        usage the backend reported, when any, corrects the estimated charges.
        """
        loop = asyncio.get_running_loop()
        ctx.queued_at = loop.time()
        t = self.submit(ctx.agent_id, cost, priority=priority, deadline=deadline)
        if t.state is TicketState.QUEUED:
            t.future = loop.create_future()
            try:
                async with asyncio.timeout(max(0.0, t.expires_at - self.clock())):
                    await t.future
            except TimeoutError:
                if t.state is TicketState.QUEUED:
                    self._expire_one(t)
                if t.state is not TicketState.DISPATCHED:
                    raise self._expired_error(t) from None
            except BaseException:
                self.cancel(t)
                raise
        ctx.dispatched_at = loop.time()
        ctx.priority = t.priority
        ctx.slot = number = self._take_slot_number()
        try:
            yield t
        finally:
            self._slots_taken.discard(number)
            usage = ctx.usage or {}
            out, prompt = usage.get("completion_tokens"), usage.get("prompt_tokens")
            self.release(t, output_tokens=out if isinstance(out, int) else None,
                         prompt_tokens=prompt if isinstance(prompt, int) else None)


def default_slots(backend: str) -> int:
    return DEFAULT_SLOTS.get(backend, FALLBACK_SLOTS)


def scheduler_from_settings(settings: Settings) -> FairScheduler:
    """The scheduler for one upstream; its slot count is final once ``probe_slots`` ran."""
    slots = settings.slots if settings.slots > 0 else default_slots(settings.backend)
    return FairScheduler(
        slots, policies=load_agent_policies(settings.config_path),
        limits=Limits(settings.max_queue, settings.max_queue_per_agent, settings.queue_ttl),
        agent_cap=settings.agent_cap, express_slot=settings.express_slot,
        express_max_prompt_tokens=settings.express_max_prompt_tokens,
        express_max_tokens=settings.express_max_tokens,
        express_lend_after=settings.express_lend_after,
        agent_idle_after=settings.agent_idle_after)


async def probe_slots(up: UpstreamClient, settings: Settings) -> int:
    """Slots from the backend where it says (llama-server's ``/props`` ``total_slots``), else the
    configured count, else the backend's usual default."""
    if settings.slots > 0:
        return settings.slots
    detected = await up.detect()  # probes once; llama-server's /props gives total_slots
    if isinstance(detected.slots, int) and detected.slots > 0:
        return detected.slots
    kind = settings.backend if settings.backend != "auto" else detected.kind
    return default_slots(kind)


def parse_deadline(value: str | None, now: float) -> float | None:
    """``X-Toolmend-Deadline-Ms``: how long, in ms from now, the request may wait for a slot."""
    if value is None or not value.strip():
        return None
    try:
        ms = float(value.strip())
    except ValueError:
        ms = math.nan
    if not math.isfinite(ms) or ms < 0:
        raise bad_request(f"{DEADLINE_HEADER} must be a number of milliseconds, got "
                          f"{value[:32]!r}", param=DEADLINE_HEADER, code="invalid_deadline")
    return now + ms / 1000.0


def estimate_cost(body: dict[str, Any], raw: bytes) -> Cost:
    """Prompt tokens from the serialized body's size (about four bytes a token, counting the
    tool schemas the backend also has to read), and the client's ``max_tokens``."""
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    return Cost(len(raw) // 4, mt if isinstance(mt, int) and not isinstance(mt, bool) else None)
