"""Cost of checking one tool call against its schema, and of repairing it.

Measures, per tool call, for a small schema (3 properties) and a large one (50 properties,
nested objects, arrays, ``$ref``):

* validating a valid call with the compiled validators in hand (the Rust gate answers), and
  with the Python validator alone, to show what the gate saves;
* what a request pays in all: compile the request's tools, then validate, with the
  compiled-validator cache on (every agent step after the first) and off (a new schema);
* ``repair``: validating a call with one coercible field under ``coerce=True``, and what that
  adds over validating a valid call (goal: under 1 ms for the small schema).

Prints a markdown table and writes it as the ``## Tool-argument validation`` section of
BENCHMARKS.md, leaving every other section as it was.

    python bench/validation.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

from _common import BENCHMARKS, replace_section

from toolmend.parsers.schemas import ValidatorCache, compile_tools
from toolmend.parsers.validation import validate_call

SECTION = "## Tool-argument validation"
REPAIR_GOAL_US = 1000.0


def small_tools() -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "minLength": 1},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
            "units": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
        "additionalProperties": False,
    }}}]


def large_tools() -> list[dict[str, Any]]:
    """50 top-level properties of mixed kinds; every fifth is a nested object (itself with an
    array of ``$ref``'d objects), the kind of schema a CRM or cloud API tool exposes."""
    properties: dict[str, Any] = {}
    for i in range(50):
        kind = i % 5
        if kind == 0:
            properties[f"name_{i}"] = {"type": "string", "maxLength": 200}
        elif kind == 1:
            properties[f"count_{i}"] = {"type": "integer", "minimum": 0}
        elif kind == 2:
            properties[f"mode_{i}"] = {"type": "string", "enum": ["a", "b", "c", "d"]}
        elif kind == 3:
            properties[f"tags_{i}"] = {"type": "array", "items": {"type": "string"},
                                       "maxItems": 20}
        else:
            properties[f"block_{i}"] = {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "pattern": "^[a-z]{2}-[0-9]{3}$"},
                    "enabled": {"type": "boolean"},
                    "limits": {"type": "object", "properties": {
                        "low": {"type": "number"}, "high": {"type": "number"}}},
                    "items": {"type": "array", "items": {"$ref": "#/$defs/item"}},
                },
                "required": ["id"],
                "additionalProperties": False,
            }
    schema = {
        "type": "object",
        "$defs": {"item": {"type": "object", "properties": {
            "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}}, "required": ["sku"]}},
        "properties": properties,
        "required": ["name_0", "count_1"],
    }
    return [{"type": "function", "function": {"name": "update_account", "parameters": schema}}]


def large_arguments() -> dict[str, Any]:
    args: dict[str, Any] = {}
    for i in range(50):
        kind = i % 5
        if kind == 0:
            args[f"name_{i}"] = f"name {i}"
        elif kind == 1:
            args[f"count_{i}"] = i
        elif kind == 2:
            args[f"mode_{i}"] = "b"
        elif kind == 3:
            args[f"tags_{i}"] = ["x", "y", "z"]
        else:
            args[f"block_{i}"] = {"id": "ab-123", "enabled": True,
                                  "limits": {"low": 0.5, "high": 9.5},
                                  "items": [{"sku": "s1", "qty": 2, "note": None},
                                            {"sku": "s2", "qty": 1, "note": "gift"}]}
    return args


def per_call_us(fn: Callable[[], object], quick: bool) -> float:
    """Best over repeats of the mean per call, in microseconds: on a shared machine the
    slower repeats measure the neighbours, not the code."""
    fn()  # warm caches (regex, compiled schema where the case uses one)
    target = 0.05 if quick else 0.2
    loops = 1
    while True:
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= target:
            break
        loops *= 2
    samples = []
    for _ in range(3 if quick else 7):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        samples.append((time.perf_counter() - start) / loops * 1e6)
    return min(samples)


def measure_schema(tools: list[dict[str, Any]], name: str, args: dict[str, Any],
                   coercible: tuple[str, str], quick: bool) -> dict[str, float]:
    """One schema's row; ``coercible`` is a (field, string) that ``repair`` must coerce."""
    valid = json.dumps(args)
    repairable = json.dumps({**args, coercible[0]: coercible[1]})
    cache = ValidatorCache()
    toolset = compile_tools(tools, cache=cache)
    python_only = dataclasses.replace(toolset, tools={
        n: dataclasses.replace(t, compiled=dataclasses.replace(t.compiled, gate=None))
        for n, t in toolset.tools.items()})
    assert validate_call(name, valid, toolset).ok
    repaired = validate_call(name, repairable, toolset, coerce=True)
    assert repaired.ok and repaired.repairs, repaired

    row = {
        "validate": per_call_us(lambda: validate_call(name, valid, toolset), quick),
        "python_only": per_call_us(lambda: validate_call(name, valid, python_only), quick),
        "cache_on": per_call_us(
            lambda: validate_call(name, valid, compile_tools(tools, cache=cache)), quick),
        "cache_off": per_call_us(
            lambda: validate_call(name, valid, compile_tools(tools, cache=None)), quick),
        "repair": per_call_us(
            lambda: validate_call(name, repairable, toolset, coerce=True), quick),
    }
    row["repair_added"] = row["repair"] - row["validate"]
    return row


def measure(quick: bool) -> dict[str, dict[str, float]]:
    return {
        "small": measure_schema(small_tools(), "get_weather",
                                {"city": "Paris", "days": 3, "units": "celsius"},
                                ("days", "3"), quick),
        "large": measure_schema(large_tools(), "update_account", large_arguments(),
                                ("count_1", "1"), quick),
    }


def table(results: dict[str, dict[str, float]]) -> str:
    rows = [
        ("validate a valid call (compiled, Rust gate)", "validate"),
        ("validate a valid call, Python jsonschema only (no gate)", "python_only"),
        ("compile request's tools + validate, cache on", "cache_on"),
        ("compile request's tools + validate, cache off", "cache_off"),
        ("`repair`: validate + coerce one field + revalidate", "repair"),
        ("`repair`: added over validating a valid call", "repair_added"),
    ]
    lines = ["| µs per tool call | small (3 properties) | large (50 properties, nested) |",
             "|---|---:|---:|"]
    for title, key in rows:
        lines.append(f"| {title} | {results['small'][key]:,.1f} | {results['large'][key]:,.1f} |")
    return "\n".join(lines)


def section(results: dict[str, dict[str, float]]) -> str:
    small_added = results["small"]["repair_added"]
    verdict = "met" if small_added < REPAIR_GOAL_US else "NOT met"
    versions = ", ".join(f"{pkg} {metadata.version(pkg)}"
                         for pkg in ("jsonschema", "jsonschema-rs", "google-re2", "orjson"))
    return "\n".join([
        SECTION,
        "",
        "`python bench/validation.py` — one tool call checked against its schema "
        "(`toolmend.parsers`). The cache holds compiled validators across requests, keyed by a "
        "hash of the schema's canonical bytes; \"cache off\" is what the first request with a "
        "new schema pays (meta-schema check, RE2 pattern compile, both validators built). "
        "A valid call is answered by the Rust gate (jsonschema-rs); an invalid one also goes "
        "through Python jsonschema for its errors and for coercion, which is what `repair` "
        "measures.",
        "",
        table(results),
        "",
        f"Goal for `repair` on the small schema: under {REPAIR_GOAL_US:,.0f} µs added per call "
        f"— {verdict} ({small_added:,.1f} µs).",
        "",
        f"Python {platform.python_version()}, {versions}; {os.cpu_count()} cores, "
        f"{platform.machine()}.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, noisier numbers")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    results = measure(args.quick)
    text = section(results)
    print(text)
    if not args.no_write:
        replace_section(text)
        print(f"wrote {SECTION!r} in {BENCHMARKS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
