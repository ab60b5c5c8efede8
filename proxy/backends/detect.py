"""What kind of server is behind a URL, found by asking it.

Each stack answers a few discovery endpoints that the others do not: Ollama says "Ollama is
running" at ``/`` and has ``/api/version``; llama-server has ``/props`` (with its slot count);
vLLM has ``/version`` and lists models ``owned_by: "vllm"``; SGLang has ``/get_model_info``; TGI
has ``/info``; llama-cpp-python's server lists models ``owned_by: "me"``; toolmend's embedded
backend ``owned_by: "toolmend"``. All probes go out at once with a short timeout, so detection
costs one round trip, and a probe that fails only means "not this kind".
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from toolmend.server.bounded import read_bounded

KINDS = ("vllm", "llamacpp", "ollama", "sglang", "tgi", "llama-cpp-python", "embedded",
         "openai", "unknown")

#: Probed paths; the order does not matter, they run concurrently.
PROBES = ("/", "/api/version", "/props", "/version", "/get_model_info", "/info", "/v1/models",
          "/health")
#: Most of a discovery answer that is read; a longer one is cut and its JSON is not parsed.
PROBE_BYTES = 256 * 1024


@dataclass(slots=True)
class Probe:
    """One discovery answer: status (0 when there was no answer), JSON if any, text."""

    status: int = 0
    doc: Any = None
    text: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass(slots=True)
class Detected:
    kind: str
    model: str | None = None
    slots: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "slots": self.slots,
                "details": self.details}

    @property
    def loading(self) -> bool:
        return bool(self.details.get("loading"))

    @property
    def context_length(self) -> int | None:
        """Tokens of context one request gets, where the server says (llama-server's per-slot
        ``n_ctx``, vLLM's ``max_model_len``, TGI's ``max_total_tokens``, the embedded
        backend's ``n_ctx``): no reply can be longer."""
        for name in ("n_ctx", "max_model_len", "max_total_tokens"):
            v = self.details.get(name)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return None


async def _probe(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                 timeout: float) -> Probe:
    try:
        async with asyncio.timeout(timeout):
            async with session.get(url, headers=headers, allow_redirects=False) as r:
                # the whole answer (read(n) stops at whatever arrived first), up to the bound
                raw, whole = await read_bounded(r.content, PROBE_BYTES, keep_prefix=True)
                status = r.status
    except (aiohttp.ClientError, TimeoutError, OSError):
        return Probe()
    text = raw.decode("utf-8", "replace")
    try:
        doc = orjson.loads(raw) if whole else None
    except orjson.JSONDecodeError:
        doc = None
    return Probe(status, doc, text[:2000])


async def probe_all(base_url: str, *, session: aiohttp.ClientSession | None = None,
                    api_key: str = "", timeout: float = 2.0) -> dict[str, Probe]:
    base = base_url.rstrip("/")
    if base.endswith("/v1"):  # users often paste the OpenAI base URL
        base = base[:-3]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    own = session is None
    s = session or aiohttp.ClientSession()
    try:
        results = await asyncio.gather(*(_probe(s, base + p, headers, timeout) for p in PROBES))
    finally:
        if own:
            await s.close()
    return dict(zip(PROBES, results, strict=True))


def _models(p: Probe) -> list[dict[str, Any]]:
    if p.ok and isinstance(p.doc, dict) and isinstance(p.doc.get("data"), list):
        return [m for m in p.doc["data"] if isinstance(m, dict)]
    return []


def _loading(probes: dict[str, Probe]) -> bool:
    return any(p.status == 503 and "loading" in p.text.lower()
               for p in (probes["/health"], probes["/v1/models"]))


def classify(probes: dict[str, Probe], override: str = "auto") -> Detected:
    """Pure: the probe answers in, the verdict out (``override`` forces the kind)."""
    models = _models(probes["/v1/models"])
    model = models[0].get("id") if models else None
    owned = {str(m.get("owned_by", "")) for m in models}
    d: dict[str, Any] = {}
    kind = "unknown"
    slots: int | None = None
    root, props, info = probes["/"], probes["/props"], probes["/info"]
    smi, version = probes["/get_model_info"], probes["/version"]

    if "Ollama is running" in root.text or (
            probes["/api/version"].ok and isinstance(probes["/api/version"].doc, dict)
            and "version" in probes["/api/version"].doc and not props.ok):
        kind = "ollama"
        if isinstance(probes["/api/version"].doc, dict):
            d["version"] = probes["/api/version"].doc.get("version")
    elif props.ok and isinstance(props.doc, dict) and (
            "default_generation_settings" in props.doc or "total_slots" in props.doc):
        kind = "llamacpp"
        n = props.doc.get("total_slots")
        slots = n if isinstance(n, int) and n > 0 else None
        gen = props.doc.get("default_generation_settings") or {}
        if isinstance(gen, dict) and isinstance(gen.get("n_ctx"), int):
            d["n_ctx"] = gen["n_ctx"]
        caps = props.doc.get("chat_template_caps")
        if isinstance(caps, dict) and "supports_tools" in caps:
            d["supports_tools"] = bool(caps["supports_tools"])
        if props.doc.get("build_info"):
            d["build"] = props.doc["build_info"]
        if not model and isinstance(props.doc.get("model_path"), str):
            model = props.doc["model_path"].rsplit("/", 1)[-1]
    elif smi.ok and isinstance(smi.doc, dict) and "model_path" in smi.doc:
        kind = "sglang"
        model = model or smi.doc.get("model_path")
    elif info.ok and isinstance(info.doc, dict) and "model_id" in info.doc:
        kind = "tgi"
        model = model or info.doc.get("model_id")
        n = info.doc.get("max_concurrent_requests")
        slots = n if isinstance(n, int) and n > 0 else None
        total = info.doc.get("max_total_tokens")
        if isinstance(total, int) and not isinstance(total, bool):
            d["max_total_tokens"] = total
        if info.doc.get("version"):
            d["version"] = info.doc["version"]
    elif "vllm" in owned or (version.ok and isinstance(version.doc, dict)
                             and "version" in version.doc and models):
        kind = "vllm"
        if version.ok and isinstance(version.doc, dict):
            d["version"] = version.doc.get("version")
        mml = models[0].get("max_model_len") if models else None
        if isinstance(mml, int):
            d["max_model_len"] = mml
    elif "toolmend" in owned:
        kind, slots = "embedded", 1
        meta = models[0].get("meta") if models else None
        if isinstance(meta, dict) and isinstance(meta.get("n_ctx"), int):
            d["n_ctx"] = meta["n_ctx"]
    elif "me" in owned:
        kind, slots = "llama-cpp-python", 1  # its server runs one generation at a time
    elif models:
        kind = "openai"

    if _loading(probes):
        d["loading"] = True
    if kind == "unknown":
        answered = [p for p, r in probes.items() if r.status]
        d["reason"] = ("no answer on any discovery endpoint" if not answered else
                       "answers " + ", ".join(answered) + " but matches no known server")
    if override != "auto":
        d["detected"] = kind
        kind = override
    if model is not None:
        d["models"] = [m.get("id") for m in models] or [model]
    return Detected(kind, model, slots, d)


async def detect(base_url: str, override: str = "auto", *,
                 session: aiohttp.ClientSession | None = None, api_key: str = "",
                 timeout: float = 2.0) -> Detected:
    """Probe ``base_url`` and classify it; ``override`` (``--backend``) wins on the kind."""
    return classify(await probe_all(base_url, session=session, api_key=api_key,
                                    timeout=timeout), override)


def describe(url: str, d: Detected) -> str:
    """One log line: what was found where."""
    parts = [f"upstream {url}: {d.kind}"]
    if "detected" in d.details:
        parts.append(f"(forced by --backend; looks like {d.details['detected']})")
    if d.model:
        parts.append(f"model {d.model}")
    if d.slots:
        parts.append(f"{d.slots} slots")
    if d.loading:
        parts.append("(still loading)")
    if d.details.get("reason"):
        parts.append(f"- {d.details['reason']}")
    return " ".join(parts)
