"""The per-request context: identity and timestamps that every stage reads or stamps.

Stages (scheduler, relay, mender, telemetry) never call each other through it; they only record
what happened, and telemetry reads it at the end. Timestamps are ``loop.time()`` seconds.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


@dataclass(slots=True)
class RequestContext:
    request_id: str
    path: str
    started: float
    agent_id: str = "anonymous"
    session_id: str | None = None
    client: str = ""
    model: str | None = None
    stream: bool = False
    status: int = 0
    error_code: str | None = None
    # timeline (loop.time() seconds; None until it happened)
    queued_at: float | None = None
    dispatched_at: float | None = None
    upstream_headers_at: float | None = None
    upstream_first_token_at: float | None = None
    client_first_token_at: float | None = None
    first_tool_call_at: float | None = None
    finished_at: float | None = None
    # results
    usage: dict[str, Any] | None = None
    finish_reasons: list[str] = field(default_factory=list)
    tool_names: list[str] = field(default_factory=list)
    repairs: list[dict[str, Any]] = field(default_factory=list)
    retries: int = 0
    bytes_out: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def ms(self, t: float | None, since: float | None = None) -> float | None:
        if t is None:
            return None
        return round((t - (self.started if since is None else since)) * 1000, 3)
