"""The viewer tier: a real Phoenix and a real ``toolmend sim``, each started once per run.

Set-up failures FAIL the tests that need them, with the reason (a missing venv, a port, a
crash at start-up): in CI a broken viewer must be seen, never skipped past.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.real.stacks import Server, StackError

from . import agent_session
from .phoenix import start_phoenix

_failures: dict[str, str] = {}


@pytest.fixture(scope="session")
def phoenix() -> Iterator[Server]:
    """``phoenix serve`` from its own cached venv, on free ports, SQLite in a temp folder."""
    if "phoenix" in _failures:
        pytest.fail(_failures["phoenix"], pytrace=False)
    try:
        server = start_phoenix()
    except StackError as e:
        _failures["phoenix"] = f"Phoenix could not be set up: {e}"
        pytest.fail(_failures["phoenix"], pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sim() -> Iterator[agent_session.SimProcess]:
    """``toolmend sim`` in its own process, scripted with the session's scenarios."""
    try:
        proc = agent_session.start_sim()
    except StackError as e:
        pytest.fail(f"toolmend sim could not be started: {e}", pytrace=False)
    try:
        yield proc
    finally:
        proc.stop()
