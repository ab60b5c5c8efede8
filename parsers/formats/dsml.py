"""DeepSeek V3.2 and V4: DSML, XML-like calls whose tags carry the ``｜DSML｜`` token::

    <｜DSML｜function_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜function_calls>

The bars are U+FF5C, as in DeepSeek's tokenizer. V3.2 wraps the calls in ``function_calls``;
V4 in ``tool_calls`` (also spelled ``toolcalls`` or ``tool``, as vLLM has seen in production),
and V4.1 puts a space after the token (``<｜DSML｜ calls>``, ``<｜DSML｜ invoke name=...>``): all
of them are read, as vLLM's ``deepseek_v32``/``deepseek_v4``/``deepseek_v41`` and SGLang's
detectors read them. Several invokes in one block are parallel calls; an invoke without the
block around it is a call too, and so is V4's self-closing ``<｜DSML｜invoke name="f"/>`` (a
call without arguments).

Each parameter says whether its value is a string: ``string="true"`` keeps the text as written
(one newline each side trimmed); ``string="false"``, or no attribute (the model leaves it out
now and then), reads the value as JSON, and where it is not JSON types it by the tool's schema
as GLM's values are (:data:`~.glm45.GLM_VALUES`). An invoke whose body is a JSON object instead
of parameter tags (SGLang accepts it) has that object as its arguments. A value ends at its
closing tag, or where the model left that out, at the next parameter or the invoke's end.
Reasoning is ``<think>``...``</think>`` (V3.2 in thinking mode, V4); a block opened inside it is
a drafted call, decided by the reasoning rule. A stray closing tag, and DeepSeek's other special
tokens, never reach the content.

GigaChat 3.5's GCML (``gigachat.py``) is the same grammar with another token; the token and the
tag names are class attributes here.
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar

from ..events import Event
from ._declaration import ToolFormat
from ._stream import (
    THINK_END,
    THINK_START,
    Collector,
    JsonArgs,
    Markers,
    StreamParser,
    ValueTyping,
    XmlArgs,
    skip_ws,
)
from .deepseek import STRAY_TOKENS
from .glm45 import GLM_VALUES, JsonTextValues

DSML = "｜DSML｜"
FUNCTION_CALLS = f"<{DSML}function_calls>"
FUNCTION_CALLS_END = f"</{DSML}function_calls>"
TOOL_CALLS = f"<{DSML}tool_calls>"
INVOKE = f"<{DSML}invoke"
INVOKE_END = f"</{DSML}invoke>"
PARAMETER = f"<{DSML}parameter"
PARAMETER_END = f"</{DSML}parameter>"
TAG_CLOSE = ">"
SELF_CLOSE = "/"
JSON_BODY = "{"

_NAME_ATTR = re.compile(r"""name\s*=\s*["']([^"']*)["']""")
_STRING_ATTR = re.compile(r"""string\s*=\s*["']([^"']*)["']""")

# states (reasoning is a flag, see StreamParser)
_TEXT, _BLOCK, _INVOKE_ATTRS, _BODY, _CALL, _PARAM_ATTRS, _VALUE, _JSON = range(8)


def _reject_constant(value: str) -> Any:
    raise ValueError(f"not a JSON value: {value}")


class StringValues(ValueTyping):
    """``string="true"``: the value is the text as written."""

    def complete(self, raw: str, prop: Any) -> str:
        return json.dumps(raw, ensure_ascii=False)

    def partial(self, raw: str, prop: Any) -> str:
        return json.dumps(raw, ensure_ascii=False)[:-1]


class JsonValues(JsonTextValues):
    """``string="false"`` or no attribute: the value as JSON; text that is not JSON is typed
    by the schema, as GLM's values are."""

    def complete(self, raw: str, prop: Any) -> str:
        try:
            value = json.loads(raw.strip(), parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            return super().complete(raw, prop)
        return json.dumps(value, ensure_ascii=False)


STRING_VALUES = StringValues()
JSON_VALUES = JsonValues()


def tag_name(attrs: str) -> str:
    """The ``name`` attribute of a tag's attribute text (empty when it has none)."""
    m = _NAME_ATTR.search(attrs)
    return m.group(1).strip() if m else attrs.strip().strip("\"'/").strip()


def value_typing(attrs: str) -> ValueTyping:
    m = _STRING_ATTR.search(attrs)
    return STRING_VALUES if m is not None and m.group(1).strip().lower() == "true" \
        else JSON_VALUES


class DsmlParser(StreamParser):
    """DSML calls (DeepSeek V3.2, V4, V4.1), with ``<think>`` reasoning."""

    name = "deepseek_v32"

    #: the token inside every tag, and the tag names after it (each family's spellings)
    TOKEN: ClassVar[str] = DSML
    BLOCKS: ClassVar[tuple[str, ...]] = ("function_calls", "tool_calls", "toolcalls", "tool",
                                         " calls")
    INVOKES: ClassVar[tuple[str, ...]] = ("invoke", " invoke")
    PARAMETERS: ClassVar[tuple[str, ...]] = ("parameter", " parameter")
    #: the family's other special tokens, dropped wherever they are met
    OTHER_STRAYS: ClassVar[tuple[str, ...]] = STRAY_TOKENS

    _block_opens: ClassVar[frozenset[str]]
    _block_ends: ClassVar[frozenset[str]]
    _invoke_opens: ClassVar[frozenset[str]]
    _invoke_ends: ClassVar[frozenset[str]]
    _param_opens: ClassVar[frozenset[str]]
    _param_ends: ClassVar[frozenset[str]]
    _IN_BLOCK: ClassVar[Markers]
    _IN_CALL: ClassVar[Markers]
    _VALUE_END: ClassVar[Markers]
    _JSON_ENDS: ClassVar[tuple[str, ...]]
    _TAG_END = Markers(TAG_CLOSE)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        cls._build_markers()
        super().__init_subclass__(**kwargs)

    @classmethod
    def _build_markers(cls) -> None:
        """The family's markers, from its token and tag names."""
        t = cls.TOKEN
        cls._block_opens = frozenset(f"<{t}{b}>" for b in cls.BLOCKS)
        cls._block_ends = frozenset(f"</{t}{b}>" for b in cls.BLOCKS)
        cls._invoke_opens = frozenset(f"<{t}{i}" for i in cls.INVOKES)
        cls._invoke_ends = frozenset(f"</{t}{i}>" for i in cls.INVOKES)
        cls._param_opens = frozenset(f"<{t}{p}" for p in cls.PARAMETERS)
        cls._param_ends = frozenset(f"</{t}{p}>" for p in cls.PARAMETERS)
        strays = (*cls._block_ends, *cls._invoke_ends, *cls._param_ends, *cls.OTHER_STRAYS)
        openers = (*cls._block_opens, *cls._invoke_opens)
        # a stray </think> in text is dropped too (StreamParser adds it for the formats whose
        # markers are written out in the class body)
        cls._IN_TEXT = Markers(THINK_START, THINK_END, *openers, *strays)
        cls.knows_reasoning = True
        cls._IN_THINK = Markers(THINK_END, *openers, *strays)
        cls._STRAYS = frozenset(strays)
        cls._IN_BLOCK = Markers(*cls._invoke_opens, *cls._block_ends)
        cls._IN_CALL = Markers(*cls._param_opens, *cls._invoke_ends, *cls._block_ends)
        cls._VALUE_END = Markers(*cls._param_ends, *cls._param_opens, *cls._invoke_ends,
                                 *cls._block_ends)
        cls._JSON_ENDS = (*cls._invoke_ends, *cls._block_ends)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._in_block = False  # the invoke being read sits in a block (else a bare invoke)
        self._collect = Collector(self._TAG_END)  # attributes or a value being read
        self._call: XmlArgs | None = None
        self._json: JsonArgs | None = None
        self._key = ""
        self._typing: ValueTyping = JSON_VALUES

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        if st == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok in self._block_opens:
                self._state, self._in_block = _BLOCK, True
            elif tok in self._invoke_opens:
                self._in_block = False
                self._read(_INVOKE_ATTRS, self._TAG_END)
            return pos, tok is None
        if st == _BLOCK or st == _CALL:  # between invokes, between parameters: layout
            end, m = (self._IN_BLOCK if st == _BLOCK else self._IN_CALL).scan(data, pos, final)
            if m is None:
                return end, True
            self._on_layout_marker(m.group(), out)
            return m.end(), False
        if st == _BODY:  # after the invoke's name: a JSON object, or parameter tags
            j = skip_ws(data, pos)
            if j >= len(data) and not final:
                return j, True  # whitespace is layout either way: dropped as it comes
            assert self._call is not None
            if data.startswith(JSON_BODY, j):
                self._json = JsonArgs(self._call.index, self._JSON_ENDS)
                self._call = None
                self._state = _JSON
                return j, False
            self._state = _CALL
            return pos, False
        if st == _JSON:
            assert self._json is not None
            pos, marker = self._json.feed(data, pos, out, final)
            if marker is None:
                return pos, True
            self._json = None
            self._after_invoke(marker)
            return pos, False
        end, m = self._collect.feed(data, pos, final)
        if m is None:
            return end, True
        tok = m.group()
        text = self._collect.text()
        if st == _INVOKE_ATTRS:
            self._call = XmlArgs(self, tag_name(text), GLM_VALUES, out)
            if text.rstrip().endswith(SELF_CLOSE):  # <invoke name="f"/>: no arguments
                self._end_call(out)
                self._after_invoke(None)
            else:
                self._state = _BODY
        elif st == _PARAM_ATTRS:
            self._key = tag_name(text)
            self._typing = value_typing(text)
            if text.rstrip().endswith(SELF_CLOSE):  # an empty value
                self._member("", out)
                self._state = _CALL
            else:
                self._read(_VALUE, self._VALUE_END)
        else:  # _VALUE, ended by its closing tag or, implicitly, by what follows it
            self._member(text, out)
            self._state = _CALL
            if tok not in self._param_ends:
                self._on_layout_marker(tok, out)
        return m.end(), False

    def _on_layout_marker(self, tok: str, out: list[Event]) -> None:
        if tok in self._invoke_opens:
            self._read(_INVOKE_ATTRS, self._TAG_END)
        elif tok in self._param_opens:
            self._read(_PARAM_ATTRS, self._TAG_END)
        elif tok in self._invoke_ends:
            self._end_call(out)
            self._after_invoke(tok)
        else:  # the block's end (closing an invoke left open, if any)
            if self._call is not None:
                self._end_call(out)
            self._state, self._in_block = _TEXT, False

    def _member(self, raw: str, out: list[Event]) -> None:
        if self._call is not None:
            self._call.member(self._key, raw, out, self._typing)
        self._key = ""

    def _end_call(self, out: list[Event]) -> None:
        if self._call is not None:
            self._call.end(out)
            self._call = None

    def _after_invoke(self, marker: str | None) -> None:
        """An invoke ended (at ``marker``): back to its block, or to text."""
        if marker in self._block_ends or not self._in_block:
            self._state, self._in_block = _TEXT, False
        else:
            self._state = _BLOCK

    def _close(self, out: list[Event]) -> None:
        st = self._state
        text = self._collect.text()
        if self._json is not None:
            self._json.finish(out)
            self._json = None
            return
        if st == _INVOKE_ATTRS:
            name = tag_name(text)
            if name:
                self._call = XmlArgs(self, name, GLM_VALUES, out)
        if self._call is not None:
            in_value = st == _VALUE
            self._call.truncate(self._key if in_value else None, text if in_value else None,
                                out, self._typing)
            self._call = None


DsmlParser._build_markers()

FORMAT = ToolFormat(
    name="deepseek_v32",
    parser=DsmlParser,
    # V3.2-Exp still writes V3.1's calls (deepseek_v31); V3.2 and V4 write DSML
    models=(r"deepseek-?v3\.2(?!-?exp)", r"deepseek-?v4"),
    rank=25,  # before V3.1 (30), whose pattern also covers "v3.2"
    examples=("deepseek-ai/DeepSeek-V3.2", "deepseek-ai/DeepSeek-V3.2-Speciale",
              "deepseek-ai/DeepSeek-V4"),
    markers=(FUNCTION_CALLS, TOOL_CALLS, INVOKE),
    vllm_parser="deepseek_v32",
    vllm_aliases=("deepseek_v4", "deepseek_v41"),
    sample=(f'{FUNCTION_CALLS}\n{INVOKE} name="write">\n{PARAMETER} name="text" string="true">'
            f"$TEXT{PARAMETER_END}\n{INVOKE_END}\n{FUNCTION_CALLS_END}"),
)
