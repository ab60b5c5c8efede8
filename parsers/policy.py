"""What to do with a checked tool call: the decision table for ``X-Toolmend-On-Invalid``.

Pure functions over a :class:`~toolmend.parsers.validation.Verdict`; the proxy does the I/O.
One call's life in the proxy, as the wiring should read::

    policy = parse_policy(request.headers.get("X-Toolmend-On-Invalid"), default=configured)
    toolset = compile_tools(body.get("tools"), body.get("tool_choice"))      # 400 on SchemaError
    attempt = 0
    while True:
        verdict = validate_call(name, arguments, toolset, coerce=policy.coerces)
        decision = decide(verdict, policy, toolset, backend=kind, attempt=attempt)
        if decision.outcome is not Outcome.RETRY:
            break
        reply = await upstream(decision.retry.apply(body))                  # one more request
        name, arguments = decision.retry.read(reply_name, reply_args, reply_content)
        attempt += 1
    # FORWARD / REPAIRED: emit decision.arguments; ERROR: emit decision.error (502 if not yet
    # streaming); and in every case report decision.note (SSE comment, X-Toolmend-Repairs, span).

At the end of a reply, :func:`~toolmend.parsers.validation.validate_reply` gives a verdict for the
``tool_choice`` rules ("required" with no call, "none" with one) that goes through the same
:func:`decide`.

A request that declared no tools is checked against an empty toolset: every call in its reply
names an unknown tool, and is retried the way a call under ``tool_choice: "none"`` is (asked
again for a plain-text answer, the tools removed), then refused.

| verdict                | repair            | retry             | error  | pass             |
|------------------------|-------------------|-------------------|--------|------------------|
| valid                  | forward           | forward           | forward| forward          |
| valid after coercion   | repaired          | (not coerced)     | (n/a)  | (n/a)            |
| invalid, retries left  | retry             | retry             | error  | forward + report |
| invalid, none left     | error             | error             | error  | forward + report |

A retry is constrained to the tool's schema where the backend can do it, so the second answer is
valid by construction (see :func:`retry_plan`), as far as the backend's grammar engine can hold
it: the schema is translated for the engine first (:mod:`.constraints`). Backends that
constrain *content* rather than the tool call (llama-server ``json_schema``, Ollama ``format``,
llama-cpp-python ``response_format``) are asked for the bare arguments object (with ``tools``
removed where they refuse or ignore a grammar beside tools; llama-server keeps them, under
``tool_choice: "none"``); :meth:`RetryPlan.read` turns that reply back into the call.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import orjson

from .constraints import Dropped, engine_for, translate
from .schemas import Toolset
from .string_formats import FORMAT_HINTS
from .validation import MAX_ERRORS, Verdict, describe_repairs

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "ERROR_STATUS",
    "READ_ARGUMENTS",
    "READ_TEXT",
    "READ_TOOL_CALL",
    "Backend",
    "Decision",
    "Outcome",
    "Policy",
    "RetryPlan",
    "correction_message",
    "decide",
    "error_body",
    "parse_policy",
    "retry_plan",
    "text_only",
]

DEFAULT_MAX_RETRIES: Final = 1
ERROR_STATUS: Final = 502  # the upstream model produced something unusable: a bad gateway
_MAX_ISSUES_IN_CORRECTION: Final = 3


class Policy(StrEnum):
    """What to do with an invalid call (server config, per agent, ``X-Toolmend-On-Invalid``)."""

    REPAIR = "repair"  # lossless coercion, then as RETRY
    RETRY = "retry"  # ask the model again (constrained where possible), then as ERROR
    ERROR = "error"  # fail with an OpenAI-shaped invalid_tool_call error
    PASS = "pass"  # forward unchanged, report only

    @property
    def coerces(self) -> bool:
        """Whether :func:`validate_call` should be asked to ``coerce`` under this policy."""
        return self is Policy.REPAIR


def parse_policy(value: str | None, default: Policy = Policy.REPAIR) -> Policy:
    """The policy named by a header or config value; ``None``/empty means ``default``.
    Raises ``ValueError`` naming the allowed values (the proxy answers 400)."""
    if value is None or not value.strip():
        return default
    try:
        return Policy(value.strip().lower())
    except ValueError:
        allowed = "|".join(p.value for p in Policy)
        raise ValueError(f"X-Toolmend-On-Invalid must be one of {allowed}, not {value!r}") from None


class Backend(StrEnum):
    """Backend kinds whose retry constraint differs."""

    VLLM = "vllm"
    LLAMACPP = "llamacpp"  # llama-server
    OLLAMA = "ollama"
    LLAMA_CPP_PYTHON = "llama-cpp-python"
    OPENAI = "openai"  # any other OpenAI-compatible server: named tool_choice only


# Other names the proxy uses for backends, mapped onto the constraint they support.
_BACKEND_ALIASES: Final = {
    "embedded": Backend.LLAMA_CPP_PYTHON,  # llama.cpp in-process through llama-cpp-python
    "llama-server": Backend.LLAMACPP,
    "sglang": Backend.OPENAI,  # named tool_choice is enforced by its grammar backend
    "tgi": Backend.OPENAI,
    "vllm-mlx": Backend.OPENAI,
}


def _backend(kind: str) -> Backend:
    try:
        return Backend(kind)
    except ValueError:
        return _BACKEND_ALIASES.get(kind, Backend.OPENAI)


class Outcome(StrEnum):
    FORWARD = "forward"  # emit the call as it is (valid, or invalid under ``pass``)
    REPAIRED = "repaired"  # emit ``Decision.arguments`` instead of the model's text
    RETRY = "retry"  # hold the call, send ``Decision.retry.apply(body)`` upstream
    ERROR = "error"  # emit ``Decision.error`` (HTTP ``ERROR_STATUS`` before streaming)


READ_TOOL_CALL: Final = "tool_call"  # the retried reply carries a tool call, as usual
READ_ARGUMENTS: Final = "arguments"  # its content is the arguments object for ``tool``
READ_TEXT: Final = "text"  # its content is a plain answer; the held call is dropped


@dataclass(frozen=True, slots=True)
class RetryPlan:
    """How to ask the upstream again for one held call (or for a reply missing one).

    ``apply(body)`` is the retry request: ``remove`` dropped, ``set`` merged in at the top level,
    and a user message with ``correction`` appended to ``messages``. ``read_as`` says how to read
    the answer (see :meth:`read`).
    """

    tool: str | None
    correction: str
    set: Mapping[str, Any] = field(default_factory=dict)
    remove: tuple[str, ...] = ()
    read_as: str = READ_TOOL_CALL
    #: the schema's constraints the backend's grammar will not enforce (the validator does)
    dropped: tuple[Dropped, ...] = ()
    #: a focused retry (:func:`focus`): the held call's arguments, in order; the answer holds
    #: only the members that were wrong, and its values replace theirs
    keep: Mapping[str, Any] | None = None

    @property
    def constrained(self) -> bool:
        return bool(self.set)

    def apply(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The retry request body; ``body`` (the client's request) is not modified."""
        retry = {k: v for k, v in body.items() if k not in self.remove}
        retry.update(copy.deepcopy(dict(self.set)))
        retry["messages"] = [*body.get("messages", []),
                             {"role": "user", "content": self.correction}]
        return retry

    def read(self, name: str | None, arguments: str | None,
             content: str | None) -> tuple[str | None, str | None]:
        """The (name, arguments) of the replacement call from the retried reply's first tool
        call (``name``, ``arguments``) and its ``content``; ``(None, None)`` for no call.

        Under ``READ_TEXT`` the answer wanted is text, so a call is not a replacement: it is
        returned all the same, for the caller to judge (and refuse) as the violation it is."""
        if self.read_as == READ_ARGUMENTS:
            name, arguments = self.tool, (content or "").strip()
        if self.keep is not None and name == self.tool and arguments:
            arguments = self._merged(arguments)
        return name, arguments

    def _merged(self, arguments: str) -> str:
        """The kept members with the answer's in place of the wrong ones, in the call's order.
        An answer that is not a JSON object is returned as it is, for the validator to judge."""
        try:
            answer = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return arguments
        if not isinstance(answer, dict):
            return arguments
        merged = {k: answer.pop(k, v) for k, v in (self.keep or {}).items()}
        merged.update(answer)
        return orjson.dumps(merged).decode()


@dataclass(frozen=True, slots=True)
class Decision:
    """What the proxy does with one verdict. ``note`` is the one-line report for the SSE
    comment, the ``X-Toolmend-Repairs`` header and the trace (empty when nothing happened)."""

    outcome: Outcome
    verdict: Verdict
    arguments: str = ""
    retry: RetryPlan | None = None
    error: Mapping[str, Any] | None = None
    status: int | None = None
    note: str = ""


def _named_choice(tool: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": tool}}


def _target(verdict: Verdict, toolset: Toolset) -> str | None:
    """The one tool the retry should produce a call to, if there is exactly one."""
    if toolset.forced is not None:
        return toolset.forced
    if verdict.name in toolset.tools and (verdict.error is None
                                          or verdict.error.keyword != "tool_choice"):
        return verdict.name
    only = toolset.only_tool()
    return only.name if only is not None else None


def text_only(verdict: Verdict, toolset: Toolset) -> bool:
    """Whether the reply may hold no tool call at all, and this verdict is about one: under
    ``tool_choice: "none"``, or on a request that declared no tools (its calls name unknown
    tools). The retry then asks for a plain-text answer."""
    issue = verdict.error
    if issue is None:
        return False
    if issue.keyword == "tool_choice" and toolset.choice == "none":
        return True
    return not toolset.tools and issue.keyword == "name"


def correction_message(verdict: Verdict, toolset: Toolset, *, read_as: str = READ_TOOL_CALL,
                       tool: str | None = None) -> str:
    """The short text appended as a user message to a retry, naming what was wrong."""
    issue = verdict.error
    tool = tool or verdict.name
    if text_only(verdict, toolset):
        return "Tools are not available for this reply. Answer in text without calling a tool."
    if issue is not None and issue.keyword in ("tool_choice", "name"):
        if toolset.forced is not None:
            ask = f"Call the tool `{toolset.forced}`."
        else:
            ask = "Call one of these tools: " + ", ".join(f"`{n}`" for n in toolset.names) + "."
        if issue.keyword == "name":
            ask = f"There is no tool named `{verdict.name}`. " + ask
        elif not verdict.name:
            ask = "This reply must call a tool. " + ask
        else:
            ask = f"`{verdict.name}` may not be called here. " + ask
        if read_as == READ_ARGUMENTS and tool:
            ask += f" Reply with only the JSON object of arguments for `{tool}`."
        return ask
    problems = "; ".join(_quoted(i) for i in verdict.errors[:_MAX_ISSUES_IN_CORRECTION])
    text = f"The arguments for `{tool}` were invalid: {problems}."
    if read_as == READ_ARGUMENTS:
        return text + (f" Reply with only the corrected JSON object of arguments for `{tool}`, "
                       "matching its parameters schema.")
    return text + f" Call `{tool}` again with arguments that match its parameters schema."


def _quoted(issue: Any) -> str:
    """One issue for the model: the validator's message, the value it wrote, and for a
    ``format`` what the format means (``"2026-02-30" is not a 'date'`` alone did not get a
    small model to pick a day that exists)."""
    text = issue.describe()
    if issue.value is not None and issue.value.strip('"') not in issue.message:
        text += f" (you wrote {issue.value})"
    hint = FORMAT_HINTS.get(issue.format or "") if issue.keyword == "format" else None
    if hint:
        text += f"; it must be {hint}"
    return text


def retry_plan(verdict: Verdict, toolset: Toolset, backend: str = Backend.OPENAI) -> RetryPlan:
    """How to retry, constrained to the tool's schema where ``backend`` supports it:

    * ``vllm``: ``tool_choice`` naming the tool, the tool itself marked ``strict``;
    * ``openai`` (and SGLang, TGI, vllm-mlx): ``tool_choice`` naming the tool;
    * ``llamacpp`` (llama-server): ``json_schema`` and ``tool_choice: "none"``, tools kept
      (the cached prompt prefix is reused), reply read as arguments;
    * ``ollama``: ``format: schema``, tools removed, reply read as arguments;
    * ``llama-cpp-python``: ``response_format: {"type": "json_object", "schema": schema}``
      (llama-cpp-python compiles it to a grammar; its ``grammar`` field is not JSON), tools
      removed, reply read as arguments.

    The schema each backend receives is the tool's schema translated for its grammar engine
    (:func:`~toolmend.parsers.constraints.translate`: patterns in the converter's regex
    subset, formats as exact patterns, integer ranges as enums where ranges are ignored);
    what it still cannot enforce is in the plan's ``dropped``.

    Without a single target tool (an unknown name among several tools, or ``"required"`` with
    none), servers that support it get ``tool_choice: "required"``; with ``"none"`` violated,
    or a call on a request that declared no tools, tools are removed and the reply is read as
    text.
    """
    kind = _backend(backend)
    if text_only(verdict, toolset):
        return RetryPlan(None, correction_message(verdict, toolset, read_as=READ_TEXT),
                         remove=("tools", "tool_choice", "parallel_tool_calls"), read_as=READ_TEXT)
    tool = _target(verdict, toolset)
    if tool is None:
        constraint = ({"tool_choice": "required"}
                      if kind in (Backend.VLLM, Backend.OPENAI, Backend.LLAMACPP) else {})
        return RetryPlan(None, correction_message(verdict, toolset), set=constraint)
    engine = engine_for(kind.value)
    focused = focus(verdict, toolset.tools[tool].schema) \
        if engine and verdict.name == tool else None
    whole = focused[0] if focused else toolset.tools[tool].schema
    translation = translate(whole, engine) if engine else None
    schema = translation.schema if translation else whole
    dropped = translation.dropped if translation else ()
    content_only = ("tools", "tool_choice", "parallel_tool_calls", "response_format")
    set_fields: dict[str, Any]
    if kind is Backend.VLLM:
        # vLLM refuses structured_outputs beside tools ("either ... or tools, not both"); a
        # named tool_choice on a ``strict`` tool is what its guided decoding honours.
        strict_tool = {"type": "function",
                       "function": {"name": tool, "parameters": schema, "strict": True}}
        set_fields = {"tool_choice": _named_choice(tool), "tools": [strict_tool]}
        remove: tuple[str, ...] = ("response_format", "structured_outputs")
        read_as = READ_TOOL_CALL
    elif kind is Backend.OPENAI:
        set_fields, remove, read_as = {"tool_choice": _named_choice(tool)}, (), READ_TOOL_CALL
    elif kind is Backend.LLAMACPP:
        # The tools stay (with tool_choice "none"), so the prompt is the first request's plus
        # the correction and llama-server reuses its cached prefix: without them the template
        # renders a different system block and the whole few-shot prompt is evaluated again
        # (1,600 tokens re-read instead of 35, measured). It takes json_schema beside tools.
        set_fields = {"json_schema": schema, "tool_choice": "none"}
        remove, read_as = ("parallel_tool_calls", "response_format"), READ_ARGUMENTS
    elif kind is Backend.OLLAMA:
        set_fields = {"format": schema}
        remove, read_as = content_only, READ_ARGUMENTS
    else:
        set_fields = {"response_format": {"type": "json_object", "schema": schema}}
        remove, read_as = content_only, READ_ARGUMENTS
    if focused:
        text = focused_correction(verdict, tool, sorted(focused[0]["properties"]), read_as)
        return RetryPlan(tool, text, set_fields, remove, read_as, dropped, keep=focused[1])
    text = correction_message(verdict, toolset, read_as=read_as, tool=tool)
    return RetryPlan(tool, text, set_fields, remove, read_as, dropped)


def focus(verdict: Verdict, schema: Mapping[str, Any]
          ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A focused retry for a call whose errors all lie inside some of its top-level members:
    the schema of just those members (all required) and the members to keep.

    The model is asked again only for what it got wrong, so a retry decodes a few tokens
    instead of the whole object: on the real llama-server a whole retry decoded as many tokens
    as the first answer (51 against 58), nearly one more generation. The valid members are kept
    as the model wrote them, never regenerated (and never changed by a second sampling). A call
    whose arguments are not an object, or with an error at the root (a missing or extra member,
    not JSON), is retried whole; so is a schema that is not a plain object with ``properties``.
    The merged call is validated again like any other answer.
    """
    props = schema.get("properties")
    if not isinstance(props, Mapping) or not verdict.errors or len(verdict.errors) >= MAX_ERRORS:
        return None
    try:
        arguments = orjson.loads(verdict.arguments)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(arguments, dict):
        return None
    wrong: set[str] = set()
    for issue in verdict.errors:
        if not issue.pointer.startswith("/"):
            return None
        key = issue.pointer[1:].split("/", 1)[0].replace("~1", "/").replace("~0", "~")
        if key not in arguments or key not in props:
            return None
        wrong.add(key)
    if len(wrong) == len(arguments):
        return None  # nothing to keep: the whole object is asked for again
    part: dict[str, Any] = {"type": "object",
                            "properties": {k: props[k] for k in sorted(wrong)},
                            "required": sorted(wrong), "additionalProperties": False}
    for defs in ("$defs", "definitions"):  # what the members' ``$ref``s point into
        if defs in schema:
            part[defs] = schema[defs]
    return part, arguments


def focused_correction(verdict: Verdict, tool: str, keys: list[str], read_as: str) -> str:
    """The correction of a focused retry: what was wrong, and the members to write again."""
    problems = "; ".join(_quoted(i) for i in verdict.errors[:_MAX_ISSUES_IN_CORRECTION])
    names = ", ".join(f"`{k}`" for k in keys)
    text = f"The arguments for `{tool}` were invalid: {problems}."
    if read_as == READ_ARGUMENTS:
        return text + f" Reply with only a JSON object holding the corrected {names}."
    return text + f" Call `{tool}` again with only the corrected {names}."


def error_body(verdict: Verdict) -> dict[str, Any]:
    """The OpenAI-shaped error for an invalid call: the body of the 502, or of the
    ``data: {"error": ...}`` event before ``[DONE]`` when already streaming."""
    issue = verdict.error
    pointer = issue.pointer if issue else ""
    detail = issue.describe() if issue else "invalid tool call"
    subject = f" to `{verdict.name}`" if verdict.name else ""
    return {
        "error": {
            "message": f"invalid tool call{subject}: {detail}",
            "type": "invalid_tool_call",
            "param": None,
            "code": "invalid_tool_call",
            "tool": verdict.name or None,
            "pointer": pointer,
            "keyword": issue.keyword if issue else None,
            "validator_message": issue.message if issue else None,
        }
    }


def decide(verdict: Verdict, policy: Policy, toolset: Toolset, *, backend: str = Backend.OPENAI,
           attempt: int = 0, max_retries: int = DEFAULT_MAX_RETRIES) -> Decision:
    """Apply the decision table. ``attempt`` counts the retries already made for this call."""
    tool = verdict.name or "reply"
    if verdict.ok:
        if verdict.repairs:
            return Decision(Outcome.REPAIRED, verdict, verdict.arguments,
                            note=f"repaired {tool}: {describe_repairs(verdict.repairs)}")
        return Decision(Outcome.FORWARD, verdict, verdict.arguments)
    first = verdict.error.describe() if verdict.error else "invalid"
    if policy is Policy.PASS:
        return Decision(Outcome.FORWARD, verdict, verdict.arguments,
                        note=f"invalid {tool} passed: {first}")
    if policy is not Policy.ERROR and attempt < max_retries:
        return Decision(Outcome.RETRY, verdict, retry=retry_plan(verdict, toolset, backend),
                        note=f"retry {attempt + 1}/{max_retries} {tool}: {first}")
    return Decision(Outcome.ERROR, verdict, error=error_body(verdict), status=ERROR_STATUS,
                    note=f"invalid {tool}: {first}")
