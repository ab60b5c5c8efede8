"""Retry schemas translated for each backend's grammar engine, and the formats toolmend checks.

Every expectation is written out: the translated schema a backend receives, the regex a
pattern becomes, the values a format accepts and refuses. The property tests check the one
promise the translation makes: what the translated pattern admits, the original admits too
(a grammar built from it can only produce values the validator accepts).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import re2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolmend.parsers.constraints import FORMAT_PATTERNS, Dropped, engine_for, translate
from toolmend.parsers.grammar_regex import JSON_SAFE_CHAR, Untranslatable, to_grammar_regex
from toolmend.parsers.string_formats import FORMAT_CHECKS

ANY = JSON_SAFE_CHAR + "*"
TIME_PATTERN = r"^([01]\d|2[0-3]):[0-5]\d$"
DATE = (
    "^(?:[1-9][0-9]{3}-(?:(?:0[1357-8]|1[02])-(?:0[1-9]|[1-2][0-9]|3[0-1])"
    "|(?:0[469]|11)-(?:0[1-9]|[1-2][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))"
    "|(?:[1-9][0-9](?:0[48]|[2468][048]|[13579][26])|(?:[2468][048]|[13579][26])00)-02-29)$")
TIME = ("^(?:[0-1][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\x2e[0-9]{1,6})?"
        "(?:Z|[\\x2b\\x2d](?:[0-1][0-9]|2[0-3]):[0-5][0-9])$")
UUID = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


# ---------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize(("fmt", "valid", "invalid"), [
    ("date", ["2026-10-03", "2024-02-29", "2000-02-29", "1999-12-31"],
     ["2026-02-30", "2026-04-31", "2026/10/03", "2026-13-01", "2023-02-29", "1900-02-29",
      "26-10-03", "2026-10-3", "0000-01-01", "2026-10-03T10:00:00Z", ""]),
    ("time", ["19:00:00Z", "08:30:00+01:00", "23:59:59.123-05:00", "23:59:60Z",
              "00:59:60+01:00", "10:10:00z"],
     ["7pm", "8:30", "6:00", "10:10", "10:10:00", "24:00:00Z", "12:60:00Z", "12:00:61Z",
      "12:00:60Z", "2026-07-10", "2026-10-03T19:00:00Z", "12:00:00+24:00"]),
    ("date-time", ["2026-10-03T19:00:00Z", "2026-10-03t19:00:00.5+02:00"],
     ["2026-10-03 19:00:00Z", "2026-10-03T19:00:00", "2026-02-30T19:00:00Z", "2026-10-03"]),
    ("duration", ["P3D", "PT1H30M", "P2W", "P1Y2M3DT4H5M6S"],
     ["P", "PT", "3D", "P1H", "PT1D", "P1DT"]),
    ("email", ["a@example.com", "first.last+tag@mail.example.org", "x@[192.0.2.1]"],
     ["a@b", "@example.com", "a@", "a..b@example.com", ".a@example.com", "a b@example.com",
      "a@exa_mple.com"]),
    ("hostname", ["example.com", "localhost", "a-b.example"],
     ["-a.example", "a-.example", "a..b", "", "exa_mple.com", "a" * 64 + ".com"]),
    ("ipv4", ["192.0.2.10", "0.0.0.0", "255.255.255.255"],
     ["256.1.1.1", "1.2.3", "01.2.3.4", "1.2.3.4.5", "a.b.c.d"]),
    ("ipv6", ["2001:db8::1", "::", "fe80:0:0:0:1:2:3:4"],
     ["2001:db8::1::2", "12345::", "fe80::1%eth0", "1.2.3.4"]),
    ("uri", ["https://example.com/a", "mailto:a@example.com", "urn:isbn:0451450523"],
     ["example.com", "/relative/path", "https://exa mple.com", "1http://x"]),
    ("uuid", ["123e4567-e89b-12d3-a456-426614174000", "123E4567-E89B-12D3-A456-426614174000"],
     ["123e4567e89b12d3a456426614174000", "123e4567-e89b-12d3-a456-42661417400",
      "g23e4567-e89b-12d3-a456-426614174000"]),
])
def test_format_checks(fmt: str, valid: list[str], invalid: list[str]) -> None:
    check = FORMAT_CHECKS[fmt]
    assert [v for v in valid if not check(v)] == []
    assert [v for v in invalid if check(v)] == []
    assert check(42) and check(None)  # formats apply to strings only


@pytest.mark.parametrize("fmt", sorted(FORMAT_PATTERNS))
def test_every_format_pattern_admits_only_valid_values(fmt: str) -> None:
    """What a grammar built from a format's pattern produces passes the format's check."""
    compiled = re.compile(to_grammar_regex(FORMAT_PATTERNS[fmt]))

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.from_regex(compiled, fullmatch=True))
    def check(value: str) -> None:
        assert FORMAT_CHECKS[fmt](value), value

    check()


# ---------------------------------------------------------------------------------------------
# Patterns in the converters' subset


@pytest.mark.parametrize(("pattern", "expected"), [
    (TIME_PATTERN, "^(?:[0-1][0-9]|2[0-3]):[0-5][0-9]$"),
    (r"^\d{4}-\d{2}-\d{2}$", "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"),
    (r"^[A-Z]{3}$", "^[A-Z]{3}$"),
    (r"[A-Z]{3}", f"^{ANY}[A-Z]{{3}}{ANY}$"),  # JSON Schema patterns match anywhere
    (r"^ab", f"^ab{ANY}$"),
    (r"^a.b$", "^a[^\\x00-\\x1f\\x22\\x5c]b$"),  # "." never writes a raw quote or newline
    (r"^[^a-z]+$", "^[^\\x00-\\x1f\\x22\\x5ca-z]+$"),
    (r"^\w+@\w+\.com$", "^[0-9A-Z\\x5fa-z]+@[0-9A-Z\\x5fa-z]+\\x2ecom$"),
    (r"^\S+$", "^[^\\x00-\\x20\\x22\\x5c]+$"),
    (r"^\s$", "^ $"),  # only the space: other white space needs JSON escapes
    (r"^ab{2}c$", "^a(?:b){2}c$"),
    (r"^(ab)+$", "^(?:ab)+$"),
    (r"^a|b$", f"^(?:a{ANY}|{ANY}b)$"),
    (r"^[ -~]+$", "^[\\x20-\\x21\\x23-\\x5b\\x5d-\\x7e]+$"),
    (r"^(?:x|y)?z*?$", "^[x-y]?(?:z)*$"),  # lazy or not, a grammar admits the same
    (r"^é{1,3}$", "^(?:é){1,3}$"),
])
def test_patterns_become_the_converters_subset(pattern: str, expected: str) -> None:
    assert to_grammar_regex(pattern) == expected


@pytest.mark.parametrize(("pattern", "reason"), [
    (r"^(?=a)b$", "assert"),
    (r"^(a)\1$", "groupref"),
    (r"^\bword$", "word boundary"),
    (r"^a$|^b$x", "anchor"),
    (r"(?i)^abc$", "case-insensitive"),
    (r'^"quoted"$', "cannot hold unescaped"),
    (r"^a\\b$", "cannot hold unescaped"),
    (r"^[\x00-\x1f]$", "cannot hold unescaped"),
    ("^(", "does not parse"),
])
def test_untranslatable_patterns_say_why(pattern: str, reason: str) -> None:
    with pytest.raises(Untranslatable, match=reason):
        to_grammar_regex(pattern)


_ATOMS = st.sampled_from([
    "a", "Z", "7", "-", ":", "@", ".", r"\d", r"\w", r"\s", r"\D", r"\W", r"\S", "[a-f]",
    "[^0-9]", r"[\d_]", "[ -~]", r"\.", "é", "x|y"])
_QUANT = st.sampled_from(["", "", "*", "+", "?", "{2}", "{1,3}", "{0,}"])


@st.composite
def _patterns(draw: Any) -> str:
    parts = [f"(?:{draw(_ATOMS)}){draw(_QUANT)}" for _ in range(draw(st.integers(1, 5)))]
    return draw(st.sampled_from(["^", ""])) + "".join(parts) + draw(st.sampled_from(["$", ""]))


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(pattern=_patterns(), data=st.data())
def test_what_the_translation_admits_the_original_admits(pattern: str, data: Any) -> None:
    translated = to_grammar_regex(pattern)
    assert re2.compile(translated) is not None  # plain syntax, RE2 reads it too
    value = data.draw(st.from_regex(re.compile(translated), fullmatch=True))
    # judged by RE2, the validator's engine (ASCII \d \w \s, as in ECMA-262)
    assert re2.search(pattern, value) is not None, (pattern, translated, value)
    assert json.loads(json.dumps(value)) == value and '"' not in value and "\\" not in value


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_random_patterns_never_crash(pattern: str) -> None:
    try:
        out = to_grammar_regex(pattern)
    except Untranslatable:
        return
    assert out.startswith("^") and out.endswith("$")


# ---------------------------------------------------------------------------------------------
# Schemas per engine

RESERVATION: dict[str, Any] = {
    "type": "object",
    "properties": {
        "time": {"type": "string", "pattern": TIME_PATTERN},
        "date": {"type": "string", "format": "date", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
        "party": {"type": "integer", "minimum": 1, "maximum": 12},
        "airport": {"type": ["string", "null"], "pattern": "^[A-Z]{3}$"},
        "budget": {"type": "number", "minimum": 0, "maximum": 500},
    },
    "required": ["time", "date", "party"],
    "additionalProperties": False,
}


def test_llama_server_gets_patterns_it_can_read_and_keeps_its_integer_ranges() -> None:
    t = translate(RESERVATION, "llama-server")
    assert t.schema == {
        "type": "object",
        "properties": {
            "time": {"type": "string", "pattern": "^(?:[0-1][0-9]|2[0-3]):[0-5][0-9]$"},
            "date": {"type": "string", "pattern": DATE},
            "party": {"type": "integer", "minimum": 1, "maximum": 12},
            "airport": {"type": ["string", "null"], "pattern": "^[A-Z]{3}$"},
            "budget": {"type": "number", "minimum": 0, "maximum": 500},
        },
        "required": ["time", "date", "party"],
        "additionalProperties": False,
    }
    assert t.dropped == (
        Dropped("/properties/budget", "minimum", "llama-server's grammar ignores ranges on "
                                                 "numbers"),
        Dropped("/properties/budget", "maximum", "llama-server's grammar ignores ranges on "
                                                 "numbers"))
    assert RESERVATION["properties"]["date"]["format"] == "date"  # the input is untouched


def test_llama_cpp_python_gets_enums_for_ranges_and_any_of_for_type_lists() -> None:
    t = translate(RESERVATION, "llama-cpp-python")
    props = t.schema["properties"]
    assert props["party"] == {"type": "integer", "minimum": 1, "maximum": 12,
                              "enum": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]}
    # its converter keeps only the bare types of a type list: the pattern goes in a branch
    assert props["airport"] == {"anyOf": [{"type": "string", "pattern": "^[A-Z]{3}$"},
                                          {"type": "null"}]}
    assert props["date"] == {"type": "string", "pattern": DATE}


def test_vllm_keeps_ranges_and_gets_exact_formats() -> None:
    t = translate(RESERVATION, "vllm")
    assert t.schema["properties"]["budget"] == {"type": "number", "minimum": 0, "maximum": 500}
    assert t.schema["properties"]["date"] == {"type": "string", "pattern": DATE}
    assert t.dropped == ()


@pytest.mark.parametrize(("engine", "field", "expected", "dropped"), [
    ("llama-server", {"type": "string", "format": "time"}, {"type": "string", "pattern": TIME},
     []),
    ("ollama", {"type": "string", "format": "uuid"}, {"type": "string", "pattern": UUID}, []),
    # a pattern stricter than the format is kept; the format is left to the validator
    ("llama-server", {"type": "string", "format": "date", "pattern": "^2026-"},
     {"type": "string", "pattern": f"^2026-{ANY}$"}, [("format",)]),
    # a pattern with no grammar equivalent goes: the format beside it still constrains
    ("llama-server", {"type": "string", "format": "date", "pattern": r"^(?=2)\d+"},
     {"type": "string", "pattern": DATE}, [("pattern",)]),
    ("llama-server", {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5},
     {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5}, [("maxLength",)]),
    ("vllm", {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5},
     {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5}, []),
    ("llama-server", {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10.5},
     {"type": "integer", "minimum": 1, "maximum": 10}, []),
    ("llama-cpp-python", {"type": "integer", "minimum": 0, "maximum": 1_000_000},
     {"type": "integer", "minimum": 0, "maximum": 1_000_000}, [("minimum",), ("maximum",)]),
    ("llama-server", {"type": "array", "items": {"type": "string", "format": "email"},
                      "minItems": 1, "uniqueItems": True},
     {"type": "array", "items": {"type": "string", "pattern": to_grammar_regex(
         FORMAT_PATTERNS["email"])}, "minItems": 1, "uniqueItems": True}, [("uniqueItems",)]),
    ("llama-server", {"type": "string", "format": "x-custom"},
     {"type": "string", "format": "x-custom"}, []),
])
def test_one_field_per_engine(engine: str, field: dict[str, Any], expected: dict[str, Any],
                              dropped: list[tuple[str]]) -> None:
    t = translate(field, engine)
    assert t.schema == expected
    assert [(d.keyword,) for d in t.dropped] == dropped


def test_nested_and_any_of_schemas_are_walked() -> None:
    schema = {"type": "object", "properties": {"when": {
        "type": "object", "properties": {"at": {"type": "string", "format": "date-time"}},
        "required": ["at"], "additionalProperties": False}},
        "$defs": {"d": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]}}}
    t = translate(schema, "llama-server")
    assert t.schema["properties"]["when"]["properties"]["at"]["pattern"] == (
        DATE[:-1] + "T" + TIME[1:])
    assert t.schema["properties"]["when"]["additionalProperties"] is False
    assert t.schema["$defs"]["d"]["anyOf"] == [{"type": "string", "pattern": DATE},
                                                {"type": "null"}]


def test_engines_by_backend_name() -> None:
    assert [engine_for(b) for b in ("llamacpp", "ollama", "embedded", "llama-cpp-python",
                                    "vllm", "openai", "sglang")] == [
        "llama-server", "ollama", "llama-cpp-python", "llama-cpp-python", "vllm", None, None]
    with pytest.raises(ValueError, match="unknown constraint engine 'tgi'"):
        translate({}, "tgi")
