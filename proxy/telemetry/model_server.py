"""The model-server metrics protocol, spoken for any backend.

The inference gateway's endpoint picker (Gateway API Inference Extension; llm-d's inference
scheduler) decides where a request goes from each model server's Prometheus ``/metrics``: by
default vLLM's names, ``vllm:num_requests_waiting`` (requests queued), ``vllm:num_requests_running``
and ``vllm:kv_cache_usage_perc`` (0 to 1), plus ``vllm:lora_requests_info`` and
``vllm:cache_config_info`` read from their labels. Its flags ``--total-queued-requests-metric``,
``--total-running-requests-metric``, ``--kv-cache-usage-percentage-metric``,
``--lora-info-metric`` and ``--cache-info-metric`` point it at other names.

A toolmend sidecar answers under those names for whatever is behind it, so a llama-server or
Ollama pod becomes schedulable, and a vLLM pod's saturation includes the requests waiting in
toolmend's own queue, which vLLM cannot see:

- waiting: toolmend's queue plus the backend's own queue (when it says; else nothing more);
- running: the backend's running requests when it says, else the requests toolmend has sent it;
- KV-cache usage: the backend's, only where it reports one (vLLM, SGLang, llama-server builds
  that export ``llamacpp:kv_cache_usage_ratio``); never invented.

The backend is read in the background every ``backend_load_interval`` seconds (its ``/metrics``;
llama-server's ``/slots`` when its ``/metrics`` is off), never on the scrape's path: the picker
scrapes every 50 ms. A reading older than a few intervals counts as unknown. The same numbers go
out under toolmend's own names (``toolmend_requests_waiting``, ``toolmend_backend_*``).

Parsing is a pure function of the text (:func:`parse_metrics`, :func:`parse_slots`): only the
lines of the families read here reach prometheus-client's parser, so a vLLM scrape of a few
hundred kilobytes of histograms costs a line scan.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from toolmend.server import auth
from toolmend.server.bounded import read_bounded
from toolmend.server.errors import ProxyError
from toolmend.server.keys import SCHEDULER, SETTINGS, UPSTREAM
from toolmend.telemetry import names as n

if TYPE_CHECKING:
    from toolmend.backends.upstream import Replica

log = logging.getLogger("toolmend.telemetry.model_server")

#: The families read from a backend, first present wins (vLLM, SGLang, llama-server, TGI).
WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs", "llamacpp:requests_deferred",
           "tgi_queue_size")
RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs",
           "llamacpp:requests_processing", "tgi_batch_current_size")
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage",
            "llamacpp:kv_cache_usage_ratio")
PASSED_ON = (n.MSP_LORA_INFO, n.MSP_CACHE_INFO)  # relayed with their labels, as vLLM wrote them
_WANTED = frozenset(WAITING + RUNNING + KV_USAGE + PASSED_ON)
#: Backends that have no load endpoint at all: not asked.
NO_LOAD_ENDPOINT = frozenset({"ollama", "embedded", "llama-cpp-python"})
MAX_METRICS_BYTES = 8 * 1024 * 1024  # a vLLM scrape with many models stays far below
MAX_LABELS = 16
MAX_LABEL_CHARS = 1024
UNSUPPORTED_RETRY = 60.0  # seconds before asking again a path that answered 404/405/501
STALE_INTERVALS = 5  # a reading older than this many intervals (and 3 s) is unknown


@dataclass(frozen=True, slots=True)
class BackendLoad:
    """What a backend said about its own load; None: it did not say."""

    waiting: float | None = None
    running: float | None = None
    kv_usage: float | None = None  # 0 to 1
    lora: tuple[dict[str, str], float] | None = None  # labels and value of lora_requests_info
    cache_info: dict[str, str] | None = None  # labels of cache_config_info

    def merged(self, other: BackendLoad) -> BackendLoad:
        """This reading, with what it lacks taken from ``other`` (another source, same server)."""
        return BackendLoad(
            self.waiting if self.waiting is not None else other.waiting,
            self.running if self.running is not None else other.running,
            self.kv_usage if self.kv_usage is not None else other.kv_usage,
            self.lora or other.lora, self.cache_info or other.cache_info)


def _select(text: str) -> str:
    """Only the lines (samples, TYPE and HELP) of the families read here."""
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("TYPE", "HELP") and parts[2] in _WANTED:
                out.append(line)
            continue
        name = line.split("{", 1)[0].split(None, 1)
        if name and name[0] in _WANTED:
            out.append(line)
    return "\n".join(out) + "\n"


def _bounded_labels(labels: dict[str, str]) -> dict[str, str]:
    return {k[:64]: str(v)[:MAX_LABEL_CHARS] for k, v in list(labels.items())[:MAX_LABELS]}


def parse_metrics(text: str) -> BackendLoad:
    """A backend's load from its Prometheus text; whatever cannot be read stays None."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    try:
        for family in text_string_to_metric_families(_select(text)):
            for s in family.samples:
                if s.name in _WANTED and math.isfinite(s.value):
                    samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    except Exception:  # the parser's errors are not one class; garbage reads as "unknown"
        log.debug("unreadable backend metrics", exc_info=True)
        return BackendLoad()

    def total(names: tuple[str, ...]) -> float | None:
        for name in names:
            if name in samples:
                return float(sum(max(0.0, v) for _, v in samples[name]))
        return None

    kv = None
    for name in KV_USAGE:
        if name in samples:  # several engines (data parallel): the fullest one
            kv = min(1.0, max(0.0, max(v for _, v in samples[name])))
            break
    lora = None
    if n.MSP_LORA_INFO in samples:  # the value is a timestamp: the latest one
        labels, value = max(samples[n.MSP_LORA_INFO], key=lambda lv: lv[1])
        lora = (_bounded_labels(labels), value)
    cache = samples.get(n.MSP_CACHE_INFO)
    return BackendLoad(total(WAITING), total(RUNNING), kv, lora,
                       _bounded_labels(cache[0][0]) if cache else None)


def parse_slots(raw: bytes) -> BackendLoad:
    """llama-server's ``/slots``: running is the count of busy slots (its queue is not there)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return BackendLoad()
    if not isinstance(doc, list) or not all(isinstance(s, dict) for s in doc):
        return BackendLoad()
    busy = 0
    for slot in doc:
        state = slot.get("is_processing", slot.get("state"))
        busy += state is True or (isinstance(state, int) and not isinstance(state, bool)
                                  and state != 0)
    return BackendLoad(running=float(busy))


def combine(loads: list[BackendLoad]) -> BackendLoad:
    """Replicas of one model: queues and running requests add up; KV is the fullest one's."""
    def add(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return float(sum(known)) if known else None

    kv = [x.kv_usage for x in loads if x.kv_usage is not None]
    return BackendLoad(add([x.waiting for x in loads]), add([x.running for x in loads]),
                       max(kv) if kv else None,
                       next((x.lora for x in loads if x.lora), None),
                       next((x.cache_info for x in loads if x.cache_info), None))


# --- reading the backend ----------------------------------------------------------------------

class LoadReader:
    """Reads every replica's load in the background, on connections of its own that close
    after each read: never the requests' pool (a probe connection can never be one a request
    picks up stale), and no idle connection held open at the backend between reads."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        settings = app[SETTINGS]
        self.interval = settings.backend_load_interval
        self._api_key = settings.api_key
        self.load: BackendLoad | None = None
        self.read_at: float | None = None  # loop.time() of the last reading that said anything
        self.reads = 0
        self._unsupported: dict[str, float] = {}  # URL -> loop time to ask again
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    def current(self, now: float) -> BackendLoad | None:
        """The last reading, unless it is stale (the backend stopped answering)."""
        if self.load is None or self.read_at is None:
            return None
        if self.interval > 0 and now - self.read_at > max(3.0, STALE_INTERVALS * self.interval):
            return None
        return self.load

    def start(self) -> None:
        if self.interval > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # a reader that dies would silently freeze the numbers
                log.warning("reading the backend's load failed", exc_info=True)
            await asyncio.sleep(self.interval)

    async def refresh(self) -> BackendLoad | None:
        """Read every replica once now; keeps and returns the combined reading (None when no
        replica said anything)."""
        up = self.app[UPSTREAM]
        detected = up.detected
        kind = detected.kind if detected is not None else self.app[SETTINGS].backend
        if kind in NO_LOAD_ENDPOINT:
            return None
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=4, force_close=True),
                timeout=aiohttp.ClientTimeout(total=max(1.0, min(5.0, 2 * self.interval))))
        loads = await asyncio.gather(*(self._read(r) for r in up.replicas))
        said = [x for x in loads if x is not None]
        self.reads += 1
        if not said:
            return None
        self.load = combine(said)
        self.read_at = asyncio.get_running_loop().time()
        return self.load

    async def _read(self, replica: Replica) -> BackendLoad | None:
        raw = await self._get(replica, "/metrics")
        load = parse_metrics(raw.decode("utf-8", "replace")) if raw is not None else None
        if load is None or load.running is None:  # llama-server without --metrics
            slots = await self._get(replica, "/slots")
            if slots is not None:
                load = (load or BackendLoad()).merged(parse_slots(slots))
        if load is None or load == BackendLoad():
            return None
        return load

    async def _get(self, replica: Replica, path: str) -> bytes | None:
        url = replica.url + path
        now = asyncio.get_running_loop().time()
        if self._unsupported.get(url, 0.0) > now:
            return None
        headers = {}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        elif replica.auth:
            headers["Authorization"] = replica.auth
        assert self._session is not None
        try:
            async with self._session.get(url, headers=headers) as r:
                if r.status in (404, 405, 501):
                    self._unsupported[url] = now + UNSUPPORTED_RETRY
                    return None
                if r.status != 200:
                    return None
                raw, whole = await read_bounded(r.content, MAX_METRICS_BYTES)
                return raw if whole else None
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None


# --- exposition -------------------------------------------------------------------------------

def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


class ModelServerCollector(Collector):
    """The pod's load at scrape time, under the protocol's names and toolmend's own."""

    def __init__(self, app: web.Application, reader: LoadReader) -> None:
        self.app = app
        self.reader = reader

    def collect(self) -> Iterable[GaugeMetricFamily]:
        sched = self.app.get(SCHEDULER)
        queued = int(getattr(sched, "queued", 0) or 0)
        busy = int(getattr(sched, "in_flight", 0) or 0)
        slots = int(getattr(sched, "slots", 0) or 0)
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:  # collected outside the loop (registration): nothing read yet
            now = None
        load = self.reader.current(now) if now is not None else None
        backend_waiting = load.waiting if load is not None else None
        backend_running = load.running if load is not None else None
        waiting = queued + (backend_waiting or 0.0)
        running = backend_running if backend_running is not None else float(busy)
        pn = n.prometheus_name
        yield _gauge(n.MSP_WAITING, "Requests waiting in this pod: toolmend's queue plus the "
                     "backend's own (model-server protocol, TotalQueuedRequests)", waiting)
        yield _gauge(n.MSP_RUNNING, "Requests the backend is running (model-server protocol)",
                     running)
        yield _gauge(pn(n.M_REQUESTS_WAITING), "Requests waiting in this pod: toolmend's "
                     "queue plus the backend's own", waiting)
        yield _gauge(pn(n.M_REQUESTS_RUNNING), "Requests the backend is running (as it says, "
                     "else as toolmend sent them)", running)
        yield _gauge(pn(n.M_SLOTS), "Backend slots toolmend fills", float(slots))
        yield _gauge(pn(n.M_SLOTS_BUSY), "Backend slots toolmend holds now", float(busy))
        if load is None:
            return
        if load.kv_usage is not None:
            for name in (n.MSP_KV_USAGE, n.MSP_KV_USAGE_OLD):
                yield _gauge(name, "KV-cache usage of the backend, 1 means 100 percent "
                             "(model-server protocol, KVCacheUtilization)", load.kv_usage)
            yield _gauge(pn(n.M_BACKEND_KV_USAGE) + "_ratio", "KV-cache usage of the "
                         "backend, 0 to 1", load.kv_usage)
        if backend_waiting is not None:
            yield _gauge(pn(n.M_BACKEND_WAITING), "Requests waiting in the backend's own "
                         "queue, as it last said", backend_waiting)
        if backend_running is not None:
            yield _gauge(pn(n.M_BACKEND_RUNNING), "Requests the backend runs, as it last said",
                         backend_running)
        assert now is not None and self.reader.read_at is not None
        yield _gauge(pn(n.M_BACKEND_LOAD_AGE) + "_seconds", "Seconds since the backend's load "
                     "was read", max(0.0, now - self.reader.read_at))
        for name, labelled in ((n.MSP_LORA_INFO, load.lora),
                               (n.MSP_CACHE_INFO, (load.cache_info, 1.0) if load.cache_info
                                else None)):
            if labelled:
                labels, value = labelled
                g = GaugeMetricFamily(name, "As the backend reported it", labels=list(labels))
                g.add_metric(list(labels.values()), value)
                yield g


READER = web.AppKey("model_server_reader", LoadReader)


# --- who may scrape -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ScrapeAccess:
    """Who may read ``/metrics``: loopback, the admin key, and for ``/metrics`` alone a scrape
    key and allowed networks. The picker scrapes from another pod, and what ``/metrics`` says
    (load, latency histograms, error counts) is far less than the session timelines, which
    stay behind loopback or the admin key."""

    admin_key: bytes = b""
    metrics_key: bytes = b""
    networks: tuple[auth.Network, ...] = ()

    @classmethod
    def from_settings(cls, settings: Any) -> ScrapeAccess:
        return cls(settings.admin_key.encode(), settings.metrics_key.encode(),
                   tuple(auth.parse_networks(settings.metrics_networks, "metrics_networks")))

    def allows(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            token = header[7:].strip().encode("utf-8", "surrogatepass")
            for key in (self.admin_key, self.metrics_key):  # both compared, constant time
                if key and hmac.compare_digest(token, key):
                    return True
        try:
            addr = ipaddress.ip_address((request.remote or "").split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return addr.is_loopback or any(addr in net for net in self.networks)


SCRAPE = web.AppKey("scrape_access", ScrapeAccess)


def check_scrape(request: web.Request, settings: Any) -> None:
    """Refuse, with a 403 that says how to get in, a client that may not read /metrics.
    (``settings`` serve an app built without :func:`install`.)"""
    access = request.app.get(SCRAPE) or ScrapeAccess.from_settings(settings)
    if not access.allows(request):
        raise ProxyError(403, "/metrics is served to loopback clients, to metrics_networks and "
                         "with the metrics or admin key", code="forbidden")


def install(app: web.Application, registry: Any) -> LoadReader:
    """Register the collector on ``registry`` and read the backend while the app runs."""
    reader = LoadReader(app)
    app[READER] = reader
    app[SCRAPE] = ScrapeAccess.from_settings(app[SETTINGS])
    registry.register(ModelServerCollector(app, reader))

    async def start(app: web.Application) -> None:
        reader.start()

    async def stop(app: web.Application) -> None:
        await reader.stop()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return reader
