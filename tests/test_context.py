"""The request context is typed, and every field a span or metric reads is written somewhere.

The context used to carry an untyped ``extra`` dict; telemetry read keys from it that nothing
wrote, so ``toolmend.priority`` and ``toolmend.slot`` were always empty on spans.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from toolmend.scheduling.scheduler import load_agent_policies
from toolmend.server.context import RequestContext
from toolmend.server.keys import SCHEDULER
from toolmend.telemetry.tracing import TELEMETRY

from .test_telemetry import Factory, Receiver, attrs, make_tstack, receiver, step_spans

__all__ = ["make_tstack", "receiver"]  # fixtures, used by name

PROXY = Path(__file__).resolve().parent.parent / "proxy"
#: fields the context is constructed with (the error middleware passes them)
CONSTRUCTED = {"request_id", "path", "started", "client"}


def test_the_context_has_no_untyped_bus() -> None:
    names = {f.name for f in dataclasses.fields(RequestContext)}
    assert "extra" not in names


def test_every_field_is_written_by_some_stage() -> None:
    """Each field (beyond the constructor's) is assigned or appended to outside context.py."""
    sources = "\n".join(p.read_text() for p in PROXY.rglob("*.py")
                        if p.name != "context.py")
    unwritten = []
    for f in dataclasses.fields(RequestContext):
        if f.name in CONSTRUCTED:
            continue
        written = re.search(
            rf"\.{f.name}\s*(,[^=\n]*)?(=[^=]|\+=)|\.{f.name}\.(append|extend|update)\(", sources)
        if written is None:
            unwritten.append(f.name)
    assert unwritten == []


def test_every_field_telemetry_reads_exists() -> None:
    """A read of ``ctx.<name>`` in telemetry names a field of the context."""
    names = {f.name for f in dataclasses.fields(RequestContext)}
    methods = {"ms"}
    text = "\n".join(p.read_text() for p in (PROXY / "telemetry").rglob("*.py"))
    read = set(re.findall(r"\bctx\.([a-z0-9_]+)", text))
    assert read, "telemetry reads no context field: the pattern is wrong"
    assert read - names - methods == set()


async def test_a_request_through_the_scheduler_carries_priority_and_slot(
        make_tstack: Factory, receiver: Receiver, tmp_path: Path) -> None:
    cfg = tmp_path / "toolmend.toml"
    cfg.write_text("[agents.planner]\nmax_priority = 2\n")
    stack = await make_tstack(otlp_endpoint=receiver.url, slots=2)
    stack.app[SCHEDULER].policies = load_agent_policies(cfg)
    stack.sim.push({"content": "one"})
    await stack.client(**{"X-Priority": "1", "X-Agent-Id": "planner"}).chat.completions.create(
        model="sim-model", messages=[{"role": "user", "content": "hi"}])
    await stack.flush()
    assert stack.app[TELEMETRY].tracing
    (span,) = step_spans(receiver)
    a = attrs(span)
    assert a["toolmend.priority"] == 1
    assert a["toolmend.slot"] == 0
