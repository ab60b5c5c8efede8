"""The real agent CLIs the tests drive, installed from this folder's pinned project files.

``package.json`` here pins every CLI at an exact version (Claude Code, Codex) and
``package-lock.json`` is the lock npm made from it. :func:`install` runs ``npm ci`` on copies of
the two in a cache folder (``$TOOLMEND_CACHE``, default ``~/.cache/toolmend``, as the real stacks
use) named after their hash, so exactly the locked versions are installed, a new pin installs
afresh and an unchanged one is reused. The folder counts as made only once its ``READY`` stamp
exists (an interrupted install is redone, never half-reused), and a file lock serialises two
runs that install at once. Node.js and npm are prerequisites: without them a test that needs a
CLI fails with the reason, never skips.

By hand: ``python -m tests.clients.npm`` installs and prints each CLI's path.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from tests.real.stacks import StackError, _locked, _made, _run, _stamp, cache_root

HERE = Path(__file__).resolve().parent
FILES = ("package.json", "package-lock.json")
#: the npm package of each CLI, and the command it puts in ``node_modules/.bin``
CLIS = {"claude": "@anthropic-ai/claude-code", "codex": "@openai/codex"}


def pinned_version(command: str) -> str:
    """The exact version ``package.json`` pins for the package of ``command``."""
    return str(json.loads((HERE / "package.json").read_text())["dependencies"][CLIS[command]])


def clients_dir() -> Path:
    digest = hashlib.sha256(b"".join((HERE / f).read_bytes() for f in FILES)).hexdigest()[:16]
    return cache_root() / f"npm-clients-{digest}"


def install() -> Path:
    """The folder holding ``node_modules`` with every pinned CLI (installed once)."""
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
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for f in FILES:
            shutil.copy2(HERE / f, dest / f)
        _run([npm, "ci", "--no-audit", "--no-fund", "--loglevel", "error"],
             dest.with_suffix(".log"), cwd=dest)
        _stamp(dest, **{package: pinned_version(cmd) for cmd, package in CLIS.items()})
    return dest


def cli(command: str) -> Path:
    """The path of one pinned CLI (``claude`` or ``codex``), installed if it is not yet."""
    if command not in CLIS:
        raise StackError(f"no CLI {command!r} in tests/clients/package.json; "
                         f"known: {', '.join(CLIS)}")
    path = install() / "node_modules" / ".bin" / command
    if not path.exists():
        raise StackError(f"npm ci did not install {CLIS[command]} at {path}")
    return path


if __name__ == "__main__":
    for name in CLIS:
        print(name, pinned_version(name), cli(name))
