"""Package discovery for setuptools; everything else is in pyproject.toml.

The source tree keeps the service (proxy/), the sans-I/O parsers (parsers/) and the scripted
upstream responses (fixtures/) side by side at the top; installed, they form one package,
``toolmend``. The sub-packages are found by walking those folders, not listed by hand, so an
editable install and the built wheel hold the same modules (tests/test_packaging.py checks it).
"""

from pathlib import Path

from setuptools import setup

ROOTS = {"toolmend": "proxy", "toolmend.parsers": "parsers", "toolmend.fixtures": "fixtures"}


def _packages() -> tuple[list[str], dict[str, str]]:
    here = Path(__file__).parent
    packages: list[str] = []
    dirs: dict[str, str] = {}
    for name, folder in ROOTS.items():
        for init in sorted((here / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(here / folder)
            pkg = ".".join((name, *rel.parts))
            packages.append(pkg)
            dirs[pkg] = init.parent.relative_to(here).as_posix()
    return packages, dirs


PACKAGES, PACKAGE_DIR = _packages()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR)
