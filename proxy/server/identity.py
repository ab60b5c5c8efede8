"""Who is asking: the agent and the session of a request, decided by one trust table.

Fair queuing needs an agent and session traces need a session, yet real agent clients send
neither ``X-Agent-Id`` nor ``X-Session-Id``. Most of them do send something of their own
(opencode, Codex, Claude Code, OpenTelemetry baggage), and the ones that send nothing still
resend their whole history on every step. :data:`TRUST_TABLE` lists the sources in the order they
are trusted; the first that names the agent decides the agent and the first that names the
session decides the session. The README carries the same table.

When nothing names the agent, the session is the agent: two runs started from one host are two
agents for fairness, not one ``127.0.0.1`` that shares one queue.

The last resort is the fingerprint (:class:`FingerprintSessions`): a request whose history
continues a session's last step (the same messages, then the assistant's reply and the tool
results) joins that session; a resend of a step that failed stays that step; anything else,
even an opening identical to another run's, starts a session of its own.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote
from weakref import WeakKeyDictionary

import orjson

from toolmend.server import auth, gateway

if TYPE_CHECKING:
    from aiohttp import web

AGENT_ID_MAX = 128  # as for X-Agent-Id since the start
SESSION_ID_MAX = 128  # as telemetry.SESSION_ID_MAX
MAX_FINGERPRINTS = 4096  # sessions tracked by the fingerprint fallback, least recent dropped

#: The trust table: (rank, source, what names the agent, what names the session). Read top
#: down; a header can never override row 1. ``resolve`` follows it literally.
TRUST_TABLE: tuple[tuple[int, str, str, str], ...] = (
    (1, "key", "the agent bound to the API key", "-"),
    (2, "gateway", "x-gateway-inference-fairness-id from a trusted gateway", "-"),
    (2, "header", "X-Agent-Id", "X-Session-Id"),
    (3, "opencode", "-", "x-session-id, x-session-affinity"),
    (3, "codex", "-", "session-id, thread-id, x-codex-turn-metadata {session_id, thread_id}, "
                      "prompt_cache_key (body)"),
    (3, "claude-code", "-", "X-Claude-Code-Session-Id, metadata.user_id (body, JSON string: "
                            "session_id)"),
    (3, "user", "user (body, chat)", "-"),
    (3, "baggage", "baggage gen_ai.agent.id, user.id", "baggage session.id, "
                                                        "gen_ai.conversation.id"),
    (3, "trace", "-", "traceparent (the trace id)"),
    (4, "fingerprint", "the session", "the conversation's history"),
)

#: Headers read by the table (beyond X-Agent-Id / X-Session-Id): checked as text at the door.
CLIENT_HEADERS = ("x-session-affinity", "session-id", "thread-id", "x-codex-turn-metadata",
                  "X-Claude-Code-Session-Id", "baggage")
_BAGGAGE_AGENT = ("gen_ai.agent.id", "user.id")
_BAGGAGE_SESSION = ("session.id", "gen_ai.conversation.id")
_BAGGAGE_MAX = 8192  # W3C: at least 8192 bytes must be accepted; more is not read


@dataclass(slots=True)
class Identity:
    agent: str
    agent_source: str
    session: str | None
    session_source: str
    fingerprint: FingerprintClaim | None = None


def _text(value: Any, limit: int) -> str | None:
    if isinstance(value, str):
        value = value.strip()
        if value and auth.is_text(value):
            return value[:limit]
    return None


def _baggage(value: str | None) -> dict[str, str]:
    """W3C baggage entries (``key=value;props``, comma-separated); malformed members skipped."""
    out: dict[str, str] = {}
    if not value:
        return out
    for member in value[:_BAGGAGE_MAX].split(","):
        key, sep, rest = member.partition("=")
        if not sep:
            continue
        out.setdefault(key.strip(), unquote(rest.split(";", 1)[0].strip()))
    return out


def _json_str(value: Any) -> dict[str, Any]:
    if not isinstance(value, str) or not value.startswith("{"):
        return {}
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _client_session(headers: Any, body: dict[str, Any] | None,
                    bag: dict[str, str]) -> tuple[str | None, str]:
    """Row 3 of the table, session column."""
    for name in ("x-session-affinity",):
        if s := _text(headers.get(name), SESSION_ID_MAX):
            return s, "opencode"
    for name in ("session-id", "thread-id"):
        if s := _text(headers.get(name), SESSION_ID_MAX):
            return s, "codex"
    meta = _json_str(headers.get("x-codex-turn-metadata"))
    for name in ("session_id", "thread_id"):
        if s := _text(meta.get(name), SESSION_ID_MAX):
            return s, "codex"
    if body and (s := _text(body.get("prompt_cache_key"), SESSION_ID_MAX)):
        return s, "codex"
    if s := _text(headers.get("X-Claude-Code-Session-Id"), SESSION_ID_MAX):
        return s, "claude-code"
    md = body.get("metadata") if body else None
    if isinstance(md, dict):
        uid = md.get("user_id")
        if s := _text(_json_str(uid).get("session_id"), SESSION_ID_MAX):
            return s, "claude-code"
    for name in _BAGGAGE_SESSION:
        if s := _text(bag.get(name), SESSION_ID_MAX):
            return s, "baggage"
    return None, "none"


def resolve(request: web.Request, body: dict[str, Any] | None) -> Identity:
    """The request's agent and session, following :data:`TRUST_TABLE` top down."""
    headers = request.headers
    bag = _baggage(auth.header_text(request, "baggage"))
    agent, agent_source = auth.keyed_agent(request), "key"
    gw = gateway.config(request.app)
    if agent is None and gw is not None and (agent := gw.fairness_id(request)):
        agent_source = "gateway"  # the gateway's flow-control key (see gateway.py)
    if agent is None:
        agent, agent_source = _text(headers.get(auth.AGENT_HEADER), AGENT_ID_MAX), "header"
    if agent is None and body and (agent := _text(body.get("user"), AGENT_ID_MAX)):
        agent_source = "user"
    if agent is None:
        for name in _BAGGAGE_AGENT:
            if agent := _text(bag.get(name), AGENT_ID_MAX):
                agent_source = "baggage"
                break
    session = _text(headers.get(auth.SESSION_HEADER), SESSION_ID_MAX)
    # X-Session-Id is also opencode's x-session-id (headers are case-insensitive)
    session_source = "header" if session else "none"
    if session is None:
        session, session_source = _client_session(headers, body, bag)
    if session is None:
        trace = auth.header_text(request, "traceparent")
        parts = trace.split("-") if trace else []
        if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
            session, session_source = parts[1].lower(), "trace"
    claim = None
    if session is None and body is not None:
        scope = agent if agent is not None else (request.remote or "unknown")
        claim = tracker(request.app).claim(scope, body)
        session, session_source = claim.session, "fingerprint"
    if agent is None:
        if session is not None:
            agent, agent_source = session[:AGENT_ID_MAX], "session"
        else:
            agent, agent_source = request.remote or "unknown", "remote"
    return Identity(agent, agent_source, session, session_source, claim)


# --- the fingerprint fallback -------------------------------------------------------------------

def _update(h: Any, m: Any) -> None:
    """Feed one message to the hash. Plain text content is hashed as its UTF-8 bytes (no JSON
    encoding of the largest part); anything else as canonical JSON."""
    if isinstance(m, dict) and isinstance(content := m.get("content"), str):
        rest = {k: v for k, v in m.items() if k != "content"}
        h.update(content.encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
        m = rest
    try:
        h.update(orjson.dumps(m, option=orjson.OPT_SORT_KEYS))
    except TypeError:
        h.update(repr(m).encode("utf-8", "replace"))
    h.update(b"\x1e")


def history_digests(scope: str, body: dict[str, Any]) -> tuple[list[bytes], list[str]]:
    """Digest of every prefix of the history (``digests[k]``: the first k messages) and the
    roles, in one incremental pass: each message is hashed once, however many prefixes."""
    h = hashlib.sha256(scope.encode("utf-8", "replace") + b"\0")
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        msgs = [{"role": "user", "content": body.get("prompt")}]
    digests = [h.digest()[:16]]
    roles: list[str] = []
    for m in msgs:
        _update(h, m)
        digests.append(h.digest()[:16])
        role = m.get("role") if isinstance(m, dict) else None
        roles.append(role if isinstance(role, str) else "")
    return digests, roles


@dataclass(slots=True)
class _Tracked:
    session: str
    last: bytes  # digest of the history the session's last step sent
    step: int
    state: str  # in_flight | done | failed


@dataclass(slots=True)
class FingerprintClaim:
    session: str
    step: int
    resend: bool
    last: bytes


class FingerprintSessions:
    """Sessions of clients that name none, told apart by their history (bounded, LRU)."""

    def __init__(self, limit: int = MAX_FINGERPRINTS) -> None:
        self.limit = limit
        self._sessions: OrderedDict[str, _Tracked] = OrderedDict()
        self._by_last: dict[bytes, deque[str]] = {}
        # failed steps by their history, apart: identical openings (many runs of one task)
        # share a digest, and looking for a failed one among them was O(runs) per request
        self._failed: dict[bytes, list[str]] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def claim(self, scope: str, body: dict[str, Any]) -> FingerprintClaim:
        digests, roles = history_digests(scope, body)
        full = digests[-1]
        # a resend of a step that failed (429, dropped connection): the same session and step
        failed = self._failed.get(full)
        if failed:
            sid = failed.pop()
            if not failed:
                del self._failed[full]
            t = self._sessions[sid]
            t.state = "in_flight"
            self._sessions.move_to_end(sid)
            return FingerprintClaim(sid, t.step, True, full)
        # a continuation: the last step's history, then the assistant's reply and what followed
        for k in range(len(roles) - 1, 0, -1):
            if roles[k] != "assistant":
                continue
            waiting = self._by_last.get(digests[k])
            if waiting:
                sid = waiting.popleft()
                if not waiting:
                    del self._by_last[digests[k]]
                t = self._sessions[sid]
                t.last, t.step, t.state = full, t.step + 1, "in_flight"
                self._by_last.setdefault(full, deque()).append(sid)
                self._sessions.move_to_end(sid)
                return FingerprintClaim(sid, t.step, False, full)
            break  # only the latest reply can continue a step; older ones were other steps
        # the random part only keeps identical openings apart: it names, it guards nothing
        sid = f"fp-{full[:6].hex()}-{random.getrandbits(24):06x}"
        self._sessions[sid] = _Tracked(sid, full, 1, "in_flight")
        self._by_last.setdefault(full, deque()).append(sid)
        while len(self._sessions) > self.limit:
            self._forget(next(iter(self._sessions)))
        return FingerprintClaim(sid, 1, False, full)

    def finished(self, claim: FingerprintClaim, ok: bool) -> None:
        """The step's outcome: a failed step may be resent and stay the same step."""
        t = self._sessions.get(claim.session)
        if t is not None and t.last == claim.last and t.step == claim.step \
                and t.state == "in_flight":
            t.state = "done" if ok else "failed"
            if not ok:
                self._failed.setdefault(t.last, []).append(t.session)

    def _forget(self, sid: str) -> None:
        t = self._sessions.pop(sid)
        if t.state == "failed":
            failed = self._failed.get(t.last)
            if failed is not None:
                failed.remove(sid)
                if not failed:
                    del self._failed[t.last]
        waiting = self._by_last.get(t.last)
        if waiting is not None:
            try:
                waiting.remove(sid)
            except ValueError:
                pass
            if not waiting:
                del self._by_last[t.last]


_TRACKERS: WeakKeyDictionary[Any, FingerprintSessions] = WeakKeyDictionary()


def tracker(app: Any) -> FingerprintSessions:
    """The app's fingerprint sessions (one per application, so test apps do not share)."""
    t = _TRACKERS.get(app)
    if t is None:
        t = _TRACKERS[app] = FingerprintSessions()
    return t
