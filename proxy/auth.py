"""Client API keys: who is calling, what they may ask for, and the HTTP-level limits.

Keys are optional. Without any, toolmend trusts its (loopback) network as before: the agent id
comes from ``X-Agent-Id``. With keys configured, every request outside the health and
observability endpoints needs ``Authorization: Bearer <key>``, and the key decides the agent:

.. code-block:: toml

    [keys."<sha256 hex of the key>"]
    agent = "planner"          # the scheduler's identity for every request with this key
    weight = 2.0               # optional: fair-queue share (as [agents.NAME] weight)
    models = ["qwen3-8b"]      # optional: models this key may ask for (default: any)
    max_tokens = 4096          # optional: cap on max_tokens / max_completion_tokens

Only hashes are stored, so a leaked config file leaks no key. A presented key is hashed and
compared with *every* configured hash with :func:`hmac.compare_digest`, so the time taken says
nothing about which hash, or how much of one, matched.

A keyed client cannot speak for another agent: an ``X-Agent-Id`` that differs from the key's
agent is refused (403 ``agent_id_mismatch``) rather than silently ignored, so a misconfigured
agent framework is noticed instead of being billed to the wrong queue. The request's ``user``
field is never used as the identity of a keyed client.

``max_tokens`` is clamped, not refused: agent frameworks often send a fixed large value they do
not control, and a reply cut at the cap ends with ``finish_reason: "length"``, which every
client understands. A request without ``max_tokens`` gets the cap, so no keyed request can
generate without bound.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .errors import ProxyError

if TYPE_CHECKING:
    from .scheduler import AgentPolicies

log = logging.getLogger("toolmend.auth")

#: Paths reachable without a client key: health probes (no data), and the observability
#: endpoints, which have their own gate (admin key or loopback, see telemetry.py).
OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/toolmend/")
AGENT_HEADER = "X-Agent-Id"
_KEY_FIELDS = {"agent", "weight", "models", "max_tokens"}


@dataclass(frozen=True, slots=True)
class ApiKey:
    """What one configured key grants. ``models`` None: any model."""

    agent: str
    weight: float | None = None
    models: frozenset[str] | None = None
    max_tokens: int | None = None


class KeyRing:
    """The configured key hashes; :meth:`lookup` is constant-time over all of them."""

    def __init__(self, keys: dict[str, ApiKey] | None = None) -> None:
        self._entries = [(bytes.fromhex(h), k) for h, k in (keys or {}).items()]

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[ApiKey]:
        return [k for _, k in self._entries]

    def lookup(self, token: str) -> ApiKey | None:
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found: ApiKey | None = None
        for stored, key in self._entries:  # no early exit: every hash is compared
            if hmac.compare_digest(digest, stored):
                found = key
        return found


def hash_key(key: str) -> str:
    """The hex digest to put in ``[keys."..."]`` for ``key``."""
    return hashlib.sha256(key.encode()).hexdigest()


def keys_from_dict(table: dict[str, Any], source: str = "config") -> KeyRing:
    """Build the ring from the ``keys`` table; errors name the exact key, like config.py's."""
    out: dict[str, ApiKey] = {}
    for digest, entry in table.items():
        where = f"{source}: [keys.\"{digest[:12]}...\"]"
        h = digest.strip().lower()
        if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
            raise ValueError(f"{where}: the table name must be the SHA-256 hex digest of the "
                             "key (64 hex characters), never the key itself")
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a table")
        unknown = set(entry) - _KEY_FIELDS
        if unknown:
            raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r}; one of "
                             f"{sorted(_KEY_FIELDS)}")
        agent = entry.get("agent")
        if not isinstance(agent, str) or not agent:
            raise ValueError(f"{where}: agent is required and must be a string")
        weight = entry.get("weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int | float)
                                   or weight <= 0):
            raise ValueError(f"{where}: weight must be a number greater than 0")
        models = entry.get("models")
        if models is not None and (not isinstance(models, list) or
                                   not all(isinstance(m, str) for m in models)):
            raise ValueError(f"{where}: models must be a list of model names")
        mt = entry.get("max_tokens")
        if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < 1):
            raise ValueError(f"{where}: max_tokens must be a positive integer")
        out[h] = ApiKey(agent[:128], float(weight) if weight is not None else None,
                        frozenset(models) if models is not None else None, mt)
    return KeyRing(out)


def load_keys(path: str | Path | None) -> KeyRing:
    """Read ``[keys."<sha256>"]`` tables from the TOML config (config.py skips sections)."""
    if not path:
        return KeyRing()
    p = Path(path)
    table = tomllib.loads(p.read_text()).get("keys", {})
    if not isinstance(table, dict):
        raise ValueError(f"{p}: 'keys' must be a table of [keys.\"<sha256>\"] sections")
    return keys_from_dict(table, str(p))


def apply_weights(policies: AgentPolicies, ring: KeyRing) -> None:
    """A key's ``weight`` becomes its agent's fair-queue weight (over [agents.NAME] weight)."""
    for key in ring.keys():
        if key.weight is not None:
            policies.by_agent[key.agent] = replace(policies.get(key.agent), weight=key.weight)


# --- per request ------------------------------------------------------------------------------

KEYRING = web.AppKey("keyring", KeyRing)
CLIENT_KEY = web.RequestKey("client_key", ApiKey)


def _unauthorized(message: str) -> ProxyError:
    return ProxyError(401, message, code="invalid_api_key",
                      headers={"WWW-Authenticate": 'Bearer realm="toolmend"'})


@web.middleware
async def require_key(request: web.Request, handler: Any) -> web.StreamResponse:
    """With keys configured, every API path needs a valid key; it is kept on the request.

    Sits inside the error middleware, so its refusals get the OpenAI shape and are logged.
    """
    ring = request.app.get(KEYRING)
    if ring and not request.path.startswith(OPEN_PATHS):
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
        key = ring.lookup(token.strip())
        if key is None:
            raise _unauthorized("the API key is not valid")
        request[CLIENT_KEY] = key
    return await handler(request)


def keyed_agent(request: web.Request) -> str | None:
    """The agent a keyed request runs as (None without keys); refuses a foreign X-Agent-Id."""
    key = request.get(CLIENT_KEY)
    if key is None:
        return None
    claimed = request.headers.get(AGENT_HEADER)
    if claimed is not None and claimed.strip() and claimed.strip()[:128] != key.agent:
        raise ProxyError(403, f"{AGENT_HEADER} {claimed.strip()[:64]!r} does not match the "
                         "agent of this API key", param=AGENT_HEADER, code="agent_id_mismatch")
    return key.agent


def check_body(request: web.Request, body: dict[str, Any]) -> None:
    """The key's model allow-list and ``max_tokens`` cap, once the body is parsed."""
    key = request.get(CLIENT_KEY)
    if key is None:
        return
    if key.models is not None:
        model = body.get("model")
        if not isinstance(model, str) or model not in key.models:
            raise ProxyError(403, f"this API key may not use model {str(model)[:128]!r}; "
                             f"allowed: {sorted(key.models)}", param="model",
                             code="model_not_allowed")
    if key.max_tokens is not None:
        clamp_max_tokens(body, key.max_tokens)


def clamp_max_tokens(body: dict[str, Any], cap: int) -> bool:
    """Lower ``max_tokens`` / ``max_completion_tokens`` to ``cap`` (set it when absent).

    Returns whether the body changed. Values the body checks will refuse are left for them.
    """
    changed = False
    present = False
    for name in ("max_tokens", "max_completion_tokens"):
        v = body.get(name)
        if isinstance(v, int) and not isinstance(v, bool):
            present = True
            if v > cap:
                body[name] = cap
                changed = True
    if not present and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = cap
        changed = True
    return changed


# --- header limits: OpenAI-shaped refusals from the HTTP parser -------------------------------

class _OpenAIErrorHandler(RequestHandler):
    """aiohttp answers requests its parser refuses (a header line over ``max_field_size``,
    too many headers, a broken request line) with a text/plain page before any middleware runs.
    This handler gives those the OpenAI error shape too, and logs only the error class: the
    parser's message may quote the offending header, which can be a credential."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        log.info("refused a request the HTTP parser could not accept: %s",
                 exc.__class__.__name__ if exc else status)
        what = message or ""
        if "header" in what.lower() or "Got more than" in what or "line" in what.lower():
            text = ("request line or headers are over the size limit "
                    "(max_header_bytes) or malformed")
            code = "headers_too_large"
        else:
            text, code = "the request could not be parsed as HTTP", "bad_http_request"
        body = ProxyError(status, text, code=code).body()
        resp = web.Response(status=status, body=orjson.dumps(body),
                            content_type="application/json")
        resp.force_close()
        return resp


class _OpenAIErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _OpenAIErrorHandler(self, loop=self._loop, **self._kwargs)


def shape_parser_errors(runner: web.AppRunner) -> None:
    """Make the runner's low-level server use :class:`_OpenAIErrorHandler` (after setup)."""
    server = runner.server
    if server is not None and type(server) is web.Server:
        server.__class__ = _OpenAIErrorServer
