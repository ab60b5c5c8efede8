"""Prompt rendering and tool-call constraints for the embedded backend.

The bundled Gemma 3 270M GGUF is a base model and carries no chat template, so the embedded
backend ships its own: Gemma's turn markers around a Hermes-style tool protocol (a ``<tools>``
block in the system text, calls as ``<tool_call>{json}</tool_call>``, results as
``<tool_response>``). Hermes is the format toolmend's own marker parser reads back, so text that
the model writes freely (``tool_choice: "auto"``) turns into structured calls downstream, and
the forced path (a named or single ``required`` tool) can prefill the very same opening so the
grammar only has to produce the arguments.

Everything here is pure: messages and tools in, strings and schemas out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

TURN_START = "<start_of_turn>"
TURN_END = "<end_of_turn>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"

#: Text stops for the built-in template: a base model happily writes the next turn itself.
BUILTIN_STOPS = (TURN_END, TURN_START)

TOOLS_PREAMBLE = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_POSTAMBLE = (
    "\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


class ToolChoiceError(ValueError):
    """The request's ``tools`` / ``tool_choice`` cannot be honoured (a client error)."""


def message_text(content: Any) -> str:
    """The text of a message's ``content``: a string, or the text parts of a parts list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and p.get("type", "text") == "text")
    return str(content)


def tools_block(tools: list[dict[str, Any]]) -> str:
    lines = [json.dumps(t, ensure_ascii=False) for t in tools]
    return TOOLS_PREAMBLE + "\n".join(lines) + TOOLS_POSTAMBLE


def _call_text(call: dict[str, Any]) -> str:
    fn = call.get("function") or {}
    args: Any = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            pass  # keep the string: the history shows what was actually sent
    doc = {"name": fn.get("name", ""), "arguments": args}
    return f"{TOOL_CALL_OPEN}\n{json.dumps(doc, ensure_ascii=False)}\n{TOOL_CALL_CLOSE}"


def render_builtin(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                   prefill: str = "") -> str:
    """Render a conversation with the built-in Gemma-turns + Hermes-tools template.

    Gemma has no system role: like its official template, the system text (and the tools
    block) opens the first user turn. Consecutive tool results share one user turn, the way
    Hermes groups them. The prompt ends with an open model turn, plus ``prefill``.
    """
    system_parts: list[str] = []
    rest: list[dict[str, Any]] = []
    for m in messages:
        if m.get("role") in ("system", "developer") and not rest:
            system_parts.append(message_text(m.get("content")))
        else:
            rest.append(m)
    if tools:
        system_parts.append(tools_block(tools))
    preface = "\n\n".join(p for p in system_parts if p)

    turns: list[tuple[str, str]] = []  # (role, text), merged as we go
    for m in rest:
        role = m.get("role")
        if role == "assistant":
            parts = [message_text(m.get("content"))]
            parts.extend(_call_text(c) for c in m.get("tool_calls") or () if isinstance(c, dict))
            turns.append(("model", "\n".join(p for p in parts if p)))
        elif role == "tool":
            text = f"{TOOL_RESPONSE_OPEN}\n{message_text(m.get('content'))}\n{TOOL_RESPONSE_CLOSE}"
            if turns and turns[-1][0] == "user" and turns[-1][1].endswith(TOOL_RESPONSE_CLOSE):
                turns[-1] = ("user", turns[-1][1] + "\n" + text)
            else:
                turns.append(("user", text))
        else:  # user, and any later system message (shown to the model as user text)
            turns.append(("user", message_text(m.get("content"))))
    if preface:
        if turns and turns[0][0] == "user":
            turns[0] = ("user", preface + "\n\n" + turns[0][1])
        else:
            turns.insert(0, ("user", preface))
    out = [f"{TURN_START}{role}\n{text}{TURN_END}\n" for role, text in turns]
    out.append(f"{TURN_START}model\n{prefill}")
    return "".join(out)


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How one request uses its tools.

    ``mode`` is ``none`` (no tools in play), ``auto`` (tools rendered into the prompt, the model
    writes freely), ``named`` (exactly one function, arguments constrained to its schema) or
    ``any`` (``required`` with several tools: ``{"name", "arguments"}`` constrained to one of
    them).
    """

    mode: str
    tools: tuple[dict[str, Any], ...] = ()
    name: str | None = None
    schema: dict[str, Any] | None = None


def _functions(tools: Any) -> dict[str, dict[str, Any]]:
    if tools is None:
        return {}
    if not isinstance(tools, list):
        raise ToolChoiceError("'tools' must be a list")
    out: dict[str, dict[str, Any]] = {}
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ToolChoiceError("each tool needs a 'function' with a 'name'")
        out[fn["name"]] = fn
    return out


def parameters_schema(fn: dict[str, Any]) -> dict[str, Any]:
    schema = fn.get("parameters")
    if not isinstance(schema, dict) or not schema:
        return {"type": "object"}
    return schema


def plan_tools(body: dict[str, Any]) -> ToolPlan:
    """Decide from ``tools`` and ``tool_choice`` how to prompt and what to constrain."""
    fns = _functions(body.get("tools"))
    tools = tuple(t for t in body.get("tools") or ())
    choice = body.get("tool_choice")
    if not fns or choice == "none":
        return ToolPlan("none")
    if isinstance(choice, dict):
        fn_name = (choice.get("function") or {}).get("name")
        if not isinstance(fn_name, str):
            raise ToolChoiceError("a named tool_choice needs function.name")
        if fn_name not in fns:
            raise ToolChoiceError(f"tool_choice names {fn_name!r}, which is not in 'tools'")
        return ToolPlan("named", tools, fn_name, parameters_schema(fns[fn_name]))
    if choice == "required":
        if len(fns) == 1:
            (fn_name, fn), = fns.items()
            return ToolPlan("named", tools, fn_name, parameters_schema(fn))
        any_of = [{"type": "object",
                   "properties": {"name": {"const": n}, "arguments": parameters_schema(fn)},
                   "required": ["name", "arguments"]} for n, fn in fns.items()]
        return ToolPlan("any", tools, None, {"anyOf": any_of})
    if choice not in (None, "auto"):
        raise ToolChoiceError(f"unsupported tool_choice {choice!r}")
    return ToolPlan("auto", tools)


def forced_prefill(plan: ToolPlan) -> str:
    """The opening the model's turn is given so the grammar only writes what is left."""
    if plan.mode == "named":
        return f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(plan.name)}, "arguments": '
    if plan.mode == "any":
        return f"{TOOL_CALL_OPEN}\n"
    return ""


def response_format_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a ``response_format`` asks for, if any."""
    rf = body.get("response_format")
    if not isinstance(rf, dict):
        return None
    if rf.get("type") == "json_object":
        return {"type": "object"}
    if rf.get("type") == "json_schema":
        js = rf.get("json_schema") or {}
        schema = js.get("schema") if isinstance(js, dict) else None
        return schema if isinstance(schema, dict) else {"type": "object"}
    return None


class StopScanner:
    """Finds stop strings in streamed text, holding back only a suffix that could start one.

    Holding back the shortest possible suffix keeps text flowing token by token while making
    sure no client ever sees half of a stop string.
    """

    __slots__ = ("_pending", "_stops")

    def __init__(self, stops: list[str] | tuple[str, ...]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        buf = self._pending + text
        if not self._stops:
            self._pending = ""
            return buf, False
        cut = -1
        for s in self._stops:
            i = buf.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            self._pending = ""
            return buf[:cut], True
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out
