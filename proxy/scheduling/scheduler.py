"""The fair queue's asyncio driver, and how toolmend builds it from its settings.

The rules live in :mod:`toolmend.scheduling.fair_queue`, a synchronous state machine on an
injected clock (every rule is tested there without sleeping). :class:`FairScheduler` adds what
needs an event loop: ``slot()``, the context manager a request handler waits in, and the timer
that wakes the queue when a slot held back for a returning agent stops being held.

The names other modules import from here (``FairScheduler``, ``Cost``, ``Ticket``, the
policies, the headers) stay importable from this module.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from toolmend.scheduling.fair_queue import (
    INPUT_WEIGHT,
    OUTPUT_WEIGHT,
    PRIORITY_HEADER,
    AgentSnapshot,
    Cost,
    FairQueue,
    Limits,
    Ticket,
    TicketState,
)
from toolmend.scheduling.policy import (
    DEFAULT_AGENT,
    AgentPolicies,
    AgentPolicy,
    load_agent_policies,
    policies_from_dict,
)
from toolmend.server.errors import ProxyError, bad_request

if TYPE_CHECKING:
    from toolmend.backends.upstream import UpstreamClient
    from toolmend.server.config import Settings
    from toolmend.server.context import RequestContext

__all__ = ["DEADLINE_HEADER", "DEFAULT_AGENT", "DEFAULT_SLOTS", "INPUT_WEIGHT", "OUTPUT_WEIGHT",
           "PRIORITY_HEADER", "AgentPolicies", "AgentPolicy", "AgentSnapshot", "Cost",
           "FairScheduler", "Limits", "Ticket", "TicketState", "default_slots",
           "estimate_cost", "load_agent_policies", "parse_deadline", "policies_from_dict",
           "probe_slots", "request_cost", "scheduler_from_settings"]

DEADLINE_HEADER = "X-Toolmend-Deadline-Ms"

# Slots per backend when neither the user nor the backend says (Ollama serves one request at a
# time unless OLLAMA_NUM_PARALLEL is raised; llama-server's default is 4 slots with
# --parallel auto; vLLM and SGLang batch continuously and take many).
# The embedded llama-cpp-python server holds one lock around its model: one at a time.
DEFAULT_SLOTS = {"ollama": 1, "llamacpp": 4, "vllm": 64, "sglang": 64, "embedded": 1}
FALLBACK_SLOTS = 4


class FairScheduler(FairQueue):
    """The fair queue with an asyncio face: ``slot()`` and the hold timer."""

    def __init__(self, slots: int, **kw: Any) -> None:
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._slots_taken: set[int] = set()  # slot numbers held, for traces
        self._refusal: Callable[[], ProxyError] | None = None  # set by drain()
        super().__init__(slots, **kw)

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

    def submit(self, agent: str, cost: Cost, **kw: Any) -> Ticket:  # type: ignore[override]
        if self._refusal is not None:
            self.rejections["draining"] += 1
            raise self._refusal()
        return super().submit(agent, cost, **kw)

    def _take_slot_number(self) -> int:
        """The lowest slot number nobody holds: which of the backend's slots a request ran in,
        for its span (``toolmend.slot``). Numbers past ``slots`` appear only while the slot
        count shrinks under running requests."""
        n = 0
        while n in self._slots_taken:
            n += 1
        self._slots_taken.add(n)
        return n

    def _on_change(self) -> None:
        """Keep one timer armed for the earliest held slot's lapse (none when nothing is held).
        Without a running loop (the core driven by hand, as in tests) there is nothing to arm."""
        at = self.next_hold_lapse()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None
        if at is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer_at = at
        self._timer = loop.call_later(max(0.0, at - self.clock()), self._lapse)

    def _lapse(self) -> None:
        self._timer = self._timer_at = None
        self.wake()

    def slot(self, ctx: RequestContext, cost: Cost, *, priority: int | None = None,
             deadline: float | None = None) -> Slot:
        """Wait for a slot for ``ctx``'s request (its agent and session), hold it for the body,
        then release: ``async with sched.slot(ctx, cost) as ticket``.

        Stamps ``ctx.queued_at`` / ``ctx.dispatched_at``. A waiter cancelled while queued
        (the client went away) leaves the queue at once and never dispatches. At the end the
        usage the backend reported, when any, corrects the estimated charges, and the time to
        the upstream's first token teaches the queue the backend's speed.
        """
        return Slot(self, ctx, cost, priority, deadline)


class Slot:
    """:meth:`FairScheduler.slot`'s context manager: a class, not a generator wrapped by
    ``contextlib``, because every request enters and leaves one."""

    __slots__ = ("_cost", "_ctx", "_deadline", "_number", "_priority", "_sched", "_ticket")

    def __init__(self, sched: FairScheduler, ctx: RequestContext, cost: Cost,
                 priority: int | None, deadline: float | None) -> None:
        self._sched = sched
        self._ctx = ctx
        self._cost = cost
        self._priority = priority
        self._deadline = deadline
        self._ticket: Ticket | None = None
        self._number = -1

    async def __aenter__(self) -> Ticket:
        sched, ctx = self._sched, self._ctx
        loop = asyncio.get_running_loop()
        ctx.queued_at = loop.time()
        t = sched.submit(ctx.agent_id, self._cost, session=ctx.session_id,
                         priority=self._priority, deadline=self._deadline)
        if t.state is TicketState.QUEUED:
            t.future = loop.create_future()
            try:
                async with asyncio.timeout(max(0.0, t.expires_at - sched.clock())):
                    await t.future
            except TimeoutError:
                if t.state is TicketState.QUEUED:
                    sched._expire_one(t)
                if t.state is not TicketState.DISPATCHED:
                    raise sched._expired_error(t) from None
            except BaseException:
                sched.cancel(t)
                raise
        ctx.dispatched_at = loop.time()
        ctx.priority = t.priority
        ctx.slot = self._number = sched._take_slot_number()
        self._ticket = t
        return t

    async def __aexit__(self, et: Any, ev: BaseException | None, tb: Any) -> None:
        t, self._ticket = self._ticket, None
        if t is None:
            return
        sched, ctx = self._sched, self._ctx
        sched._slots_taken.discard(self._number)
        usage = ctx.usage or {}
        out, prompt = usage.get("completion_tokens"), usage.get("prompt_tokens")
        first = ctx.upstream_first_token_at
        dispatched = ctx.dispatched_at
        sched.release(t, output_tokens=out if isinstance(out, int) else None,
                      prompt_tokens=prompt if isinstance(prompt, int) else None,
                      first_token_after=None if first is None or dispatched is None
                      else first - dispatched)


def default_slots(backend: str) -> int:
    return DEFAULT_SLOTS.get(backend, FALLBACK_SLOTS)


def scheduler_from_settings(settings: Settings) -> FairScheduler:
    """The scheduler for one upstream; its slot count is final once ``probe_slots`` ran."""
    slots = settings.slots if settings.slots > 0 else default_slots(settings.backend)
    return FairScheduler(
        slots, policies=load_agent_policies(settings.config_path),
        limits=Limits(settings.max_queue, settings.max_queue_per_agent, settings.queue_ttl),
        express_slot=settings.express_slot,
        express_max_prompt_tokens=settings.express_max_prompt_tokens,
        express_max_tokens=settings.express_max_tokens,
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


def request_cost(body: dict[str, Any], size: int | None) -> Cost:
    """:func:`estimate_cost` before the upstream body is serialized: from the client's body
    size (``Content-Length``) instead of the upstream body's."""
    return Cost(max(0, size or 0) // 4, estimate_cost(body, b"").max_tokens)


def estimate_cost(body: dict[str, Any], raw: bytes) -> Cost:
    """Prompt tokens from the serialized body's size (about four bytes a token, counting the
    tool schemas the backend also has to read), and the client's ``max_tokens``."""
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    return Cost(len(raw) // 4, mt if isinstance(mt, int) and not isinstance(mt, bool) else None)
