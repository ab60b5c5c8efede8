"""Anthropic Messages requests as OpenAI chat bodies, sans-I/O.

toolmend answers ``POST /v1/messages`` (Claude Code, the Anthropic SDKs) in front of backends
that speak OpenAI chat completions. This module turns the Messages request into the internal
chat body, so the request goes through exactly the same mending, validation, fair queuing and
tracing as ``/v1/chat/completions``; the reply side is ``anthropic_emit.py``.

The mapping, and what it cannot carry:

- ``system`` (a string or text blocks) becomes the first system message. Claude Code's first
  system block, ``x-anthropic-billing-header: ...``, is billing metadata for Anthropic's own
  API and changes with every conversation; at the very start of the prompt it would defeat the
  backend's prefix cache, so it is dropped.
- A ``system`` message inside ``messages`` (Claude Code's mid-conversation system turns) is
  folded into the user turn around it: most chat templates refuse a system message anywhere
  but first, or roles that do not alternate. Consecutive turns of one role are merged for the
  same reason (the Messages API merges them too).
- ``tool_result`` blocks become ``tool`` messages right after the assistant's calls (the order
  OpenAI requires), the rest of that user turn after them; images in a tool result go into that
  user turn, since a ``tool`` message carries text only. ``is_error`` prefixes ``Error: ``.
- ``thinking`` blocks come back to the backend (as ``reasoning_content``) only when their
  signature is toolmend's own (:func:`signed_thinking`); a foreign or altered one is dropped,
  never refused. ``redacted_thinking`` is Anthropic's own encryption: always dropped.
- ``tools`` become functions; Anthropic's server tools (``web_search_...``, typed tools with no
  ``input_schema``) cannot run on a local backend and are dropped. ``tool_choice`` maps to
  ``auto`` / ``required`` / a named function / ``none``; ``disable_parallel_tool_use`` to
  ``parallel_tool_calls: false``.
- ``thinking``: ``disabled`` (or no ``thinking``: off, as on Anthropic's API) becomes the
  template switch ``chat_template_kwargs.enable_thinking: false``; ``enabled`` and ``adaptive``
  leave the backend's default on (``budget_tokens`` cannot be honoured) and show its reasoning
  as thinking blocks.
- What a local backend cannot honour is accepted and ignored, never refused: cache-control
  marks, ``context_management``, ``output_config``, citations, ``defer_loading``, unknown
  top-level fields. :attr:`Translated.ignored` lists them for the response header.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

#: Claude Code's billing line, the first system block of every request it sends.
BILLING_PREFIX = "x-anthropic-billing-header:"
#: HMAC purpose label of thinking signatures (see ``proxy/server/signing.py``).
THINKING_PURPOSE = "anthropic-thinking"
#: A signature over thinking text the client was shown: ``tm1.<hmac>``.
SIG_SHOWN = "tm1."
#: A signature that carries hidden thinking (``display: "omitted"``): ``tm1h.<b64 text>.<hmac>``.
SIG_HIDDEN = "tm1h."

#: Top-level fields read here; any other is ignored (and listed).
KNOWN_FIELDS = frozenset({
    "model", "messages", "system", "max_tokens", "stop_sequences", "temperature", "top_p",
    "top_k", "metadata", "stream", "tools", "tool_choice", "thinking"})
#: Accepted and ignored without comment: they change nothing a local backend does.
QUIET_FIELDS = frozenset({"context_management", "output_config", "service_tier",
                          "cache_control", "container", "mcp_servers", "inference_geo"})

Mac = Callable[[bytes], str]
Check = Callable[[bytes, str], bool]


class AnthropicRequestError(ValueError):
    """The Messages request is malformed; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class Translated:
    """The internal chat body and what the reply side needs to know about the request."""

    body: dict[str, Any]
    stream: bool
    #: the client asked for thinking: reasoning goes out as thinking blocks
    thinking: bool = False
    #: ``display: "omitted"``: thinking blocks carry no text (it rides in the signature)
    hide_thinking: bool = False
    stop_sequences: tuple[str, ...] = ()
    #: what was accepted and ignored (fields, block types), for the response header
    ignored: list[str] = field(default_factory=list)
    #: thinking blocks not passed on: foreign or altered signatures, redacted thinking
    dropped_thinking: int = 0


# --- thinking signatures ------------------------------------------------------------------------
def thinking_signature(text: str, mac: Mac, *, hidden: bool = False) -> str:
    """The ``signature`` of a thinking block toolmend hands out: an HMAC over the text; for a
    hidden block the text itself rides along (base64), so it can still come back."""
    data = text.encode("utf-8", "surrogatepass")
    if hidden:
        return SIG_HIDDEN + base64.urlsafe_b64encode(data).decode() + "." + mac(data)
    return SIG_SHOWN + mac(data)


def signed_thinking(block: dict[str, Any], check: Check) -> str | None:
    """The reasoning text of a thinking block that came back, or None when its signature is
    not toolmend's own over that text (another server's, altered, missing)."""
    sig = block.get("signature")
    if not isinstance(sig, str):
        return None
    if sig.startswith(SIG_HIDDEN):
        packed, _, mac = sig[len(SIG_HIDDEN):].rpartition(".")
        try:
            data = base64.b64decode(packed.encode("ascii"), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            return None
        if not check(data, mac):
            return None
        return data.decode("utf-8", "replace")
    text = block.get("thinking")
    if not sig.startswith(SIG_SHOWN) or not isinstance(text, str):
        return None
    if not check(text.encode("utf-8", "surrogatepass"), sig[len(SIG_SHOWN):]):
        return None
    return text


# --- helpers -------------------------------------------------------------------------------------
def _err(message: str, param: str) -> AnthropicRequestError:
    return AnthropicRequestError(f"{param}: {message}", param)


def _number(body: dict[str, Any], name: str) -> float | int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _err("must be a number", name)
    return v


def _image_url(block: dict[str, Any], where: str) -> dict[str, Any]:
    src = block.get("source")
    if not isinstance(src, dict):
        raise _err("an image block needs a 'source' object", f"{where}.source")
    kind = src.get("type")
    if kind == "base64":
        mt, data = src.get("media_type"), src.get("data")
        if not isinstance(mt, str) or not isinstance(data, str):
            raise _err("a base64 image source needs 'media_type' and 'data' strings",
                       f"{where}.source")
        url = f"data:{mt};base64,{data}"
    elif kind == "url":
        url = src.get("url")
        if not isinstance(url, str):
            raise _err("a url image source needs a 'url' string", f"{where}.source.url")
    else:
        raise _err(f"image source type {kind!r} is not supported here (base64 or url)",
                   f"{where}.source.type")
    return {"type": "image_url", "image_url": {"url": url}}


def _document_text(block: dict[str, Any], where: str) -> str:
    """A document block as text: plain-text and content sources only. A PDF cannot be read by
    a chat backend, and converting it is not toolmend's business: a clear 400."""
    src: Any = block.get("source")
    kind = src.get("type") if isinstance(src, dict) else None
    title = block.get("title")
    head = f"{title}\n\n" if isinstance(title, str) and title else ""
    if kind == "text" and isinstance(src.get("data"), str):
        return head + src["data"]
    if kind == "content" and isinstance(src.get("content"), str):
        return head + src["content"]
    if kind == "content" and isinstance(src.get("content"), list):
        return head + "\n\n".join(b["text"] for b in src["content"]
                                    if isinstance(b, dict) and isinstance(b.get("text"), str))
    raise _err(f"document source type {kind!r} is not supported: the backend reads text and "
               "images only (send the document's text)", f"{where}.source")


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _err("must be a string or an array of content blocks", f"{where}.content")
    for j, b in enumerate(content):
        if not isinstance(b, dict) or not isinstance(b.get("type"), str):
            raise _err("must be an object with a string 'type'", f"{where}.content[{j}]")
    return content


def _text_of(b: dict[str, Any], where: str) -> str:
    t = b.get("text")
    if not isinstance(t, str):
        raise _err("a text block needs a 'text' string", f"{where}.text")
    return t


class _Builder:
    """Collects the OpenAI messages, merging consecutive turns of one role."""

    def __init__(self, check: Check, out: Translated) -> None:
        self.check = check
        self.out = out
        self.system: list[str] = []
        self.messages: list[dict[str, Any]] = []
        self.user_parts: list[dict[str, Any]] = []  # the user turn being built

    def ignore(self, what: str) -> None:
        if what not in self.out.ignored:
            self.out.ignored.append(what)

    # user side ---------------------------------------------------------------------------------
    def flush_user(self) -> None:
        parts, self.user_parts = self.user_parts, []
        if not parts:
            return
        if all(p["type"] == "text" for p in parts):
            content: Any = "\n\n".join(p["text"] for p in parts)
        else:
            content = parts
        self.messages.append({"role": "user", "content": content})

    def user(self, content: Any, where: str) -> None:
        tools: list[dict[str, Any]] = []
        parts: list[dict[str, Any]] = []
        for j, b in enumerate(_blocks(content, where)):
            at = f"{where}.content[{j}]"
            kind = b["type"]
            if kind == "text":
                parts.append({"type": "text", "text": _text_of(b, at)})
            elif kind == "image":
                parts.append(_image_url(b, at))
            elif kind == "tool_result":
                tools.append(self.tool_result(b, at, parts))
            elif kind == "document":
                parts.append({"type": "text", "text": _document_text(b, at)})
            elif kind == "search_result":
                parts.append({"type": "text", "text": _search_result_text(b)})
            elif kind == "tool_use":
                raise _err("a tool_use block belongs in an assistant message", f"{at}.type")
            elif kind in ("thinking", "redacted_thinking"):
                self.out.dropped_thinking += 1
            else:
                self.ignore(f"{kind} blocks")
        if tools:
            # tool results answer the assistant's calls: they go right after them, and what
            # else the user said (collected so far, and in this turn) follows
            pending, self.user_parts = self.user_parts, []
            self.messages.extend(tools)
            self.user_parts = pending
        self.user_parts.extend(parts)

    def tool_result(self, b: dict[str, Any], at: str,
                    images: list[dict[str, Any]]) -> dict[str, Any]:
        tid = b.get("tool_use_id")
        if not isinstance(tid, str) or not tid:
            raise _err("a tool_result needs a 'tool_use_id' string", f"{at}.tool_use_id")
        content = b.get("content")
        texts: list[str] = []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for k, item in enumerate(content):
                c: Any = item
                cat = f"{at}.content[{k}]"
                kind = c.get("type") if isinstance(c, dict) else None
                if kind == "text":
                    texts.append(_text_of(c, cat))
                elif kind == "image":
                    images.append(_image_url(c, cat))
                    texts.append("(image attached below)")
                elif kind == "tool_reference":
                    texts.append(f"Tool loaded: {c.get('tool_name')}")
                elif kind == "document":
                    texts.append(_document_text(c, cat))
                elif kind == "search_result":
                    texts.append(_search_result_text(c))
                else:
                    self.ignore(f"{kind} blocks in tool results")
        elif content is not None:
            raise _err("must be a string or an array of blocks", f"{at}.content")
        text = "\n\n".join(texts)
        if b.get("is_error") is True:
            text = "Error: " + text
        return {"role": "tool", "tool_call_id": tid, "content": text}

    # assistant side ---------------------------------------------------------------------------
    def assistant(self, content: Any, where: str) -> None:
        self.flush_user()
        texts: list[str] = []
        reasoning: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, b in enumerate(_blocks(content, where)):
            at = f"{where}.content[{j}]"
            kind = b["type"]
            if kind == "text":
                texts.append(_text_of(b, at))
            elif kind == "tool_use":
                calls.append(_tool_call(b, at))
            elif kind == "thinking":
                text = signed_thinking(b, self.check)
                if text is None:
                    self.out.dropped_thinking += 1
                elif text:
                    reasoning.append(text)
            elif kind == "redacted_thinking":
                self.out.dropped_thinking += 1
            else:  # server tools' blocks (web search...), and anything newer
                self.ignore(f"{kind} blocks")
        prev = self.messages[-1] if self.messages else None
        if prev is not None and prev["role"] == "assistant" and not prev.get("tool_calls"):
            # two assistant turns in a row are one turn (the Messages API reads them so)
            if texts:
                prev["content"] = (prev.get("content") or "") + "".join(texts)
            if reasoning:
                prev["reasoning_content"] = (prev.get("reasoning_content") or "") + \
                    "".join(reasoning)
            if calls:
                prev["tool_calls"] = calls
            return
        msg: dict[str, Any] = {"role": "assistant",
                               "content": "".join(texts) if texts or not calls else None}
        if reasoning:
            msg["reasoning_content"] = "".join(reasoning)
        if calls:
            msg["tool_calls"] = calls
        self.messages.append(msg)

    # system turns -----------------------------------------------------------------------------
    def system_turn(self, content: Any, where: str) -> None:
        texts = [_text_of(b, f"{where}.content[{j}]")
                 for j, b in enumerate(_blocks(content, where)) if b["type"] == "text"]
        if not texts:
            return
        if not self.messages and not self.user_parts:
            self.system.extend(texts)  # before the conversation: part of the system prompt
        else:
            self.user_parts.extend({"type": "text", "text": t} for t in texts)


def _search_result_text(b: dict[str, Any]) -> str:
    parts = [b.get("title"), b.get("source")]
    content = b.get("content")
    if isinstance(content, list):
        parts.extend(c.get("text") for c in content if isinstance(c, dict))
    return "\n".join(p for p in parts if isinstance(p, str) and p)


def _tool_call(b: dict[str, Any], at: str) -> dict[str, Any]:
    tid, name = b.get("id"), b.get("name")
    if not isinstance(tid, str) or not tid:
        raise _err("a tool_use needs an 'id' string", f"{at}.id")
    if not isinstance(name, str) or not name:
        raise _err("a tool_use needs a 'name' string", f"{at}.name")
    args = b.get("input", {})
    if not isinstance(args, dict):
        raise _err("must be an object", f"{at}.input")
    return {"id": tid, "type": "function",
            "function": {"name": name, "arguments": orjson.dumps(args).decode()}}


def _system_text(system: Any, out: Translated) -> list[str]:
    if system is None:
        return []
    if isinstance(system, str):
        return [system] if system else []
    if not isinstance(system, list):
        raise _err("must be a string or an array of text blocks", "system")
    texts = []
    for i, b in enumerate(system):
        if not isinstance(b, dict) or b.get("type") != "text":
            raise _err("must be a text block", f"system[{i}]")
        text = _text_of(b, f"system[{i}]")
        if text.startswith(BILLING_PREFIX):
            continue
        texts.append(text)
    return texts


def _tools(tools: Any, b: _Builder) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _err("must be an array", "tools")
    out = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict):
            raise _err("must be an object", where)
        kind = t.get("type")
        schema = t.get("input_schema")
        if kind not in (None, "custom") and schema is None:
            b.ignore(f"server tool {t.get('name') or kind}")  # web search, code execution...
            continue
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise _err("is required and must be a string", f"{where}.name")
        if not isinstance(schema, dict):
            raise _err("is required and must be a JSON Schema object", f"{where}.input_schema")
        fn: dict[str, Any] = {"name": name, "parameters": schema}
        desc = t.get("description")
        if isinstance(desc, str) and desc:
            fn["description"] = desc
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any, body: dict[str, Any]) -> None:
    if not isinstance(choice, dict):
        raise _err("must be an object with a 'type'", "tool_choice")
    kind = choice.get("type")
    if kind == "auto":
        body["tool_choice"] = "auto"
    elif kind == "any":
        body["tool_choice"] = "required"
    elif kind == "none":
        body["tool_choice"] = "none"
    elif kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise _err("a tool_choice of type 'tool' needs a 'name'", "tool_choice.name")
        body["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        raise _err(f"must be one of 'auto', 'any', 'tool', 'none', not {kind!r}",
                   "tool_choice.type")
    if choice.get("disable_parallel_tool_use") is True:
        body["parallel_tool_calls"] = False


def _thinking(thinking: Any, out: Translated, body: dict[str, Any]) -> None:
    enabled = False
    if thinking is not None:
        if not isinstance(thinking, dict):
            raise _err("must be an object with a 'type'", "thinking")
        kind = thinking.get("type")
        if kind in ("enabled", "adaptive"):
            enabled = True
            budget = thinking.get("budget_tokens")
            if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
                raise _err("must be an integer", "thinking.budget_tokens")
            out.hide_thinking = thinking.get("display") == "omitted"
        elif kind != "disabled":
            raise _err(f"must be 'enabled', 'adaptive' or 'disabled', not {kind!r}",
                       "thinking.type")
    out.thinking = enabled
    if not enabled:
        # off, as on Anthropic's API. On, the switch is left to the backend's default: toolmend
        # reads ``enable_thinking: true`` as "the template opens reasoning in the prompt", which
        # is not true of every template (and a model that cannot reason would have its whole
        # answer read as reasoning); the model-name tables decide instead (parsers/reasoning.py)
        body["chat_template_kwargs"] = {"enable_thinking": False}


def messages_to_openai(body: dict[str, Any], check: Check, *,
                       count_only: bool = False) -> Translated:
    """A Messages request as an OpenAI chat body (``stream`` as the client asked; the front
    streams from the backend either way). ``check(data, mac)`` verifies a thinking signature.
    ``count_only``: for ``count_tokens``, where ``max_tokens`` is not required."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _err("must be a boolean", "stream")
    out = Translated(body={}, stream=stream)
    b = _Builder(check, out)
    chat = out.body
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _err("must be a string", "model")
    if model:
        chat["model"] = model
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        if not count_only:
            raise _err("is required", "max_tokens")
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _err("must be a positive integer", "max_tokens")
    else:
        chat["max_tokens"] = max_tokens
    b.system.extend(_system_text(body.get("system"), out))
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _err("is required and must be a non-empty array", "messages")
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _err("must be an object", where)
        role = m.get("role")
        if role == "user":
            b.user(m.get("content"), where)
        elif role == "assistant":
            b.assistant(m.get("content"), where)
        elif role == "system":
            b.system_turn(m.get("content"), where)
        else:
            raise _err(f"must be 'user' or 'assistant', not {role!r}", f"{where}.role")
    b.flush_user()
    messages = b.messages
    if b.system:
        messages.insert(0, {"role": "system", "content": "\n\n".join(b.system)})
    chat["messages"] = messages
    tools = body.get("tools")
    if tools is not None:
        converted = _tools(tools, b)
        if converted:
            chat["tools"] = converted
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], chat)
        if "tools" not in chat and chat["tool_choice"] != "none":
            del chat["tool_choice"]  # nothing to choose from (every tool was a server tool)
            chat.pop("parallel_tool_calls", None)
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _err("must be an array of strings", "stop_sequences")
        if stops:
            chat["stop"] = list(stops)
            out.stop_sequences = tuple(stops)
    for name in ("temperature", "top_p"):
        v = _number(body, name)
        if v is not None:
            chat[name] = v
    top_k = body.get("top_k")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise _err("must be an integer", "top_k")
        chat["top_k"] = top_k
    md = body.get("metadata")
    if md is not None and not isinstance(md, dict):
        raise _err("must be an object", "metadata")
    _thinking(body.get("thinking"), out, chat)
    for key in body:
        if key not in KNOWN_FIELDS and key not in QUIET_FIELDS:
            b.ignore(key)
    return out


# --- the model list ---------------------------------------------------------------------------
def _rfc3339(epoch: Any) -> str:
    t = epoch if isinstance(epoch, int | float) and not isinstance(epoch, bool) else 0
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def anthropic_model(m: dict[str, Any]) -> dict[str, Any]:
    """One OpenAI model object as Anthropic's."""
    mid = m.get("id") if isinstance(m.get("id"), str) else ""
    return {"type": "model", "id": mid, "display_name": mid,
            "created_at": _rfc3339(m.get("created"))}


def anthropic_models(doc: Any) -> dict[str, Any]:
    """The backend's OpenAI ``/v1/models`` list in the shape Anthropic clients read."""
    data = doc.get("data") if isinstance(doc, dict) else None
    models = [anthropic_model(m) for m in data or () if isinstance(m, dict)
              and isinstance(m.get("id"), str)]
    return {"data": models, "has_more": False,
            "first_id": models[0]["id"] if models else None,
            "last_id": models[-1]["id"] if models else None}
