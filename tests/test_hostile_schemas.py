"""Hostile tool schemas: too large in all, checked in a worker, refs that only fail in scope.

The proxy must refuse at the door (400, or 413 for the per-request bounds) in the OpenAI shape,
naming the tool or the limit, and never fail later in the stream; large new schemas are checked
in a worker process that is killed when it overruns and stops when idle.
"""

from __future__ import annotations

import asyncio
import random
import string
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolmend.parsers.schemas import (
    DEFAULT_LIMITS,
    MEMORY_PER_SCHEMA_BYTE,
    Checked,
    SchemaError,
    SchemaLimits,
    ValidatorCache,
    check_schema,
    compile_schema,
    compile_tools,
    plan_tools,
)
from toolmend.parsers.validation import validate_call
from toolmend.pipeline.schema_worker import WAITING_PER_WORKER, CheckerBusy, SchemaCompiler, _Worker
from toolmend.pipeline.validating import SCHEMAS
from toolmend.server.app import build_app, start_server
from toolmend.server.config import Settings

from .test_hostile_arguments import HostileUpstream, Reply, call_deltas, stream_error

MSG = [{"role": "user", "content": "go"}]


def tool(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def wide(properties: int, seed: int) -> dict[str, Any]:
    """The probe's schema: thousands of properties with names no cache has seen."""
    r = random.Random(seed)
    return {"type": "object", "properties": {
        "p" + "".join(r.choices(string.ascii_lowercase, k=10)) + str(i):
            {"type": "string", "description": f"field {i}", "maxLength": 100 + i}
        for i in range(properties)}}


# The PointerToNowhere case: "#/$defs/n" written under a subschema with its own $id means that
# subschema's $defs, which it does not have.
SCOPED_BROKEN = {"type": "object", "$defs": {"n": {"type": "integer"}}, "properties": {
    "a": {"$id": "https://example.com/a", "type": "object",
          "properties": {"b": {"$ref": "#/$defs/n"}}}}}
SCOPED_OK = {"type": "object", "properties": {
    "a": {"$id": "https://example.com/a", "$defs": {"n": {"type": "integer"}},
          "type": "object", "properties": {"b": {"$ref": "#/$defs/n"}}}}}


@pytest.fixture
async def make_proxy() -> AsyncIterator[Callable[..., Any]]:
    cleanups: list[Any] = []

    async def factory(**settings: Any) -> tuple[HostileUpstream, str, Any]:
        up = HostileUpstream()
        await up.start()
        cleanups.append(up.stop)
        app = build_app(Settings(**{"log_requests": False, "backend": "vllm", **settings}),
                        [up.url])
        runner, port = await start_server(app, "127.0.0.1", 0)
        cleanups.append(runner.cleanup)
        return up, f"http://127.0.0.1:{port}/v1/chat/completions", app

    yield factory
    for fn in reversed(cleanups):
        await fn()


async def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any] | bytes]:
    async with aiohttp.ClientSession() as s, s.post(url, data=orjson.dumps(body), headers={
            "Content-Type": "application/json"}) as r:
        raw = await r.read()
        return r.status, (orjson.loads(raw) if r.content_type == "application/json" else raw)


def whole_reply(name: str, arguments: str) -> Reply:
    return Reply(whole={"id": "c", "object": "chat.completion", "created": 1, "model": "m",
                        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                            "role": "assistant", "content": None, "tool_calls": [{
                                "id": "call_1", "type": "function",
                                "function": {"name": name, "arguments": arguments}}]}}]})


# --- refs resolved in their own scope, at the door ---------------------------------------------

async def test_ref_that_fails_in_its_scope_is_refused_at_the_door(
        make_proxy: Callable[..., Any]) -> None:
    up, url, _ = await make_proxy()
    status, doc = await post(url, {"messages": MSG, "tools": [tool("ok", {}),
                                                              tool("scoped", SCOPED_BROKEN)],
                                   "stream": True})
    assert status == 400
    assert isinstance(doc, dict)
    assert doc["error"] == {
        "message": "invalid tool schema: tool 'scoped': $ref '#/$defs/n' does not resolve in "
                   "the scope of $id 'https://example.com/a' (at /tools/1/function/parameters"
                   "/properties/a/properties/b/$ref)",
        "type": "invalid_request_error",
        "param": "/tools/1/function/parameters/properties/a/properties/b/$ref",
        "code": "invalid_tool_schema"}
    assert up.replies == []  # nothing was asked of the upstream


@pytest.mark.parametrize("stream", [True, False])
async def test_scoped_refs_that_resolve_validate_calls(make_proxy: Callable[..., Any],
                                                       stream: bool) -> None:
    up, url, _ = await make_proxy(on_invalid="error")
    body = {"messages": MSG, "tools": [tool("scoped", SCOPED_OK)], "stream": stream}
    for args in ('{"a": {"b": 5}}', '{"a": {"b": "five"}}'):
        up.replies.append(Reply(call_deltas(args, name="scoped")) if stream
                          else whole_reply("scoped", args))
    status, got = await post(url, body)
    assert status == 200
    raw = got if isinstance(got, bytes) else orjson.dumps(got)
    assert b"b\\\": 5" in raw and b"error" not in raw
    status, got = await post(url, body)
    if stream:
        assert status == 200 and isinstance(got, bytes)
        err = stream_error(got)
    else:
        assert status == 502 and isinstance(got, dict)
        err = got["error"]
    assert err["code"] == "invalid_tool_call"
    assert err["pointer"] == "/a/b"
    assert err["validator_message"] == "'five' is not of type 'integer'"


def test_scoped_refs_at_compile_time() -> None:
    with pytest.raises(SchemaError, match="does not resolve in the scope") as caught:
        compile_tools([tool("t", SCOPED_BROKEN)], cache=None)
    assert caught.value.tool == "t"
    toolset = compile_tools([tool("t", SCOPED_OK)], cache=None)
    assert validate_call("t", '{"a": {"b": 1}}', toolset).ok
    verdict = validate_call("t", '{"a": {"b": []}}', toolset)
    assert not verdict.ok and verdict.error is not None and verdict.error.pointer == "/a/b"
    # an anchor and a ref to another $id of the same document resolve as validation will
    anchored = {"type": "object", "properties": {"a": {
        "$id": "https://example.com/x", "$defs": {"v": {"$anchor": "val", "type": "string"}},
        "properties": {"b": {"$ref": "#val"}}}}}
    toolset = compile_tools([tool("t", anchored)], cache=None)
    assert validate_call("t", '{"a": {"b": "s"}}', toolset).ok
    assert not validate_call("t", '{"a": {"b": 1}}', toolset).ok


# --- the per-request size bound -----------------------------------------------------------------

async def test_tool_schemas_over_the_total_are_a_413(make_proxy: Callable[..., Any]) -> None:
    up, url, _ = await make_proxy(max_tool_schemas_bytes=100_000)
    tools = [tool(f"t{i}", wide(600, i)) for i in range(4)]  # 46,012 bytes each
    status, doc = await post(url, {"messages": MSG, "tools": tools})
    assert status == 413
    assert isinstance(doc, dict)
    err = doc["error"]
    assert (err["type"], err["param"], err["code"]) == (
        "invalid_request_error", "/tools", "tool_schemas_too_large")
    assert "more than the limit of 100000 bytes per request (max_tool_schemas_bytes); " \
           "exceeded at tool 2" in err["message"]
    assert up.replies == []


def test_total_bound_stops_before_encoding_the_rest() -> None:
    """The bound is checked tool by tool: an 8 MB request is refused after about 1 MB. The
    third tool here could not even be encoded, and is never tried."""
    tools = [tool("t0", wide(2000, 0)), tool("t1", wide(2000, 1)),  # 156,912 bytes each
             tool("t2", {"type": "object", "enum": {1, 2}})]
    with pytest.raises(SchemaError) as caught:
        plan_tools(tools, limits=SchemaLimits(max_total_bytes=200_000), cache=None)
    assert caught.value.message == ("the tool schemas add up to more than the limit of 200000 "
                                    "bytes per request (max_tool_schemas_bytes); exceeded at "
                                    "tool 1")
    assert caught.value.too_large and caught.value.code == "tool_schemas_too_large"
    with pytest.raises(SchemaError, match="cannot be encoded as JSON"):
        plan_tools(tools, cache=None)


# --- large schemas in a worker process ------------------------------------------------------------

async def test_large_new_schemas_are_checked_in_a_worker(make_proxy: Callable[..., Any]) -> None:
    up, url, app = await make_proxy(schema_inline_bytes=4096, on_invalid="error")
    compiler: SchemaCompiler = app[SCHEMAS]
    schema = wide(2000, 7)  # ~95 KB
    name = next(iter(schema["properties"]))
    body = {"messages": MSG, "tools": [tool("wide", schema)], "stream": True}
    for value in ("ok", 5):
        up.replies.append(Reply(call_deltas(orjson.dumps({name: value}).decode(),
                                            name="wide")))
    status, raw = await post(url, body)
    assert status == 200 and isinstance(raw, bytes) and b"error" not in raw
    assert compiler.started == 1
    [worker] = compiler.processes
    assert worker.jobs == 1
    status, raw = await post(url, body)  # the same schema again: from the cache
    assert worker.jobs == 1
    assert isinstance(raw, bytes)
    assert stream_error(raw)["validator_message"] == "5 is not of type 'string'"
    # an invalid large schema is refused with the worker's finding, pointer and all
    broken = wide(2000, 8)
    broken["properties"][next(iter(broken["properties"]))]["type"] = "strin"
    status, doc = await post(url, {"messages": MSG, "tools": [tool("ok", {}),
                                                              tool("broken", broken)]})
    assert status == 400 and isinstance(doc, dict)
    assert doc["error"]["code"] == "invalid_tool_schema"
    assert doc["error"]["param"].startswith("/tools/1/function/parameters/properties/p")
    assert doc["error"]["param"].endswith("/type")
    assert worker.jobs == 2 and compiler.started == 1


async def test_a_check_over_its_time_kills_the_worker(make_proxy: Callable[..., Any]) -> None:
    up, url, app = await make_proxy(schema_inline_bytes=4096, schema_check_timeout=0.001)
    compiler: SchemaCompiler = app[SCHEMAS]
    status, doc = await post(url, {"messages": MSG, "tools": [tool("wide", wide(2000, 9))]})
    assert status == 413 and isinstance(doc, dict)
    assert doc["error"]["code"] == "tool_schemas_too_complex"
    assert "longer than 0.001 s to check (schema_check_timeout)" in doc["error"]["message"]
    assert compiler.killed == 1
    assert compiler.processes == []  # gone from the pool, and the process itself:
    await asyncio.gather(*compiler._stops)
    assert up.replies == []


async def test_workers_stop_when_idle_and_with_the_app() -> None:
    compiler = SchemaCompiler(workers=1, inline_bytes=0, idle_exit=0.01)
    toolset = await compiler.compile_tools([tool("a", wide(50, 1))], None,
                                           DEFAULT_LIMITS)
    assert "a" in toolset.tools
    [worker] = compiler.processes
    assert await worker.wait() == 0  # exits on its own once idle: its memory is returned
    assert compiler.processes == []
    await compiler.compile_tools([tool("b", wide(50, 2))], None,
                                 DEFAULT_LIMITS)
    [worker] = compiler.processes
    await compiler.close()
    assert worker.popen.returncode is not None and compiler.processes == []


async def test_a_request_gone_mid_check_takes_its_worker_with_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    in_hand = asyncio.Event()
    run = _Worker.run

    async def spied(self: _Worker, limits: Any, raws: list[bytes]) -> list[dict[str, Any]]:
        in_hand.set()
        return await run(self, limits, raws)

    monkeypatch.setattr(_Worker, "run", spied)
    compiler = SchemaCompiler(workers=1, inline_bytes=0)
    task = asyncio.ensure_future(compiler.compile_tools(
        [tool("a", wide(3000, 3))], None, DEFAULT_LIMITS))
    await in_hand.wait()  # the job is in the worker's hands
    [worker] = compiler.processes
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await worker.wait() != 0  # killed: nobody waits for its answer
    await compiler.close()


async def test_checks_waiting_for_a_worker_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow_run(self: _Worker, limits: Any, raws: list[bytes]) -> list[dict[str, Any]]:
        started.set()
        await release.wait()
        return [{"depth": 2, "scoped": False} for _ in raws]

    monkeypatch.setattr(_Worker, "run", slow_run)
    compiler = SchemaCompiler(workers=1, inline_bytes=0)
    limits = DEFAULT_LIMITS
    jobs = [asyncio.ensure_future(compiler.compile_tools([tool("a", wide(5, i))], None, limits))
            for i in range(1 + WAITING_PER_WORKER)]
    await started.wait()  # the first is in a worker; the others queued while it started
    assert compiler._waiting == WAITING_PER_WORKER
    with pytest.raises(CheckerBusy):
        await compiler.compile_tools([tool("a", wide(5, 99))], None, limits)
    release.set()
    assert all("a" in t.tools for t in await asyncio.gather(*jobs))
    await compiler.close()


# --- the cache, bounded by memory ---------------------------------------------------------

def test_cache_is_bounded_by_bytes() -> None:
    small = [{"type": "object", "description": "x" * 1000, "maxProperties": i}
             for i in range(40)]  # 1,051 or 1,052 bytes each
    cost = 1052 * MEMORY_PER_SCHEMA_BYTE
    cache = ValidatorCache(max_bytes=cost * 32 + cost // 2)  # room for 32, none over 1/32
    for schema in small:
        compile_schema(schema, cache=cache)
    assert len(cache) == 32 and cache.bytes <= cache.max_bytes
    # a schema over 1/32 of the budget is not kept compiled, only its verdict
    big = wide(400, 5)
    entry = compile_schema(big, cache=cache)
    assert len(cache) == 32 and cache.get(entry.digest) is None
    assert cache.checked(entry.digest) == Checked(entry.depth, False)
    plan = plan_tools([tool("big", big)], cache=cache)
    assert plan.misses == []  # sent again: rebuilt from the verdict, not checked again
    assert plan.finish({}, cache).tools["big"].compiled.digest == entry.digest


# --- anything in, a verdict out ---------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.sampled_from(["type", "$ref", "$id", "properties", "items", "anyOf",
                                         "$defs", "pattern", "required", "x", "$anchor"]),
                        inner, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_check_schema_gives_a_verdict_for_anything(schema: Any) -> None:
    raw = orjson.dumps({"type": "object", "properties": {"a": schema}},
                       option=orjson.OPT_SORT_KEYS)
    try:
        check_schema(raw)
    except SchemaError:
        pass
