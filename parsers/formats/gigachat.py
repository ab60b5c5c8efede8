"""Sber GigaChat 3 and 3.5.

GigaChat 3 ends its message and writes one call as a JSON object in a role of its own::

    Let me check.<|message_sep|>function call<|role_sep|>
    {"name": "get_weather", "arguments": {"city": "Oslo"}}

``<|function_call|>`` opens a call too. The JSON envelope is read by
:class:`~._stream.CallReader` (``"parameters"`` is accepted for ``"arguments"``), as vLLM's and
SGLang's ``gigachat3`` parsers read it. The separator tokens never reach the content, and
neither does a ``</s>`` that ends the reply (one followed by more text is text).

GigaChat 3.5 writes GCML, DeepSeek's DSML grammar with its own token
(:class:`~.dsml.DsmlParser`)::

    <｜GCML｜tool_calls>
    <｜GCML｜invoke name="get_weather">
    <｜GCML｜parameter name="city" string="true">Oslo</｜GCML｜parameter>
    </｜GCML｜invoke>
    </｜GCML｜tool_calls>
"""

from __future__ import annotations

from typing import Any

from ..events import Event
from ._declaration import ToolFormat
from ._stream import MORE, WS_LIMIT, CallReader, Markers, StreamParser, emit_plain, skip_ws
from .dsml import DsmlParser

FUNCTION_CALL_ROLE = "function call<|role_sep|>"
FUNCTION_CALL = "<|function_call|>"
MESSAGE_SEP = "<|message_sep|>"
ROLE_SEP = "<|role_sep|>"
END_OF_TEXT = "</s>"
GCML = "｜GCML｜"

# states of GigaChat3Parser
_TEXT, _CALL, _END = range(3)


class GigaChat3Parser(StreamParser):
    """GigaChat 3: one JSON call after ``function call<|role_sep|>`` or ``<|function_call|>``."""

    name = "gigachat3"

    _IN_TEXT = Markers(FUNCTION_CALL_ROLE, FUNCTION_CALL, MESSAGE_SEP, ROLE_SEP, END_OF_TEXT)
    _STRAYS = frozenset((MESSAGE_SEP, ROLE_SEP))
    _CALL_STOPS = Markers(MESSAGE_SEP, END_OF_TEXT, FUNCTION_CALL_ROLE, FUNCTION_CALL)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        if st == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok in (FUNCTION_CALL_ROLE, FUNCTION_CALL):
                self._reader = CallReader(self, self._CALL_STOPS)
                self._state = _CALL
            elif tok == END_OF_TEXT:
                self._state = _END
            return pos, tok is None
        if st == _CALL:
            assert self._reader is not None
            i, status = self._reader.feed(data, pos, final, out)
            if status == MORE:
                return i, True
            self._call_ended(out, status)
            self._state = _TEXT  # DONE, or STOP at a marker (read as text goes on)
            return i, False
        # _END: "</s>" ends the reply when only whitespace follows it; otherwise it was text
        j = skip_ws(data, pos)
        if j >= len(data) and not final and j - pos < WS_LIMIT:
            return pos, True
        self._state = _TEXT
        if j >= len(data) and final:
            return j, False
        emit_plain(out, END_OF_TEXT, False)
        return pos, False


class GigaChat35Parser(DsmlParser):
    """GigaChat 3.5: GCML calls, DSML's grammar with the ``｜GCML｜`` token."""

    name = "gigachat35"

    TOKEN = GCML
    BLOCKS = ("tool_calls",)
    INVOKES = ("invoke",)
    PARAMETERS = ("parameter",)
    OTHER_STRAYS = (MESSAGE_SEP,)


FORMAT_3 = ToolFormat(
    name="gigachat3",
    parser=GigaChat3Parser,
    models=(r"gigachat",),
    rank=200,  # after 3.5
    examples=("ai-sage/GigaChat3-10B-A1.8B", "ai-sage/GigaChat3-702B-A36B-preview"),
    # not "function call<|role_sep|>": its first character would make detection by markers
    # parse every delta holding an "f"; a model whose name says nothing is detected by the
    # special token alone
    markers=(FUNCTION_CALL,),
    triggers=(b"<", b"f"),  # "function call<|role_sep|>"
    vllm_parser="gigachat3",
    sample='function call<|role_sep|>\n{"name": "write", "arguments": $ARGS}',
)

FORMAT_35 = ToolFormat(
    name="gigachat35",
    parser=GigaChat35Parser,
    models=(r"gigachat-?3[._]5",),
    rank=190,  # before 3
    examples=("ai-sage/GigaChat3.5-10B-A1.8B",),
    markers=(f"<{GCML}tool_calls>", f"<{GCML}invoke"),
    sample=(f'<{GCML}tool_calls>\n<{GCML}invoke name="write">\n<{GCML}parameter name="text" '
            f'string="true">$TEXT</{GCML}parameter>\n</{GCML}invoke>\n</{GCML}tool_calls>'),
)
