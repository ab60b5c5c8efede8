"""StepFun Step-3: StepTML invocations between fullwidth-bar special tokens::

    <｜tool_calls_begin｜>
    <｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name="get_weather">
    <steptml:parameter name="city">Oslo</steptml:parameter>
    </steptml:invoke><｜tool_call_end｜>
    <｜tool_calls_end｜>

The bars are U+FF5C, as in Step-3's tokenizer (DeepSeek's spell the same names with U+2581
between the words; these use underscores). Several calls in one section are parallel calls;
a call without the section around it is accepted too. Values are typed by the tool's schema and
kept as written when they do not fit it (:data:`~._stream.FITTED`, as vLLM's ``step3`` parser
casts them). Step-3's template opens ``<think>`` in the prompt, so its replies start inside
reasoning (``step3`` is in the reasoning module's table of such models); a call written there
is a draft, decided by the reasoning rule. The special tokens out of place never reach the
content. (Step-3.5 and later write Qwen3-Coder's calls: ``qwen3_coder``.)
"""

from __future__ import annotations

from typing import Any

from ..events import Event
from ._declaration import ToolFormat
from ._stream import FITTED, THINK_END, THINK_START, Collector, Markers, StreamParser, XmlArgs

CALLS_BEGIN = "<｜tool_calls_begin｜>"
CALLS_END = "<｜tool_calls_end｜>"
CALL_BEGIN = "<｜tool_call_begin｜>"
CALL_END = "<｜tool_call_end｜>"
TOOL_SEP = "<｜tool_sep｜>"
INVOKE_START = "<steptml:invoke name="
INVOKE_END = "</steptml:invoke>"
PARAM_START = "<steptml:parameter name="
PARAM_END = "</steptml:parameter>"
TAG_CLOSE = ">"
_STRAY_TOKENS = (CALLS_END, CALL_END, TOOL_SEP)

# states (reasoning is a flag, see StreamParser)
_TEXT, _SECTION, _TYPE, _CALL, _INVOKE_NAME, _ARGS, _PARAM_NAME, _VALUE, _AFTER = range(9)


def _attr(text: str) -> str:
    """``"get_weather"`` (or unquoted) -> ``get_weather``."""
    return text.strip().strip("\"'").strip()


class Step3Parser(StreamParser):
    """Step-3 StepTML calls and ``<think>`` reasoning."""

    name = "step3"

    _IN_TEXT = Markers(THINK_START, CALLS_BEGIN, CALL_BEGIN, *_STRAY_TOKENS)
    _IN_THINK = Markers(THINK_END, CALLS_BEGIN, CALL_BEGIN, *_STRAY_TOKENS)
    _STRAYS = frozenset(_STRAY_TOKENS)
    _IN_SECTION = Markers(CALL_BEGIN, CALLS_END)
    _TYPE_END = Markers(TOOL_SEP, CALL_END, CALLS_END)
    _IN_CALL = Markers(INVOKE_START, CALL_END, CALLS_END)
    _NAME_END = Markers(TAG_CLOSE)
    _IN_ARGS = Markers(PARAM_START, INVOKE_END, CALL_END, CALLS_END)
    _VALUE_END = Markers(PARAM_END, CALL_END, CALLS_END)
    _AFTER_INVOKE = Markers(CALL_END, CALLS_END, CALL_BEGIN)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._in_section = False
        self._collect = Collector(self._TYPE_END)
        self._call: XmlArgs | None = None
        self._key = ""

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        if st == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok == CALLS_BEGIN:
                self._state, self._in_section = _SECTION, True
            elif tok == CALL_BEGIN:  # the section left out: lenient
                self._in_section = False
                self._read(_TYPE, self._TYPE_END)
            return pos, tok is None
        if st in (_SECTION, _CALL, _ARGS, _AFTER):  # layout between the parts: dropped
            markers = {_SECTION: self._IN_SECTION, _CALL: self._IN_CALL, _ARGS: self._IN_ARGS,
                       _AFTER: self._AFTER_INVOKE}[st]
            end, m = markers.scan(data, pos, final)
            if m is None:
                return end, True
            self._on_marker(m.group(), out)
            return m.end(), False
        end, m = self._collect.feed(data, pos, final)
        if m is None:
            return end, True
        tok = m.group()
        text = self._collect.text()
        if st == _TYPE:  # "function": the only type there is
            if tok == TOOL_SEP:
                self._state = _CALL
            else:
                self._on_marker(tok, out)
        elif st == _INVOKE_NAME:
            self._call = XmlArgs(self, _attr(text), FITTED, out)
            self._state = _ARGS
        elif st == _PARAM_NAME:
            self._key = _attr(text)
            self._read(_VALUE, self._VALUE_END)
        else:  # _VALUE
            if self._call is not None:
                self._call.member(self._key, text, out)
            self._key = ""
            self._state = _ARGS
            if tok != PARAM_END:
                self._on_marker(tok, out)
        return m.end(), False

    def _on_marker(self, tok: str, out: list[Event]) -> None:
        if tok == CALL_BEGIN:
            self._read(_TYPE, self._TYPE_END)
        elif tok == INVOKE_START:
            self._read(_INVOKE_NAME, self._NAME_END)
        elif tok == PARAM_START:
            self._read(_PARAM_NAME, self._NAME_END)
        elif tok == INVOKE_END:
            self._end_call(out)
            self._state = _AFTER
        elif tok == CALL_END:
            self._end_call(out)
            self._state = _SECTION if self._in_section else _TEXT
        else:  # CALLS_END
            self._end_call(out)
            self._state, self._in_section = _TEXT, False

    def _end_call(self, out: list[Event]) -> None:
        if self._call is not None:
            self._call.end(out)
            self._call = None

    def _close(self, out: list[Event]) -> None:
        st = self._state
        text = self._collect.text()
        if st == _INVOKE_NAME and _attr(text):
            self._call = XmlArgs(self, _attr(text), FITTED, out)
        if self._call is not None:
            in_value = st == _VALUE
            self._call.truncate(self._key if in_value else None, text if in_value else None,
                                out)
            self._call = None


FORMAT = ToolFormat(
    name="step3",
    parser=Step3Parser,
    models=(r"step-?3(?![.p]?\d)",),
    rank=230,
    examples=("stepfun-ai/step3",),
    markers=(CALLS_BEGIN, CALL_BEGIN),
    vllm_parser="step3",
    sample=(f'{CALLS_BEGIN}{CALL_BEGIN}function{TOOL_SEP}{INVOKE_START}"write">'
            f'{PARAM_START}"text">$TEXT{PARAM_END}{INVOKE_END}{CALL_END}{CALLS_END}'),
)
