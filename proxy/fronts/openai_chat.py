"""The OpenAI front: ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``.

The internal request is a chat body already, and the mended reply is a chat stream already, so
this front adds nothing to the path: the raw-bytes fast path of ``parsers/stream.py`` relays
what needs no change untouched.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from toolmend.pipeline.forward import forward, read_json_request
from toolmend.server.keys import SETTINGS, UPSTREAM
from toolmend.server.request_body import check_chat_body, check_completion_body, check_counts


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
    up = request.app[UPSTREAM]
    doc = await up.get_json("/v1/models")
    return web.Response(body=orjson.dumps(doc), content_type="application/json")



def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
