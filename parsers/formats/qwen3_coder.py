"""Qwen3-Coder XML tool calls::

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Oslo
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

Parameter values are raw text, typed by the tool's JSON schema: strings stay as written (one
leading and one trailing newline removed, as vLLM's qwen3coder parser does), other types are
parsed from the text (JSON, or a Python literal for ``True``/``None``/single quotes) and kept
only when they fit (:data:`~._stream.FITTED`). The parser builds the JSON arguments itself
and emits them one parameter at a time.

A value ends only at ``</parameter>``, or where the model left that out: at the next
``<parameter=`` or at ``</function>`` (as vLLM's and SGLang's parsers read it). So
``</tool_call>`` inside code in a value is kept. A bare
``<function=`` without the ``<tool_call>`` wrapper is accepted, and so is a Hermes-style JSON
call inside ``<tool_call>`` (Qwen3-Coder falls back to it now and then).

Xiaomi's MiMo-V2 models write these calls too (vLLM's and SGLang's ``mimo``), each value on
the tag's line. vLLM keeps every MiMo value a string and SGLang types it by the schema; this
parser types it (a number the schema asks for arrives as a number, not as text that
validation would have to repair). Nanbeige4 writes them as well (SGLang's ``nanbeige`` is its
Qwen3-Coder detector).
"""

from __future__ import annotations

from ..events import Event
from ._declaration import ToolFormat
from ._stream import (
    FITTED,
    MORE,
    THINK_END,
    THINK_START,
    WS_LIMIT,
    CallReader,
    Collector,
    Markers,
    StreamParser,
    XmlArgs,
    skip_ws,
)

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
FUNCTION_START = "<function="
FUNCTION_END = "</function>"
PARAMETER_START = "<parameter="
PARAMETER_END = "</parameter>"
TAG_CLOSE = ">"

# states (reasoning is a flag, see StreamParser)
_TEXT, _WRAP, _FNAME, _FUNC, _PNAME, _PVALUE, _AFTER_FUNC, _JSON = range(8)


class Qwen3CoderParser(StreamParser):
    """Qwen3-Coder ``<function=...><parameter=...>`` calls, arguments typed by schema."""

    name = "qwen3_coder"

    #: the wrapper around a call (Seed-OSS spells it ``<seed:tool_call>``)
    _CALL_OPEN = TOOL_CALL_START
    _CALL_CLOSE = TOOL_CALL_END
    _IN_TEXT = Markers(TOOL_CALL_START, FUNCTION_START, TOOL_CALL_END, THINK_START)
    _IN_THINK = Markers(THINK_END, TOOL_CALL_START, FUNCTION_START)
    _WRAP_NEXT = Markers(FUNCTION_START, TOOL_CALL_END)
    _TAG_END = Markers(TAG_CLOSE, TOOL_CALL_END)
    _IN_FUNC = Markers(PARAMETER_START, FUNCTION_END, TOOL_CALL_END)
    _VALUE_END = Markers(PARAMETER_END, FUNCTION_END, PARAMETER_START)
    _AFTER_FUNC_NEXT = Markers(TOOL_CALL_END, FUNCTION_START)
    _JSON_STOPS = Markers(TOOL_CALL_END)

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._collect: Collector | None = None
        self._call: XmlArgs | None = None
        self._pname = ""

    def _end_call(self, out: list[Event]) -> None:
        assert self._call is not None
        self._call.end(out)
        self._call = None

    # -- states --

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        n = len(data)
        if st == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok == self._CALL_OPEN:
                self._state = _WRAP
            elif tok == FUNCTION_START:
                self._collect = Collector(self._TAG_END)
                self._state = _FNAME
            return pos, tok is None
        if st == _FNAME or st == _PNAME or st == _PVALUE:
            assert self._collect is not None
            end, m = self._collect.feed(data, pos, final)
            if m is None:
                return end, True
            tok = m.group()
            text = self._collect.text()
            self._collect = None
            if st == _FNAME:
                self._call = XmlArgs(self, text.strip(), FITTED, out)
                if tok == self._CALL_CLOSE:
                    self._end_call(out)
                    self._state = _TEXT
                else:
                    self._state = _FUNC
            elif st == _PNAME:
                self._pname = text.strip()
                if tok == self._CALL_CLOSE:
                    self._end_call(out)
                    self._state = _TEXT
                else:
                    self._collect = Collector(self._VALUE_END)
                    self._state = _PVALUE
            else:
                assert self._call is not None
                self._call.member(self._pname, text, out)
                if tok == FUNCTION_END:
                    self._end_call(out)
                    self._state = _AFTER_FUNC
                elif tok == PARAMETER_START:  # the next parameter closes this one
                    self._collect = Collector(self._TAG_END)
                    self._state = _PNAME
                else:
                    self._state = _FUNC
            return m.end(), False
        if st == _FUNC:
            end, m = self._IN_FUNC.scan(data, pos, final)  # text between parameters: layout
            if m is None:
                return end, True
            tok = m.group()
            if tok == PARAMETER_START:
                self._collect = Collector(self._TAG_END)
                self._state = _PNAME
            else:
                self._end_call(out)
                self._state = _AFTER_FUNC if tok == FUNCTION_END else _TEXT
            return m.end(), False
        if st == _JSON:
            assert self._reader is not None
            i, status = self._reader.feed(data, pos, final, out)
            if status == MORE:
                return i, True
            self._call_ended(out, status)
            self._state = _AFTER_FUNC  # DONE, or STOP at </tool_call>
            return i, False
        # _WRAP (after <tool_call>) and _AFTER_FUNC (after </function>)
        j = skip_ws(data, pos)
        if j - pos >= WS_LIMIT and st == _AFTER_FUNC:
            self._state = _TEXT
            return pos, False
        if j >= n:
            if not final:
                return (j if st == _WRAP else pos), True
            if st == _WRAP:  # "<tool_call>" and nothing else
                return j, True
            self._state = _TEXT
            return pos, False
        hit = (self._WRAP_NEXT if st == _WRAP else self._AFTER_FUNC_NEXT).at(data, j, final)
        if hit is True:
            return (j if st == _WRAP else pos), True
        if hit == FUNCTION_START:
            self._collect = Collector(self._TAG_END)
            self._state = _FNAME
            return j + len(FUNCTION_START), False
        if hit == self._CALL_CLOSE:
            self._state = _TEXT
            return j + len(self._CALL_CLOSE), False
        if st == _WRAP:  # not XML: a JSON call, or raw text, up to </tool_call>
            self._reader = CallReader(self, self._JSON_STOPS)
            self._state = _JSON
            return j, False
        self._state = _TEXT
        return pos, False

    def _close(self, out: list[Event]) -> None:
        st = self._state
        if self._reader is not None:
            super()._close(out)
            return
        text = self._collect.text() if self._collect is not None else ""
        self._collect = None
        if st == _FNAME:
            self._call = XmlArgs(self, text.strip(), FITTED, out)
        if self._call is not None:
            in_value = st == _PVALUE
            self._call.truncate(self._pname if in_value else None, text if in_value else None,
                                out)
            self._call = None


FORMAT = ToolFormat(
    name="qwen3_coder",
    parser=Qwen3CoderParser,
    # Step-3.5 and later write Qwen3-Coder's calls too (vLLM's step3p5 parser)
    models=(r"qwen3-?coder", r"step-?3(?:\.|p)[5-9]", r"mimo-?v[2-9]",
            r"nanbeige"),
    rank=10,  # before Qwen (hermes)
    examples=("Qwen/Qwen3-Coder-30B-A3B-Instruct", "stepfun-ai/Step-3.5-Flash",
              "XiaomiMiMo/MiMo-V2-Flash", "Nanbeige/Nanbeige4-3B-Thinking-2511"),
    markers=(TOOL_CALL_START,),
    marker_follows=(FUNCTION_START,),
    vllm_parser="qwen3_coder",
    vllm_aliases=("qwen3_xml", "step3p5", "mimo"),
    sample=("<tool_call>\n<function=write>\n<parameter=text>\n$TEXT\n</parameter>\n"
            "</function>\n</tool_call>"),
)
