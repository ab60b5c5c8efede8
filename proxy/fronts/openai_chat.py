"""The OpenAI front: ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``.

The internal request is a chat body already, and the mended reply is a chat stream already, so
this front adds nothing to the path: the raw-bytes fast path of ``parsers/stream.py`` relays
what needs no change untouched.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from toolmend.parsers.anthropic_emit import error_body
from toolmend.parsers.anthropic_wire import anthropic_model, anthropic_models
from toolmend.pipeline.forward import forward, read_json_request
from toolmend.server.errors import ProxyError
from toolmend.server.keys import CTX, SETTINGS, UPSTREAM
from toolmend.server.request_body import check_chat_body, check_completion_body, check_counts

#: the header every Anthropic client sends; it picks Anthropic's shape for the model list
ANTHROPIC_VERSION = "anthropic-version"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json_request(request)
    settings = request.app[SETTINGS]
    check_counts(body, settings.max_messages, settings.max_tools)
    check_chat_body(body)
    return await forward(request, body, "/v1/chat/completions")


async def completions(request: web.Request) -> web.StreamResponse:
    body = await read_json_request(request)
    check_completion_body(body)
    return await forward(request, body, "/v1/completions")


async def models(request: web.Request) -> web.Response:
    """The backend's model list; in Anthropic's shape for Anthropic clients (they send
    ``anthropic-version``), OpenAI's otherwise."""
    up = request.app[UPSTREAM]
    doc = await up.get_json("/v1/models")
    if ANTHROPIC_VERSION in request.headers:
        doc = anthropic_models(doc)
    return web.Response(body=orjson.dumps(doc), content_type="application/json")


async def model(request: web.Request) -> web.Response:
    """One model of the list, by id, in the shape :func:`models` would use."""
    up = request.app[UPSTREAM]
    doc = await up.get_json("/v1/models")
    wanted = request.match_info["model_id"]
    data = doc.get("data") if isinstance(doc, dict) else None
    found = next((m for m in data or () if isinstance(m, dict) and m.get("id") == wanted), None)
    if found is None:
        err = ProxyError(404, f"model {wanted[:128]!r} not found", code="model_not_found",
                         param="model")
        if ANTHROPIC_VERSION in request.headers:
            request[CTX].status, request[CTX].error_code = err.status, err.code
            return web.Response(status=404, body=orjson.dumps(error_body(404, err.message)),
                                content_type="application/json")
        raise err
    if ANTHROPIC_VERSION in request.headers:
        found = anthropic_model(found)
    return web.Response(body=orjson.dumps(found), content_type="application/json")



def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model_id:.+}", model)
