"""The model-server metrics protocol on ``/metrics`` (proxy/telemetry/model_server.py).

An inference gateway's endpoint picker reads ``vllm:num_requests_waiting``,
``vllm:num_requests_running`` and ``vllm:kv_cache_usage_perc`` (gauges) from each pod. These
tests hold requests in the sim (a ``hold`` fault keeps their slots busy until the gate opens),
so the pod's load is a known, stable state, then read what toolmend reports: the names, their
types, and values that add toolmend's own queue to the backend's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Stack, StackFactory
from toolmend.telemetry.model_server import (
    READER,
    BackendLoad,
    LoadReader,
    combine,
    parse_metrics,
    parse_slots,
)

PROMPT = "x" * 400  # 100 prompt tokens as the sim counts them (four characters a token)
HELD = {"content": "held reply", "fault": {"kind": "hold"}}


async def scrape(url: str) -> dict[str, tuple[str, list[tuple[dict[str, str], float]]]]:
    """Every family on /metrics: its type and its samples."""
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return {f.name: (f.type, [(dict(x.labels), x.value) for x in f.samples])
            for f in text_string_to_metric_families(text)}


def value(families: dict[str, Any], name: str) -> float:
    kind, samples = families[name]
    assert kind == "gauge", (name, kind)
    [(labels, v)] = samples
    assert labels == {}
    return v


async def until(check: Callable[[], bool]) -> None:
    while True:
        if check():
            return
        await asyncio.sleep(0.01)


async def scraped_until(url: str, **expected: float) -> dict[str, Any]:
    """The scrape once each named gauge has its expected value (the backend is read in the
    background, so a scrape may still show the reading from before the load)."""
    while True:
        families = await scrape(url)
        got = {name: families.get(name, ("", [({}, None)]))[1][0][1] for name in expected}
        if got == expected:
            return families
        await asyncio.sleep(0.02)


W, R = "vllm:num_requests_waiting", "vllm:num_requests_running"


async def stream(url: str, agent: str) -> bytes:
    async with aiohttp.ClientSession() as s, s.post(
            url + "/v1/chat/completions", headers={"X-Agent-Id": agent},
            json={"model": "sim-model", "stream": True,
                  "messages": [{"role": "user", "content": PROMPT}]}) as r:
        assert r.status == 200
        return await r.read()


@contextlib.asynccontextmanager
async def held_load(stack: Stack, requests: int, held: int
                    ) -> AsyncIterator[list[asyncio.Task[bytes]]]:
    """``requests`` streams, the first ``held`` of which the sim holds until the gate opens;
    the gate is opened and every stream finished on the way out, whatever happened."""
    stack.sim.push(*[HELD] * held)
    tasks = [asyncio.create_task(stream(stack.url, f"agent-{i % 2}")) for i in range(requests)]
    try:
        yield tasks
    finally:
        stack.sim.open_gate()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- under load, against the sim ------------------------------------------------------------

async def test_vllm_pod_under_load(make_stack: StackFactory) -> None:
    # toolmend lets 4 through; the backend runs 2 and queues 2; 2 more wait in toolmend
    stack = await make_stack(slots=4, express_slot=False,
                             backend_load_interval=0.02, sim_kwargs={"slots": 2, "ttft": 0.0})
    sim = stack.sim
    async with held_load(stack, requests=6, held=4) as tasks:
        await until(lambda: sim.stats.in_flight == 2 and sim.stats.queued == 2)
        families = await scraped_until(stack.url, **{W: 4.0, R: 2.0})
        assert value(families, W) == 4.0  # toolmend 2 + backend 2
        assert value(families, R) == 2.0
        assert value(families, "vllm:kv_cache_usage_perc") == 0.0244140625  # 200 / (4096 * 2)
        assert value(families, "vllm:gpu_cache_usage_perc") == 0.0244140625
        assert value(families, "toolmend_requests_waiting") == 4.0
        assert value(families, "toolmend_requests_running") == 2.0
        assert value(families, "toolmend_queue_depth") == 2.0
        assert value(families, "toolmend_backend_requests_waiting") == 2.0
        assert value(families, "toolmend_backend_requests_running") == 2.0
        assert value(families, "toolmend_backend_kv_cache_usage_ratio") == 0.0244140625
        assert value(families, "toolmend_slots") == 4.0
        assert value(families, "toolmend_slots_busy") == 4.0
        kind, [(labels, v)] = families["vllm:cache_config_info"]
        assert kind == "gauge" and v == 1.0
        assert labels == {"block_size": "16", "engine": "0", "num_gpu_blocks": "512"}
        sim.open_gate()
        for reply in await asyncio.gather(*tasks):
            assert reply.endswith(b"data: [DONE]\n\n")
    families = await scraped_until(stack.url, **{W: 0.0, R: 0.0})
    assert value(families, "vllm:kv_cache_usage_perc") == 0.0
    assert value(families, "toolmend_slots_busy") == 0.0


async def test_llama_server_without_metrics_is_read_from_its_slots(
        make_stack: StackFactory) -> None:
    stack = await make_stack("llamacpp", slots=2, express_slot=False,
                             backend_load_interval=0.02,
                             sim_kwargs={"slots": 2, "ttft": 0.0, "metrics": False})
    async with held_load(stack, requests=5, held=2):
        await until(lambda: stack.sim.stats.in_flight == 2)
        families = await scraped_until(stack.url, toolmend_backend_requests_running=2.0,
                                       **{W: 3.0})
        assert value(families, W) == 3.0  # toolmend's queue alone
        assert value(families, R) == 2.0  # the busy slots of /slots
        # /slots says nothing of the KV cache, and llama-server's queue is not there
        assert "vllm:kv_cache_usage_perc" not in families
        assert "toolmend_backend_requests_waiting" not in families


async def test_llama_server_with_metrics(make_stack: StackFactory) -> None:
    stack = await make_stack("llamacpp", slots=3, express_slot=False,
                             backend_load_interval=0.02, sim_kwargs={"slots": 2, "ttft": 0.0})
    async with held_load(stack, requests=3, held=3):
        await until(lambda: stack.sim.stats.in_flight == 2 and stack.sim.stats.queued == 1)
        families = await scraped_until(stack.url, **{W: 1.0, R: 2.0})
        # llama-server's deferred request is its queue; KV as it reports it: 200 / (2048 * 2)
        assert value(families, "vllm:kv_cache_usage_perc") == 0.048828125
        assert value(families, "toolmend_backend_requests_waiting") == 1.0
        assert value(families, "toolmend_queue_depth") == 0.0


async def test_ollama_pod_reports_toolmend_own_numbers(make_stack: StackFactory) -> None:
    stack = await make_stack("ollama", slots=1, backend_load_interval=0.02,
                             sim_kwargs={"ttft": 0.0})
    async with held_load(stack, requests=3, held=1):
        await until(lambda: stack.sim.stats.in_flight == 1)
        families = await scraped_until(stack.url, **{W: 2.0})
        assert value(families, R) == 1.0  # what toolmend sent it
        assert value(families, "toolmend_slots_busy") == 1.0
        assert "vllm:kv_cache_usage_perc" not in families
        assert not any(name.startswith("toolmend_backend_") for name in families)
        assert stack.app is not None and stack.app[READER].reads == 0  # Ollama: nothing to ask


async def test_reading_off_still_reports_the_queue(make_stack: StackFactory) -> None:
    stack = await make_stack(slots=1, backend_load_interval=0.0, sim_kwargs={"ttft": 0.0})
    async with held_load(stack, requests=2, held=1):
        await until(lambda: stack.sim.stats.in_flight == 1)
        families = await scraped_until(stack.url, **{W: 1.0})
        assert value(families, R) == 1.0
        assert "vllm:kv_cache_usage_perc" not in families
        assert stack.app is not None and stack.app[READER].reads == 0


# --- parsing, without sockets -------------------------------------------------------------------

VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen3-8b"} 3.0
vllm:num_requests_running{engine="1",model_name="qwen3-8b"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="qwen3-8b"} 1.0
vllm:num_requests_waiting{engine="1",model_name="qwen3-8b"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="qwen3-8b"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="qwen3-8b"} 0.5
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters="x"} 1.6e9
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="qwen3-8b"} 0.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="qwen3-8b"} 7.0
vllm:time_to_first_token_seconds_count{model_name="qwen3-8b"} 7.0
vllm:time_to_first_token_seconds_sum{model_name="qwen3-8b"} 1.5
"""


def test_vllm_text() -> None:
    load = parse_metrics(VLLM_TEXT)
    assert load.waiting == 1.0 and load.running == 5.0
    assert load.kv_usage == 0.5  # the fullest engine
    assert load.lora == ({"max_lora": "2", "running_lora_adapters": "sql",
                          "waiting_lora_adapters": ""}, 1.7e9)  # the latest
    assert load.cache_info is None


def test_older_vllm_kv_name() -> None:
    load = parse_metrics('vllm:gpu_cache_usage_perc{model_name="m"} 0.75\n'
                         'vllm:num_requests_waiting{model_name="m"} 4\n')
    assert load == BackendLoad(waiting=4.0, kv_usage=0.75)


def test_sglang_and_tgi_and_llama_server_texts() -> None:
    assert parse_metrics("# TYPE sglang:num_queue_reqs gauge\nsglang:num_queue_reqs 3\n"
                         "sglang:num_running_reqs 8\nsglang:token_usage 0.4\n") == \
        BackendLoad(3.0, 8.0, 0.4)
    assert parse_metrics("tgi_queue_size 2\ntgi_batch_current_size 6\n") == \
        BackendLoad(2.0, 6.0)
    assert parse_metrics("llamacpp:requests_processing 2\nllamacpp:requests_deferred 1\n"
                         "llamacpp:kv_cache_tokens 900\n") == BackendLoad(1.0, 2.0)


def test_values_that_cannot_be_load() -> None:
    # negative counts are none, a KV ratio is clamped to [0, 1], NaN is not a reading
    assert parse_metrics("vllm:num_requests_waiting -3\nvllm:kv_cache_usage_perc 7\n"
                         "vllm:num_requests_running NaN\n") == BackendLoad(0.0, None, 1.0)
    assert parse_metrics("vllm:num_requests_waiting{oops 3\n") == BackendLoad()
    assert parse_metrics("<html>not metrics</html>") == BackendLoad()
    assert parse_metrics("") == BackendLoad()


def test_slots() -> None:
    assert parse_slots(b'[{"id": 0, "is_processing": true}, {"id": 1, "is_processing": false},'
                       b' {"id": 2, "is_processing": true}]') == BackendLoad(running=2.0)
    assert parse_slots(b'[{"id": 0, "state": 1}, {"id": 1, "state": 0}]') == \
        BackendLoad(running=1.0)
    assert parse_slots(b'{"error": "no"}') == BackendLoad()
    assert parse_slots(b"[1, 2]") == BackendLoad()
    assert parse_slots(b"\xff") == BackendLoad()


def test_replicas_combine() -> None:
    a = BackendLoad(1.0, 2.0, 0.3, cache_info={"block_size": "16"})
    b = BackendLoad(None, 4.0, 0.6)
    assert combine([a, b]) == BackendLoad(1.0, 6.0, 0.6, None, {"block_size": "16"})
    assert combine([BackendLoad(), BackendLoad()]) == BackendLoad()


def test_a_stale_reading_is_unknown() -> None:
    reader = LoadReader.__new__(LoadReader)
    reader.interval, reader.load, reader.read_at = 1.0, BackendLoad(1.0, 1.0), 100.0
    assert reader.current(104.9) == BackendLoad(1.0, 1.0)
    assert reader.current(105.1) is None  # five intervals without a reading


@given(st.text(max_size=2000))
def test_any_text_parses_to_a_load(text: str) -> None:
    load = parse_metrics(text)
    assert load.kv_usage is None or 0.0 <= load.kv_usage <= 1.0
    assert load.waiting is None or load.waiting >= 0.0


ODD_LINES = ["garbage\n", 'vllm:num_requests_waiting{x="\\""} 2\n', "# TYPE x\n", "\n"]


@given(st.lists(st.sampled_from([*VLLM_TEXT.splitlines(keepends=True), *ODD_LINES]),
                max_size=40))
def test_shuffled_vllm_lines_never_break_the_reader(lines: list[str]) -> None:
    parse_metrics("".join(lines))


@given(st.binary(max_size=300))
def test_any_bytes_as_slots(raw: bytes) -> None:
    load = parse_slots(raw)
    assert load.running is None or load.running >= 0
