"""What a tool-call format file declares about itself, so that nothing else names it.

Each ``parsers/formats/<name>.py`` ends with one :class:`ToolFormat` per format it implements
(``deepseek.py`` holds two). The registry (``formats/__init__.py``) finds them by walking the
package; model-name detection, marker detection (``autodetect.py``), the mender's fast-path
triggers, ``toolmend doctor`` and the benchmarks all read them from there. Adding a format is
its file and its fixtures (``fixtures/formats/<name>.json``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .base import MarkerParser

#: where :attr:`ToolFormat.sample` puts a call's arguments
SAMPLE_ARGS, SAMPLE_VALUE, SAMPLE_TEXT = "$ARGS", "$VALUE", "$TEXT"


@dataclass(frozen=True, slots=True)
class ToolFormat:
    """One tool-call format family: its parser and everything the rest of toolmend needs to
    know about it."""

    #: the ``--tool-format`` name; the parser class carries the same name
    name: str
    parser: type[MarkerParser]
    #: regular expressions searched (case-insensitively) in the model name the upstream reports
    #: or the request names; empty for a format chosen only by ``--tool-format``
    models: tuple[str, ...] = ()
    #: where these patterns stand among all formats' patterns: lower is tried first, and the
    #: first format whose pattern matches a name wins. A more specific family ranks before the
    #: general one (Qwen3-Coder before Qwen, Llama 4 before Llama); ranks are unique.
    rank: int = 0
    #: model names this format is for (each must be detected as this format: a test checks)
    examples: tuple[str, ...] = ()
    #: start markers that pick this format when seen in the text of a model whose name says
    #: nothing (``autodetect.py``)
    markers: tuple[str, ...] = ()
    #: for a marker several formats declare: what comes next (after whitespace) when it is this
    #: format's; ``""`` also takes a reply that ends right after the marker. Exactly one of the
    #: formats sharing a marker leaves this empty: it takes whatever the others do not.
    marker_follows: tuple[str, ...] = ()
    #: reasoning start markers of this format alone (``<think>`` is everyone's and is followed
    #: by the detection itself): seeing one picks the format too
    reasoning_markers: tuple[str, ...] = ()
    #: whether this format's marker inside ``<think>`` reasoning is a (drafted) call; when not,
    #: the marker there is reasoning text and detection goes on
    calls_in_reasoning: bool = True
    #: bytes that can begin one of its markers: a plain content delta without any of them is
    #: forwarded unparsed (``ChatMender.wants``). Single characters only, since a marker may be
    #: split across deltas.
    triggers: tuple[bytes, ...] = (b"<",)
    #: ``toolmend doctor``: vLLM's ``--tool-call-parser`` for this format (None: vLLM has none)
    vllm_parser: str | None = None
    #: other vLLM parser names that read this format; a launch given one runs toolmend with it
    vllm_aliases: tuple[str, ...] = ()
    #: one call to a tool ``write`` as the model writes it, for the benchmarks and the registry
    #: test: ``$ARGS`` stands for its whole arguments object, ``$VALUE`` for the value of its
    #: ``items`` argument, ``$TEXT`` for the text of its ``text`` argument (one of the three)
    sample: str = ""

    def __post_init__(self) -> None:
        where = f"tool format {self.name!r}"
        if getattr(self.parser, "name", None) != self.name:
            raise ValueError(f"{where}: its parser {self.parser.__name__} is named "
                             f"{getattr(self.parser, 'name', None)!r}")
        for pattern in self.models:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{where}: model pattern {pattern!r}: {e}") from None
        if any(len(t) != 1 or not isinstance(t, bytes) for t in self.triggers):
            raise ValueError(f"{where}: triggers must be single bytes, got {self.triggers!r}")
        if self.marker_follows and not self.markers:
            raise ValueError(f"{where}: marker_follows without markers")
        if self.sample and sum(self.sample.count(p)
                               for p in (SAMPLE_ARGS, SAMPLE_VALUE, SAMPLE_TEXT)) != 1:
            raise ValueError(f"{where}: the sample needs exactly one of "
                             f"{SAMPLE_ARGS}, {SAMPLE_VALUE}, {SAMPLE_TEXT}")

    def sample_call(self, args: str, value: str, text: str) -> str:
        """:attr:`sample` with its placeholder filled in: ``args`` is a JSON object, ``value``
        the JSON value of ``items``, ``text`` the raw text of ``text``."""
        return (self.sample.replace(SAMPLE_ARGS, args).replace(SAMPLE_VALUE, value)
                .replace(SAMPLE_TEXT, text))
