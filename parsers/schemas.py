"""Tool schemas: checked and compiled once per distinct schema, safe against hostile input.

A request's ``tools`` are untrusted: anyone who can reach the proxy can send a 10 MB schema, a
schema nested 10,000 levels deep, or a ``pattern`` like ``^(a+)+$`` that a backtracking engine
needs exponential time for. So before a schema is ever used, :func:`compile_tools`

* bounds the number of tools, each schema's canonical size and its nesting depth;
* checks every ``pattern`` and ``patternProperties`` key compiles on RE2, a linear-time engine
  (no backreferences, no lookaround), and refuses the schema otherwise: we would rather reject a
  schema up front with a clear message than run an unbounded regex on model output later;
* refuses remote ``$ref`` (no fetching of URLs named by a client) and refs that do not resolve
  from where they are written (in the scope of the nearest ``$id``, as validation resolves them);
* meta-validates it with the dialect named by ``$schema`` (2020-12 when absent), in Rust.

Those checks (:func:`check_schema`) are the expensive part and pure, so the proxy runs them for
large schemas in a worker process; :func:`plan_tools` does the cheap part of a request (shapes,
names, sizes, the per-request total, the cache) and :meth:`ToolPlan.finish` builds what passed.

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
the same tools on every step of a loop, so compiled validators are cached across requests in an
LRU keyed by a hash of the schema's canonical bytes, bounded by entries and by memory. The
Python validator's work on one call is bounded too (:func:`validation_budget`): recursive
``anyOf`` branches make it exponential in the depth of the arguments.

Every problem raises :class:`SchemaError`; the proxy turns it into a 400 whose ``param`` is the
error's JSON pointer into the request body.
"""

from __future__ import annotations

import contextlib
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

from .string_formats import FORMAT_CHECKS

__all__ = [
    "DEFAULT_LIMITS",
    "BudgetExceeded",
    "Checked",
    "CompiledSchema",
    "SchemaError",
    "SchemaLimits",
    "ToolPlan",
    "ToolSchema",
    "Toolset",
    "ValidatorCache",
    "build_schema",
    "canonical_bytes",
    "check_schema",
    "compile_schema",
    "compile_tools",
    "json_pointer",
    "plan_tools",
    "schema_cache",
    "validation_budget",
]


class SchemaError(ValueError):
    """A request's tool schema (or ``tool_choice``) cannot be used.

    ``tool`` names the tool (``None`` for request-level problems such as too many tools),
    ``pointer`` is a JSON pointer into the request body (``/tools/2/function/parameters/...``), so
    the proxy can put it in the 400's ``param`` as is. ``too_large`` marks the request-level
    bounds (total size, time to check), which the proxy answers with 413 rather than 400, and
    ``code`` is the error code it reports.
    """

    def __init__(self, tool: str | None, message: str, pointer: str = "", *,
                 too_large: bool = False, code: str = "invalid_tool_schema") -> None:
        self.tool = tool
        self.message = message
        self.pointer = pointer
        self.too_large = too_large
        self.code = code
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
    # canonical JSON of all of a request's tool schemas together: checking costs time in
    # proportion to it (about 0.5 s per 256 KB of properties), so it is bounded per request
    max_total_bytes: int = 1024 * 1024


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
    extras = instance.keys() - properties.keys() if isinstance(properties, dict) else set(
        instance)
    if not patterns:
        return extras  # the common case, at C speed: arguments may hold 100,000 keys
    return {key for key in extras if not any(p.search(key) is not None for p in patterns)}


def _re2_additional_properties(
    validator: Any, additional: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[Any]:
    """``additionalProperties`` as in :mod:`jsonschema`, but matching ``patternProperties`` keys
    with RE2 (the library joins them into one Python regex)."""
    if not validator.is_type(instance, "object"):
        return
    extras = _additional_keys(instance, schema)
    if validator.is_type(additional, "object"):
        # in the arguments' own order (deterministic, and no sort of 100,000 keys)
        for extra in (key for key in instance if key in extras):
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


class BudgetExceeded(Exception):
    """Validation took more keyword evaluations than :func:`validation_budget` allowed."""


_WORK = threading.local()  # .left: keyword evaluations still allowed in this thread, or None


@contextlib.contextmanager
def validation_budget(steps: int) -> Iterator[None]:
    """Bound the work of the Python validators (any compiled here) in this block.

    Python validation is the slow path (the Rust gate answers valid calls), and its cost is
    not bounded by the sizes alone: ``anyOf`` branches that each recurse make it exponential in
    the depth of the arguments (three levels of two branches per level of nesting took 4 s at
    depth 12). Every keyword evaluation counts one step; past ``steps``, the validator raises
    :class:`BudgetExceeded` and the caller answers without it.
    """
    previous = getattr(_WORK, "left", None)
    _WORK.left = steps
    try:
        yield
    finally:
        _WORK.left = previous


def _counted(keyword: Any) -> Any:
    def counted(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        left = getattr(_WORK, "left", None)
        if left is not None:
            if left <= 0:
                raise BudgetExceeded
            _WORK.left = left - 1
        return keyword(validator, value, instance, schema)

    return counted


@functools.cache
def _safe_class(base: type) -> type:
    """The dialect's validator class with the regex keywords on RE2, every keyword counted
    against :func:`validation_budget`. ``extend`` without a ``version`` does not register the
    class, so ``validator_for`` elsewhere is unaffected."""
    keywords = {**base.VALIDATORS, **_SAFE_KEYWORDS}  # type: ignore[attr-defined]
    return extend(base, {name: _counted(fn) for name, fn in keywords.items()})


def _is_re2_regex(instance: object) -> bool:
    if isinstance(instance, str):
        _regex(instance)
    return True


def _format_checker() -> FormatChecker:
    """Formats asserted on arguments: the explicit checks of ``string_formats`` (no optional
    dependency, so behaviour does not change with what happens to be installed); ``regex`` is
    checked with RE2."""
    checker = FormatChecker(formats=())
    for name, check in FORMAT_CHECKS.items():
        checker.checks(name)(check)
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
    scoped: bool = False  # an ``$id`` below the root: refs resolve against it
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
                elif key in ("$id", "id") and pointer and isinstance(value, str):
                    survey.scoped = True
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
    scoped: bool = False  # see Checked


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


def _specification(base: type) -> Any:
    return referencing.jsonschema.specification_with(
        base.META_SCHEMA.get("$schema", ""), default=referencing.jsonschema.DRAFT202012)


def _registry(schema: Mapping[str, Any], base: type) -> Any:
    """A registry holding the schema and every subschema with an ``$id``, crawled once.

    Validation resolves each ``$ref`` in the scope of the nearest ``$id``; a registry left to
    crawl lazily would walk the whole schema again for every such ref it evaluates.
    """
    resource = _specification(base).create_resource(schema)
    return _EMPTY_REGISTRY.with_resource(resource.id() or "", resource).crawl()


def _check_refs(schema: Mapping[str, Any], base: type, refs: list[tuple[str, str]],
                scoped: bool) -> None:
    """Every ref resolves, from where it is written, as validation will resolve it.

    A ref is looked up in the scope of its nearest enclosing ``$id``: ``#/$defs/x`` under a
    subschema with ``"$id": "http://a/b"`` means ``http://a/b#/$defs/x``, which exists only if
    that subschema has the ``$defs``. Checking from the root alone let such a schema in and
    then failed (``PointerToNowhere``) once the model called the tool, in the middle of a
    stream; now it is refused here, with the tool's name.
    """
    if not refs:
        return
    for ref, pointer in refs:
        if not ref.startswith("#"):
            raise _Problem(f"$ref {ref!r} is not local: only refs within the schema (#...) "
                           "are allowed", pointer)
    spec = _specification(base)
    registry = _registry(schema, base) if scoped else _EMPTY_REGISTRY
    root = registry.resolver_with_root(spec.create_resource(schema))
    # every node, keyword-agnostic like the survey (a ref may point anywhere), each in its
    # own scope; a node's ``$id`` applies to its own ``$ref`` as well
    stack: list[tuple[Any, Any, str]] = [(schema, root, "")]
    while stack:
        node, resolver, pointer = stack.pop()
        if isinstance(node, dict):
            if scoped and pointer:
                resolver = resolver.in_subresource(spec.create_resource(node))
            for key in ("$ref", "$dynamicRef"):
                ref = node.get(key)
                if isinstance(ref, str):
                    try:
                        resolver.lookup(ref)
                    except referencing.exceptions.Unresolvable:
                        scope = resolver._base_uri  # no public accessor
                        where = f" in the scope of $id {scope!r}" if scope else ""
                        raise _Problem(f"$ref {ref!r} does not resolve{where}",
                                       f"{pointer}/{key}") from None
            children = node.items()
        elif isinstance(node, list):
            children = enumerate(node)
        else:
            continue
        stack.extend((value, resolver, f"{pointer}/{json_pointer((key,))[1:]}")
                     for key, value in children if isinstance(value, dict | list))


def _refuse_retrieval(uri: str) -> Any:
    raise ValueError(f"remote reference {uri!r} is not allowed")


#: Largest schema that gets a Rust gate. Compiling one takes about 0.35 ms and 23 bytes of
#: memory per byte of schema, holding the GIL for part of it (80 ms and 3.7 MB for 157 KB):
#: real tool schemas are a few KB, and a client sending large ones with new names would make
#: every request pay that. Larger schemas are checked by the Python validator alone, within
#: its step budget (see ``validation.VALIDATION_STEPS``).
GATE_MAX_BYTES: Final = 64 * 1024


def _gate(schema: Mapping[str, Any]) -> Any:
    """The Rust validator for an already checked schema, or ``None`` if it cannot build one.
    ``RegexOptions`` selects the linear-time engine (the default one backtracks); ``formats``
    makes it check formats with the very functions the Python validator uses."""
    try:
        return jsonschema_rs.validator_for(
            schema, validate_formats=True, pattern_options=jsonschema_rs.RegexOptions(),
            retriever=_refuse_retrieval, formats=FORMAT_CHECKS)
    except Exception:  # any refusal only costs speed: the Python validator still checks
        return None


@dataclass(frozen=True, slots=True)
class Checked:
    """What checking a schema found: all that building its validator needs, and small, so a
    worker process can send it back (validators themselves cannot cross processes)."""

    depth: int
    scoped: bool = False  # has an ``$id`` below the root (refs resolve in its scope)


def check_schema(raw: bytes, limits: SchemaLimits = DEFAULT_LIMITS) -> Checked:
    """Every check on one schema's canonical bytes: the expensive part of compiling.

    Pure and self-contained, so the proxy can run it in a worker process, away from its event
    loop (meta-validating 256 KB of properties takes about half a second). Raises
    :class:`SchemaError` with ``tool=None`` and a pointer relative to the schema.
    """
    try:
        return _check(raw, limits)
    except _Problem as problem:
        raise SchemaError(None, problem.message, problem.pointer) from None
    except RecursionError:  # the depth bound comes first; this is the last resort
        raise SchemaError(None, "schema is nested too deeply to check") from None


def _meta_check(schema: Mapping[str, Any], base: type) -> None:
    """Validate the schema against its dialect's meta-schema.

    In Rust first: :mod:`jsonschema`'s meta-validation walks the 2020-12 meta-schema's dynamic
    refs in Python, about 2 ms per property (4.5 s for 2,800), where :mod:`jsonschema_rs` takes
    15 ms for the same schema. Its verdict and error (message, pointer) are used as they are;
    the Python check runs only for what the Rust one cannot take (a dialect it does not know).
    Formats asserted by the meta-schema (``regex`` for patterns) are checked by the survey,
    with RE2, in both cases.
    """
    try:
        jsonschema_rs.meta.validate(schema)
        return
    except jsonschema_rs.ValidationError as exc:
        raise _Problem(f"invalid schema: {exc.message}", json_pointer(exc.instance_path)
                       ) from None
    except Exception:  # not a verdict (e.g. an unknown meta-schema): ask the Python side
        pass
    try:
        base.check_schema(schema, format_checker=FORMAT_CHECKER)
    except jsonschema.exceptions.SchemaError as exc:
        raise _Problem(f"invalid schema: {exc.message}", json_pointer(exc.path)) from None


def _check(raw: bytes, limits: SchemaLimits) -> Checked:
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
    _meta_check(schema, base)
    _check_refs(schema, base, survey.refs, survey.scoped)
    return Checked(survey.depth, survey.scoped and bool(survey.refs))


def build_schema(raw: bytes, digest: str, checked: Checked) -> CompiledSchema:
    """The validators for a schema :func:`check_schema` accepted. Cheap next to checking:
    decoding the bytes, and the Rust gate's own compilation."""
    schema = orjson.loads(raw)
    base = _dialect(schema)
    registry = _registry(schema, base) if checked.scoped else _EMPTY_REGISTRY
    validator = _safe_class(base)(schema, registry=registry, format_checker=FORMAT_CHECKER)
    gate = _gate(schema) if len(raw) <= GATE_MAX_BYTES else None
    return CompiledSchema(digest, schema, validator, checked.depth, len(raw), gate,
                          checked.scoped)


#: Memory a compiled schema holds, per byte of its canonical JSON, measured: 23 (2,000
#: properties) to 34 (30 properties), nearly all of it the Rust gate; the decoded copy is ~1.
MEMORY_PER_SCHEMA_BYTE: Final = 32
DEFAULT_CACHE_BYTES: Final = 64 * 1024 * 1024


class ValidatorCache:
    """Bounded LRU of compiled schemas by digest of their canonical bytes.

    Bounded twice: by entries, and by the memory the entries hold (estimated from their size,
    :data:`MEMORY_PER_SCHEMA_BYTE`), so a stream of large schemas with new names cannot grow
    the process by more than ``max_bytes``. A large schema (over 1/32 of the budget: 64 KB of
    JSON with the default 64 MB, ten times the largest real tool schemas) is not kept compiled,
    only the verdict that it passed its checks, so sending it again costs a rebuild of its
    validators (off the event loop, in the proxy), not the checks; and a client sending large
    schemas with new names cannot fill the cache with them, evicting everyone else's.

    Thread-safe because the embedded backend and benchmarks may compile from threads; the lock is
    held only around dict operations, never while compiling (two threads missing on the same
    schema at once both compile it: harmless, and rarer than a lock held for milliseconds).
    """

    def __init__(self, maxsize: int = 512, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self.bytes = 0  # estimated memory held by the entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, CompiledSchema] = OrderedDict()
        self._checked: OrderedDict[str, Checked] = OrderedDict()  # passed, not kept compiled
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

    def checked(self, digest: str) -> Checked | None:
        """The verdict on a schema that passed its checks but was too large to keep compiled."""
        with self._lock:
            found = self._checked.get(digest)
            if found is not None:
                self._checked.move_to_end(digest)
            return found

    def put(self, entry: CompiledSchema) -> None:
        cost = entry.size * MEMORY_PER_SCHEMA_BYTE
        with self._lock:
            if cost > self.max_bytes // 32:
                self._checked[entry.digest] = Checked(entry.depth, entry.scoped)
                self._checked.move_to_end(entry.digest)
                while len(self._checked) > self.maxsize * 8:  # ~100 bytes each
                    self._checked.popitem(last=False)
                return
            old = self._entries.pop(entry.digest, None)
            if old is not None:
                self.bytes -= old.size * MEMORY_PER_SCHEMA_BYTE
            self._entries[entry.digest] = entry
            self.bytes += cost
            while len(self._entries) > self.maxsize or self.bytes > self.max_bytes:
                _, gone = self._entries.popitem(last=False)
                self.bytes -= gone.size * MEMORY_PER_SCHEMA_BYTE

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._checked.clear()
            self.bytes = 0
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)


schema_cache: Final = ValidatorCache()
"""The process-wide cache :func:`compile_tools` uses unless told otherwise."""

_NO_PARAMETERS: Final = {"type": "object"}


def canonical_bytes(parameters: Mapping[str, Any], limits: SchemaLimits = DEFAULT_LIMITS
                    ) -> bytes:
    """The schema's canonical JSON (sorted keys), the unit of caching and of every size limit;
    raises :class:`SchemaError` when it cannot be encoded or is over ``max_schema_bytes``."""
    try:
        raw = orjson.dumps(parameters, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:
        # orjson stops at 255 levels and on values JSON cannot carry
        raise SchemaError(None, f"schema cannot be encoded as JSON: {exc}") from None
    if len(raw) > limits.max_schema_bytes:
        raise SchemaError(
            None, f"schema is {len(raw)} bytes, over the limit of {limits.max_schema_bytes}"
        )
    return raw


def digest_of(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def _cached(digest: str, limits: SchemaLimits, cache: ValidatorCache | None
            ) -> CompiledSchema | Checked | None:
    if cache is None:
        return None
    found: CompiledSchema | Checked | None = cache.get(digest) or cache.checked(digest)
    if found is not None and found.depth > limits.max_depth:  # cached under other limits
        raise SchemaError(None, f"schema is nested deeper than the limit of {limits.max_depth}")
    return found


def _built(raw: bytes, digest: str, found: CompiledSchema | Checked,
           cache: ValidatorCache | None) -> CompiledSchema:
    if isinstance(found, CompiledSchema):
        return found
    entry = build_schema(raw, digest, found)
    if cache is not None:
        cache.put(entry)
    return entry


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
    raw = canonical_bytes(parameters, limits)
    digest = digest_of(raw)
    found = _cached(digest, limits, cache)
    return _built(raw, digest, found or check_schema(raw, limits), cache)


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


def _choice(tool_choice: object, tools: Mapping[str, Any]) -> tuple[str, str | None]:
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


@dataclass(slots=True)
class ToolPlan:
    """A request's tools after the cheap checks (shapes, names, sizes, ``tool_choice``, the
    cache). What is left is checking the schemas the cache did not have (:attr:`misses`, each
    with :func:`check_schema`), wherever the caller chooses to run that, then :meth:`finish`.
    """

    names: list[str]
    raws: list[bytes]
    digests: list[str]
    found: list[CompiledSchema | Checked | None]
    choice: str
    forced: str | None
    total_bytes: int

    @property
    def misses(self) -> list[int]:
        """Indexes of the tools whose schema must still be checked (one per distinct schema)."""
        seen: set[str] = set()
        out = []
        for i, (digest, found) in enumerate(zip(self.digests, self.found, strict=True)):
            if found is None and digest not in seen:
                seen.add(digest)
                out.append(i)
        return out

    def miss_bytes(self) -> int:
        return sum(len(self.raws[i]) for i in self.misses)

    def located(self, index: int, exc: SchemaError) -> SchemaError:
        """``exc`` (from checking tool ``index``'s schema) with the tool's name and pointer."""
        return SchemaError(self.names[index], exc.message,
                           f"/tools/{index}/function/parameters{exc.pointer}")

    def to_build(self, checked: Mapping[int, Checked]) -> list[tuple[bytes, str, Checked]]:
        """What :meth:`finish` would build (``raw, digest, verdict``), once per schema, for a
        caller that builds elsewhere (large schemas, in a thread) and passes the results in."""
        verdicts = {self.digests[i]: c for i, c in checked.items()}
        out: dict[str, tuple[bytes, str, Checked]] = {}
        for raw, digest, found in zip(self.raws, self.digests, self.found, strict=True):
            if not isinstance(found, CompiledSchema) and digest not in out:
                out[digest] = (raw, digest, found or verdicts[digest])
        return list(out.values())

    def finish(self, checked: Mapping[int, Checked],
               cache: ValidatorCache | None = schema_cache,
               built: Mapping[str, CompiledSchema] | None = None) -> Toolset:
        """The toolset, from the cache's entries, the verdicts on the misses (by index) and
        what was ``built`` already (by digest; put in the cache by whoever built it)."""
        verdicts = {self.digests[i]: c for i, c in checked.items()}
        built = dict(built or {})
        compiled: dict[str, ToolSchema] = {}
        for name, raw, digest, found in zip(self.names, self.raws, self.digests, self.found,
                                            strict=True):
            entry = built.get(digest)
            if entry is None:
                entry = built[digest] = _built(raw, digest, found or verdicts[digest], cache)
            compiled[name] = ToolSchema(name, entry)
        return Toolset(compiled, self.choice, self.forced)


def plan_tools(
    tools: Sequence[Any] | None,
    tool_choice: object = None,
    *,
    limits: SchemaLimits = DEFAULT_LIMITS,
    cache: ValidatorCache | None = schema_cache,
) -> ToolPlan:
    """The cheap part of :func:`compile_tools`: everything but checking uncached schemas.

    Stops at the first problem, and in particular as soon as the schemas seen so far add up to
    more than ``max_total_bytes`` (``too_large``), before encoding the rest.
    """
    if tools is None:
        tools = []
    if not isinstance(tools, list | tuple):
        raise SchemaError(None, "'tools' must be an array", "/tools")
    if len(tools) > limits.max_tools:
        raise SchemaError(None, f"{len(tools)} tools, over the limit of {limits.max_tools}",
                          "/tools")
    plan = ToolPlan([], [], [], [], "auto", None, 0)
    for index, tool in enumerate(tools):
        name, parameters = _tool_name(tool, index)
        if name in plan.names:
            raise SchemaError(name, "two tools have this name", f"/tools/{index}/function/name")
        pointer = f"/tools/{index}/function/parameters"
        try:
            raw = canonical_bytes(parameters, limits)
            plan.total_bytes += len(raw)
            if plan.total_bytes > limits.max_total_bytes:
                raise SchemaError(
                    None, f"the tool schemas add up to more than the limit of "
                    f"{limits.max_total_bytes} bytes per request (max_tool_schemas_bytes); "
                    f"exceeded at tool {index}", too_large=True,
                    code="tool_schemas_too_large")
            digest = digest_of(raw)
            found = _cached(digest, limits, cache)
        except SchemaError as exc:
            if exc.too_large:
                raise SchemaError(None, exc.message, "/tools", too_large=True,
                                  code=exc.code) from None
            raise SchemaError(name, exc.message, pointer + exc.pointer) from None
        plan.names.append(name)
        plan.raws.append(raw)
        plan.digests.append(digest)
        plan.found.append(found)
    plan.choice, plan.forced = _choice(tool_choice, dict.fromkeys(plan.names))
    return plan


def compile_tools(
    tools: Sequence[Any] | None,
    tool_choice: object = None,
    *,
    limits: SchemaLimits = DEFAULT_LIMITS,
    cache: ValidatorCache | None = schema_cache,
) -> Toolset:
    """Check and compile a request's ``tools`` and ``tool_choice`` (both as decoded JSON).

    Call once per request, when it arrives; raises :class:`SchemaError` (→ 400, or 413 when
    ``too_large``) naming the tool, the problem and a pointer into the request body.
    ``cache=None`` compiles every schema afresh (for benchmarks and tests). Everything runs
    in the calling thread; the proxy uses :func:`plan_tools` and checks large misses in a
    worker process instead.
    """
    plan = plan_tools(tools, tool_choice, limits=limits, cache=cache)
    checked: dict[int, Checked] = {}
    for index in plan.misses:
        try:
            checked[index] = check_schema(plan.raws[index], limits)
        except SchemaError as exc:
            raise plan.located(index, exc) from None
    return plan.finish(checked, cache)
