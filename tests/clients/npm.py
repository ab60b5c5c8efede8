"""Real agent CLIs from npm, installed from this folder's pinned ``package-lock.json``.

``npm ci`` installs exactly the locked versions into a folder of the cache
(``$TOOLMEND_CACHE``, default ``~/.cache/toolmend``) named after the lock file's hash, so a new
pin installs afresh and an unchanged one is reused; the folder counts as made only once its
``READY`` stamp exists. Node.js and npm are prerequisites: without them the tests that need a
CLI fail with the reason, never skip.

By hand: ``python -m tests.clients.npm`` installs and prints the folder.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

from tests.real.stacks import StackError, _locked, _made, _run, _stamp, cache_root

HERE = Path(__file__).resolve().parent
FILES = ("package.json", "package-lock.json")


def clients_dir() -> Path:
    digest = hashlib.sha256(b"".join((HERE / f).read_bytes() for f in FILES)).hexdigest()[:16]
    return cache_root() / f"npm-clients-{digest}"


def install() -> Path:
    """The folder holding ``node_modules`` with the pinned CLIs (installed once)."""
    dest = clients_dir()
    if _made(dest):
        return dest
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise StackError("node and npm are needed to install the CLIs in tests/clients "
                         "(Node.js 20 or newer)")
    with _locked("npm-clients"):
        if _made(dest):
            return dest
        if dest.exists():
            shutil.rmtree(dest)  # an interrupted install is redone, never half-reused
        dest.mkdir(parents=True)
        for f in FILES:
            shutil.copy2(HERE / f, dest / f)
        _run([npm, "ci", "--no-audit", "--no-fund", "--loglevel", "error"],
             dest.with_suffix(".log"), cwd=dest)
        _stamp(dest, lock=(HERE / "package-lock.json").name)
    return dest


def codex_bin() -> Path:
    path = install() / "node_modules" / ".bin" / "codex"
    if not path.exists():
        raise StackError(f"npm ci did not install the codex CLI at {path}")
    return path


if __name__ == "__main__":
    print(install())
    sys.exit(0)
