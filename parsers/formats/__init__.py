"""Registry of tool-call formats, derived from the format files themselves.

Every module of this package whose name does not start with ``_`` (other than ``base``, the
interface) is a format file: it declares one :class:`ToolFormat` per format it implements (see
``_declaration.py``), and this module collects them by walking the package. No list here or
anywhere else names the formats, so adding one is its file plus fixtures.

All format modules are imported when the registry is first imported (once per process, some
tens of milliseconds): their declarations are what the registry is made of.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
from typing import Any

from ._declaration import ToolFormat
from .base import MarkerParser

__all__ = ["FORMATS", "MODEL_PATTERNS", "ToolFormat", "collect", "format_for_model",
           "format_modules", "make_parser", "parser_class"]

#: modules of this package that are not format files (besides ``_``-prefixed helpers)
_NOT_FORMAT_FILES = frozenset({"base"})


def format_modules(package: str = __name__) -> list[str]:
    """Names of the format files of a package (this one unless told), in file-name order."""
    path = importlib.import_module(package).__path__
    return sorted(m.name for m in pkgutil.iter_modules(path)
                  if not m.name.startswith("_") and m.name not in _NOT_FORMAT_FILES)


def collect(package: str = __name__) -> dict[str, ToolFormat]:
    """Every :class:`ToolFormat` the format files of ``package`` declare (beside their parser
    class), by name; a clear error for a file that declares none, a name declared twice, or two
    formats whose model patterns claim the same rank."""
    found: dict[str, ToolFormat] = {}
    for mod_name in format_modules(package):
        module = importlib.import_module(f"{package}.{mod_name}")
        declared = [v for v in vars(module).values()
                    if isinstance(v, ToolFormat) and v.parser.__module__ == module.__name__]
        if not declared:
            raise LookupError(f"format file {mod_name}.py declares no ToolFormat beside its "
                              "parser; a helper module of the formats needs a name starting "
                              "with '_'")
        for fmt in declared:
            other = found.get(fmt.name)
            if other is not None and other is not fmt:
                raise ValueError(f"tool format {fmt.name!r} is declared twice "
                                 f"({other.parser.__module__}, {module.__name__})")
            found[fmt.name] = fmt
    ranks: dict[int, str] = {}
    for fmt in found.values():
        if fmt.models:
            if fmt.rank in ranks:
                raise ValueError(f"tool formats {ranks[fmt.rank]!r} and {fmt.name!r} share the "
                                 f"model-pattern rank {fmt.rank}; ranks decide which one a "
                                 "name matching both gets")
            ranks[fmt.rank] = fmt.name
    return found


#: format name -> its declaration
FORMATS: dict[str, ToolFormat] = collect()

#: (model-name pattern, format), in the order they are tried: by rank, then as declared
MODEL_PATTERNS: list[tuple[str, str]] = [
    (pattern, fmt.name)
    for fmt in sorted(FORMATS.values(), key=lambda f: f.rank) for pattern in fmt.models]
_COMPILED = [(re.compile(p, re.I), f) for p, f in MODEL_PATTERNS]


def format_for_model(model: str | None) -> str | None:
    """The format a model name implies, or None when unknown."""
    if not model:
        return None
    return _format_for_name(model)


@functools.lru_cache(maxsize=1024)
def _format_for_name(model: str) -> str | None:
    """Every request asks, for a handful of names: each is matched against the patterns once."""
    for pattern, fmt in _COMPILED:
        if pattern.search(model):
            return fmt
    return None


def parser_class(name: str) -> type[MarkerParser]:
    try:
        return FORMATS[name].parser
    except KeyError:
        raise ValueError(f"unknown tool format {name!r}; one of {sorted(FORMATS)}") from None


def make_parser(name: str, tools: list[dict[str, Any]] | None = None) -> MarkerParser:
    return parser_class(name)(tools)
