"""``toolmend sim``: a real HTTP server that behaves like vLLM, llama-server or Ollama.

It replays scripted replies (``Scenario``) in a chosen dialect, models time (time to first
token, per-token delay, prefill per prompt token, N slots with a FIFO queue behind them, as the
real servers have) and injects faults. Tests, benchmarks and the demo all run against it, and so
can anyone who wants to see how their agent copes with a misbehaving backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from toolmend.sim.dialects import Dialect, make_dialect
from toolmend.sim.scenario import Scenario, lorem, random_cuts, split_tokens

SIM = web.AppKey("sim", "SimBackend")


@dataclass
class SimStats:
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    max_concurrent: int = 0  # the most generation requests held at once, running or queued
    queued: int = 0
    completed: int = 0
    disconnects: list[float] = field(default_factory=list)  # time.monotonic() of each
    bodies: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=64))
    headers: deque[dict[str, str]] = field(default_factory=lambda: deque(maxlen=64))
    peers: deque[int | None] = field(default_factory=lambda: deque(maxlen=64))  # client ports
    connections: set[int] = field(default_factory=set)  # every client port seen, any endpoint
    authorizations: deque[str | None] = field(default_factory=lambda: deque(maxlen=64))
    chunks_sent: int = 0
    bytes_sent: int = 0
    max_asked: int = 0  # the largest output limit (max_tokens, n_predict...) any request asked


class SimBackend:
    def __init__(self, dialect: str = "vllm", model: str = "sim-model", *, slots: int = 4,
                 ttft: float = 0.02, token_delay: float = 0.0, prefill_per_token: float = 0.0,
                 scenarios: list[Scenario] | None = None, library: dict[str, Scenario] | None
                 = None, default_tokens: int = 16, loading: bool = False,
                 context: int | None = None, metrics: bool = True) -> None:
        self.dialect: Dialect = make_dialect(dialect, model)
        if context is not None:
            self.dialect.context = max(1, context)
        self.model = model
        self.slots = slots
        self.ttft = ttft
        self.token_delay = token_delay
        self.prefill_per_token = prefill_per_token
        self.default_tokens = default_tokens
        self.loading = loading
        self.metrics = metrics  # llama-server answers /metrics 501 unless started --metrics
        self.kv_tokens = 0  # prompt tokens of the running requests: what their KV cache holds
        self.gate = asyncio.Event()  # "hold" faults wait for it (open_gate)
        self.script: deque[Scenario] = deque(scenarios or ())
        self.library: dict[str, Scenario] = dict(library or {})
        self.stats = SimStats()
        self._slots = asyncio.Semaphore(slots)
        self._runner: web.AppRunner | None = None
        self.url = ""

    # scripting --------------------------------------------------------------------------------
    def open_gate(self) -> None:
        """Let every request held by a ``hold`` fault go on (and later ones pass at once)."""
        self.gate.set()

    def close_gate(self) -> None:
        self.gate.clear()

    def push(self, *scenarios: Scenario | dict[str, Any]) -> None:
        for s in scenarios:
            self.script.append(s if isinstance(s, Scenario) else Scenario.from_dict(s))

    def load_fixtures(self, path: Path) -> int:
        """Add every scenario under ``path`` to the library.

        Two shapes are understood: scenario objects (or lists of them), and the format
        fixtures in ``fixtures/formats/`` (cases with the raw model ``output``), which become
        scenarios named ``FORMAT/CASE`` that stream the output as content.
        """
        n = 0
        for f in sorted(path.rglob("*.json")):
            try:
                doc = orjson.loads(f.read_bytes())
            except orjson.JSONDecodeError:
                continue
            for d in doc if isinstance(doc, list) else [doc]:
                if not isinstance(d, dict):
                    continue
                if "scenario" in d:
                    d = d["scenario"]
                elif "output" in d and "name" in d:
                    d = {"name": f"{f.stem}/{d['name']}", "content": d["output"]}
                elif not ({"content", "chunks", "tool_calls", "fault"} & d.keys()):
                    continue
                sc = Scenario.from_dict(d)
                self.library[sc.name] = sc
                n += 1
        return n

    def pick(self, body: dict[str, Any]) -> Scenario:
        if self.script:
            sc = self.script.popleft()
            if sc.fault is not None and sc.fault.times > 1:  # strikes the next request too
                again = copy.copy(sc)
                again.fault = dataclasses.replace(sc.fault, times=sc.fault.times - 1)
                self.script.appendleft(again)
            return sc
        last = _last_user_text(body)
        if "#scenario:" in last:
            name = last.split("#scenario:", 1)[1].split()[0]
            if name in self.library:
                return self.library[name]
        results = _tool_results(body)
        for sc in self.library.values():
            if not sc.match and sc.step is None:
                continue  # picked by name only
            if (not sc.match or sc.match in last) and (sc.step is None or sc.step == results):
                return sc
        # The default reply: as long as asked, else default_tokens, and never longer than the
        # context leaves room for (a real server stops there: asking for 10**12 tokens must
        # not make the simulator build a reply of 10**12 tokens).
        asked = asked_tokens(body)
        room = max(1, self.dialect.context - _estimate_prompt_tokens(body))
        want = self.default_tokens if asked is None or asked < 0 else asked
        n = min(want, room)
        cut = (asked is not None and asked >= 0) or n < want
        return Scenario(name="default", chunks=lorem(n), finish_reason="length" if cut
                        else "stop")

    # server ------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        @web.middleware
        async def count_connections(request: web.Request, handler: Any) -> web.StreamResponse:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            if peer:
                self.stats.connections.add(peer[1])
            self.stats.authorizations.append(request.headers.get("Authorization"))
            return await handler(request)

        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[count_connections])
        app[SIM] = self
        r = app.router
        r.add_post("/v1/chat/completions", self.chat)
        r.add_post("/v1/completions", self.completions)
        r.add_get("/v1/models", self.models)
        r.add_get("/health", self.health)
        r.add_get("/version", self.version)
        r.add_get("/props", self.props)
        r.add_get("/metrics", self.metrics_endpoint)
        r.add_get("/slots", self.slots_endpoint)
        r.add_get("/api/version", self.ollama_version)
        r.add_get("/api/tags", self.ollama_tags)
        r.add_post("/api/chat", self.ollama_chat)
        r.add_get("/", self.root)
        r.add_post("/tokenize", self.tokenize)
        r.add_post("/apply-template", self.apply_template)
        r.add_post("/sim/script", self.script_endpoint)
        r.add_get("/sim/stats", self.stats_endpoint)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=4096)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{host}:{bound}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # discovery ---------------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        if self.loading:
            return self._error(503, "Loading model")
        return _json(self.dialect.models_doc())

    async def health(self, request: web.Request) -> web.Response:
        if self.dialect.name == "llama-cpp-python":
            return _json({"detail": "Not Found"}, 404)
        if self.loading:
            return self._error(503, "Loading model")
        if self.dialect.name == "llamacpp":
            return _json({"status": "ok"})
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        if self.dialect.name != "vllm":
            return _json({"detail": "Not Found"}, 404)
        return _json({"version": "0.32.0"})

    async def props(self, request: web.Request) -> web.Response:
        if self.dialect.name != "llamacpp":
            return _json({"detail": "Not Found"}, 404)
        return _json({"default_generation_settings": {"n_ctx": self.dialect.context,
                                                      "params": {}},
                      "total_slots": self.slots, "model_path": f"/models/{self.model}.gguf",
                      "chat_template": "{{ messages }}", "build_info": "b6550-1a2b3c4d",
                      "chat_template_caps": {"supports_tools": True}})

    @property
    def kv_capacity(self) -> int:
        """Tokens the simulated KV cache holds: a full context for every slot."""
        return self.dialect.context * self.slots

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        """The server's own load, in its own names: vLLM's (the names the inference gateway's
        endpoint picker reads), llama-server's (with --metrics; 501 without); others 404."""
        s, kv = self.stats, self.kv_tokens / self.kv_capacity
        if self.dialect.name == "vllm":
            lab = f'engine="0",model_name="{self.model}"'
            text = (
                "# HELP vllm:num_requests_running Number of requests in model execution "
                "batches.\n# TYPE vllm:num_requests_running gauge\n"
                f"vllm:num_requests_running{{{lab}}} {float(s.in_flight)}\n"
                "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
                "# TYPE vllm:num_requests_waiting gauge\n"
                f"vllm:num_requests_waiting{{{lab}}} {float(s.queued)}\n"
                "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
                "# TYPE vllm:kv_cache_usage_perc gauge\n"
                f"vllm:kv_cache_usage_perc{{{lab}}} {kv}\n"
                "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
                "# TYPE vllm:cache_config_info gauge\n"
                f'vllm:cache_config_info{{block_size="16",engine="0",'
                f'num_gpu_blocks="{self.kv_capacity // 16}"}} 1.0\n'
                "# HELP vllm:request_success_total Count of successfully processed requests.\n"
                "# TYPE vllm:request_success_total counter\n"
                f'vllm:request_success_total{{{lab},finished_reason="stop"}} '
                f"{float(s.completed)}\n")
        elif self.dialect.name == "llamacpp" and self.metrics:
            text = (
                "# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent "
                "usage.\n# TYPE llamacpp:kv_cache_usage_ratio gauge\n"
                f"llamacpp:kv_cache_usage_ratio {kv}\n"
                "# HELP llamacpp:requests_processing Number of requests processing.\n"
                "# TYPE llamacpp:requests_processing gauge\n"
                f"llamacpp:requests_processing {s.in_flight}\n"
                "# HELP llamacpp:requests_deferred Number of requests deferred.\n"
                "# TYPE llamacpp:requests_deferred gauge\n"
                f"llamacpp:requests_deferred {s.queued}\n")
        elif self.dialect.name == "llamacpp":
            return _json({"error": {"code": 501, "message": "This server does not support "
                                    "metrics endpoint. Start it with `--metrics`",
                                    "type": "not_supported_error"}}, 501)
        else:
            return _json({"detail": "Not Found"}, 404)
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def slots_endpoint(self, request: web.Request) -> web.Response:
        """llama-server's /slots: one entry per slot, the busy ones first."""
        if self.dialect.name != "llamacpp":
            return _json({"detail": "Not Found"}, 404)
        busy = self.stats.in_flight
        return _json([{"id": i, "id_task": i if i < busy else -1,
                       "n_ctx": self.dialect.context, "speculative": False,
                       "is_processing": i < busy,
                       "next_token": {"has_next_token": i < busy, "n_remain": -1,
                                      "n_decoded": 0}} for i in range(self.slots)])

    async def ollama_version(self, request: web.Request) -> web.Response:
        if self.dialect.name != "ollama":
            return _json({"detail": "Not Found"}, 404)
        return _json({"version": "0.12.6"})

    async def ollama_tags(self, request: web.Request) -> web.Response:
        if self.dialect.name != "ollama":
            return _json({"detail": "Not Found"}, 404)
        return _json({"models": [{"name": self.model, "model": self.model,
                                  "modified_at": "2026-01-01T00:00:00Z", "size": 1,
                                  "details": {"family": "sim"}}]})

    async def root(self, request: web.Request) -> web.Response:
        if self.dialect.name == "ollama":
            return web.Response(text="Ollama is running")
        return _json({"detail": "Not Found"}, 404)

    # tokenizer ---------------------------------------------------------------------------------
    # The sim's "tokenizer" counts whitespace-separated words of its "chat template" (each
    # message as ``<|role|>text`` on a line, then ``<|assistant|>``), so a count is easy to
    # work out by hand. vLLM tokenizes a chat request in one call; llama-server renders the
    # template (``/apply-template``) and tokenizes the text (``/tokenize``); the others have
    # neither.
    @staticmethod
    def _template(body: dict[str, Any]) -> str:
        lines = []
        for m in body.get("messages") or ():
            if isinstance(m, dict):
                c = m.get("content")
                text = c if isinstance(c, str) else " ".join(
                    p.get("text", "") for p in c or () if isinstance(p, dict))
                lines.append(f"<|{m.get('role')}|>{text}\n")
        return "".join(lines) + "<|assistant|>"

    async def tokenize(self, request: web.Request) -> web.Response:
        if self.dialect.name not in ("vllm", "llamacpp"):
            return _json({"detail": "Not Found"}, 404)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._error(400, "invalid JSON body")
        self.stats.bodies.append(body)
        if self.dialect.name == "vllm":
            text = self._template(body) if "messages" in body else str(body.get("prompt", ""))
            n = len(text.split())
            return _json({"count": n, "max_model_len": self.dialect.context,
                          "tokens": list(range(n))})
        return _json({"tokens": list(range(len(str(body.get("content", "")).split())))})

    async def apply_template(self, request: web.Request) -> web.Response:
        if self.dialect.name != "llamacpp":
            return _json({"detail": "Not Found"}, 404)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._error(400, "invalid JSON body")
        self.stats.bodies.append(body)
        return _json({"prompt": self._template(body)})

    async def script_endpoint(self, request: web.Request) -> web.Response:
        doc = orjson.loads(await request.read())
        for d in doc if isinstance(doc, list) else [doc]:
            self.push(d)
        return _json({"queued": len(self.script)})

    async def stats_endpoint(self, request: web.Request) -> web.Response:
        s = self.stats
        return _json({"requests": s.requests, "in_flight": s.in_flight,
                      "max_in_flight": s.max_in_flight, "queued": s.queued,
                      "max_concurrent": s.max_concurrent, "completed": s.completed,
                      "disconnects": len(s.disconnects), "chunks_sent": s.chunks_sent,
                      "max_asked": s.max_asked})

    # generation --------------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    def _error(self, status: int, message: str) -> web.Response:
        headers = {"Retry-After": "1"} if status == 429 else None
        return _json(self.dialect.error_body(status, message), status, headers)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._error(400, "invalid JSON body")
        self.stats.requests += 1
        self.stats.bodies.append(body)
        self.stats.headers.append({k.lower(): v for k, v in request.headers.items()})
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.stats.peers.append(peer[1] if peer else None)
        if self.loading:
            return self._error(503, "Loading model")
        if not isinstance(body, dict):
            return self._error(400, "the request body must be a JSON object")
        bad = _bad_token_limit(body)
        if bad is not None:
            return self._error(400, bad)
        self.stats.max_asked = max(self.stats.max_asked, asked_tokens(body) or 0)
        sc = self.pick(body)
        fault = sc.fault
        if fault and fault.kind == "refuse":
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        if fault and fault.kind == "status":
            return self._error(fault.status, fault.message)
        self.stats.queued += 1
        self.stats.max_concurrent = max(self.stats.max_concurrent,
                                        self.stats.queued + self.stats.in_flight)
        try:
            await self._slots.acquire()
        finally:
            self.stats.queued -= 1
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        prompt_tokens = sc.prompt_tokens or _estimate_prompt_tokens(body)
        self.kv_tokens += prompt_tokens
        try:
            wait = (self.ttft if sc.ttft is None else sc.ttft) + prompt_tokens * \
                self.prefill_per_token
            if fault and fault.kind == "stall" and fault.after == 0:
                wait += fault.seconds
            if wait > 0:
                await asyncio.sleep(wait)
            if fault and fault.kind == "hold" and fault.after == 0:
                await self.gate.wait()
            if fault and fault.kind in HOSTILE_FAULTS:
                return await self._hostile(request, fault, bool(body.get("stream")))
            if body.get("stream"):
                return await self._stream(request, body, sc, chat, prompt_tokens)
            return self._whole(body, sc, chat, prompt_tokens)
        except (asyncio.CancelledError, ConnectionError):
            self.stats.disconnects.append(time.monotonic())
            raise
        finally:
            self.stats.in_flight -= 1
            self.kv_tokens -= prompt_tokens
            self._slots.release()
            self.stats.completed += 1

    def _whole(self, body: dict[str, Any], sc: Scenario, chat: bool,
               prompt_tokens: int) -> web.Response:
        d = self.dialect
        completion = len(sc.content_pieces()) + sum(len(split_tokens(c.arguments))
                                                    for c in sc.tool_calls)
        if chat:
            doc = {"id": d.completion_id(), "object": "chat.completion",
                   "created": int(time.time()), "model": self.model,
                   "choices": [{"index": 0, "message": d.reply_message(sc),
                                "finish_reason": sc.final_reason()}],
                   "usage": d.usage(prompt_tokens, completion)}
        else:
            doc = {"id": "cmpl-" + d.completion_id()[9:], "object": "text_completion",
                   "created": int(time.time()), "model": self.model,
                   "choices": [{"index": 0, "text": sc.content, "logprobs": None,
                                "finish_reason": sc.final_reason()}],
                   "usage": d.usage(prompt_tokens, completion)}
        return _json(doc)

    def _deltas(self, sc: Scenario, chat: bool) -> list[dict[str, Any]]:
        d = self.dialect
        out: list[dict[str, Any]] = []
        if chat:
            out.extend(d.reasoning_delta(p) for p in split_tokens(sc.reasoning))
            out.extend(d.content_delta(p) for p in sc.content_pieces())
            if sc.tool_calls:
                out.extend(d.tool_deltas(sc.tool_calls, sc.quirks))
        else:
            out.extend({"text": p} for p in sc.content_pieces())
        return out

    async def _stream(self, request: web.Request, body: dict[str, Any], sc: Scenario,
                      chat: bool, prompt_tokens: int) -> web.StreamResponse:
        d = self.dialect
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        cid = d.completion_id() if chat else "cmpl-" + d.completion_id()[9:]
        created = int(time.time())
        fault = sc.fault
        delay = self.token_delay if sc.token_delay is None else sc.token_delay
        rng = random.Random(sc.wire_split_seed) if sc.wire_split_seed is not None else None
        sent = 0

        async def send(raw: bytes) -> None:
            nonlocal sent
            if rng is not None:
                for piece in random_cuts(raw, rng):
                    await resp.write(piece)
            else:
                await resp.write(raw)
            sent += 1
            self.stats.chunks_sent += 1
            self.stats.bytes_sent += len(raw)

        def event(obj: dict[str, Any]) -> bytes:
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        def wrap(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            if chat:
                return d.envelope(cid, created, [d.choice(delta, finish)])
            return {"id": cid, "object": "text_completion", "created": created,
                    "model": self.model, "choices": [{"index": 0, "text": delta.get("text", ""),
                                                      "logprobs": None, "finish_reason": finish}]}

        deltas = self._deltas(sc, chat)
        if fault and fault.kind == "endless":
            deltas = _endless(d, chat)
        if chat:
            await send(event(wrap(d.first_delta())))
        count = 0
        struck = False
        for delta in deltas:
            if fault and not struck and sent >= fault.after:
                struck = True
                if await self._strike(fault, resp, request, send):
                    return resp
            if delay > 0:
                await asyncio.sleep(delay)
            await send(event(wrap(delta)))
            count += 1
        if fault and not struck and await self._strike(fault, resp, request, send):
            return resp
        reason = sc.final_reason()
        if chat:
            final = d.envelope(cid, created, [d.finish_choice(reason)])
            final.update(d.extra_final())
        else:
            final = wrap({"text": ""}, reason)
        await send(event(final))
        so = body.get("stream_options") or {}
        if d.sends_usage_chunk and so.get("include_usage"):
            usage = d.envelope(cid, created, []) if chat else wrap({}, None) | {"choices": []}
            usage["usage"] = d.usage(prompt_tokens, count)
            await send(event(usage))
        await send(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _strike(self, fault: Any, resp: web.StreamResponse, request: web.Request,
                      send: Any) -> bool:
        """Apply a mid-stream fault; True when the stream is over."""
        kind = fault.kind
        if kind == "reset":
            if request.transport is not None:
                request.transport.abort()
            return True
        if kind == "stall" and fault.after > 0:
            await asyncio.sleep(fault.seconds)
            return False
        if kind == "hold" and fault.after > 0:
            await self.gate.wait()
            return False
        if kind == "malformed":
            await send(b'data: {"id": "x", "choices": [{"delta": {"content": "oops"\n\n')
            return False
        if kind == "truncated":
            await send(b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"ind')
            with contextlib.suppress(Exception):
                await resp.write_eof()
            return True
        if kind == "error_event":
            await send(b"data: " + orjson.dumps({"error": {"message": fault.message,
                                                           "type": "InternalServerError",
                                                           "code": 500}}) + b"\n\n")
            await send(b"data: [DONE]\n\n")
            await resp.write_eof()
            return True
        return False

    async def _hostile(self, request: web.Request, fault: Any, stream: bool
                       ) -> web.StreamResponse:
        """A hostile upstream: the response headers go out, then it misbehaves (see FAULTS)."""
        kind, size = fault.kind, max(0, fault.size)
        ctype = "text/event-stream" if stream else "application/json"
        if kind == "huge_body" and not stream:
            text = "x" * size
            return _json({"id": "chatcmpl-huge", "object": "chat.completion",
                          "created": int(time.time()), "model": self.model,
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": text}}]})
        resp = web.StreamResponse(headers={"Content-Type": ctype})
        if kind == "reset_mid_body" and not stream:
            resp.content_length = 4096
        await resp.prepare(request)

        def abort() -> web.StreamResponse:
            if request.transport is not None:
                request.transport.abort()
            return resp

        if kind == "headers_then_reset":
            return abort()
        if kind == "headers_then_stall":
            await asyncio.sleep(fault.seconds)
            return abort()
        if kind == "reset_mid_body":
            await resp.write(b'{"id": "chatcmpl-cut", "object": "chat.completion", "choi')
            return abort()
        head = b'data: {"id":"chatcmpl-h","object":"chat.completion.chunk","created":1,' \
               b'"model":"' + self.model.encode() + b'","choices":[{"index":0,"delta":'
        if kind == "invalid_utf8":
            await resp.write(head + b'{"content":"bad \xff\xfe bytes \xc3"},'
                             b'"finish_reason":null}]}\n\n')
            await resp.write(head + b'{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
        elif kind == "huge_line":  # one event whose single line is ``size`` bytes
            await resp.write(head + b'{"content":"')
            await _write_filler(resp, b"x", size)
            await resp.write(b'"},"finish_reason":null}]}\n\n')
            await resp.write(head + b'{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
        elif kind == "unterminated_event":  # data: lines, never the blank line that ends them
            await _write_filler(resp, b"data: " + b"x" * 58 + b"\n", size)
        else:  # huge_body asked of a stream: one big content event
            await resp.write(head + b'{"content":"')
            await _write_filler(resp, b"y", size)
            await resp.write(b'"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
        await resp.write_eof()
        return resp

    # Ollama native ------------------------------------------------------------------------------
    async def ollama_chat(self, request: web.Request) -> web.StreamResponse:
        """Ollama's native chat: NDJSON lines, each tool call whole with ``arguments`` an
        object, counts and nanosecond durations on the ``done`` line. No messages means
        "load the model" (``done_reason: load``), as the real server answers a warm-up."""
        if self.dialect.name != "ollama":
            return _json({"detail": "Not Found"}, 404)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _json({"error": "invalid JSON body"}, 400)
        if not isinstance(body, dict):
            return _json({"error": "the request body must be a JSON object"}, 400)
        self.stats.requests += 1
        self.stats.bodies.append(body)
        self.stats.headers.append({k.lower(): v for k, v in request.headers.items()})
        self.stats.max_asked = max(self.stats.max_asked, asked_tokens(body) or 0)
        stream = body.get("stream", True) is not False

        def line(msg: dict[str, Any], done: bool, **extra: Any) -> bytes:
            doc = {"model": self.model, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                   "message": msg, "done": done, **extra}
            return orjson.dumps(doc) + b"\n"

        if not body.get("messages"):
            self.stats.completed += 1
            return web.Response(body=line({"role": "assistant", "content": ""}, True,
                                          done_reason="load"),
                                content_type="application/x-ndjson" if stream
                                else "application/json")
        sc = self.pick(body)
        fault = sc.fault
        if fault and fault.kind == "refuse":
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        if fault and fault.kind == "status":
            return _json({"error": fault.message}, fault.status)
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            await asyncio.sleep(self.ttft if sc.ttft is None else sc.ttft)
            pieces = sc.content_pieces()
            thinking = split_tokens(sc.reasoning)
            calls = [{"function": {"name": c.name, "arguments": _obj(c.arguments)}}
                     for c in sc.tool_calls]
            reason = "length" if sc.finish_reason == "length" else "stop"
            n = len(thinking) + len(pieces) + len(calls)
            final_extra = {"done_reason": reason, "total_duration": 1_000_000 + n * 1000,
                           "load_duration": 1000,
                           "prompt_eval_count": _estimate_prompt_tokens(body),
                           "prompt_eval_duration": 1000, "eval_count": n,
                           "eval_duration": 1000 * max(n, 1)}
            if not stream:
                msg: dict[str, Any] = {"role": "assistant", "content": sc.content}
                if sc.reasoning:
                    msg["thinking"] = sc.reasoning
                if calls:
                    msg["tool_calls"] = calls
                return web.Response(body=line(msg, True, **final_extra),
                                    content_type="application/json")
            resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await resp.prepare(request)
            delay = self.token_delay if sc.token_delay is None else sc.token_delay
            out = [line({"role": "assistant", "content": "", "thinking": t}, False)
                   for t in thinking]
            out += [line({"role": "assistant", "content": p}, False) for p in pieces]
            if calls:
                out.append(line({"role": "assistant", "content": "", "tool_calls": calls},
                                False))
            for i, raw in enumerate(out):
                if fault and fault.kind == "reset" and i >= fault.after:
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                if fault and fault.kind == "error_event" and i >= fault.after:
                    await resp.write(orjson.dumps({"error": fault.message}) + b"\n")
                    await resp.write_eof()
                    return resp
                if delay > 0:
                    await asyncio.sleep(delay)
                await resp.write(raw)
                self.stats.chunks_sent += 1
            await resp.write(line({"role": "assistant", "content": ""}, True, **final_extra))
            await resp.write_eof()
            return resp
        except (asyncio.CancelledError, ConnectionError):
            self.stats.disconnects.append(time.monotonic())
            raise
        finally:
            self.stats.in_flight -= 1
            self.stats.completed += 1


#: Faults that take over the whole response (``SimBackend._hostile``).
HOSTILE_FAULTS = frozenset({"headers_then_reset", "headers_then_stall", "reset_mid_body",
                            "unterminated_event", "huge_line", "invalid_utf8", "huge_body"})


async def _write_filler(resp: web.StreamResponse, unit: bytes, size: int) -> None:
    """``size`` bytes (rounded to whole units) of ``unit``, written 1 MB at a time."""
    block = unit * max(1, (1 << 20) // len(unit))
    left = size
    while left > 0:
        piece = block if left >= len(block) else unit * max(1, left // len(unit))
        await resp.write(piece)
        left -= len(piece)


def _endless(d: Dialect, chat: bool) -> Any:
    i = 0
    while True:
        i += 1
        yield d.content_delta(" tick") if chat else {"text": " tick"}


def _obj(arguments: str) -> Any:
    try:
        return orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return arguments


#: What the servers read as the most tokens to generate, in the order they prefer them.
TOKEN_LIMIT_FIELDS = ("max_completion_tokens", "max_tokens", "n_predict", "max_new_tokens",
                      "num_predict")


def asked_tokens(body: dict[str, Any]) -> int | None:
    """The output limit the request asks for: the most that any of the fields some server
    honours allows (None: no field; -1: "until the context is full", as llama-server's and
    Ollama's -1). The simulator stands for every server at once, so a limit that only one
    of them reads still counts."""
    options = body.get("options")
    values = [v for doc in (body, options if isinstance(options, dict) else {})
              for name in TOKEN_LIMIT_FIELDS
              if isinstance(v := doc.get(name), int) and not isinstance(v, bool)]
    if not values:
        return None
    return -1 if min(values) < 0 else max(values)


def _bad_token_limit(body: dict[str, Any]) -> str | None:
    """vLLM's refusal of a ``max_tokens`` that is not a positive integer (null is allowed)."""
    for name in ("max_tokens", "max_completion_tokens"):
        v = body.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            return f"{name} must be an integer of at least 1, got {v!r}"[:200]
    return None


def _last_user_text(body: dict[str, Any]) -> str:
    for m in reversed(body.get("messages") or ()):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c
            if isinstance(c, list):
                return " ".join(p.get("text", "") for p in c if isinstance(p, dict))
    p = body.get("prompt")
    return p if isinstance(p, str) else ""


def _tool_results(body: dict[str, Any]) -> int:
    """How many tool results the conversation holds: the step an agent loop has reached."""
    return sum(1 for m in body.get("messages") or ()
               if isinstance(m, dict) and m.get("role") == "tool")


def _estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """About four characters a token, like most BPE vocabularies on English."""
    n = 0
    for m in body.get("messages") or ():
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            n += len(m["content"])
    if isinstance(body.get("prompt"), str):
        n += len(body["prompt"])
    return max(1, n // 4)


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json",
                        headers=headers)
