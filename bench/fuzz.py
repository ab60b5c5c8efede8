"""The long fuzz run: the property targets of tests/test_fuzz.py with many more examples.

    python bench/fuzz.py                        # 5,000 examples per target (~100k in total)
    python bench/fuzz.py --examples 500         # a quicker look
    python bench/fuzz.py --atheris-runs 200000  # also coverage-guided, when atheris is installed

Every target must finish with zero unhandled exceptions and with split invariance held; the
script prints the inputs run per target and exits non-zero on the first failure (hypothesis
prints the shrunk failing input). The atheris mode drives the same parsers from raw bytes
under libFuzzer's coverage guidance; atheris is optional (``pip install atheris``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run_hypothesis(examples: int) -> tuple[int, bool]:
    os.environ["TOOLMEND_FUZZ_EXAMPLES"] = str(examples)
    sys.path.insert(0, str(ROOT))
    from tests import test_fuzz as tf

    targets: list[tuple[str, Any]] = [
        ("sse decoder", tf.test_sse_decoder),
        *((f"marker parser {fmt}", tf._format_target(fmt)) for fmt in sorted(tf.FORMATS)),
        ("mender, structured deltas", tf.test_mender_structured_deltas),
        ("mender, hostile chunks", tf.test_mender_hostile_chunks),
        ("repair_arguments", tf.test_repair_arguments),
        ("repair, truncated objects", tf.test_repair_of_truncated_object),
    ]
    ok = True
    print(f"{'target':<34} {'inputs':>8} {'seconds':>8}  result")
    for name, fn in targets:
        before = sum(tf.COUNTS.values())
        t0 = time.perf_counter()
        try:
            fn()
            result = "ok"
        except Exception as e:  # report every target, then fail
            result = f"FAILED: {e.__class__.__name__}: {str(e)[:300]}"
            ok = False
        n = sum(tf.COUNTS.values()) - before
        print(f"{name:<34} {n:>8} {time.perf_counter() - t0:>8.1f}  {result}", flush=True)
    total = sum(tf.COUNTS.values())
    print(f"{'total':<34} {total:>8}")
    return total, ok


# --- atheris: coverage-guided, from raw bytes -----------------------------------------------

def _atheris_child() -> None:
    import atheris

    with atheris.instrument_imports():
        import orjson

        from toolmend.parsers.formats import FORMATS, make_parser
        from toolmend.parsers.mender import ChatMender, StreamError
        from toolmend.parsers.repair import repair_arguments
        from toolmend.parsers.sse import SSEDecoder, SSEProtocolError

    formats = sorted(FORMATS)

    def decode(pieces: list[bytes]) -> Any:
        d = SSEDecoder(max_line_bytes=4096)
        out: list[Any] = []
        try:
            for p in pieces:
                out += d.feed(p)
            out += d.finish()
        except SSEProtocolError:
            return "too long"
        return [repr(e) for e in out]

    def parse(fmt: str, pieces: list[str]) -> Any:
        p = make_parser(fmt, None)
        evs = []
        for piece in pieces:
            evs += p.feed(piece)
        evs += p.finish()
        return _fold(evs)

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        which = fdp.ConsumeIntInRange(0, 3)
        cut = fdp.ConsumeIntInRange(0, 64)
        if which == 0:
            raw = fdp.ConsumeBytes(fdp.remaining_bytes())
            assert decode([raw[:cut], raw[cut:]]) == decode([raw])
        elif which == 1:
            fmt = formats[fdp.ConsumeIntInRange(0, len(formats) - 1)]
            text = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
            assert parse(fmt, [text[:cut], text[cut:]]) == parse(fmt, [text])
        elif which == 2:
            r = repair_arguments(fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes()),
                                 truncated=bool(cut & 1))
            assert not r.ok or isinstance(r.value, dict)
        else:
            try:
                chunk = orjson.loads(fdp.ConsumeBytes(fdp.remaining_bytes()))
            except orjson.JSONDecodeError:
                return
            if isinstance(chunk, dict):
                m = ChatMender(None, [{"type": "function", "function": {"name": "run"}}])
                try:
                    m.feed(chunk)
                    m.finish()
                except StreamError:
                    pass

    atheris.Setup([sys.argv[0], *sys.argv[2:]], one_input)
    atheris.Fuzz()


def _fold(events: list[Any]) -> Any:
    from toolmend.parsers.events import Text, ToolCallArgs, ToolCallStart

    text = "".join(e.text for e in events if isinstance(e, Text))
    calls = [(e.index, e.name) for e in events if isinstance(e, ToolCallStart)]
    args: dict[int, str] = {}
    for e in events:
        if isinstance(e, ToolCallArgs):
            args[e.index] = args.get(e.index, "") + e.fragment
    return text, calls, args


def run_atheris(runs: int) -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: skipped (pip install atheris)")
        return True
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--atheris-child", f"-runs={runs}",
                           "-max_len=2048", "-print_final_stats=1"],
                          capture_output=True, text=True, cwd=ROOT)
    tail = [ln for ln in proc.stderr.splitlines() if ln.startswith(("stat::", "==", "Done"))]
    print(f"atheris: {runs} runs in {time.perf_counter() - t0:.0f} s, exit {proc.returncode}")
    for ln in tail[-6:]:
        print("  " + ln)
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
    return proc.returncode == 0


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--atheris-child":
        _atheris_child()
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=5000, help="hypothesis examples per target")
    ap.add_argument("--atheris-runs", type=int, default=0, help="also run atheris this long")
    args = ap.parse_args()
    _total, ok = run_hypothesis(args.examples)
    if args.atheris_runs:
        ok = run_atheris(args.atheris_runs) and ok
    print("result:", "no failures" if ok else "FAILURES (see above)")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
