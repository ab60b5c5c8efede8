"""Salesforce xLAM: the reply is a JSON list of calls, ``[{"name": ..., "arguments": {...}}]``.

xLAM answers a tool request with the list alone, so a JSON value that opens the reply (or the
answer, after ``</think>``) is a candidate: held until it is complete, and calls only when every
object in it names a tool (``{"answer": 42}`` is text). The list may be fenced in a
````` ```json ````` block there, and it may follow ``<tool_call>`` or ``[TOOL_CALLS]`` anywhere
in the reply: vLLM's ``xlam`` parser reads all of these. Reading the call objects is
:class:`~._stream.CallListReader`'s (a single object is a list of one; ``"parameters"`` and the
other usual keys are read too). A ``[`` or ``{`` after prose is text. Reasoning is
``<think>``...``</think>``; a ``<tool_call>`` or ``[TOOL_CALLS]`` list written there is a draft,
decided by the reasoning rule.
"""

from __future__ import annotations

from typing import Any

from ..events import Event, Text, ToolCallStart
from ._declaration import ToolFormat
from ._stream import THINK_END, THINK_START, CallListReader, Markers, StreamParser, emit_plain
from .base import JsonScanner

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_CALLS = "[TOOL_CALLS]"
LIST_OPEN = "["
OBJECT_OPEN = "{"
FENCE = "```"
FENCE_LANGS = ("", "json")  # an opening fence with another language is not a call
_MAX_FENCE_LINE = 16
_WS = " \t\r\n"

# states (reasoning is a flag, see StreamParser)
_TEXT, _VALUE, _FENCE_LANG, _FENCE_LEAD, _FENCE_TAIL, _LIST, _AFTER_LIST = range(7)


class XlamParser(StreamParser):
    """xLAM JSON call lists: the whole answer, fenced, or after ``<tool_call>``/``[TOOL_CALLS]``."""

    name = "xlam"

    _IN_TEXT = Markers(THINK_START, TOOL_CALL_START, TOOL_CALL_END, TOOL_CALLS, LIST_OPEN,
                       OBJECT_OPEN, FENCE)
    _IN_THINK = Markers(THINK_END, TOOL_CALL_START, TOOL_CALLS)
    # a call list may only open the answer, which starts where reasoning ends: told that
    # position, prose before the reasoning no longer counts as the answer's own
    _ANSWER_STARTS = True

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._prose = False  # the answer so far holds text other than whitespace
        self._held: list[str] = []  # a candidate's text, released as written if not calls
        self._scanner = JsonScanner()
        self._json: list[str] = []
        self._fenced = False
        self._list: CallListReader | None = None
        self._lead_ws: list[str] = []  # whitespace before the answer's first text, held

    def _marker(self, tok: str, thinking: bool) -> None:
        if tok == THINK_END and thinking:
            self._prose = False  # the answer starts after the reasoning
        super()._marker(tok, thinking)

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        n = len(data)
        if st == _TEXT:
            k = len(out)
            pos, tok = self._plain(data, pos, final, out)
            if not self._prose:
                self._hold_lead(out, k)
            if tok is None:
                return pos, True
            if tok == THINK_END:  # the answer starts here, whatever came before the reasoning
                self._flush_lead(out)
                self._prose = False
                return pos, False
            if tok in (TOOL_CALL_START, TOOL_CALLS):
                self._list = CallListReader(self.next_index)
                self._state = _LIST
            elif tok in (LIST_OPEN, OBJECT_OPEN, FENCE):
                if tok == LIST_OPEN and not final and len(data) - pos < len(TOOL_CALLS) - 1 \
                        and TOOL_CALLS.startswith(data[pos - 1:]):
                    return pos - 1, True  # "[" alone so far: it may still be "[TOOL_CALLS]"
                self._flush_lead(out)
                if self._prose:
                    emit_plain(out, tok, False)
                elif tok == FENCE:
                    self._held = [tok]
                    self._state = _FENCE_LANG
                else:
                    self._begin_value()
                    return pos - len(tok), False
            return pos, False  # a stray </tool_call>: dropped
        if st == _VALUE:
            chunk = data[pos:]
            k = self._scanner.feed(chunk)
            if k < 0:
                self._json.append(chunk)
                return n, True
            self._json.append(chunk[:k])
            self._decide(out, complete=True)
            return pos + k, False
        if st == _FENCE_LANG:  # "```", then a language tag, then a new line
            nl = data.find("\n", pos)
            if nl < 0:
                if not final and n - pos <= _MAX_FENCE_LINE:
                    return pos, True
                return self._release(data, pos, pos, out)
            lang = data[pos:nl]
            if len(lang) > _MAX_FENCE_LINE or lang.strip().lower() not in FENCE_LANGS:
                return self._release(data, pos, pos, out)
            self._held.append(data[pos:nl + 1])
            self._state = _FENCE_LEAD
            return nl + 1, False
        if st == _FENCE_LEAD:
            j = pos
            while j < n and data[j] in _WS:
                j += 1
            self._held.append(data[pos:j])
            if j >= n:
                if final:
                    return self._release(data, j, j, out)
                return j, True
            if data[j] in "[{":
                self._fenced = True
                self._begin_value()
                return j, False
            return self._release(data, j, j, out)
        if st == _FENCE_TAIL:  # whitespace and the closing fence, dropped
            j = pos
            while j < n and data[j] in _WS:
                j += 1
            if j >= n and not final:
                return j, True
            if data.startswith(FENCE, j):
                self._state = _TEXT
                return j + len(FENCE), False
            if not final and n - j < len(FENCE) and FENCE.startswith(data[j:]):
                return j, True
            self._state = _TEXT
            return j, False
        if st == _LIST:
            assert self._list is not None
            pos = self._list.feed(data, pos, out)
            if not self._list.done:
                return pos, True
            self._list = None
            self._state = _AFTER_LIST
            return pos, False
        # _AFTER_LIST: a closing </tool_call> right after the list is dropped
        rest = data[pos:]
        stripped = rest.lstrip(_WS)
        if stripped.startswith(TOOL_CALL_END):
            pos += len(rest) - len(stripped) + len(TOOL_CALL_END)
        elif not final and (not stripped or TOOL_CALL_END.startswith(stripped)):
            return pos, True
        self._state = _TEXT
        return pos, False

    def _hold_lead(self, out: list[Event], k: int) -> None:
        """Before the answer has any text, its whitespace is held rather than emitted: the
        mender forwards a delta unparsed only after one that came out as it went in, and the
        parser must see every character of the answer before it can tell a list that opens
        the answer from one after prose."""
        if any(type(ev) is Text and ev.text.strip(_WS) for ev in out[k:]):
            self._prose = True
            self._flush_lead(out, k)
            return
        held = [ev.text for ev in out[k:] if type(ev) is Text]
        if held:
            self._lead_ws.append("".join(held))
            out[k:] = [ev for ev in out[k:] if type(ev) is not Text]

    def _flush_lead(self, out: list[Event], at: int | None = None) -> None:
        if self._lead_ws:
            ws = Text("".join(self._lead_ws))
            self._lead_ws = []
            if at is None:
                out.append(ws)
            else:
                out.insert(at, ws)

    @property
    def at_rest(self) -> bool:
        return super().at_rest and self._state == _TEXT and not self._lead_ws

    def _begin_value(self) -> None:
        self._scanner = JsonScanner()
        self._json = []
        self._state = _VALUE

    def _release(self, data: str, pos: int, end: int, out: list[Event]) -> tuple[int, bool]:
        """Not a call list after all: what was held, and ``data[pos:end]``, is text."""
        emit_plain(out, "".join(self._held) + "".join(self._json) + data[pos:end], False)
        self._held, self._json = [], []
        self._prose = True
        self._fenced = False
        self._state = _TEXT
        return end, False

    def _decide(self, out: list[Event], complete: bool) -> None:
        """The candidate value ended (or the reply did): calls when every object in it names
        a tool, else text."""
        text = "".join(self._json)
        events: list[Event] = []
        first = self._calls
        counter = iter(range(first, first + 1_000_000_000))
        reader = CallListReader(lambda: next(counter))
        pos = reader.feed(text, 0, events)
        reader.finish(events)
        starts = sum(1 for e in events if type(e) is ToolCallStart)
        if not starts or pos != len(text) or any(type(e) is Text for e in events):
            self._release("", 0, 0, out)
            return
        self._calls = first + starts
        out.extend(events)
        self._held, self._json = [], []
        self._prose = True
        self._state = _FENCE_TAIL if self._fenced and complete else _TEXT
        self._fenced = False

    def _close(self, out: list[Event]) -> None:
        self._flush_lead(out)
        st = self._state
        if st == _VALUE:
            self._decide(out, complete=False)
        elif st in (_FENCE_LANG, _FENCE_LEAD):
            self._release("", 0, 0, out)
        elif self._list is not None:
            self._list.finish(out)
            self._list = None
        self._state = _TEXT


FORMAT = ToolFormat(
    name="xlam",
    parser=XlamParser,
    models=(r"xlam",),
    rank=15,  # before Llama 3 JSON and Hermes: xLAM-2 models are Llama and Qwen fine-tunes
    examples=("Salesforce/Llama-xLAM-2-8b-fc-r", "Salesforce/xLAM-2-32b-fc-r"),
    triggers=(b"<", b"[", b"{", b"`"),
    vllm_parser="xlam",
    sample='[{"name": "write", "arguments": $ARGS}]',
)
