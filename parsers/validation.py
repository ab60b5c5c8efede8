"""Validating one emitted tool call against the request's tools, with lossless coercion.

:func:`validate_call` answers "may the agent receive this call as it is?" and, asked to
``coerce`` (policy ``repair``), "is there exactly one lossless reading of it that is valid?".
:func:`validate_reply` checks what only the whole reply can tell: ``tool_choice: "required"`` (or
a named choice) with no call at all, ``"none"`` with one.

Coercions are the few reinterpretations that lose nothing and that models get wrong all the time:

========================  ==========================  ==========================================
kind                      from                        to
========================  ==========================  ==========================================
``string_to_integer``     ``"42"``                    ``42`` (JSON integer literal only: not
                                                      ``"042"``, not ``"4.5"``)
``string_to_number``      ``"4.5"``                   ``4.5`` (JSON number literal, finite)
``string_to_boolean``     ``"true"`` / ``"false"``    ``true`` / ``false``
``wrap_in_array``         a bare value ``v``          ``[v]`` (never ``null``)
``parse_json_string``     ``"{\\"a\\": 1}"``            the object (or array) it holds
``empty_arguments``       empty arguments text        ``{}``
========================  ==========================  ==========================================

Where to coerce comes from the validator's own errors (instance path + keyword), so ``$ref`` and
``$defs`` are followed exactly as validation follows them. Only ``type``, ``anyOf`` and ``oneOf``
failures are candidates, and a node is changed only when exactly one candidate reading makes the
failing subschema valid: for ``anyOf: [{"type": "integer"}, {"type": "null"}]`` the string
``"42"`` becomes ``42``; for ``anyOf: [{"type": "integer"}, {"type": "array"}]`` it could become
``42`` or ``["42"]``, which is ambiguous, so it is left alone. A coercion that leaves the call
invalid anywhere is not applied at all: the verdict then reports the original errors, which is
what a retry's correction message should name.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Final

import jsonschema.exceptions
import orjson
import re2

from .repair import _NOTHING, MAX_ARGUMENT_DEPTH, depth_message, recall_parsed, too_deep
from .schemas import BudgetExceeded, Toolset, json_pointer, validation_budget

__all__ = [
    "EMPTY_ARGUMENTS",
    "PARSE_JSON_STRING",
    "STRING_TO_BOOLEAN",
    "STRING_TO_INTEGER",
    "STRING_TO_NUMBER",
    "WRAP_IN_ARRAY",
    "Issue",
    "Repair",
    "Verdict",
    "describe_repairs",
    "validate_call",
    "validate_reply",
    "verdict_summary",
]

STRING_TO_INTEGER: Final = "string_to_integer"
STRING_TO_NUMBER: Final = "string_to_number"
STRING_TO_BOOLEAN: Final = "string_to_boolean"
WRAP_IN_ARRAY: Final = "wrap_in_array"
PARSE_JSON_STRING: Final = "parse_json_string"
EMPTY_ARGUMENTS: Final = "empty_arguments"

MAX_REPORTED_ERRORS: Final = 8
MAX_MESSAGE_CHARS: Final = 240

# Work bounds for coercion: how many nested reinterpretations deep (a bare "42" for an array of
# arrays of integers is three), and how many subschema checks per call in all.
_COERCE_DEPTH: Final = 4
_COERCE_BUDGET: Final = 64

#: Work bound on the Python validator for one call, coercion included, in keyword evaluations
#: (a few microseconds each: tens of milliseconds in all). Past it the call is refused as
#: invalid (keyword ``budget``), and nothing is coerced.
VALIDATION_STEPS: Final = 2_000
#: Errors collected from the validator for one call; the first MAX_REPORTED_ERRORS, in pointer
#: order, are reported (a call with thousands of errors is not worth more).
MAX_ERRORS: Final = 256

_INTEGER: Final = re.compile(r"-?(?:0|[1-9][0-9]{0,299})")
_NUMBER: Final = re.compile(r"-?(?:0|[1-9][0-9]{0,299})(?:\.[0-9]{1,300})?(?:[eE][+-]?[0-9]{1,4})?")
_LONG_DIGITS: Final = re2.compile(r"[0-9]{19}")  # RE2: 10x faster than re on long text
_COERCIBLE: Final = frozenset({"type", "anyOf", "oneOf"})


@dataclass(frozen=True, slots=True)
class Issue:
    """One reason a call is invalid.

    ``pointer`` is a JSON pointer into the arguments (``""`` for the whole call), ``keyword`` the
    schema keyword that failed (``required``, ``type``...) or one of ours: ``name`` (unknown
    tool), ``tool_choice``, ``json`` (arguments are not JSON), ``depth`` (too deeply nested).
    """

    pointer: str
    keyword: str
    message: str
    #: the offending value as short JSON (``"2026-02-30"``), and for a ``format`` failure the
    #: format's name: what a retry's correction quotes. Not part of equality.
    value: str | None = field(default=None, compare=False)
    format: str | None = field(default=None, compare=False)

    def describe(self) -> str:
        """``at /days: 'three' is not of type 'integer'`` (or just the message at the root)."""
        return f"at {self.pointer}: {self.message}" if self.pointer else self.message


@dataclass(frozen=True, slots=True)
class Repair:
    """One coercion applied: its kind (the constants above) and where, as a JSON pointer."""

    kind: str
    pointer: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """The result of checking a call (or a whole reply).

    ``arguments`` is the JSON text to forward: the original text unless ``repairs`` were
    applied. ``errors`` is empty exactly when ``ok``; the first one is the most relevant.
    """

    ok: bool
    name: str
    arguments: str
    errors: tuple[Issue, ...] = ()
    repairs: tuple[Repair, ...] = ()

    @property
    def error(self) -> Issue | None:
        return self.errors[0] if self.errors else None


def _cut(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 3] + "..."


def _invalid(name: str, arguments: str, *issues: Issue) -> Verdict:
    return Verdict(False, name, arguments, tuple(issues))


def _reject_constant(text: str) -> None:
    raise ValueError(f"{text} is not valid JSON")


def _loads(text: str) -> Any:
    """Parse arguments. orjson turns integers beyond 64 bits into floats, silently changing ids
    and amounts if we re-serialize after a repair, so text with long digit runs takes the exact
    (slower) stdlib parser, with NaN/Infinity refused as orjson refuses them."""
    if _LONG_DIGITS.search(text):
        return json.loads(text, parse_constant=_reject_constant)
    value = recall_parsed(text)  # a large call is parsed once, by the repair step
    return orjson.loads(text) if value is _NOTHING else value


def _dumps(value: Any, *, sort_keys: bool = False) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else 0).decode()
    except TypeError:  # integers beyond 64 bits
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def _closest(error: jsonschema.exceptions.ValidationError) -> jsonschema.exceptions.ValidationError:
    """For an anyOf/oneOf failure, the error inside the branch that came closest: fewest errors,
    then fewest type mismatches at the node itself (a branch of the right type is closer), then
    schema order. "-1 is not greater than 0" at ``/shape/radius`` makes a better correction than
    "not valid under any of the given schemas" at ``/shape``. (jsonschema's ``best_match`` ranks
    by other heuristics and can name a branch the model plainly did not mean.)"""
    while error.validator in ("anyOf", "oneOf") and error.context:
        branches: dict[Any, list[jsonschema.exceptions.ValidationError]] = {}
        for inner in error.context:
            branches.setdefault(inner.relative_schema_path[0], []).append(inner)
        nearest = min(branches.values(), key=lambda errs: (
            len(errs), sum(1 for e in errs if e.validator == "type" and not e.relative_path)))
        error = nearest[0]
    return error


def _issues(errors: list[jsonschema.exceptions.ValidationError]) -> tuple[Issue, ...]:
    """Errors as issues, in a stable order: by pointer (the whole call first), and at one
    pointer a ``type`` mismatch before what follows from it (``const``, ``enum``)."""
    issues = []
    for error in errors:
        lead = _closest(error)
        keyword = str(lead.validator or "false")
        fmt = lead.validator_value if keyword == "format" else None
        issues.append(Issue(json_pointer(lead.absolute_path), keyword, _cut(lead.message),
                            _quote(lead.instance), fmt if isinstance(fmt, str) else None))
    issues.sort(key=lambda i: (i.pointer, i.keyword != "type"))
    return tuple(issues[:MAX_REPORTED_ERRORS])


_MAX_QUOTED: Final = 80


def _quote(value: Any) -> str | None:
    """A scalar value as short JSON (for a correction message); ``None`` for containers,
    whose errors point inside them anyway."""
    if isinstance(value, dict | list):
        return None
    try:
        text = _dumps(value)
    except Exception:  # a float JSON cannot carry
        return None
    return text if len(text) <= _MAX_QUOTED else text[: _MAX_QUOTED - 4] + '..."'


def validate_call(name: str, arguments_text: str, toolset: Toolset, *,
                  coerce: bool = False, max_depth: int = MAX_ARGUMENT_DEPTH,
                  depth_checked: bool = False) -> Verdict:
    """Check one complete tool call: is ``name`` callable here, and are ``arguments_text`` a JSON
    object valid against its schema? With ``coerce`` (policy ``repair``), an invalid call that
    has exactly one lossless valid reading comes back ``ok`` with that reading and its repairs.

    Never raises on any ``name`` or ``arguments_text``: the model's output is untrusted input.
    Arguments nesting deeper than ``max_depth`` are refused (``depth``) before being parsed,
    since both the parsers and the validator recurse (``depth_checked``: the caller has done
    that already; the bound still applies to JSON strings offered as coercions).
    """
    if toolset.choice == "none":
        return _invalid(name, arguments_text, Issue(
            "", "tool_choice", f"tool_choice is \"none\", but the model called {name!r}"))
    if toolset.forced is not None and name != toolset.forced:
        return _invalid(name, arguments_text, Issue(
            "", "tool_choice",
            f"tool_choice requires {toolset.forced!r}, but the model called {name!r}"))
    tool = toolset.tools.get(name)
    if tool is None:
        known = ", ".join(repr(n) for n in list(toolset.tools)[:20]) or "none"
        return _invalid(name, arguments_text, Issue(
            "", "name", _cut(f"unknown tool {name!r}; the request's tools are: {known}")))

    if not depth_checked and too_deep(arguments_text, max_depth):
        return _invalid(name, arguments_text, Issue("", "depth", depth_message(max_depth)))
    try:
        value = _loads(arguments_text)
    except (ValueError, TypeError, RecursionError) as exc:
        not_json = _invalid(name, arguments_text, Issue(
            "", "json", _cut(f"arguments are not valid JSON: {exc}")))
        if coerce and arguments_text.strip() == "" and tool.validator.is_valid({}):
            return Verdict(True, name, "{}", (), (Repair(EMPTY_ARGUMENTS, ""),))
        return not_json

    gate = tool.compiled.gate
    if gate is not None and isinstance(value, dict):
        try:
            if gate.is_valid(value):
                return Verdict(True, name, arguments_text)
        except Exception:  # e.g. a value the Rust side cannot convert: ask the Python validator
            pass
    not_object = () if isinstance(value, dict) else (Issue(
        "", "type", f"arguments must be a JSON object, not {_type_name(value)}"),)
    with validation_budget(VALIDATION_STEPS):
        try:
            errors = list(islice(tool.validator.iter_errors(value), MAX_ERRORS))
        except BudgetExceeded:
            return _invalid(name, arguments_text, *(not_object or (_over_budget(),)))
        except RecursionError:
            return _invalid(name, arguments_text, Issue(
                "", "depth", "arguments are nested too deeply to validate"))
        except Exception as exc:  # e.g. a ref the schema checks could not foresee
            return _invalid(name, arguments_text, Issue(
                "", "schema", _cut(f"the tool's schema could not be evaluated: {exc}")))
        if not errors and not not_object:
            return Verdict(True, name, arguments_text)

        if coerce and len(errors) < MAX_ERRORS:
            try:
                coerced = _Coercer(tool.validator, gate, max_depth).fit_arguments(
                    value, errors if isinstance(value, dict) else None)
            except BudgetExceeded:
                coerced = None  # too much to try: the call stays as it is, with its errors
            if coerced is not None:
                fixed, more = coerced
                return Verdict(True, name, _dumps(fixed), (), tuple(more))
    # Not an object: that is the problem to name; what the schema says about it adds nothing.
    return Verdict(False, name, arguments_text, not_object or _issues(errors))


def _over_budget() -> Issue:
    """The verdict on a call too costly to explain in Python. The Rust gate's own error
    listing is no way out: it collects the errors of every ``anyOf`` branch at every level,
    which for the schemas that exhaust the budget is exponential in memory as well."""
    return Issue("", "budget", f"the arguments are too large or too complex to check against "
                               f"the tool's schema within {VALIDATION_STEPS} steps")


def validate_reply(call_names: Sequence[str], toolset: Toolset) -> Verdict:
    """Check the rules only the whole reply can break, once it is finished: a tool call was
    required (``"required"`` or a named ``tool_choice``) and none came, or tools were off
    (``"none"``) and one came. ``name`` is the offending call's, or the forced tool's."""
    if toolset.choice == "none" and call_names:
        return _invalid(call_names[0], "", Issue(
            "", "tool_choice", f"tool_choice is \"none\", but the reply calls {call_names[0]!r}"))
    if toolset.choice in ("required", "function") and not call_names:
        wanted = repr(toolset.forced) if toolset.forced else "a tool"
        return _invalid(toolset.forced or "", "", Issue(
            "", "tool_choice",
            f"tool_choice requires a call to {wanted}, but the reply has no tool call"))
    return Verdict(True, call_names[0] if call_names else "", "")


# ---------------------------------------------------------------------------------------------
# Coercion


def _reinterpretations(value: Any, max_depth: int = MAX_ARGUMENT_DEPTH
                       ) -> Iterator[tuple[Any, str]]:
    """The lossless readings of ``value`` that a schema might have meant (a JSON string only
    when it nests within ``max_depth``, like the arguments themselves)."""
    if value is not None and not isinstance(value, list):
        yield [value], WRAP_IN_ARRAY
    if isinstance(value, str):
        if _INTEGER.fullmatch(value):
            yield int(value), STRING_TO_INTEGER
        elif _NUMBER.fullmatch(value):
            number = float(value)
            if math.isfinite(number):
                yield number, STRING_TO_NUMBER
        elif value in ("true", "false"):
            yield value == "true", STRING_TO_BOOLEAN
        elif value.strip()[:1] in ("{", "[") and not too_deep(value, max_depth):
            try:
                parsed = _loads(value)
            except (ValueError, TypeError, RecursionError):
                parsed = None
            if isinstance(parsed, dict | list):
                yield parsed, PARSE_JSON_STRING


def _at(value: Any, path: Sequence[Any]) -> Any:
    for step in path:
        value = value[step]
    return value


def _replaced(value: Any, path: Sequence[Any], new: Any) -> Any:
    """``value`` with the node at ``path`` replaced, copying only the containers on the path
    (the caller's parsed arguments stay untouched if the coercion is later abandoned)."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[head] = _replaced(value[head], rest, new)
    return copy


class _Coercer:
    """One coercion attempt over one call: a validator to evolve onto subschemas, and a budget
    so a hostile schema/argument pair cannot make us try readings for long."""

    def __init__(self, validator: Any, gate: Any = None,
                 max_depth: int = MAX_ARGUMENT_DEPTH) -> None:
        self.validator = validator
        self.gate = gate  # answers the whole-call revalidation fast when it can
        self.budget = _COERCE_BUDGET
        self.max_depth = max_depth

    def fit_arguments(self, value: Any, errors: list[Any] | None = None,
                      ) -> tuple[Any, list[Repair]] | None:
        """Coerce the whole call; ``errors`` are the root validator's, if already known."""
        repairs: list[Repair] = []
        if isinstance(value, str):  # the whole object double-encoded as a JSON string
            if too_deep(value, self.max_depth):
                return None
            try:
                value = _loads(value)
            except (ValueError, TypeError, RecursionError):
                return None
            repairs.append(Repair(PARSE_JSON_STRING, ""))
        if not isinstance(value, dict):
            return None
        fitted = self.fit(value, self.validator.schema, "", 0, errors)
        if fitted is None or not isinstance(fitted[0], dict):
            return None
        return fitted[0], [*repairs, *fitted[1]]

    def fit(self, value: Any, schema: Any, pointer: str, depth: int,
            errors: list[Any] | None = None) -> tuple[Any, list[Repair]] | None:
        """``value``, coerced where needed, valid under ``schema``; or ``None``."""
        self.budget -= 1
        if self.budget < 0:
            return None
        root = schema is self.validator.schema
        validator = self.validator if root else self.validator.evolve(schema=schema)
        if errors is None:
            try:
                errors = list(validator.iter_errors(value))
            except Exception:  # RecursionError, an unresolvable ref: no reading to offer
                return None
        if not errors:
            return value, []
        if depth >= _COERCE_DEPTH:
            return None
        groups: dict[tuple[Any, ...], list[Any]] = {}
        for error in errors:
            groups.setdefault(tuple(error.path), []).append(error)
        for path in groups:  # fixes at nested paths would fight: don't guess
            if any(path[:k] in groups for k in range(len(path))):
                return None
        fixed, repairs = value, []
        # in pointer order, so the report reads the same whatever order errors come in
        for path, group in sorted(groups.items(), key=lambda item: json_pointer(item[0])):
            lead = next((e for e in group if e.validator in _COERCIBLE), None)
            if lead is None:
                return None  # required, enum, minimum...: nothing lossless to do
            found = self._alternatives(_at(value, path), lead.schema, lead,
                                       pointer + json_pointer(path), depth)
            if found is None:
                return None
            fixed = _replaced(fixed, path, found[0])
            repairs += found[1]
        if not self._valid(validator, fixed, root):  # siblings, allOf, oneOf's "exactly one"
            return None
        return fixed, repairs

    def _valid(self, validator: Any, value: Any, root: bool) -> bool:
        if root and self.gate is not None and isinstance(value, dict):
            try:
                if self.gate.is_valid(value):
                    return True
            except Exception:
                pass
        try:
            return bool(validator.is_valid(value))
        except Exception:  # as in fit()
            return False

    def _alternatives(self, node: Any, schema: Any, lead: Any, pointer: str,
                      depth: int) -> tuple[Any, list[Repair]] | None:
        """The single coerced ``node`` valid under ``schema``, or ``None`` if there are none or
        several distinct ones."""
        found: dict[str, tuple[Any, list[Repair]]] = {}
        for candidate, kind in _reinterpretations(node, self.max_depth):
            fitted = self.fit(candidate, schema, pointer, depth + 1)
            if fitted is not None:
                found.setdefault(_dumps(fitted[0], sort_keys=True),
                                 (fitted[0], [Repair(kind, pointer), *fitted[1]]))
        if (lead is not None and lead.validator in ("anyOf", "oneOf")
                and isinstance(node, dict | list)):
            # the coercion is inside the value: try it against each branch
            whole = self.validator.evolve(schema=schema)
            for branch in lead.validator_value:
                fitted = self.fit(node, branch, pointer, depth + 1)
                if fitted is not None and fitted[1] and self._valid(whole, fitted[0], False):
                    found.setdefault(_dumps(fitted[0], sort_keys=True), fitted)
        if len(found) != 1:
            return None
        return next(iter(found.values()))


def describe_repairs(repairs: Sequence[Repair]) -> str:
    """``string_to_integer /days, wrap_in_array /tags``: for the SSE comment and header."""
    return ", ".join(f"{r.kind} {r.pointer or '/'}" for r in repairs)


def verdict_summary(verdict: Verdict) -> Mapping[str, Any]:
    """A JSON-ready report of a verdict, for traces and the sessions endpoint."""
    return {
        "ok": verdict.ok,
        "tool": verdict.name,
        "errors": [{"pointer": i.pointer, "keyword": i.keyword, "message": i.message}
                   for i in verdict.errors],
        "repairs": [{"kind": r.kind, "pointer": r.pointer} for r in verdict.repairs],
    }
