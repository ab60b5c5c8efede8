"""Registry of tool-call formats: name -> parser class, and model name -> format.

Adding a format is one new module here plus fixtures; this table is the only other line.
Modules are imported lazily so a request only pays for the format it uses.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from .base import MarkerParser

# format name -> "module:Class" (module relative to this package)
FORMATS: dict[str, str] = {
    "hermes": "hermes:HermesParser",
    "qwen3_coder": "qwen3_coder:Qwen3CoderParser",
    "llama3_json": "llama3_json:Llama3JsonParser",
    "pythonic": "pythonic:PythonicParser",
    "mistral": "mistral:MistralParser",
    "deepseek_v3": "deepseek:DeepSeekV3Parser",
    "deepseek_v31": "deepseek:DeepSeekV31Parser",
    "granite": "granite:GraniteParser",
    "glm45": "glm45:Glm45Parser",
    "kimi_k2": "kimi_k2:KimiK2Parser",
    "gpt_oss": "gpt_oss:GptOssParser",
    "functiongemma": "functiongemma:FunctionGemmaParser",
    "phi4_mini": "phi4_mini:Phi4MiniParser",
    "minimax_m2": "minimax_m2:MiniMaxM2Parser",
    "generic_json": "generic_json:GenericJsonParser",
}

# model-name patterns (searched case-insensitively, first match wins) -> format
MODEL_PATTERNS: list[tuple[str, str]] = [
    (r"qwen3-?coder", "qwen3_coder"),
    (r"qwen|qwq|hermes|nous", "hermes"),
    (r"deepseek-?v3\.[1-9]|deepseek-?v3-?1|deepseek-?v3\.2", "deepseek_v31"),
    (r"deepseek", "deepseek_v3"),
    (r"llama-?4", "pythonic"),
    (r"llama-?3\.2-?(1|3)b", "pythonic"),
    (r"llama", "llama3_json"),
    (r"mistral|mixtral|ministral|magistral|devstral|codestral", "mistral"),
    (r"granite", "granite"),
    (r"glm-?4\.[5-9]|glm-?4-?(5|6|7)", "glm45"),
    (r"kimi", "kimi_k2"),
    (r"gpt-?oss", "gpt_oss"),
    (r"functiongemma", "functiongemma"),
    (r"phi-?4-?mini", "phi4_mini"),
    (r"minimax", "minimax_m2"),
]
_COMPILED = [(re.compile(p, re.I), f) for p, f in MODEL_PATTERNS]


def format_for_model(model: str | None) -> str | None:
    """The format a model name implies, or None when unknown."""
    if not model:
        return None
    for pattern, fmt in _COMPILED:
        if pattern.search(model):
            return fmt
    return None


def parser_class(name: str) -> type[MarkerParser]:
    try:
        target = FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown tool format {name!r}; one of {sorted(FORMATS)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def make_parser(name: str, tools: list[dict[str, Any]] | None = None) -> MarkerParser:
    return parser_class(name)(tools)
