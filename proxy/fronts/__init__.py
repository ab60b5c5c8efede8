"""The APIs agents speak, one module each; their routes are registered here and nowhere else.

Each front module parses its API's requests into the internal chat request plus the caller's
identity, hands them to :func:`toolmend.pipeline.forward.forward` with a client writer that
encodes the reply events in its API's wire format, and shapes errors its API's way. A front has
one entry point, ``add_routes(app)``, and may declare ``ERROR_PATHS`` (path prefixes) with
``error_response(err)``: then every error on those paths — a refused key, an unknown route, a
body over the limit, raised before its handler runs — is answered in that API's shape.
"""

from __future__ import annotations

from aiohttp import web

from toolmend.fronts import anthropic, ollama, openai_chat, responses
from toolmend.server.errors import ProxyError

#: in registration order; a new front is one module and one line here
FRONTS = (openai_chat, ollama, anthropic, responses)


def add_routes(app: web.Application) -> None:
    for front in FRONTS:
        front.add_routes(app)


def error_response(path: str, err: ProxyError) -> web.Response:
    """``err`` in the shape of the API that owns ``path`` (OpenAI's when none claims it)."""
    for front in FRONTS:
        prefixes = getattr(front, "ERROR_PATHS", None)
        if prefixes and path.startswith(prefixes):
            return front.error_response(err)
    return err.response()
