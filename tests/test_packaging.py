"""The built wheel holds every module of the source tree, under the names the code imports.

An editable install imports straight from the tree, so a package missing from the wheel would
pass every other test and break only for users who install the wheel; this test builds it.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: source folder -> the installed package it becomes
ROOTS = {"proxy": "toolmend", "parsers": "toolmend/parsers", "fixtures": "toolmend/fixtures"}


def _tree_files() -> set[str]:
    want: set[str] = set()
    for folder, installed in ROOTS.items():
        for path in (ROOT / folder).rglob("*"):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            if path.suffix == ".py" or (folder == "fixtures"
                                        and path.suffix in {".json", ".jsonl", ".txt"}):
                want.add(f"{installed}/{path.relative_to(ROOT / folder).as_posix()}")
    return want


def test_wheel_contains_every_module_of_the_tree(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True)
    wheels = list(tmp_path.glob("toolmend-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as zf:
        names = set(zf.namelist())
    want = _tree_files()
    assert "toolmend/server/app.py" in want  # the walk found the tree at all
    missing = sorted(want - names)
    assert not missing, f"modules in the tree but not in the wheel: {missing}"
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheels[0]) as zf:
        assert "toolmend = toolmend.server.cli:main" in zf.read(entry).decode()
