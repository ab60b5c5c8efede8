"""Marker parsers do linear work: a 20,000- and a 200,000-character argument stream, fed one
character per delta, should differ in time by about 10x (the issue's bound is ~12x).

A parser that re-scans what it has already seen would show ~100x here. Times are CPU time of
this process (``process_time``), so a busy shared machine does not add its waiting to them.
Run:
``python bench/parsers_linear.py [format ...] [--sizes 20000,200000]``; prints one row per
format.

It also measures what reasoning costs (``--reasoning`` for that table alone): a thinking reply
(``<think>`` reasoning ``</think>`` answer) against a plain reply of the same text, side by side,
in CPU time per character, at three levels: the format parser alone (one character per feed),
the mender (one chunk dict per token-sized delta), and the whole stream pipeline (SSE bytes in,
SSE bytes out, as the proxy runs it). The goal: a thinking reply within 1.3x of a plain one.
"""

from __future__ import annotations

import os
import sys
import time

from _common import replace_section

from toolmend.parsers.formats import FORMATS, make_parser
from toolmend.parsers.mender import ChatMender
from toolmend.parsers.stream import StreamPipeline
from toolmend.sim.scenario import split_tokens


def _value(n: int) -> str:
    """About n characters of argument text with strings, escapes and nesting: valid JSON
    (whole units), so the finish measures the parsers, not a repair of a value cut short."""
    unit = '{"path": "src/a\\"b\\".py", "lines": [1, 2, 3], "text": "x < y </tool_call>"}, '
    return "[" + (unit * max(1, (n - 2) // len(unit))).rstrip(", ") + "]"


def stream(fmt: str, n: int) -> str:
    """A reply carrying one call whose arguments are about n characters long: the sample call
    the format declares (``ToolFormat.sample``), grown."""
    if fmt not in FORMATS or not FORMATS[fmt].sample:
        raise SystemExit(f"no sample call declared for format {fmt!r}")
    value = _value(n)
    return FORMATS[fmt].sample_call(args='{"items": ' + value + "}", value=value, text="x" * n)


WRITE_TOOL = [{"type": "function", "function": {"name": "write", "parameters": {
    "type": "object", "properties": {"text": {"type": "string"}, "items": {"type": "array"}}}}}]


def feed_time(fmt: str, text: str) -> float:
    parser = make_parser(fmt, WRITE_TOOL)
    start = time.process_time()
    for ch in text:
        parser.feed(ch)
    parser.finish()
    return time.process_time() - start


def mender_time(text: str) -> float:
    """The whole per-delta path: chunk dict in, mended chunks out (hermes, buffered mode)."""
    mender = ChatMender("hermes", WRITE_TOOL)
    start = time.process_time()
    for ch in text:
        mender.feed({"choices": [{"index": 0, "delta": {"content": ch}}]})
    mender.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return time.process_time() - start


#: every registered format, in the registry's order
ALL = list(FORMATS)


# --- reasoning ---------------------------------------------------------------------------------

_WORDS = ("The user asks about the weather in Bergen, so I should look at what the tools offer; "
          "it rains there often (about 240 days a year), and a forecast for 3 days will do. ")
_TOOL = '<tool_call>{"name": "write", "arguments": {"text": "x"}}</tool_call>'


def _body(n: int) -> str:
    return (_WORDS * (n // len(_WORDS) + 1))[:n]


def reasoning_replies(n: int) -> dict[str, tuple[str, str]]:
    """(plain, thinking) pairs of about n characters each: the same body, as the answer or as
    the reasoning before a short answer; and one whose reasoning drafts a call midway."""
    body = _body(n)
    half = n // 2
    return {
        "plain vs thinking": (body + "Done.", "<think>" + body + "</think>Done."),
        "plain vs thinking with a drafted call": (
            body[:half] + body[half:] + "Done.",
            "<think>" + body[:half] + _TOOL + body[half:] + "</think>Done."),
    }


def _cpu(fn: object, *args: object) -> float:
    start = time.process_time()
    fn(*args)  # type: ignore[operator]
    return time.process_time() - start


def _parse_all(text: str) -> None:
    parser = make_parser("hermes", WRITE_TOOL)
    for ch in text:
        parser.feed(ch)
    parser.finish()


def _mend_all(deltas: list[str]) -> None:
    mender = ChatMender("hermes", WRITE_TOOL)
    for d in deltas:
        mender.feed({"choices": [{"index": 0, "delta": {"content": d}}]})
    mender.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})


def _sse(deltas: list[str]) -> bytes:
    import orjson

    env = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events = [orjson.dumps({**env, "choices": [{"index": 0, "delta": {"content": d},
                                                "logprobs": None, "finish_reason": None}]})
              for d in deltas]
    events.append(orjson.dumps({**env, "choices": [{"index": 0, "delta": {},
                                                    "logprobs": None, "finish_reason": "stop"}]}))
    return b"".join(b"data: " + e + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def _pipe_all(events: list[bytes]) -> None:
    p = StreamPipeline(False, ChatMender("hermes", WRITE_TOOL))
    for e in events:
        p.feed(e)
    p.finish()


def _events(raw: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in raw.split(b"\n\n") if e]


def reasoning_table(n: int = 50_000, rounds: int = 7) -> list[tuple[str, str, float, float]]:
    """(level, reply pair, plain µs/char, thinking µs/char): best of ``rounds``, the two runs
    alternating so that both see the same load."""
    rows = []
    for pair, (plain, thinking) in reasoning_replies(n).items():
        levels = {
            "parser": (_parse_all, plain, thinking),
            "mender": (_mend_all, split_tokens(plain), split_tokens(thinking)),
            "pipeline": (_pipe_all, _events(_sse(split_tokens(plain))),
                         _events(_sse(split_tokens(thinking)))),
        }
        for level, (fn, a, b) in levels.items():
            best_a = best_b = float("inf")
            for _ in range(rounds):
                best_a = min(best_a, _cpu(fn, a))
                best_b = min(best_b, _cpu(fn, b))
            rows.append((level, pair, best_a / len(plain) * 1e6, best_b / len(thinking) * 1e6))
    return rows


def reasoning_main(write: bool) -> None:
    rows = reasoning_table()
    print(f"{'level':<9} {'replies':<40} {'plain µs/char':>14} {'thinking µs/char':>17} "
          f"{'ratio':>6}")
    lines = []
    for level, pair, a, b in rows:
        print(f"{level:<9} {pair:<40} {a:>14.3f} {b:>17.3f} {b / a:>6.2f}")
        lines.append(f"| {level} | {pair} | {a:.3f} | {b:.3f} | {b / a:.2f} |")
    if write:
        body = ("Measured by `python bench/parsers_linear.py --reasoning --write`: a reply of "
                "about 50,000 characters, plain (the text as the answer) and thinking (the same "
                "text inside `<think>`…`</think>`, then a short answer; the second pair drafts "
                "a call halfway through the reasoning), run side by side, best of 7 in CPU "
                "time. Parser: the Hermes parser fed one character at a time. Mender: one chunk "
                "dict per token-sized delta. Pipeline: the SSE bytes of those deltas through "
                "the stream pipeline, as the proxy runs it (plain text and reasoning at rest "
                "take the raw-bytes path). The goal: thinking within 1.3x of plain.\n\n"
                f"Load average at the start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} "
                f"cores, Python {sys.version.split()[0]}.\n\n"
                "| level | replies | plain µs/char | thinking µs/char | ratio |\n"
                "|---|---|---:|---:|---:|\n" + "\n".join(lines) + "\n")
        replace_section("## Reasoning parsing cost\n\n" + body)


def main(argv: list[str]) -> None:
    write = "--write" in argv
    if "--reasoning" in argv:
        reasoning_main(write)
        return
    sizes = next((a.split("=", 1)[1] for a in argv if a.startswith("--sizes=")), "20000,200000")
    n_small, n_large = (int(x) for x in sizes.split(","))
    formats = [a for a in argv if not a.startswith("--")] or ALL
    rows = []
    print(f"{'format':<16} {f'{n_small // 1000}k chars (s)':>14} "
          f"{f'{n_large // 1000}k chars (s)':>15} {'ratio':>7} {'µs/char':>8}")
    for name in [*formats, "mender (hermes)"]:
        if name.startswith("mender"):
            small = min(mender_time(stream("hermes", n_small)) for _ in range(3))
            large = min(mender_time(stream("hermes", n_large)) for _ in range(3))
        else:
            small = min(feed_time(name, stream(name, n_small)) for _ in range(3))
            large = min(feed_time(name, stream(name, n_large)) for _ in range(3))
        per = large / len(stream("hermes" if name.startswith("mender") else name, n_large)) * 1e6
        print(f"{name:<16} {small:>14.4f} {large:>15.4f} {large / small:>7.1f} {per:>8.2f}")
        rows.append(f"| {name} | {small * 1000:.1f} | {large * 1000:.1f} | {large / small:.1f} "
                    f"| {per:.2f} |")
    if write:
        body = ("Measured by `python bench/parsers_linear.py --write`: one tool call whose "
                f"arguments are about {n_small:,} and {n_large:,} characters, fed one character "
                "per delta; best of 3, in CPU time. A parser that re-scanned what it had seen "
                "would show a "
                "ratio near 100; the goal is about 10 (at most ~12). The last row is the whole "
                "per-delta mender path (chunk dict in, chunks out).\n\n"
                f"Load average at the start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores, "
                f"Python {sys.version.split()[0]}.\n\n"
                f"| format | {n_small // 1000}k chars (ms) | {n_large // 1000}k chars (ms) | "
                "ratio | µs per char |\n"
                "|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n")
        replace_section("## Tool-call parsing cost\n\n" + body)
    reasoning_main(write)


if __name__ == "__main__":
    main(sys.argv[1:])
