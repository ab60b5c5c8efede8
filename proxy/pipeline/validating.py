"""Schema validation of tool calls, wired into the mender, with the retry round-trip.

Everything that decides lives in ``parsers/`` (``schemas``, ``validation``, ``policy``); this
module only adapts it to the mender's checker callbacks and performs the one piece of I/O the
decision table needs: asking the upstream again. A retry happens after the upstream's first
reply has ended and while the request still holds its backend slot; text already streamed to
the client is never repeated, only the held call is replaced (buffered mode; in incremental
mode the call's text is already out, so an invalid call can only be refused).

A request without tools is checked against :data:`NO_TOOLS`: any call in its reply names a tool
the request did not declare, an unknown tool under the policy (retried as a plain-text answer,
then refused).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from toolmend.backends.upstream import UpstreamClient
from toolmend.parsers.mender import MAX_ARGUMENT_CHARS, CheckResult, HeldCall, StreamError
from toolmend.parsers.policy import READ_ARGUMENTS, READ_TEXT, Outcome, Policy, decide, parse_policy
from toolmend.parsers.repair import MAX_ARGUMENT_DEPTH
from toolmend.parsers.schemas import (
    DEFAULT_LIMITS,
    SchemaError,
    SchemaLimits,
    Toolset,
    ValidatorCache,
    compile_tools,
    schema_cache,
)
from toolmend.parsers.validation import Issue, Verdict, validate_call, validate_reply
from toolmend.pipeline.schema_worker import CheckerBusy, SchemaCompiler
from toolmend.server.context import RequestContext
from toolmend.server.errors import ProxyError
from toolmend.server.request_body import cap_output_tokens

ON_INVALID_HEADER = "X-Toolmend-On-Invalid"
#: backends whose chat API samples ``n`` choices in one request (best-of-n retries)
SAMPLING_BACKENDS = frozenset({"vllm", "llamacpp", "llama-server"})
MAX_RETRY_SAMPLES = 8
#: the least ``max_tokens`` a retry gets (see ``_room_for_arguments``)
RETRY_MIN_TOKENS = 512
#: one retried answer: the call's name and arguments (``None``: no call) and the text
Answer = tuple[str | None, str | None, str | None]
#: what a request that declared no tools may call: nothing
NO_TOOLS = Toolset({})
SCHEMAS = web.AppKey("schemas", SchemaCompiler)


def _records(ctx: RequestContext) -> list[dict[str, Any]]:
    return ctx.validation


class RequestValidation:
    """The request's tools, compiled once, and its policy; checkers for the mender."""

    def __init__(self, toolset: Toolset, policy: Policy, backend: str, max_retries: int,
                 mode: str, ctx: RequestContext, max_depth: int = MAX_ARGUMENT_DEPTH,
                 max_argument_chars: int = MAX_ARGUMENT_CHARS, samples: int = 1) -> None:
        self.toolset = toolset
        self.policy = policy
        self.backend = backend
        self.max_retries = max_retries if mode == "buffered" else 0
        self.ctx = ctx
        self.max_depth = max_depth
        self.max_argument_chars = max_argument_chars
        # choices asked per retry (``n``), on backends that sample several in one request
        self.samples = max(1, min(samples, MAX_RETRY_SAMPLES)) if backend in SAMPLING_BACKENDS \
            else 1

    @classmethod
    def prepare(cls, body: dict[str, Any], headers: Any, default_policy: str, backend: str,
                max_retries: int, mode: str, ctx: RequestContext,
                limits: SchemaLimits = DEFAULT_LIMITS, toolset: Toolset | None = None,
                max_depth: int = MAX_ARGUMENT_DEPTH,
                max_argument_chars: int = MAX_ARGUMENT_CHARS,
                samples: int = 1) -> RequestValidation:
        """Compile the tools when the request arrives: a bad schema is the client's 400.
        Without tools there is nothing to compile (nor a ``tool_choice`` to judge): the request
        gets :data:`NO_TOOLS`.

        ``toolset``: the tools already compiled (the proxy does that off the event loop with
        :func:`request_toolset`); without it they are compiled here, in the calling thread.
        """
        tools = body.get("tools")
        try:
            policy = parse_policy(headers.get(ON_INVALID_HEADER) if headers is not None else None,
                                  default=Policy(default_policy))
        except ValueError as e:
            raise ProxyError(400, str(e), param=ON_INVALID_HEADER, code="invalid_header") from None
        if not tools:
            return cls(NO_TOOLS, policy, backend, max_retries, mode, ctx, max_depth,
                       max_argument_chars, samples)
        if toolset is None:
            try:
                toolset = compile_tools(tools, body.get("tool_choice"), limits=limits)
            except SchemaError as e:
                raise schema_error(e) from None
        return cls(toolset, policy, backend, max_retries, mode, ctx, max_depth,
                   max_argument_chars, samples)

    # mender callbacks -------------------------------------------------------------------------
    def check_call(self, name: str, arguments: str) -> CheckResult:
        # the mender refused arguments nested too deeply before asking
        verdict = validate_call(name, arguments, self.toolset, coerce=self.policy.coerces,
                                max_depth=self.max_depth, depth_checked=True)
        return self._result(verdict, attempt=0)

    def check_reply(self, names: list[str]) -> CheckResult:
        # Under "none" every call was already refused one by one (check_call); what is left
        # for the whole reply is a required call that never came.
        if names or self.toolset.choice not in ("required", "function"):
            return CheckResult(True)
        return self._result(validate_reply(names, self.toolset), attempt=0)

    def _result(self, verdict: Verdict, attempt: int) -> CheckResult:
        d = decide(verdict, self.policy, self.toolset, backend=self.backend, attempt=attempt,
                   max_retries=self.max_retries)
        _records(self.ctx).append({"tool": verdict.name, "outcome": d.outcome.value,
                                   "ok": verdict.ok, "attempt": attempt,
                                   "pointer": verdict.error.pointer if verdict.error else None})
        # A retry is reported when it is sent (``_retry_one``), not when it is decided: a call
        # held behind one whose retry failed is never retried, and its "retry 1/1" comment
        # used to outnumber the retries counted (31 comments for 20 retries on one run).
        notes = [d.note] if d.note and d.outcome is not Outcome.RETRY else []
        if d.outcome is Outcome.ERROR:
            return CheckResult(False, notes=notes, error=dict(d.error or {}))
        if d.outcome is Outcome.RETRY:
            return CheckResult(False, notes=notes, retry=d)
        if d.outcome is Outcome.REPAIRED:
            for r in verdict.repairs:
                self.ctx.repairs.append({"kind": f"coerce_{r.kind}", "pointer": r.pointer})
        return CheckResult(True, arguments=d.arguments or None, notes=notes)

    # the retry round-trip ---------------------------------------------------------------------
    async def run_retries(self, mender: Any, up: UpstreamClient, path: str,
                          body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
        """Resolve every held call by asking the upstream again; raises StreamError when a
        call is still invalid after the allowed attempts."""
        chunks: list[dict[str, Any]] = []
        notes: list[str] = []
        reading = mender.retry_options()
        try:
            for held in list(mender.held):
                c, n = await self._retry_one(mender, held, up, path, body, reading, notes)
                chunks += c
                notes += n
        except StreamError as e:
            e.notes = [*notes, *e.notes]  # the retries that were sent are still reported
            raise
        c, n = mender.close()
        return chunks + c, notes + n

    async def _retry_one(self, mender: Any, held: HeldCall, up: UpstreamClient, path: str,
                         body: dict[str, Any], reading: dict[str, Any], sent: list[str]
                         ) -> tuple[list[dict[str, Any]], list[str]]:
        """Retry one held call until it is valid or the attempts run out. Each retry's note
        goes into ``sent`` as the retry is sent, so a failure still reports it."""
        decision = held.retry
        attempt = 0
        loop = asyncio.get_running_loop()
        while True:
            plan = decision.retry
            retry_body = plan.apply(body)
            retry_body["stream"] = False
            retry_body.pop("stream_options", None)
            if plan.read_as == READ_ARGUMENTS:
                _room_for_arguments(retry_body)
            if self.samples > 1 and plan.read_as != READ_TEXT:
                retry_body["n"] = self.samples
            # the door's bound holds for retries too: the floor above and ``n`` both add output
            cap_output_tokens(retry_body, self.ctx.key_output_cap, self.ctx.context_length)
            self.ctx.retries += 1
            self.ctx.retry_times.append(loop.time())
            if decision.note:
                sent.append(decision.note)
            answers = await self._ask(up, path, retry_body, plan, reading)
            attempt += 1
            verdict, name, arguments = self._first_valid(held, answers)
            if name is None and plan.read_as == READ_TEXT:
                # the plan asked for a plain answer instead
                return mender.resolve(held, None, None, text=answers[0][2])
            decision = decide(verdict, self.policy, self.toolset, backend=self.backend,
                              attempt=attempt, max_retries=self.max_retries)
            _records(self.ctx).append({"tool": verdict.name, "outcome": decision.outcome.value,
                                       "ok": verdict.ok, "attempt": attempt,
                                       "pointer": verdict.error.pointer if verdict.error
                                       else None})
            if decision.outcome in (Outcome.FORWARD, Outcome.REPAIRED):
                chunks, notes = mender.resolve(held, name, decision.arguments or arguments)
                return chunks, [f"retried {name}: valid on attempt {attempt}", *notes]
            if decision.outcome is Outcome.ERROR:
                raise StreamError(dict(decision.error or {}))

    def _first_valid(self, held: HeldCall, answers: list[Answer]
                     ) -> tuple[Verdict, str | None, str | None]:
        """The verdict on the first valid answer (best of ``n``), else on the first one (its
        errors make the next correction)."""
        first: tuple[Verdict, str | None, str | None] | None = None
        for name, arguments, _content in answers:
            if name is None:
                if held.call is None:  # a required call never came
                    verdict = validate_reply([], self.toolset)
                else:
                    verdict = Verdict(False, held.call.name, "", (Issue(
                        "", "retry", "the retried reply has no tool call"),))
            else:
                verdict = validate_call(name, arguments or "", self.toolset,
                                        coerce=self.policy.coerces, max_depth=self.max_depth)
            if verdict.ok:
                return verdict, name, arguments
            first = first or (verdict, name, arguments)
        assert first is not None  # _ask answers at least one (empty) answer
        return first

    async def _ask(self, up: UpstreamClient, path: str, retry_body: dict[str, Any],
                   plan: Any, reading: dict[str, Any]) -> list[Answer]:
        """One non-streaming retry request: ``(name, arguments, content)`` for each of its
        choices (one unless ``n`` was asked), each mended like any other reply and read as the
        first reply was (``reading``: its format, model name and reasoning signals, from
        :meth:`ChatMender.retry_options`), so reasoning never comes back as the answer."""
        headers = self.ctx.upstream_headers
        async with up.call(path, orjson.dumps(retry_body), headers=headers) as call:
            raw = await call.read_all()
            status = call.status
        if status == 400 and retry_body.get("n", 1) > 1:
            # llama-server refuses more choices than it has slots ("Field 'n': value must be
            # between 1 <= value <= 2"): ask for one rather than lose the retry
            retry_body = {k: v for k, v in retry_body.items() if k != "n"}
            async with up.call(path, orjson.dumps(retry_body), headers=headers) as call:
                raw = await call.read_all()
                status = call.status
        nothing: list[Answer] = [(None, None, None)]
        if status >= 400:
            return nothing
        try:
            doc = orjson.loads(raw)
            choices = [c["message"] for c in doc["choices"][: max(1, self.samples)]]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            return nothing
        if not choices:
            return nothing
        return [self._read(msg, doc, retry_body, plan, reading) for msg in choices]

    def _read(self, msg: Any, doc: dict[str, Any], retry_body: dict[str, Any],
              plan: Any, reading: dict[str, Any]) -> Answer:
        from toolmend.parsers.mender import mend_message

        if not isinstance(msg, dict):
            return None, None, None
        tools = retry_body.get("tools") or body_tools(self.toolset)
        try:
            mended, _, _ = mend_message(
                msg, "stop", reading.get("fmt"), tools, model=doc.get("model"),
                model_hint=reading.get("model"), max_argument_chars=self.max_argument_chars,
                max_argument_depth=self.max_depth,
                reasoning_signals=reading.get("reasoning_signals"),
                reasoning_open=reading.get("reasoning_open"))
        except StreamError:
            mended = msg
        tcs = mended.get("tool_calls") or []
        first = tcs[0]["function"] if tcs else {}
        content = mended.get("content")
        if plan.read_as == READ_ARGUMENTS and not (content or "").strip() and first:
            content = first.get("arguments")  # the server answered with a call anyway
        name, arguments = plan.read(first.get("name"), first.get("arguments"), content)
        return name, arguments, mended.get("content")


def _room_for_arguments(retry_body: dict[str, Any]) -> None:
    """Give a retry read as a bare arguments object (a JSON-schema grammar: llama-server,
    Ollama, llama-cpp-python) at least :data:`RETRY_MIN_TOKENS`. The client's ``max_tokens``
    was sized for its whole reply and the call it held fitted, but such a grammar lets the model
    spend tokens on white space between fields: on the real llama-server 3 of 82 retries were
    cut at ``max_tokens: 140`` in the middle of the arguments, and refused as not JSON. Other
    retries keep the client's bound: a ``tool_choice: "required"`` retry of a reply that wrote
    prose, given 512 tokens, ran on past the real test's patience on a loaded machine. The key's cap
    and the backend's context are applied after this, so the floor never lifts a cap."""
    for key in ("max_tokens", "max_completion_tokens"):
        value = retry_body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < RETRY_MIN_TOKENS:
            retry_body[key] = RETRY_MIN_TOKENS


def schema_limits(settings: Any) -> SchemaLimits:
    """The configured bounds on what a request may ask us to compile (see config.py)."""
    return SchemaLimits(max_tools=settings.max_tools, max_schema_bytes=settings.max_schema_bytes,
                        max_depth=settings.max_schema_depth,
                        max_pattern_bytes=settings.max_pattern_bytes,
                        max_total_bytes=settings.max_tool_schemas_bytes)


def schema_error(e: SchemaError) -> ProxyError:
    """A refused schema as the client's error: 400, or 413 for the per-request bounds."""
    return ProxyError(413 if e.too_large else 400, f"invalid tool schema: {e}",
                      param=e.pointer or None, code=e.code)


def install_schema_compiler(app: web.Application, settings: Any) -> None:
    """Give the app its :class:`SchemaCompiler` (worker processes stop with the app)."""
    cache = schema_cache
    if settings.schema_cache_bytes != cache.max_bytes:
        cache = ValidatorCache(max_bytes=settings.schema_cache_bytes)
    compiler = SchemaCompiler(workers=settings.schema_workers,
                              timeout=settings.schema_check_timeout,
                              inline_bytes=settings.schema_inline_bytes, cache=cache)
    app[SCHEMAS] = compiler

    async def close(_app: web.Application) -> None:
        await compiler.close()

    app.on_cleanup.append(close)


async def request_toolset(app: web.Application, body: dict[str, Any], settings: Any
                          ) -> Toolset | None:
    """The request's tools compiled, without holding the event loop for long (large new
    schemas are checked in a worker process); ``None`` without tools."""
    tools = body.get("tools")
    if not tools:
        return None
    compiler = app.get(SCHEMAS)
    if compiler is None:  # an app built without one (some tests): compile here
        compiler = SchemaCompiler(workers=0)
    try:
        return await compiler.compile_tools(tools, body.get("tool_choice"),
                                            schema_limits(settings))
    except SchemaError as e:
        raise schema_error(e) from None
    except CheckerBusy as e:
        raise ProxyError(503, f"toolmend is busy checking other large tool schemas ({e}); "
                         "retry shortly", code="schema_checker_busy",
                         headers={"Retry-After": "1"}) from None


def body_tools(toolset: Toolset) -> list[dict[str, Any]]:
    """Tools in OpenAI shape for parsing a retried reply (names are enough for the parser)."""
    return [{"type": "function", "function": {"name": n}} for n in toolset.names]
