"""LiteLLM's proxy, for ``bench/relay.py --fc --litellm``: a popular Python gateway on the same
load as toolmend, so that the cost of one can be read against the other's from the same run.

LiteLLM is not a dependency of toolmend or of its tests: it gets a venv of its own, made once
with a pinned ``litellm[proxy]`` by :func:`tests.real.stacks.cached_venv` (under
``$TOOLMEND_CACHE``, default ``~/.cache/toolmend``), only when the benchmark is asked for it.

:class:`LiteLLMProc` runs ``litellm --config`` with one model, ``sim-model``, served by the sim
as an OpenAI-compatible ``hosted_vllm/`` backend: LiteLLM answers chat completions directly and
bridges its Anthropic Messages and (told to, as for a server without ``/v1/responses``) its
Responses fronts to the sim's chat completions. Its settings are its defaults, except what has
to be off on a machine without internet (the remote model-cost map, usage telemetry), its own
logging below errors, and its refusal to start without a master key: toolmend runs without keys
in the benchmark, so LiteLLM does too.

By hand: ``python bench/litellm_proxy.py`` makes the venv (timed) and prints its ``litellm``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from _common import Proc, free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.real import stacks  # noqa: E402  (the repo root must be importable first)

#: The newest release whose ``[proxy]`` extra installs from PyPI as reached here: later ones
#: pin ``litellm-proxy``, ``litellm-proxy-extras`` or ``litellm-enterprise`` releases that it
#: does not have (1.110.0 on: ``litellm-proxy``; 1.108.8 to 1.109.3: extras 0.4.110.post1 or
#: later, enterprise 0.1.79.post2 or later).
LITELLM_VERSION = "1.108.7"
#: what LiteLLM's proxy imports at start-up on these machines: 20-60 s, more on a busy one
START_TIMEOUT = 240.0
OFFLINE_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # the bundled cost map, not a download per start
    "LITELLM_TELEMETRY": "False",
    "LITELLM_LOG": "ERROR",
    "DO_NOT_TRACK": "1",
}


def venv_dir() -> Path:
    return stacks.cache_root() / f"litellm-{LITELLM_VERSION}"


def setup_venv() -> Path:
    """``litellm[proxy]`` at the pinned version in its own venv (cached); its ``litellm``."""
    folder = venv_dir()
    command = folder / "venv" / "bin" / "litellm"

    def install(python: Path, logfile: Path) -> None:
        stacks._run([python, "-m", "pip", "install", "--progress-bar", "off",
                     f"litellm[proxy]=={LITELLM_VERSION}"], logfile)
        stacks._run([python, "-c", "import importlib.metadata as m, sys; "
                     "v = m.version('litellm'); "
                     f"sys.exit(0 if v == {LITELLM_VERSION!r} else f'litellm {{v}} installed, "
                     f"{LITELLM_VERSION} expected')"], logfile)
        if not command.is_file():
            raise stacks.StackError(f"litellm[proxy] installed no {command}; log {logfile}")

    stacks.cached_venv(folder, install, version=LITELLM_VERSION)
    if not command.is_file():
        raise stacks.StackError(f"{command} is missing from the cached venv; remove {folder} "
                                "to make it again")
    return command


def config(upstream: str) -> str:
    """One model, the sim's, as an OpenAI-compatible server (JSON is YAML)."""
    return json.dumps({
        "model_list": [{"model_name": "sim-model", "litellm_params": {
            "model": "hosted_vllm/sim-model", "api_base": upstream + "/v1",
            "api_key": "none",
            # Responses bridged to chat completions, as for a server without /v1/responses:
            # LiteLLM would otherwise send hosted_vllm's Responses to the sim's /v1/responses
            "use_chat_completions_api": True}}],
        "litellm_settings": {"telemetry": False, "set_verbose": False, "json_logs": False},
        # no key, as toolmend runs in the benchmark: both accept every request on loopback
        "general_settings": {"dangerously_permit_weak_or_unset_master_key": True},
    }, indent=1)


class LiteLLMProc(Proc):
    """``litellm --config`` on a free port; ready once its liveliness probe answers.

    LiteLLM prints no URL on stdout when it listens (uvicorn logs to stderr), so the port is
    chosen here and the readiness is asked over HTTP instead of read from the output.
    """

    def __init__(self, name: str, upstream: str, log_dir: Path) -> None:
        command = setup_venv()
        self.name = name
        self._port = free_port()
        self._stop_timeout = 20.0
        cfg = log_dir / f"{name}.yaml"
        cfg.write_text(config(upstream))
        env = {**os.environ, **OFFLINE_ENV}
        for k in ("VIRTUAL_ENV", "PYTHONPATH"):
            env.pop(k, None)
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.p = subprocess.Popen(
            [str(command), "--config", str(cfg), "--host", "127.0.0.1",
             "--port", str(self._port), "--num_workers", "1"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=log_dir, env=env)
        self.url = self._wait_for_url(START_TIMEOUT)

    def _wait_for_url(self, timeout: float) -> str:
        url = f"http://127.0.0.1:{self._port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                break
            try:
                with urllib.request.urlopen(url + "/health/liveliness", timeout=2) as r:
                    if r.status == 200:
                        return url
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} did not start in {timeout:.0f} s; "
                           f"see {self.log_path}:\n{stacks._tail(self.log_path)}")


if __name__ == "__main__":
    t = time.monotonic()
    print(setup_venv(), f"{time.monotonic() - t:.1f} s")
