"""The signing key: configured, or generated once into the state directory and kept."""

from __future__ import annotations

import stat
from pathlib import Path

from toolmend.server.signing import KEY_FILE, Signer, load_key


def test_generated_key_is_kept_and_private(tmp_path: Path) -> None:
    first = load_key("", str(tmp_path / "state"))
    path = tmp_path / "state" / KEY_FILE
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key("", str(tmp_path / "state")) == first  # survives a restart
    assert len(first) == 64


def test_configured_key_wins_and_is_shared(tmp_path: Path) -> None:
    a = Signer(load_key("shared secret", str(tmp_path / "a")))
    b = Signer(load_key("shared secret", str(tmp_path / "b")))
    sig = a.sign("thinking", b"I reasoned")
    assert b.verify("thinking", b"I reasoned", sig)  # a replica with the same key accepts it
    assert not (tmp_path / "a" / KEY_FILE).exists()  # nothing generated when configured


def test_signatures_are_bound_to_data_purpose_and_key(tmp_path: Path) -> None:
    s = Signer(load_key("k1", str(tmp_path)))
    other = Signer(load_key("k2", str(tmp_path)))
    sig = s.sign("thinking", b"abc")
    assert s.verify("thinking", b"abc", sig)
    assert not s.verify("thinking", b"abd", sig)
    assert not s.verify("reasoning", b"abc", sig)
    assert not other.verify("thinking", b"abc", sig)
    assert not s.verify("thinking", b"abc", "")
    assert not s.verify("thinking", b"abc", None)  # type: ignore[arg-type]
