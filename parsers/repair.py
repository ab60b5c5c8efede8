"""Repairing tool-call argument text that is not valid JSON, where that is safe.

Two well-kept libraries do the parsing work:

- ``jiter`` in partial mode closes a value cut off by ``max_tokens`` exactly as far as it got
  (strings, arrays, objects closed; nothing invented beyond what was written);
- ``json_repair`` handles the rest of what models get wrong: single quotes, Python literals,
  trailing commas, unquoted keys, unescaped control characters, extra closing braces.

Cheap, exact fixes (fences, a doubly-encoded string, text after the value) are done first by
hand, because they are lossless and common. Every repair is reported with its kind and the
before/after lengths, so the trace and the ``: toolmend repaired ...`` comment can say what
changed.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Final

import jiter
import json_repair
import orjson

_FENCE = re.compile(r"^\s*```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?\s*```\s*$", re.S)
_PY_LITERAL = re.compile(r"\b(True|False|None)\b")
_TRAILING_COMMA = re.compile(r",\s*[}\]]")
_MARKUP = re.compile(r"<[^<>\s]{1,40}>|\[/?[A-Z_]{3,20}\]|<\|[^|]{1,40}\|>")

#: Default bound on how deeply tool-call arguments may nest. Real arguments nest a few levels;
#: the parsers and validators below recurse (``json``, json_repair, jsonschema), and a hostile
#: 1,000-level value would otherwise end in ``RecursionError`` halfway through a stream.
MAX_ARGUMENT_DEPTH: Final = 64
#: Longest text handed to json_repair: it parses in Python, at 3-5 microseconds a character
#: on the event loop (a 278 KB call took 0.8-1.5 s), and the malformations it is for (quotes,
#: trailing commas, Python literals) come from small models writing small calls.
REPAIR_MAX_CHARS: Final = 8 * 1024
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.S)  # also one cut off at the end
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP: Final = {"{": 1, "[": 1, "}": -1, "]": -1}


@dataclass(slots=True, frozen=True)
class Repair:
    kind: str
    before: int  # length of the text before this repair
    after: int

    def note(self) -> str:
        return f"{self.kind} ({self.before}->{self.after} chars)"


@dataclass(slots=True)
class RepairResult:
    text: str  # the arguments as JSON text (unchanged when nothing was wrong)
    value: Any  # the parsed value, or None when unrepairable
    ok: bool  # text is a JSON object
    repairs: list[Repair]
    error: str | None = None


def too_deep(text: str, limit: int = MAX_ARGUMENT_DEPTH) -> bool:
    """Whether the brackets of JSON-ish ``text`` nest deeper than ``limit``, outside strings.

    Linear and iterative, at C speed (a regex and iterator builtins), because it runs on model
    output of any size before anything recursive parses it. Brackets count whether or not they
    balance, so a cut-off value or unbalanced junk is measured as deep as it could parse.
    """
    if text.count("{") + text.count("[") <= limit:
        return False  # not enough brackets to nest that deep: no scan
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return bool(brackets) and max(accumulate(map(_BRACKET_STEP.__getitem__, brackets))) > limit


def depth_message(limit: int) -> str:
    """The one wording of the depth refusal, wherever arguments are parsed."""
    return f"arguments nest deeper than the limit of {limit} levels (max_argument_depth)"


def _loads(text: str) -> tuple[bool, Any]:
    try:
        return True, orjson.loads(text)
    except orjson.JSONDecodeError:
        return False, None


_PARSED = threading.local()  # .last: (text, value) of the arguments repair_arguments parsed
_NOTHING: Any = object()


def recall_parsed(text: str) -> Any:
    """The value :func:`repair_arguments` parsed from this very ``text`` object in this thread,
    once (validation then need not parse a large call a second time), else ``_NOTHING``."""
    last = getattr(_PARSED, "last", None)
    _PARSED.last = None
    if last is not None and last[0] is text:
        return last[1]
    return _NOTHING


def forget_parsed() -> None:
    _PARSED.last = None


def repair_arguments(raw: str, truncated: bool = False, *,
                     max_depth: int | None = MAX_ARGUMENT_DEPTH) -> RepairResult:
    """Make ``raw`` a JSON object if it safely can be; report each step.

    ``truncated`` says the call was cut off (the stream ended inside it): then closing the
    value is the right repair even when json_repair would guess differently. Text nesting
    deeper than ``max_depth`` is refused before any parser (all of which recurse) sees it
    (``None``: the caller has checked). json_repair, a Python parser at several microseconds
    a character, is not run on text over :data:`REPAIR_MAX_CHARS`.
    """
    repairs: list[Repair] = []
    text = raw

    def step(kind: str, new: str) -> None:
        nonlocal text
        repairs.append(Repair(kind, len(text), len(new)))
        text = new

    if not text.strip():
        step("empty_arguments", "{}")
        return RepairResult("{}", {}, True, repairs)
    if max_depth is not None and too_deep(text, max_depth):
        return RepairResult(raw, None, False, repairs, error=depth_message(max_depth))
    ok, value = _loads(text)
    if ok and isinstance(value, dict):
        _PARSED.last = (text, value)
        return RepairResult(text, value, True, repairs)
    if ok and isinstance(value, str):
        inner_ok, inner = _loads(value)
        if inner_ok and isinstance(inner, dict):
            step("double_encoded", value)
            return RepairResult(text, inner, True, repairs)
    if not ok:
        m = _FENCE.match(text)
        if m:
            step("markdown_fence", m.group(1).strip())
            ok, value = _loads(text)
            if ok and isinstance(value, dict):
                return RepairResult(text, value, True, repairs)
    if not ok:
        value, end = _first_value(text)
        if value is not None and text[end:].strip():
            step("text_after_value", text[:end])
            if isinstance(value, dict):
                return RepairResult(text, value, True, repairs)
    if not ok and truncated:
        closed = _close_truncated(text)
        if closed is not None:
            new = _dumps(closed)
            step("truncated_closed", new)
            return RepairResult(text, closed, True, repairs)
    if not ok and len(text) > REPAIR_MAX_CHARS:
        return RepairResult(raw, None, False, repairs, error=(
            f"arguments are not valid JSON, and at {len(text)} characters too long to repair "
            f"(repairs stop at {REPAIR_MAX_CHARS})"))
    if not ok:
        kind = _guess_kind(text)
        try:
            fixed = json_repair.repair_json(text, skip_json_loads=True)
        except Exception:  # json_repair is best-effort; never let it take a request down
            fixed = ""
        f_ok, f_value = _loads(fixed) if isinstance(fixed, str) and fixed else (False, None)
        if f_ok and isinstance(f_value, dict) and (f_value or _looks_empty(text)):
            new = _dumps(f_value)
            step(kind, new)
            return RepairResult(text, f_value, True, repairs)
        return RepairResult(raw, None, False, repairs,
                            error="arguments are not valid JSON and could not be repaired safely")
    if ok and not isinstance(value, dict):
        return RepairResult(text, value, False, repairs,
                            error=f"arguments must be a JSON object, got {_type(value)}")
    return RepairResult(text, value, isinstance(value, dict), repairs)


def _dumps(value: Any) -> str:
    """Compact JSON text for a repaired value. jiter and ``json`` keep integers beyond 64 bits,
    which orjson cannot encode; the standard library can, exactly."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        import json

        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _first_value(text: str) -> tuple[Any, int]:
    """Parse the first JSON value at the start of ``text``; (None, 0) when there is none."""
    import json

    stripped = text.lstrip()
    offset = len(text) - len(stripped)
    try:
        value, end = json.JSONDecoder().raw_decode(stripped)
    except (ValueError, RecursionError):
        return None, 0
    return value, offset + end


def _close_truncated(text: str) -> dict[str, Any] | None:
    start = text.find("{")
    if start < 0:
        return None
    try:
        value = jiter.from_json(text[start:].encode(), partial_mode="trailing-strings")
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _guess_kind(text: str) -> str:
    if "'" in text and '"' not in text:
        return "single_quotes"
    if _PY_LITERAL.search(text):
        return "python_literals"
    if _TRAILING_COMMA.search(text):
        return "trailing_comma"
    if any(ord(c) < 0x20 and c not in "\n\r\t " for c in text) or "\n" in text:
        return "control_characters"
    if text.count("{") != text.count("}") or text.count("[") != text.count("]"):
        return "unbalanced_brackets"
    return "malformed_json"


def _looks_empty(text: str) -> bool:
    return text.strip() in ("{}", "{ }", "{\n}", "")


def _type(v: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(v), type(v).__name__)


def closing_suffix(text: str) -> str | None:
    """The characters that close a cut-off JSON object by appending only (for arguments that
    were already streamed and cannot be rewritten): an open string is closed, then open
    containers. None when appending cannot make it valid (cut after a ``:`` or ``,``)."""
    stack: list[str] = []
    in_string = escape = False
    for c in text:
        if in_string:
            if escape:
                escape = False
            elif c == "\\":
                escape = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            stack.append("}" if c == "{" else "]")
        elif c in "}]" and stack:
            stack.pop()
    suffix = ('"' if in_string else "") + "".join(reversed(stack))
    if escape:
        return None
    ok, value = _loads(text + suffix)
    return suffix if ok and isinstance(value, dict) else None


def clean_name(name: str) -> tuple[str, bool]:
    """Strip marker debris (``<tool_call>``, ``[TOOL_CALLS]``, ``<|...|>``) and quotes from a
    function name; returns (name, changed)."""
    cleaned = _MARKUP.sub("", name).strip().strip('"').strip()
    return cleaned, cleaned != name
