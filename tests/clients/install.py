"""Install the real agent CLIs the tests drive, from the project's own pinned files.

Each CLI has a folder here (``claude-code/``) with a ``package.json`` that pins its exact
version and the ``package-lock.json`` made from it. :func:`install` runs ``npm ci`` on copies of
the two files in a cache folder named after the lock file's hash (``$TOOLMEND_CACHE``, default
``~/.cache/toolmend``, as the real stacks use), so CI installs exactly what the lock file says
and a second run reuses it. A folder counts as installed only once its ``READY`` stamp exists,
and a file lock serialises two runs that install at once. A missing ``npm`` fails with the
reason: the test that needs the CLI must fail, never skip.

By hand: ``python -m tests.clients.install claude-code`` prints the path of the binary.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: the command each client's package puts in node_modules/.bin
BINARIES = {"claude-code": "claude"}


class ClientInstallError(RuntimeError):
    """A CLI could not be installed; the message says why."""


def cache_root() -> Path:
    env = os.environ.get("TOOLMEND_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "toolmend"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def pinned_version(name: str) -> str:
    """The exact version ``package.json`` pins for the client's main package."""
    import json

    deps = json.loads((HERE / name / "package.json").read_text())["dependencies"]
    [version] = deps.values()
    return str(version)


def install(name: str) -> Path:
    """The client's binary, installed from its lock file (once per lock file)."""
    src = HERE / name
    lock = src / "package-lock.json"
    if not lock.exists():
        raise ClientInstallError(f"{lock} is missing")
    npm = shutil.which("npm")
    if npm is None:
        raise ClientInstallError("npm is not on PATH: install Node.js 20+ and npm to run the "
                                 f"{name} test")
    digest = hashlib.sha256(lock.read_bytes() + (src / "package.json").read_bytes())
    folder = cache_root() / "npm" / f"{name}-{digest.hexdigest()[:16]}"
    binary = folder / "node_modules" / ".bin" / BINARIES[name]
    with _locked(cache_root() / "npm" / f"{name}.lock"):
        if (folder / "READY").exists() and binary.exists():
            return binary
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for f in ("package.json", "package-lock.json"):
            shutil.copy2(src / f, folder / f)
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=folder,
                              capture_output=True, text=True, timeout=900, check=False)
        if proc.returncode != 0 or not binary.exists():
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise ClientInstallError(f"npm ci for {name} failed (exit {proc.returncode}):\n"
                                     f"{tail}")
        (folder / "READY").write_text(pinned_version(name) + "\n")
    return binary


if __name__ == "__main__":
    print(install(sys.argv[1] if len(sys.argv) > 1 else "claude-code"))
