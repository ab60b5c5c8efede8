"""Identity without settings: every row of the trust table, through the real proxy.

Each case sends a chat request to toolmend (real aiohttp server in front of the sim) and reads
back, from ``GET /toolmend/v1/sessions``, the agent id, session id and session source toolmend
assigned. The fingerprint fallback is tested with two identical runs interleaved and with a step
retried after a 429.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Stack
from tests.test_hostile_clients import http_post, raw_exchange, split_response
from toolmend.server import auth, identity
from toolmend.server.app import build_app, start_server
from toolmend.server.config import Settings
from toolmend.server.identity import TRUST_TABLE, FingerprintSessions, history_digests
from toolmend.sim.server import SimBackend

MSG = [{"role": "system", "content": "you are a coder"},
       {"role": "user", "content": "fix the bug"}]
KEY = "tm-ident-key-5a5a5a5a"


async def sessions(stack: Stack) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(stack.url + "/toolmend/v1/sessions") as r:
        assert r.status == 200
        return (await r.json())["data"]


async def steps_recorded(stack: Stack, count: int) -> list[dict[str, Any]]:
    """The session list once ``count`` steps are recorded in all (recording ends the request
    after the reply is written, so the test waits for that condition, not for a time)."""
    while True:
        data = await sessions(stack)
        if sum(d["steps"] for d in data) >= count:
            return data
        await asyncio.sleep(0.01)


async def post(stack: Stack, body: dict[str, Any], headers: dict[str, str] | None = None,
               status: int = 200) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.post(
            stack.v1 + "/chat/completions", json={"model": "sim-model", **body},
            headers=headers or {}) as r:
        doc = await r.json()
        assert r.status == status, doc
        return doc


# (case, headers, extra body fields, expected agent, session, session source, agent source
# when the agent is the session: None)
ROWS: list[tuple[str, dict[str, str], dict[str, Any], str | None, str | None, str]] = [
    ("explicit", {"X-Agent-Id": "planner", "X-Session-Id": "s-explicit"}, {},
     "planner", "s-explicit", "header"),
    ("explicit wins over clients", {"X-Agent-Id": "planner", "X-Session-Id": "s-1",
                                    "session-id": "codex-1", "baggage": "session.id=b-1"},
     {"prompt_cache_key": "pck-1"}, "planner", "s-1", "header"),
    ("opencode x-session-id", {"x-session-id": "oc-1"}, {}, None, "oc-1", "header"),
    ("opencode x-session-affinity", {"x-session-affinity": "oc-aff-1"}, {},
     None, "oc-aff-1", "opencode"),
    ("codex session-id", {"session-id": "cx-sess-1", "thread-id": "cx-thread-1"}, {},
     None, "cx-sess-1", "codex"),
    ("codex thread-id", {"thread-id": "cx-thread-2"}, {}, None, "cx-thread-2", "codex"),
    ("codex turn metadata", {"x-codex-turn-metadata": '{"session_id": "cx-meta-1", '
                                                      '"thread_id": "t", "turn_id": "u"}'},
     {}, None, "cx-meta-1", "codex"),
    ("codex prompt_cache_key", {}, {"prompt_cache_key": "cx-pck-1"}, None, "cx-pck-1", "codex"),
    ("claude code header", {"X-Claude-Code-Session-Id": "cc-1"}, {}, None, "cc-1", "claude-code"),
    ("claude code metadata.user_id", {},
     {"metadata": {"user_id": '{"device_id": "d", "session_id": "cc-meta-1"}'}},
     None, "cc-meta-1", "claude-code"),
    ("baggage", {"baggage": "user.id=alice,session.id=bag%2D1;p=1"}, {},
     "alice", "bag-1", "baggage"),
    ("baggage gen_ai names", {"baggage": "gen_ai.agent.id=bot-7,gen_ai.conversation.id=conv-7"},
     {}, "bot-7", "conv-7", "baggage"),
    ("user on chat names the agent", {"x-session-affinity": "u-sess"}, {"user": "dev-9"},
     "dev-9", "u-sess", "opencode"),
    ("agent header with a client session", {"X-Agent-Id": "coder", "thread-id": "th-3"}, {},
     "coder", "th-3", "codex"),
    ("traceparent", {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
     {}, None, "0af7651916cd43dd8448eb211c80319c", "trace"),
]


@pytest.mark.parametrize(("case", "headers", "extra", "agent", "session", "source"), ROWS,
                         ids=[r[0] for r in ROWS])
async def test_trust_table_row(stack: Stack, case: str, headers: dict[str, str],
                               extra: dict[str, Any], agent: str | None, session: str,
                               source: str) -> None:
    await post(stack, {"messages": MSG, **extra}, headers)
    [rec] = await steps_recorded(stack, 1)
    assert rec["id"] == session
    assert rec["source"] == source
    # when nothing names the agent, the session is the agent
    assert rec["agent_id"] == (agent if agent is not None else session)


async def test_fingerprint_row_the_session_is_the_agent(stack: Stack) -> None:
    await post(stack, {"messages": MSG})
    [rec] = await steps_recorded(stack, 1)
    assert rec["source"] == "fingerprint"
    assert rec["id"].startswith("fp-")
    assert rec["agent_id"] == rec["id"]  # not 127.0.0.1
    assert rec["agent_id"] != "127.0.0.1"


async def test_user_names_the_agent_and_the_fingerprint_the_session(stack: Stack) -> None:
    await post(stack, {"messages": MSG, "user": "dev-1"})
    [rec] = await steps_recorded(stack, 1)
    assert rec["agent_id"] == "dev-1" and rec["source"] == "fingerprint"


async def test_key_bound_agent_cannot_be_overridden(tmp_path: Path) -> None:
    cfg = tmp_path / "toolmend.toml"
    cfg.write_text(f'[keys."{auth.hash_key(KEY)}"]\nagent = "keyed"\n')
    sim = SimBackend("vllm", ttft=0.0)
    await sim.start()
    conf = Settings(log_requests=False)
    conf.config_path = str(cfg)
    runner, port = await start_server(build_app(conf, [sim.url]), "127.0.0.1", 0)
    try:
        await _keyed_case(Stack(sim, f"http://127.0.0.1:{port}", conf))
    finally:
        await runner.cleanup()
        await sim.stop()


async def _keyed_case(stack: Stack) -> None:
    auth_h = {"Authorization": f"Bearer {KEY}"}
    # the client's own names never replace the key's agent; they still name the session
    await post(stack, {"messages": MSG, "user": "someone-else"},
               {**auth_h, "baggage": "user.id=mallory,session.id=bag-k"})
    await post(stack, {"messages": MSG}, {**auth_h, "X-Agent-Id": "mallory"}, status=403)
    data = await steps_recorded(stack, 1)
    recs = [d for d in data if d["id"] == "bag-k"]
    assert [(r["agent_id"], r["source"]) for r in recs] == [("keyed", "baggage")]


def run_messages(step: int) -> list[dict[str, Any]]:
    """The history a deterministic agent sends at ``step`` (1-based): identical for every run."""
    msgs = list(MSG)
    for i in range(1, step):
        msgs.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{i}", "type": "function",
             "function": {"name": "read_file", "arguments": '{"path": "a.py"}'}}]})
        msgs.append({"role": "tool", "tool_call_id": f"call_{i}", "content": f"result {i}"})
    return msgs


async def test_two_identical_runs_interleaved_stay_two_sessions(stack: Stack) -> None:
    """Two runs with the same opening and the same replies, step by step in turn: two sessions
    of 3 steps each (one merged 6-step session before)."""
    for step in (1, 2, 3):
        for _run in ("A", "B"):
            await post(stack, {"messages": run_messages(step)})
    data = await steps_recorded(stack, 6)
    assert sorted((d["source"], d["steps"], d["last_step"]) for d in data) == [
        ("fingerprint", 3, 3), ("fingerprint", 3, 3)]
    assert len({d["id"] for d in data}) == 2
    assert all(d["agent_id"] == d["id"] for d in data)  # two agents for fairness, too


async def test_a_new_run_after_a_finished_one_is_a_new_session(stack: Stack) -> None:
    for step in (1, 2):
        await post(stack, {"messages": run_messages(step)})
    await post(stack, {"messages": run_messages(1)})  # same opening, not a continuation
    data = await steps_recorded(stack, 3)
    assert sorted(d["steps"] for d in data) == [1, 2]


async def test_a_retried_step_stays_in_its_session_as_the_same_step(stack: Stack) -> None:
    """Step 2 gets a 429 and is resent (as an SDK does): one session, step 2 twice, then 3."""
    await post(stack, {"messages": run_messages(1)})
    stack.sim.push({"fault": {"kind": "status", "status": 429, "message": "slow down"}})
    await post(stack, {"messages": run_messages(2)}, status=429)
    await post(stack, {"messages": run_messages(2)})
    await post(stack, {"messages": run_messages(3)})
    [rec] = await steps_recorded(stack, 4)
    assert rec["source"] == "fingerprint" and rec["steps"] == 4 and rec["last_step"] == 3
    async with aiohttp.ClientSession() as s, s.get(
            stack.url + "/toolmend/v1/sessions/" + rec["id"]) as r:
        detail = await r.json()
    assert [(st_["step"], st_["status"]) for st_ in detail["steps"]] == [
        (1, 200), (2, 429), (2, 200), (3, 200)]


@pytest.mark.parametrize(("header", "value"), [
    (b"x-session-affinity", b"\xff"), (b"session-id", b"s\xfe"), (b"thread-id", b"\xc3"),
    (b"x-codex-turn-metadata", b'{"session_id": "\xff"}'),
    (b"X-Claude-Code-Session-Id", b"\xc0\xaf"), (b"baggage", b"session.id=\xff"),
])
async def test_client_identity_header_that_is_not_text_is_refused(
        stack: Stack, header: bytes, value: bytes) -> None:
    port = int(stack.url.rsplit(":", 1)[1])
    raw = await raw_exchange(port, http_post("/v1/chat/completions",
                                             orjson.dumps({"messages": MSG}),
                                             header + b": " + value))
    status, doc = split_response(raw)
    assert status == 400, raw
    assert doc["error"]["code"] == "invalid_header"
    assert doc["error"]["param"] == header.decode()
    assert header.decode() in doc["error"]["message"]
    assert await sessions(stack) == []


async def test_over_long_client_session_is_truncated_like_x_session_id(stack: Stack) -> None:
    await post(stack, {"messages": MSG}, {"session-id": "c" * 500})
    [rec] = await steps_recorded(stack, 1)
    assert rec["id"] == "c" * 128 and rec["agent_id"] == "c" * 128


# --- the table and the tracker, without sockets ---------------------------------------------------

def test_trust_table_order() -> None:
    assert [r[0] for r in TRUST_TABLE] == sorted(r[0] for r in TRUST_TABLE)
    assert TRUST_TABLE[0][1] == "key" and TRUST_TABLE[-1][1] == "fingerprint"
    assert set(identity.CLIENT_HEADERS) <= set(auth.IDENTITY_HEADERS)


def test_readme_carries_the_trust_table() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for _rank, source, _agent, _session in TRUST_TABLE:
        assert f"| {source} |" in readme, source


def test_fingerprints_are_bounded() -> None:
    fp = FingerprintSessions(limit=3)
    for i in range(10):
        fp.claim("h", {"messages": [{"role": "user", "content": f"task {i}"}]})
    assert len(fp) == 3
    assert sum(len(q) for q in fp._by_last.values()) == 3


def test_a_failed_step_among_many_identical_runs_is_resent_in_its_own_session() -> None:
    """Many runs of one task share their opening; the one whose step failed gets its resend,
    and the others stay where they were (and the failed index is emptied by the resend)."""
    fp = FingerprintSessions(limit=1000)
    body = {"messages": [{"role": "user", "content": "fix the bug"}]}
    claims = [fp.claim("a", body) for _ in range(500)]
    assert len({c.session for c in claims}) == 500
    for i, c in enumerate(claims):
        fp.finished(c, ok=(i != 317))
    again = fp.claim("a", body)
    assert (again.session, again.step, again.resend) == (claims[317].session, 1, True)
    fresh = fp.claim("a", body)  # no failed step left: a new run
    assert fresh.resend is False and fresh.session not in {c.session for c in claims}


def test_forgetting_a_failed_session_forgets_its_resend() -> None:
    fp = FingerprintSessions(limit=2)
    body = {"messages": [{"role": "user", "content": "go"}]}
    first = fp.claim("a", body)
    fp.finished(first, ok=False)
    fp.claim("a", {"messages": [{"role": "user", "content": "other"}]})
    fp.claim("a", {"messages": [{"role": "user", "content": "third"}]})  # evicts the first
    assert fp.claim("a", body).resend is False


def test_history_digests_are_prefix_digests() -> None:
    d_long, roles = history_digests("h", {"messages": run_messages(2)})
    d_short, _ = history_digests("h", {"messages": run_messages(1)})
    assert d_long[:3] == d_short and roles == ["system", "user", "assistant", "tool"]
    assert history_digests("other", {"messages": run_messages(1)})[0] != d_short


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.text(max_size=300))
def test_parsing_random_text_never_raises(text: str) -> None:
    identity._baggage(text)
    identity._json_str(text)
    identity._json_str("{" + text)
    history_digests(text, {"messages": [text, {"role": text}, None]})
    history_digests(text, {"prompt": text})


async def test_a_step_resent_after_a_dropped_connection_stays_the_same_step(
        stack: Stack) -> None:
    """The client drops the connection while step 1 waits on the backend, then resends it."""
    stack.sim.push({"fault": {"kind": "stall", "seconds": 3600}})
    port = int(stack.url.rsplit(":", 1)[1])
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(http_post("/v1/chat/completions",
                           orjson.dumps({"model": "sim-model", "messages": run_messages(1)})))
    await writer.drain()
    while True:  # until the request reached the backend
        if stack.sim.stats.in_flight:
            break
        await asyncio.sleep(0.01)
    writer.close()
    await steps_recorded(stack, 1)  # toolmend saw the client leave
    await post(stack, {"messages": run_messages(1)})
    await post(stack, {"messages": run_messages(2)})
    [rec] = await steps_recorded(stack, 3)
    async with aiohttp.ClientSession() as s, s.get(
            stack.url + "/toolmend/v1/sessions/" + rec["id"]) as r:
        detail = await r.json()
    assert [(st_["step"], st_["status"]) for st_ in detail["steps"]] == [
        (1, 499), (1, 200), (2, 200)]
