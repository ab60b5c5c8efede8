"""The Anthropic Messages front: ``/v1/messages`` (Claude Code, the Anthropic SDKs) on any backend.

Each request is translated into an OpenAI chat body (``parsers/anthropic_wire.py``) and handed
to the same ``forward`` as ``/v1/chat/completions``, so repair, validation, the output cap, fair
queuing and tracing all apply; the client writer is :class:`MessagesDownstream`, which reads the
mended chat stream as reply events (``ChatReplyDecoder``) and writes Anthropic's event sequence
(``parsers/anthropic_emit.py``). Non-streaming requests run the same streaming path and are
answered with the accumulated message.

Also here: ``/v1/messages/count_tokens`` (the backend's tokenizer where it has one, else an
estimate that says so in ``X-Toolmend-Token-Count``), and Anthropic's error shape for every
error on these paths, before the stream starts (with the status) and as the ``error`` event
after. Thinking blocks are signed with the app's key (``server/signing.py``), so a block that
comes back is shown to the backend only when toolmend itself signed it.
"""

from __future__ import annotations

import contextlib
import secrets
from typing import Any

import orjson
from aiohttp import web

from toolmend.parsers.anthropic_emit import MessagesEncoder, error_body
from toolmend.parsers.anthropic_wire import (
    THINKING_PURPOSE,
    AnthropicRequestError,
    Translated,
    messages_to_openai,
)
from toolmend.parsers.reply import ChatReplyDecoder, ReplyEvent, reply_size
from toolmend.parsers.stream import Output
from toolmend.pipeline.downstream import ClientGone, Downstream, WholeReplyBound
from toolmend.pipeline.forward import forward, read_json_request
from toolmend.server.context import RequestContext
from toolmend.server.errors import ProxyError, normalize_upstream_error
from toolmend.server.keys import CTX, SETTINGS, UPSTREAM
from toolmend.server.request_body import check_chat_body, check_counts
from toolmend.server.signing import app_signer

#: errors on these paths take Anthropic's shape, wherever they are raised (fronts/__init__.py)
ERROR_PATHS = ("/v1/messages",)
#: lists what the request held that toolmend accepted and ignored
IGNORED_HEADER = "X-Toolmend-Ignored"
#: ``tokenizer`` (the backend counted) or ``estimate`` (about four characters a token)
COUNT_HEADER = "X-Toolmend-Token-Count"


def new_tool_id() -> str:
    return "toolu_" + secrets.token_hex(12)


def anthropic_error(err: ProxyError) -> web.Response:
    """``{"type": "error", "error": {...}}`` with the error's status."""
    extra = {"code": err.code, **err.extra}
    resp = web.Response(status=err.status, body=orjson.dumps(error_body(err.status, err.message,
                                                                        extra)),
                        content_type="application/json", headers=err.headers)
    if err.closes_connection:  # the body was not read whole: the connection is not reusable
        resp.force_close()
    return resp


error_response = anthropic_error


class MessagesDownstream(Downstream):
    """The client writer for ``/v1/messages``: Anthropic SSE events (``ping`` while waiting)
    or, for ``stream: false``, one message object at the end.

    A whole reply is gathered in memory, so what it gathers is bounded like any reply read
    whole (``max_upstream_reply_bytes``, counted on the stream fed in)."""

    __slots__ = ("_bound", "decoder", "encoder", "extra_headers", "whole")

    def __init__(self, request: web.Request, ctx: RequestContext, encoder: MessagesEncoder,
                 *, stream: bool, interval: float, headers: dict[str, str]) -> None:
        super().__init__(request, ctx, interval if stream else 0.0)
        self.resp.headers.update(headers)
        self.extra_headers = headers
        # the pipeline feeds it: events in (plain text as the upstream's own bytes when streamed)
        self.decoder = self.reply = ChatReplyDecoder(splice_text=stream)
        self.encoder = encoder
        self.whole = not stream
        self._bound = (WholeReplyBound(request.app[SETTINGS].max_upstream_reply_bytes)
                       if self.whole else None)

    def encode_reply(self, out: Output) -> bytes:
        events: list[ReplyEvent] = out  # type: ignore[assignment]  # reply mode: events
        if self._bound is not None:
            self._bound.add(reply_size(events))
        data = self.encoder.feed(events)
        return b"" if self.whole else data

    def keepalive_bytes(self) -> bytes:
        """Anthropic's own ``ping`` instead of an SSE comment, until the first token."""
        return self.encoder.ping()

    async def fail(self, err: ProxyError) -> web.StreamResponse:
        self.ctx.error_code = err.code
        await self.stop_keepalive()
        if not self.resp.prepared:
            self.ctx.status = err.status
            resp = anthropic_error(err)
            resp.headers.update(self.extra_headers)
            return resp
        if self._ended:
            return self.resp
        self._ended = True
        with contextlib.suppress(ClientGone, ConnectionError, RuntimeError):
            await self.write(self.encoder.error(err.status, err.message,
                                                   {"code": err.code, **err.extra}))
            await self.resp.write_eof()
        return self.resp

    async def close(self) -> web.StreamResponse:
        await self.stop_keepalive()
        tail = self.encoder.feed(self.decoder.finish())
        failure = self.encoder.failure
        if self.whole and failure is not None:  # no half reply: the error, with its status
            self.ctx.status, self.ctx.error_code = failure.status, failure.code
            return await self.fail(ProxyError(failure.status, failure.message,
                                              code=failure.code))
        if self.whole:
            self.ctx.status = 200
            raw = orjson.dumps(self.encoder.message())
            self.ctx.bytes_out += len(raw)
            headers = {"X-Request-Id": self.ctx.request_id, **self.extra_headers}
            if self.encoder.notes:
                headers["X-Toolmend-Repairs"] = "; ".join(self.encoder.notes)[:4000] \
                    .replace("\n", " ")
            return web.Response(body=raw, content_type="application/json", headers=headers)
        tail += self.encoder.finish()
        if tail:
            await super().write(tail)
        return await super().close()


def _translate(request: web.Request, body: dict[str, Any], *, count_only: bool = False
               ) -> Translated:
    try:
        tr = messages_to_openai(body, _checker(request.app), count_only=count_only)
    except AnthropicRequestError as e:
        raise ProxyError(400, str(e), param=e.param, code="invalid_request") from None
    # Claude Code asks for Anthropic's model names (claude-...); the backend serves its own
    detected = request.app[UPSTREAM].detected
    model = tr.body.get("model")
    if detected is not None and detected.model and (not model or model.startswith("claude-")):
        tr.body["model"] = detected.model
    settings = request.app[SETTINGS]
    check_counts(tr.body, settings.max_messages, settings.max_tools)
    check_chat_body(tr.body)
    return tr


def _checker(app: web.Application) -> Any:
    """Verifies a thinking signature; the key is loaded only when one comes back."""
    def check(data: bytes, mac: str) -> bool:
        return app_signer(app).verify(THINKING_PURPOSE, data, mac)
    return check


def _mac(app: web.Application) -> Any:
    """Signs thinking text; the key is loaded only when there is thinking to sign."""
    def mac(data: bytes) -> str:
        return app_signer(app).sign(THINKING_PURPOSE, data)
    return mac


def _headers(ctx: RequestContext, tr: Translated) -> dict[str, str]:
    headers = {"request-id": ctx.request_id}  # where the Anthropic SDKs look for it
    ignored = list(tr.ignored)
    if tr.dropped_thinking:
        ignored.append(f"{tr.dropped_thinking} thinking blocks not signed by toolmend")
    if ignored:
        # names the client chose (fields, block types): printable ASCII only in a header
        text = ", ".join(ignored)[:2000]
        headers[IGNORED_HEADER] = "".join(c if " " <= c <= "~" else "?" for c in text)
    return headers


async def messages(request: web.Request) -> web.StreamResponse:
    ctx: RequestContext = request[CTX]
    body = await read_json_request(request)
    tr = _translate(request, body)
    chat = tr.body
    asked = body.get("model")
    encoder = MessagesEncoder(
        "msg_" + secrets.token_hex(12),
        asked if isinstance(asked, str) and asked else chat.get("model", ""),
        mac=_mac(request.app), new_tool_id=new_tool_id, stream=tr.stream, thinking=tr.thinking,
        hide_thinking=tr.hide_thinking, stop_sequences=tr.stop_sequences,
        input_estimate=(request.content_length or 0) // 4)
    chat["stream"] = True  # one path for both: a whole reply is a stream accumulated
    chat["stream_options"] = {"include_usage": True}  # message_delta's counts
    headers = _headers(ctx, tr)

    def make_down(req: web.Request, c: RequestContext, interval: float) -> Downstream:
        return MessagesDownstream(req, c, encoder, stream=tr.stream, interval=interval,
                                  headers=headers)

    return await forward(request, chat, "/v1/chat/completions", make_down)


# --- count_tokens ---------------------------------------------------------------------------
async def _post(request: web.Request, path: str, doc: dict[str, Any]) -> Any:
    up = request.app[UPSTREAM]
    async with up.call(path, orjson.dumps(doc)) as call:
        raw = await call.read_all()
        status = call.status
    if status >= 400:
        raise normalize_upstream_error(status, raw)
    return orjson.loads(raw)


async def _tokenizer_count(request: web.Request, chat: dict[str, Any]) -> int | None:
    """The prompt's tokens by the backend's own tokenizer and chat template: vLLM's chat
    ``/tokenize``; llama-server's ``/apply-template`` then ``/tokenize``. None elsewhere, or
    when the backend refuses."""
    kind = (await request.app[UPSTREAM].detect()).kind
    doc: dict[str, Any] = {"messages": chat["messages"]}
    if chat.get("tools"):
        doc["tools"] = chat["tools"]
    try:
        if kind == "vllm":
            if chat.get("model"):
                doc["model"] = chat["model"]
            got = await _post(request, "/tokenize", {**doc, "add_generation_prompt": True})
            count = got.get("count") if isinstance(got, dict) else None
            return count if isinstance(count, int) else None
        if kind == "llamacpp":
            tpl = await _post(request, "/apply-template", doc)
            prompt = tpl.get("prompt") if isinstance(tpl, dict) else None
            if not isinstance(prompt, str):
                return None
            got = await _post(request, "/tokenize", {"content": prompt})
            tokens = got.get("tokens") if isinstance(got, dict) else None
            return len(tokens) if isinstance(tokens, list) else None
    except (ProxyError, orjson.JSONDecodeError):
        return None
    return None


def estimate_tokens(chat: dict[str, Any]) -> int:
    """About four characters a token, over the messages and tools as JSON."""
    raw = orjson.dumps({"messages": chat["messages"], "tools": chat.get("tools") or []})
    return max(1, len(raw) // 4)


async def count_tokens(request: web.Request) -> web.Response:
    body = await read_json_request(request)
    chat = _translate(request, body, count_only=True).body
    count = await _tokenizer_count(request, chat)
    how = "tokenizer"
    if count is None:
        count, how = estimate_tokens(chat), "estimate"
    return web.Response(body=orjson.dumps({"input_tokens": count}),
                        content_type="application/json",
                        headers={COUNT_HEADER: how, "request-id": request[CTX].request_id})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
