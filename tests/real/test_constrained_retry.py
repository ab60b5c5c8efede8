"""Constrained retries on the real llama-server and vLLM with the real Gemma model.

Each case is a field whose constraint llama-server's own JSON-schema converter drops (a
pattern with ``\\d``, an unanchored pattern, a date-time whose calendar its grammar does not
know): asked with the schema as the tool declares it, greedy decoding (temperature 0, fixed
seed) writes a value that breaks the field; asked with the schema ``translate`` makes for
llama-server, the same request must come back valid. Validity is judged twice: by toolmend's
validator and by the benchmark's independent judge (``retry_workload``).

Then the whole path: a few-shot history whose earlier calls wrote times as ``7pm`` gets the
model to write its own call that way; through toolmend the agent gets a valid call instead,
from one retry constrained by the translated schema. On vLLM (a strict tool under a named
``tool_choice``, as toolmend retries there) xgrammar's date grammars are shapes that let
February 30th through; the translated schema does not.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from toolmend.parsers.constraints import translate
from toolmend.parsers.schemas import compile_tools
from toolmend.parsers.validation import validate_call

from .helpers import ON_INVALID, post_json, raw_stream
from .retry_workload import JUDGE_FORMATS, TIME, YMD
from .stacks import Server

pytestmark = pytest.mark.real

CASES: dict[str, tuple[dict[str, Any], str]] = {
    # llama-server: "unsupported escape: \d ... accepting any string"
    "time": ({"type": "string", "pattern": TIME}, "Book a table at 7pm tonight."),
    # the same, and its "date" grammar is a shape: 02-30 passes it
    "date": ({"type": "string", "format": "date", "pattern": YMD},
             "Book a table on February 30th 2026."),
    # the date-time grammar takes any day 01-31 in any month
    "start": ({"type": "string", "format": "date-time"},
              "Schedule the call for February 30, 2026 at 7pm UTC."),
    # \d again, in a code: any string
    "code": ({"type": "string", "pattern": r"^[A-Z]{3}\d{2}$"},
             "Use the promo code summer sale."),
}


def _schema(field: str) -> dict[str, Any]:
    return {"type": "object", "properties": {field: CASES[field][0]}, "required": [field],
            "additionalProperties": False}


def _valid(field: str, content: str) -> bool:
    schema = _schema(field)
    tools = compile_tools([{"type": "function", "function": {"name": "f",
                                                              "parameters": schema}}])
    ours = validate_call("f", content, tools).ok
    try:
        value = json.loads(content)
    except ValueError:
        return False
    theirs = Draft202012Validator(schema, format_checker=JUDGE_FORMATS).is_valid(value)
    assert ours == theirs, (content, ours, theirs)
    return ours


async def _ask(server: Server, field: str, schema: dict[str, Any], **extra: Any) -> Any:
    body = {"messages": [{"role": "user",
                          "content": CASES[field][1] + " Reply with the JSON arguments."}],
            "json_schema": schema, "temperature": 0, "seed": 7, "max_tokens": 60, **extra}
    status, doc = await post_json(server.v1, body)
    assert status == 200, doc
    return doc


@pytest.mark.parametrize("field", list(CASES))
async def test_translated_constraint_holds_where_the_declared_one_did_not(
        llama_server: Server, field: str) -> None:
    declared = await _ask(llama_server, field, _schema(field))
    content = declared["choices"][0]["message"]["content"]
    assert not _valid(field, content), f"the declared schema held this time: {content!r}"
    translated = translate(_schema(field), "llama-server").schema
    doc = await _ask(llama_server, field, translated)
    content = doc["choices"][0]["message"]["content"]
    assert _valid(field, content), content


async def test_best_of_n_choices_all_hold_the_translated_constraint(
        llama_server: Server) -> None:
    """llama-server samples ``n`` choices in one request (what ``retry_samples`` asks for);
    each one is held by the translated grammar."""
    translated = translate(_schema("start"), "llama-server").schema
    doc = await _ask(llama_server, "start", translated, n=2, temperature=0.9)
    contents = [c["message"]["content"] for c in doc["choices"]]
    assert len(contents) == 2  # llama-server allows n up to its slot count
    assert [c for c in contents if not _valid("start", c)] == []


BOOK_TABLE = {"type": "function", "function": {
    "name": "book_table", "description": "Reserve a restaurant table",
    "parameters": {"type": "object", "properties": {
        "restaurant": {"type": "string"},
        "time": {"type": "string", "pattern": TIME}},
        "required": ["restaurant", "time"], "additionalProperties": False}}}


def _history() -> list[dict[str, Any]]:
    """Two earlier calls that wrote times the way people say them (the history is the
    agent's, not checked): the model then writes its own the same way."""
    msgs: list[dict[str, Any]] = []
    for i, (place, at) in enumerate((("Nomad", "8pm"), ("Geranium", "6.30pm"))):
        msgs += [
            {"role": "user", "content": f"Book {place} at {at}."},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call_{i}", "type": "function", "function": {
                    "name": "book_table",
                    "arguments": json.dumps({"restaurant": place, "time": at})}}]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": '{"status": "ok"}'},
            {"role": "assistant", "content": f"Booked {place} at {at}."},
        ]
    return [*msgs, {"role": "user", "content": "Book Alinea at 7pm."}]


async def test_an_invalid_call_comes_back_valid_through_toolmend(
        llama_server: Server, make_proxy: Any) -> None:
    body = {"messages": _history(), "tools": [BOOK_TABLE], "max_tokens": 60,
            "temperature": 0, "seed": 7, "stop": ["</tool_call>"]}
    direct = await raw_stream(llama_server.v1, body)
    (call,) = direct.tool_calls()
    assert call["name"] == "book_table"
    assert json.loads(call["arguments"])["time"] == "7pm"  # what the model writes, unhelped
    proxy = await make_proxy(llama_server)
    raw = await raw_stream(proxy.v1, body, headers={ON_INVALID: "retry"})
    assert raw.error is None, raw.error
    (fixed,) = raw.tool_calls()
    args = json.loads(fixed["arguments"])
    assert Draft202012Validator(BOOK_TABLE["function"]["parameters"],  # type: ignore[index]
                                format_checker=JUDGE_FORMATS).is_valid(args), args
    # the retry was focused: only ``time`` was asked for again, the rest kept as the model
    # wrote it (the small model copies a restaurant from the history: kept all the same)
    assert args["restaurant"] == json.loads(call["arguments"])["restaurant"]
    assert [c for c in raw.comments if c.startswith("toolmend retr")] == [
        "toolmend retry 1/1 book_table: at /time: '7pm' does not match "
        "'^([01]\\\\d|2[0-3]):[0-5]\\\\d$'",
        "toolmend retried book_table: valid on attempt 1"]


# --- vLLM ----------------------------------------------------------------------------------------
# A named tool_choice on a strict tool is how toolmend's retry asks vLLM (structured outputs
# beside tools are refused). xgrammar's own date and date-time grammars are shapes: a day 30
# in February passes them. The translated schema's exact pattern does not let it.

async def _vllm_call(server: Server, field: str, schema: dict[str, Any]) -> str:
    tool = {"type": "function", "function": {"name": "f", "parameters": schema,
                                             "strict": True}}
    body = {"messages": [{"role": "user", "content": CASES[field][1]}], "tools": [tool],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "temperature": 0, "seed": 7, "max_tokens": 60}
    status, doc = await post_json(server.v1, body)
    assert status == 200, doc
    (call,) = doc["choices"][0]["message"]["tool_calls"]
    return str(call["function"]["arguments"])


@pytest.mark.parametrize("field", ["date", "start"])
async def test_vllm_translated_constraint_holds_where_the_declared_one_did_not(
        vllm: Server, field: str) -> None:
    declared = await _vllm_call(vllm, field, _schema(field))
    assert not _valid(field, declared), f"the declared schema held this time: {declared!r}"
    translated = await _vllm_call(vllm, field, translate(_schema(field), "vllm").schema)
    assert _valid(field, translated), translated
