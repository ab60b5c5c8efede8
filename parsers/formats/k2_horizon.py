"""K2 Horizon (IFM): calls in a ``<ifm|tool_calls>`` group, GLM-style keys and values::

    <ifm|tool_calls><ifm|tool_call>get_weather
    <ifm|arg_key>city</ifm|arg_key><ifm|arg_value>Oslo</ifm|arg_value>
    </ifm|tool_call></ifm|tool_calls>

as vLLM's ``k2_horizon`` parser and SGLang's ``k2_horizon`` detector read it, in the three
layouts a request may ask the template for (``tool_call_format``), told apart by the call
itself as SGLang does: ``xml`` (above), ``xml_typed`` (an ``<ifm|arg_type>…</ifm|arg_type>``
between key and value) and ``json`` (the call's body a ``{"name": …, "arguments": {…}}``
object). A value is typed by the tool's schema like GLM's (:data:`~.glm45.GLM_VALUES`); a
declared ``arg_type`` types it where the schema says nothing. The peers refuse a whole group
when one call in it is malformed and leave the group as content; here each call is read on its
own and a broken one reaches repair or a clear refusal.

Reasoning has one pair of tokens per effort level (``<ifm|think>``, ``<ifm|think_fast>``,
``<ifm|think_faster>`` and their closers); the pair the reply opens is the one that closes it,
the others are dropped where they stand (in reasoning the chat template opened, the first
closer of any level ends it). A group opened inside reasoning is a draft, decided by
the reasoning rule (vLLM ends the reasoning there).
"""

from __future__ import annotations

from typing import Any

from ..events import Event
from ._declaration import ToolFormat
from ._stream import (
    MORE,
    STOP,
    WS_LIMIT,
    CallReader,
    Collector,
    Markers,
    StreamParser,
    XmlArgs,
    skip_ws,
)
from .glm45 import GLM_VALUES, JsonTextValues

CALLS_START = "<ifm|tool_calls>"
CALLS_END = "</ifm|tool_calls>"
CALL_START = "<ifm|tool_call>"
CALL_END = "</ifm|tool_call>"
KEY_START = "<ifm|arg_key>"
KEY_END = "</ifm|arg_key>"
TYPE_START = "<ifm|arg_type>"
TYPE_END = "</ifm|arg_type>"
VALUE_START = "<ifm|arg_value>"
VALUE_END = "</ifm|arg_value>"
#: reasoning tokens by effort level: high, medium, low
THINK_PAIRS = {"<ifm|think>": "</ifm|think>", "<ifm|think_fast>": "</ifm|think_fast>",
               "<ifm|think_faster>": "</ifm|think_faster>"}
THINK_START, THINK_END = "<ifm|think>", "</ifm|think>"
_THINK_TOKENS = (*THINK_PAIRS, *THINK_PAIRS.values())
_THINK_ENDS = {end: start for start, end in THINK_PAIRS.items()}

#: tokens with no meaning in text or reasoning: dropped
_STRAY_TOKENS = (CALLS_END, CALL_END, KEY_START, KEY_END, TYPE_START, TYPE_END, VALUE_START,
                 VALUE_END)

# states (reasoning is a flag, see StreamParser)
_TEXT, _GROUP, _BODY, _NAME, _ARGS, _KEY, _TYPE, _VALUE, _JSON, _TAIL = range(10)


class DeclaredType(JsonTextValues):
    """GLM's typing, with the type an ``arg_type`` tag declares standing in for a schema that
    says nothing."""

    def __init__(self, declared: str) -> None:
        self.schema = {"type": declared.split("[", 1)[0].strip().lower()}

    def complete(self, raw: str, prop: Any) -> str:
        has_type = isinstance(prop, dict) and any(k in prop for k in ("type", "anyOf", "oneOf",
                                                                      "enum"))
        return super().complete(raw, prop if has_type else self.schema)


class K2HorizonParser(StreamParser):
    """K2 Horizon ``<ifm|tool_call>`` calls (XML, typed XML or JSON) and reasoning."""

    name = "k2_horizon"

    _THINK_START = THINK_START
    _THINK_END = THINK_END
    _STRAYS: frozenset[str] = frozenset(_STRAY_TOKENS)
    _IN_TEXT = Markers(*_THINK_TOKENS, CALLS_START, CALL_START, *_STRAY_TOKENS)
    _IN_THINK = Markers(*_THINK_TOKENS, CALLS_START, CALL_START, *_STRAY_TOKENS)
    _NAME_END = Markers(KEY_START, CALL_END, CALLS_END)
    _ARGS_NEXT = Markers(KEY_START, TYPE_START, VALUE_START, CALL_END, CALLS_END)
    _KEY_END = Markers(KEY_END, TYPE_START, VALUE_START, CALL_END, CALLS_END)
    _TYPE_END = Markers(TYPE_END, VALUE_START, CALL_END, CALLS_END)
    _VALUE_END = Markers(VALUE_END)
    _CALL_STOPS = Markers(CALL_END, CALLS_END)
    #: between a group's calls (anything else there is dropped, as between Kimi K2's)
    _IN_GROUP = Markers(CALL_START, CALLS_END, CALL_END)

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._state = _TEXT
        self._collect = Collector(self._NAME_END)
        self._call: XmlArgs | None = None
        self._key: str | None = None
        self._type: str | None = None
        self._ws = 0
        self._in_group = False
        self._pair_written = False  # the model wrote a reasoning start token itself
        self._use_pair(THINK_START)

    # reasoning: the pair the reply opens ---------------------------------------------------
    def _use_pair(self, start: str) -> None:
        self._THINK_START, self._THINK_END = start, THINK_PAIRS[start]  # type: ignore[misc]
        # the other levels' tokens are out of place while this one is in use
        self._STRAYS = frozenset(  # type: ignore[misc]
            (*_STRAY_TOKENS, *(t for t in _THINK_TOKENS if t not in (start, THINK_PAIRS[start]))))

    def _marker(self, tok: str, thinking: bool) -> None:
        if not thinking and tok in THINK_PAIRS and self._drafts is None:
            self._use_pair(tok)
            self._pair_written = True
        elif thinking and not self._pair_written and tok in _THINK_ENDS:
            # reasoning the template opened: whichever level's closer comes ends it
            self._use_pair(_THINK_ENDS[tok])
        super()._marker(tok, thinking)

    # the calls ----------------------------------------------------------------------------------
    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        if st == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok == CALL_START:
                self._state, self._ws = _BODY, 0
            elif tok == CALLS_START:
                self._state, self._in_group = _GROUP, True
            return pos, tok is None
        if st == _GROUP:
            end, m = self._IN_GROUP.scan(data, pos, final)
            if m is None:
                return end, True
            if m.group() == CALL_START:
                self._state, self._ws = _BODY, 0
            else:
                self._after_call(m.group())
            return m.end(), False
        if st == _BODY:  # what the call's body starts with decides its layout
            n = len(data)
            while pos < n and data[pos] in " \t\r\n" and self._ws < WS_LIMIT:
                pos += 1
                self._ws += 1
            if pos >= n and not final:
                return pos, True
            if pos < n and data[pos] == "{":
                self._reader = CallReader(self, self._CALL_STOPS)
                self._state = _JSON
            else:
                self._read(_NAME, self._NAME_END)
            return pos, False
        if st == _JSON:
            assert self._reader is not None
            i, status = self._reader.feed(data, pos, final, out)
            if status == MORE:
                return i, True
            status = self._call_ended(out, status)
            if status == STOP:  # at a closing tag: the call's or the group's
                hit = self._CALL_STOPS.at(data, i, final)
                tok = hit if isinstance(hit, str) else CALL_END
                self._after_call(tok)
                return i + len(tok), False
            self._state = _TAIL
            return i, False
        if st == _TAIL:  # after the JSON: whitespace and the closing tag
            j = skip_ws(data, pos)
            if j - pos >= WS_LIMIT:
                self._state = _TEXT
                return pos, False
            if j >= len(data) and not final:
                return pos, True
            hit = self._CALL_STOPS.at(data, j, final) if j < len(data) else None
            if hit is True:
                return pos, True
            if hit:
                self._after_call(hit)
                return j + len(hit), False
            self._after_call(CALL_END)
            return pos, False
        if st == _ARGS:
            end, m = self._ARGS_NEXT.scan(data, pos, final)  # only whitespace in between
            if m is None:
                return end, True
            self._on_args_marker(m.group(), out)
            return m.end(), False
        end, m = self._collect.feed(data, pos, final)
        if m is None:
            return end, True
        tok = m.group()
        text = self._collect.text()
        if st == _NAME:
            self._call = XmlArgs(self, text.strip(), GLM_VALUES, out)
            self._key = self._type = None
            self._state = _ARGS
            if tok != KEY_START:
                self._on_args_marker(tok, out)
            else:
                self._read(_KEY, self._KEY_END)
        elif st == _KEY:
            self._key = text
            self._state = _ARGS
            if tok != KEY_END:
                self._on_args_marker(tok, out)
        elif st == _TYPE:
            self._type = text.strip() or None
            self._state = _ARGS
            if tok != TYPE_END:
                self._on_args_marker(tok, out)
        else:  # _VALUE
            if self._call is not None:
                typing = DeclaredType(self._type) if self._type else None
                self._call.member(self._key or "", text, out, typing)
            self._key = self._type = None
            self._state = _ARGS
        return m.end(), False

    def _on_args_marker(self, tok: str, out: list[Event]) -> None:
        if tok == KEY_START:
            self._read(_KEY, self._KEY_END)
        elif tok == TYPE_START:
            self._read(_TYPE, self._TYPE_END)
        elif tok == VALUE_START:
            self._read(_VALUE, self._VALUE_END)
        else:  # the call's (or the group's) closing tag
            if self._call is not None:
                self._call.end(out)
            self._call, self._key, self._type = None, None, None
            self._after_call(tok)

    def _after_call(self, tok: str) -> None:
        """A call ended at ``tok`` (its closing tag, or the group's): back to the group or to
        text."""
        if tok == CALLS_END:
            self._in_group = False
        self._state = _GROUP if self._in_group else _TEXT

    def _close(self, out: list[Event]) -> None:
        super()._close(out)  # a JSON call still open
        st = self._state
        text = self._collect.text()
        if st == _NAME and text.strip():
            self._call = XmlArgs(self, text.strip(), GLM_VALUES, out)
        if self._call is not None:
            in_value = st == _VALUE
            typing = DeclaredType(self._type) if self._type else None
            self._call.truncate(self._key if in_value else None, text if in_value else None,
                                out, typing)
            self._call = None


FORMAT = ToolFormat(
    name="k2_horizon",
    parser=K2HorizonParser,
    models=(r"k2-?horizon",),
    rank=390,
    examples=("IFM/K2-Horizon-7B", "IFM/K2-Horizon-375B-A23B"),
    markers=(CALLS_START,),
    reasoning_markers=tuple(THINK_PAIRS),
    vllm_parser="k2_horizon",
    sample=(CALLS_START + CALL_START + "write" + KEY_START + "text" + KEY_END + VALUE_START
            + "$TEXT" + VALUE_END + CALL_END + CALLS_END),
)
