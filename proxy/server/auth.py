"""Client API keys: who is calling, what they may ask for, and the HTTP-level limits.

Keys are optional. Without any, toolmend trusts its (loopback) network as before: the agent id
comes from ``X-Agent-Id``. With keys configured, every request outside the health and
observability endpoints needs ``Authorization: Bearer <key>`` (or ``x-api-key: <key>``, as
Anthropic clients send it), and the key decides the agent:

.. code-block:: toml

    [keys."<sha256 hex of the key>"]
    agent = "planner"          # the scheduler's identity for every request with this key
    weight = 2.0               # optional: fair-queue share (as [agents.NAME] weight)
    models = ["qwen3-8b"]      # optional: models this key may ask for (default: any)
    max_tokens = 4096          # optional: cap on the tokens one request may generate

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
generate without bound. The clamp is applied to the internal request every front produces, just
before it is sent (``request_body.cap_output_tokens``), not here on the client's body: a front's
translation (Ollama's ``options.num_predict``) would otherwise override it.

Identity headers (``X-Agent-Id``, ``X-Session-Id``, ...) are checked at the door
(:func:`check_identity_headers`): they end up in logs, session records and span attributes, all
JSON, so bytes that are not UTF-8 text are refused with a 400 naming the header instead of
failing later, for everyone, where they are written.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from toolmend.server.errors import ProxyError

if TYPE_CHECKING:
    from toolmend.scheduling.scheduler import AgentPolicies

log = logging.getLogger("toolmend.server.auth")

#: Paths reachable without a client key: health probes (no data), and the observability
#: endpoints, which have their own gate (admin key or loopback, see telemetry.py).
OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/toolmend/")
AGENT_HEADER = "X-Agent-Id"
SESSION_HEADER = "X-Session-Id"
#: the key header of Anthropic's API (Claude Code, the Anthropic SDKs), checked like Bearer
API_KEY_HEADER = "x-api-key"
#: Request headers whose values toolmend reads and may write into logs, session records, span
#: attributes or error messages: each must be text (see :func:`check_identity_headers`).
#: (``traceparent`` is matched against a hex pattern and ``tracestate`` is dropped when it is
#: not ASCII, as W3C Trace Context says to treat headers that cannot be parsed.)
IDENTITY_HEADERS = (AGENT_HEADER, SESSION_HEADER, "X-Priority", "X-Toolmend-Deadline-Ms",
                    "X-Toolmend-On-Invalid", "X-Toolmend-Tool-Mode",
                    # known clients' own session headers, read by identity.TRUST_TABLE
                    "x-session-affinity", "session-id", "thread-id", "x-codex-turn-metadata",
                    "X-Claude-Code-Session-Id", "baggage")
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
    """With keys configured, every API path needs a valid key; it is kept on the request. Then
    the identity headers are checked (:func:`check_identity_headers`).

    Sits inside the error middleware, so its refusals get the OpenAI shape and are logged.
    """
    if request.path.startswith(OPEN_PATHS):
        return await handler(request)
    ring = request.app.get(KEYRING)
    if ring:
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            token = request.headers.get(API_KEY_HEADER, "")  # Anthropic clients send this
        if not token.strip():
            raise _unauthorized("an API key is required: send 'Authorization: Bearer <key>' "
                                f"or '{API_KEY_HEADER}: <key>'")
        key = ring.lookup(token.strip())
        if key is None:
            raise _unauthorized("the API key is not valid")
        request[CLIENT_KEY] = key
    check_identity_headers(request)
    return await handler(request)


def is_text(value: str) -> bool:
    """Whether a header value is printable text: valid UTF-8 (aiohttp hands undecodable bytes
    over as lone surrogates, which no JSON encoder accepts) and no control characters."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return value.isprintable()


def header_text(request: web.Request, name: str) -> str | None:
    """The header's value when it is text (:func:`is_text`), else None."""
    value = request.headers.get(name)
    return value if value is not None and is_text(value) else None


def check_identity_headers(request: web.Request) -> None:
    """Refuse, with a 400 naming it, an identity header that is not text.

    Checked at the door, before anything reads them: an agent or session id that is not UTF-8
    would otherwise be written into the request log, the session store and span attributes,
    where it fails late (the reply already generated) or for every later reader of
    ``/toolmend/v1/sessions``.
    """
    headers = request.headers
    for name in IDENTITY_HEADERS:
        value = headers.get(name)
        if value is not None and not is_text(value):
            raise ProxyError(400, f"the {name} header must be UTF-8 text without control "
                             "characters", param=name, code="invalid_header")


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
    """The key's model allow-list, once the body is parsed. (Its ``max_tokens`` cap is applied
    later, to the translated request: see :func:`output_cap`.)"""
    key = request.get(CLIENT_KEY)
    if key is None:
        return
    if key.models is not None:
        model = body.get("model")
        if not isinstance(model, str) or model not in key.models:
            raise ProxyError(403, f"this API key may not use model {str(model)[:128]!r}; "
                             f"allowed: {sorted(key.models)}", param="model",
                             code="model_not_allowed")


def output_cap(request: web.Request) -> int | None:
    """The ``max_tokens`` cap of the request's key (None: no key, or a key without a cap)."""
    key = request.get(CLIENT_KEY)
    return key.max_tokens if key is not None else None


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


# --- slow and greedy clients: header timeout, connections per client address ----------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: list[str], option: str = "client_limit_exempt") -> list[Network]:
    """Addresses or CIDR networks from the configuration; errors name the option."""
    out: list[Network] = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{option}: {v!r} is not an IP address or network") from None
    return out


class ConnectionGuard:
    """The server's defence against clients that hold connections without using them.

    ``header_timeout``: seconds from a connection's opening, or from the first byte of a next
    request on a kept-alive one, to the end of that request's headers. A client that trickles
    header lines (slowloris) gets 408 and the connection is closed; aiohttp alone waits for
    ever, one header line at a time. ``max_per_client``: open connections one client address
    may hold; beyond it a new connection gets 429 and is closed at once. Loopback addresses
    (local agents, the load benchmark) and ``exempt`` networks are not counted unless
    ``limit_loopback``.
    """

    def __init__(self, header_timeout: float = 0.0, max_per_client: int = 0, *,
                 limit_loopback: bool = False, exempt: list[Network] | None = None) -> None:
        self.header_timeout = header_timeout
        self.max_per_client = max_per_client
        self.limit_loopback = limit_loopback
        self.exempt = list(exempt or ())
        self.open: dict[str, int] = {}  # counted client address -> open connections
        self.refused = 0
        self.timed_out = 0

    @classmethod
    def from_settings(cls, settings: Any) -> ConnectionGuard:
        return cls(settings.header_timeout, settings.max_client_connections,
                   limit_loopback=settings.limit_loopback_clients,
                   exempt=parse_networks(settings.client_limit_exempt))

    def counted(self, host: str | None) -> bool:
        """Whether connections from ``host`` count against ``max_per_client``."""
        if self.max_per_client <= 0 or not host:
            return False
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False  # a unix socket or the like: not a network client
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if addr.is_loopback and not self.limit_loopback:
            return False
        return not any(addr in net for net in self.exempt)

    def admit(self, host: str) -> bool:
        n = self.open.get(host, 0)
        if n >= self.max_per_client:
            self.refused += 1
            return False
        self.open[host] = n + 1
        return True

    def release(self, host: str) -> None:
        n = self.open.get(host, 0) - 1
        if n > 0:
            self.open[host] = n
        else:
            self.open.pop(host, None)


def _raw_error(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 error response, written straight to a connection that has no request
    object yet (refused on arrival, or its headers never completed)."""
    body = orjson.dumps(ProxyError(status, message, code=code).body())
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class _GuardedHandler(_OpenAIErrorHandler):
    """The connection handler with :class:`ConnectionGuard` applied (see there for why).

    Reads two things of aiohttp's ``RequestHandler`` beyond its public methods: ``_messages``
    (requests whose headers were parsed and not yet handled) and ``_waiter`` (pending while the
    connection waits for its next request)."""

    _tm_guard: ConnectionGuard | None = None
    _tm_host: str | None = None  # set while this connection counts against its address
    _tm_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        guard = getattr(self._manager, "tm_guard", None)
        if guard is None:
            return
        self._tm_guard = guard
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple | list) and peer else None
        if guard.counted(host):
            assert host is not None
            if not guard.admit(host):
                log.debug("refused a connection: %s already holds %d (max_client_connections)",
                          host, guard.max_per_client)
                self._close_with(_raw_error(
                    429, "Too Many Requests", f"this client address already holds "
                    f"{guard.max_per_client} open connections (max_client_connections)",
                    "too_many_connections"))
                return
            self._tm_host = host
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        guard = self._tm_guard
        if guard is None or guard.header_timeout <= 0:
            super().data_received(data)
            return
        parsed = len(self._messages)
        super().data_received(data)
        if len(self._messages) > parsed:  # a request's headers are complete
            self._stop_header_timer()
        elif self._tm_timer is None and data and self._idle():
            self._start_header_timer()  # the first bytes of a next request on a kept-alive one

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_header_timer()
        self._release()
        super().connection_lost(exc)

    def _idle(self) -> bool:
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._messages

    def _start_header_timer(self) -> None:
        guard = self._tm_guard
        if guard is not None and guard.header_timeout > 0:
            self._tm_timer = self._loop.call_later(guard.header_timeout, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        timer, self._tm_timer = self._tm_timer, None
        if timer is not None:
            timer.cancel()

    def _headers_too_slow(self) -> None:
        self._tm_timer = None
        if self._messages or self.transport is None:
            return
        guard = self._tm_guard
        assert guard is not None
        guard.timed_out += 1
        log.debug("closed a connection whose request headers took over %g s (header_timeout)",
                  guard.header_timeout)
        self._close_with(_raw_error(
            408, "Request Timeout", f"the request headers did not arrive within "
            f"{guard.header_timeout:g} s (header_timeout)", "header_timeout"))

    def _close_with(self, response: bytes) -> None:
        # released before the close, so a client that sees the connection end can count on
        # its address having a place again
        self._release()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(response)
        self.force_close()  # close() flushes what was written first

    def _release(self) -> None:
        host, self._tm_host = self._tm_host, None
        if host is not None and self._tm_guard is not None:
            self._tm_guard.release(host)


class _OpenAIErrorServer(web.Server):
    tm_guard: ConnectionGuard | None = None

    def __call__(self) -> RequestHandler:
        cls = _GuardedHandler if self.tm_guard is not None else _OpenAIErrorHandler
        return cls(self, loop=self._loop, **self._kwargs)


def shape_parser_errors(runner: web.AppRunner, guard: ConnectionGuard | None = None) -> None:
    """Make the runner's low-level server use :class:`_OpenAIErrorHandler` (after setup), and
    :class:`_GuardedHandler` when a ``guard`` is given."""
    server = runner.server
    if server is not None and type(server) is web.Server:
        server.__class__ = _OpenAIErrorServer
    if guard is not None and isinstance(server, _OpenAIErrorServer):
        server.tm_guard = guard
