"""Glue between a chat request and the sans-I/O mender in ``parsers/mender.py``.

Decides whether a request gets a mender (only when it offers tools: without ``tools`` an agent
cannot receive a call, and a ``<tool_call>`` in the text is the model's own business), which
format and mode apply, and copies the mender's findings onto the request context for logs,
metrics and traces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config import Settings
from .context import RequestContext
from .parsers.mender import CallChecker, ChatMender, mend_message

TOOL_MODE_HEADER = "X-Toolmend-Tool-Mode"


def make_mender(settings: Settings, body: dict[str, Any], ctx: RequestContext,
                headers: Any = None, checker: CallChecker | None = None) -> ChatMender | None:
    tools = body.get("tools")
    if not tools or body.get("tool_choice") == "none":
        return None
    mode = settings.tool_mode
    if headers is not None:
        asked = headers.get(TOOL_MODE_HEADER, "").strip().lower()
        if asked in ("buffered", "incremental"):
            mode = asked
    fmt = None if settings.tool_format == "auto" else settings.tool_format
    mender = ChatMender(fmt, tools, mode=mode, checker=checker, model_hint=ctx.model)
    ctx.extra["mender"] = mender
    return mender


def json_transform(settings: Settings, body: dict[str, Any], ctx: RequestContext,
                   checker: CallChecker | None = None
                   ) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    """Non-streaming: mend ``choices[*].message`` the same way the stream is mended."""
    tools = body.get("tools")
    if not tools or body.get("tool_choice") == "none":
        return None
    fmt = None if settings.tool_format == "auto" else settings.tool_format

    def transform(obj: dict[str, Any]) -> dict[str, Any]:
        model = obj.get("model") if isinstance(obj.get("model"), str) else ctx.model
        for choice in obj.get("choices") or ():
            msg = choice.get("message") if isinstance(choice, dict) else None
            if not isinstance(msg, dict):
                continue
            new, finish, mender = mend_message(msg, choice.get("finish_reason"), fmt, tools,
                                               checker, model=model)
            choice["message"] = new
            choice["finish_reason"] = finish
            record(ctx, mender)
        return obj

    return transform


def record(ctx: RequestContext, mender: ChatMender | None) -> None:
    if mender is None:
        return
    ctx.repairs.extend(mender.repairs)
    ctx.tool_names.extend(mender.tool_names)
    ctx.extra["tool_format"] = mender.format
