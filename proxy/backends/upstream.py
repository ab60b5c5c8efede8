"""The upstream client: one pooled aiohttp session, four timeouts, clear errors.

Timeouts are separate because they guard different failures: ``connect`` (host down),
``first_byte`` (prefill of a long prompt legitimately takes minutes, so it is generous), ``idle``
(a stalled generation mid-stream) and ``total``. aiohttp's ``sock_read`` cannot tell the first
two apart, so the read-side timeouts are enforced here with one ``asyncio.timeout`` per request
that is moved forward as chunks arrive.

Several URLs are replicas of one model. Each request goes to the healthy replica with the fewest
requests in flight through toolmend; a replica that refuses or drops the connection before any
byte of its answer was read is marked down and the request moves to the next one (a periodic
probe brings it back). Once bytes were read, the request stays where it is: restarting would
repeat text the client already has.

With ``ollama_native`` and an Ollama upstream, chat requests go to its native ``/api/chat``: the
body is translated here and the NDJSON answer turned back into OpenAI SSE
(``parsers/ollama.py``), so the relay, mender and retries see the usual stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, NoReturn

import aiohttp
import orjson
from yarl import URL

from toolmend.backends.detect import Detected, detect
from toolmend.backends.http1 import Body, Pool, Response
from toolmend.parsers.ollama import NDJSONChunks, ollama_reply_to_openai, openai_to_ollama_chat
from toolmend.server.bounded import ERROR_BODY_BYTES, read_bounded
from toolmend.server.config import Settings
from toolmend.server.errors import ProxyError, normalize_upstream_error

log = logging.getLogger("toolmend.backends.upstream")

#: Backoff while a backend answers 503 "Loading model": first wait, growth, ceiling (seconds).
LOADING_BACKOFF = (0.25, 2.0, 5.0)


#: Failures that mean "this replica did not take the request": safe to send it elsewhere.
#: (Timeouts are not among them: a slow prefill is not a dead server.)
FAILOVER_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError,
                   aiohttp.ClientOSError)
#: After the headers, before any body byte was used: the same, or the body broke off.
FAILOVER_BODY_ERRORS = (*FAILOVER_ERRORS, aiohttp.ClientPayloadError)
#: get_json failures after which another replica is asked.
FAILOVER_CODES = frozenset({"upstream_unreachable", "upstream_timeout", "upstream_disconnected"})
CHAT_PATH = "/v1/chat/completions"
OLLAMA_CHAT_PATH = "/api/chat"
HEALTH_PATH = "/v1/models"
#: resends on a replica whose connection dropped before any answer (a stale keep-alive)
STALE_RETRIES = 2


def is_loading(status: int, raw: bytes) -> bool:
    """llama-server (and TGI, HF-style servers) answer 503 with "Loading model" while loading."""
    return status == 503 and b"loading" in raw.lower()


@dataclass(slots=True)
class Timeouts:
    connect: float
    first_byte: float
    idle: float
    total: float

    @classmethod
    def from_settings(cls, s: Settings) -> Timeouts:
        return cls(s.connect_timeout, s.first_byte_timeout, s.idle_timeout, s.total_timeout)


@dataclass(slots=True)
class Replica:
    """One upstream URL and what toolmend knows about it."""

    url: str  # without credentials: safe to show in /readyz, logs, errors and traces
    auth: str | None = None  # "Basic ..." from user:password in the configured URL
    in_flight: int = 0  # requests through toolmend right now: the load that routing compares
    healthy: bool = True  # optimistic until it fails: start-up must not wait for a probe
    requests: int = 0
    failures: int = 0
    last_error: str = ""
    checked_at: float = 0.0  # time.time() of the last probe

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.url, "healthy": self.healthy, "in_flight": self.in_flight,
                "requests": self.requests, "failures": self.failures,
                "last_error": self.last_error or None}


def _replica(url: str) -> Replica:
    """A replica for a configured URL; ``user:password@`` moves out of the URL into BasicAuth,
    so that no string toolmend shows anywhere can carry the credentials."""
    parsed = URL(url.rstrip("/"))
    auth = None
    if parsed.user is not None or parsed.password is not None:
        pair = f"{parsed.user or ''}:{parsed.password or ''}".encode()
        auth = "Basic " + base64.b64encode(pair).decode("ascii")
        parsed = parsed.with_user(None)
    return Replica(str(parsed).rstrip("/"), auth)


def redacted(url: str) -> str:
    """``url`` as toolmend shows it anywhere (banner, logs, readyz, traces): without
    ``user:password@``, exactly as its replica's URL."""
    return _replica(url).url


class UpstreamClient:
    """Owns the shared :class:`aiohttp.ClientSession`; closed in the app's ``on_cleanup``."""

    def __init__(self, urls: list[str], settings: Settings) -> None:
        if not urls:
            raise ValueError("at least one upstream URL is needed")
        self.replicas = [_replica(u) for u in urls]
        self.urls = [r.url for r in self.replicas]
        self.timeouts = Timeouts.from_settings(settings)
        self._api_key = settings.api_key
        self._limit = settings.max_connections
        self._session: aiohttp.ClientSession | None = None
        self._pool: Pool | None = None
        self.backend = settings.backend
        self.loading_timeout = settings.loading_timeout
        self.ollama_native = settings.ollama_native
        self.keep_alive = settings.keep_alive
        self.health_interval = settings.health_interval
        self.max_reply_bytes = settings.max_upstream_reply_bytes
        self.max_event_bytes = settings.max_upstream_event_bytes
        self.detected: Detected | None = None
        self._detect_lock = asyncio.Lock()
        self._turn = 0  # rotates ties between equally loaded replicas
        self._tasks: list[asyncio.Task[None]] = []

    # --- replicas ------------------------------------------------------------------------------
    def pick(self, exclude: list[Replica] | tuple[Replica, ...] = ()) -> Replica | None:
        """The replica for the next attempt: healthy first, then fewest in flight; ties rotate
        so that sequential requests spread too. Unhealthy replicas are still offered last (a
        stale verdict must not fail a request that one of them could serve)."""
        n = len(self.replicas)
        if n == 1:
            r = self.replicas[0]
            return None if r in exclude else r
        self._turn = (self._turn + 1) % n
        best: Replica | None = None
        best_key: tuple[int, int, int] | None = None
        for i, r in enumerate(self.replicas):
            if r in exclude:
                continue
            key = (0 if r.healthy else 1, r.in_flight, (i - self._turn) % n)
            if best_key is None or key < best_key:
                best, best_key = r, key
        return best

    def mark_down(self, replica: Replica, reason: str) -> None:
        if replica.healthy and len(self.replicas) > 1:
            log.warning("replica %s is down (%s); routing around it", replica.url, reason)
        replica.healthy = False
        replica.failures += 1
        replica.last_error = reason[:300]

    def mark_up(self, replica: Replica) -> None:
        if not replica.healthy and len(self.replicas) > 1:
            log.info("replica %s answers again", replica.url)
        replica.healthy = True
        replica.last_error = ""

    @property
    def ready_replicas(self) -> int:
        return sum(1 for r in self.replicas if r.healthy)

    async def check_health(self, timeout: float = 2.0) -> None:
        """Probe every replica at once (``GET /v1/models``): any answer below 500 is alive;
        503 (loading) and no answer are not."""

        async def one(r: Replica) -> None:
            try:
                async with asyncio.timeout(timeout):
                    async with self.session.get(r.url + HEALTH_PATH,
                                                headers=self._headers(None, r)) as resp:
                        status = resp.status
                        await read_bounded(resp.content, ERROR_BODY_BYTES)  # only the status counts
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                self.mark_down(r, f"health check: {e.__class__.__name__} {e}".strip())
            else:
                if status >= 500:
                    self.mark_down(r, f"health check: HTTP {status}")
                else:
                    self.mark_up(r)
            r.checked_at = time.time()

        await asyncio.gather(*(one(r) for r in self.replicas))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                await self.check_health()
            except Exception:  # a probe bug must not end the loop
                log.exception("replica health check failed")

    def start(self, *, warmup: bool = False) -> None:
        """Background work from the app's start-up: replica health checks (only when there
        is more than one replica to choose from) and the optional warm-up."""
        loop = asyncio.get_running_loop()
        if len(self.replicas) > 1 and self.health_interval > 0:
            self._tasks.append(loop.create_task(self._health_loop()))
        if warmup:
            self._tasks.append(loop.create_task(self.warmup()))

    async def warmup(self) -> None:
        """Load the model on every replica before the first agent asks.

        Ollama gets its own load request (``/api/chat`` with no messages) carrying
        ``keep_alive``, so a ``-1`` keeps it loaded from the start; other servers get a one-token
        chat request. Failures are logged, never raised: warm-up is an optimization.
        """
        d = await self.detect()
        model = d.model or ""
        if d.kind == "ollama":
            body: dict[str, Any] = {"model": model, "messages": []}
            if self.keep_alive:
                body["keep_alive"] = openai_to_ollama_chat({}, keep_alive=self.keep_alive
                                                           )["keep_alive"]
            path = OLLAMA_CHAT_PATH
            body["stream"] = False
        else:
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                    "stream": False}
            if model:
                body["model"] = model
            path = CHAT_PATH
        raw = orjson.dumps(body)

        async def one(r: Replica) -> None:
            started = time.monotonic()
            try:
                async with UpstreamCall(self, "POST", path, raw, self._headers(None),
                                        replica=r, translate=False) as call:
                    await call.read_all()
                    status = call.status
            except ProxyError as e:
                log.warning("warm-up of %s failed: %s", r.url, e.message)
                return
            log.info("warm-up of %s: HTTP %d in %.2f s", r.url, status,
                     time.monotonic() - started)

        await asyncio.gather(*(one(r) for r in self.replicas))

    async def native_chat(self, path: str) -> bool:
        """Whether ``path`` goes to Ollama's native ``/api/chat`` instead."""
        if not self.ollama_native or path != CHAT_PATH:
            return False
        if self.backend == "ollama":
            return True
        return self.backend == "auto" and (await self.detect()).kind == "ollama"

    async def detect(self, *, refresh: bool = False) -> Detected:
        """The kind of server upstream, probed once and remembered.

        A verdict of ``unknown`` or ``loading`` is not remembered: the server may simply not be
        up yet, and the next ``/readyz`` should look again.
        """
        async with self._detect_lock:
            d = self.detected
            if d is None or refresh or d.loading or d.details.get("reason"):
                d = await detect(self.base_url(), self.backend, session=self.session,
                                 api_key=self._api_key)
                self.detected = d
            return d

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._limit, keepalive_timeout=30,
                                             enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, connect=None,
                                              sock_connect=self.timeouts.connect),
                auto_decompress=True,
                json_serialize=None,  # type: ignore[arg-type]
            )
        return self._session

    @property
    def pool(self) -> Pool:
        """The chat requests' connections (``http1.py``); the small GETs use :attr:`session`."""
        if self._pool is None:
            self._pool = Pool(limit=self._limit, connect_timeout=self.timeouts.connect)
        return self._pool

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def base_url(self) -> str:
        """The replica that probes and small GETs go to first: the first healthy one."""
        return next((r.url for r in self.replicas if r.healthy), self.urls[0])

    def _headers(self, extra: dict[str, str] | None,
                 replica: Replica | None = None) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": "text/event-stream, application/json"}
        if self._api_key:
            h["Authorization"] = f"Bearer {self._api_key}"
        elif replica is not None and replica.auth:
            h["Authorization"] = replica.auth
        if extra:
            h.update(extra)
        return h

    def call(self, path: str, body: bytes, *, headers: dict[str, str] | None = None,
             method: str = "POST") -> UpstreamCall:
        return UpstreamCall(self, method, path, body, self._headers(headers))

    async def get_json(self, path: str, timeout: float = 5.0) -> Any:
        """A small GET with one overall timeout (models list, probes), on the first replica
        that answers."""
        tried: list[Replica] = []
        while True:
            r = self.pick(tried)
            assert r is not None
            tried.append(r)
            try:
                doc = await self._get_json(r.url + path, timeout, r)
            except ProxyError as e:
                if e.code not in FAILOVER_CODES:
                    raise
                self.mark_down(r, e.message)
                if self.pick(tried) is None:
                    raise
                continue
            self.mark_up(r)
            return doc

    async def _get_json(self, url: str, timeout: float, replica: Replica | None = None) -> Any:
        try:
            async with asyncio.timeout(timeout):
                async with self.session.get(url, headers=self._headers(None, replica)) as r:
                    if r.status >= 400:
                        raw, _ = await read_bounded(r.content, ERROR_BODY_BYTES, keep_prefix=True)
                        raise normalize_upstream_error(r.status, raw)
                    raw, whole = await read_bounded(r.content, self.max_reply_bytes)
                    if not whole:
                        raise reply_too_large(url, self.max_reply_bytes)
                    return orjson.loads(raw)
        except ProxyError:
            raise
        except TimeoutError as e:
            raise ProxyError(504, f"upstream {url} did not answer within {timeout} s",
                             code="upstream_timeout") from e
        except aiohttp.ClientError as e:
            raise ProxyError(502, f"upstream {url} unreachable: {e}",
                             code="upstream_unreachable") from e
        except ValueError as e:
            raise ProxyError(502, f"upstream {url} sent invalid JSON",
                             code="upstream_bad_response") from e


class UpstreamCall:
    """One request to the upstream, used as ``async with``; closes the connection on exit.

    Closing rather than releasing matters for client disconnects: an unfinished generation must
    see its socket close at once so the backend stops spending a slot on it.
    """

    __slots__ = ("_adapter", "_body", "_cm", "_deadline", "_early_body", "_fixed", "_headers",
                 "_loop", "_method", "_native", "_next_move", "_owner", "_path", "_phase",
                 "_replica", "_resp", "_started", "_translate_ok", "_tried", "url")

    def __init__(self, owner: UpstreamClient, method: str, path: str, body: bytes,
                 headers: dict[str, str], *, replica: Replica | None = None,
                 translate: bool = True) -> None:
        self._owner = owner
        self._method = method
        self._path = path
        self.url = owner.base_url() + path  # the replica actually used is set on sending
        self._body = body
        self._headers = headers
        self._resp: Response | None = None
        self._early_body: bytes | None = None  # a 503's body, read while deciding to wait
        self._cm: asyncio.Timeout | None = None
        self._phase = "first_byte"
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()
        self._deadline = self._started + owner.timeouts.total
        self._next_move = 0.0
        self._fixed = replica  # warm-up: this replica and no other
        self._replica: Replica | None = None
        self._tried: list[Replica] = []
        self._translate_ok = translate
        self._native = False
        self._adapter: NDJSONChunks | None = None

    @property
    def status(self) -> int:
        assert self._resp is not None
        return self._resp.status

    @property
    def response(self) -> Response:
        assert self._resp is not None
        return self._resp

    @property
    def replica(self) -> Replica | None:
        return self._replica

    async def __aenter__(self) -> UpstreamCall:
        t = self._owner.timeouts
        self._cm = asyncio.timeout_at(min(self._started + t.first_byte, self._deadline))
        await self._cm.__aenter__()
        try:
            if self._translate_ok and await self._owner.native_chat(self._path):
                await self._go_native()
            self._resp = await self._request_when_loaded()
        except BaseException as e:
            err = self._translate(e)
            await self._exit(e)
            if err is e:
                raise
            raise err from e
        return self

    async def _go_native(self) -> None:
        """Rewrite the OpenAI chat body for Ollama's ``/api/chat``."""
        owner = self._owner
        body = orjson.loads(self._body)
        model = None if body.get("model") else (await owner.detect()).model
        native = openai_to_ollama_chat(body, keep_alive=owner.keep_alive, default_model=model)
        self._body = orjson.dumps(native)
        self._path = OLLAMA_CHAT_PATH
        self._native = True
        if native["stream"]:
            self._adapter = _adapter(owner.max_event_bytes)

    def _attach(self, r: Replica) -> None:
        self._replica = r
        r.in_flight += 1
        r.requests += 1
        self.url = r.url + self._path

    def _detach(self) -> None:
        r, self._replica = self._replica, None
        if r is not None:
            r.in_flight -= 1

    async def _request_when_loaded(self) -> Response:
        """Send the request to a replica; fail over while none has taken it; while the
        backend answers 503 "Loading model", try another replica, else wait and resend.

        Nothing has reached the client yet, so all of this is invisible to it apart from time;
        it counts against the first-byte timeout, and the waiting is capped by
        ``loading_timeout``.
        """
        owner = self._owner
        give_up = self._loop.time() + owner.loading_timeout
        delay, growth, ceiling = LOADING_BACKOFF
        loading: Response | None = None
        loading_body = b""
        failed: BaseException | None = None
        stale: dict[int, int] = {}  # id(replica) -> resends after a dropped connection
        resend: Replica | None = None  # the replica to send to again, on a fresh connection
        while True:
            r, resend = (resend, None) if resend is not None else (self._next_replica(), None)
            if r is None:
                if loading is None:  # every replica refused the connection
                    assert failed is not None
                    raise failed
                if owner.loading_timeout <= 0 or self._loop.time() + delay > give_up:
                    self._early_body = loading_body  # read already: error() returns it
                    return loading
                loading.close()
                loading = None
                log.info("upstream %s is loading its model; retrying in %.2f s", self.url, delay)
                await asyncio.sleep(delay)
                delay = min(delay * growth, ceiling)
                self._tried.clear()
                continue
            self._tried.append(r)
            self._attach(r)
            try:
                headers = self._headers
                if r.auth and "Authorization" not in headers:
                    headers = {**headers, "Authorization": r.auth}
                resp = await owner.pool.request(self._method, r.url, self._path, headers,
                                                self._body)
            except FAILOVER_ERRORS as e:
                self._detach()
                if not isinstance(e, aiohttp.ClientConnectorError) and \
                        stale.get(id(r), 0) < STALE_RETRIES:
                    # The connection was made (or taken from the pool) and then dropped before
                    # any answer: typically a keep-alive connection the server had just closed
                    # as idle (llama-server does). The request never reached the model; send
                    # it again on a fresh connection before calling the replica down.
                    stale[id(r)] = stale.get(id(r), 0) + 1
                    self._tried.remove(r)
                    resend = r
                    continue
                owner.mark_down(r, f"{e.__class__.__name__}: {e}")
                failed = e
                continue
            owner.mark_up(r)
            self._early_body = None
            if resp.status == 503:
                raw, _ = await read_bounded(resp.content, ERROR_BODY_BYTES, keep_prefix=True)
                if is_loading(resp.status, raw):
                    if loading is not None:
                        loading.close()
                    loading, loading_body = resp, raw
                    self._detach()
                    continue
                self._early_body = raw  # read already: error() returns it
            if loading is not None:
                loading.close()
            return resp

    def _next_replica(self) -> Replica | None:
        if self._fixed is not None:
            return None if self._fixed in self._tried else self._fixed
        return self._owner.pick(self._tried)

    async def __aexit__(self, et: Any, ev: BaseException | None, tb: Any) -> None:
        await self._exit(ev)

    async def _exit(self, ev: BaseException | None) -> None:
        resp, self._resp = self._resp, None
        if resp is not None:
            if ev is None and resp.content.is_eof():
                resp.release()  # read to the end: the connection goes back to the pool
            else:
                resp.close()  # unfinished: the backend must see the socket close at once
        self._detach()
        cm, self._cm = self._cm, None
        if cm is not None:
            try:
                await cm.__aexit__(type(ev) if ev else None, ev, None)
            except TimeoutError:
                pass  # already turned into a ProxyError by whoever read

    def _translate(self, e: BaseException) -> BaseException:
        t = self._owner.timeouts
        if isinstance(e, aiohttp.ServerTimeoutError):
            return ProxyError(504, f"upstream {self.url}: connect timed out after {t.connect} s",
                              code="upstream_connect_timeout")
        if isinstance(e, TimeoutError) or (isinstance(e, asyncio.CancelledError)
                                           and self._expired()):
            return self._timeout_error()
        if isinstance(e, aiohttp.ClientConnectorError):
            return ProxyError(502, f"upstream {self.url} unreachable: {e.os_error or e}",
                              code="upstream_unreachable")
        if isinstance(e, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError |
                      aiohttp.ClientOSError):
            return ProxyError(502, f"upstream {self.url} closed the connection mid-response: "
                              f"{e.__class__.__name__}", code="upstream_disconnected")
        if isinstance(e, aiohttp.ClientError):
            return ProxyError(502, f"upstream {self.url}: {e}", code="upstream_error")
        return e

    def _expired(self) -> bool:
        cm = self._cm
        return cm is not None and cm.expired()

    def _timeout_error(self) -> ProxyError:
        t = self._owner.timeouts
        if self._loop.time() >= self._deadline - 1e-3:
            return ProxyError(504, f"upstream took longer than the total timeout ({t.total} s)",
                              code="upstream_total_timeout")
        if self._phase == "first_byte":
            return ProxyError(504, f"upstream sent nothing within {t.first_byte} s",
                              code="upstream_first_byte_timeout")
        return ProxyError(504, f"upstream stalled: no data for {t.idle} s",
                          code="upstream_idle_timeout")

    def _moved(self) -> None:
        """Push the idle deadline forward; at most once per 5% of the idle timeout."""
        now = self._loop.time()
        if now < self._next_move:
            return
        idle = self._owner.timeouts.idle
        self._next_move = now + idle * 0.05
        cm = self._cm
        if cm is not None:
            cm.reschedule(min(now + idle, self._deadline))

    async def read_all(self) -> bytes:
        """The whole body; a replica that drops it is failed over (nothing was used yet).

        Bounded: a reply over ``max_upstream_reply_bytes`` is a 502 ``upstream_reply_too_large``
        (and its connection is closed, so the backend stops sending); an error body is cut at
        :data:`ERROR_BODY_BYTES`, since only its status and first words reach the client.
        """
        while True:
            assert self._resp is not None
            try:
                raw = await self._read_body(self._resp)
                break
            except BaseException as e:
                if await self._fail_over(e):
                    continue
                self.raise_failure(e)
        if self._native and self._resp.status < 400:
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return raw  # the relay reports it as not JSON
            if isinstance(doc, dict):
                raw = orjson.dumps(ollama_reply_to_openai(doc, _completion_id(),
                                                          int(time.time())))
        return raw

    async def _read_body(self, resp: Response) -> bytes:
        early, self._early_body = self._early_body, None
        if early is not None:
            return early
        if resp.status >= 400:
            return (await read_bounded(resp.content, ERROR_BODY_BYTES, keep_prefix=True))[0]
        limit = self._owner.max_reply_bytes
        length = resp.content_length
        if length is not None and length > limit:  # no need to read it to know
            raise reply_too_large(self.url, limit)
        raw, whole = await read_bounded(resp.content, limit)
        if not whole:
            raise reply_too_large(self.url, limit)
        return raw

    async def error(self) -> ProxyError:
        """The upstream answered with an error status: read it and normalize it."""
        raw = await self.read_all()
        return normalize_upstream_error(self.status, raw)

    async def chunks(self) -> AsyncIterator[bytes | list[dict[str, Any]]]:
        """Body bytes as they arrive, under the first-byte, idle and total timeouts; from
        Ollama's native API, the chunk objects its NDJSON decodes to (``NDJSONChunks``).

        A replica that drops the connection before its first body byte is failed over like
        one that refused it; after that byte, never (the caller has begun to use the stream).
        """
        assert self._resp is not None
        content = self._resp.content
        adapter = self._adapter
        while True:
            try:
                chunk = await content.readany()
            except BaseException as e:
                if self._phase == "first_byte" and await self._fail_over(e):
                    assert self._resp is not None
                    content = self._resp.content
                    continue
                self.raise_failure(e)
            if not chunk:
                if adapter is not None and (tail := adapter.finish()):
                    yield tail
                return
            if self._phase == "first_byte":
                self._phase = "idle"
            self._moved()
            if adapter is not None:
                objs = adapter.feed(chunk)
                if objs:
                    yield objs
                continue
            yield chunk

    def divertable(self) -> Body | None:
        """The body, for a consumer that takes the chunks from here on as they arrive
        (``Body.divert``; see ``relay.py``), once the first chunk was read through
        :meth:`chunks`; None when the chunks need this call's own reading (Ollama's NDJSON
        objects) or no body is open."""
        if self._adapter is not None or self._resp is None or self._phase != "idle":
            return None
        return self._resp.content

    def moved(self) -> None:
        """A chunk arrived outside :meth:`chunks`: push the idle deadline forward."""
        self._moved()

    def raise_failure(self, e: BaseException) -> NoReturn:
        """Raise what a failure while calling or reading means to the client (a ProxyError
        for the upstream's failures and timeouts), or ``e`` itself; no failover here."""
        err = self._translate(e)
        if err is e:
            raise e
        raise err from e

    async def _fail_over(self, e: BaseException) -> bool:
        """After a drop before the first body byte: resend to another replica, if any."""
        if not isinstance(e, FAILOVER_BODY_ERRORS) or self._fixed:
            return False
        owner = self._owner
        if owner.pick(self._tried) is None:
            return False
        if self._replica is not None:
            owner.mark_down(self._replica, f"dropped before answering: {e.__class__.__name__}")
        if self._resp is not None:
            self._resp.close()
            self._resp = None
        self._detach()
        try:
            self._resp = await self._request_when_loaded()
        except BaseException as e2:
            self.raise_failure(e2)
        if self._resp.status >= 400:
            raise await self.error()
        return True  # the NDJSON adapter has seen nothing yet: it carries over as it is


def reply_too_large(url: str, limit: int) -> ProxyError:
    return ProxyError(502, f"upstream {url} sent a reply over the limit of {limit} bytes "
                      "(max_upstream_reply_bytes)", code="upstream_reply_too_large")


def _completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def _adapter(max_line_bytes: int) -> NDJSONChunks:
    return NDJSONChunks(_completion_id(), int(time.time()), id_prefix="call_"
                       + secrets.token_hex(4) + "_", max_line_bytes=max_line_bytes)
