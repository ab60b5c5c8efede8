"""OpenAI Responses API requests as the internal chat request, sans-I/O.

toolmend's Responses front (Codex CLI, the OpenAI Agents SDK's default model) does not have a
pipeline of its own: a ``POST /v1/responses`` body is translated here into an OpenAI chat body,
which goes through the same mending, validation, fair queue and tracing as
``/v1/chat/completions``; the reply side is ``responses_emit.py``.

What the translation does with the parts of a Responses request that chat has no field for:

- ``input`` items are folded into chat messages: an assistant turn is the run of ``reasoning``,
  assistant ``message`` and ``function_call`` items between two other items (one assistant
  message with ``reasoning_content``, ``content`` and ``tool_calls``), each
  ``function_call_output`` a ``tool`` message; ``developer`` is ``system`` (most local chat
  templates know no developer role), and the system messages that open the conversation are
  merged into one, since many templates accept a single leading system message only;
- tools a local backend cannot run (``web_search``, ``file_search``, ``computer_use``, Codex's
  ``namespace`` groups, ``custom`` freeform tools, ``local_shell``, MCP servers...) are left out
  of what the backend sees and listed in :attr:`ChatTranslation.ignored_tools`; history items
  of those tools (``web_search_call``, ``custom_tool_call``...) are left out the same way;
- a ``reasoning`` item's ``encrypted_content`` is opened by the caller's ``open_reasoning``
  (toolmend's own signed values); one that does not open is dropped, never refused, and
  counted in :attr:`ChatTranslation.dropped_reasoning`.

Errors are :class:`ResponsesRequestError` naming the field (``input[3].call_id``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = [
    "IGNORED_ITEM_TYPES",
    "REASONING_EFFORTS",
    "ChatTranslation",
    "ResponsesRequestError",
    "input_items",
    "to_chat",
]

#: ``input`` item types of hosted or client-side tools toolmend leaves out: calls of tools the
#: backend never sees cannot be shown to it either.
IGNORED_ITEM_TYPES = frozenset({
    "web_search_call", "file_search_call", "computer_call", "computer_call_output",
    "image_generation_call", "code_interpreter_call", "local_shell_call",
    "local_shell_call_output", "shell_call", "shell_call_output", "apply_patch_call",
    "apply_patch_call_output", "custom_tool_call", "custom_tool_call_output", "mcp_list_tools",
    "mcp_approval_request", "mcp_approval_response", "mcp_call", "tool_search_call",
    "tool_search_output", "compaction", "compaction_summary",
})
#: ``reasoning.effort`` as the chat ``reasoning_effort`` backends accept (vLLM takes low, medium
#: and high only); ``none`` sends nothing.
REASONING_EFFORTS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high",
                     "xhigh": "high", "none": None}
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "summary_text", "reasoning_text"})
#: request fields toolmend cannot honour; a request that asks for them is refused, not
#: silently answered some other way
_UNSUPPORTED = {
    "background": "background responses are not supported by toolmend; send the request "
                  "without 'background' (or with false)",
    "conversation": "conversations are not supported by toolmend; use previous_response_id "
                    "or send the history in 'input'",
    "prompt": "stored prompt templates are not supported by toolmend; send 'instructions' and "
              "'input'",
}

ReasoningOpener = Callable[[str], "str | None"]


class ResponsesRequestError(ValueError):
    """The Responses request is malformed or asks for something toolmend cannot do;
    ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class ChatTranslation:
    """The chat body, and what the translation left out (reported to the client)."""

    body: dict[str, Any]
    ignored_tools: list[str] = field(default_factory=list)
    ignored_items: list[str] = field(default_factory=list)
    dropped_reasoning: int = 0
    #: the function tools as the client sent them (the response echoes them)
    tools: list[dict[str, Any]] = field(default_factory=list)


def input_items(body: dict[str, Any]) -> list[Any]:
    """``input`` as a list of items (a string is one user message)."""
    raw = body.get("input")
    if raw is None:
        return []
    if isinstance(raw, str):
        return [{"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": raw}]}]
    if not isinstance(raw, list):
        raise ResponsesRequestError("'input' must be a string or an array of items", "input")
    return raw


def to_chat(body: dict[str, Any], *, history: Iterable[Any] = (),
            open_reasoning: ReasoningOpener | None = None) -> ChatTranslation:
    """The chat body for a Responses request. ``history`` holds the items of the response
    named by ``previous_response_id`` (its input, then its output), read before ``input``."""
    for name, why in _UNSUPPORTED.items():
        if body.get(name) not in (None, False):
            raise ResponsesRequestError(why, name)
    out: dict[str, Any] = {}
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise ResponsesRequestError("'model' must be a string", "model")
        out["model"] = model
    tr = ChatTranslation(out)
    builder = _Messages(open_reasoning, tr)
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise ResponsesRequestError("'instructions' must be a string", "instructions")
        if instructions:
            builder.system(instructions)
    for i, item in enumerate(history):
        builder.item(item, f"previous_response_id (item {i})")
    items = input_items(body)
    for i, item in enumerate(items):
        builder.item(item, f"input[{i}]")
    out["messages"] = builder.finish()
    if not out["messages"]:
        raise ResponsesRequestError("'input' is required: send a string or at least one item",
                                    "input")
    _tools(body, out, tr)
    _sampling(body, out)
    return tr


# --- input items --------------------------------------------------------------------------------

class _Messages:
    """Folds items into chat messages; the open assistant turn collects reasoning, text and
    calls until another kind of item closes it."""

    __slots__ = ("_lead", "_open", "_opener", "_out", "_tr")

    def __init__(self, opener: ReasoningOpener | None, tr: ChatTranslation) -> None:
        self._opener = opener
        self._tr = tr
        self._out: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None  # the assistant turn being folded
        self._lead = True  # only system messages so far: they merge into one

    def system(self, text: str) -> None:
        self._close()
        if self._lead and self._out:
            prev = self._out[-1]
            prev["content"] = f"{prev['content']}\n\n{text}"
            return
        self._out.append({"role": "system", "content": text})

    def item(self, item: Any, where: str) -> None:
        if not isinstance(item, dict):
            raise ResponsesRequestError(f"{where} must be an object", where)
        kind = item.get("type")
        if kind is None and "role" in item:
            kind = "message"  # the short form: {"role": ..., "content": ...}
        if kind == "message":
            self._message(item, where)
        elif kind == "function_call":
            self._function_call(item, where)
        elif kind == "function_call_output":
            self._function_output(item, where)
        elif kind == "reasoning":
            self._reasoning(item, where)
        elif kind == "item_reference":
            raise ResponsesRequestError(
                f"{where}: item_reference is not supported by toolmend; send the item itself or "
                "use previous_response_id", f"{where}.type")
        elif isinstance(kind, str) and kind in IGNORED_ITEM_TYPES:
            if kind not in self._tr.ignored_items:
                self._tr.ignored_items.append(kind)
        else:
            raise ResponsesRequestError(
                f"{where}.type must be message, function_call, function_call_output or "
                f"reasoning, not {_short(kind)}", f"{where}.type")

    def finish(self) -> list[dict[str, Any]]:
        self._close()
        return self._out

    # --- one kind of item each ---------------------------------------------------------------
    def _message(self, item: dict[str, Any], where: str) -> None:
        role = item.get("role")
        if role not in _ROLES:
            raise ResponsesRequestError(f"{where}.role must be user, assistant, system or "
                                        f"developer, not {_short(role)}", f"{where}.role")
        content = _content(item.get("content"), where, images=role == "user")
        if role == "assistant":
            turn = self._turn()
            if turn.get("tool_calls"):  # text after calls: a new assistant message
                self._close()
                turn = self._turn()
            text = content if isinstance(content, str) else ""
            turn["content"] = (turn["content"] or "") + text
            return
        if _ROLES[role] == "system":
            self.system(content if isinstance(content, str) else "")
            return
        self._close()
        self._lead = False
        self._out.append({"role": "user", "content": content})

    def _function_call(self, item: dict[str, Any], where: str) -> None:
        call_id = _required_str(item, "call_id", where)
        name = _required_str(item, "name", where)
        args = item.get("arguments", "")
        if args is None:
            args = ""
        if not isinstance(args, str):
            try:
                args = orjson.dumps(args).decode()
            except TypeError:
                raise ResponsesRequestError(f"{where}.arguments must be a JSON text",
                                            f"{where}.arguments") from None
        turn = self._turn()
        turn.setdefault("tool_calls", []).append(
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}})

    def _function_output(self, item: dict[str, Any], where: str) -> None:
        call_id = _required_str(item, "call_id", where)
        output = item.get("output")
        if isinstance(output, list):
            output = _text_of(output, f"{where}.output", "function_call_output")
        elif not isinstance(output, str):
            raise ResponsesRequestError(f"{where}.output must be a string or an array of text "
                                        "parts", f"{where}.output")
        self._close()
        self._lead = False
        self._out.append({"role": "tool", "tool_call_id": call_id, "content": output})

    def _reasoning(self, item: dict[str, Any], where: str) -> None:
        sealed = item.get("encrypted_content")
        text: str | None
        if sealed is not None:
            text = self._opener(sealed) if self._opener and isinstance(sealed, str) else None
            if text is None:  # foreign (another server's) or altered: left out, not refused
                self._tr.dropped_reasoning += 1
                return
        else:
            parts = item.get("content") or item.get("summary") or []
            if not isinstance(parts, list):
                raise ResponsesRequestError(f"{where}.summary must be an array",
                                            f"{where}.summary")
            text = _text_of(parts, where, "reasoning")
        if not text:
            return
        turn = self._turn()
        if turn["content"] or turn.get("tool_calls"):  # reasoning after output: a new turn
            self._close()
            turn = self._turn()
        turn["reasoning_content"] = turn.get("reasoning_content", "") + text

    def _turn(self) -> dict[str, Any]:
        if self._open is None:
            self._lead = False
            self._open = {"role": "assistant", "content": None}
        return self._open

    def _close(self) -> None:
        turn, self._open = self._open, None
        if turn is None:
            return
        if turn["content"] is None and not turn.get("tool_calls"):
            return  # reasoning that led to nothing the backend could be shown
        self._out.append(turn)


def _content(content: Any, where: str, *, images: bool) -> str | list[dict[str, Any]]:
    """A message's content: a string, or (with an image in a user message) chat parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ResponsesRequestError(f"{where}.content must be a string or an array of parts",
                                    f"{where}.content")
    parts: list[dict[str, Any]] = []
    has_image = False
    for j, part in enumerate(content):
        pw = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise ResponsesRequestError(f"{pw} must be an object", pw)
        kind = part.get("type")
        if kind in _TEXT_PARTS or kind == "refusal":
            text = part.get("refusal" if kind == "refusal" else "text")
            if not isinstance(text, str):
                raise ResponsesRequestError(f"{pw}.text must be a string", f"{pw}.text")
            parts.append({"type": "text", "text": text})
        elif kind == "input_image":
            if not images:
                raise ResponsesRequestError(f"{pw}: images are only accepted in user messages",
                                            f"{pw}.type")
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                raise ResponsesRequestError(
                    f"{pw}.image_url is required (a URL or a data: URL); toolmend keeps no "
                    "files, so a file_id cannot be used", f"{pw}.image_url")
            image: dict[str, Any] = {"url": url}
            if isinstance(part.get("detail"), str) and part["detail"] != "auto":
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
            has_image = True
        else:
            raise ResponsesRequestError(f"{pw}.type must be input_text, output_text or "
                                        f"input_image, not {_short(kind)}", f"{pw}.type")
    if has_image:
        return parts
    return "\n".join(p["text"] for p in parts)


def _text_of(parts: list[Any], where: str, what: str) -> str:
    texts: list[str] = []
    for j, part in enumerate(parts):
        pw = f"{where}[{j}]"
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS \
                or not isinstance(part.get("text"), str):
            raise ResponsesRequestError(f"{pw}: only text parts are supported in a {what} item",
                                        pw)
        texts.append(part["text"])
    return "\n".join(texts)


def _required_str(item: dict[str, Any], key: str, where: str) -> str:
    v = item.get(key)
    if not isinstance(v, str) or not v:
        raise ResponsesRequestError(f"{where}.{key} is required and must be a string",
                                    f"{where}.{key}")
    return v


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# --- tools ----------------------------------------------------------------------------------------

def _tools(body: dict[str, Any], out: dict[str, Any], tr: ChatTranslation) -> None:
    tools = body.get("tools")
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise ResponsesRequestError("'tools' must be an array", "tools")
    chat_tools: list[dict[str, Any]] = []
    names: set[str] = set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict):
            raise ResponsesRequestError(f"{where} must be an object", where)
        kind = t.get("type")
        if not isinstance(kind, str) or not kind:
            raise ResponsesRequestError(f"{where}.type is required", f"{where}.type")
        if kind != "function":
            if kind not in tr.ignored_tools:
                tr.ignored_tools.append(kind)
            continue
        name = _required_str(t, "name", where)
        fn: dict[str, Any] = {"name": name}
        desc = t.get("description")
        if desc is not None:
            if not isinstance(desc, str):
                raise ResponsesRequestError(f"{where}.description must be a string",
                                            f"{where}.description")
            fn["description"] = desc
        params = t.get("parameters")
        if params is not None:
            if not isinstance(params, dict):
                raise ResponsesRequestError(f"{where}.parameters must be a JSON Schema object",
                                            f"{where}.parameters")
            fn["parameters"] = params
        chat_tools.append({"type": "function", "function": fn})
        tr.tools.append(t)
        names.add(name)
    choice = _tool_choice(body.get("tool_choice"), names, tr)
    if isinstance(choice, list):  # allowed_tools: a subset of the tools, and a mode
        chat_tools = [t for t in chat_tools if t["function"]["name"] in choice[1]]
        choice = choice[0]
    if not chat_tools:
        return  # nothing callable is left: no tools, no choice (a choice would be refused)
    out["tools"] = chat_tools
    if choice is not None:
        out["tool_choice"] = choice
    ptc = body.get("parallel_tool_calls")
    if ptc is not None:
        if not isinstance(ptc, bool):
            raise ResponsesRequestError("'parallel_tool_calls' must be a boolean",
                                        "parallel_tool_calls")
        out["parallel_tool_calls"] = ptc


def _tool_choice(choice: Any, names: set[str], tr: ChatTranslation) -> Any:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if not isinstance(choice, dict) or not isinstance(choice.get("type"), str):
        raise ResponsesRequestError("'tool_choice' must be auto, none, required or an object "
                                    "with a type", "tool_choice")
    kind = choice["type"]
    if kind == "function":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise ResponsesRequestError("tool_choice.name is required", "tool_choice.name")
        if name not in names:
            raise ResponsesRequestError(f"tool_choice names the function {name!r}, which is not "
                                        "among the request's function tools",
                                        "tool_choice.name")
        return {"type": "function", "function": {"name": name}}
    if kind == "allowed_tools":
        mode = choice.get("mode", "auto")
        allowed = choice.get("tools")
        if mode not in ("auto", "required") or not isinstance(allowed, list):
            raise ResponsesRequestError("tool_choice of type allowed_tools needs mode auto or "
                                        "required and a tools array", "tool_choice")
        keep = {t.get("name") for t in allowed
                if isinstance(t, dict) and t.get("type") == "function"}
        return [mode, keep]
    # a hosted tool (web_search, file_search, ...) or a custom one: left out like the tool
    if kind not in tr.ignored_tools:
        tr.ignored_tools.append(kind)
    return "auto"


# --- sampling and output --------------------------------------------------------------------------

def _sampling(body: dict[str, Any], out: dict[str, Any]) -> None:
    mot = body.get("max_output_tokens")
    if mot is not None:
        if not isinstance(mot, int) or isinstance(mot, bool) or mot < 1:
            raise ResponsesRequestError("'max_output_tokens' must be a positive integer",
                                        "max_output_tokens")
        out["max_tokens"] = mot
    for name in ("temperature", "top_p"):
        v = body.get(name)
        if v is not None:
            if not isinstance(v, int | float) or isinstance(v, bool):
                raise ResponsesRequestError(f"'{name}' must be a number", name)
            out[name] = v
    user = body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise ResponsesRequestError("'user' must be a string", "user")
        out["user"] = user
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise ResponsesRequestError("'reasoning' must be an object", "reasoning")
        effort = reasoning.get("effort")
        if effort is not None:
            if effort not in REASONING_EFFORTS:
                raise ResponsesRequestError(f"reasoning.effort must be one of "
                                            f"{sorted(REASONING_EFFORTS)}", "reasoning.effort")
            if REASONING_EFFORTS[effort]:
                out["reasoning_effort"] = REASONING_EFFORTS[effort]
    text = body.get("text")
    if text is not None:
        if not isinstance(text, dict):
            raise ResponsesRequestError("'text' must be an object", "text")
        rf = _format(text.get("format"))
        if rf is not None:
            out["response_format"] = rf


def _format(fmt: Any) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format``: a JSON schema goes to the backend's
    structured output (vLLM, llama-server and Ollama each constrain to it)."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise ResponsesRequestError("text.format must be an object", "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise ResponsesRequestError("text.format.schema must be a JSON Schema object",
                                        "text.format.schema")
        name = fmt.get("name")
        js: dict[str, Any] = {"name": name if isinstance(name, str) and name else "response",
                              "schema": schema}
        if isinstance(fmt.get("strict"), bool):
            js["strict"] = fmt["strict"]
        if isinstance(fmt.get("description"), str):
            js["description"] = fmt["description"]
        return {"type": "json_schema", "json_schema": js}
    raise ResponsesRequestError("text.format.type must be text, json_object or json_schema",
                                "text.format.type")
