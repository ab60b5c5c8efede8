"""Install the real agent CLIs the tests drive, from the project's own pinned files.

Each CLI has a folder here (``claude-code/``) with a ``package.json`` that pins its exact
version and the ``package-lock.json`` made from it. :func:`install` runs ``npm ci`` on copies of
the two files in a cache folder named after their hash (``$TOOLMEND_CACHE``, default
``~/.cache/toolmend``, as the real stacks use), so CI installs exactly what the lock file says
and a later run reuses it. A folder counts as installed only once its ``READY`` stamp exists
(an interrupted install is redone), and a file lock serialises two runs that install at once.
Without node and npm the test that needs the CLI fails with the reason, never skips.

By hand: ``python -m tests.clients.install claude-code`` prints the path of the binary.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

from tests.real.stacks import StackError, _locked, _made, _run, _stamp, cache_root

HERE = Path(__file__).resolve().parent
FILES = ("package.json", "package-lock.json")
#: the command each client's package puts in node_modules/.bin
BINARIES = {"claude-code": "claude"}


def pinned_version(name: str) -> str:
    """The exact version ``package.json`` pins for the client's package."""
    [version] = json.loads((HERE / name / "package.json").read_text())["dependencies"].values()
    return str(version)


def client_dir(name: str) -> Path:
    src = HERE / name
    digest = hashlib.sha256(b"".join((src / f).read_bytes() for f in FILES)).hexdigest()[:16]
    return cache_root() / f"npm-{name}-{digest}"


def install(name: str) -> Path:
    """The client's binary, installed from its lock file (once per lock file)."""
    dest = client_dir(name)
    binary = dest / "node_modules" / ".bin" / BINARIES[name]
    if not _made(dest):
        npm = shutil.which("npm")
        if npm is None or shutil.which("node") is None:
            raise StackError(f"node and npm are needed to install the {name} CLI from "
                             f"tests/clients/{name} (Node.js 20 or newer)")
        with _locked(f"npm-{name}"):
            if not _made(dest):
                if dest.exists():
                    shutil.rmtree(dest)
                dest.mkdir(parents=True)
                for f in FILES:
                    shutil.copy2(HERE / name / f, dest / f)
                _run([npm, "ci", "--no-audit", "--no-fund", "--loglevel", "error"],
                     dest.with_suffix(".log"), cwd=dest)
                _stamp(dest, version=pinned_version(name))
    if not binary.exists():
        raise StackError(f"npm ci did not install the {name} CLI at {binary}")
    return binary


if __name__ == "__main__":
    print(install(sys.argv[1] if len(sys.argv) > 1 else "claude-code"))
