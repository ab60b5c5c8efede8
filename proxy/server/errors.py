"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``.

Agent SDKs map the HTTP status to an exception class and show ``message``; keeping the shape
exact is what makes a toolmend refusal readable to the agent rather than a parse failure.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from toolmend.parsers.sse import DONE_EVENT, encode_event

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ProxyError(Exception):
    """An error with everything needed to answer the client, before or during a stream."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else
                                       "invalid_request_error")
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"message": self.message, "type": self.type, "param": self.param,
                               "code": self.code}
        err.update(self.extra)
        return {"error": err}

    @property
    def closes_connection(self) -> bool:
        """A refusal before the body was read whole (it never arrived, or was refused while
        arriving): the rest is not read, so the connection cannot carry another request.
        aiohttp keeps it alive unless the response is force-closed."""
        return self.headers.get("Connection") == "close"

    def response(self) -> web.Response:
        resp = web.Response(status=self.status, body=orjson.dumps(self.body()),
                            content_type="application/json", headers=self.headers)
        if self.closes_connection:
            resp.force_close()
        return resp

    def sse(self) -> bytes:
        """The in-stream form, once a 200 has been sent: an error event, then ``[DONE]``."""
        return encode_event(orjson.dumps(self.body())) + DONE_EVENT


def bad_request(message: str, param: str | None = None,
                code: str = "invalid_request") -> ProxyError:
    return ProxyError(400, message, param=param, code=code)


def normalize_upstream_error(status: int, raw: bytes) -> ProxyError:
    """Turn whatever error body a backend sent into the OpenAI shape, keeping its status.

    vLLM sends the OpenAI shape (sometimes with ``code`` an int), llama-server
    ``{"error": {"code", "message", "type"}}``, Ollama ``{"error": "text"}``, others plain text.
    """
    message: str | None = None
    code: Any = None
    etype: str | None = None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        err = doc.get("error", doc)
        if isinstance(err, dict):
            message = err.get("message") or err.get("detail") or err.get("msg")
            code = err.get("code")
            etype = err.get("type")
        elif isinstance(err, str):
            message = err
        if message is None and isinstance(doc.get("detail"), str):
            message = doc["detail"]
        if message is None and isinstance(doc.get("message"), str):
            message = doc["message"]
    if message is None:
        text = raw.decode("utf-8", "replace").strip()
        message = text[:2000] or f"upstream returned HTTP {status}"
    if not isinstance(code, str):
        code = "upstream_error"
    return ProxyError(status, f"upstream: {message}", code=code,
                      type=etype if isinstance(etype, str) else None)
