"""How each real server shapes its responses, as seen on the wire.

Each dialect renders the same scripted reply the way that server does: its ids, its first
chunk, its tool-call deltas (with its bugs, when a scenario's ``quirks`` ask), its usage chunk,
its error body, and its discovery endpoints. Facts come from running the real servers.
"""

from __future__ import annotations

import secrets
import string
import time
from typing import Any

from toolmend.sim.scenario import Scenario, SimToolCall, split_tokens

DIALECTS = ("vllm", "llamacpp", "ollama", "llama-cpp-python")
_ALNUM = string.ascii_letters + string.digits


def _alnum(n: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


class Dialect:
    """Base: OpenAI-compatible chunk shapes. Subclasses override what their server does."""

    name = "openai"
    owned_by = "openai"
    sends_usage_chunk = True
    #: the field this server puts reasoning in (its own reasoning parser's output)
    reasoning_key = "reasoning_content"
    context = 4096  # tokens of context one request gets (prompt and reply together)

    def __init__(self, model: str) -> None:
        self.model = model

    # ids -----------------------------------------------------------------------------------
    def completion_id(self) -> str:
        return "chatcmpl-" + secrets.token_hex(16)

    def tool_call_id(self) -> str:
        return "call_" + _alnum(24)

    # chunks ----------------------------------------------------------------------------------
    def envelope(self, cid: str, created: int, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion.chunk", "created": created,
                "model": self.model, "choices": choices}

    def choice(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def first_delta(self) -> dict[str, Any]:
        return {"role": "assistant", "content": ""}

    def content_delta(self, text: str) -> dict[str, Any]:
        return {"content": text}

    def reasoning_delta(self, text: str) -> dict[str, Any]:
        return {self.reasoning_key: text}

    def tool_deltas(self, calls: list[SimToolCall], quirks: dict[str, Any]) -> list[dict[str, Any]]:
        """Deltas (each a ``delta`` object) that stream the calls, one piece at a time."""
        out: list[dict[str, Any]] = []
        for i, call in enumerate(calls):
            index = 0 if quirks.get("index_always_zero") else i
            cid = call.id or self.tool_call_id()
            out.append({"tool_calls": [self.tool_start(index, cid, call.name)]})
            pieces = split_tokens(call.arguments)
            if quirks.get("duplicate_args_tail") and pieces:
                pieces.append(pieces[-1])
            for piece in pieces:
                frag: dict[str, Any] = {"index": index, "function": {"arguments": piece}}
                out.append({"tool_calls": [frag]})
        return out

    def tool_start(self, index: int, cid: str, name: str) -> dict[str, Any]:
        return {"index": index, "id": cid, "type": "function",
                "function": {"name": name, "arguments": ""}}

    def finish_choice(self, reason: str) -> dict[str, Any]:
        return self.choice({}, reason)

    def usage(self, prompt: int, completion: int) -> dict[str, Any]:
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def extra_final(self) -> dict[str, Any]:
        return {}

    # errors and discovery -------------------------------------------------------------------
    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"error": {"message": message, "type": "server_error", "param": None,
                          "code": status}}

    def models_doc(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model, "object": "model",
                                            "created": int(time.time()),
                                            "owned_by": self.owned_by}]}

    def reply_message(self, sc: Scenario) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": sc.content or None}
        if sc.tool_calls:
            msg["tool_calls"] = [{"id": c.id or self.tool_call_id(), "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in sc.tool_calls]
        if sc.reasoning:
            msg[self.reasoning_key] = sc.reasoning
        return msg


class VLLM(Dialect):
    name = "vllm"
    owned_by = "vllm"
    reasoning_key = "reasoning"  # vLLM renamed reasoning_content to reasoning

    def completion_id(self) -> str:
        return "chatcmpl-" + secrets.token_hex(16)

    def tool_call_id(self) -> str:
        return "chatcmpl-tool-" + secrets.token_hex(16)

    def tool_start(self, index: int, cid: str, name: str) -> dict[str, Any]:
        # vLLM's first tool delta carries the name only: no "arguments" key at all.
        return {"index": index, "id": cid, "type": "function", "function": {"name": name}}

    def finish_choice(self, reason: str) -> dict[str, Any]:
        c = self.choice({"content": ""}, reason)
        c["stop_reason"] = None
        return c

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        kinds = {400: "BadRequestError", 404: "NotFoundError", 429: "TooManyRequestsError",
                 503: "ServiceUnavailableError"}
        return {"error": {"message": message, "type": kinds.get(status, "InternalServerError"),
                          "param": None, "code": status}}

    def models_doc(self) -> dict[str, Any]:
        doc = super().models_doc()
        doc["data"][0].update({"root": self.model, "parent": None, "max_model_len": self.context,
                               "permission": []})
        return doc


class LlamaServer(Dialect):
    name = "llamacpp"
    owned_by = "llamacpp"
    context = 2048

    def completion_id(self) -> str:
        return "chatcmpl-" + _alnum(32)

    def tool_call_id(self) -> str:
        return _alnum(32)  # no "call_" prefix

    def envelope(self, cid: str, created: int, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"choices": choices, "created": created, "id": cid, "model": self.model,
                "system_fingerprint": "b6550-1a2b3c4d", "object": "chat.completion.chunk"}

    def choice(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"finish_reason": finish, "index": 0, "delta": delta}

    def first_delta(self) -> dict[str, Any]:
        return {"role": "assistant", "content": None}

    def tool_deltas(self, calls: list[SimToolCall], quirks: dict[str, Any]) -> list[dict[str, Any]]:
        # llama-server's first tool delta carries the name *and* "{" of the arguments.
        out: list[dict[str, Any]] = []
        for i, call in enumerate(calls):
            args = call.arguments
            first = args[:1] if args.startswith("{") else ""  # exactly "{", as seen on the wire
            pieces = split_tokens(args[len(first):])
            out.append({"tool_calls": [{"index": i, "id": call.id or self.tool_call_id(),
                                        "type": "function",
                                        "function": {"name": call.name, "arguments": first}}]})
            for piece in pieces:
                out.append({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
        return out

    def extra_final(self) -> dict[str, Any]:
        return {"timings": {"prompt_n": 12, "prompt_ms": 40.1, "predicted_n": 20,
                            "predicted_ms": 444.0, "predicted_per_second": 45.0}}

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        kind = {400: "invalid_request_error", 404: "not_found_error",
                503: "unavailable_error"}.get(status, "server_error")
        return {"error": {"code": status, "message": message, "type": kind}}

    def models_doc(self) -> dict[str, Any]:
        doc = super().models_doc()
        doc["data"][0]["meta"] = {"vocab_type": 1, "n_vocab": 262144, "n_ctx_train": 32768}
        doc["models"] = [{"name": self.model, "model": self.model, "type": "model"}]
        return doc


class OllamaV1(Dialect):
    name = "ollama"
    owned_by = "library"
    reasoning_key = "reasoning"

    def completion_id(self) -> str:
        return f"chatcmpl-{secrets.randbelow(1000)}"

    def tool_call_id(self) -> str:
        return "call_" + _alnum(8).lower()

    def envelope(self, cid: str, created: int, choices: list[dict[str, Any]]) -> dict[str, Any]:
        env = super().envelope(cid, created, choices)
        env["system_fingerprint"] = "fp_ollama"
        return env

    def choice(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        d = {"role": "assistant", **delta} if "content" in delta or "tool_calls" in delta else delta
        return {"index": 0, "delta": d, "finish_reason": finish}

    def first_delta(self) -> dict[str, Any]:
        return {"role": "assistant", "content": ""}

    def reasoning_delta(self, text: str) -> dict[str, Any]:
        return {"content": "", "reasoning": text}

    def tool_deltas(self, calls: list[SimToolCall], quirks: dict[str, Any]) -> list[dict[str, Any]]:
        # Ollama parses the whole call first, then sends every call in one delta, all index 0.
        return [{"tool_calls": [{"id": c.id or self.tool_call_id(), "index": 0,
                                 "type": "function",
                                 "function": {"name": c.name, "arguments": c.arguments}}
                                for c in calls]}]

    def finish_choice(self, reason: str) -> dict[str, Any]:
        return self.choice({"role": "assistant", "content": ""}, reason)

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"error": {"message": message, "type": "api_error", "param": None, "code": None}}


class LlamaCppPython(Dialect):
    name = "llama-cpp-python"
    owned_by = "me"
    sends_usage_chunk = False

    def completion_id(self) -> str:
        return "chatcmpl-" + secrets.token_hex(18)

    def tool_call_id(self) -> str:
        return "call__0_" + secrets.token_hex(6)

    def tool_deltas(self, calls: list[SimToolCall], quirks: dict[str, Any]) -> list[dict[str, Any]]:
        # Name and id repeated in every chunk, and the deprecated function_call beside.
        out: list[dict[str, Any]] = []
        for i, call in enumerate(calls):
            cid = call.id or self.tool_call_id()
            for piece in split_tokens(call.arguments):
                out.append({"role": "assistant", "content": None,
                            "function_call": {"name": call.name, "arguments": piece},
                            "tool_calls": [{"index": i, "id": cid, "type": "function",
                                            "function": {"name": call.name,
                                                         "arguments": piece}}]})
        return out

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"detail": message}


def make_dialect(name: str, model: str) -> Dialect:
    cls = {"vllm": VLLM, "llamacpp": LlamaServer, "llama-server": LlamaServer,
           "ollama": OllamaV1, "llama-cpp-python": LlamaCppPython, "openai": Dialect}.get(name)
    if cls is None:
        raise ValueError(f"unknown dialect {name!r}; one of {DIALECTS}")
    return cls(model)
