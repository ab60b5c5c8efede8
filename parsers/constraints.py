"""A tool's schema translated for one backend's constraint engine, so the retry really constrains.

A retry "constrained to the schema" is only as good as the part of the schema the backend's
grammar engine enforces; the rest it drops, mostly without a word. What each engine enforces
(read from their converters' sources: llama.cpp's ``json-schema.cpp`` and
``json-schema-to-grammar.cpp`` as vendored in llama-cpp-python 0.3.36, llama-cpp-python's
``llama_grammar.py``, vLLM 0.32's ``backend_xgrammar.py`` with xgrammar 0.2.8):

================================  ===========  =============  ===============  ==============
keyword                           llama-server llama-cpp-py   Ollama           vLLM (xgrammar)
================================  ===========  =============  ===============  ==============
``pattern`` (plain subset)        yes          yes            yes              yes
``pattern`` with ``\\d \\w \\s``    any string   any string     any string       yes
unanchored ``pattern``            any string   refused (500)  any string       yes
``format`` date/time/date-time    shape only   shape only     shape only       shape only
``format`` uuid                   yes          yes            yes              yes
``format`` email/ipv4/hostname..  dropped      dropped        dropped          yes
``pattern`` + ``format``          pattern      pattern        pattern          (guidance)
integer ``minimum``/``maximum``   yes          dropped        yes              yes
number ``minimum``/``maximum``    dropped      dropped        dropped          yes
``multipleOf``                    dropped      dropped        dropped          (guidance)
``minLength``/``maxLength``       alone only   alone only     alone only       yes
``minItems``/``maxItems``         yes          yes            yes              yes
``uniqueItems``                   dropped      dropped        dropped          (guidance)
``enum``/``const``/``anyOf``      yes          yes            yes              yes
``type: [..., "null"]``           yes          siblings lost  yes              yes
``additionalProperties: false``   yes          yes            yes              yes
calendar validity, cross-field    no           no             no               no
================================  ===========  =============  ===============  ==============

("shape only": ``2026-02-30`` passes; "alone only": ignored beside a ``pattern`` or ``format``;
"(guidance)": vLLM hands such schemas to its guidance backend instead of xgrammar.)

:func:`translate` rewrites a schema so that every constraint the engine can express reaches it:

* ``pattern`` → the converters' regex subset (:mod:`.grammar_regex`): ``\\d`` spelled out,
  anchored, JSON-safe; one with no equivalent is removed from the constraint (reported), so
  the ``format`` or length beside it still applies instead of "any string";
* ``format`` → a ``pattern`` of its own that is exact where the engine's is only a shape: a
  ``date`` that exists in the calendar (leap years included), an RFC 3339 ``time`` with its
  offset, ``email``, ``ipv4``, ``hostname``... A ``pattern`` beside a ``format`` is replaced
  by the format's when it accepts every probe value of the format (it is then no stricter, in
  all likelihood, than the format: ``^\\d{4}-\\d{2}-\\d{2}$`` beside ``date``); else the
  pattern is kept and the format left to the validator (reported);
* integer ranges → an ``enum`` of the values for engines that drop them (up to
  :data:`ENUM_LIMIT` values), exclusive bounds made inclusive;
* ``type: [a, b]`` with siblings → ``anyOf`` of one schema per type, each with the siblings
  that apply to it (llama-cpp-python's port keeps only the bare types);
* what cannot reach the engine is listed in :attr:`Translation.dropped`, for the note and docs.

The translated schema is narrower than the original only where a grammar cannot produce a
value anyway (see :mod:`.grammar_regex`), so a value it admits is valid under the original
schema except for what is listed as dropped. Pure functions; no I/O.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import re2

from .grammar_regex import Untranslatable, to_grammar_regex
from .string_formats import FORMAT_CHECKS

__all__ = [
    "ENGINES",
    "ENUM_LIMIT",
    "FORMAT_PATTERNS",
    "Dropped",
    "Translation",
    "engine_for",
    "translate",
]

LLAMA_SERVER: Final = "llama-server"
LLAMA_CPP_PYTHON: Final = "llama-cpp-python"
OLLAMA: Final = "ollama"
VLLM: Final = "vllm"
ENGINES: Final = (LLAMA_SERVER, LLAMA_CPP_PYTHON, OLLAMA, VLLM)

#: a bounded integer with at most this many values becomes an ``enum`` for an engine that
#: ignores ranges (a grammar of 2,000 alternatives is a few KB; the converters handle it)
ENUM_LIMIT: Final = 2048

_D: Final = r"[0-9]"
_YEAR: Final = r"[1-9][0-9]{3}"  # 1000-9999: year 0 is not a date Python (or RFC 3339 tools) know
_MONTH_DAY: Final = (r"(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
                     r"|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
                     r"|02-(?:0[1-9]|1[0-9]|2[0-8]))")
_LEAP_YEAR: Final = (r"(?:[1-9][0-9](?:0[48]|[2468][048]|[13579][26])"
                     r"|(?:[2468][048]|[13579][26])00)")
_DATE: Final = rf"(?:{_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
_TIME: Final = (r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?"
                r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])")
_LABEL: Final = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_OCTET: Final = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_HEX4: Final = r"[0-9a-f]{1,4}"

#: each format as a regex in plain syntax, exact where a shape would not be (calendar dates),
#: narrower than the format where the format's full grammar is large (IPv6 in full form only,
#: URIs as https URLs): what a grammar built from it produces is always valid
FORMAT_PATTERNS: Final[dict[str, str]] = {
    "date": rf"^{_DATE}$",
    "time": rf"^{_TIME}$",
    "date-time": rf"^{_DATE}T{_TIME}$",
    "uuid": r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
    # lengths bounded so that every value fits the limits (64 before the @, 253 in a name)
    "email": rf"^[a-z0-9_+-]{{1,32}}(?:\.[a-z0-9_+-]{{1,24}})?@{_LABEL}(?:\.{_LABEL}){{0,2}}"
             rf"\.[a-z]{{2,24}}$",
    "hostname": rf"^{_LABEL}(?:\.{_LABEL}){{0,2}}$",
    "ipv4": rf"^{_OCTET}(?:\.{_OCTET}){{3}}$",
    "ipv6": rf"^(?:{_HEX4}:){{7}}{_HEX4}$",
    "uri": rf"^https://{_LABEL}(?:\.{_LABEL}){{1,2}}(?:/[a-zA-Z0-9._~-]*)*$",
    "duration": r"^P(?:[0-9]{1,4}D|(?:[0-9]{1,4}D)?T[0-9]{1,4}H(?:[0-9]{1,4}M)?"
                r"|T[0-9]{1,4}[HMS])$",
}

#: values each format must accept; a ``pattern`` accepting them all is taken to be no stricter
#: than the format (see :func:`translate`)
_PROBES: Final[dict[str, tuple[str, ...]]] = {
    "date": ("2026-01-31", "1999-12-01", "2024-02-29", "1000-10-10", "9999-06-30"),
    "time": ("00:00:00Z", "23:59:59+01:00", "12:30:15.250-05:30", "08:05:09Z"),
    "date-time": ("2026-01-31T00:00:00Z", "1999-12-01T23:59:59+01:00"),
    "uuid": ("123e4567-e89b-12d3-a456-426614174000", "00000000-0000-0000-0000-000000000000"),
    "email": ("a@example.com", "first.last+tag@mail.example.org"),
    "hostname": ("example.com", "a-b.c9.example.org", "localhost"),
    "ipv4": ("0.0.0.0", "192.168.1.254", "255.255.255.255"),
    "ipv6": ("2001:db8:0:0:0:0:0:1", "fe80:0:0:0:1:2:3:4"),
    "uri": ("https://example.com/a", "https://x.example.org/"),
    "duration": ("P3D", "PT1H", "P1DT2H30M"),
}

#: engines whose grammar converter ignores integer ranges
_NO_INTEGER_RANGES: Final = frozenset({LLAMA_CPP_PYTHON})
#: engines whose converter keeps only the bare types of ``type: [..]`` (siblings lost)
_BARE_TYPE_LISTS: Final = frozenset({LLAMA_CPP_PYTHON})
#: engines whose grammar drops these keywords (reported)
_IGNORED: Final[dict[str, frozenset[str]]] = {
    LLAMA_SERVER: frozenset({"multipleOf", "uniqueItems", "minContains", "maxContains",
                             "contains", "not", "if", "dependentRequired", "minProperties",
                             "maxProperties", "propertyNames"}),
    VLLM: frozenset({"not", "if", "dependentRequired"}),
}
_IGNORED[OLLAMA] = _IGNORED[LLAMA_SERVER]
_IGNORED[LLAMA_CPP_PYTHON] = _IGNORED[LLAMA_SERVER]
_NUMBER_BOUNDS: Final = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")

#: keywords whose value is one subschema / a list of them / a map of them
_ONE: Final = ("items", "additionalProperties", "not", "contains", "propertyNames", "if",
               "then", "else", "unevaluatedItems", "unevaluatedProperties")
_LIST: Final = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP: Final = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")

_STRING_KEYWORDS: Final = frozenset({"pattern", "format", "minLength", "maxLength"})
_NUMBER_KEYWORDS: Final = frozenset({"minimum", "maximum", "exclusiveMinimum",
                                     "exclusiveMaximum", "multipleOf"})
_ARRAY_KEYWORDS: Final = frozenset({"items", "prefixItems", "minItems", "maxItems",
                                    "uniqueItems", "contains"})
_OBJECT_KEYWORDS: Final = frozenset({"properties", "required", "additionalProperties",
                                     "patternProperties", "minProperties", "maxProperties"})
_TYPE_KEYWORDS: Final = {"string": _STRING_KEYWORDS, "integer": _NUMBER_KEYWORDS,
                         "number": _NUMBER_KEYWORDS, "array": _ARRAY_KEYWORDS,
                         "object": _OBJECT_KEYWORDS, "boolean": frozenset(),
                         "null": frozenset()}


@dataclass(frozen=True, slots=True)
class Dropped:
    """One constraint the engine will not enforce: where (JSON pointer into the schema),
    which keyword, and why. The validator still checks it."""

    pointer: str
    keyword: str
    reason: str


@dataclass(frozen=True, slots=True)
class Translation:
    schema: Any
    dropped: tuple[Dropped, ...] = field(default=())


def engine_for(backend: str) -> str | None:
    """The constraint engine of a backend kind as the proxy names it, or ``None`` when the
    backend has no schema-constrained decoding toolmend drives."""
    return {"llamacpp": LLAMA_SERVER, "llama-server": LLAMA_SERVER, "ollama": OLLAMA,
            "llama-cpp-python": LLAMA_CPP_PYTHON, "embedded": LLAMA_CPP_PYTHON,
            "vllm": VLLM}.get(backend)


def translate(schema: Any, engine: str) -> Translation:
    """``schema`` rewritten for ``engine`` (one of :data:`ENGINES`), and what it still drops."""
    if engine not in ENGINES:
        raise ValueError(f"unknown constraint engine {engine!r}; known: {', '.join(ENGINES)}")
    dropped: list[Dropped] = []
    out = _Translator(engine, dropped).node(schema, "")
    return Translation(out, tuple(dropped))


class _Translator:
    def __init__(self, engine: str, dropped: list[Dropped]) -> None:
        self.engine = engine
        self.dropped = dropped

    def drop(self, pointer: str, keyword: str, reason: str) -> None:
        self.dropped.append(Dropped(pointer, keyword, reason))

    def node(self, schema: Any, ptr: str) -> Any:
        if not isinstance(schema, Mapping):
            return schema
        out: dict[str, Any] = {}
        for key, value in schema.items():
            if key in _ONE:
                out[key] = self.node(value, f"{ptr}/{key}")
            elif key in _LIST and isinstance(value, list):
                out[key] = [self.node(v, f"{ptr}/{key}/{i}") for i, v in enumerate(value)]
            elif key in _MAP and isinstance(value, Mapping):
                out[key] = {k: self.node(v, f"{ptr}/{key}/{_esc(k)}") for k, v in value.items()}
            else:
                out[key] = value
        types = out.get("type")
        if isinstance(types, list) and self.engine in _BARE_TYPE_LISTS and len(types) > 1 and (
                set(out) - {"type", "description", "title", "default", "examples"}):
            return self.node({"anyOf": [_for_type(out, t) for t in types]}, ptr) | {
                k: out[k] for k in ("description", "title") if k in out}
        self.strings(out, ptr)
        self.numbers(out, ptr)
        for key in sorted(_IGNORED.get(self.engine, frozenset()) & out.keys()):
            self.drop(ptr, key, f"{self.engine}'s grammar does not enforce {key}")
        return out

    # strings ------------------------------------------------------------------------------
    def strings(self, out: dict[str, Any], ptr: str) -> None:
        pattern = out.get("pattern")
        fmt = out.get("format")
        fmt_pattern = FORMAT_PATTERNS.get(fmt) if isinstance(fmt, str) else None
        if isinstance(pattern, str):
            try:
                translated: str | None = to_grammar_regex(pattern)
            except Untranslatable as exc:
                translated = None
                del out["pattern"]
                self.drop(ptr, "pattern", f"{pattern!r} has no grammar equivalent ({exc})")
            if translated is not None:
                out["pattern"] = translated
                if fmt_pattern is not None and _accepts_probes(pattern, fmt):
                    out["pattern"] = to_grammar_regex(fmt_pattern)
                    out.pop("format")
                elif isinstance(fmt, str):
                    out.pop("format")
                    self.drop(ptr, "format", f"format {fmt!r} beside a stricter pattern: the "
                                             "grammar follows the pattern")
        if "pattern" not in out and fmt_pattern is not None:
            out["pattern"] = to_grammar_regex(fmt_pattern)
            out.pop("format")
        elif "pattern" not in out and isinstance(fmt, str) and fmt != "regex":
            if fmt in FORMAT_CHECKS and self.engine != VLLM:
                self.drop(ptr, "format", f"format {fmt!r} has no grammar here")
        if "pattern" in out and ("minLength" in out or "maxLength" in out) and (
                self.engine != VLLM):
            for key in ("minLength", "maxLength"):
                if key in out:
                    self.drop(ptr, key, f"{self.engine}'s grammar ignores {key} beside a "
                                        "pattern")

    # numbers ------------------------------------------------------------------------------
    def numbers(self, out: dict[str, Any], ptr: str) -> None:
        kind = out.get("type")
        bounded = [k for k in _NUMBER_BOUNDS if k in out]
        if not bounded or "enum" in out or "const" in out:
            return
        if kind == "integer":
            lo = _int_bound(out, "minimum", "exclusiveMinimum", up=True)
            hi = _int_bound(out, "maximum", "exclusiveMaximum", up=False)
            if self.engine in _NO_INTEGER_RANGES:
                step = out.get("multipleOf")
                if lo is not None and hi is not None and 0 <= hi - lo < ENUM_LIMIT:
                    out["enum"] = [v for v in range(lo, hi + 1)
                                   if not (isinstance(step, int) and step > 0 and v % step)]
                    if out["enum"]:
                        return
                    del out["enum"]
                for key in bounded:
                    self.drop(ptr, key, f"{self.engine}'s grammar ignores integer ranges "
                                        f"wider than {ENUM_LIMIT} values")
                return
            # inclusive bounds: every converter reads those (exclusive ones not all alike)
            for key in ("exclusiveMinimum", "exclusiveMaximum"):
                out.pop(key, None)
            if lo is not None:
                out["minimum"] = lo
            if hi is not None:
                out["maximum"] = hi
            return
        if kind == "number" and self.engine != VLLM:
            for key in bounded:
                self.drop(ptr, key, f"{self.engine}'s grammar ignores ranges on numbers")


def _for_type(schema: Mapping[str, Any], kind: Any) -> dict[str, Any]:
    """The part of ``schema`` that applies to values of type ``kind``."""
    other = set().union(*(v for k, v in _TYPE_KEYWORDS.items() if k != kind))
    own = _TYPE_KEYWORDS.get(kind, frozenset()) if isinstance(kind, str) else frozenset()
    skip = {"type", "description", "title"} | (other - own)
    return {"type": kind, **{k: v for k, v in schema.items() if k not in skip}}


@functools.lru_cache(maxsize=1024)
def _accepts_probes(pattern: str, fmt: str) -> bool:
    try:
        compiled = re2.compile(pattern)
    except re2.error:
        return False
    return all(compiled.search(p) is not None for p in _PROBES.get(fmt, ()))


def _int_bound(schema: Mapping[str, Any], inclusive: str, exclusive: str, *,
               up: bool) -> int | None:
    """The tightest integer bound from ``minimum``/``exclusiveMinimum`` (or the maxima)."""
    found: list[int] = []
    v = schema.get(inclusive)
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
        found.append(math.ceil(v) if up else math.floor(v))
    v = schema.get(exclusive)
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
        found.append(math.floor(v) + 1 if up else math.ceil(v) - 1)
    if not found:
        return None
    return max(found) if up else min(found)


def _esc(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")
