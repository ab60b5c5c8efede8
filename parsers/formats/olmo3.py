"""AllenAI Olmo 3: pythonic calls, one per line, inside ``<function_calls>``::

    <function_calls>get_weather(city="Oslo", days=3)
    get_time(tz=null)</function_calls>

Each call is read as a pythonic one (:class:`~.pythonic.PythonicParser`: keyword arguments,
values converted one at a time, never evaluated), except that the calls are separated by new
lines (a comma is accepted too) and a value may be written in JSON's spelling as well as
Python's (``null``, ``true``, ``false``), as vLLM's ``olmo3`` parser reads them. The calls go out
when the block closes; a block cut off by the end of the reply keeps its complete calls and
the one it was cut inside (truncated). A block that is not a sequence of calls invents none:
it is released as text, exactly as written. Olmo 3 Think reasons in ``<think>``...``</think>``;
a block opened there is a draft, decided by the reasoning rule.
"""

from __future__ import annotations

import ast
import json
from typing import Any

from ..events import Event
from ._declaration import ToolFormat
from ._stream import THINK_END, THINK_START, WS_LIMIT, Markers, skip_ws
from .pythonic import (
    _ARGS,
    _MAX_HEADER,
    _NEXT,
    _NEXT_CALL,
    _TEXT,
    CALL_SEPARATOR,
    PythonicParser,
    _viable_header,
    literal_to_json,
)

FUNCTION_CALLS = "<function_calls>"
FUNCTION_CALLS_END = "</function_calls>"

#: JSON's spelling of Python's constants, which Olmo 3 writes as often as Python's
_JSON_NAMES: dict[str, Any] = {"null": None, "true": True, "false": False}


class _JsonNames(ast.NodeTransformer):
    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in _JSON_NAMES:
            return ast.copy_location(ast.Constant(_JSON_NAMES[node.id]), node)
        return node


def value_to_json(text: str) -> str | None:
    """A Python literal, or one spelling ``null``/``true``/``false`` as JSON does, as JSON
    text; None when it is neither."""
    converted = literal_to_json(text)
    if converted is not None:
        return converted
    try:
        tree = _JsonNames().visit(ast.parse(text.strip(), mode="eval"))
        value = ast.literal_eval(tree.body)  # type: ignore[attr-defined]
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except Exception:  # SyntaxError, ValueError, RecursionError, TypeError...
        return None


class Olmo3Parser(PythonicParser):
    """Olmo 3's ``<function_calls>`` blocks of pythonic calls, one per line."""

    name = "olmo3"

    _IN_TEXT = Markers(FUNCTION_CALLS, FUNCTION_CALLS_END, THINK_START)
    _IN_THINK = Markers(THINK_END, FUNCTION_CALLS)
    _value_to_json = staticmethod(value_to_json)

    def _step(self, data: str, pos: int, final: bool, out: list[Event]) -> tuple[int, bool]:
        st = self._state
        if st == _TEXT:
            pos, tok = self._plain(data, pos, final, out)
            if tok is None:
                return pos, True
            if tok == FUNCTION_CALLS:
                self._strong = True  # the block says it holds calls
                self._block = [tok]
                self._done = []
                self._state = _NEXT
            return pos, False  # a stray </function_calls>: dropped
        if st == _ARGS:
            return self._scan_args(data, pos, final, out)
        # after "<function_calls>" or after a call's ")": a separator, the next call, or the end
        n = len(data)
        j = skip_ws(data, pos)
        if j - pos >= WS_LIMIT:
            return self._not_a_list(pos, final, out)
        if j < n and data[j] == CALL_SEPARATOR and st != _NEXT:
            self._block.append(data[pos:j + 1])
            self._state = _NEXT
            return j + 1, False
        if data.startswith(FUNCTION_CALLS_END, j):
            self._block.append(data[pos:j + len(FUNCTION_CALLS_END)])
            self._list_closed(out)
            return j + len(FUNCTION_CALLS_END), False
        m = _NEXT_CALL.match(data, j)
        if m is not None and m.end() - j <= _MAX_HEADER:
            self._block.append(data[pos:m.end()])
            self._open_call(m.group(1))
            return m.end(), False
        rest = data[j:]
        if not final and n - j < _MAX_HEADER and (
                FUNCTION_CALLS_END.startswith(rest) or _viable_header(rest, False)):
            return pos, True
        return self._not_a_list(pos, final, out)


FORMAT = ToolFormat(
    name="olmo3",
    parser=Olmo3Parser,
    models=(r"olmo-?3",),
    rank=180,
    examples=("allenai/Olmo-3-7B-Instruct", "allenai/Olmo-3-7B-Think"),
    markers=(FUNCTION_CALLS,),
    vllm_parser="olmo3",
    sample="<function_calls>write(items=$VALUE)</function_calls>",
)
