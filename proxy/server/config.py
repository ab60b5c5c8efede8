"""Settings: defaults, then a TOML file, then ``TOOLMEND_*`` environment variables, then flags.

Every option is one dataclass field with its help text in the field metadata, so the TOML keys,
the environment variables and ``toolmend serve --help`` can never drift apart.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "TOOLMEND_"


def opt(default: Any, help: str, *, flag: str | None = None, metavar: str | None = None,
        choices: tuple[str, ...] | None = None) -> Any:
    meta = {"help": help, "flag": flag, "metavar": metavar, "choices": choices}
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


BACKENDS = ("auto", "vllm", "llamacpp", "ollama", "sglang", "tgi", "openai", "embedded")
POLICIES = ("repair", "retry", "error", "pass")
SERVER_TOOL_PARSER = ("auto", "bypass", "trust")
#: The Ollama version toolmend answers as by default: a current one, since clients gate on it
#: (Codex's ``--oss`` mode refuses anything older than 0.13.4).
OLLAMA_VERSION = "0.14.3"


@dataclass
class Settings:
    host: str = opt("127.0.0.1", "address to listen on (loopback by default)")
    port: int = opt(8080, "port to listen on")
    upstream: list[str] = opt([], "base URL of an OpenAI-compatible or Ollama server; repeat for "
                              "replicas. None: start the embedded backend", metavar="URL")
    backend: str = opt("auto", "kind of server behind --upstream", choices=BACKENDS)
    model: str = opt("", "GGUF file for the embedded backend or a launched llama-server / "
                     "llama-cpp-python, or the model a launched vLLM / Ollama serves (default: "
                     "the bundled Gemma 3 270M for the embedded backend and llama-cpp-python, "
                     "else the one toolmend doctor suggests)",
                     metavar="PATH")
    embedded_ctx: int = opt(2048, "context size in tokens of the embedded model")
    embedded_threads: int = opt(0, "CPU threads for the embedded model (0: every core)")
    launch: str = opt("none", "start this serving process as a child with the flags toolmend "
                      "doctor recommends, use it as the upstream, restart it if it dies, stop "
                      "it on exit; arguments after -- go to it",
                      choices=("none", "vllm", "llama-server", "ollama", "llama-cpp-python"))
    launch_args: list[str] = opt([], "extra arguments for the launched server (also everything "
                                 "after --); a flag given here replaces the recommended one",
                                 metavar="ARG")
    launch_binary: str = opt("", "command that starts the launched server instead of the usual "
                             "one (e.g. /opt/llama.cpp/llama-server, or 'python "
                             "vllm_launcher.py')", metavar="CMD")
    launch_port: int = opt(0, "loopback port for the launched server (0: a free one)")
    launch_ready_timeout: float = opt(900.0, "seconds the launched server may take to become "
                                      "ready (vLLM compiles for minutes)", metavar="S")
    loading_timeout: float = opt(300.0, "seconds to keep retrying, with backoff, while the "
                                 "upstream answers 503 'Loading model' (0: do not wait)",
                                 metavar="S")
    ollama_native: bool = opt(False, "with an Ollama upstream, use its native /api/chat (tool "
                              "calls whole, keep_alive) instead of its /v1 layer")
    keep_alive: str = opt("", "Ollama keep_alive sent with native requests and the warm-up "
                          "(-1: keep the model loaded for ever; e.g. 30m)", metavar="DURATION")
    warmup: bool = opt(False, "send each upstream a tiny request at start-up so the model is "
                       "loaded before the first agent asks")
    health_interval: float = opt(5.0, "seconds between health checks of each replica when "
                                 "there are several --upstream URLs", metavar="S")
    tool_format: str = opt("auto", "tool-call marker format of the model (auto: from its name)",
                           metavar="FORMAT")
    server_tool_parser: str = opt("auto", "bypass: ask a vLLM upstream for the reply as raw "
                                  "text (tool_choice 'none', special tokens kept) and parse "
                                  "calls and re-split its reasoning here; trust: take its "
                                  "parsed tool_calls and reasoning as they come; auto: bypass "
                                  "on vLLM, whose parsers fire calls drafted inside reasoning",
                                  choices=SERVER_TOOL_PARSER)
    tool_mode: str = opt("buffered", "buffered: emit a call's arguments once complete and checked; "
                         "incremental: stream argument fragments as they arrive",
                         choices=("buffered", "incremental"))
    reasoning_field: str = opt("reasoning_content", "where reasoning toolmend separates from "
                               "content goes: reasoning_content, reasoning, drop, or content "
                               "(inside <think>...</think>); a server's own reasoning field "
                               "passes through as it is (X-Toolmend-Reasoning overrides it per "
                               "request)", choices=("reasoning_content", "reasoning", "drop",
                                                    "content"))
    reasoning_open_models: list[str] = opt([], "model names (shell patterns, e.g. "
                                           "'*my-thinker*') whose chat template opens reasoning "
                                           "in the prompt, so replies start inside it",
                                           metavar="PATTERN")
    reasoning_closed_models: list[str] = opt([], "model names (shell patterns) whose replies "
                                             "never start inside reasoning, whatever the "
                                             "built-in table or the request says",
                                             metavar="PATTERN")
    on_invalid: str = opt("repair", "what to do with a schema-invalid tool call", choices=POLICIES)
    max_retries: int = opt(1, "upstream retries for an invalid tool call")
    retry_samples: int = opt(1, "choices asked per retry (n) where the backend samples "
                             "several in one request (vLLM, llama-server); the first valid "
                             "one replaces the invalid call")
    undeclared_calls: str = opt("refuse", "a structured tool call in the reply to a request "
                                "that declared no tools: refuse (an unknown tool under "
                                "--on-invalid: asked again for a plain-text answer, then "
                                "refused) or pass (forwarded unchecked)",
                                choices=("refuse", "pass"))
    slots: int = opt(0, "concurrent requests the backend may hold (0: ask it, else a default "
                     "per backend)")
    max_queue: int = opt(1024, "requests waiting for a backend slot, all agents together "
                         "(beyond: 429 with Retry-After)")
    max_queue_per_agent: int = opt(64, "requests one agent may have waiting for a slot (beyond: "
                                   "429); [agents.NAME] max_queue overrides it")
    queue_ttl: float = opt(300.0, "seconds a request may wait for a slot before it gets 503 "
                           "(X-Toolmend-Deadline-Ms can shorten it per request)", metavar="S")
    express_slot: bool = opt(True, "hold a free slot back for another agent's loop step when "
                             "the agent is expected back (from its measured tool time) before "
                             "the long request that would take the slot would finish, and no "
                             "other slot frees up sooner")
    express_max_prompt_tokens: int = opt(512, "largest prompt growth since the session's "
                                         "previous step (estimated tokens) that counts as a "
                                         "loop step")
    express_max_tokens: int = opt(256, "largest max_tokens that counts as a loop step (requests "
                                  "without max_tokens never do)")
    agent_idle_after: float = opt(10.0, "seconds after its last step that a session is still in "
                                  "its loop (its counter is not lifted; the predicted tool time "
                                  "before any is measured)", metavar="S")
    vllm_priority: bool = opt(False, "send each request's priority class to vLLM, loop steps "
                              "first within a class (vLLM started with --scheduling-policy "
                              "priority; checked at start-up, none are sent to a vLLM that "
                              "refuses them; --launch vllm turns both on)")
    gateway_upstream: bool = opt(False, "the upstream is an inference gateway (Gateway API "
                                 "Inference Extension, llm-d): send each request's agent in "
                                 "the fairness header and its priority class as an objective")
    fairness_header: str = opt("x-gateway-inference-fairness-id", "header that carries the "
                               "agent to and from an inference gateway (its flow-control "
                               "fairness key)", metavar="NAME")
    objective_header: str = opt("x-gateway-inference-objective", "header that carries the "
                                "priority class to and from an inference gateway, as the name "
                                "of an InferenceObjective", metavar="NAME")
    objectives: list[str] = opt([], "PRIORITY=NAME: the InferenceObjective that stands for a "
                                "priority class, both ways (a class not listed: priority-N)",
                                metavar="PRIORITY=NAME")
    trusted_gateways: list[str] = opt([], "addresses or networks (CIDR) of inference gateways "
                                      "in front of toolmend: their fairness and objective "
                                      "headers name the agent and the priority class",
                                      metavar="CIDR")
    otlp_endpoint: str = opt("", "OTLP/HTTP endpoint for traces, e.g. http://127.0.0.1:4318",
                             metavar="URL")
    otlp_protocol: str = opt("auto", "OTLP transport (auto: OTEL_EXPORTER_OTLP_PROTOCOL, else "
                             "http/protobuf; grpc needs opentelemetry-exporter-otlp-proto-grpc)",
                             choices=("auto", "http/protobuf", "grpc"))
    otlp_timeout: float = opt(0.0, "seconds one span export may take, retries included (0: "
                              "OTEL_EXPORTER_OTLP_TIMEOUT, else 10); exports never block requests",
                              metavar="S")
    backend_load_interval: float = opt(1.0, "seconds between reads of the backend's own load "
                                       "(its /metrics; llama-server's /slots) that /metrics "
                                       "reports in the model-server protocol an inference "
                                       "gateway reads (0: never read; toolmend's queue and "
                                       "slots only)", metavar="S")
    trace_content: bool = opt(False, "record message content in spans (also "
                              "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true); off, "
                              "spans carry timings and names only")
    admin_key: str = opt("", "bearer key that lets non-loopback clients read /metrics and "
                         "/toolmend/v1/sessions (default: loopback only)", metavar="KEY")
    metrics_key: str = opt("", "bearer key that lets any client read /metrics alone (a "
                           "scraper's credential; /toolmend/v1/sessions stays loopback or "
                           "admin key)", metavar="KEY")
    metrics_networks: list[str] = opt([], "addresses or networks (CIDR) that may read "
                                      "/metrics without a key, e.g. the pods of an inference "
                                      "gateway's endpoint picker (/toolmend/v1/sessions stays "
                                      "private)", metavar="CIDR")
    sessions_max: int = opt(256, "recent agent sessions kept in memory for toolmend trace")
    trace_session_idle: float = opt(60.0, "seconds without a step after which a session's span "
                                    "is ended and exported (a later step opens a new one in "
                                    "the same trace)", metavar="S")
    api_key: str = opt("", "bearer key sent to the upstream (never forwarded to clients)",
                       flag="--upstream-api-key", metavar="KEY")
    connect_timeout: float = opt(5.0, "seconds to connect to the upstream", metavar="S")
    first_byte_timeout: float = opt(600.0, "seconds to wait for the upstream's first byte "
                                    "(prefill of a long prompt is slow)", metavar="S")
    idle_timeout: float = opt(120.0, "seconds allowed between two upstream chunks", metavar="S")
    total_timeout: float = opt(3600.0, "seconds one request may take in all", metavar="S")
    drain_grace: float = opt(30.0, "seconds the requests in flight may take to finish after "
                             "SIGTERM; meanwhile new requests get 503 draining with "
                             "Retry-After and queued ones are told to retry elsewhere (give "
                             "the pod a longer terminationGracePeriodSeconds)", metavar="S")
    wedged_after: float = opt(300.0, "seconds a request may hold a backend slot without "
                              "progress (no first token, then no output) before the slot "
                              "counts as wedged; /readyz is false while every slot is (0: "
                              "never)", metavar="S")
    keepalive_interval: float = opt(10.0, "seconds between SSE keep-alive comments before the "
                                    "first token", metavar="S")
    max_body_bytes: int = opt(8 * 1024 * 1024, "largest request body accepted", metavar="BYTES")
    max_header_bytes: int = opt(8190, "longest request line or single header accepted (beyond: "
                                "400 headers_too_large)", metavar="BYTES")
    header_timeout: float = opt(10.0, "seconds a client may take to send a request's headers, "
                                "from the connection's first byte (beyond: 408 and the "
                                "connection is closed; 0: no limit)", metavar="S")
    body_timeout: float = opt(120.0, "seconds a client may take to send a request body (beyond: "
                              "408; 0: no limit)", metavar="S")
    max_client_connections: int = opt(256, "open connections one client address may hold "
                                      "(beyond: 429 and the connection is closed; 0: no "
                                      "limit); loopback clients are exempt")
    limit_loopback_clients: bool = opt(False, "count loopback clients against "
                                       "max_client_connections too (local agents and the load "
                                       "benchmark all connect from 127.0.0.1)")
    client_limit_exempt: list[str] = opt([], "client addresses or networks (CIDR) exempt from "
                                         "max_client_connections, e.g. a gateway in front of "
                                         "toolmend", metavar="CIDR")
    max_messages: int = opt(2048, "most messages in one chat request (beyond: 400 "
                            "too_many_messages)")
    max_tools: int = opt(128, "most tools in one request (beyond: 400 too_many_tools)")
    max_schema_bytes: int = opt(256 * 1024, "largest JSON Schema of one tool's parameters "
                                "(beyond: 400 invalid_tool_schema)", metavar="BYTES")
    max_schema_depth: int = opt(64, "deepest nesting of one tool's parameter schema")
    max_pattern_bytes: int = opt(4096, "longest regex 'pattern' in a tool schema (patterns run "
                                 "on RE2, linear time; backtracking-only syntax is refused)",
                                 metavar="BYTES")
    max_tool_schemas_bytes: int = opt(1024 * 1024, "largest JSON Schema of all the tools of one "
                                      "request together (beyond: 413 tool_schemas_too_large)",
                                      metavar="BYTES")
    schema_cache_bytes: int = opt(64 * 1024 * 1024, "memory the cache of compiled tool schemas "
                                  "may hold, estimated from their size; a larger schema is "
                                  "re-built per request instead", metavar="BYTES")
    schema_workers: int = opt(1, "worker processes that check large new tool schemas away from "
                              "the event loop; started on demand, stopped when idle (0: check "
                              "in-process)")
    schema_inline_bytes: int = opt(32 * 1024, "new tool schemas of one request up to this size "
                                   "together are checked in-process (a few ms); larger ones go "
                                   "to a worker", metavar="BYTES")
    schema_check_timeout: float = opt(10.0, "seconds a worker may spend checking one request's "
                                      "tool schemas (beyond: it is killed, 413 "
                                      "tool_schemas_too_complex)", metavar="S")
    max_argument_chars: int = opt(1024 * 1024, "longest arguments of one tool call, in "
                                  "characters (beyond: invalid_tool_call error)", metavar="CHARS")
    max_argument_depth: int = opt(64, "deepest nesting of one tool call's arguments (beyond: "
                                  "invalid_tool_call error)")
    large_body_bytes: int = opt(16 * 1024 * 1024, "a request body whose parsed form is "
                                "estimated larger than this counts as large (JSON with many "
                                "small values grows ~10x when parsed)", metavar="BYTES")
    max_body_values: int = opt(200_000, "most JSON values in one request body, estimated from "
                               "its commas and colons before it is parsed (beyond: 413 "
                               "too_many_values): the parse holds the event loop, 150-200 ms "
                               "for 350,000 values")
    max_large_bodies: int = opt(2, "large request bodies held at once (beyond: 503 "
                                "too_many_large_bodies with Retry-After)")
    max_connections: int = opt(1024, "upstream connection pool size")
    max_upstream_event_bytes: int = opt(16 * 1024 * 1024, "largest upstream SSE event (its "
                                        "data: lines together), SSE line or Ollama NDJSON line "
                                        "(beyond: the stream ends with the error "
                                        "upstream_event_too_large)", metavar="BYTES")
    max_upstream_reply_bytes: int = opt(32 * 1024 * 1024, "largest upstream reply read whole: "
                                        "a non-streaming answer, a model list, an Ollama "
                                        "stream:false answer (beyond: 502 "
                                        "upstream_reply_too_large)", metavar="BYTES")
    log_level: str = opt("info", "log level", choices=("debug", "info", "warning", "error"))
    log_requests: bool = opt(True, "log one structured line per request")
    responses_store_max: int = opt(1024, "responses kept for previous_response_id and GET "
                                   "/v1/responses/{id} (0: none kept)")
    responses_store_bytes: int = opt(128 * 1024 * 1024, "memory the kept responses may hold, "
                                     "each counted with the whole conversation it continues "
                                     "(oldest dropped first)", metavar="BYTES")
    responses_store_ttl: float = opt(3600.0, "seconds a kept response stays (0: no age limit; "
                                     "the count and size limits still hold)", metavar="S")
    ollama_version: str = opt(OLLAMA_VERSION, "Ollama version the Ollama API reports at "
                              "/api/version (clients such as Codex --oss refuse old ones)",
                              metavar="VERSION")
    state_dir: str = opt("", "folder where toolmend keeps what must survive a restart (the "
                         "generated signing key) (default: $XDG_STATE_HOME/toolmend, else "
                         "~/.local/state/toolmend)", metavar="DIR")
    signing_key: str = opt("", "secret that signs what toolmend hands a client to bring back "
                           "(Anthropic thinking signatures, Responses encrypted reasoning); "
                           "replicas that share it accept each other's (default: a random key "
                           "generated once and kept in state_dir)", metavar="SECRET")

    # Not an option: the file the options came from. Its [sections] (agents, ...) are read by
    # the modules that own them, from this path.
    config_path = ""

    @classmethod
    def load(cls, argv_ns: argparse.Namespace | None = None, config_path: str | None = None,
             environ: dict[str, str] | None = None) -> Settings:
        values: dict[str, Any] = {}
        env = os.environ if environ is None else environ
        path = config_path or env.get(ENV_PREFIX + "CONFIG")
        if path:
            values.update(_from_toml(Path(path)))
        values.update(_from_env(env))
        if argv_ns is not None:
            for f in fields(cls):
                v = getattr(argv_ns, f.name, None)
                if v is not None and v != []:
                    values[f.name] = v
        settings = cls(**values)
        settings.config_path = str(path) if path else ""
        return settings


def _known() -> dict[str, Any]:
    return {f.name: f for f in fields(Settings)}


def _coerce(f: Any, raw: Any, source: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind.startswith("list"):
            if isinstance(raw, str):
                return [p.strip() for p in raw.split(",") if p.strip()]
            return [str(p) for p in raw]
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            return str(raw).strip().lower() in ("1", "true", "yes", "on")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {f.name} must be {kind}, got {raw!r}") from e


def _from_toml(path: Path) -> dict[str, Any]:
    data = tomllib.loads(path.read_text())
    known = _known()
    out: dict[str, Any] = {}
    for key, raw in data.items():
        name = key.replace("-", "_")
        if name not in known:
            if isinstance(raw, dict):
                continue  # sections (agents, models, keys) are read by their own modules
            raise ValueError(f"{path}: unknown option {key!r}")
        out[name] = _coerce(known[name], raw, str(path))
    return out


def _from_env(env: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, f in _known().items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            out[name] = _coerce(f, raw, ENV_PREFIX + name.upper())
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; defaults stay None so unset flags do not override file or env."""
    parser.add_argument("--config", metavar="FILE",
                        help=f"TOML config file (also {ENV_PREFIX}CONFIG)")
    for f in fields(Settings):
        meta = f.metadata
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        env_name = ENV_PREFIX + f.name.upper()
        helptext = f"{meta['help']} (default: {default!r}; env {env_name})"
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": helptext}
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if kind.startswith("list"):
            parser.add_argument(flag, action="append", **kw)
        elif kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            kw["type"] = {"int": int, "float": float}.get(kind, str)
            parser.add_argument(flag, **kw)
