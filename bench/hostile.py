"""The hostile inputs of issue 14, for the soak in ``load.py``: each item's request (or
connection, or upstream behaviour) and the outcomes that mean toolmend handled it.

Every entry runs one hostile exchange and returns an outcome string; the soak counts an
outcome outside the entry's ``expect`` as unexpected. The payload sizes are the issue's
(``scale`` 1.0) and shrink or grow with ``--hostile-scale``.

What the soak needs from toolmend and the simulator for these: the key config written by
:func:`keys_toml` (agent ``alpha`` capped at ``ALPHA_CAP`` tokens, ``bravo``, and ``load`` for
the ordinary traffic), the scenarios of :func:`scenarios` in the simulator's fixtures, an
upstream URL with ``user:password@`` (item 12), and keep-alive comments that start before the
first-byte timeout (item 2's stall after headers).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

ALPHA_KEY = "soak-alpha-5b1d0c"
BRAVO_KEY = "soak-bravo-77e2a9"
LOAD_KEY = "soak-load-0f3c4e"
ALPHA_CAP = 8  # small: at the soak's 200 ms a token, a capped reply takes 1.6 s
UPSTREAM_SECRET = "soak-upstream-pw-4c1f"
MSG = [{"role": "user", "content": "hello"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
MB = 1 << 20
#: A hostile exchange that takes longer than this is counted as a client timeout (with the
#: soak's upstream timeouts, every handled one ends well within it).
HOSTILE_TIMEOUT = aiohttp.ClientTimeout(total=30)


def keys_toml() -> str:
    def h(k: str) -> str:
        return hashlib.sha256(k.encode()).hexdigest()

    return (f'[keys."{h(ALPHA_KEY)}"]\nagent = "alpha"\nmax_tokens = {ALPHA_CAP}\n\n'
            f'[keys."{h(BRAVO_KEY)}"]\nagent = "bravo"\n\n'
            f'[keys."{h(LOAD_KEY)}"]\nagent = "load"\n')


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _nested(depth: int) -> str:
    return '{"city": "Oslo", "deep": ' + "[" * depth + "]" * depth + "}"


def scenarios(scale: float) -> dict[str, dict[str, Any]]:
    """Simulator scenarios (served by name) that the hostile entries ask for."""
    big_args = max(1, int(24 * MB * scale))
    return {name: {"token_delay": 0, **sc} for name, sc in {  # the hostility, not the pace
        "h_headers_then_reset": {"fault": {"kind": "headers_then_reset"}},
        "h_headers_then_stall": {"fault": {"kind": "headers_then_stall", "seconds": 30}},
        "h_reset_mid_body": {"fault": {"kind": "reset_mid_body"}},
        "h_huge_line": {"fault": {"kind": "huge_line", "size": int(17 * MB * max(scale, 1.0))}},
        "h_unterminated_event": {"fault": {"kind": "unterminated_event",
                                           "size": max(1, int(97 * MB * scale))}},
        "h_invalid_utf8": {"fault": {"kind": "invalid_utf8"}},
        "h_huge_body": {"fault": {"kind": "huge_body", "size": max(1, int(100 * MB * scale))}},
        "h_scoped_ref_call": {"tool_calls": [{"name": "lookup", "arguments":
                                              '{"item": {"n": "widget"}}'}]},
        "h_deep_args": {"tool_calls": [{"name": "get_weather", "arguments": _nested(1100)}]},
        "h_deep_args_hermes": {"content": '<tool_call>{"name": "get_weather", "arguments": '
                                          + _nested(1100) + "}</tool_call>"},
        "h_huge_args_hermes": {"chunks": [
            '<tool_call>{"name": "get_weather", "arguments": {"city": "',
            *(["x" * MB] * (big_args // MB)), "x" * (big_args % MB), '"}}</tool_call>']},
    }.items()}


@dataclass
class Ctx:
    session: aiohttp.ClientSession
    url: str  # toolmend base URL
    port: int
    scale: float
    header_timeout: float
    context: int  # the simulator's context length


@dataclass(frozen=True)
class Hostile:
    item: int  # issue 14's item
    name: str
    expect: frozenset[str]
    run: Callable[[Ctx], Awaitable[str]]
    heavy: bool = False


# --- exchanges -------------------------------------------------------------------------------

def _openai_error(raw: bytes) -> bool:
    try:
        err = json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err)


async def exchange(ctx: Ctx, path: str, body: Any, headers: dict[str, str],
                   stream: bool) -> tuple[str, bytes]:
    """One request; the outcome as the soak names it, and the whole response body."""
    raw = b""
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with ctx.session.post(ctx.url + path, data=data, timeout=HOSTILE_TIMEOUT,
                                    headers={"Content-Type": "application/json",
                                             **headers}) as r:
            raw = await r.read()
            if r.status != 200:
                shaped = _openai_error(raw) or (path.startswith("/api/") and b'"error"' in raw)
                return f"HTTP {r.status}" + ("" if shaped else " (not OpenAI-shaped)"), raw
            if not stream:
                return "clean finish", raw
            tail = raw[-8192:]
            if not tail.rstrip().endswith(b"data: [DONE]"):
                return "no [DONE]", raw
            if b'data: {"error"' in tail:
                ev = tail.rsplit(b'data: {"error"', 1)[1].split(b"\n", 1)[0]
                shaped = _openai_error(b'{"error"' + ev)
                return "in-stream error" + ("" if shaped else " (not OpenAI-shaped)"), raw
            return "clean finish", raw
    except TimeoutError:
        return "client timeout", raw
    except aiohttp.ClientError as e:
        return f"exception {e.__class__.__name__}", raw


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "sim-model", "messages": [{"role": "user", "content": text}], **extra}


def scenario_request(name: str, *, stream: bool = True, tools: list[Any] | None = None,
                     expect: frozenset[str], item: int, heavy: bool = False) -> Hostile:
    async def run(ctx: Ctx) -> str:
        body = _chat(f"hello #scenario:{name}", stream=stream)
        if tools:
            body["tools"] = tools
        return (await exchange(ctx, "/v1/chat/completions", body, auth(LOAD_KEY), stream))[0]

    return Hostile(item, name.removeprefix("h_"), expect, run, heavy)


async def raw_request(port: int, head: bytes, body: bytes = b"") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()


def _status(raw: bytes) -> int:
    try:
        return int(raw.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


# --- the items -------------------------------------------------------------------------------

def _usage_tokens(raw: bytes) -> int | None:
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if "eval_count" in doc:  # Ollama's shape
        return doc["eval_count"]
    return (doc.get("usage") or {}).get("completion_tokens")


def cap_entry(name: str, path: str, body: dict[str, Any]) -> Hostile:
    async def run(ctx: Ctx) -> str:
        outcome, raw = await exchange(ctx, path, body, auth(ALPHA_KEY), False)
        if outcome != "clean finish":
            return outcome
        n = _usage_tokens(raw)
        if n is None:
            return "no token count"
        return "capped" if n <= ALPHA_CAP else "over the cap"

    return Hostile(1, name, frozenset({"capped"}), run)


async def bad_header(ctx: Ctx, header: bytes) -> str:
    body = json.dumps(_chat("hello", stream=True)).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
            b"\r\nAuthorization: Bearer " + LOAD_KEY.encode() + b"\r\n" + header + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
    try:
        raw = await raw_request(ctx.port, head, body)
    except (OSError, TimeoutError) as e:
        return f"exception {e.__class__.__name__}"
    status = _status(raw)
    shaped = _openai_error(raw.partition(b"\r\n\r\n")[2])
    return f"HTTP {status}" + ("" if shaped else " (not OpenAI-shaped)")


async def foreign_session(ctx: Ctx) -> str:
    """bravo opens a session; alpha names it; alpha's step must not be in bravo's session."""
    sid = f"bravo-private-{random.randrange(10**6)}"
    for key in (BRAVO_KEY, ALPHA_KEY):
        async with ctx.session.post(ctx.url + "/v1/chat/completions",
                                    json=_chat("hello", max_tokens=4),
                                    headers={**auth(key), "X-Session-Id": sid}) as r:
            await r.read()
            if r.status != 200:
                return f"HTTP {r.status}"
            rid = r.headers.get("X-Request-Id", "")
    async with ctx.session.get(f"{ctx.url}/toolmend/v1/sessions/{sid}?agent_id=bravo") as r:
        if r.status != 200:
            return f"session lookup HTTP {r.status}"
        doc = await r.json()
    steps = {s.get("request_id") for s in doc.get("steps", ())}
    return "written into bravo's session" if rid in steps else "kept apart"


async def slowloris(ctx: Ctx) -> str:
    """Trickle one header line a second; toolmend must close within header_timeout (+2 s)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    limit = ctx.header_timeout + 2.0
    reader, writer = await asyncio.open_connection("127.0.0.1", ctx.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n")
    got = b""
    next_line = loop.time() + 1.0
    try:
        i = 0
        while loop.time() - started < limit + 10:
            try:
                piece = await asyncio.wait_for(reader.read(65536),
                                               max(0.01, next_line - loop.time()))
            except TimeoutError:
                i += 1
                next_line = loop.time() + 1.0
                writer.write(f"X-Slow-{i}: x\r\n".encode())
                continue
            except ConnectionError:
                break
            if not piece:
                break  # EOF: the server closed the connection
            got += piece
        else:
            return "still open"
    finally:
        writer.close()
    took = loop.time() - started
    if took > limit:
        return "closed late"
    return "closed with 408" if _status(got) == 408 else f"closed ({_status(got)})"


async def invalid_utf8(ctx: Ctx) -> str:
    outcome, raw = await exchange(ctx, "/v1/chat/completions",
                                  _chat("hello #scenario:h_invalid_utf8", stream=True),
                                  auth(LOAD_KEY), True)
    if outcome != "clean finish":
        return outcome
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid UTF-8 passed through"
    return "valid UTF-8"


def schema_bomb(ctx: Ctx) -> dict[str, Any]:
    """Item 3: 31 tools of 2,800 properties each (about 8 MB), names varied per request so
    that no cache helps."""
    salt = random.randrange(16**6)
    n_props = max(1, int(2800 * ctx.scale))
    tools = []
    for t in range(31):
        props = {f"p{salt:06x}_{t}_{i}": {"type": "string", "description": "d" * 48}
                 for i in range(n_props)}
        tools.append({"type": "function", "function": {
            "name": f"tool_{t}", "parameters": {"type": "object", "properties": props}}})
    return _chat("hello", stream=True, tools=tools)


async def run_schema_bomb(ctx: Ctx) -> str:
    return (await exchange(ctx, "/v1/chat/completions", schema_bomb(ctx), auth(LOAD_KEY),
                           True))[0]


async def many_keys(ctx: Ctx) -> str:
    """Item 9: eight bodies at once, each about 8 MB of small keys."""
    n = max(1, int(600_000 * ctx.scale))
    extra = ",".join(f'"k{i}":{i % 10}' for i in range(n))
    body = (b'{"model":"sim-model","stream":false,"max_tokens":4,"messages":'
            + json.dumps(MSG).encode() + b',"metadata":{' + extra.encode() + b"}}")
    outcomes = await asyncio.gather(*(exchange(ctx, "/v1/chat/completions", body,
                                               auth(LOAD_KEY), False) for _ in range(8)))
    kinds = sorted({o for o, _ in outcomes})
    return kinds[0] if len(kinds) == 1 else " / ".join(kinds)


async def keyless_huge_max_tokens(ctx: Ctx) -> str:
    outcome, raw = await exchange(ctx, "/v1/chat/completions",
                                  _chat("hello", max_tokens=10**12), auth(LOAD_KEY), False)
    if outcome != "clean finish":
        return outcome
    n = _usage_tokens(raw)
    return "within the context" if n is not None and n <= ctx.context else "over the context"


SCOPED_TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "$id": "https://tools.example/lookup.json",
    "properties": {"item": {"$id": "item.json", "type": "object",
                            "$defs": {"name": {"type": "string"}},
                            "properties": {"n": {"$ref": "#/$defs/name"}}}}}}}
IN_STREAM = frozenset({"in-stream error"})
COMPLETE_OR_REFUSED = frozenset({"clean finish", "in-stream error", "HTTP 400"})

CATALOGUE: list[Hostile] = [
    cap_entry("ollama /api/chat num_predict 100000", "/api/chat",
              {"model": "sim-model", "messages": MSG, "stream": False,
               "options": {"num_predict": 100_000}}),
    cap_entry("ollama /api/generate num_predict 100000", "/api/generate",
              {"model": "sim-model", "prompt": "hello", "stream": False,
               "options": {"num_predict": 100_000}}),
    cap_entry("max_tokens null", "/v1/chat/completions", _chat("hello", max_tokens=None)),
    cap_entry("max_completion_tokens null", "/v1/chat/completions",
              _chat("hello", max_completion_tokens=None)),
    cap_entry("n_predict 100000", "/v1/chat/completions", _chat("hello", n_predict=100_000)),
    scenario_request("h_headers_then_reset", item=2, expect=frozenset({"HTTP 502"})),
    scenario_request("h_reset_mid_body", stream=False, item=2,
                     expect=frozenset({"HTTP 502"})),
    scenario_request("h_headers_then_stall", item=2, expect=IN_STREAM),
    Hostile(3, "31 tools x 2,800 properties", frozenset({"HTTP 400", "HTTP 413"}),
            run_schema_bomb, heavy=True),
    scenario_request("h_huge_line", item=4, expect=frozenset({"in-stream error", "HTTP 502"}),
                     heavy=True),
    scenario_request("h_scoped_ref_call", tools=[SCOPED_TOOL], item=4,
                     expect=COMPLETE_OR_REFUSED),
    scenario_request("h_deep_args", tools=[TOOL], item=4, expect=IN_STREAM),
    scenario_request("h_deep_args_hermes", tools=[TOOL], item=4, expect=IN_STREAM),
    Hostile(5, "X-Agent-Id not UTF-8", frozenset({"HTTP 400"}),
            lambda ctx: bad_header(ctx, b"X-Agent-Id: \xff")),
    Hostile(5, "X-Session-Id not UTF-8", frozenset({"HTTP 400"}),
            lambda ctx: bad_header(ctx, b"X-Session-Id: p\xff")),
    Hostile(6, "another agent's session id", frozenset({"kept apart"}), foreign_session),
    scenario_request("h_unterminated_event", item=7,
                     expect=frozenset({"in-stream error", "HTTP 502"}), heavy=True),
    scenario_request("h_huge_args_hermes", tools=[TOOL], item=8,
                     expect=frozenset({"in-stream error", "HTTP 502"}), heavy=True),
    # each of the eight is served, refused for its size (413: max_body_values) or, over the
    # large-body permits, refused at once (503 with Retry-After); any mix of these is handled
    Hostile(9, "8 concurrent bodies of 600k keys", frozenset(
        " / ".join(sorted(mix)) for k in range(1, 5)
        for mix in itertools.combinations(("clean finish", "HTTP 400", "HTTP 413", "HTTP 503"), k)),
        many_keys, heavy=True),
    Hostile(11, "slowloris", frozenset({"closed with 408"}), slowloris),
    Hostile(13, "content that is not UTF-8", frozenset({"valid UTF-8"}), invalid_utf8),
    scenario_request("h_huge_body", stream=False, item=14, expect=frozenset({"HTTP 502"}),
                     heavy=True),
    Hostile(15, "max_tokens 10**12 (no key cap)", frozenset({"within the context"}),
            keyless_huge_max_tokens),
]


class Rotation:
    """The catalogue in random order, over and over, shared by the hostile workers: each
    takes the next entry when it is free, so one pass covers every entry as fast as the
    workers go. Heavy entries run one at a time (they stand for one attacker's big payloads,
    not a flood of them)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.todo: list[Hostile] = []
        self.heavy = asyncio.Semaphore(1)
        self.passes = 0

    def next(self) -> Hostile:
        if not self.todo:
            self.todo = list(CATALOGUE)
            self.rng.shuffle(self.todo)
            self.passes += 1
        return self.todo.pop()


async def hostile_worker(ctx: Ctx, stop_at: float, rotation: Rotation,
                         record: Callable[[Hostile, str, float], None]) -> None:
    """Run entries of the shared rotation one after another until ``stop_at`` (monotonic)."""
    while time.monotonic() < stop_at:
        h = rotation.next()
        t0 = time.monotonic()
        try:
            if h.heavy:
                async with rotation.heavy:
                    t0 = time.monotonic()
                    outcome = await h.run(ctx)
            else:
                outcome = await h.run(ctx)
        except Exception as e:  # the harness must see it, not die of it
            outcome = f"harness error {e.__class__.__name__}: {e}"[:120]
        record(h, outcome, time.monotonic() - t0)
