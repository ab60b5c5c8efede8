"""The upstream client: one pooled aiohttp session, four timeouts, clear errors.

Timeouts are separate because they guard different failures: ``connect`` (host down),
``first_byte`` (prefill of a long prompt legitimately takes minutes, so it is generous), ``idle``
(a stalled generation mid-stream) and ``total``. aiohttp's ``sock_read`` cannot tell the first
two apart, so the read-side timeouts are enforced here with one ``asyncio.timeout`` per request
that is moved forward as chunks arrive.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from .config import Settings
from .detect import Detected, detect
from .errors import ProxyError, normalize_upstream_error

log = logging.getLogger("toolmend.upstream")

#: Backoff while a backend answers 503 "Loading model": first wait, growth, ceiling (seconds).
LOADING_BACKOFF = (0.25, 2.0, 5.0)


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


class UpstreamClient:
    """Owns the shared :class:`aiohttp.ClientSession`; closed in the app's ``on_cleanup``."""

    def __init__(self, urls: list[str], settings: Settings) -> None:
        if not urls:
            raise ValueError("at least one upstream URL is needed")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeouts = Timeouts.from_settings(settings)
        self._api_key = settings.api_key
        self._limit = settings.max_connections
        self._session: aiohttp.ClientSession | None = None
        self.backend = settings.backend
        self.loading_timeout = settings.loading_timeout
        self.detected: Detected | None = None
        self._detect_lock = asyncio.Lock()

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

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def base_url(self) -> str:
        return self.urls[0]

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": "text/event-stream, application/json"}
        if self._api_key:
            h["Authorization"] = f"Bearer {self._api_key}"
        if extra:
            h.update(extra)
        return h

    def call(self, path: str, body: bytes, *, headers: dict[str, str] | None = None,
             method: str = "POST") -> UpstreamCall:
        return UpstreamCall(self, method, self.base_url() + path, body, self._headers(headers))

    async def get_json(self, path: str, timeout: float = 5.0) -> Any:
        """A small GET with one overall timeout (models list, probes)."""
        url = self.base_url() + path
        try:
            async with asyncio.timeout(timeout):
                async with self.session.get(url, headers=self._headers(None)) as r:
                    raw = await r.read()
                    if r.status >= 400:
                        raise normalize_upstream_error(r.status, raw)
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

    __slots__ = ("_body", "_cm", "_deadline", "_headers", "_loop", "_method", "_next_move",
                 "_owner", "_phase", "_resp", "_started", "url")

    def __init__(self, owner: UpstreamClient, method: str, url: str, body: bytes,
                 headers: dict[str, str]) -> None:
        self._owner = owner
        self._method = method
        self.url = url
        self._body = body
        self._headers = headers
        self._resp: aiohttp.ClientResponse | None = None
        self._cm: asyncio.Timeout | None = None
        self._phase = "first_byte"
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()
        self._deadline = self._started + owner.timeouts.total
        self._next_move = 0.0

    @property
    def status(self) -> int:
        assert self._resp is not None
        return self._resp.status

    @property
    def response(self) -> aiohttp.ClientResponse:
        assert self._resp is not None
        return self._resp

    async def __aenter__(self) -> UpstreamCall:
        t = self._owner.timeouts
        self._cm = asyncio.timeout_at(min(self._started + t.first_byte, self._deadline))
        await self._cm.__aenter__()
        try:
            self._resp = await self._request_when_loaded()
        except BaseException as e:
            err = self._translate(e)
            await self._exit(e)
            if err is e:
                raise
            raise err from e
        return self

    async def _request_when_loaded(self) -> aiohttp.ClientResponse:
        """Send the request; while the backend answers 503 "Loading model", wait and resend.

        Nothing has reached the client yet, so waiting is invisible to it apart from time; the
        wait counts against the first-byte timeout and is capped by ``loading_timeout``.
        """
        owner = self._owner
        give_up = self._loop.time() + owner.loading_timeout
        delay, growth, ceiling = LOADING_BACKOFF
        while True:
            resp = await owner.session.request(self._method, self.url, data=self._body,
                                               headers=self._headers)
            if resp.status != 503 or owner.loading_timeout <= 0:
                return resp
            raw = await resp.read()  # cached on the response: error() can read it again
            if not is_loading(resp.status, raw) or self._loop.time() + delay > give_up:
                return resp
            resp.close()
            log.info("upstream %s is loading its model; retrying in %.2f s", self.url, delay)
            await asyncio.sleep(delay)
            delay = min(delay * growth, ceiling)

    async def __aexit__(self, et: Any, ev: BaseException | None, tb: Any) -> None:
        await self._exit(ev)

    async def _exit(self, ev: BaseException | None) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None
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
        assert self._resp is not None
        try:
            return await self._resp.read()
        except BaseException as e:
            err = self._translate(e)
            if err is e:
                raise
            raise err from e

    async def error(self) -> ProxyError:
        """The upstream answered with an error status: read it and normalize it."""
        raw = await self.read_all()
        return normalize_upstream_error(self.status, raw)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive, under the first-byte, idle and total timeouts."""
        assert self._resp is not None
        content = self._resp.content
        while True:
            try:
                chunk = await content.readany()
            except BaseException as e:
                err = self._translate(e)
                if err is e:
                    raise
                raise err from e
            if not chunk:
                return
            if self._phase == "first_byte":
                self._phase = "idle"
            self._moved()
            yield chunk
