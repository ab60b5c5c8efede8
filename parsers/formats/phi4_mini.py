"""Phi-4-mini: ``functools[{"name": ..., "arguments": {...}}, ...]``.

The marker includes the bracket, so the word "functools" in ordinary text (``import
functools``) is not a call. Parsing is Granite's: a JSON list of call objects, each emitted
when it closes, text after the list is content again.
"""

from __future__ import annotations

from ._declaration import ToolFormat
from ._stream import Markers
from .granite import GraniteParser

FUNCTOOLS = "functools["


class Phi4MiniParser(GraniteParser):
    """Phi-4-mini ``functools[...]`` lists."""

    name = "phi4_mini"
    _IN_TEXT = Markers(FUNCTOOLS)
    closing = None
    marker_opens_list = True


FORMAT = ToolFormat(
    name="phi4_mini",
    parser=Phi4MiniParser,
    models=(r"phi-?4-?mini",),
    rank=130,
    examples=("microsoft/Phi-4-mini-instruct",),
    triggers=(b"f",),  # "functools["
    vllm_parser="phi4_mini_json",
    sample='functools[{"name": "write", "arguments": $ARGS}]',
)
