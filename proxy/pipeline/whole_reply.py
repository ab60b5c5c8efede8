"""A non-streaming chat reply fetched from the upstream as a stream.

When toolmend bypasses vLLM's tool parser (``server_tool_parser``, see ``mending.py``) it must
see the reply's raw text, and vLLM's non-streaming path loses part of it: its reasoning parser
reads the whole reply in one pass, and once it has ended the reasoning at a call drafted inside
``<think>`` it drops the ``</think>`` the model writes later, so where the reasoning really ended
is gone. Streamed, the text after that point arrives as it was written. So such a request is
sent upstream as a stream, and :func:`fold_stream` folds the stream's deltas, unmended, into the
``chat.completion`` object the server would have answered; the reply is then mended, validated
and retried like any non-streaming reply (``ChatMending.json_transform``).
"""

from __future__ import annotations

from typing import Any

import orjson

from toolmend.parsers.sse import SSEDecoder, SSEEvent
from toolmend.server.errors import ProxyError, normalize_upstream_error

_ENVELOPE = ("created", "model", "system_fingerprint")
_TEXT_FIELDS = ("content", "reasoning", "reasoning_content")


def fold_stream(raw: bytes) -> tuple[dict[str, Any], int]:
    """The ``chat.completion`` object that a whole ``chat.completion.chunk`` stream makes: the
    text of every field concatenated as it came, calls assembled by index, the last finish
    reason, the usage; and how many events had invalid UTF-8 replaced (as a whole reply's is).
    Raises the upstream's error when the stream carries one.

    A server that ignores ``stream: true`` and answers one JSON object has sent the whole reply
    already: it is taken as it is."""
    if raw.lstrip()[:1] == b"{":
        try:
            whole = orjson.loads(raw)
        except orjson.JSONDecodeError:
            whole = _loads_replacing(raw)
            if isinstance(whole, dict) and "error" not in whole:
                return whole, 1
        if isinstance(whole, dict):
            if "error" in whole:
                raise normalize_upstream_error(502, raw)
            return whole, 0
    dec = SSEDecoder()
    envelope: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    usage: Any = None
    replaced = 0
    for ev in dec.feed(raw) + dec.finish():
        if not isinstance(ev, SSEEvent) or not ev.data or ev.data == b"[DONE]":
            continue
        try:
            chunk = orjson.loads(ev.data)
        except orjson.JSONDecodeError:
            chunk = _loads_replacing(ev.data)
            replaced += 1
        if not isinstance(chunk, dict):
            continue
        if "error" in chunk:
            raise normalize_upstream_error(502, ev.data)
        for key in ("id", *_ENVELOPE):
            if key not in envelope and chunk.get(key) is not None:
                envelope[key] = chunk[key]
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        for ch in chunk.get("choices") or ():
            if isinstance(ch, dict):
                _fold_choice(choices, ch)
    out: dict[str, Any] = {"id": envelope.pop("id", None), "object": "chat.completion",
                           **envelope}
    out["choices"] = [_choice(i, choices[i]) for i in sorted(choices)]
    if usage is not None:
        out["usage"] = usage
    return out, replaced


def _loads_replacing(data: bytes) -> Any:
    """An event that is not JSON as it came: JSON once invalid UTF-8 is replaced, or refused."""
    try:
        data.decode()
    except UnicodeDecodeError:
        try:
            return orjson.loads(data.decode("utf-8", "replace"))
        except orjson.JSONDecodeError:
            pass
    raise ProxyError(502, "upstream sent a stream event that is not JSON",
                     code="upstream_bad_response")


def _fold_choice(choices: dict[int, dict[str, Any]], ch: dict[str, Any]) -> None:
    index = ch.get("index") if isinstance(ch.get("index"), int) else 0
    acc = choices.setdefault(index, {"parts": {}, "calls": {}, "finish": None})
    delta = ch.get("delta") if isinstance(ch.get("delta"), dict) else {}
    for key in _TEXT_FIELDS:
        text = delta.get(key)
        if isinstance(text, str) and text:
            acc["parts"].setdefault(key, []).append(text)
    for tc in delta.get("tool_calls") or ():
        if not isinstance(tc, dict):
            continue
        i = tc.get("index") if isinstance(tc.get("index"), int) else len(acc["calls"])
        slot = acc["calls"].setdefault(i, {"id": None, "type": "function",
                                           "function": {"name": "", "arguments": ""}})
        if tc.get("id") and not slot["id"]:
            slot["id"] = tc["id"]
        fn = tc.get("function") if isinstance(tc.get("function"), dict) else {}
        if isinstance(fn.get("name"), str):
            slot["function"]["name"] += fn["name"]
        if isinstance(fn.get("arguments"), str):
            slot["function"]["arguments"] += fn["arguments"]
    if ch.get("finish_reason"):
        acc["finish"] = ch["finish_reason"]


def _choice(index: int, acc: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": None}
    for key, parts in acc["parts"].items():
        message[key] = "".join(parts)
    if acc["calls"]:
        message["tool_calls"] = [acc["calls"][i] for i in sorted(acc["calls"])]
    return {"index": index, "message": message, "logprobs": None,
            "finish_reason": acc["finish"]}
