"""Hermes / Qwen2.5 / Qwen3: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

Granite 4 writes the same calls (vLLM reads them with its ``granite4`` parser): its model names
select this format, ahead of Granite 3's ``<|tool_call|>`` list.

Qwen3 also thinks in ``<think>...</think>``; that text is reasoning, and a call written inside
it is a draft, which fires only as the model's final act (the reasoning rule in ``_stream.py``,
the README's decision table). ``"parameters"`` is
accepted for ``"arguments"`` (some fine-tunes use it). Between the JSON's closing brace and
``</tool_call>`` only whitespace is expected; a call whose closing tag never comes still ends
when its JSON does.

Arcee's Trinity models write these calls too (SGLang's ``trinity`` detector is its Qwen2.5 one).
SGLang strips Trinity's ``<think>`` tags and reads every call inside reasoning as a call; here
the reasoning rule decides, so a call Trinity drafted and then thought better of never runs.
"""

from __future__ import annotations

from ..events import Event
from ._declaration import ToolFormat
from ._stream import (
    MORE,
    STOP,
    THINK_END,
    THINK_START,
    WS_LIMIT,
    CallReader,
    Markers,
    StreamParser,
    skip_ws,
)

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

# states (reasoning is a flag, see StreamParser)
_TEXT, _CALL, _TAIL = range(3)


class HermesParser(StreamParser):
    """``<tool_call>`` JSON calls, with ``<think>`` reasoning."""

    name = "hermes"

    #: the wrapper around a call (LongCat and ERNIE spell it their own way)
    _CALL_OPEN = TOOL_CALL_START
    _CALL_CLOSE = TOOL_CALL_END
    # a stray closing tag in text is a marker too: dropped, never shown to the client
    _IN_TEXT = Markers(TOOL_CALL_START, TOOL_CALL_END, THINK_START)
    _IN_THINK = Markers(TOOL_CALL_START, THINK_END)
    _CALL_STOPS = Markers(TOOL_CALL_END)
    _AFTER_CALL = Markers(TOOL_CALL_END, TOOL_CALL_START)

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        if st == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok == self._CALL_OPEN:
                self._reader = CallReader(self, self._CALL_STOPS)
                self._state = _CALL
            return pos, tok is None
        if st == _CALL:
            assert self._reader is not None
            i, status = self._reader.feed(data, pos, final, out)
            if status == MORE:
                return i, True
            status = self._call_ended(out, status)
            if status == STOP:
                self._state = _TEXT
                return i + len(self._CALL_CLOSE), False
            self._state = _TAIL
            return i, False
        # _TAIL: after the JSON, expect whitespace and the closing tag
        j = skip_ws(data, pos)
        if j - pos >= WS_LIMIT:  # decided by the run's length alone, so split-invariant
            self._state = _TEXT
            return pos, False
        if j >= len(data) and not final:
            return pos, True
        hit = self._AFTER_CALL.at(data, j, final) if j < len(data) else None
        if hit is True:
            return pos, True
        self._state = _TEXT
        if hit == self._CALL_CLOSE:
            return j + len(self._CALL_CLOSE), False
        return pos, False  # no closing tag: what follows is text (or reasoning) again


FORMAT = ToolFormat(
    name="hermes",
    parser=HermesParser,
    models=(r"qwen|qwq|hermes|nous|trinity", r"granite-?4"),
    rank=20,  # before Granite 3 (granite), whose pattern also covers Granite 4's names
    examples=("Qwen/Qwen3-8B", "Qwen/QwQ-32B", "NousResearch/Hermes-3-Llama-3.1-8B",
              "ibm-granite/granite-4.0-h-small", "arcee-ai/Trinity-Mini"),
    markers=(TOOL_CALL_START,),
    marker_follows=("{", "[", ""),
    vllm_parser="hermes",
    vllm_aliases=("qwen3_json", "granite4"),
    sample='<tool_call>\n{"name": "write", "arguments": $ARGS}\n</tool_call>',
)
