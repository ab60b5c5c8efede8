"""Reading and checking a request body before anything is sent upstream.

Errors name the exact field (``messages[2].role``) because the reader is often an agent
framework's log, and "bad request" alone costs someone an afternoon.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from itertools import compress
from typing import Any

import orjson
from aiohttp import web

from toolmend.server.errors import ProxyError, bad_request
from toolmend.server.memory import note_large_work

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_DEPTH = 64
#: Most replies one request may have generated (``n``, ``best_of``, times the prompts of a
#: completions batch): each is a whole generation.
MAX_CHOICES = 128
#: Memory one parsed JSON value takes beyond its text, on average, in bytes: a dict slot and a
#: key object, or a list slot (measured by bench/hostile_bodies.py; see BENCHMARKS.md). An
#: 8 MB body of 690,000 small keys parses to about 80 MB.
BYTES_PER_VALUE = 100


class LargeBodies:
    """At most ``permits`` large request bodies held at once.

    A body's parsed form can be ten times its size (many small values), and it lives as long
    as its request (the upstream call, retries); eight 8 MB bodies of small keys took the
    process from 114 to 775 MB. Each body's parsed size is estimated twice: before parsing,
    from its text at C speed, as an upper bound (every ``,`` and ``:`` a value, even inside
    strings), and after, exactly (text plus :data:`BYTES_PER_VALUE` per value). One over
    ``large_bytes`` needs a permit until its request ends; with none free it is refused
    before it is parsed (503, ``Retry-After``), so a burst of them costs their bytes, not
    their parsed forms. A permit taken on the upper bound is given back once the exact size
    turns out small. Ordinary requests never come near the threshold.
    """

    def __init__(self, large_bytes: int, permits: int) -> None:
        self.large_bytes = large_bytes
        self.permits = permits
        self.held = 0

    def admit(self, request: web.Request, size: int) -> None:
        """Called with the upper bound before parsing, then with the exact estimate."""
        if size > self.large_bytes // 8:
            note_large_work()  # freed when the request ends: give the pages back then
        if size <= self.large_bytes:
            self.release(request)  # the upper bound was pessimistic: not large after all
            return
        if request.get(_PERMIT) is not None:
            return
        if self.held >= self.permits:
            raise ProxyError(503, f"too many large request bodies at once: this one parses to "
                             f"about {size >> 20} MB and {self.held} such bodies are being "
                             f"served (max_large_bodies={self.permits}, large_body_bytes="
                             f"{self.large_bytes}); retry shortly", code="too_many_large_bodies",
                             headers={"Retry-After": "1"})
        self.held += 1
        request[_PERMIT] = self

    def release(self, request: web.Request) -> None:
        if request.get(_PERMIT) is self:
            del request[_PERMIT]
            self.held -= 1


LARGE_BODIES = web.AppKey("large_bodies", LargeBodies)
_PERMIT = web.RequestKey("large_body_permit", LargeBodies)


@web.middleware
async def release_large_bodies(request: web.Request, handler: Any) -> web.StreamResponse:
    """Give back a large body's permit when its request is over, however it ends."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    finally:
        gate = request.app.get(LARGE_BODIES)
        if gate is not None:
            gate.release(request)


def parse_json_body(raw: bytes, content_type: str,
                    admit: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The body as a JSON object, checked for depth. ``admit`` is told the body's estimated
    parsed size in bytes and may refuse it (see :class:`LargeBodies`)."""
    body = _decode(raw, content_type)
    steps = _measure(body)
    try:
        while True:
            next(steps)
    except StopIteration as done:
        _bound(raw, done.value, admit)
    return body


def estimate_values(raw: bytes) -> int:
    """An upper bound of the JSON values in ``raw``, without parsing it: members and elements
    are separated by commas and keys end with colons. Two one-byte counts in C (a few ms for
    8 MB), cheap enough to run before a parse that would hold the event loop for hundreds.
    Commas and colons inside strings count too, so prose and code overcount, about one in
    25-50 characters: far from the bound for any body a model's context could hold."""
    return raw.count(b",") + raw.count(b":") + 1


async def read_json_body(raw: bytes, content_type: str,
                         admit: Callable[[int], None] | None = None,
                         max_values: int = 0, values: int | None = None) -> dict[str, Any]:
    """:func:`parse_json_body` for the event loop: the walk over a large body's values lets
    other requests run every few thousand containers (an 8 MB body of 350,000 values took
    80 ms of walking; only the parse itself, in C, is one piece). That piece is bounded first:
    with ``max_values``, a body estimated to hold more values than that is refused before it is
    parsed (:func:`estimate_values`). ``admit`` is then told an upper bound of the parsed size,
    before parsing, so a body it refuses is never parsed. ``values``: the estimate, when the
    body was counted as it arrived (``forward.read_body``)."""
    if values is None:
        values = estimate_values(raw) if len(raw) > 4096 else 0
    if max_values and values > max_values:
        raise ProxyError(413, f"request body holds about {values} JSON values, over the limit "
                         f"of {max_values} (max_body_values)", code="too_many_values")
    if admit is not None:
        admit(len(raw) + (values or estimate_values(raw)) * BYTES_PER_VALUE)
    body = _decode(raw, content_type)
    steps = _measure(body)
    try:
        while True:
            next(steps)
            await asyncio.sleep(0)
    except StopIteration as done:
        _bound(raw, done.value, admit)
    return body


def _decode(raw: bytes, content_type: str) -> dict[str, Any]:
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
    return body


def _bound(raw: bytes, measured: tuple[int, int], admit: Callable[[int], None] | None) -> None:
    depth, values = measured
    if depth > MAX_DEPTH:
        raise bad_request(f"request body nests deeper than {MAX_DEPTH} levels",
                          code="nesting_too_deep")
    if admit is not None:
        admit(len(raw) + values * BYTES_PER_VALUE)


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
    (``pipeline/forward.py``): every front (chat, completions, Ollama ``/api/*``, and any front
    added later) and every upstream wire (the Ollama-native translation reads these fields) gets the
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


_IS_CONTAINER = frozenset({dict, list}).__contains__


#: containers walked between two yields of :func:`_measure`
_SLICE = 4096


def _measure(v: Any) -> Generator[None, None, tuple[int, int]]:
    """Nesting depth and number of values inside containers, returned when the generator
    ends; it yields every :data:`_SLICE` containers so a caller on the event loop can let
    others run. Level by level, iteratively (a hostile deep body cannot blow the C stack),
    and at C speed per value (``compress`` over ``map(type, ...)``): a Python loop over every
    value took 250-570 ms for an 8 MB body of 350,000. Stops once deeper than the limit."""
    values = 0
    depth = 0
    level = [v]
    walked = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            return depth, values
        below: list[Any] = []
        for node in level:
            values += len(node)
            children = node.values() if type(node) is dict else node
            below.extend(compress(children, map(_IS_CONTAINER, map(type, children))))
            walked += 1
            if walked % _SLICE == 0:
                yield
        level = below
    return depth, values
