"""Recent agent sessions, kept in memory for ``GET /toolmend/v1/sessions`` and ``toolmend trace``.

An agent loop is a chain of requests separated by the agent's own work (running the tools the
model asked for). Seeing that chain as one timeline, step by step, is what tells "the model is
slow" from "the queue is long" from "my tool is slow". The tracker is bounded twice over (number
of sessions, steps per session) so an endless stream of new sessions costs fixed memory; the
least recently active session is forgotten first.

A session belongs to its agent: sessions are keyed by (agent id, session id), so one agent
naming another agent's session id (by accident or on purpose) starts a session of its own
instead of writing steps into the other's. Ids are stored as text that any JSON encoder
accepts, so one odd request cannot break ``GET /toolmend/v1/sessions`` for every reader.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson


@dataclass(slots=True)
class StepRecord:
    """One loop step: one chat request, with its timings in milliseconds (None: did not happen)."""

    step: int
    request_id: str
    started: float  # epoch seconds
    ended: float  # epoch seconds
    status: int
    model: str | None = None
    queue_ms: float | None = None
    ttft_ms: float | None = None
    upstream_ttft_ms: float | None = None
    generation_ms: float | None = None
    duration_ms: float | None = None
    tool_time_ms: float | None = None  # agent's time since the previous step of this session
    tool_names: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    repairs: int = 0
    retries: int = 0
    input_tokens: int | None = None
    output_tokens: int | None = None
    error: str | None = None
    trace_id: str | None = None
    span_id: str | None = None


@dataclass(slots=True)
class SessionRecord:
    id: str
    agent_id: str
    source: str  # header | trace | fingerprint
    steps: deque[StepRecord]
    last_ended: float | None = None

    def summary(self) -> dict[str, Any]:
        steps = list(self.steps)
        first, last = (steps[0], steps[-1]) if steps else (None, None)
        return {
            "id": self.id, "agent_id": self.agent_id, "source": self.source,
            "steps": len(steps),
            "last_step": last.step if last else None,
            "started": first.started if first else None,
            "ended": last.ended if last else None,
            "trace_ids": _unique(s.trace_id for s in steps),
            "model": last.model if last else None,
        }

    def detail(self) -> dict[str, Any]:
        return self.summary() | {"steps": [asdict(s) for s in self.steps]}


def _unique(items: Any) -> list[str]:
    out: list[str] = []
    for it in items:
        if it and it not in out:
            out.append(it)
    return out


def text(value: str) -> str:
    """``value`` as text every JSON encoder accepts: lone surrogates (undecodable bytes) are
    written as ``\\udcff`` escapes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def dumps(doc: Any) -> bytes:
    """``orjson.dumps``, escaping any string it refuses instead of failing the reader."""
    try:
        return orjson.dumps(doc)
    except TypeError:
        return orjson.dumps(_escape_tree(doc))


def _escape_tree(v: Any) -> Any:
    if isinstance(v, str):
        return text(v)
    if isinstance(v, dict):
        return {text(str(k)): _escape_tree(x) for k, x in v.items()}
    if isinstance(v, list | tuple | deque):
        return [_escape_tree(x) for x in v]
    return v


class SessionTracker:
    """A bounded LRU of sessions, each a bounded list of steps; O(1) per recorded step.

    Keyed by (agent id, session id): see the module docstring.
    """

    def __init__(self, max_sessions: int = 256, max_steps: int = 512) -> None:
        self.max_sessions = max(1, max_sessions)
        self.max_steps = max(1, max_steps)
        self._sessions: OrderedDict[tuple[str, str], SessionRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def tool_time_ms(self, agent_id: str, session_id: str, started: float) -> float | None:
        """The agent's own time between its previous step's end and this step's start.

        None for a first step or when steps overlap (an agent running parallel requests).
        """
        s = self._sessions.get((text(agent_id), text(session_id)))
        if s is None or s.last_ended is None or started < s.last_ended:
            return None
        return round((started - s.last_ended) * 1000, 3)

    def last_ended(self, agent_id: str, session_id: str) -> float | None:
        """When the session's latest step ended (epoch seconds), if it is known."""
        s = self._sessions.get((text(agent_id), text(session_id)))
        return None if s is None else s.last_ended

    def record(self, session_id: str, agent_id: str, source: str, step: StepRecord) -> None:
        key = (text(agent_id), text(session_id))
        s = self._sessions.get(key)
        if s is None:
            s = SessionRecord(key[1], key[0], source, deque(maxlen=self.max_steps))
            self._sessions[key] = s
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        else:
            self._sessions.move_to_end(key)
        s.steps.append(step)
        s.last_ended = step.ended if s.last_ended is None else max(s.last_ended, step.ended)

    def get(self, session_id: str, agent_id: str | None = None) -> SessionRecord | None:
        """The session ``session_id`` of ``agent_id``; without an agent, the one session of
        that id when only one agent has it (see :meth:`matching`)."""
        if agent_id is not None:
            return self._sessions.get((agent_id, session_id))
        found = self.matching(session_id)
        return found[0] if len(found) == 1 else None

    def matching(self, session_id: str) -> list[SessionRecord]:
        """Every agent's session with this id, most recently active first."""
        return [s for s in reversed(self._sessions.values()) if s.id == session_id]

    def recent(self, limit: int = 50) -> list[SessionRecord]:
        """Most recently active first."""
        out: list[SessionRecord] = []
        for s in reversed(self._sessions.values()):
            if len(out) >= limit:
                break
            out.append(s)
        return out
