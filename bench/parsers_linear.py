"""Marker parsers do linear work: a 10,000- and a 100,000-character argument stream, fed one
character per delta, should differ in time by about 10x (the issue's bound is ~12x).

A parser that re-scans what it has already seen would show ~100x here. Run:
``python bench/parsers_linear.py [format ...]``; prints one row per format.
"""

from __future__ import annotations

import sys
import time

from toolmend.parsers.formats import make_parser

_DS_CALL = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>"


def _value(n: int) -> str:
    """About n characters of argument text with strings, escapes and nesting."""
    unit = '{"path": "src/a\\"b\\".py", "lines": [1, 2, 3], "text": "x < y </tool_call>"}, '
    return "[" + (unit * (n // len(unit) + 1))[: n - 2].rstrip(", ") + "]"


def stream(fmt: str, n: int) -> str:
    """A reply carrying one call whose arguments are about n characters long."""
    args = '{"items": ' + _value(n) + "}"
    if fmt == "hermes":
        return '<tool_call>\n{"name": "write", "arguments": ' + args + "}\n</tool_call>"
    if fmt == "llama3_json":
        return '{"name": "write", "parameters": ' + args + "}"
    if fmt == "mistral":
        return "[TOOL_CALLS]write[ARGS]" + args
    if fmt == "deepseek_v3":
        return (_DS_CALL + "function<｜tool▁sep｜>write\n```json\n" + args
                + "\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
    if fmt == "deepseek_v31":
        return _DS_CALL + "write<｜tool▁sep｜>" + args + "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    if fmt == "qwen3_coder":
        return ("<tool_call>\n<function=write>\n<parameter=text>\n" + "x" * n
                + "\n</parameter>\n</function>\n</tool_call>")
    if fmt == "pythonic":
        return "[write(items=" + _value(n) + ")]"
    raise SystemExit(f"no stream for format {fmt!r}")


def feed_time(fmt: str, text: str) -> float:
    parser = make_parser(fmt)
    start = time.perf_counter()
    for ch in text:
        parser.feed(ch)
    parser.finish()
    return time.perf_counter() - start


def main(argv: list[str]) -> None:
    formats = argv or ["hermes", "qwen3_coder", "llama3_json", "pythonic", "mistral",
                       "deepseek_v3", "deepseek_v31"]
    print(f"{'format':<14} {'10k chars (s)':>14} {'100k chars (s)':>15} {'ratio':>7}")
    for fmt in formats:
        small = min(feed_time(fmt, stream(fmt, 10_000)) for _ in range(3))
        large = min(feed_time(fmt, stream(fmt, 100_000)) for _ in range(3))
        print(f"{fmt:<14} {small:>14.4f} {large:>15.4f} {large / small:>7.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
