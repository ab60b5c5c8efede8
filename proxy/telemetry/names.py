"""Every span, attribute, event and metric name toolmend emits, in one place.

The OpenTelemetry GenAI semantic conventions (``gen_ai.*``) are still at "Development"
stability and get renamed between releases (``gen_ai.system`` became ``gen_ai.provider.name``,
for one). Keeping every name here means following a rename is a one-file change and dashboards
can be checked against a single list: :data:`EMITTED` maps each name toolmend emits to the
convention it comes from, and a test checks that nothing else leaves toolmend.

Versions followed: the GenAI names follow **semantic-conventions-genai v0.1.0**, the first
release of the GenAI conventions in their own repository (github.com/open-telemetry/
semantic-conventions-genai; it lists its changes since semantic-conventions v1.41.0, where they
lived before). The general names (``error.type``, ``server.*``, ``http.*``, ``service.*``) are
stable ones of **semantic-conventions v1.41**. Everything under ``toolmend.`` is toolmend's own.

How toolmend maps onto them: each step is a ``chat {model}`` SERVER span (the agent's call, as
toolmend served it) with a ``chat {model}`` CLIENT child (the inference call to the backend);
both carry the inference attributes, ``gen_ai.request.stream`` and, when streaming,
``gen_ai.response.time_to_first_chunk``. A session is an ``invoke_agent {agent}`` INTERNAL span;
v0.1.0 names the agent there with ``gen_ai.agent.name`` (``gen_ai.agent.id`` is no longer part
of internal agent spans; toolmend still sets it on its spans, where the viewers' filters use it).
The agent's own tool time between two steps is an ``execute_tool {tool}`` INTERNAL span per
tool call (``gen_ai.tool.type`` ``function``: a tool the client executes).
"""

from __future__ import annotations

# --- GenAI span attributes (conventions) -----------------------------------------------------
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_STREAM = "gen_ai.request.stream"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_CONVERSATION_ID = "gen_ai.conversation.id"
GEN_AI_AGENT_ID = "gen_ai.agent.id"
GEN_AI_TOKEN_TYPE = "gen_ai.token.type"
GEN_AI_AGENT_NAME = "gen_ai.agent.name"
GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"  # seconds
GEN_AI_TOOL_NAME = "gen_ai.tool.name"  # execute_tool spans; the validation and retry events
GEN_AI_TOOL_CALL_ID = "gen_ai.tool.call.id"
GEN_AI_TOOL_TYPE = "gen_ai.tool.type"
# recorded only with the content-capture opt-in
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"

# well-known values
OP_CHAT = "chat"
OP_TEXT_COMPLETION = "text_completion"
OP_INVOKE_AGENT = "invoke_agent"  # the session span: one agent's run, its steps as children
OP_EXECUTE_TOOL = "execute_tool"  # the agent running a tool between two steps
TOOL_TYPE_FUNCTION = "function"  # a tool the client executes
TOKEN_INPUT = "input"
TOKEN_OUTPUT = "output"

# --- general conventions (stable) ------------------------------------------------------------
ERROR_TYPE = "error.type"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
HTTP_RESPONSE_STATUS_CODE = "http.response.status_code"
SERVICE_NAME = "service.name"
SERVICE_VERSION = "service.version"
# resource attributes the OpenTelemetry SDK adds itself (Resource.create)
SDK_RESOURCE = ("telemetry.sdk.name", "telemetry.sdk.language", "telemetry.sdk.version",
                "service.instance.id")

# --- toolmend's own span attributes ----------------------------------------------------------
# Durations are milliseconds (floats): they are read by people in Jaeger far more than by code.
TM_REQUEST_ID = "toolmend.request_id"
TM_STEP = "toolmend.loop.step"
TM_SESSION_SOURCE = "toolmend.session.source"  # header | trace | fingerprint
TM_FRONT = "toolmend.front"  # the API the agent spoke: openai_chat, ollama, anthropic, ...
# on the session span: steps under it, their step numbers, and how many failed
TM_SESSION_STEPS = "toolmend.session.steps"
TM_SESSION_FIRST_STEP = "toolmend.session.first_step"
TM_SESSION_LAST_STEP = "toolmend.session.last_step"
TM_SESSION_ERRORS = "toolmend.session.errors"
TM_QUEUE_WAIT_MS = "toolmend.queue.wait_ms"
TM_TTFT_MS = "toolmend.ttft_ms"  # as the client saw it, from request arrival
TM_UPSTREAM_TTFT_MS = "toolmend.upstream.ttft_ms"  # from the upstream call's start
TM_TIME_TO_TOOL_CALL_MS = "toolmend.time_to_tool_call_ms"  # first complete tool call
TM_DURATION_MS = "toolmend.duration_ms"
TM_AGENT_TOOL_TIME_MS = "toolmend.agent.tool_time_ms"  # since the session's previous step ended
TM_TOOL_NAMES = "toolmend.tool_calls.names"
TM_TOOL_CALLS = "toolmend.tool_calls.count"
TM_REPAIRS = "toolmend.repairs.count"
TM_REPAIR_KINDS = "toolmend.repairs.kinds"
TM_VALIDATION = "toolmend.validation.outcome"  # valid | repaired | retried | failed
TM_RETRIES = "toolmend.retries"
TM_PRIORITY = "toolmend.priority"
TM_SLOT = "toolmend.slot"
TM_ERROR_CODE = "toolmend.error.code"

# --- span events ------------------------------------------------------------------------------
EV_QUEUED = "queued"
EV_DISPATCHED = "dispatched"
EV_FIRST_TOKEN = "first_token"
EV_TOOL_CALL_COMPLETE = "tool_call_complete"
EV_REPAIRED = "repaired"
EV_VALIDATION_FAILED = "validation_failed"
EV_RETRIED = "retried"
EV_ATTR_KIND = "toolmend.repair.kind"
EV_ATTR_POINTER = "toolmend.validation.pointer"  # JSON pointer into the arguments, e.g. /city
EV_ATTR_OUTCOME = "toolmend.validation.decision"  # retry | error | forward | repaired
EV_ATTR_ATTEMPT = "toolmend.retry.attempt"  # 1 for the first retry

# --- metrics (OTel names; Prometheus names are derived by ``prometheus_name``) ------------------
M_TTFT = "gen_ai.server.time_to_first_token"
M_REQUEST_DURATION = "gen_ai.server.request.duration"
M_TOKEN_USAGE = "gen_ai.client.token.usage"
M_QUEUE_WAIT = "toolmend.queue.wait"
M_IN_FLIGHT = "toolmend.requests.in_flight"
M_QUEUE_DEPTH = "toolmend.queue.depth"
M_REQUESTS = "toolmend.requests"
M_REPAIRS = "toolmend.repairs"
M_VALIDATION_FAILURES = "toolmend.validation.failures"
M_RETRIES = "toolmend.retries"
M_UPSTREAM_ERRORS = "toolmend.upstream.errors"
M_INVALID_UTF8 = "toolmend.upstream.invalid_utf8"

# toolmend's own metric labels (beside the GenAI attributes and toolmend.front)
LABEL_STATUS = "status"
LABEL_KIND = "kind"
LABEL_CODE = "code"

# Bucket boundaries the conventions ask for (ExplicitBucketBoundaries).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)
# Queue wait is toolmend's own: from "no wait" to "stuck behind a long prefill".
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                 60.0, 120.0)

# --- what toolmend emits, and where each name comes from ------------------------------------------
GENAI = "semantic-conventions-genai v0.1.0"
GENERAL = "semantic-conventions v1.41 (stable)"
OWN = "toolmend"

EMITTED: dict[str, str] = {
    # span names and operation values
    f"{OP_CHAT} {{gen_ai.request.model}}": GENAI,
    f"{OP_TEXT_COMPLETION} {{gen_ai.request.model}}": GENAI,
    f"{OP_INVOKE_AGENT} {{gen_ai.agent.name}}": GENAI,
    f"{OP_EXECUTE_TOOL} {{gen_ai.tool.name}}": GENAI,
    # GenAI attributes
    **dict.fromkeys((
        GEN_AI_OPERATION_NAME, GEN_AI_PROVIDER_NAME, GEN_AI_REQUEST_MODEL, GEN_AI_REQUEST_STREAM,
        GEN_AI_RESPONSE_MODEL, GEN_AI_RESPONSE_FINISH_REASONS, GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK,
        GEN_AI_USAGE_INPUT_TOKENS, GEN_AI_USAGE_OUTPUT_TOKENS, GEN_AI_CONVERSATION_ID,
        GEN_AI_AGENT_NAME, GEN_AI_TOKEN_TYPE, GEN_AI_TOOL_NAME, GEN_AI_TOOL_CALL_ID,
        GEN_AI_TOOL_TYPE, GEN_AI_INPUT_MESSAGES), GENAI),
    # dropped from internal agent spans in v0.1.0; still on every span for the viewers' filters
    GEN_AI_AGENT_ID: GENAI,
    **dict.fromkeys((ERROR_TYPE, SERVER_ADDRESS, SERVER_PORT, HTTP_RESPONSE_STATUS_CODE,
                     SERVICE_NAME, SERVICE_VERSION, *SDK_RESOURCE), GENERAL),
    # metrics
    M_TTFT: GENAI, M_REQUEST_DURATION: GENAI, M_TOKEN_USAGE: GENAI,
    **dict.fromkeys((M_QUEUE_WAIT, M_IN_FLIGHT, M_QUEUE_DEPTH, M_REQUESTS, M_REPAIRS,
                     M_VALIDATION_FAILURES, M_RETRIES, M_UPSTREAM_ERRORS, M_INVALID_UTF8,
                     LABEL_STATUS, LABEL_KIND, LABEL_CODE), OWN),
    # toolmend's span attributes, events and event attributes
    **dict.fromkeys((
        TM_REQUEST_ID, TM_STEP, TM_SESSION_SOURCE, TM_FRONT, TM_SESSION_STEPS,
        TM_SESSION_FIRST_STEP, TM_SESSION_LAST_STEP, TM_SESSION_ERRORS, TM_QUEUE_WAIT_MS,
        TM_TTFT_MS, TM_UPSTREAM_TTFT_MS, TM_TIME_TO_TOOL_CALL_MS, TM_DURATION_MS,
        TM_AGENT_TOOL_TIME_MS, TM_TOOL_NAMES, TM_TOOL_CALLS, TM_REPAIRS, TM_REPAIR_KINDS,
        TM_VALIDATION, TM_RETRIES, TM_PRIORITY, TM_SLOT, TM_ERROR_CODE,
        EV_QUEUED, EV_DISPATCHED, EV_FIRST_TOKEN, EV_TOOL_CALL_COMPLETE, EV_REPAIRED,
        EV_VALIDATION_FAILED, EV_RETRIED, EV_ATTR_KIND, EV_ATTR_POINTER, EV_ATTR_OUTCOME,
        EV_ATTR_ATTEMPT), OWN),
}

# --- environment variables of the OpenTelemetry spec that toolmend honours ---------------------
ENV_CAPTURE_CONTENT = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
ENV_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
ENV_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
ENV_PROTOCOL = "OTEL_EXPORTER_OTLP_PROTOCOL"
ENV_TRACES_PROTOCOL = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
ENV_TRACES_EXPORTER = "OTEL_TRACES_EXPORTER"
ENV_SDK_DISABLED = "OTEL_SDK_DISABLED"
ENV_SERVICE_NAME = "OTEL_SERVICE_NAME"

# --- W3C trace context --------------------------------------------------------------------------
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"


def prometheus_name(otel_name: str) -> str:
    """``gen_ai.server.time_to_first_token`` -> ``gen_ai_server_time_to_first_token``.

    Prometheus allows only ``[a-zA-Z0-9_:]``; the unit suffix (``_seconds``) and ``_total`` are
    added by prometheus-client, as the OpenTelemetry-to-Prometheus mapping does.
    """
    return "".join(c if c.isalnum() or c == "_" else "_" for c in otel_name)
