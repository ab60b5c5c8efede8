"""Where a reply's reasoning goes, and whether the reply starts inside it. Sans-I/O.

Two decisions the mender needs before it reads a reply:

* **Does the reply start inside reasoning?** Many chat templates write the opening ``<think>``
  into the prompt, so the model's output only closes it with ``</think>``. Nothing in the output
  says so until that marker arrives, and by then the reasoning has streamed as content. toolmend
  decides it from explicit signals only, never by guessing from the text
  (:class:`ReasoningSignals`).
* **Which field does the reasoning toolmend separates go to?** (:data:`FIELDS`). A server's own
  reasoning field is passed through as it came; this is only for reasoning toolmend split from
  content itself.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: where reasoning toolmend separates from content goes (the per-server option
#: ``reasoning_field`` and the per-request header ``X-Toolmend-Reasoning``)
FIELDS = ("reasoning_content", "reasoning", "drop", "content")
DEFAULT_FIELD = "reasoning_content"
#: the server's own reasoning fields, passed through under their own name
SERVER_FIELDS = ("reasoning_content", "reasoning")

#: models whose chat templates always open reasoning in the prompt, whatever the request says
ALWAYS_OPEN: tuple[str, ...] = (
    r"thinking-2507",  # Qwen3-*-Thinking-2507
    r"deepseek-?r1",  # DeepSeek-R1, R1-0528 and the R1 distills
    r"qwq",  # QwQ-32B
    r"minimax-?m2",  # MiniMax-M2
    r"ernie-?4[._]5.*thinking",  # ERNIE-4.5-*-Thinking
    r"step-?3(?:(?:\.|p)[5-9])?(?!\d)",  # Step-3, Step-3.5 and later: <think> always prefilled
    r"command-?a-?(?:plus|\+)",  # Command A+ (cohere_command4): <|START_THINKING|> prefilled
)
#: models whose templates open reasoning unless the request turns thinking off
OPEN_BY_DEFAULT: tuple[str, ...] = (
    r"qwen3\.[5-9]",  # Qwen3.5 and later place <think> in the prompt
)
_ALWAYS = [re.compile(p, re.I) for p in ALWAYS_OPEN]
_DEFAULT = [re.compile(p, re.I) for p in OPEN_BY_DEFAULT]
#: the ``chat_template_kwargs`` switches that turn thinking on or off
TEMPLATE_SWITCHES = ("enable_thinking", "thinking")


@functools.lru_cache(maxsize=1024)
def _always_open(name: str) -> bool:
    """A model name :data:`ALWAYS_OPEN` matches (cached: one name per request, few names)."""
    return any(p.search(name) for p in _ALWAYS)


@functools.lru_cache(maxsize=1024)
def _open_by_default(name: str) -> bool:
    """A model name :data:`OPEN_BY_DEFAULT` matches (cached as :func:`_always_open`)."""
    return any(p.search(name) for p in _DEFAULT)


def _globbed(globs: Iterable[str], names: Iterable[str | None]) -> bool:
    return any(fnmatch.fnmatchcase(n.lower(), g.lower()) for g in globs for n in names if n)


def template_switch(kwargs: Any) -> bool | None:
    """The request's own word from ``chat_template_kwargs``: ``enable_thinking`` or
    ``thinking`` as a boolean, or None when it says nothing."""
    if not isinstance(kwargs, Mapping):
        return None
    for key in TEMPLATE_SWITCHES:
        value = kwargs.get(key)
        if isinstance(value, bool):
            return value
    return None


@dataclass(frozen=True, slots=True)
class ReasoningSignals:
    """The explicit signals that say a reply starts inside reasoning, in order of precedence:

    1. per-model configuration (``reasoning_open_models`` / ``reasoning_closed_models``,
       shell-style patterns on the model name): the operator knows the template;
    2. the model-name table :data:`ALWAYS_OPEN` (templates that open reasoning whatever the
       request says);
    3. the request's ``chat_template_kwargs`` (``enable_thinking``, ``thinking``);
    4. the model-name table :data:`OPEN_BY_DEFAULT`;
    5. otherwise the reply starts outside reasoning.
    """

    request: bool | None = None
    open_models: tuple[str, ...] = ()
    closed_models: tuple[str, ...] = ()

    def decide(self, *models: str | None) -> tuple[bool, str]:
        """Whether a reply from one of ``models`` (the upstream's name for it, the request's)
        starts inside reasoning, and the signal that said so (for notes and traces)."""
        if _globbed(self.closed_models, models):
            return False, "reasoning_closed_models"
        if _globbed(self.open_models, models):
            return True, "reasoning_open_models"
        if any(_always_open(m) for m in models if m):
            return True, "model name"
        if self.request is not None:
            return self.request, "chat_template_kwargs"
        if any(_open_by_default(m) for m in models if m):
            return True, "model name"
        return False, ""


def field_for(asked: str | None, configured: str) -> str:
    """The field for separated reasoning: the request's header when it names one of
    :data:`FIELDS`, else the server's configured one."""
    if asked:
        asked = asked.strip().lower()
        if asked in FIELDS:
            return asked
    return configured if configured in FIELDS else DEFAULT_FIELD
