"""The OpenAI Responses API: ``POST /v1/responses`` and ``GET``/``DELETE /v1/responses/{id}``.

Codex CLI speaks only this API, and it is the OpenAI Agents SDK's default. A request is
translated into the internal chat request (``parsers/responses_wire.py``) and handed to the
shared ``forward`` (repair, validation, fair queue, tracing); the client writer,
:class:`ResponsesDownstream`, reads the mended chat stream as reply events and writes the
Responses events (``parsers/responses_emit.py``). ``stream: false`` runs the same streaming
path and answers with the whole response object.

State, both ways the API offers it:

- ``store: false`` with ``include: ["reasoning.encrypted_content"]`` (what Codex sends): each
  reasoning item carries its text signed with toolmend's key (``server/signing.py``) as
  ``encrypted_content``; when it comes back in a later ``input``, toolmend checks the signature
  and shows the reasoning to the backend again. A value that does not verify (another server's,
  or altered) is left out, never refused.
- ``store: true`` (the API's default): the response is kept in a bounded store
  (``responses_store.py``) for ``previous_response_id`` and ``GET``/``DELETE``.

What the backend cannot do is left out and said in headers: ``X-Toolmend-Ignored-Tools``
(tool types), ``X-Toolmend-Ignored-Items`` (history items of those tools),
``X-Toolmend-Dropped-Reasoning`` (reasoning items whose ``encrypted_content`` did not verify).

Errors before the reply starts are OpenAI-shaped with their real status (as the API's own
are); once it has started, and for a tool call that could not be mended, the stream ends with
``response.failed`` carrying the error.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from toolmend.fronts.responses_store import ResponseStore
from toolmend.parsers.reply import ChatReplyDecoder, ReplyEvent, reply_size
from toolmend.parsers.responses_emit import ResponsesEncoder
from toolmend.parsers.responses_wire import (
    ChatTranslation,
    ResponsesRequestError,
    input_items,
    to_chat,
)
from toolmend.parsers.stream import Output
from toolmend.pipeline.downstream import ClientGone, Downstream, WholeReplyBound
from toolmend.pipeline.forward import forward, identify_request, read_json_request
from toolmend.server import auth
from toolmend.server.context import RequestContext
from toolmend.server.errors import ProxyError, bad_request
from toolmend.server.keys import RESPONSES, SETTINGS
from toolmend.server.request_body import check_chat_body, check_counts
from toolmend.server.signing import Signer, app_signer

#: the signature's purpose label: a value signed for another use never opens as reasoning
SEAL_PURPOSE = "responses.reasoning_item"
SEAL_PREFIX = "tm1."
ENCRYPTED_REASONING = "reasoning.encrypted_content"
IGNORED_TOOLS_HEADER = "X-Toolmend-Ignored-Tools"
IGNORED_ITEMS_HEADER = "X-Toolmend-Ignored-Items"
DROPPED_REASONING_HEADER = "X-Toolmend-Dropped-Reasoning"
_SUMMARY_MODES = frozenset({"auto", "concise", "detailed"})
_HEADER_SAFE = re.compile(r"[^A-Za-z0-9_.:-]")
_METADATA_KEYS = 16


# --- encrypted_content ----------------------------------------------------------------------------

def seal(signer: Signer, text: str) -> str:
    """The reasoning as ``tm1.<base64url text>.<HMAC-SHA256>``: opaque to the API's clients,
    which only bring it back, and unforgeable without the key. Not secret: anyone holding the
    value can decode the text (the client was shown the same reasoning in the item)."""
    raw = text.encode()
    encoded = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    return f"{SEAL_PREFIX}{encoded}.{signer.sign(SEAL_PURPOSE, raw)}"


def open_sealed(signer: Signer, value: str) -> str | None:
    """The reasoning text of a value :func:`seal` made with the same key, else ``None``."""
    if not value.startswith(SEAL_PREFIX):
        return None
    encoded, _, mac = value[len(SEAL_PREFIX):].rpartition(".")
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        if not signer.verify(SEAL_PURPOSE, raw, mac):
            return None
        return raw.decode()
    except (binascii.Error, ValueError):  # not base64, or not UTF-8
        return None


# --- POST /v1/responses ------------------------------------------------------------------------

class ResponsesDownstream(Downstream):
    """The client writer: the mended chat stream in, the Responses events out (or, for
    ``stream: false``, the whole response object at the end, bounded like any reply read
    whole by ``max_upstream_reply_bytes``).

    ``response.created`` is written with the first output, so an error before any (a refusal
    in the queue, an upstream failure) still gets its real HTTP status; keep-alives are SSE
    comments, which every Responses client skips. ``on_final`` sees the encoder once the
    outcome is known and before the client can: a client that continues with
    ``previous_response_id`` the moment it reads ``response.completed`` finds it stored."""

    __slots__ = ("_bound", "_decoder", "_on_final", "_opened", "encoder", "whole")

    def __init__(self, request: web.Request, ctx: RequestContext, interval: float,
                 encoder: ResponsesEncoder, *, stream: bool, headers: dict[str, str],
                 on_final: Callable[[ResponsesEncoder], None] | None = None) -> None:
        super().__init__(request, ctx, interval if stream else 0.0)
        self.resp.headers.update(headers)
        self.encoder = encoder
        self.whole = not stream
        # the pipeline feeds it: events in (plain text as the upstream's own bytes when streamed)
        self._decoder = self.reply = ChatReplyDecoder(splice_text=stream)
        self._opened = False
        self._bound = (WholeReplyBound(request.app[SETTINGS].max_upstream_reply_bytes)
                       if self.whole else None)
        self._on_final = on_final

    def encode_reply(self, out: Output) -> bytes:
        events: list[ReplyEvent] = out  # type: ignore[assignment]  # reply mode: events
        if not events:
            return b""
        if self._bound is not None:
            self._bound.add(reply_size(events))
        head = self._open()
        return head + self.encoder.feed(events)

    def _open(self) -> bytes:
        """``response.created`` and ``response.in_progress``, once, before anything else."""
        if self._opened:
            return b""
        self._opened = True
        return self.encoder.start()

    async def fail(self, err: ProxyError) -> web.StreamResponse:
        self.ctx.error_code = err.code
        await self.stop_keepalive()
        # a call that could not be mended is the reply's outcome: response.failed, as the API
        # ends a failed reply; any other error before output keeps its HTTP status, and so
        # does every error of a whole (non-streaming) reply
        if not self.resp.prepared and (self.whole or err.code != "invalid_tool_call"):
            self.ctx.status = err.status
            return err.response()
        if self.ended:
            return self.resp
        self._ended = True
        head = self._open()
        out = head + self.encoder.fail(err.code or "server_error", err.message)
        self._final()
        with contextlib.suppress(ClientGone, ConnectionError, RuntimeError):
            await super().write(out)
            await self.resp.write_eof()
        return self.resp

    async def close(self) -> web.StreamResponse:
        head = self._open()
        out = head + self.encoder.feed(self._decoder.finish()) + self.encoder.finish()
        if self.whole:
            await self.stop_keepalive()
            doc = self.encoder.response()
            if doc["status"] == "failed":  # an error event inside the stream: not kept
                err = doc["error"] or {}
                return await self.fail(ProxyError(502, err.get("message", "reply failed"),
                                                  code=err.get("code")))
            self._final()
            self.ctx.status = 200
            body = orjson.dumps(doc)
            self.ctx.bytes_out += len(body)
            headers = {"X-Request-Id": self.ctx.request_id,
                       **{k: v for k, v in self.resp.headers.items() if k.startswith("X-Toolmend")}}
            if self.encoder.notes:
                headers["X-Toolmend-Repairs"] = _header("; ".join(self.encoder.notes))
            return web.Response(body=body, content_type="application/json", headers=headers)
        self._final()
        await super().write(out)
        return await super().close()

    def _final(self) -> None:
        on_final, self._on_final = self._on_final, None
        if on_final is not None:
            on_final(self.encoder)


async def create_response(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    body = await read_json_request(request, identify=False)
    try:
        items = input_items(body)
        if len(items) > settings.max_messages:
            raise bad_request(f"{len(items)} input items, over the limit of "
                              f"{settings.max_messages} (max_messages)", param="input",
                              code="too_many_messages")
        stream = _flag(body, "stream", False)
        store_it = _flag(body, "store", True)
        include = _include(body)
        metadata = _metadata(body)
        owner = auth.keyed_agent(request)
        store = request.app[RESPONSES]
        prev_id, history, prev_size = _previous(body, store, owner)
        signer: list[Signer] = []  # made on first use: the key file only when needed

        def opener(value: str) -> str | None:
            if not signer:
                signer.append(app_signer(request.app))
            return open_sealed(signer[0], value)

        tr = to_chat(body, history=history, open_reasoning=opener)
    except ResponsesRequestError as e:
        raise bad_request(str(e), param=e.param) from None
    chat = tr.body
    key = body.get("prompt_cache_key")
    identify_request(request, {**chat, "prompt_cache_key": key} if key is not None else chat)
    check_counts(chat, settings.max_messages, settings.max_tools)
    check_chat_body(chat)
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    seal_with = (functools.partial(seal, app_signer(request.app))
                 if ENCRYPTED_REASONING in include else None)
    rid = "resp_" + secrets.token_hex(24)
    encoder = ResponsesEncoder(_base(body, rid, tr, prev_id, store_it, metadata),
                               new_id=_new_id, stream=stream,
                               summary=reasoning.get("summary") in _SUMMARY_MODES,
                               seal=seal_with)
    chat["stream"] = True  # one path for both: a whole reply is the stream, accumulated
    chat["stream_options"] = {"include_usage": True}
    on_final = _keeper(store, rid, [*history, *items], owner,
                       prev_size + len(orjson.dumps(items))) if store_it else None
    headers = _notes(tr)

    def make_down(req: web.Request, c: RequestContext, interval: float) -> Downstream:
        return ResponsesDownstream(req, c, interval, encoder, stream=stream, headers=headers,
                                   on_final=on_final)

    resp = await forward(request, chat, "/v1/chat/completions", make_down)
    if not resp.prepared and resp.status >= 400:
        resp.headers.update(headers)
    return resp


def _keeper(store: ResponseStore, rid: str, items: list[Any], owner: str | None,
            size: int) -> Callable[[ResponsesEncoder], None]:
    """What keeps the response once its outcome is known (``store: true``)."""
    def keep(enc: ResponsesEncoder) -> None:
        doc = enc.response()
        store.put(rid, doc, items, owner, size + len(orjson.dumps(doc)))
    return keep


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ResponsesRequestError(f"'{name}' must be a boolean", name)
    return v


def _include(body: dict[str, Any]) -> list[str]:
    inc = body.get("include")
    if inc is None:
        return []
    if not isinstance(inc, list) or not all(isinstance(x, str) for x in inc):
        raise ResponsesRequestError("'include' must be an array of strings", "include")
    return inc


def _metadata(body: dict[str, Any]) -> dict[str, str]:
    md = body.get("metadata")
    if md is None:
        return {}
    if not isinstance(md, dict) or len(md) > _METADATA_KEYS or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
            for k, v in md.items()):
        raise ResponsesRequestError(f"'metadata' must be an object of at most {_METADATA_KEYS} "
                                    "string values (keys up to 64 characters, values up to 512)",
                                    "metadata")
    return md


def _previous(body: dict[str, Any], store: ResponseStore, owner: str | None
              ) -> tuple[str | None, list[Any], int]:
    prev_id = body.get("previous_response_id")
    if prev_id is None:
        return None, [], 0
    if not isinstance(prev_id, str) or not prev_id:
        raise ResponsesRequestError("'previous_response_id' must be a string",
                                    "previous_response_id")
    entry = store.get(prev_id, owner)
    if entry is None:
        raise ProxyError(404, f"previous response {prev_id[:64]!r} not found: unknown, deleted, "
                         "expired, or made without store (toolmend keeps responses for "
                         "responses_store_ttl seconds, within responses_store_max and "
                         "responses_store_bytes)", param="previous_response_id",
                         code="previous_response_not_found")
    return prev_id, entry.history(), entry.size


def _base(body: dict[str, Any], rid: str, tr: ChatTranslation, prev_id: str | None,
          store: bool, metadata: dict[str, str]) -> dict[str, Any]:
    """The response object's fixed fields: what was asked, echoed as the API does."""
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    text = body.get("text") if isinstance(body.get("text"), dict) else {}
    model = body.get("model")
    return {
        "id": rid, "object": "response", "created_at": int(time.time()),
        "model": model if isinstance(model, str) else "",
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": metadata,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": prev_id,
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "store": store,
        "temperature": body.get("temperature"),
        "text": {"format": text.get("format") or {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": tr.tools,
        "top_p": body.get("top_p"),
        "truncation": "disabled",
        "user": body.get("user"),
        "prompt_cache_key": body.get("prompt_cache_key"),
    }


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def _notes(tr: ChatTranslation) -> dict[str, str]:
    headers: dict[str, str] = {}
    if tr.ignored_tools:
        headers[IGNORED_TOOLS_HEADER] = _names(tr.ignored_tools)
    if tr.ignored_items:
        headers[IGNORED_ITEMS_HEADER] = _names(tr.ignored_items)
    if tr.dropped_reasoning:
        headers[DROPPED_REASONING_HEADER] = str(tr.dropped_reasoning)
    return headers


def _names(names: list[str]) -> str:
    """Client-given type names, made safe for a header."""
    return _header(", ".join(_HEADER_SAFE.sub("?", n[:64]) for n in names[:32]))


def _header(text: str) -> str:
    return text[:4000].replace("\r", " ").replace("\n", " ")


# --- GET / DELETE /v1/responses/{id} -------------------------------------------------------------

def _not_found(rid: str) -> ProxyError:
    return ProxyError(404, f"no stored response with id {rid[:64]!r} (unknown, deleted, expired, "
                      "or made with store: false)", param="response_id", code="not_found")


async def get_response(request: web.Request) -> web.Response:
    rid = request.match_info["id"]
    if request.query.get("stream", "").lower() in ("true", "1"):
        raise bad_request("streaming a stored response again is not supported by toolmend; "
                          "GET it without stream", param="stream")
    entry = request.app[RESPONSES].get(rid, auth.keyed_agent(request))
    if entry is None:
        raise _not_found(rid)
    return web.Response(body=orjson.dumps(entry.response), content_type="application/json")


async def delete_response(request: web.Request) -> web.Response:
    rid = request.match_info["id"]
    store = request.app[RESPONSES]
    if not store.delete(rid, auth.keyed_agent(request), any_owner=False):
        raise _not_found(rid)
    return web.Response(body=orjson.dumps({"id": rid, "object": "response", "deleted": True}),
                        content_type="application/json")


def add_routes(app: web.Application) -> None:
    s = app[SETTINGS]
    app[RESPONSES] = ResponseStore(s.responses_store_max, s.responses_store_bytes,
                                   s.responses_store_ttl)
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses/{id}", get_response)
    app.router.add_delete("/v1/responses/{id}", delete_response)
