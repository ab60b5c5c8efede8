"""Glue between a chat request and the sans-I/O mender in ``parsers/mender.py``.

Decides whether a request gets a mender, which format and mode apply, hooks in schema
validation, and copies the mender's findings onto the request context for logs, metrics and
traces.

A request with ``tools`` gets the full mender. One without gets a structured-only mender
(``undeclared_calls = "refuse"``, the default): a ``<tool_call>`` in its text is the model's own
business and passes untouched, but a structured ``tool_calls``/``function_call`` the server
sends anyway names a tool the request never declared, and is retried as a plain-text answer,
then refused, under the request's policy. The mender only sees events that carry such a call
(a raw-bytes test), so plain chat pays nothing. ``undeclared_calls = "pass"`` forwards them as
before, without a mender.

It also shapes what is sent upstream when toolmend takes over the server's own tool parser
(``server_tool_parser``, see :func:`bypasses_server_parser`): vLLM's reasoning parser ends
reasoning at a call the model only drafts inside ``<think>``, and its tool parser then emits
that draft as a real call and drops the text after it, so the structured reply no longer holds
what is needed to judge which call the model meant. In bypass mode the request asks for raw
text instead, and the mender parses the calls and re-splits the reasoning itself.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from toolmend.backends.upstream import UpstreamClient
from toolmend.parsers.mender import ChatMender, StreamError, feed_whole, fold_chunks
from toolmend.parsers.reasoning import ReasoningSignals, field_for, template_switch
from toolmend.parsers.schemas import DEFAULT_LIMITS, Toolset
from toolmend.parsers.stream import StreamPipeline, UpstreamStreamError
from toolmend.pipeline.validating import RequestValidation, schema_limits
from toolmend.server.config import Settings
from toolmend.server.context import RequestContext
from toolmend.server.errors import ProxyError

#: servers whose tool parser toolmend bypasses by default: vLLM (0.32, checked on the real
#: server) ends reasoning at a call drafted inside it and fires the draft
BYPASS_BY_DEFAULT = frozenset({"vllm"})
#: servers where ``tool_choice: "none"`` turns the tool parser off while the chat template still
#: receives the tools: vLLM (unless started with --exclude-tools-when-tool-choice-none), and any
#: other OpenAI-compatible server the operator vouches for with ``server_tool_parser = "bypass"``
BYPASSABLE = frozenset({"vllm", "openai"})

TOOL_MODE_HEADER = "X-Toolmend-Tool-Mode"
REASONING_HEADER = "X-Toolmend-Reasoning"
REPAIRS_HEADER = "X-Toolmend-Repairs"


class ChatMending:
    """Everything tool-call related for one chat request."""

    def __init__(self, settings: Settings, body: dict[str, Any], ctx: RequestContext,
                 headers: Any, backend: str, toolset: Toolset | None = None) -> None:
        self.body = body
        self.ctx = ctx
        # without tools, only structured calls are looked at, and always held (buffered):
        # a call to a tool nobody declared must not reach the client, even in part
        self.structured_only = not body.get("tools")
        mode = settings.tool_mode
        asked = (headers.get(TOOL_MODE_HEADER, "") if headers is not None else "").strip().lower()
        if asked in ("buffered", "incremental"):
            mode = asked
        if self.structured_only:
            mode = "buffered"
        self.mode = mode
        self.fmt = None if settings.tool_format == "auto" else settings.tool_format
        self.tools = body.get("tools")
        asked = headers.get(REASONING_HEADER) if headers is not None else None
        self.reasoning_field = field_for(asked, settings.reasoning_field)
        self.reasoning_signals = ReasoningSignals(
            request=template_switch(body.get("chat_template_kwargs")),
            open_models=tuple(settings.reasoning_open_models),
            closed_models=tuple(settings.reasoning_closed_models))
        #: the server's tool parser is bypassed: the request asks for raw text, and the
        #: server's own reasoning field is re-split here (see ChatMender)
        self.bypass = bypasses_server_parser(settings.server_tool_parser, backend, body)
        self.resplit_server_reasoning = self.bypass
        if self.bypass:
            ctx.server_tool_parser = "bypass"
        # no schema to compile without tools: the limits are not even built (plain chat's path)
        limits = DEFAULT_LIMITS if self.structured_only else schema_limits(settings)
        self._mender: ChatMender | None = None
        self.max_argument_chars = settings.max_argument_chars
        self.max_argument_depth = settings.max_argument_depth
        self.validation = RequestValidation.prepare(body, headers, settings.on_invalid, backend,
                                                    settings.max_retries, mode, ctx, limits,
                                                    toolset, settings.max_argument_depth,
                                                    settings.max_argument_chars,
                                                    settings.retry_samples)

    @classmethod
    def for_request(cls, settings: Settings, body: dict[str, Any], ctx: RequestContext,
                    headers: Any, backend: str, toolset: Toolset | None = None
                    ) -> ChatMending | None:
        """``toolset``: the tools already compiled (``validating.request_toolset``)."""
        if not body.get("tools") and settings.undeclared_calls == "pass":
            return None  # calls to undeclared tools are forwarded unchecked, as they come
        return cls(settings, body, ctx, headers, backend, toolset)

    @property
    def whole_as_stream(self) -> bool:
        """A non-streaming request whose reply toolmend re-splits: it is asked upstream as a
        stream and folded back into one reply before it is mended (see ``whole_reply.py``:
        vLLM's non-streaming path drops a ``</think>`` that toolmend needs)."""
        return self.bypass and self.body.get("stream") is not True

    def upstream_body(self) -> dict[str, Any]:
        """The body to send upstream: the client's own, or, when the server's tool parser is
        bypassed, a copy that asks for the reply as raw text.

        ``tool_choice: "none"`` takes vLLM's tool parser out of play (the chat template still
        gets the tools); special tokens are kept, as vLLM's own tool parsers ask for, because a
        format's markers may be special tokens. Validation and retries keep reading the
        client's body: its ``tool_choice`` is still the rule the reply must follow.
        """
        if not self.bypass:
            return self.body
        shaped = dict(self.body)
        shaped["tool_choice"] = "none"
        shaped.setdefault("skip_special_tokens", False)
        if self.whole_as_stream:
            shaped["stream"] = True
            shaped["stream_options"] = {"include_usage": True}
        return shaped

    def mender(self) -> ChatMender:
        v = self.validation
        m = ChatMender(self.fmt, self.tools, mode=self.mode,
                       checker=v.check_call if v else None,
                       reply_checker=v.check_reply if v else None, model_hint=self.ctx.model,
                       single_call=self.body.get("parallel_tool_calls") is False,
                       reasoning_signals=self.reasoning_signals,
                       reasoning_field=self.reasoning_field,
                       resplit_server_reasoning=self.resplit_server_reasoning,
                       structured_only=self.structured_only,
                       max_argument_chars=self.max_argument_chars,
                       max_argument_depth=self.max_argument_depth)
        # kept here, not on the ctx: the mender holds the validation, which holds the ctx, and
        # that cycle kept each request's compiled schemas (megabytes of Rust validators for a
        # large one) alive until a full garbage collection
        self._mender = m
        return m

    def finisher(self, up: UpstreamClient, path: str
                 ) -> Callable[[StreamPipeline], Awaitable[bytes]]:
        """Streaming: after the upstream's reply, resolve held calls by retrying."""

        async def finish(pipeline: StreamPipeline) -> bytes:
            mender = self._mender
            assert mender is not None
            assert self.validation is not None
            try:
                chunks, notes = await self.validation.run_retries(mender, up, path, self.body)
            except StreamError as e:
                import orjson

                err = UpstreamStreamError(502, orjson.dumps(e.body), final=True)
                err.pending = pipeline.emit([], e.notes)  # the retries that were sent
                raise err from None
            finally:
                record(self.ctx, mender)
            return pipeline.emit(chunks, notes, done=True)

        return finish

    def json_transform(self, up: UpstreamClient, path: str
                       ) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
        """Non-streaming: mend (and validate, and retry) ``choices[*].message``."""

        async def transform(obj: dict[str, Any]) -> dict[str, Any]:
            model = obj.get("model") if isinstance(obj.get("model"), str) else self.ctx.model
            notes_out: list[str] = []
            for choice in obj.get("choices") or ():
                msg = choice.get("message") if isinstance(choice, dict) else None
                if not isinstance(msg, dict):
                    continue
                if self.structured_only and not (msg.get("tool_calls")
                                                 or msg.get("function_call")):
                    continue  # no tools and no call: the message is left as it came
                mender = self.mender()
                mender._model_hint = model
                try:
                    chunks, notes = feed_whole(mender, msg, choice.get("finish_reason"), model)
                    if mender.held and self.validation is not None:
                        more, more_notes = await self.validation.run_retries(mender, up, path,
                                                                             self.body)
                        chunks += more
                        notes += more_notes
                except StreamError as e:
                    record(self.ctx, mender)
                    err = e.body.get("error", {})
                    extra = {k: v for k, v in err.items()
                             if k not in ("message", "type", "param", "code")}
                    raise ProxyError(502, err.get("message", "invalid tool call"),
                                     code=err.get("code"), type=err.get("type"),
                                     extra=extra) from None
                choice["message"] = fold_chunks(msg, chunks)
                choice["finish_reason"] = mender.finish_reason
                notes_out += notes
                record(self.ctx, mender)
            if notes_out:
                self.ctx.repair_notes = notes_out
            return obj

        return transform


def bypasses_server_parser(setting: str, backend: str, body: dict[str, Any]) -> bool:
    """Whether toolmend parses this request's reply itself instead of trusting the server's
    tool parser (``server_tool_parser``: ``auto``, ``bypass`` or ``trust``).

    Only for ``tool_choice`` ``auto`` (or absent) and ``none``: a named or ``required`` choice is
    served by vLLM with structured outputs, not by its tool parser, and is left as it is.
    ``none`` is included because the server's reasoning split still misplaces a call drafted
    inside reasoning, which would then count as a call the request forbade.
    """
    if setting == "trust" or backend not in BYPASSABLE or not body.get("tools"):
        return False  # without tools, no tool parser runs on the server
    if body.get("tool_choice") not in (None, "auto", "none"):
        return False
    if body.get("n") not in (None, 1):
        return False  # the mender reads choice 0 of a stream: several are left to the server
    return setting == "bypass" or backend in BYPASS_BY_DEFAULT


def record(ctx: RequestContext, mender: ChatMender | None) -> None:
    if mender is None:
        return
    recorded = ctx.mending_recorded
    if recorded is not None and recorded() is mender:
        return
    # a weak reference: aiohttp keeps a keep-alive connection's last request (and so its ctx)
    # alive until the next one, and the mender holds the request's compiled schemas
    ctx.mending_recorded = weakref.ref(mender)
    ctx.repairs.extend(mender.repairs)
    ctx.tool_names.extend(mender.tool_names)
    ctx.tool_format = mender.format
