"""OpenTelemetry traces, Prometheus metrics and the session timeline, all built after the fact.

Telemetry never sits in the data path. During a request the stages only stamp loop-time
timestamps on the :class:`RequestContext`; when the request is over, :meth:`Telemetry.record`
turns them into spans with explicit start and end times, metric observations and one step of
the session timeline. The only thing that happens before the upstream call is
:meth:`Telemetry.prepare`: it derives the session and loop step from the parsed body and
pre-generates the CLIENT span's id, so the upstream request can carry a ``traceparent`` pointing
at a span that will only be built afterwards (a vLLM started with ``--otlp-traces-endpoint``
then nests its own spans under ours).

Spans are :class:`ReadableSpan` objects handed straight to a :class:`BatchSpanProcessor`: its
``on_end`` is a deque append, and export (with its timeouts and retries) runs in the processor's
own thread. A collector that is down or stalls costs dropped spans and a warning once a minute,
never request latency.

Trace layout. With no incoming ``traceparent``, every step of an agent session goes into one
trace whose id is derived from the session id, under one ``invoke_agent {agent}`` span for the
session: session span -> step (SERVER) -> upstream call (CLIENT). A span can only be exported once
it has ended, and a session has no end toolmend can see: the agent simply stops sending. So the
session span's id is made when the session's first step arrives and each step names it as its
parent right away, while the session span itself is built and exported only once the session
has gone idle (``trace_session_idle`` seconds without a step and none in flight), is evicted
(more than ``sessions_max`` open at once) or toolmend shuts down. A step that comes after that
opens a new session span in the same trace, so a long pause shows as two parts of one session.

Why this and not the alternatives: sibling root spans (what toolmend did before) give no tree to
fold and no single span to read a session's length from; a session span exported when the first
step ends would show the wrong duration forever (an exported span cannot be extended); one span
per step-group of fixed size would cut sessions at arbitrary points. The cost of the choice is
that while a session is live, its steps point at a parent that has not arrived yet: Jaeger marks
them with an "invalid parent span IDs" warning and Phoenix lists them as root spans, until the
session span lands (at most ``trace_session_idle`` seconds after the last step).

An incoming ``traceparent`` wins: the steps then nest under the agent framework's own spans and
toolmend adds no session span (the framework's own span is the session).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from toolmend.server.auth import SESSION_HEADER, header_text
from toolmend.server.config import Settings
from toolmend.server.context import RequestContext
from toolmend.server.errors import ProxyError
from toolmend.server.identity import Identity, tracker
from toolmend.server.keys import SCHEDULER, UPSTREAM
from toolmend.telemetry import model_server
from toolmend.telemetry import names as n
from toolmend.telemetry.metrics import Metrics
from toolmend.telemetry.sessions import SessionTracker, StepRecord, dumps

log = logging.getLogger("toolmend.telemetry.tracing")

RECORDED_PATHS = {"/v1/chat/completions": n.OP_CHAT, "/v1/completions": n.OP_TEXT_COMPLETION,
                  "/api/chat": n.OP_CHAT, "/api/generate": n.OP_CHAT,  # the Ollama front
                  "/v1/messages": n.OP_CHAT, "/v1/responses": n.OP_CHAT}
#: the API the agent spoke, by path: the ``toolmend.front`` attribute and metric label
FRONTS = {"/v1/chat/completions": "openai_chat", "/v1/completions": "openai_completions",
          "/api/chat": "ollama", "/api/generate": "ollama", "/v1/messages": "anthropic",
          "/v1/responses": "openai_responses"}
TOOL_RESULTS_MAX = 64  # execute_tool spans one step may bring (one per tool result)
TOOL_NAME_MAX = 128
SESSION_ID_MAX = 128
FINGERPRINT_BYTES = 8192  # of each message hashed into the fingerprint: bounded cost per request
CONTENT_MAX = 64 * 1024  # captured input messages, when the opt-in is on
WARN_EVERY = 60.0  # seconds between two warnings about dropped spans
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_TRUE = ("1", "true", "yes", "on", "span_only", "span_and_event")


@dataclass(slots=True)
class RequestTrace:
    """What one request's telemetry knows before the upstream call; kept in ``ctx.trace``."""

    session_id: str | None
    session_source: str  # header | trace | fingerprint | none
    step: int | None
    trace_id: int
    parent_span_id: int | None  # the incoming traceparent's span, if any
    sampled: bool
    server_span_id: int
    client_span_id: int
    tracestate: str | None = None
    upstream_start: float | None = None  # loop time; ctx.dispatched_at wins when a queue exists
    input_messages: str | None = None  # only with the content-capture opt-in
    session_span: SessionSpan | None = None  # the open session span this step is a child of
    # the tool calls whose results this request brings: (call id, tool name)
    tool_results: list[tuple[str | None, str]] | None = None


@dataclass(slots=True)
class SessionSpan:
    """A session span that is open: its id is handed out to steps, its span not yet built.

    Times are epoch nanoseconds (the span's), ``last_active`` loop time (the idle timer's).
    """

    session_id: str
    agent_id: str
    source: str
    trace_id: int
    span_id: int
    start_ns: int = 0
    end_ns: int = 0
    last_active: float = 0.0
    in_flight: int = 0  # steps prepared and not yet recorded
    steps: int = 0
    first_step: int | None = None
    last_step: int | None = None
    repairs: int = 0
    retries: int = 0
    errors: int = 0


def parse_traceparent(value: str | None) -> tuple[int, int, bool] | None:
    """W3C ``traceparent`` -> (trace id, parent span id, sampled); None if absent or invalid."""
    if not value:
        return None
    m = _TRACEPARENT.match(value.strip().lower())
    if m is None or m.group(1) == "ff":
        return None
    trace_id, span_id = int(m.group(2), 16), int(m.group(3), 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(int(m.group(4), 16) & 1)


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def session_trace_id(agent_id: str, session_id: str) -> int:
    """The trace id of a session without an incoming trace: stable, so all steps share it.

    The agent is part of it, as it is of the session's key in the session store: another agent
    naming the same session id gets a trace of its own, not a place in this one."""
    digest = hashlib.sha256(b"toolmend-session\0" + agent_id.encode("utf-8", "surrogatepass")
                            + b"\0" + session_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:16], "big") or 1


def conversation_fingerprint(agent_id: str, body: dict[str, Any] | None) -> str:
    """A session id for agents that send none: agent id + first system and user messages.

    Every step of one agent loop resends the same opening messages, so they identify the loop;
    two loops of the same agent on different tasks start differently. Only a hash leaves here.
    """
    h = hashlib.sha256(agent_id.encode(errors="replace") + b"\0")
    first: dict[str, bytes] = {}
    if body:
        msgs = body.get("messages")
        if isinstance(msgs, list):
            for m in msgs:
                if not isinstance(m, dict):
                    continue
                role = m.get("role")
                if role in ("system", "developer"):
                    role = "system"
                if role in ("system", "user") and role not in first:
                    first[role] = _content_bytes(m.get("content"))
                    if len(first) == 2:
                        break
        elif "prompt" in body:
            first["user"] = _content_bytes(body.get("prompt"))
    h.update(first.get("system", b"") + b"\0" + first.get("user", b""))
    return "fp-" + h.hexdigest()[:24]


def _content_bytes(content: Any) -> bytes:
    if isinstance(content, str):
        return content[:FINGERPRINT_BYTES].encode(errors="replace")
    try:
        return orjson.dumps(content)[:FINGERPRINT_BYTES]
    except TypeError:
        return b""


def loop_step(body: dict[str, Any] | None) -> int:
    """1 + the assistant messages the agent sends back: the loop step this request is."""
    msgs = body.get("messages") if body else None
    if not isinstance(msgs, list):
        return 1
    return 1 + sum(1 for m in msgs if isinstance(m, dict) and m.get("role") == "assistant")


def tool_results(body: dict[str, Any] | None) -> list[tuple[str | None, str]]:
    """The tool calls a request brings the results of: (call id, tool name), in order.

    A chat request that follows a tool call ends with the assistant message that asked for the
    calls, then one ``tool`` message per result (and perhaps a user message). Only that tail is
    read, from the end, so the cost does not grow with the conversation.
    """
    msgs = body.get("messages") if body else None
    if not isinstance(msgs, list):
        return []
    i = len(msgs) - 1
    while i >= 0 and isinstance(msgs[i], dict) and msgs[i].get("role") == "user":
        i -= 1
    results: list[dict[str, Any]] = []
    while i >= 0 and isinstance(msgs[i], dict) and msgs[i].get("role") == "tool":
        results.append(msgs[i])
        i -= 1
    if not results or i < 0 or not isinstance(msgs[i], dict) \
            or msgs[i].get("role") != "assistant":
        return []
    names: dict[str, str] = {}
    calls = msgs[i].get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(call.get("id"), str) \
                and isinstance(fn.get("name"), str):
            names[call["id"]] = fn["name"]
    out: list[tuple[str | None, str]] = []
    for m in reversed(results[-TOOL_RESULTS_MAX:]):
        cid = m.get("tool_call_id")
        cid = cid[:TOOL_NAME_MAX] if isinstance(cid, str) and cid else None
        name = names.get(cid or "") or m.get("name")
        if isinstance(name, str) and name:
            out.append((cid, name[:TOOL_NAME_MAX]))
    return out


def epoch_us_to_ns(t: float) -> int:
    """Epoch seconds kept to the microsecond (a session step's ``ended``) as nanoseconds.

    ``int(t * 1e9)`` truncates the float's error: 1796697759.772122 became ...772121856 ns,
    a microsecond before the step span's own end, so the tool span that starts there began
    before the step it follows."""
    return round(t * 1e6) * 1000


def _rand_id(bits: int) -> int:
    return random.getrandbits(bits) or 1


class _RateLimitedLog(logging.Filter):
    """Lets one record per ``every`` seconds through: a dead collector must not flood the log."""

    def __init__(self, every: float) -> None:
        super().__init__()
        self.every = every
        self._next = 0.0
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now < self._next:
            self.suppressed += 1
            return False
        self._next = now + self.every
        return True


class _GuardedExporter(SpanExporter):
    """Wraps the OTLP exporter: counts what failed and warns about it at most once a minute."""

    def __init__(self, inner: SpanExporter, target: str) -> None:
        self.inner = inner
        self.target = target
        self.exported = 0
        self.dropped = 0
        self._unreported = 0
        self._next_warning = 0.0

    def export(self, spans: Any) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception as e:  # an exporter bug must not kill the processor thread
            log.debug("span export raised", exc_info=e)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.exported += len(spans)
            return result
        self.dropped += len(spans)
        self._unreported += len(spans)
        now = time.monotonic()
        if now >= self._next_warning:
            self._next_warning = now + WARN_EVERY
            log.warning("could not export traces to %s; %d spans dropped (requests are not "
                        "affected; next warning in %.0f s at the earliest)",
                        self.target, self._unreported, WARN_EVERY)
            self._unreported = 0
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _build_exporter(settings: Settings) -> tuple[SpanExporter, str] | None:
    """The OTLP exporter the settings and OTEL_* variables ask for, or None for no tracing."""
    env = os.environ
    if _env_true(n.ENV_SDK_DISABLED) or env.get(n.ENV_TRACES_EXPORTER, "").lower() == "none":
        return None
    endpoint = settings.otlp_endpoint.strip()
    if not endpoint and not (env.get(n.ENV_TRACES_ENDPOINT) or env.get(n.ENV_ENDPOINT)):
        return None
    protocol = settings.otlp_protocol
    if protocol == "auto":
        protocol = (env.get(n.ENV_TRACES_PROTOCOL) or env.get(n.ENV_PROTOCOL)
                    or "http/protobuf").strip().lower()
    timeout = settings.otlp_timeout or None
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError:
            raise ValueError("OTLP over gRPC needs the opentelemetry-exporter-otlp-proto-grpc "
                             "package; install it or use http/protobuf") from None
        insecure = urlsplit(endpoint).scheme == "http" if endpoint else None
        exp = GrpcExporter(endpoint=endpoint or None, insecure=insecure, timeout=timeout)
        return exp, _shown(endpoint) or "the OTEL_EXPORTER_OTLP_* endpoint"
    if protocol not in ("http/protobuf", "http"):
        raise ValueError(f"OTLP protocol {protocol!r} is not supported (http/protobuf, grpc)")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    if endpoint:
        parts = urlsplit(endpoint)
        if parts.path in ("", "/"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
    exp = OTLPSpanExporter(endpoint=endpoint or None, timeout=timeout)
    return exp, _shown(endpoint) or "the OTEL_EXPORTER_OTLP_* endpoint"


def _shown(endpoint: str) -> str:
    """The collector's URL as logged: without ``user:password@``, like the upstream's."""
    if "@" not in endpoint:
        return endpoint
    parts = urlsplit(endpoint)
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=host).geturl()


def _quiet_sdk_loggers() -> None:
    """The SDK logs every failed export and retry; keep one line a minute from each logger."""
    for name in ("opentelemetry.sdk._shared_internal",
                 "opentelemetry.exporter.otlp.proto.http.trace_exporter",
                 "opentelemetry.exporter.otlp.proto.grpc.exporter"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _RateLimitedLog) for f in lg.filters):
            lg.addFilter(_RateLimitedLog(WARN_EVERY))


class Telemetry:
    """One per application: the span processor, the metrics registry and the session tracker."""

    def __init__(self, settings: Settings, *, scheduler_depth: Callable[[], int | None] | None
                 = None) -> None:
        self.settings = settings
        self.capture_content = settings.trace_content or _env_true(n.ENV_CAPTURE_CONTENT)
        self.metrics = Metrics(scheduler_depth)
        self.sessions = SessionTracker(settings.sessions_max)
        self.exporter: _GuardedExporter | None = None
        self.app: web.Application | None = None  # set by setup(); read for backend and queue
        self._address: dict[str, Any] | None = None
        self._processor: BatchSpanProcessor | None = None
        built = _build_exporter(settings)
        if built is not None:
            inner, target = built
            self.exporter = _GuardedExporter(inner, target)
            _quiet_sdk_loggers()
            # Bounded queue: beyond it the oldest spans are dropped, never the request delayed.
            self._processor = BatchSpanProcessor(self.exporter, max_queue_size=4096,
                                                 max_export_batch_size=512)
            log.info("exporting traces to %s", target)
        self._resource = Resource.create({
            n.SERVICE_NAME: os.environ.get(n.ENV_SERVICE_NAME) or "toolmend",
            n.SERVICE_VERSION: _version(),
        })
        self._scope = InstrumentationScope("toolmend", _version())
        self._next_error_log = 0.0
        # open session spans, least recently active first; bounded like the session tracker
        self._open: OrderedDict[str, SessionSpan] = OrderedDict()
        self._open_max = max(1, settings.sessions_max)
        self._idle_timer: asyncio.TimerHandle | None = None

    @property
    def tracing(self) -> bool:
        return self._processor is not None

    # --- before the upstream call -------------------------------------------------------------
    def prepare(self, request: web.Request, ctx: RequestContext,
                body: dict[str, Any] | None) -> RequestTrace:
        """Derive session, step and span ids from the parsed body; add the upstream traceparent.

        Called from the request handler once the body is parsed, right before the upstream
        call. Cheap: two small hashes and a scan of the message roles.
        """
        tr = self._trace_info(request, ctx, body)
        tr.upstream_start = asyncio.get_running_loop().time()
        if self.tracing:
            tr.tool_results = tool_results(body)
        if self.tracing and tr.sampled and tr.session_id and tr.parent_span_id is None:
            tr.session_span = self._session_span(tr, ctx.agent_id, tr.upstream_start)
        if self.capture_content and body is not None:
            msgs = body.get("messages", body.get("prompt"))
            if msgs is not None:
                tr.input_messages = orjson.dumps(msgs).decode()[:CONTENT_MAX]
        ctx.trace = tr
        if self.tracing:
            headers = {n.TRACEPARENT: format_traceparent(tr.trace_id, tr.client_span_id,
                                                         tr.sampled)}
        else:  # no spans of ours: pass the agent's own trace context through unchanged
            headers = {}
            if tr.parent_span_id is not None:
                headers[n.TRACEPARENT] = format_traceparent(tr.trace_id, tr.parent_span_id,
                                                            tr.sampled)
        if headers:
            if tr.tracestate:
                headers[n.TRACESTATE] = tr.tracestate
            ctx.upstream_headers = {**(ctx.upstream_headers or {}), **headers}
        return tr

    def _trace_info(self, request: web.Request, ctx: RequestContext,
                    body: dict[str, Any] | None) -> RequestTrace:
        incoming = parse_traceparent(request.headers.get(n.TRACEPARENT))
        # the header is read through header_text: a request refused at the door for a session
        # id that is not text is still recorded, without it
        ident = ctx.identity
        session = (ctx.session_id or header_text(request, SESSION_HEADER) or "").strip()
        session = session[:SESSION_ID_MAX]
        if session:
            source = ident.session_source if isinstance(ident, Identity) else "header"
        elif incoming is not None:
            session, source = f"{incoming[0]:032x}", "trace"
        elif body is not None:
            session, source = conversation_fingerprint(ctx.agent_id, body), "fingerprint"
        else:
            source = "none"
        if incoming is not None:
            trace_id, parent, sampled = incoming
            tracestate = request.headers.get(n.TRACESTATE)
            if tracestate is not None and not (tracestate.isascii() and tracestate.isprintable()):
                tracestate = None  # W3C: a tracestate that cannot be parsed is dropped
        else:
            trace_id = session_trace_id(ctx.agent_id, session) if session else _rand_id(128)
            parent, sampled, tracestate = None, True, None
        return RequestTrace(session or None, source, loop_step(body) if body is not None
                            else None, trace_id, parent, sampled, _rand_id(64), _rand_id(64),
                            tracestate[:512] if tracestate else None)

    # --- after the request ----------------------------------------------------------------------
    def record(self, request: web.Request, ctx: RequestContext) -> None:
        """Turn the finished request's timestamps into metrics, a session step and spans.

        Never raises: a telemetry bug must cost telemetry, not the request.
        """
        operation = RECORDED_PATHS.get(ctx.path)
        if operation is None:
            return
        try:
            self._record(request, ctx, operation)
        except Exception:
            if time.monotonic() >= self._next_error_log:
                self._next_error_log = time.monotonic() + WARN_EVERY
                log.exception("telemetry failed for request %s (request not affected)",
                              ctx.request_id)

    def _record(self, request: web.Request, ctx: RequestContext, operation: str) -> None:
        loop = asyncio.get_running_loop()
        now_loop = loop.time()
        offset_ns = time.time_ns() - int(now_loop * 1e9)
        end = ctx.finished_at or now_loop
        tr = ctx.trace
        if not isinstance(tr, RequestTrace):
            tr = self._trace_info(request, ctx, None)
        group = tr.session_span
        if group is not None:
            group.in_flight = max(0, group.in_flight - 1)
            group.last_active = now_loop
        provider = self._provider(ctx)
        status = ctx.status or 0
        ident = ctx.identity
        if isinstance(ident, Identity) and ident.fingerprint is not None:
            tracker(request.app).finished(ident.fingerprint, 200 <= status < 400
                                          and ctx.error_code is None)

        def sec(t: float | None, since: float | None = None) -> float | None:
            if t is None:
                return None
            base = ctx.started if since is None else since
            return None if base is None else max(0.0, t - base)

        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000, 3)

        up_start = ctx.dispatched_at or tr.upstream_start
        ttft = sec(ctx.client_first_token_at)
        up_ttft = sec(ctx.upstream_first_token_at, up_start) if up_start else None
        queue = sec(ctx.dispatched_at, ctx.queued_at) if ctx.queued_at is not None else None
        duration = end - ctx.started
        generation = sec(end, ctx.client_first_token_at) if ctx.client_first_token_at else None
        to_tool = sec(ctx.first_tool_call_at)
        kinds = [_repair_kind(r) for r in ctx.repairs]
        failures = sum(1 for k in kinds if k.startswith(("validation", "schema")))
        failures += sum(1 for r in _validation_records(ctx) if r.get("ok") is False)
        validation = _validation_outcome(ctx, kinds, failures)
        started_epoch = (ctx.started * 1e9 + offset_ns) / 1e9
        ended_epoch = (end * 1e9 + offset_ns) / 1e9
        tool_time = (self.sessions.tool_time_ms(ctx.agent_id, tr.session_id, started_epoch)
                     if tr.session_id else None)
        prev_end = (self.sessions.last_ended(ctx.agent_id, tr.session_id)
                    if tr.session_id and tool_time is not None else None)
        front = FRONTS.get(ctx.path, FRONTS["/v1/chat/completions"])

        self.metrics.observe(operation=operation, provider=provider, model=ctx.model,
                             status=status, error_code=ctx.error_code, duration=duration,
                             ttft=ttft, front=front, queue_wait=queue, usage=ctx.usage,
                             repair_kinds=kinds, validation_failures=failures,
                             retries=ctx.retries, invalid_utf8=ctx.invalid_utf8)
        usage = ctx.usage or {}
        if tr.session_id:
            self.sessions.record(tr.session_id, ctx.agent_id, tr.session_source, StepRecord(
                step=tr.step or 0, request_id=ctx.request_id, started=round(started_epoch, 6),
                ended=round(ended_epoch, 6), status=status, model=ctx.model,
                queue_ms=ms(queue), ttft_ms=ms(ttft), upstream_ttft_ms=ms(up_ttft),
                generation_ms=ms(generation), duration_ms=ms(duration), tool_time_ms=tool_time,
                tool_names=list(ctx.tool_names), finish_reasons=list(ctx.finish_reasons),
                repairs=len(kinds), retries=ctx.retries,
                input_tokens=_opt_int(usage.get("prompt_tokens")),
                output_tokens=_opt_int(usage.get("completion_tokens")), error=ctx.error_code,
                trace_id=f"{tr.trace_id:032x}" if self.tracing else None,
                span_id=f"{tr.server_span_id:016x}" if self.tracing else None))
        if self._processor is None or not tr.sampled:
            return

        def ns(t: float) -> int:
            return int(t * 1e9) + offset_ns

        model = ctx.model or "unknown"
        response_model = ctx.response_model
        common: dict[str, Any] = {
            n.GEN_AI_OPERATION_NAME: operation, n.GEN_AI_PROVIDER_NAME: provider,
            n.GEN_AI_REQUEST_MODEL: ctx.model, n.GEN_AI_RESPONSE_MODEL: response_model,
            n.GEN_AI_REQUEST_STREAM: ctx.stream,
            n.GEN_AI_USAGE_INPUT_TOKENS: _opt_int(usage.get("prompt_tokens")),
            n.GEN_AI_USAGE_OUTPUT_TOKENS: _opt_int(usage.get("completion_tokens")),
            n.GEN_AI_RESPONSE_FINISH_REASONS: list(ctx.finish_reasons) or None,
        }
        failed = status >= 500 or (ctx.error_code is not None and status != 499
                                   and status >= 400 and ctx.error_code.startswith("upstream"))
        error_type = ctx.error_code or (str(status) if status >= 500 else None)
        server_attrs = common | {
            n.GEN_AI_CONVERSATION_ID: tr.session_id, n.GEN_AI_AGENT_ID: ctx.agent_id,
            # the agent's view: from its request's arrival to the first chunk it was sent
            n.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK: ttft if ctx.stream else None,
            n.TM_FRONT: front,
            n.HTTP_RESPONSE_STATUS_CODE: status or None,
            n.ERROR_TYPE: error_type if failed else None,
            n.TM_ERROR_CODE: ctx.error_code,
            n.TM_REQUEST_ID: ctx.request_id, n.TM_STEP: tr.step,
            n.TM_SESSION_SOURCE: tr.session_source,
            n.TM_QUEUE_WAIT_MS: ms(queue), n.TM_TTFT_MS: ms(ttft),
            n.TM_UPSTREAM_TTFT_MS: ms(up_ttft), n.TM_TIME_TO_TOOL_CALL_MS: ms(to_tool),
            n.TM_DURATION_MS: ms(duration), n.TM_AGENT_TOOL_TIME_MS: tool_time,
            n.TM_TOOL_NAMES: list(ctx.tool_names) or None,
            n.TM_TOOL_CALLS: len(ctx.tool_names) or None,
            # counters are left out when zero: absent reads as "none" and costs no encoding
            n.TM_REPAIRS: len(kinds) or None, n.TM_REPAIR_KINDS: sorted(set(kinds)) or None,
            n.TM_VALIDATION: validation, n.TM_RETRIES: ctx.retries or None,
            n.TM_PRIORITY: ctx.priority,
            n.TM_SLOT: ctx.slot,
        }
        if tr.input_messages is not None:
            server_attrs[n.GEN_AI_INPUT_MESSAGES] = tr.input_messages
        events = _events(ctx, kinds, end, ns)
        status_obj = Status(StatusCode.ERROR, ctx.error_code or str(status)) if failed \
            else Status(StatusCode.UNSET)
        flags = TraceFlags(TraceFlags.SAMPLED)
        state = TraceState.from_header([tr.tracestate]) if tr.tracestate else None
        server_ctx = SpanContext(tr.trace_id, tr.server_span_id, False, flags, state)
        if tr.parent_span_id is not None:
            parent: SpanContext | None = SpanContext(tr.trace_id, tr.parent_span_id, True, flags,
                                                     state)
        elif group is not None:
            parent = SpanContext(tr.trace_id, group.span_id, False, flags, state)
            self._add_step(group, ns(ctx.started), ns(end), tr.step, len(kinds), ctx.retries,
                           failed)
        else:
            parent = None
        name = f"{operation} {model}"
        spans = [ReadableSpan(name, server_ctx, parent, self._resource, _clean(server_attrs),
                              events, (), SpanKind.SERVER, status=status_obj,
                              start_time=ns(ctx.started), end_time=ns(end),
                              instrumentation_scope=self._scope)]
        if up_start is not None and ctx.trace is tr:
            # usage, finish reasons and models are on the parent: no need to encode them twice
            client_attrs = {
                n.GEN_AI_OPERATION_NAME: operation, n.GEN_AI_PROVIDER_NAME: provider,
                n.GEN_AI_REQUEST_MODEL: ctx.model, n.GEN_AI_REQUEST_STREAM: ctx.stream,
                n.GEN_AI_CONVERSATION_ID: tr.session_id,
                # toolmend as the backend's client: from the upstream call to its first chunk
                n.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK: up_ttft if ctx.stream else None,
                n.TM_UPSTREAM_TTFT_MS: ms(up_ttft),
                n.ERROR_TYPE: error_type if failed else None,
            } | self._server_address()
            client_events = []
            if ctx.upstream_first_token_at is not None:
                client_events.append(Event(n.EV_FIRST_TOKEN, None,
                                           ns(ctx.upstream_first_token_at)))
            spans.append(ReadableSpan(
                name, SpanContext(tr.trace_id, tr.client_span_id, False, flags, state),
                server_ctx, self._resource, _clean(client_attrs), client_events, (),
                SpanKind.CLIENT, status=status_obj, start_time=ns(max(up_start, ctx.started)),
                end_time=ns(end), instrumentation_scope=self._scope))
        if group is not None and prev_end is not None and tr.tool_results:
            spans.extend(self._tool_spans(tr, group, epoch_us_to_ns(prev_end), ns(ctx.started)))
        for span in spans:
            self._processor.on_end(span)

    def _tool_spans(self, tr: RequestTrace, group: SessionSpan, start_ns: int,
                    end_ns: int) -> list[ReadableSpan]:
        """The agent's tool time between its previous step and this one, as ``execute_tool``
        spans under the session: one per tool call whose result this request brings. toolmend
        sees the gap, not the tools, so calls run in one gap share its start and end."""
        if end_ns <= start_ns:
            return []
        flags = TraceFlags(TraceFlags.SAMPLED)
        parent = SpanContext(tr.trace_id, group.span_id, False, flags)
        out = []
        for call_id, tool in tr.tool_results or ():
            attrs = _clean({n.GEN_AI_OPERATION_NAME: n.OP_EXECUTE_TOOL, n.GEN_AI_TOOL_NAME: tool,
                            n.GEN_AI_TOOL_CALL_ID: call_id,
                            n.GEN_AI_TOOL_TYPE: n.TOOL_TYPE_FUNCTION,
                            n.GEN_AI_CONVERSATION_ID: tr.session_id})
            ctx = SpanContext(tr.trace_id, _rand_id(64), False, flags)
            out.append(ReadableSpan(
                f"{n.OP_EXECUTE_TOOL} {tool}", ctx, parent, self._resource, attrs, (), (),
                SpanKind.INTERNAL, status=Status(StatusCode.UNSET), start_time=start_ns,
                end_time=end_ns, instrumentation_scope=self._scope))
        group.start_ns = min(group.start_ns, start_ns) if group.steps else start_ns
        return out

    # --- session spans ---------------------------------------------------------------------------
    def _session_span(self, tr: RequestTrace, agent_id: str, now: float) -> SessionSpan:
        """The session's open span (opened now if there is none), with one more step in flight."""
        sid = tr.session_id or ""
        group = self._open.get(sid)
        if group is None or group.trace_id != tr.trace_id:
            if group is not None:
                self._end_session(group)
            group = SessionSpan(sid, agent_id, tr.session_source, tr.trace_id, _rand_id(64))
            self._open[sid] = group
            while len(self._open) > self._open_max:
                self._end_session(next(iter(self._open.values())))
        else:
            self._open.move_to_end(sid)
        group.in_flight += 1
        group.last_active = now
        return group

    def _add_step(self, group: SessionSpan, start_ns: int, end_ns: int, step: int | None,
                  repairs: int, retries: int, failed: bool) -> None:
        group.start_ns = start_ns if not group.steps else min(group.start_ns, start_ns)
        group.end_ns = max(group.end_ns, end_ns)
        group.steps += 1
        if step is not None:
            group.first_step = step if group.first_step is None else min(group.first_step, step)
            group.last_step = step if group.last_step is None else max(group.last_step, step)
        group.repairs += repairs
        group.retries += retries
        group.errors += failed
        if self._open.get(group.session_id) is group:
            self._arm_idle_timer(group.last_active + self.settings.trace_session_idle)

    def _arm_idle_timer(self, when: float) -> None:
        """One timer for all open sessions, set for the earliest moment one can go idle."""
        timer = self._idle_timer
        if timer is not None and not timer.cancelled() and timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()
        self._idle_timer = asyncio.get_running_loop().call_at(when, self._end_idle_sessions)

    def _end_idle_sessions(self) -> None:
        """Export the spans of sessions without a step for ``trace_session_idle`` seconds.

        A session with a step in flight is not idle; it is ended anyway once nothing has been
        heard of it for ``total_timeout`` (a request can take no longer), so a step whose
        recording was lost cannot keep its session open for ever.
        """
        self._idle_timer = None
        try:
            now = asyncio.get_running_loop().time()
            idle = self.settings.trace_session_idle
            stale = max(idle, self.settings.total_timeout)
            nearest: float | None = None
            for group in list(self._open.values()):
                due = group.last_active + (idle if group.in_flight == 0 else stale)
                if now >= due:
                    self._end_session(group)
                else:
                    nearest = due if nearest is None else min(nearest, due)
            if nearest is not None:
                self._arm_idle_timer(nearest)
        except Exception:
            log.exception("could not end idle session spans")

    def end_sessions(self) -> int:
        """Export every open session span now (shutdown; tests). Returns how many."""
        groups = list(self._open.values())
        for group in groups:
            self._end_session(group)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        return len(groups)

    def _end_session(self, group: SessionSpan) -> None:
        if self._open.get(group.session_id) is group:
            del self._open[group.session_id]
        if self._processor is None:
            return
        start, end = group.start_ns, group.end_ns
        if not group.steps:  # ended before its first step was recorded (evicted)
            start = end = time.time_ns()
        attrs = _clean({
            n.GEN_AI_OPERATION_NAME: n.OP_INVOKE_AGENT, n.GEN_AI_CONVERSATION_ID: group.session_id,
            n.GEN_AI_AGENT_NAME: group.agent_id, n.GEN_AI_AGENT_ID: group.agent_id,
            n.TM_SESSION_SOURCE: group.source,
            n.TM_SESSION_STEPS: group.steps, n.TM_SESSION_FIRST_STEP: group.first_step,
            n.TM_SESSION_LAST_STEP: group.last_step, n.TM_REPAIRS: group.repairs or None,
            n.TM_RETRIES: group.retries or None, n.TM_SESSION_ERRORS: group.errors or None,
        })
        ctx = SpanContext(group.trace_id, group.span_id, False, TraceFlags(TraceFlags.SAMPLED))
        self._processor.on_end(ReadableSpan(
            f"{n.OP_INVOKE_AGENT} {group.agent_id}", ctx, None, self._resource, attrs, (), (),
            SpanKind.INTERNAL, status=Status(StatusCode.UNSET), start_time=start, end_time=end,
            instrumentation_scope=self._scope))

    def _provider(self, ctx: RequestContext) -> str:
        """The detected backend kind (``vllm``, ``ollama``...), else the configured one."""
        backend = ctx.backend
        if not backend and self.app is not None:
            detected = getattr(self.app.get(UPSTREAM), "detected", None)
            backend = getattr(detected, "kind", None)
            if backend in ("unknown", "loading"):
                backend = None
        backend = backend or self.settings.backend
        return str(backend) if backend and backend != "auto" else "openai_compatible"

    def _server_address(self) -> dict[str, Any]:
        if self._address is None:
            self._address = self._find_server_address()
        return self._address

    def _find_server_address(self) -> dict[str, Any]:
        up = self.app.get(UPSTREAM) if self.app is not None else None
        url = up.base_url() if hasattr(up, "base_url") else (self.settings.upstream or [""])[0]
        parts = urlsplit(url)
        if not parts.hostname:
            return {}
        return {n.SERVER_ADDRESS: parts.hostname, n.SERVER_PORT: parts.port}

    # --- lifecycle ------------------------------------------------------------------------------
    async def flush(self, timeout: float = 5.0) -> bool:
        """Export what is queued now (tests, benchmarks); waits at most ``timeout`` seconds."""
        if self._processor is None:
            return True
        return await _in_daemon_thread(self._processor.force_flush, timeout)

    async def shutdown(self, timeout: float = 3.0) -> None:
        """Flush and stop the exporter thread, waiting at most ``timeout``: cleanup never hangs
        on a collector that does not answer."""
        self.end_sessions()  # a session span not exported now never will be
        proc, self._processor = self._processor, None
        if proc is not None:
            await _in_daemon_thread(proc.shutdown, timeout)


async def _in_daemon_thread(fn: Callable[[], Any], timeout: float) -> bool:
    """Run a blocking SDK call in a daemon thread and wait for it at most ``timeout`` seconds.

    Not ``asyncio.to_thread``: executor threads are joined at interpreter exit, so a stalled
    export would hold up the process's exit as well.
    """
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def run() -> None:
        try:
            fn()
        finally:
            if not loop.is_closed():
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    threading.Thread(target=run, name="toolmend-telemetry", daemon=True).start()
    try:
        await asyncio.wait_for(asyncio.shield(done), timeout)
        return True
    except TimeoutError:
        return False


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("toolmend")
    except Exception:
        return "0"


def _clean(attrs: dict[str, Any]) -> dict[str, Any]:
    """Drop unset values: OTLP attributes cannot be null, and absent reads better than 0."""
    return {k: v for k, v in attrs.items() if v is not None}


def _opt_int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _repair_kind(r: Any) -> str:
    k = (r.get("kind") or r.get("type")) if isinstance(r, dict) else getattr(r, "kind", None)
    return str(k)[:64] if k else "unknown"


def _repair_time(r: Any) -> float | None:
    t = r.get("at") if isinstance(r, dict) else getattr(r, "at", None)
    return t if isinstance(t, float | int) and not isinstance(t, bool) else None


def _validation_records(ctx: RequestContext) -> list[dict[str, Any]]:
    """The validator's verdicts, one per check, in order (``tool``, ``ok``, ``outcome``,
    ``attempt``, ``pointer``): what the retry events are made of."""
    return [r for r in ctx.validation if isinstance(r, dict)]


def _validation_outcome(ctx: RequestContext, kinds: list[str], failures: int) -> str | None:
    if failures:
        if ctx.status >= 400 or ctx.error_code:
            return "failed"
        return "retried" if ctx.retries else "repaired"
    if kinds:
        return "repaired"
    return "valid" if ctx.tool_names else None


def _events(ctx: RequestContext, kinds: list[str], end: float,
            ns: Callable[[float], int]) -> list[Event]:
    ev: list[tuple[float, Event]] = []

    def add(t: float | None, name: str, attrs: dict[str, Any] | None = None) -> None:
        if t is not None:
            ev.append((t, Event(name, attrs, ns(t))))

    add(ctx.queued_at, n.EV_QUEUED)
    add(ctx.dispatched_at, n.EV_DISPATCHED)
    add(ctx.client_first_token_at, n.EV_FIRST_TOKEN)
    add(ctx.first_tool_call_at, n.EV_TOOL_CALL_COMPLETE,
        {n.TM_TOOL_NAMES: list(ctx.tool_names)} if ctx.tool_names else None)
    for r, kind in zip(ctx.repairs, kinds, strict=True):
        t = _repair_time(r) or end
        is_failure = kind.startswith(("validation", "schema"))
        add(t, n.EV_VALIDATION_FAILED if is_failure else n.EV_REPAIRED, {n.EV_ATTR_KIND: kind})
    # Each failed verdict is a validation_failed event; each one that led to a retry is
    # followed by a retried event at the moment the retry was sent (the failure was decided
    # just before it). Both name the tool and the JSON pointer of the problem, never a value.
    retry_times = list(ctx.retry_times)
    retries = 0
    for r in _validation_records(ctx):
        if r.get("ok") is not False:
            continue
        attrs = _clean({n.GEN_AI_TOOL_NAME: str(r.get("tool") or "")[:64] or None,
                        n.EV_ATTR_POINTER: str(r["pointer"])[:256] if r.get("pointer")
                        else None, n.EV_ATTR_OUTCOME: r.get("outcome")})
        retried = r.get("outcome") == "retry"
        t = retry_times[retries] if retried and retries < len(retry_times) else end
        add(t, n.EV_VALIDATION_FAILED, attrs)
        if retried:
            retries += 1
            add(t, n.EV_RETRIED, attrs | {n.EV_ATTR_ATTEMPT: retries})
    for t in retry_times[retries:]:  # retries the verdicts do not explain
        retries += 1
        add(t, n.EV_RETRIED, {n.EV_ATTR_ATTEMPT: retries})
    if not retry_times and ctx.retries > retries:
        add(end, n.EV_RETRIED, {n.TM_RETRIES: ctx.retries})
    ev.sort(key=lambda p: p[0])
    return [e for _, e in ev]


# --- the middleware and the observability endpoints -------------------------------------------
TELEMETRY = web.AppKey("telemetry", Telemetry)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def middleware(ctx_key: Any) -> Any:
    """Counts requests in flight and records each finished request (also failed or cancelled).

    Placed outside the error middleware, so it sees the final status of every request. The
    recording happens after the handler has returned, off the relay's path.
    """

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        tel = request.app.get(TELEMETRY)
        if tel is None or request.path not in RECORDED_PATHS:
            return await handler(request)
        gauge = tel.metrics.in_flight
        gauge.inc()
        try:
            return await handler(request)
        finally:
            gauge.dec()
            ctx = request.get(ctx_key)
            if isinstance(ctx, RequestContext):
                tel.record(request, ctx)

    return observe


def _check_admin(request: web.Request) -> None:
    """Loopback clients always; others only with ``Authorization: Bearer <admin_key>``."""
    key = request.app[TELEMETRY].settings.admin_key
    if key:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and hmac.compare_digest(
                auth[7:].strip().encode("utf-8", "surrogatepass"), key.encode()):
            return
    try:
        if request.remote and ipaddress.ip_address(request.remote.split("%")[0]).is_loopback:
            return
    except ValueError:
        pass
    raise ProxyError(403, f"{request.path} is served to loopback clients only" +
                     ("" if not key else " or with the admin key"), code="forbidden")


async def metrics_handler(request: web.Request) -> web.Response:
    # loopback, the admin key, or the scrape key and networks
    model_server.check_scrape(request, request.app[TELEMETRY].settings)
    body = generate_latest(request.app[TELEMETRY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def sessions_handler(request: web.Request) -> web.Response:
    _check_admin(request)
    try:
        limit = max(1, min(int(request.query.get("limit", "50")), 1000))
    except ValueError:
        raise ProxyError(400, "limit must be an integer", param="limit",
                         code="invalid_limit") from None
    tel = request.app[TELEMETRY]
    docs = [s.summary() for s in tel.sessions.recent(limit)]
    return web.Response(body=dumps({"object": "list", "data": docs}),
                        content_type="application/json")


async def session_handler(request: web.Request) -> web.Response:
    """One session; ``?agent_id=`` picks it when several agents use the same session id."""
    _check_admin(request)
    sid = request.match_info["session_id"]
    agent = request.query.get("agent_id")
    tracker = request.app[TELEMETRY].sessions
    s = tracker.get(sid, agent)
    if s is None:
        found = tracker.matching(sid) if agent is None else []
        if len(found) > 1:
            agents = ", ".join(repr(f.agent_id) for f in found[:10])
            raise ProxyError(409, f"session {sid!r} exists for several agents ({agents}); "
                             "name one with ?agent_id=", param="agent_id",
                             code="ambiguous_session")
        raise ProxyError(404, f"no recent session {sid!r}" +
                         (f" of agent {agent!r}" if agent is not None else ""),
                         code="session_not_found")
    return web.Response(body=dumps(s.detail()), content_type="application/json")


async def _shutdown(app: web.Application) -> None:
    await app[TELEMETRY].shutdown()


def setup(app: web.Application, settings: Settings) -> Telemetry:
    """Create the app's telemetry, add its routes and its cleanup."""
    tel = Telemetry(settings, scheduler_depth=lambda: _scheduler_queued(app))
    tel.app = app
    app[TELEMETRY] = tel
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/toolmend/v1/sessions", sessions_handler)
    app.router.add_get("/toolmend/v1/sessions/{session_id}", session_handler)
    app.on_cleanup.append(_shutdown)
    return tel


def _scheduler_queued(app: web.Application) -> int | None:
    v = getattr(app.get(SCHEDULER), "queued", None)
    v = v() if callable(v) else v
    return v if isinstance(v, int) else None
