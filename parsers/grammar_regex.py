"""Regexes rewritten into the subset every JSON-schema-to-grammar converter turns into grammar.

llama.cpp's converter (llama-server, Ollama, and llama-cpp-python's Python port of it) turns a
string's ``pattern`` into grammar only when the pattern is anchored (``^...$``) and uses plain
syntax: literals, ``.``, ``[...]`` classes with ``\\xHH``/``\\uHHHH`` escapes, groups, ``|``,
``* + ?`` and ``{m,n}``. Anything else -- ``\\d``, ``\\w``, ``\\s``, ``\\b``, an unanchored
pattern -- and llama-server logs "accepting any string": the constraint silently vanishes.
(That is how a retry "constrained" to ``^([01]\\d|2[0-3]):[0-5]\\d$`` came back as
``"2026-07-10"``.) Its grammar also writes the characters of a pattern into the JSON string
raw, so a ``.`` or ``[^a-z]`` can produce a ``"`` or a newline and break the JSON.

:func:`to_grammar_regex` parses a pattern with Python's own regex parser and writes it back in
that subset, with the same meaning inside a JSON string:

* ``\\d`` → ``[0-9]``, ``\\w`` → ``[0-9A-Z_a-z]``, their negations as explicit ranges;
* ``.`` and negated classes exclude what a JSON string cannot hold raw (``"``, ``\\``, control
  characters); ``\\s`` becomes a space (the other white space would need JSON escapes);
* every literal that is not a letter or digit is written as a ``\\xHH`` / ``\\uHHHH`` escape;
* an unanchored side gets ``[^"\\\\\\x00-\\x1f]*``, since JSON Schema patterns match anywhere.

Those rewrites narrow a pattern only where a raw JSON character could not be produced anyway
(a ``"`` inside the value, a tab): what the grammar allows still matches the original pattern.
What has no equivalent (lookaround, backreferences, ``\\b``, anchors inside, case-insensitive
flags, literal ``"`` or ``\\``) returns ``None`` with the reason: the caller drops the pattern
from the constraint (the validator still checks it) rather than send one that means "any string".

The output is plain regex syntax too, so RE2 and :mod:`re` read it with the same meaning (the
tests check that).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Final

try:  # Python 3.11+
    import re._constants as _c  # type: ignore[import-not-found]
    import re._parser as _p  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]

__all__ = ["JSON_SAFE_CHAR", "Untranslatable", "to_grammar_regex"]

_MAX_CODE: Final = 0x10FFFF
#: code points a JSON string cannot hold unescaped
_UNSAFE: Final = ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C))
#: one character a grammar may write raw inside a JSON string
JSON_SAFE_CHAR: Final = r"[^\x00-\x1f\x22\x5c]"
_MAX_OUTPUT: Final = 16 * 1024  # a pattern that expands past this is not worth a grammar

_CATEGORY_RANGES: Final = {
    _c.CATEGORY_DIGIT: ((0x30, 0x39),),
    _c.CATEGORY_WORD: ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)),
    _c.CATEGORY_SPACE: ((0x20, 0x20),),  # tab, newline... need JSON escapes: not raw
}
_NEGATED_CATEGORY: Final = {
    _c.CATEGORY_NOT_DIGIT: _c.CATEGORY_DIGIT,
    _c.CATEGORY_NOT_WORD: _c.CATEGORY_WORD,
    _c.CATEGORY_NOT_SPACE: _c.CATEGORY_SPACE,
}
_NOT_SPACE_EXCLUDES: Final = ((0x09, 0x0D), (0x20, 0x20))


class Untranslatable(ValueError):
    """The pattern has no equivalent in the grammar subset; the message says what."""


@dataclass(frozen=True, slots=True)
class _Ranges:
    """A set of code points as sorted, disjoint, inclusive ranges."""

    spans: tuple[tuple[int, int], ...]

    @staticmethod
    def of(spans: Any) -> _Ranges:
        merged: list[list[int]] = []
        for lo, hi in sorted(spans):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        return _Ranges(tuple((lo, hi) for lo, hi in merged))

    def minus(self, other: Any) -> _Ranges:
        out: list[tuple[int, int]] = []
        for lo, hi in self.spans:
            pieces = [(lo, hi)]
            for olo, ohi in other:
                nxt = []
                for plo, phi in pieces:
                    if ohi < plo or olo > phi:
                        nxt.append((plo, phi))
                        continue
                    if plo < olo:
                        nxt.append((plo, olo - 1))
                    if ohi < phi:
                        nxt.append((ohi + 1, phi))
                pieces = nxt
            out += pieces
        return _Ranges.of(out)

    def complement(self) -> _Ranges:
        return _Ranges(((0, _MAX_CODE),)).minus(self.spans)


#: ASCII punctuation written as it is outside a class (no regex or grammar meaning there)
_PLAIN: Final = frozenset(" !#%&',-/:;<=>@_`~")


def _escape(code: int, *, in_class: bool = False) -> str:
    """One code point as the converters read it everywhere: letters, digits and non-ASCII
    characters as they are, other ASCII as ``\\xHH`` (RE2, :mod:`re`, xgrammar and llama.cpp
    all read that; ``\\u`` is not RE2 syntax), a few harmless marks as they are outside a
    class."""
    ch = chr(code)
    if not ch.isascii() or ch.isalnum() or (not in_class and ch in _PLAIN):
        return ch
    return f"\\x{code:02x}"


def _class(ranges: _Ranges) -> str:
    """A positive character class for ``ranges`` (already JSON-safe)."""
    if not ranges.spans:
        raise Untranslatable("a character class that only matches characters a JSON string "
                             "cannot hold unescaped")
    if len(ranges.spans) == 1 and ranges.spans[0][0] == ranges.spans[0][1]:
        return _escape(ranges.spans[0][0])
    if ranges.spans[-1][1] == _MAX_CODE:  # a complement: shorter written as one
        return _negated_class(ranges.complement())
    return "[" + _spans(ranges.spans) + "]"


def _spans(spans: Any) -> str:
    return "".join(_escape(lo, in_class=True) if lo == hi
                   else f"{_escape(lo, in_class=True)}-{_escape(hi, in_class=True)}"
                   for lo, hi in spans)


def _negated_class(excluded: _Ranges) -> str:
    """``[^...]`` over ``excluded`` plus what a JSON string cannot hold raw: short, and the
    converter copies it as it is."""
    return "[^" + _spans(_Ranges.of([*excluded.spans, *_UNSAFE]).spans) + "]"


def _set_ranges(items: list[tuple[Any, Any]]) -> tuple[_Ranges, bool]:
    """The code points of a parsed ``[...]`` and whether it was negated."""
    negate = False
    spans: list[tuple[int, int]] = []
    for op, av in items:
        if op is _c.NEGATE:
            negate = True
        elif op is _c.LITERAL:
            spans.append((av, av))
        elif op is _c.RANGE:
            spans.append((av[0], av[1]))
        elif op is _c.CATEGORY:
            spans += _category(av).spans
        else:
            raise Untranslatable(f"unsupported item in a character class ({op})")
    return _Ranges.of(spans), negate


def _category(category: Any) -> _Ranges:
    if category in _CATEGORY_RANGES:
        return _Ranges.of(_CATEGORY_RANGES[category])
    if category is _c.CATEGORY_NOT_SPACE:
        return _Ranges.of(_NOT_SPACE_EXCLUDES).complement()
    if category in _NEGATED_CATEGORY:
        return _Ranges.of(_CATEGORY_RANGES[_NEGATED_CATEGORY[category]]).complement()
    raise Untranslatable(f"unsupported character category {category}")


def _chars(ranges: _Ranges, negate: bool) -> str:
    if negate:
        return _negated_class(ranges)
    safe = ranges.minus(_UNSAFE)
    if safe.spans != ranges.spans and not safe.spans:
        raise Untranslatable("a character class that only matches characters a JSON string "
                             "cannot hold unescaped")
    return _class(safe)


class _Writer:
    def __init__(self, flags: int) -> None:
        if flags & (re.IGNORECASE | re.VERBOSE):
            raise Untranslatable("inline flags (case-insensitive or verbose) are not supported")
        self.dotall = bool(flags & re.DOTALL)

    def seq(self, items: Any, *, top: bool = False) -> str:
        out: list[str] = []
        n = len(items)
        for i, (op, av) in enumerate(items):
            if op is _c.AT:
                edge = (i == 0 and av in (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING)) or (
                    i == n - 1 and av in (_c.AT_END, _c.AT_END_STRING))
                if top and edge:
                    continue  # handled by the caller
                raise Untranslatable("an anchor or word boundary inside the pattern")
            out.append(self.item(op, av))
        return "".join(out)

    def item(self, op: Any, av: Any) -> str:
        if op is _c.LITERAL:
            if (av, av) in ((lo, hi) for lo, hi in _UNSAFE) or av < 0x20:
                raise Untranslatable(f"a literal {chr(av)!r}, which a JSON string cannot hold "
                                     "unescaped")
            return _escape(av)
        if op is _c.NOT_LITERAL:
            return _negated_class(_Ranges.of([(av, av)]))
        if op is _c.ANY:
            return JSON_SAFE_CHAR  # DOTALL or not: a raw newline cannot be in a JSON string
        if op is _c.IN:
            ranges, negate = _set_ranges(av)
            return _chars(ranges, negate)
        if op is _c.CATEGORY:
            return _chars(_category(av), False)
        if op is _c.BRANCH:
            return "(?:" + "|".join(self.seq(alt) for alt in av[1]) + ")"
        if op is _c.SUBPATTERN:
            _group, add, remove, sub = av
            if (add | remove) & (re.IGNORECASE | re.VERBOSE | re.MULTILINE):
                raise Untranslatable("inline flags inside a group are not supported")
            if len(sub) == 1 and sub[0][0] is _c.BRANCH:
                return self.item(*sub[0])  # already one group
            return "(?:" + self.seq(sub) + ")"
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            lo, hi, sub = av
            body = self.seq(sub)
            single = len(sub) == 1 and sub[0][0] in (_c.IN, _c.ANY, _c.CATEGORY,
                                                    _c.NOT_LITERAL) and body.startswith("[")
            if not (single or (body.startswith("(?:") and body.endswith(")")
                               and _balanced_group(body))):
                body = "(?:" + body + ")"
            return body + _quantifier(lo, hi)
        raise Untranslatable(f"unsupported regex construct ({str(op).lower()})")


def _balanced_group(text: str) -> bool:
    """Whether ``text`` (starting with ``(?:``) is one group, not ``(?:a)(?:b)``."""
    depth = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "[":
            i = text.index("]", i + 2 if text[i + 1:i + 2] == "^" else i + 1)
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0 and i != len(text) - 1:
                return False
        i += 1
    return True


def _quantifier(lo: int, hi: int) -> str:
    unbounded = hi is _c.MAXREPEAT or hi == _c.MAXREPEAT
    if lo == 0 and unbounded:
        return "*"
    if lo == 1 and unbounded:
        return "+"
    if lo == 0 and hi == 1:
        return "?"
    if unbounded:
        return f"{{{lo},}}"
    if lo == hi:
        return f"{{{lo}}}"
    return f"{{{lo},{hi}}}"


def _anchored(items: Any) -> tuple[bool, bool]:
    start = bool(items) and items[0][0] is _c.AT and items[0][1] in (
        _c.AT_BEGINNING, _c.AT_BEGINNING_STRING)
    end = bool(items) and items[-1][0] is _c.AT and items[-1][1] in (
        _c.AT_END, _c.AT_END_STRING)
    return start, end


def _alternative(writer: _Writer, items: Any) -> str:
    start, end = _anchored(items)
    body = writer.seq(items, top=True)
    return ("" if start else JSON_SAFE_CHAR + "*") + body + ("" if end else JSON_SAFE_CHAR + "*")


@functools.lru_cache(maxsize=1024)
def to_grammar_regex(pattern: str) -> str:
    """``pattern`` in the converters' subset, anchored, meaning the same inside a JSON string
    (see the module's docstring); raises :class:`Untranslatable` naming what has no
    equivalent. ``^a|b$`` style alternatives are anchored one by one. Cached: the same few
    patterns come back with every retry of the same tools."""
    try:
        parsed = _p.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise Untranslatable(f"the pattern does not parse as a regex ({exc})") from None
    flags = parsed.state.flags
    writer = _Writer(flags)
    items = list(parsed)
    try:
        if len(items) == 1 and items[0][0] is _c.BRANCH:
            alternatives = [_alternative(writer, list(alt)) for alt in items[0][1][1]]
            body = "(?:" + "|".join(alternatives) + ")"
        else:
            body = _alternative(writer, items)
    except RecursionError:
        raise Untranslatable("the pattern is nested too deeply") from None
    if len(body) > _MAX_OUTPUT:
        raise Untranslatable("the pattern expands to more than a grammar should carry")
    return "^" + body + "$"
