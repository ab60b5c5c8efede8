"""The APIs agents speak, one module each; their routes are registered here and nowhere else.

Each front module parses its API's requests into the internal chat request plus the caller's
identity, hands them to :func:`toolmend.pipeline.forward.forward` with a client writer that
encodes the reply events in its API's wire format, and shapes errors its API's way. A front has
one entry point, ``add_routes(app)``.
"""

from __future__ import annotations

from aiohttp import web

from toolmend.fronts import ollama, openai_chat

#: in registration order; a new front is one module and one line here
FRONTS = (openai_chat, ollama)


def add_routes(app: web.Application) -> None:
    for front in FRONTS:
        front.add_routes(app)
