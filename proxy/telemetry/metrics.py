"""Prometheus metrics for ``GET /metrics``, one registry per application.

A per-app :class:`CollectorRegistry` (not prometheus-client's global one) lets several apps live
in one process, as they do in tests and in the benchmark, without "duplicated timeseries" errors.
Labels are bounded on purpose: no session, request or agent ids, and values that come from
outside (model names, error codes, repair kinds) go through :class:`BoundedLabel`, so a client
sending random model names cannot grow the scrape without limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from toolmend.telemetry import names as n

OTHER = "_other"


class BoundedLabel:
    """Passes the first ``limit`` distinct values through, then maps new ones to ``_other``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        v = (value or "")[:64]
        if v in self._seen:
            return v
        if len(self._seen) >= self.limit:
            return OTHER
        self._seen.add(v)
        return v


class Children:
    """A labelled metric's children, each looked up once: prometheus-client's ``labels()``
    checks and joins its values and takes a lock on every call, several times per request.
    Bounded as the label values are (every value that reaches it is bounded)."""

    __slots__ = ("_children", "metric")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class _QueueDepth(Collector):
    """Reads the scheduler's queue depth at scrape time; 0 when there is no scheduler."""

    def __init__(self, read: Callable[[], int | None]) -> None:
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        g = GaugeMetricFamily(n.prometheus_name(n.M_QUEUE_DEPTH),
                              "Requests waiting in toolmend's queue for a backend slot")
        g.add_metric([], float(self._read() or 0))
        yield g


class Metrics:
    """The instruments; ``observe`` is called once per finished request."""

    def __init__(self, queue_depth: Callable[[], int | None] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        pn = n.prometheus_name
        op, prov = pn(n.GEN_AI_OPERATION_NAME), pn(n.GEN_AI_PROVIDER_NAME)
        model = pn(n.GEN_AI_REQUEST_MODEL)
        self.models = BoundedLabel(32)
        self.codes = BoundedLabel(64)
        self.kinds = BoundedLabel(64)
        # from the request's arrival: the wait for a slot and the backend's prefill, as the
        # convention's server-side time to first token counts it; by the API the agent spoke
        self.ttft = Histogram(pn(n.M_TTFT), "Time to first token from the request's arrival "
                              "(queue wait and prefill)", (op, prov, model, pn(n.TM_FRONT)),
                              unit="seconds", registry=r, buckets=n.TTFT_BUCKETS)
        self.duration = Histogram(pn(n.M_REQUEST_DURATION), "Request duration to the last byte",
                                  (op, prov, model, pn(n.ERROR_TYPE)), unit="seconds",
                                  registry=r, buckets=n.DURATION_BUCKETS)
        self.tokens = Histogram(pn(n.M_TOKEN_USAGE), "Input and output tokens per request",
                                (op, prov, model, pn(n.GEN_AI_TOKEN_TYPE)), registry=r,
                                buckets=n.TOKEN_BUCKETS)
        self.queue_wait = Histogram(pn(n.M_QUEUE_WAIT), "Time waiting for a backend slot",
                                    (), unit="seconds", registry=r, buckets=n.QUEUE_BUCKETS)
        self.in_flight = Gauge(pn(n.M_IN_FLIGHT), "Requests being handled now", registry=r)
        self.requests = Counter(pn(n.M_REQUESTS), "Finished requests by operation and status",
                                (op, n.LABEL_STATUS), registry=r)
        self.repairs = Counter(pn(n.M_REPAIRS), "Tool-call repairs by kind", (n.LABEL_KIND,),
                               registry=r)
        self.validation_failures = Counter(pn(n.M_VALIDATION_FAILURES),
                                           "Tool calls that failed schema validation", registry=r)
        self.retries = Counter(pn(n.M_RETRIES), "Upstream retries for invalid tool calls",
                               registry=r)
        self.upstream_errors = Counter(pn(n.M_UPSTREAM_ERRORS), "Upstream failures by code",
                                       (n.LABEL_CODE,), registry=r)
        self.invalid_utf8 = Counter(pn(n.M_INVALID_UTF8), "Upstream events (or whole replies) "
                                    "whose invalid UTF-8 was replaced with U+FFFD", registry=r)
        r.register(_QueueDepth(queue_depth or (lambda: 0)))
        self._ttft, self._duration = Children(self.ttft), Children(self.duration)
        self._tokens, self._requests = Children(self.tokens), Children(self.requests)
        self._repairs = Children(self.repairs)

    def observe(self, *, operation: str, provider: str, model: str | None, status: int,
                error_code: str | None, duration: float, ttft: float | None, front: str,
                queue_wait: float | None, usage: dict[str, Any] | None,
                repair_kinds: list[str], validation_failures: int, retries: int,
                invalid_utf8: int = 0) -> None:
        m = self.models(model)
        err = self.codes(error_code) if error_code else ""
        self._duration(operation, provider, m, err).observe(duration)
        if ttft is not None and status < 400:
            self._ttft(operation, provider, m, front).observe(ttft)
        if queue_wait is not None:
            self.queue_wait.observe(queue_wait)
        if usage:
            for key, kind in (("prompt_tokens", n.TOKEN_INPUT),
                              ("completion_tokens", n.TOKEN_OUTPUT)):
                v = usage.get(key)
                if isinstance(v, int) and v >= 0:
                    self._tokens(operation, provider, m, kind).observe(v)
        self._requests(operation, str(status)).inc()
        for k in repair_kinds:
            self._repairs(self.kinds(k)).inc()
        if validation_failures:
            self.validation_failures.inc(validation_failures)
        if retries:
            self.retries.inc(retries)
        if invalid_utf8:
            self.invalid_utf8.inc(invalid_utf8)
        if error_code and error_code.startswith("upstream"):
            self.upstream_errors.labels(err).inc()
