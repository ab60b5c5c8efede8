"""Reading and checking a request body before anything is sent upstream.

Errors name the exact field (``messages[2].role``) because the reader is often an agent
framework's log, and "bad request" alone costs someone an afternoon.
"""

from __future__ import annotations

from typing import Any

import orjson

from .errors import ProxyError, bad_request

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_DEPTH = 64
#: Most replies one request may have generated (``n``, ``best_of``, times the prompts of a
#: completions batch): each is a whole generation.
MAX_CHOICES = 128


def parse_json_body(raw: bytes, content_type: str) -> dict[str, Any]:
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype not in ("application/json", "", "text/json") and not ctype.endswith("+json"):
        raise ProxyError(415, f"unsupported content type {ctype!r}; send application/json",
                         code="unsupported_media_type")
    if not raw.strip():
        raise bad_request("request body is empty; send a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"request body must be a JSON object, not {_kind(body)}",
                          code="invalid_json")
    if _depth(body) > MAX_DEPTH:
        raise bad_request(f"request body nests deeper than {MAX_DEPTH} levels",
                          code="nesting_too_deep")
    return body


def check_chat_body(body: dict[str, Any]) -> None:
    _check_common(body)
    msgs = body.get("messages")
    if msgs is None:
        raise bad_request("'messages' is required", param="messages", code="missing_required")
    if not isinstance(msgs, list) or not msgs:
        raise bad_request("'messages' must be a non-empty array", param="messages")
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object, not {_kind(m)}", param=where)
        role = m.get("role")
        if not isinstance(role, str):
            raise bad_request(f"{where}.role is required and must be a string",
                              param=f"{where}.role")
        if role not in ROLES:
            raise bad_request(f"{where}.role must be one of {sorted(ROLES)}, not {role!r}",
                              param=f"{where}.role")
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise bad_request(f"{where}.content must be a string or an array of parts",
                              param=f"{where}.content")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad_request("'tools' must be an array", param="tools")
        for i, t in enumerate(tools):
            where = f"tools[{i}]"
            if not isinstance(t, dict) or t.get("type", "function") != "function":
                raise bad_request(f"{where} must be an object with type 'function'", param=where)
            fn = t.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise bad_request(f"{where}.function.name is required and must be a string",
                                  param=f"{where}.function.name")
            params = fn.get("parameters")
            if params is not None and not isinstance(params, dict | bool):
                raise bad_request(f"{where}.function.parameters must be a JSON Schema object",
                                  param=f"{where}.function.parameters")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad_request("'stream_options' must be an object", param="stream_options")


def check_counts(body: dict[str, Any], max_messages: int, max_tools: int) -> None:
    """The configured count limits, checked before any per-item work (schema compiling, the
    per-message checks' error paths) so a request with a million tiny items is cheap to refuse."""
    msgs = body.get("messages")
    if isinstance(msgs, list) and len(msgs) > max_messages:
        raise bad_request(f"{len(msgs)} messages, over the limit of {max_messages} "
                          "(max_messages)", param="messages", code="too_many_messages")
    tools = body.get("tools")
    if isinstance(tools, list) and len(tools) > max_tools:
        raise bad_request(f"{len(tools)} tools, over the limit of {max_tools} (max_tools)",
                          param="tools", code="too_many_tools")


def check_completion_body(body: dict[str, Any]) -> None:
    _check_common(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise bad_request("'prompt' is required", param="prompt", code="missing_required")
    if not isinstance(prompt, str | list):
        raise bad_request("'prompt' must be a string or an array", param="prompt")
    if sequences(body) > MAX_CHOICES:
        raise bad_request(f"the request asks for {sequences(body)} replies (prompts times "
                          f"'n'); at most {MAX_CHOICES}", param="prompt",
                          code="too_many_choices")


def _check_common(body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", param="model")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", param="stream")
    for name in ("max_tokens", "max_completion_tokens", "n"):
        v = body.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise bad_request(f"'{name}' must be a positive integer", param=name)
    for name in ("n", "best_of"):
        v = body.get(name)
        if isinstance(v, int | float) and not isinstance(v, bool) and v > MAX_CHOICES:
            raise bad_request(f"'{name}' must be at most {MAX_CHOICES}", param=name,
                              code="too_many_choices")
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v is not None and (not isinstance(v, int | float) or isinstance(v, bool)):
            raise bad_request(f"'{name}' must be a number", param=name)


#: Request fields that some backend reads as "generate at most this many tokens": OpenAI's two
#: names (vLLM, SGLang, every OpenAI-compatible server), llama-server's ``n_predict`` (it wins
#: over ``max_tokens`` there), TGI's ``max_new_tokens`` and Ollama's ``num_predict`` (top level
#: or in ``options``). A cap that misses one of them is no cap.
OUTPUT_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens", "n_predict", "max_new_tokens",
                       "num_predict")


def cap_output_tokens(body: dict[str, Any], key_cap: int | None, context: int | None) -> bool:
    """Bound how many tokens the request may generate; returns whether the body changed.

    Called once, on the internal request a front produced, right before it is queued and sent
    (``app._forward``): every front (chat, completions, Ollama ``/api/*``, and any front added
    later) and every upstream wire (the Ollama-native translation reads these fields) gets the
    same bound by construction, and retries copy the bounded body.

    ``key_cap``, the client key's ``max_tokens``, is strict: every output field present ends as
    an integer from 0 to the cap, whatever it was (``null`` and ``-1`` mean "no limit" to the
    servers, a float or a string may be read leniently), and a body without either OpenAI field
    gets ``max_tokens`` set. The key's cap is on the request, so a request asking for several
    sequences (``n``, ``best_of``) gets it shared among them. ``context``, the backend's
    context length when toolmend knows it, only lowers numbers above it (``max_tokens:
    10**12``); values a server reads as its own default (absent, ``null``, ``-1``) are
    bounded by that context already.
    """
    cap = key_cap
    if cap is not None:
        cap = max(1, cap // sequences(body))
    if context is not None and context > 0 and (cap is None or context < cap):
        cap = context
    if cap is None:
        return False
    strict = key_cap is not None
    changed = _cap_fields(body, cap, strict)
    options = body.get("options")
    if isinstance(options, dict):
        changed = _cap_fields(options, cap, strict) or changed
    if strict and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = cap
        changed = True
    return changed


def sequences(body: dict[str, Any]) -> int:
    """How many replies the request has generated: ``n`` (or ``best_of``, which vLLM generates
    and then picks from) for each prompt of a legacy completions batch."""
    choices = max((v for name in ("n", "best_of") if isinstance(v := body.get(name), int)
                   and not isinstance(v, bool)), default=1)
    prompt = body.get("prompt")
    batch = len(prompt) if isinstance(prompt, list) and prompt and \
        isinstance(prompt[0], str | list) else 1
    return max(1, choices) * max(1, batch)


def _cap_fields(doc: dict[str, Any], cap: int, strict: bool) -> bool:
    changed = False
    for name in OUTPUT_LIMIT_FIELDS:
        if name not in doc:
            continue
        v = doc[name]
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= cap:
            continue
        number = isinstance(v, int | float) and not isinstance(v, bool)
        if strict or (number and v > cap):
            doc[name] = cap
            changed = True
    return changed


def wants_stream(body: dict[str, Any]) -> bool:
    return body.get("stream") is True


def client_wants_usage(body: dict[str, Any]) -> bool:
    so = body.get("stream_options")
    return isinstance(so, dict) and so.get("include_usage") is True


def ask_for_usage(body: dict[str, Any]) -> None:
    """Streaming: always ask the upstream for the usage chunk so token counts are known."""
    so = body.get("stream_options")
    so = dict(so) if isinstance(so, dict) else {}
    so["include_usage"] = True
    body["stream_options"] = so


def _kind(v: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null", dict: "an object"}.get(type(v), type(v).__name__)


def _depth(v: Any) -> int:
    """Nesting depth, iteratively: a hostile 100k-deep body must not blow the C stack."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(v, 1)]
    while stack:
        node, d = stack.pop()
        if d > deepest:
            deepest = d
            if deepest > MAX_DEPTH:
                return deepest
        if isinstance(node, dict):
            stack.extend((c, d + 1) for c in node.values() if isinstance(c, dict | list))
        elif isinstance(node, list):
            stack.extend((c, d + 1) for c in node if isinstance(c, dict | list))
    return deepest
