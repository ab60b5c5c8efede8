"""Tool-argument validation: schema compiling and its limits, call verdicts, coercion, policy."""

from __future__ import annotations

import copy
import dataclasses
import json
from importlib import resources
from typing import Any

import jsonschema._keywords
import jsonschema._utils
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolmend.parsers.policy import (
    ERROR_STATUS,
    READ_ARGUMENTS,
    READ_TEXT,
    READ_TOOL_CALL,
    Outcome,
    Policy,
    decide,
    error_body,
    parse_policy,
    retry_plan,
)
from toolmend.parsers.schemas import (
    SchemaError,
    SchemaLimits,
    ValidatorCache,
    compile_schema,
    compile_tools,
)
from toolmend.parsers.validation import (
    PARSE_JSON_STRING,
    STRING_TO_INTEGER,
    Verdict,
    validate_call,
    validate_reply,
)

CORPUS = json.loads(
    (resources.files("toolmend.fixtures") / "validation" / "corpus.json").read_text("utf-8"))
CASES = CORPUS["cases"]


def tool(name: str, parameters: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def canonical(value: Any) -> bytes:
    """Strict equality for JSON values (``True == 1`` and ``1 == 1.0`` in Python)."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def toolset_for(case: dict[str, Any]) -> Any:
    return compile_tools(CORPUS["tools"][case["tools"]], case.get("tool_choice"))


# ---------------------------------------------------------------------------------------------
# The corpus, under every policy


def test_corpus_covers_the_schema_features() -> None:
    invalid = [c for c in CASES if not c["expect"]["valid"]]
    assert len(invalid) >= 40
    assert len(CASES) - len(invalid) >= 5
    features = {c["feature"] for c in invalid}
    for feature in ("required", "type", "enum", "const", "min/max", "pattern", "nested objects",
                    "array", "oneOf", "anyOf", "additionalProperties false", "$ref/$defs"):
        assert feature in features, feature
    assert len({c["id"] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("policy", list(Policy), ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_corpus(case: dict[str, Any], policy: Policy) -> None:
    toolset = toolset_for(case)
    name, arguments = case["call"]["name"], case["call"]["arguments"]
    expect = case["expect"]
    verdict = validate_call(name, arguments, toolset, coerce=policy.coerces)
    decision = decide(verdict, policy, toolset, backend="vllm")

    if expect["valid"]:
        assert decision.outcome is Outcome.FORWARD
        assert decision.arguments == arguments  # byte for byte
        assert decision.note == ""
        return

    plain = validate_call(name, arguments, toolset)
    assert not plain.ok
    assert plain.error is not None
    assert (plain.error.pointer, plain.error.keyword) == (
        expect["error"]["pointer"], expect["error"]["keyword"])

    if policy is Policy.PASS:
        assert expect["pass"] == "unchanged"
        assert decision.outcome is Outcome.FORWARD
        assert decision.arguments == arguments
        assert decision.note.startswith("invalid ")
    elif policy is Policy.ERROR:
        assert decision.outcome is Outcome.ERROR
        assert decision.status == ERROR_STATUS
        body = decision.error["error"]
        assert body["code"] == body["type"] == "invalid_tool_call"
        assert body["pointer"] == expect["error"]["pointer"]
        assert body["keyword"] == expect["error"]["keyword"]
        assert body["tool"] == name
    elif policy is Policy.RETRY:
        assert expect["retry"] == "retry"
        assert decision.outcome is Outcome.RETRY
        assert decision.retry is not None
        if plain.error.pointer:
            assert plain.error.pointer in decision.retry.correction
        exhausted = decide(plain, policy, toolset, backend="vllm", attempt=1)
        assert exhausted.outcome is Outcome.ERROR
    else:  # repair
        if expect["repair"] == "retry":
            assert decision.outcome is Outcome.RETRY
            assert decision.verdict.errors == plain.errors  # the correction names the original
        else:
            assert decision.outcome is Outcome.REPAIRED
            assert canonical(json.loads(decision.arguments)) == canonical(
                expect["repair"]["arguments"])
            assert [[r.kind, r.pointer] for r in verdict.repairs] == expect["repair"]["repairs"]
            assert validate_call(name, decision.arguments, toolset).ok  # repaired is valid
            assert decision.note.startswith(f"repaired {name}: ")


# ---------------------------------------------------------------------------------------------
# Compiling schemas


def test_invalid_schema_names_the_tool_and_the_place() -> None:
    tools = [tool("ok", {"type": "object"}),
             tool("broken", {"type": "object", "properties": {"n": {"type": "nope"}}})]
    with pytest.raises(SchemaError) as caught:
        compile_tools(tools)
    assert caught.value.tool == "broken"
    assert caught.value.pointer == "/tools/1/function/parameters/properties/n/type"
    assert "broken" in str(caught.value)


def test_dialect_comes_from_dollar_schema() -> None:
    # draft-04 spells exclusiveMinimum as a boolean; 2020-12 rejects that
    draft4 = {"$schema": "http://json-schema.org/draft-04/schema#", "type": "object",
              "properties": {"n": {"type": "number", "minimum": 0, "exclusiveMinimum": True}}}
    toolset = compile_tools([tool("t", draft4)])
    assert not validate_call("t", '{"n": 0}', toolset).ok
    assert validate_call("t", '{"n": 1}', toolset).ok
    with pytest.raises(SchemaError, match="invalid schema"):
        compile_tools([tool("t", {**draft4, "$schema": "https://json-schema.org/draft/2020-12/schema"})])
    with pytest.raises(SchemaError, match="unsupported \\$schema"):
        compile_tools([tool("t", {"$schema": "https://example.com/my-dialect"})])


@pytest.mark.parametrize(("parameters", "message", "pointer"), [
    ({"$ref": "https://example.com/s.json"}, "not local", "/$ref"),
    ({"$ref": "#/$defs/missing"}, "does not resolve", "/$ref"),
    ({"properties": {"a": {"$schema": "http://json-schema.org/draft-07/schema#"}}},
     "only allowed at the top", "/properties/a/$schema"),
    ({"patternProperties": {"^x": {}}, "unevaluatedProperties": False},
     "cannot be combined", "/unevaluatedProperties"),
])
def test_refused_constructs(parameters: dict[str, Any], message: str, pointer: str) -> None:
    with pytest.raises(SchemaError, match=message) as caught:
        compile_tools([tool("t", parameters)])
    assert caught.value.pointer == "/tools/0/function/parameters" + pointer


@pytest.mark.parametrize(("tools", "choice", "message"), [
    ([tool("a", {}), tool("a", {})], None, "two tools have this name"),
    ([{"type": "retrieval"}], None, "unsupported tool type"),
    ([{"type": "function", "function": {"parameters": {}}}], None, "non-empty string 'name'"),
    ([tool("a", {})], {"type": "function", "function": {"name": "b"}}, "not in 'tools'"),
    ([], "required", "needs at least one tool"),
    ([tool("a", {})], "sometimes", "unsupported tool_choice"),
])
def test_request_shape_errors(tools: list[Any], choice: Any, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        compile_tools(tools, choice)


def test_cache_hit_across_requests() -> None:
    cache = ValidatorCache()
    schema = CORPUS["tools"]["calendar"][0]["function"]["parameters"]
    reordered = dict(reversed(list(copy.deepcopy(schema).items())))  # same schema, new dict
    first = compile_tools([tool("create_event", schema)], cache=cache)
    second = compile_tools([tool("create_event", reordered)], cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)
    assert first.tools["create_event"].compiled is second.tools["create_event"].compiled
    # the same schema under another tool name is the same compiled validator too
    third = compile_tools([tool("other_name", schema)], cache=cache)
    assert third.tools["other_name"].compiled is first.tools["create_event"].compiled
    # the cached copy is private: mutating the request's dict changes nothing
    schema_copy = copy.deepcopy(schema)
    fourth = compile_tools([tool("e", schema_copy)], cache=cache)
    schema_copy["required"].append("start")
    assert validate_call("e", '{"title": "t", "date": "2026-01-01"}', fourth).ok


def test_cache_is_bounded_and_can_be_off() -> None:
    cache = ValidatorCache(maxsize=2)
    for n in range(3):
        compile_schema({"type": "object", "maxProperties": n}, cache=cache)
    assert len(cache) == 2
    assert cache.misses == 3
    assert compile_schema({"type": "object"}, cache=None) is not compile_schema(
        {"type": "object"}, cache=None)


def test_limit_number_of_tools() -> None:
    limits = SchemaLimits(max_tools=3)
    compile_tools([tool(f"t{i}", {}) for i in range(3)], limits=limits)
    with pytest.raises(SchemaError, match="4 tools, over the limit of 3") as caught:
        compile_tools([tool(f"t{i}", {}) for i in range(4)], limits=limits)
    assert caught.value.tool is None


def test_limit_schema_size() -> None:
    limits = SchemaLimits(max_schema_bytes=1000)
    big = {"type": "object", "description": "x" * 1000}
    with pytest.raises(SchemaError, match="over the limit of 1000") as caught:
        compile_tools([tool("big", big)], limits=limits, cache=None)
    assert caught.value.tool == "big"


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_limit_depth() -> None:
    limits = SchemaLimits(max_depth=20)
    compile_tools([tool("ok", nested(9))], limits=limits, cache=None)  # 2 levels per object
    with pytest.raises(SchemaError, match="nested deeper than the limit of 20") as caught:
        compile_tools([tool("deep", nested(10))], limits=limits, cache=None)
    assert caught.value.tool == "deep"
    assert caught.value.pointer.startswith("/tools/0/function/parameters/properties/a/")
    with pytest.raises(SchemaError, match="deep"):  # beyond what JSON encoding allows at all
        compile_tools([tool("deeper", nested(300))])
    # a schema cached under generous limits is still refused under strict ones
    cache = ValidatorCache()
    compile_tools([tool("deep", nested(10))], cache=cache)
    with pytest.raises(SchemaError, match="nested deeper"):
        compile_tools([tool("deep", nested(10))], limits=limits, cache=cache)


@pytest.mark.parametrize("pattern", [r"^(a)\1$", r"^(?=a)", r"(?<!x)y", r"(?P<n>a)(?P=n)"])
def test_patterns_re2_cannot_compile_are_refused(pattern: str) -> None:
    with pytest.raises(SchemaError, match="RE2") as caught:
        compile_tools([tool("t", {"properties": {"s": {"pattern": pattern}}})])
    assert caught.value.pointer == "/tools/0/function/parameters/properties/s/pattern"
    with pytest.raises(SchemaError, match="RE2") as caught:
        compile_tools([tool("t", {"patternProperties": {pattern: {}}})])
    assert caught.value.pointer.startswith("/tools/0/function/parameters/patternProperties/")


def test_limit_pattern_length() -> None:
    with pytest.raises(SchemaError, match="longer than the limit"):
        compile_tools([tool("t", {"properties": {"s": {"pattern": "a" * 100}}})],
                      limits=SchemaLimits(max_pattern_bytes=50), cache=None)


# ---------------------------------------------------------------------------------------------
# Patterns run on RE2


REDOS = "^(a+)+$"


def test_redos_pattern_is_linear_and_correct() -> None:
    toolset = compile_tools([tool("t", {
        "type": "object",
        "properties": {"s": {"type": "string", "pattern": REDOS}},
        "patternProperties": {REDOS: {"type": "integer"}},
        "additionalProperties": False,
    })])
    hostile = "a" * 50_000 + "!"
    verdict = validate_call("t", json.dumps({"s": hostile}), toolset)
    assert not verdict.ok
    assert (verdict.error.pointer, verdict.error.keyword) == ("/s", "pattern")
    assert len(verdict.error.message) < 300  # the 50 kB value is not echoed back
    assert validate_call("t", json.dumps({"s": "a" * 50_000}), toolset).ok
    # the same pattern as a property-name regex, in patternProperties and additionalProperties
    assert validate_call("t", json.dumps({"s": "a", "a" * 5000: 1}), toolset).ok
    verdict = validate_call("t", json.dumps({"s": "a", "a" * 5000 + "!": 1}), toolset)
    assert verdict.error.keyword == "additionalProperties"


def test_python_re_never_runs_a_schema_pattern(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoRe:
        def search(self, *args: object) -> None:
            raise AssertionError("Python re ran a schema pattern")

    monkeypatch.setattr(jsonschema._keywords, "re", NoRe())
    monkeypatch.setattr(jsonschema._utils, "re", NoRe())
    case = next(c for c in CASES if c["id"] == "pattern-properties-type")
    toolset = toolset_for(case)
    for call in ('{"id": "ABC-1234", "x-a": "b"}', '{"id": "abc", "x-a": 1, "y": 2}'):
        validate_call("tag_ticket", call, toolset, coerce=True)


# ---------------------------------------------------------------------------------------------
# The fast gate and the Python validator agree; where they do not, Python decides


def without_gate(toolset: Any) -> Any:
    return dataclasses.replace(toolset, tools={
        name: dataclasses.replace(t, compiled=dataclasses.replace(t.compiled, gate=None))
        for name, t in toolset.tools.items()})


def test_every_corpus_schema_has_a_gate() -> None:
    for tools in CORPUS["tools"].values():
        for compiled in compile_tools(tools).tools.values():
            assert compiled.compiled.gate is not None


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_same_verdict_without_the_gate(case: dict[str, Any]) -> None:
    toolset = toolset_for(case)
    call = case["call"]
    assert validate_call(call["name"], call["arguments"], toolset) == validate_call(
        call["name"], call["arguments"], without_gate(toolset))


@pytest.mark.parametrize(("fmt", "value", "ok"), [
    ("uri", "not a uri", False), ("uri", "https://example.com/a", True),
    ("time", "10:10:00", False), ("time", "10:10:00Z", True),
    ("date", "2026-02-30", False), ("date-time", "2026-10-03T19:00:00+02:00", True),
    ("x-house-number", "12b", True),  # an unknown format is an annotation
])
def test_gate_and_python_validator_agree_on_formats(fmt: str, value: str, ok: bool) -> None:
    """The Rust gate checks formats with the Python checker's own functions, so neither lets
    through what the other refuses (the gate used to refuse ``10:10:00`` as a ``time`` and the
    Python validator, which did not check ``time``, then passed it)."""
    toolset = compile_tools([tool("open", {"properties": {"u": {"format": fmt}}})])
    assert toolset.tools["open"].compiled.gate.is_valid({"u": value}) is ok
    assert validate_call("open", orjson.dumps({"u": value}).decode(), toolset).ok is ok
    assert validate_call("open", orjson.dumps({"u": value}).decode(),
                         without_gate(toolset)).ok is ok


# ---------------------------------------------------------------------------------------------
# Names and tool_choice


FILES = CORPUS["tools"]["files"]


def test_unknown_tool() -> None:
    verdict = validate_call("rm_rf", "{}", compile_tools(FILES))
    assert not verdict.ok
    assert verdict.error.keyword == "name"
    assert "'read_file'" in verdict.error.message


def test_tool_choice_none() -> None:
    toolset = compile_tools(FILES, "none")
    assert validate_call("read_file", '{"path": "a"}', toolset).error.keyword == "tool_choice"
    assert validate_reply([], toolset).ok
    reply = validate_reply(["read_file"], toolset)
    assert not reply.ok
    plan = retry_plan(reply, toolset, "vllm")
    assert plan.read_as == READ_TEXT
    assert "tools" in plan.remove
    assert "text" in plan.correction


def test_tool_choice_required() -> None:
    toolset = compile_tools(FILES, "required")
    assert validate_reply(["write_file"], toolset).ok
    reply = validate_reply([], toolset)
    assert not reply.ok
    assert reply.error.keyword == "tool_choice"
    plan = decide(reply, Policy.REPAIR, toolset, backend="vllm").retry
    assert plan is not None
    assert plan.set == {"tool_choice": "required"}
    assert "must call a tool" in plan.correction
    assert retry_plan(reply, toolset, "ollama").set == {}  # nothing to constrain with


def test_tool_choice_named() -> None:
    toolset = compile_tools(FILES, {"type": "function", "function": {"name": "write_file"}})
    assert validate_call("write_file", '{"path": "a", "content": ""}', toolset).ok
    wrong = validate_call("read_file", '{"path": "a"}', toolset)
    assert wrong.error.keyword == "tool_choice"
    assert not validate_reply([], toolset).ok
    plan = retry_plan(wrong, toolset, "vllm")
    assert plan.tool == "write_file"
    assert plan.set["tool_choice"] == {"type": "function", "function": {"name": "write_file"}}


# ---------------------------------------------------------------------------------------------
# Coercion details


WEATHER = compile_tools(CORPUS["tools"]["weather"])


def test_coercion_keeps_big_integers_exact() -> None:
    toolset = compile_tools([tool("t", {"properties": {"id": {"type": "integer"},
                                                       "n": {"type": "integer"}}})])
    verdict = validate_call("t", '{"id": 123456789012345678901234567890, "n": "7"}', toolset,
                            coerce=True)
    assert verdict.ok
    assert verdict.arguments == '{"id":123456789012345678901234567890,"n":7}'


def test_empty_arguments_are_an_empty_object_when_that_is_valid() -> None:
    toolset = compile_tools([tool("ping", {"type": "object", "properties": {}})])
    verdict = validate_call("ping", "  ", toolset, coerce=True)
    assert verdict.ok
    assert verdict.arguments == "{}"
    assert validate_call("ping", "", toolset).error.keyword == "json"


def test_coercion_through_ref_in_any_of() -> None:
    toolset = compile_tools([tool("t", {
        "$defs": {"count": {"type": "integer"}},
        "properties": {"n": {"anyOf": [{"$ref": "#/$defs/count"}, {"type": "null"}]}}})])
    verdict = validate_call("t", '{"n": "12"}', toolset, coerce=True)
    assert verdict.ok
    assert verdict.arguments == '{"n":12}'
    assert [(r.kind, r.pointer) for r in verdict.repairs] == [(STRING_TO_INTEGER, "/n")]


def test_double_encoded_arguments() -> None:
    text = json.dumps(json.dumps({"city": "Oslo", "days": 2}))
    verdict = validate_call("get_weather", text, WEATHER, coerce=True)
    assert verdict.ok
    assert json.loads(verdict.arguments) == {"city": "Oslo", "days": 2}
    assert verdict.repairs[0].kind == PARSE_JSON_STRING


def test_deep_arguments_against_a_recursive_schema_do_not_raise() -> None:
    toolset = compile_tools([tool("tree", {
        "$defs": {"node": {"type": "object", "properties": {"c": {"$ref": "#/$defs/node"}}}},
        "$ref": "#/$defs/node"})])
    deep = '{"c":' * 900 + '"x"' + "}" * 900
    for coerce in (False, True):
        verdict = validate_call("tree", deep, toolset, coerce=coerce)
        assert not verdict.ok


# ---------------------------------------------------------------------------------------------
# Policy


CALENDAR = compile_tools(CORPUS["tools"]["calendar"])
BAD_FLOOR = validate_call(
    "create_event", '{"title": "t", "date": "2026-01-01", "location": {"room": "A", "floor": 1.5}}',
    CALENDAR)
NO_DATE = validate_call("create_event", '{"title": "t", "location": {"room": "A"}}', CALENDAR)


def test_parse_policy() -> None:
    assert parse_policy(None) is Policy.REPAIR
    assert parse_policy(" Retry ") is Policy.RETRY
    assert parse_policy("", default=Policy.ERROR) is Policy.ERROR
    with pytest.raises(ValueError, match="repair\\|retry\\|error\\|pass"):
        parse_policy("fix")


#: the ``date`` format as the grammar pattern every retry sends (written out in full once)
DATE_PATTERN = (
    "^(?:[1-9][0-9]{3}-(?:(?:0[1357-8]|1[02])-(?:0[1-9]|[1-2][0-9]|3[0-1])"
    "|(?:0[469]|11)-(?:0[1-9]|[1-2][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))"
    "|(?:[1-9][0-9](?:0[48]|[2468][048]|[13579][26])|(?:[2468][048]|[13579][26])00)-02-29)$")


@pytest.mark.parametrize(("backend", "keys", "read_as"), [
    ("vllm", {"tool_choice", "tools"}, READ_TOOL_CALL),
    ("openai", {"tool_choice"}, READ_TOOL_CALL),
    ("sglang", {"tool_choice"}, READ_TOOL_CALL),
    ("llamacpp", {"json_schema", "tool_choice"}, READ_ARGUMENTS),
    ("ollama", {"format"}, READ_ARGUMENTS),
    ("llama-cpp-python", {"response_format"}, READ_ARGUMENTS),
    ("embedded", {"response_format"}, READ_ARGUMENTS),
])
def test_retry_is_constrained_per_backend(backend: str, keys: set[str], read_as: str) -> None:
    """A call missing a required member is asked for again whole, under the tool's schema as
    the backend's grammar engine can enforce it."""
    plan = retry_plan(NO_DATE, CALENDAR, backend)
    schema = CALENDAR.tools["create_event"].schema
    assert set(plan.set) == keys
    assert plan.read_as == read_as
    assert plan.tool == "create_event"
    assert plan.keep is None
    assert "'date' is a required property" in plan.correction
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "tools": CORPUS["tools"]["calendar"], "tool_choice": "auto", "stream": True}
    before = copy.deepcopy(body)
    retry = plan.apply(body)
    assert body == before
    assert retry["messages"][-1] == {"role": "user", "content": plan.correction}
    assert retry["stream"] is True
    sent = _sent_schema(backend, retry)
    if sent is not None:
        # the schema as the backend's grammar engine can enforce it (see test_constraints):
        # the date format as an exact pattern, the rest as it was
        assert sent["properties"]["date"] == {"type": "string", "pattern": DATE_PATTERN}
        assert sent["$defs"]["clock"] == schema["$defs"]["clock"]
        assert sent["properties"]["location"] == schema["properties"]["location"]
        assert schema["properties"]["date"] == {"type": "string", "format": "date"}
    if backend == "llamacpp":  # tools kept: llama-server reuses the cached prompt prefix
        assert retry["tools"] == body["tools"] and retry["tool_choice"] == "none"
    elif read_as == READ_ARGUMENTS:
        assert "tools" not in retry
        assert "only" in plan.correction
        assert plan.read(None, None, ' {"title": "t"} ') == ("create_event", '{"title": "t"}')
    else:
        if backend != "vllm":  # vLLM's retry narrows the tools to the one strict tool
            assert retry["tools"] == body["tools"]
        assert plan.read("create_event", "{}", "") == ("create_event", "{}")


def _sent_schema(backend: str, retry: dict[str, Any]) -> dict[str, Any] | None:
    """The schema a retry hands the backend's grammar engine (None: the backend has none)."""
    if backend == "vllm":
        (fn,) = [t["function"] for t in retry["tools"]]
        assert fn["name"] == "create_event" and fn["strict"] is True
        assert retry["tool_choice"]["function"]["name"] == "create_event"
        return fn["parameters"]  # type: ignore[no-any-return]
    if backend == "llamacpp":
        return retry["json_schema"]  # type: ignore[no-any-return]
    if backend == "ollama":
        return retry["format"]  # type: ignore[no-any-return]
    if backend in ("llama-cpp-python", "embedded"):
        assert set(retry["response_format"]) == {"type", "schema"}
        assert retry["response_format"]["type"] == "json_object"
        return retry["response_format"]["schema"]  # type: ignore[no-any-return]
    return None


LOCATION = {"type": "object", "properties": {"room": {"type": "string"},
                                             "floor": {"type": "integer"}},
            "required": ["room"], "additionalProperties": False}


@pytest.mark.parametrize("backend", ["vllm", "llamacpp", "ollama", "llama-cpp-python"])
def test_a_wrong_member_is_asked_for_alone(backend: str) -> None:
    """An error inside one member: the retry asks for that member only (a few tokens to decode,
    not the whole object) and the answer replaces it in the held call, the rest kept as it was."""
    plan = retry_plan(BAD_FLOOR, CALENDAR, backend)
    sent = _sent_schema(backend, plan.apply({"messages": []}))
    assert sent is not None
    assert sent["properties"] == {"location": LOCATION}
    assert sent["required"] == ["location"] and sent["additionalProperties"] is False
    assert "corrected `location`" in plan.correction
    assert "/location/floor" in plan.correction
    answer = ' {"location": {"room": "A", "floor": 2}} '
    if plan.read_as == READ_ARGUMENTS:
        got = plan.read(None, None, answer)
    else:
        got = plan.read("create_event", answer, "")
    assert got == ("create_event",
                   '{"title":"t","date":"2026-01-01","location":{"room":"A","floor":2}}')
    # an answer that is not an object goes to the validator as it is
    assert plan.read("create_event", "not json", "not json")[1] == "not json"


def test_members_with_refs_keep_their_defs() -> None:
    bad = validate_call("create_event", '{"title": "t", "date": "2026-01-01", "start": "9am"}',
                        CALENDAR)
    plan = retry_plan(bad, CALENDAR, "llamacpp")
    sent = plan.set["json_schema"]
    assert sent["properties"] == {"start": {"$ref": "#/$defs/clock"}}
    assert sent["$defs"]["clock"] == {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}


def test_a_call_with_every_member_wrong_is_asked_for_whole() -> None:
    bad = validate_call("create_event", '{"title": 5, "date": "2026-02-30"}', CALENDAR)
    plan = retry_plan(bad, CALENDAR, "llamacpp")
    assert plan.keep is None
    assert set(plan.set["json_schema"]["properties"]) == {
        "title", "date", "start", "attendees", "location"}


def test_error_body_shape() -> None:
    body = error_body(BAD_FLOOR)
    assert body == {"error": {
        "message": "invalid tool call to `create_event`: at /location/floor: "
                   "1.5 is not of type 'integer'",
        "type": "invalid_tool_call", "param": None, "code": "invalid_tool_call",
        "tool": "create_event", "pointer": "/location/floor", "keyword": "type",
        "validator_message": "1.5 is not of type 'integer'"}}
    assert orjson.dumps(body)


def test_retries_are_bounded() -> None:
    decisions = [decide(BAD_FLOOR, Policy.RETRY, CALENDAR, attempt=n, max_retries=2).outcome
                 for n in range(3)]
    assert decisions == [Outcome.RETRY, Outcome.RETRY, Outcome.ERROR]
    assert decide(BAD_FLOOR, Policy.RETRY, CALENDAR, max_retries=0).outcome is Outcome.ERROR


# ---------------------------------------------------------------------------------------------
# Untrusted model output never raises


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8) | st.sampled_from(["3", "4.5", "true", "false", "{}", "[1]", "-0"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["city", "days", "units", "include_hourly", "x", "shape", "kind",
                         "radius", "opacity", "layers", "paths"]), inner, max_size=5),
    max_leaves=12,
)
argument_text = st.one_of(
    json_values.map(json.dumps),
    json_values.map(lambda v: json.dumps(json.dumps(v))),
    st.text(alphabet='{}[]":,0123456789.-etrufalsn \\ab', max_size=40),
    st.text(max_size=20),
)
SHAPES = compile_tools(CORPUS["tools"]["shapes"])
SEARCH = compile_tools(CORPUS["tools"]["search"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=argument_text, which=st.sampled_from(["get_weather", "draw", "search_files", "x"]),
       coerce=st.booleans())
def test_random_arguments_never_raise(text: str, which: str, coerce: bool) -> None:
    toolset = {"get_weather": WEATHER, "draw": SHAPES, "search_files": SEARCH}.get(which, WEATHER)
    verdict = validate_call(which, text, toolset, coerce=coerce)
    assert isinstance(verdict, Verdict)
    assert verdict.ok == (not verdict.errors)
    if verdict.ok:
        # whatever was coerced is valid as it stands, and nothing was coerced without asking
        assert validate_call(which, verdict.arguments, toolset).ok
        assert coerce or verdict.arguments == text
    for policy in Policy:
        decide(verdict, policy, toolset, backend="llamacpp")


def test_llama_cpp_python_retry_spells_out_small_integer_ranges() -> None:
    schema = {"type": "object", "properties": {
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "step": {"type": "integer", "exclusiveMinimum": 0, "maximum": 10, "multipleOf": 5},
        "big": {"type": "integer", "minimum": 0, "maximum": 10_000},
        "open": {"type": "integer", "minimum": 0},
        "nested": {"type": "array", "items": {"type": "integer", "minimum": -1, "maximum": 1}}}}
    tools = compile_tools([{"type": "function", "function": {"name": "f", "parameters": schema}}])
    plan = retry_plan(validate_call("f", '{"days": 99}', tools), tools, "llama-cpp-python")
    props = plan.set["response_format"]["schema"]["properties"]
    assert props["days"]["enum"] == list(range(1, 15)) and props["days"]["maximum"] == 14
    assert props["step"]["enum"] == [5, 10]
    assert "enum" not in props["big"] and "enum" not in props["open"]
    assert props["nested"]["items"]["enum"] == [-1, 0, 1]
    assert "enum" not in schema["properties"]["days"]  # the request's schema is untouched
    assert [(d.pointer, d.keyword) for d in plan.dropped] == [
        ("/properties/big", "minimum"), ("/properties/big", "maximum"),
        ("/properties/open", "minimum"), ("/properties/step", "multipleOf")]
