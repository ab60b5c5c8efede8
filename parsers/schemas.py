"""Tool schemas: checked and compiled once per distinct schema, safe against hostile input.

A request's ``tools`` are untrusted: anyone who can reach the proxy can send a 10 MB schema, a
schema nested 10,000 levels deep, or a ``pattern`` like ``^(a+)+$`` that a backtracking engine
needs exponential time for. So before a schema is ever used, :func:`compile_tools`

* bounds the number of tools, each schema's canonical size and its nesting depth;
* checks every ``pattern`` and ``patternProperties`` key compiles on RE2, a linear-time engine
  (no backreferences, no lookaround), and refuses the schema otherwise: we would rather reject a
  schema up front with a clear message than run an unbounded regex on model output later;
* refuses remote ``$ref`` (no fetching of URLs named by a client) and refs that do not resolve;
* meta-validates it with the dialect named by ``$schema`` (2020-12 when absent).

Validation then runs on a :mod:`jsonschema` validator class whose ``pattern``,
``patternProperties`` and ``additionalProperties`` keywords use RE2, so Python's ``re`` never runs
a schema pattern. (``unevaluatedProperties`` evaluates ``patternProperties`` with ``re`` deep
inside :mod:`jsonschema`; schemas combining the two are refused rather than re-implemented.)

Validation is two-tier. Python's :mod:`jsonschema` costs tens of microseconds for a 3-property
schema and milliseconds for a 50-property one, per call; :mod:`jsonschema_rs` (Rust, with its
linear-time ``regex`` engine for patterns, offline) answers "valid?" 100-300x faster. So each
compiled schema carries a Rust ``gate``: a call it accepts is valid, done. Only a call it rejects
goes to the Python validator, which produces the errors (pointer, keyword, message) and drives
coercion, and is the authority: if it finds no error (the engines differ at the edges, e.g.
formats only Rust checks), the call is valid. A schema the gate cannot build simply has no gate.

Compiling is the expensive part (meta-validation alone is ~100x one validation), and agents send
the same tools on every step of a loop, so compiled validators are cached across requests in a
bounded LRU keyed by a hash of the schema's canonical bytes.

Every problem raises :class:`SchemaError`; the proxy turns it into a 400 whose ``param`` is the
error's JSON pointer into the request body.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import jsonschema.exceptions
import jsonschema_rs
import orjson
import re2
import referencing
import referencing.exceptions
import referencing.jsonschema
from jsonschema import FormatChecker, ValidationError
from jsonschema.protocols import Validator
from jsonschema.validators import Draft202012Validator, extend, validator_for

__all__ = [
    "DEFAULT_LIMITS",
    "CompiledSchema",
    "SchemaError",
    "SchemaLimits",
    "ToolSchema",
    "Toolset",
    "ValidatorCache",
    "compile_schema",
    "compile_tools",
    "json_pointer",
    "schema_cache",
]


class SchemaError(ValueError):
    """A request's tool schema (or ``tool_choice``) cannot be used.

    ``tool`` names the tool (``None`` for request-level problems such as too many tools),
    ``pointer`` is a JSON pointer into the request body (``/tools/2/function/parameters/...``), so
    the proxy can put it in the 400's ``param`` as is.
    """

    def __init__(self, tool: str | None, message: str, pointer: str = "") -> None:
        self.tool = tool
        self.message = message
        self.pointer = pointer
        where = f" (at {pointer})" if pointer else ""
        prefix = f"tool {tool!r}: " if tool is not None else ""
        super().__init__(f"{prefix}{message}{where}")


@dataclass(frozen=True, slots=True)
class SchemaLimits:
    """Bounds on what a client may ask us to compile. Defaults fit real agent tool sets (the
    largest MCP tool schemas seen are a few KB, a few levels deep) with wide margins."""

    max_tools: int = 128  # OpenAI's own limit
    max_schema_bytes: int = 256 * 1024  # canonical JSON of one tool's parameters
    max_depth: int = 64  # JSON nesting of one tool's parameters (objects and arrays)
    max_pattern_bytes: int = 4096  # one regex; RE2's own memory cap bounds what it compiles


DEFAULT_LIMITS: Final = SchemaLimits()

# ---------------------------------------------------------------------------------------------
# RE2 as the pattern engine

_RE2_OPTIONS: Final = re2.Options()
_RE2_OPTIONS.log_errors = False  # a hostile pattern must not write to our stderr
_RE2_OPTIONS.max_mem = 8 << 20  # per compiled program; bigger patterns are refused


@functools.lru_cache(maxsize=2048)
def _regex(pattern: str) -> Any:
    """Compile ``pattern`` with RE2 (raises ``re2.error``). Cached: the same few patterns are used
    by every call to the same tools."""
    return re2.compile(pattern, _RE2_OPTIONS)


def _regex_problem(pattern: str, limits: SchemaLimits) -> str | None:
    """Why ``pattern`` cannot be used, or ``None`` when it can."""
    if len(pattern.encode("utf-8", "surrogatepass")) > limits.max_pattern_bytes:
        return f"pattern is longer than the limit of {limits.max_pattern_bytes} bytes"
    try:
        _regex(pattern)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        return (
            f"pattern {pattern!r} is not supported: schema patterns run on RE2, a linear-time "
            f"engine without backreferences or lookaround ({reason})"
        )
    return None


def _short(value: str, limit: int = 60) -> str:
    """``repr`` of a model-supplied string, cut: error messages must stay small."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _re2_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    if not validator.is_type(instance, "string"):
        return
    try:
        compiled = _regex(pattern)
    except re2.error:  # refused at compile time; fail closed if reached through an odd $ref
        yield ValidationError(f"pattern {pattern!r} is not supported")
        return
    if compiled.search(instance) is None:
        yield ValidationError(f"{_short(instance)} does not match {pattern!r}")


def _re2_pattern_properties(
    validator: Any, pattern_properties: Mapping[str, Any], instance: Any, schema: Any
) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in pattern_properties.items():
        try:
            compiled = _regex(pattern)
        except re2.error:
            yield ValidationError(f"pattern {pattern!r} is not supported")
            continue
        for key, value in instance.items():
            if compiled.search(key) is not None:
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_keys(instance: Mapping[str, Any], schema: Mapping[str, Any]) -> set[str]:
    properties = schema.get("properties", {})
    patterns = []
    for pattern in schema.get("patternProperties", {}):
        try:
            patterns.append(_regex(pattern))
        except re2.error:
            continue  # such a key matches nothing, as if absent
    return {
        key
        for key in instance
        if key not in properties and not any(p.search(key) is not None for p in patterns)
    }


def _re2_additional_properties(
    validator: Any, additional: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[Any]:
    """``additionalProperties`` as in :mod:`jsonschema`, but matching ``patternProperties`` keys
    with RE2 (the library joins them into one Python regex)."""
    if not validator.is_type(instance, "object"):
        return
    extras = _additional_keys(instance, schema)
    if validator.is_type(additional, "object"):
        for extra in sorted(extras):
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        names = ", ".join(repr(key) for key in sorted(extras))
        verb = "was" if len(extras) == 1 else "were"
        yield ValidationError(f"Additional properties are not allowed ({names} {verb} unexpected)")


_SAFE_KEYWORDS: Final = {
    "pattern": _re2_pattern,
    "patternProperties": _re2_pattern_properties,
    "additionalProperties": _re2_additional_properties,
}


@functools.cache
def _safe_class(base: type) -> type:
    """The dialect's validator class with the regex keywords on RE2. ``extend`` without a
    ``version`` does not register the class, so ``validator_for`` elsewhere is unaffected."""
    return extend(base, _SAFE_KEYWORDS)


def _is_re2_regex(instance: object) -> bool:
    if isinstance(instance, str):
        _regex(instance)
    return True


def _format_checker() -> FormatChecker:
    """Formats asserted on arguments: a fixed set needing no optional dependency, so behaviour
    does not change with what happens to be installed. ``regex`` is checked with RE2."""
    checker = FormatChecker(formats=("date", "email", "ipv4", "ipv6", "uuid"))
    checker.checks("regex", raises=re2.error)(_is_re2_regex)
    return checker


FORMAT_CHECKER: Final = _format_checker()

# A registry with nothing in it and no retrieval function: a ``$ref`` to a URL is unresolvable
# instead of fetched (jsonschema's default still fetches, with a deprecation warning).
_EMPTY_REGISTRY: Final = referencing.Registry()

# ---------------------------------------------------------------------------------------------
# The structural walk


def json_pointer(parts: Sequence[object] | Iterator[object]) -> str:
    """RFC 6901 pointer for a path of keys and indexes (``""`` is the whole document)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


@dataclass(slots=True)
class _Survey:
    depth: int = 0
    patterns: list[tuple[str, str]] = field(default_factory=list)  # (pattern, pointer)
    refs: list[tuple[str, str]] = field(default_factory=list)  # (ref, pointer)
    nested_dialect: str | None = None  # pointer of a ``$schema`` below the root
    unevaluated_properties: str | None = None  # pointer of one use
    pattern_properties: str | None = None  # pointer of one use


def _survey(schema: Mapping[str, Any], limits: SchemaLimits) -> _Survey | str:
    """One iterative pass over every node: depth, regexes, refs, and the constructs we refuse.

    Keyword-agnostic on purpose: a ``$ref`` can point anywhere in the document, including under
    keywords we do not know, so every ``pattern`` string and ``patternProperties`` object counts
    (a ``const`` value holding a ``pattern`` key is treated as one; harmless in practice).
    Returns the pointer at which the depth limit is crossed, as a string, if it is.
    """
    survey = _Survey()
    stack: list[tuple[Any, str, int]] = [(schema, "", 1)]
    while stack:
        node, pointer, depth = stack.pop()
        if depth > limits.max_depth:
            return pointer
        survey.depth = max(survey.depth, depth)
        if isinstance(node, dict):
            for key, value in node.items():
                child = f"{pointer}/{json_pointer((key,))[1:]}"
                if key == "pattern" and isinstance(value, str):
                    survey.patterns.append((value, child))
                elif key == "patternProperties" and isinstance(value, dict):
                    survey.pattern_properties = survey.pattern_properties or child
                    survey.patterns.extend(
                        (p, f"{child}/{json_pointer((p,))[1:]}") for p in value
                    )
                elif key in ("$ref", "$dynamicRef") and isinstance(value, str):
                    survey.refs.append((value, child))
                elif key == "$schema" and pointer:
                    survey.nested_dialect = survey.nested_dialect or child
                elif key == "unevaluatedProperties":
                    survey.unevaluated_properties = survey.unevaluated_properties or child
                if isinstance(value, dict | list):
                    stack.append((value, child, depth + 1))
        elif isinstance(node, list):
            stack.extend(
                (value, f"{pointer}/{i}", depth + 1)
                for i, value in enumerate(node)
                if isinstance(value, dict | list)
            )
    return survey


# ---------------------------------------------------------------------------------------------
# Compiling one schema


@dataclass(frozen=True, slots=True)
class CompiledSchema:
    """A checked schema and its validator, shared by every request sending the same schema.

    ``schema`` is a private copy (decoded from the canonical bytes), so a later mutation of some
    request's dict cannot change what a cached validator checks.
    """

    digest: str
    schema: Mapping[str, Any]
    validator: Validator
    depth: int
    size: int
    gate: Any = None  # jsonschema_rs validator, or None: a fast "is it valid?" (see the top)


class _Problem(Exception):
    """A schema problem before the tool name and request pointer are known."""

    def __init__(self, message: str, pointer: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.pointer = pointer


def _dialect(schema: Mapping[str, Any]) -> type:
    if "$schema" not in schema:
        return Draft202012Validator
    uri = schema["$schema"]
    found = validator_for(schema, default=None) if isinstance(uri, str) else None
    if found is None:
        raise _Problem(f"unsupported $schema {uri!r}", "/$schema")
    return found


def _check_refs(schema: Mapping[str, Any], base: type, refs: list[tuple[str, str]]) -> None:
    if not refs:
        return
    spec = referencing.jsonschema.specification_with(
        base.META_SCHEMA.get("$schema", ""), default=referencing.jsonschema.DRAFT202012
    )
    resolver = _EMPTY_REGISTRY.resolver_with_root(spec.create_resource(schema))
    for ref, pointer in refs:
        if not ref.startswith("#"):
            raise _Problem(f"$ref {ref!r} is not local: only refs within the schema (#...) "
                           "are allowed", pointer)
        try:
            resolver.lookup(ref)
        except referencing.exceptions.Unresolvable:
            raise _Problem(f"$ref {ref!r} does not resolve", pointer) from None


def _refuse_retrieval(uri: str) -> Any:
    raise ValueError(f"remote reference {uri!r} is not allowed")


def _gate(schema: Mapping[str, Any]) -> Any:
    """The Rust validator for an already checked schema, or ``None`` if it cannot build one.
    ``RegexOptions`` selects the linear-time engine (the default one backtracks)."""
    try:
        return jsonschema_rs.validator_for(
            schema, validate_formats=True, pattern_options=jsonschema_rs.RegexOptions(),
            retriever=_refuse_retrieval)
    except Exception:  # any refusal only costs speed: the Python validator still checks
        return None


def _compile(raw: bytes, digest: str, limits: SchemaLimits) -> CompiledSchema:
    schema = orjson.loads(raw)
    survey = _survey(schema, limits)
    if isinstance(survey, str):
        raise _Problem(f"schema is nested deeper than the limit of {limits.max_depth}", survey)
    if survey.nested_dialect is not None:
        raise _Problem("$schema is only allowed at the top of a tool's parameters",
                       survey.nested_dialect)
    if survey.unevaluated_properties and survey.pattern_properties:
        raise _Problem("unevaluatedProperties cannot be combined with patternProperties",
                       survey.unevaluated_properties)
    for pattern, pointer in survey.patterns:
        problem = _regex_problem(pattern, limits)
        if problem is not None:
            raise _Problem(problem, pointer)
    base = _dialect(schema)
    try:
        base.check_schema(schema, format_checker=FORMAT_CHECKER)
    except jsonschema.exceptions.SchemaError as exc:
        raise _Problem(f"invalid schema: {exc.message}", json_pointer(exc.path)) from None
    _check_refs(schema, base, survey.refs)
    validator = _safe_class(base)(
        schema, registry=_EMPTY_REGISTRY, format_checker=FORMAT_CHECKER
    )
    return CompiledSchema(digest, schema, validator, survey.depth, len(raw), _gate(schema))


class ValidatorCache:
    """Bounded LRU of compiled schemas by digest of their canonical bytes.

    Thread-safe because the embedded backend and benchmarks may compile from threads; the lock is
    held only around dict operations, never while compiling (two threads missing on the same
    schema at once both compile it: harmless, and rarer than a lock held for milliseconds).
    """

    def __init__(self, maxsize: int = 512) -> None:
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, CompiledSchema] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: str) -> CompiledSchema | None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(digest)
            self.hits += 1
            return entry

    def put(self, entry: CompiledSchema) -> None:
        with self._lock:
            self._entries[entry.digest] = entry
            self._entries.move_to_end(entry.digest)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)


schema_cache: Final = ValidatorCache()
"""The process-wide cache :func:`compile_tools` uses unless told otherwise."""

_NO_PARAMETERS: Final = {"type": "object"}


def compile_schema(
    parameters: Mapping[str, Any],
    *,
    limits: SchemaLimits = DEFAULT_LIMITS,
    cache: ValidatorCache | None = schema_cache,
) -> CompiledSchema:
    """Check and compile one schema, or return the cached result for identical bytes.

    Raises :class:`SchemaError` with ``tool=None`` and a pointer relative to the schema;
    :func:`compile_tools` re-raises it with the tool's name and request pointer.
    """
    try:
        raw = orjson.dumps(parameters, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:
        # orjson stops at 255 levels and on values JSON cannot carry
        raise SchemaError(None, f"schema cannot be encoded as JSON: {exc}") from None
    if len(raw) > limits.max_schema_bytes:
        raise SchemaError(
            None, f"schema is {len(raw)} bytes, over the limit of {limits.max_schema_bytes}"
        )
    digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
    entry = cache.get(digest) if cache is not None else None
    if entry is not None:
        if entry.depth > limits.max_depth:  # cached under other limits
            raise SchemaError(None, f"schema is nested deeper than the limit of {limits.max_depth}")
        return entry
    try:
        entry = _compile(raw, digest, limits)
    except _Problem as problem:
        raise SchemaError(None, problem.message, problem.pointer) from None
    if cache is not None:
        cache.put(entry)
    return entry


# ---------------------------------------------------------------------------------------------
# A request's tools


@dataclass(frozen=True, slots=True)
class ToolSchema:
    """One tool of the request, compiled."""

    name: str
    compiled: CompiledSchema

    @property
    def schema(self) -> Mapping[str, Any]:
        return self.compiled.schema

    @property
    def validator(self) -> Validator:
        return self.compiled.validator


@dataclass(frozen=True, slots=True)
class Toolset:
    """What one request allows the model to call.

    ``choice`` is ``"auto"``, ``"none"``, ``"required"`` or ``"function"`` (a named
    ``tool_choice``; then ``forced`` is the name).
    """

    tools: Mapping[str, ToolSchema]
    choice: str = "auto"
    forced: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.tools)

    def only_tool(self) -> ToolSchema | None:
        """The single tool a call can target (forced, or the only one), else ``None``."""
        if self.forced is not None:
            return self.tools[self.forced]
        if len(self.tools) == 1:
            return next(iter(self.tools.values()))
        return None


def _tool_name(tool: object, index: int) -> tuple[str, Mapping[str, Any]]:
    """The function's name and parameters, checking the OpenAI shape."""
    pointer = f"/tools/{index}"
    if not isinstance(tool, dict):
        raise SchemaError(None, "a tool must be an object", pointer)
    kind = tool.get("type", "function")
    if kind != "function":
        raise SchemaError(None, f"unsupported tool type {kind!r}", pointer + "/type")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise SchemaError(None, "a tool needs a 'function' object", pointer + "/function")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise SchemaError(None, "a function needs a non-empty string 'name'",
                          pointer + "/function/name")
    parameters = function.get("parameters", _NO_PARAMETERS)
    if not isinstance(parameters, dict):
        raise SchemaError(name, "'parameters' must be a JSON Schema object",
                          pointer + "/function/parameters")
    return name, parameters


def _choice(tool_choice: object, tools: Mapping[str, ToolSchema]) -> tuple[str, str | None]:
    if tool_choice is None or tool_choice == "auto":
        return "auto", None
    if tool_choice in ("none", "required"):
        if tool_choice == "required" and not tools:
            raise SchemaError(None, "tool_choice 'required' needs at least one tool",
                              "/tool_choice")
        return str(tool_choice), None
    if isinstance(tool_choice, dict) and tool_choice.get("type", "function") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise SchemaError(None, "a named tool_choice needs function.name",
                              "/tool_choice/function/name")
        if name not in tools:
            raise SchemaError(name, "tool_choice names a tool that is not in 'tools'",
                              "/tool_choice/function/name")
        return "function", name
    raise SchemaError(None, f"unsupported tool_choice {tool_choice!r}", "/tool_choice")


def compile_tools(
    tools: Sequence[Any] | None,
    tool_choice: object = None,
    *,
    limits: SchemaLimits = DEFAULT_LIMITS,
    cache: ValidatorCache | None = schema_cache,
) -> Toolset:
    """Check and compile a request's ``tools`` and ``tool_choice`` (both as decoded JSON).

    Call once per request, when it arrives; raises :class:`SchemaError` (→ 400) naming the tool,
    the problem and a pointer into the request body. ``cache=None`` compiles every schema afresh
    (for benchmarks and tests).
    """
    if tools is None:
        tools = []
    if not isinstance(tools, list | tuple):
        raise SchemaError(None, "'tools' must be an array", "/tools")
    if len(tools) > limits.max_tools:
        raise SchemaError(None, f"{len(tools)} tools, over the limit of {limits.max_tools}",
                          "/tools")
    compiled: dict[str, ToolSchema] = {}
    for index, tool in enumerate(tools):
        name, parameters = _tool_name(tool, index)
        if name in compiled:
            raise SchemaError(name, "two tools have this name", f"/tools/{index}/function/name")
        try:
            schema = compile_schema(parameters, limits=limits, cache=cache)
        except SchemaError as exc:
            pointer = f"/tools/{index}/function/parameters{exc.pointer}"
            raise SchemaError(name, exc.message, pointer) from None
        compiled[name] = ToolSchema(name, schema)
    choice, forced = _choice(tool_choice, compiled)
    return Toolset(compiled, choice, forced)
