"""The per-request context: identity and timestamps that every stage reads or stamps.

Stages (scheduler, relay, mender, telemetry) never call each other through it; they only record
what happened, and telemetry reads it at the end. Timestamps are ``loop.time()`` seconds.

Every field is typed and named here, and every field a span or metric reads is written by some
stage (tests/test_context.py checks both), so a reader can never wait for a key nobody sets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from toolmend.server.identity import Identity


def new_request_id() -> str:
    """A request's id: 96 random bits. An id names, it guards nothing, so it comes from the
    process's seeded generator rather than a system call per request (``secrets``)."""
    return f"req_{random.getrandbits(96):024x}"


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
    # who asked, and where the request ran (front, scheduler)
    identity: Identity | None = None
    priority: int | None = None  # the priority class the scheduler served it in
    slot: int | None = None  # which of the backend's slots (0-based) it held
    backend: str | None = None  # the kind of server it was sent to (vllm, llamacpp, ...)
    # the output bound applied at the door (key's max_tokens, backend context); every body
    # sent later for this request (a validation retry) is bounded by it again
    key_output_cap: int | None = None
    context_length: int | None = None
    # upstream call and reply
    upstream_headers: dict[str, str] | None = None  # extra headers (trace context) upstream
    response_model: str | None = None  # the model the backend says answered
    invalid_utf8: int = 0  # upstream events that held invalid UTF-8 (replaced)
    # mending and validation
    tool_format: str | None = None
    server_tool_parser: str | None = None  # "bypass" when toolmend parsed the raw text itself
    repair_notes: list[str] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)  # one verdict per check
    retry_times: list[float] = field(default_factory=list)  # loop.time() of each retry sent
    mending_recorded: Any = None  # weak reference to the mender already recorded
    trace: Any = None  # telemetry's RequestTrace for this request (telemetry/tracing.py)

    def ms(self, t: float | None, since: float | None = None) -> float | None:
        if t is None:
            return None
        return round((t - (self.started if since is None else since)) * 1000, 3)
