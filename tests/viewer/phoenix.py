"""A real trace viewer for the tests: Arize Phoenix, set up and started the way the stacks are.

Phoenix is an OTLP trace store with a UI and a REST API that installs from PyPI and runs offline
(SQLite, no account). Its pins (pandas, pyarrow, grpcio, its own OpenTelemetry packages, ...)
must never meet the test dependencies, so it gets a venv of its own, made from the pinned
``phoenix-requirements.txt`` in this folder and cached in ``$TOOLMEND_CACHE`` (default
``~/.cache/toolmend``) under a name keyed by that file's content. As in ``tests/real/stacks.py``,
the folder counts as made only once its ``READY`` stamp exists, a file lock serialises two runs
that set it up at once, and every failure raises :class:`~tests.real.stacks.StackError` with the
reason and the tail of the log: the tier fails loudly, it never skips.

Run by hand: ``python -m tests.viewer.phoenix build`` (timed) and
``python -m tests.viewer.phoenix serve`` (a Phoenix on a free port until Ctrl-C).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tests.real.stacks import (
    Server,
    StackError,
    _run,
    _tail,
    cache_root,
    cached_venv,
    free_port,
)

log = logging.getLogger("toolmend.tests.viewer")

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "phoenix-requirements.txt"
PHOENIX_VERSION = "20.26.1"  # must match the arize-phoenix pin in REQUIREMENTS
#: Measured on the 2-core machines: ``phoenix serve`` is ready 15-35 s after start on a quiet
#: machine and 50-90 s on a busy one (importing Phoenix takes ~13 s of CPU; its migrations of
#: the empty SQLite database ~3 s). The venv takes ~140 s of CPU to install (2.5 min quiet,
#: 7 min busy) and 860 MB on disk.
READY_TIMEOUT = 180.0

#: Everything Phoenix would do beyond storing and showing traces is off: no usage telemetry,
#: no external fonts or scripts in the UI, no AI assistant (it would run tools server-side).
OFFLINE_ENV = {
    "PHOENIX_TELEMETRY_ENABLED": "false",
    "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",
    "PHOENIX_DISABLE_AGENT_ASSISTANT": "true",
    "PHOENIX_AGENTS_DISABLE_WEB_ACCESS": "true",
    "PHOENIX_AGENTS_DISABLE_BASH": "true",
    "PHOENIX_AGENTS_DISABLE_GITHUB": "true",
    "DO_NOT_TRACK": "1",
}


def phoenix_dir() -> Path:
    key = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:10]
    return cache_root() / f"phoenix-{PHOENIX_VERSION}-{key}"


def setup_phoenix_venv() -> Path:
    """Phoenix in its own venv (cached); returns the path of its ``phoenix`` command."""
    folder = phoenix_dir()
    command = folder / "venv" / "bin" / "phoenix"

    def install(python: Path, logfile: Path) -> None:
        _run([python, "-m", "pip", "install", "--progress-bar", "off", "-r", REQUIREMENTS],
             logfile)
        _run([python, "-c", "import phoenix, sys; v = phoenix.__version__; "
              f"sys.exit(0 if v == {PHOENIX_VERSION!r} else f'phoenix {{v}} installed, "
              f"{PHOENIX_VERSION} expected')"], logfile)
        if not command.is_file():
            raise StackError(f"the phoenix package installed no {command}; log {logfile}")

    cached_venv(folder, install, version=PHOENIX_VERSION)
    if not command.is_file():
        raise StackError(f"{command} is missing from the cached venv; remove {folder} to "
                         "make it again")
    return command


def _get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return bytes(r.read())


def start_phoenix(*, extra_env: dict[str, str] | None = None) -> Server:
    """``phoenix serve`` on free ports, with its SQLite database in a temp folder.

    Ready once ``/healthz`` answers and the REST API lists projects. The OTLP/HTTP endpoint is
    ``{url}/v1/traces`` (Phoenix's own port); gRPC gets a free port too, so two runs never
    fight over 4317.
    """
    command = setup_phoenix_venv()
    port, grpc_port = free_port(), free_port()
    tmp = tempfile.TemporaryDirectory(prefix="toolmend-phoenix-")
    work = Path(tmp.name)
    env = {**os.environ, **OFFLINE_ENV, **(extra_env or {}),
           "PHOENIX_HOST": "127.0.0.1", "PHOENIX_PORT": str(port),
           "PHOENIX_GRPC_PORT": str(grpc_port), "PHOENIX_WORKING_DIR": str(work / "phoenix"),
           "HOME": str(work), "TMPDIR": str(work)}
    for k in ("VIRTUAL_ENV", "PYTHONPATH", "PHOENIX_SQL_DATABASE_URL",
              "PHOENIX_COLLECTOR_ENDPOINT"):
        env.pop(k, None)
    logfile = work / "phoenix.log"
    started = time.monotonic()
    with logfile.open("wb") as out:
        proc = subprocess.Popen([str(command), "serve"], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    server = Server("phoenix", f"http://127.0.0.1:{port}", proc, logfile, "", tmpdir=tmp,
                    extra={"grpc_port": grpc_port, "version": PHOENIX_VERSION})
    deadline = started + READY_TIMEOUT
    while True:
        if proc.poll() is not None:
            tail = _tail(logfile)
            server.stop()
            raise StackError(f"phoenix exited with {proc.returncode} before it was ready; "
                             f"log:\n{tail}")
        try:
            _get(server.url + "/healthz")
            doc = json.loads(_get(server.url + "/v1/projects"))
            if isinstance(doc, dict) and "data" in doc:
                break
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            tail = _tail(logfile)
            server.stop()
            raise StackError(f"phoenix not ready after {READY_TIMEOUT:.0f} s; log:\n{tail}")
        time.sleep(0.2)
    server.started_in = time.monotonic() - started
    log.info("phoenix ready at %s in %.1f s", server.url, server.started_in)
    return server


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tests.viewer.phoenix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=("build", "serve"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.cmd == "build":
        t = time.monotonic()
        print("phoenix:", setup_phoenix_venv(), f"{time.monotonic() - t:.1f} s")
        return 0
    server = start_phoenix()
    print(f"phoenix {PHOENIX_VERSION} ready at {server.url} in {server.started_in:.1f} s "
          f"(OTLP/HTTP {server.url}/v1/traces); log {server.logfile}", flush=True)

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    try:
        server.proc.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
