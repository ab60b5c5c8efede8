"""Glue between a chat request and the sans-I/O mender in ``parsers/mender.py``.

Decides whether a request gets a mender (only when it offers tools: without ``tools`` an agent
cannot receive a call, and a ``<tool_call>`` in the text is the model's own business), which
format and mode apply, hooks in schema validation, and copies the mender's findings onto the
request context for logs, metrics and traces.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .config import Settings
from .context import RequestContext
from .errors import ProxyError
from .parsers.mender import ChatMender, StreamError, feed_whole, fold_chunks
from .parsers.reasoning import ReasoningSignals, field_for, template_switch
from .parsers.stream import StreamPipeline, UpstreamStreamError
from .upstream import UpstreamClient
from .validating import RequestValidation, schema_limits

TOOL_MODE_HEADER = "X-Toolmend-Tool-Mode"
REASONING_HEADER = "X-Toolmend-Reasoning"
REPAIRS_HEADER = "X-Toolmend-Repairs"


class ChatMending:
    """Everything tool-call related for one chat request."""

    def __init__(self, settings: Settings, body: dict[str, Any], ctx: RequestContext,
                 headers: Any, backend: str) -> None:
        self.body = body
        self.ctx = ctx
        mode = settings.tool_mode
        asked = (headers.get(TOOL_MODE_HEADER, "") if headers is not None else "").strip().lower()
        if asked in ("buffered", "incremental"):
            mode = asked
        self.mode = mode
        self.fmt = None if settings.tool_format == "auto" else settings.tool_format
        self.tools = body.get("tools")
        asked = headers.get(REASONING_HEADER) if headers is not None else None
        self.reasoning_field = field_for(asked, settings.reasoning_field)
        self.reasoning_signals = ReasoningSignals(
            request=template_switch(body.get("chat_template_kwargs")),
            open_models=tuple(settings.reasoning_open_models),
            closed_models=tuple(settings.reasoning_closed_models))
        #: re-split the server's own reasoning field (see ChatMender): for servers whose
        #: reasoning split is known to be wrong when a call is drafted inside reasoning
        self.resplit_server_reasoning = False
        self.validation = RequestValidation.prepare(body, headers, settings.on_invalid, backend,
                                                    settings.max_retries, mode, ctx,
                                                    schema_limits(settings))

    @classmethod
    def for_request(cls, settings: Settings, body: dict[str, Any], ctx: RequestContext,
                    headers: Any, backend: str) -> ChatMending | None:
        if not body.get("tools"):
            return None  # with tools and tool_choice "none", a call in the reply is a violation
        return cls(settings, body, ctx, headers, backend)

    def mender(self) -> ChatMender:
        v = self.validation
        m = ChatMender(self.fmt, self.tools, mode=self.mode,
                       checker=v.check_call if v else None,
                       reply_checker=v.check_reply if v else None, model_hint=self.ctx.model,
                       single_call=self.body.get("parallel_tool_calls") is False,
                       reasoning_signals=self.reasoning_signals,
                       reasoning_field=self.reasoning_field,
                       resplit_server_reasoning=self.resplit_server_reasoning)
        self.ctx.extra["mender"] = m
        return m

    def finisher(self, up: UpstreamClient, path: str
                 ) -> Callable[[StreamPipeline], Awaitable[bytes]]:
        """Streaming: after the upstream's reply, resolve held calls by retrying."""

        async def finish(pipeline: StreamPipeline) -> bytes:
            mender = self.ctx.extra["mender"]
            assert self.validation is not None
            try:
                chunks, notes = await self.validation.run_retries(mender, up, path, self.body)
            except StreamError as e:
                import orjson

                raise UpstreamStreamError(502, orjson.dumps(e.body), final=True) from None
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
                self.ctx.extra["repair_notes"] = notes_out
            return obj

        return transform


def record(ctx: RequestContext, mender: ChatMender | None) -> None:
    if mender is None or ctx.extra.get("_recorded") is mender:
        return
    ctx.extra["_recorded"] = mender
    ctx.repairs.extend(mender.repairs)
    ctx.tool_names.extend(mender.tool_names)
    ctx.extra["tool_format"] = mender.format
