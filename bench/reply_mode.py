"""Reply events for the fronts: the stream pipeline's two ways of handing a front its reply.

    python bench/reply_mode.py           # print the table
    python bench/reply_mode.py --write   # and replace "## Reply events for the fronts"

In-process and side by side, in CPU time (no sockets, so the machine's other work moves both
sides alike): one streamed reply of ``--tokens`` content tokens and a Hermes tool call, with a
tool offered (the mender runs), goes to a non-chat front's encoder input, reply events, in two
ways:

* ``via SSE``: the pipeline writes SSE bytes and the front decodes them again with its own
  ``ChatReplyDecoder`` (how the Ollama, Anthropic and Responses fronts read the mended reply
  before reply mode);
* ``reply mode``: the pipeline hands the decoder's events straight out (``reply=``), the
  mender's chunk objects never encoded.

and, for a reply from Ollama's native API (NDJSON):

* ``NDJSON → SSE``: the wire decoder writes SSE (``NDJSONToSSE``) that the pipeline decodes;
* ``NDJSON → objects``: the wire decoder's chunk objects go in as they are (``feed_chunks``).

Both sides of each pair must give the same events; the table gives µs per reply and per token,
medians over ``--rounds`` alternating rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import orjson
from _common import replace_section

from toolmend.parsers.mender import ChatMender
from toolmend.parsers.ollama import NDJSONChunks, NDJSONToSSE
from toolmend.parsers.reply import ChatReplyDecoder
from toolmend.parsers.stream import StreamPipeline

SECTION = "## Reply events for the fronts"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'


def sse_reply(tokens: int) -> list[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "qwen3", "choices": [{"index": 0, "delta": delta,
                                           "finish_reason": finish}]}) + b"\n\n"
    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": f" word{i}"}) for i in range(tokens)]
    out += [chunk({"content": CALL[i:i + 8]}) for i in range(0, len(CALL), 8)]
    out += [chunk({}, "stop"), b'data: {"id":"chatcmpl-1","choices":[],"usage":'
            b'{"prompt_tokens":9,"completion_tokens":30}}\n\n', b"data: [DONE]\n\n"]
    return out


def ndjson_reply(tokens: int) -> list[bytes]:
    def line(msg: dict[str, Any], **more: Any) -> bytes:
        return orjson.dumps({"model": "qwen3", "created_at": "2026-12-07T00:00:00Z",
                             "message": {"role": "assistant", **msg}, "done": False,
                             **more}) + b"\n"
    out = [line({"content": f" word{i}"}) for i in range(tokens)]
    out += [line({"content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]})]
    out += [line({"content": ""}, done=True, done_reason="stop", prompt_eval_count=9,
                 eval_count=30)]
    return out


def via_sse(chunks: list[bytes]) -> list[Any]:
    p = StreamPipeline(True, ChatMender(None, TOOLS, model_hint="qwen3"))
    dec = ChatReplyDecoder()
    out: list[Any] = []
    for c in chunks:
        out += dec.feed(p.feed(c))  # type: ignore[arg-type]
    out += dec.feed(p.finish())  # type: ignore[arg-type]
    return out + dec.finish()


def reply_mode(chunks: list[bytes]) -> list[Any]:
    dec = ChatReplyDecoder()
    p = StreamPipeline(True, ChatMender(None, TOOLS, model_hint="qwen3"), reply=dec)
    out: list[Any] = []
    for c in chunks:
        out += p.feed(c)  # type: ignore[arg-type]
    out += p.finish()  # type: ignore[arg-type]
    return out + dec.finish()


def _ndjson(lines: list[bytes], as_sse: bool) -> list[Any]:
    wire = (NDJSONToSSE if as_sse else NDJSONChunks)("chatcmpl-1", 1, id_prefix="call_k")
    dec = ChatReplyDecoder()
    p = StreamPipeline(True, ChatMender(None, TOOLS, model_hint="qwen3"), reply=dec)
    out: list[Any] = []
    for ln in lines:
        got = wire.feed(ln)
        if got:
            out += p.feed(got) if as_sse else p.feed_chunks(got)  # type: ignore[arg-type]
    out += p.finish()  # type: ignore[arg-type]
    return out + dec.finish()


def ndjson_via_sse(lines: list[bytes]) -> list[Any]:
    return _ndjson(lines, as_sse=True)


def ndjson_objects(lines: list[bytes]) -> list[Any]:
    return _ndjson(lines, as_sse=False)


def _same(a: list[Any], b: list[Any]) -> bool:
    """Equal but for generated call ids."""
    def norm(evs: list[Any]) -> list[Any]:
        return [(type(e).__name__, {k: v for k, v in (e.__dict__ if hasattr(e, "__dict__")
                                                       else {s: getattr(e, s) for s in
                                                             e.__slots__}).items()
                                    if k != "id"}) for e in evs]
    return norm(a) == norm(b)


def cpu_us(fn: Any, arg: list[bytes], reps: int) -> float:
    t = time.process_time()
    for _ in range(reps):
        fn(arg)
    return (time.process_time() - t) / reps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    pairs = [("chat SSE from the backend", sse_reply(a.tokens), via_sse, reply_mode,
              "via SSE", "reply mode"),
             ("Ollama NDJSON from the backend", ndjson_reply(a.tokens), ndjson_via_sse,
              ndjson_objects, "NDJSON → SSE", "NDJSON → objects")]
    rows = []
    for label, reply, before, after, bname, aname in pairs:
        if not _same(before(reply), after(reply)):
            raise SystemExit(f"{label}: the two ways gave different events")
        b_runs, a_runs = [], []
        for i in range(a.rounds):
            order = [(before, b_runs), (after, a_runs)]
            for fn, runs in (order if i % 2 == 0 else order[::-1]):
                runs.append(cpu_us(fn, reply, a.reps))
        b, af = statistics.median(b_runs), statistics.median(a_runs)
        n = len(reply)
        rows.append(f"| {label} | {bname} | {b:,.0f} | {b / n:.1f} | 1 |")
        rows.append(f"| | {aname} | {af:,.0f} | {af / n:.1f} | {af / b:.2f}× |")
    text = "\n".join([
        SECTION, "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python "
        f"bench/reply_mode.py` (see its docstring): one streamed reply of {a.tokens} content "
        "tokens and a Hermes call, a tool offered, to a non-chat front's reply events; CPU "
        f"time in-process, medians of {a.rounds} alternating rounds of {a.reps} replies. Both "
        "ways of each pair give the same events (checked before timing).", "",
        "| backend wire | how the front gets events | µs per reply | µs per upstream piece "
        "| vs the first |",
        "|---|---|---|---|---|", *rows, ""])
    print(text)
    if a.write:
        replace_section(text)


if __name__ == "__main__":
    main()
