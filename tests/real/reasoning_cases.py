"""Replies forced on the real vLLM server (qwen3 reasoning parser on) for the reasoning tests.

Each case is the whole text the model is made to write (``structured_outputs`` regex; see
``helpers.literal``) and what the agent must get through toolmend: the decision table of the
README ("A call counts when the model meant it"), row by row, where the real server can be made
to produce the row. Used by ``test_vllm_reasoning.py`` against the real server, and by
``record_vllm.py``, which saves the server's real streams for the fast suite
(``fixtures/vllm/reasoning.json``).

Row 6 of the table (reasoning already in a server's reasoning field, containing call text)
cannot be forced here: vLLM's qwen3 reasoning parser never leaves call text in its reasoning
field, it ends the reasoning at the call instead (which is the bug this proves fixed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .helpers import ASK, TOOLS, literal


def call(name: str, city: str) -> str:
    """A call as the Hermes-style template writes it."""
    return f'<tool_call>\n{{"name": "{name}", "arguments": {{"city": "{city}"}}}}\n</tool_call>'


DRAFT = call("get_time", "Bergen")  # the call the model only considers
MEANT = call("get_weather", "Bergen")  # the call it makes


@dataclass(frozen=True)
class Case:
    """One forced reply and the client output expected through toolmend."""

    name: str
    text: str  # everything the model writes
    calls: list[dict[str, Any]]  # the agent's calls: name and parsed arguments
    reasoning: str  # the reasoning field, exactly
    content: str  # content, exactly ("" when none)
    finish: str
    max_tokens: int = 160
    row: int = 0  # the decision table's row (0: not a row, a control)
    body: dict[str, Any] = field(default_factory=dict)  # request fields beyond the defaults
    #: the reply is cut by ``max_tokens`` right after this prefix of ``text`` (the token count
    #: is measured on the server: see :func:`tokens_through`)
    cut_after: str = ""

    def request(self, **extra: Any) -> dict[str, Any]:
        return {"messages": ASK, "tools": TOOLS, "max_tokens": self.max_tokens,
                "temperature": 0, "structured_outputs": {"regex": literal(self.text)},
                **self.body, **extra}


WEATHER = [{"name": "get_weather", "arguments": {"city": "Bergen"}}]

CASES = [
    Case("drafted_call_then_call",
         f"<think>The user asks about the weather. I could call {DRAFT} but no.</think>{MEANT}",
         calls=WEATHER,
         reasoning=f"The user asks about the weather. I could call {DRAFT} but no.",
         content="", finish="tool_calls", row=1),
    Case("drafted_call_then_text",
         f"<think>I could call {DRAFT} but the answer is known.</think>It is sunny in Bergen.",
         calls=[], reasoning=f"I could call {DRAFT} but the answer is known.",
         content="It is sunny in Bergen.", finish="stop", row=2),
    Case("call_then_close_as_final_act",
         f"<think>The user asks about the weather in Bergen. {MEANT}\n</think>",
         calls=WEATHER, reasoning="The user asks about the weather in Bergen. \n",
         content="", finish="tool_calls", row=3),
    Case("call_as_final_act_never_closed",
         f"<think>The user asks about the weather in Bergen. {MEANT}",
         calls=WEATHER, reasoning="The user asks about the weather in Bergen. ",
         content="", finish="tool_calls", row=4),
    Case("drafted_call_then_more_reasoning_cut",
         f"<think>I could call {DRAFT} but I am still thinking about what to do",
         cut_after=f"<think>I could call {DRAFT} but I am",
         calls=[], reasoning=f"I could call {DRAFT} but I am", content="", finish="length",
         row=5),
    Case("drafted_call_then_more_reasoning",
         f"<think>I could call {DRAFT} but I am still thinking about what to do",
         calls=[], reasoning=f"I could call {DRAFT} but I am still thinking about what to do",
         content="", finish="stop", row=5),
    Case("thinking_then_call",
         f"<think>The user wants the weather in Bergen.</think>\n\n{MEANT}",
         calls=WEATHER, reasoning="The user wants the weather in Bergen.", content="\n\n",
         finish="tool_calls"),
    Case("thinking_then_text",
         "<think>No tool is needed for this.</think>It is sunny in Bergen.",
         calls=[], reasoning="No tool is needed for this.", content="It is sunny in Bergen.",
         finish="stop"),
]
BY_NAME = {c.name: c for c in CASES}


def tokens_through(tokens: list[str], prefix: str) -> int:
    """How many of the reply's ``tokens`` (as vLLM's logprobs name them) write ``prefix``:
    the ``max_tokens`` that cuts the reply right after it."""
    text = ""
    for n, tok in enumerate(tokens, 1):
        text += tok
        if text == prefix:
            return n
        if not prefix.startswith(text):
            break
    raise AssertionError(f"no token boundary right after {prefix[-40:]!r}: {tokens}")
