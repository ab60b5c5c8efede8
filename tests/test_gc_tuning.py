"""The collector settings ``toolmend serve`` applies once it is up (``server/gc_tuning.py``)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import gc
before = gc.get_freeze_count()
from toolmend.server import gc_tuning
gc_tuning.settle()
print(before, gc.get_freeze_count() > 1000, gc.get_threshold())
"""


def test_settle_freezes_startup_objects_and_raises_the_first_threshold() -> None:
    # in a child: freezing is for the whole process, and must not leak into the test run
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         check=True).stdout.strip().split(maxsplit=2)
    assert out == ["0", "True", "(2000, 10, 10)"]
