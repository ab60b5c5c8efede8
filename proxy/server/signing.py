"""The key that signs what toolmend hands a client to bring back later.

Anthropic thinking blocks carry a ``signature`` and Responses reasoning items an
``encrypted_content``; both come back in the client's next request, and toolmend must know
they are its own (and unaltered) before it shows them to the backend. The key comes from
``signing_key`` in the configuration; unset, a random one is generated once and kept in the
state directory, so it survives restarts, and replicas given the same key accept each other's.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

KEY_FILE = "signing.key"


def state_dir(configured: str) -> Path:
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "toolmend"


def load_key(configured_key: str, configured_dir: str) -> bytes:
    """The signing key: the configured secret, else the one kept in the state directory
    (created, readable by its owner only, on first use)."""
    if configured_key:
        return hashlib.sha256(configured_key.encode()).digest()
    folder = state_dir(configured_dir)
    path = folder / KEY_FILE
    try:
        raw = path.read_bytes().strip()
        if len(raw) >= 32:
            return raw
    except FileNotFoundError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    try:
        os.link(tmp, path)  # first writer wins when replicas start together
    except FileExistsError:
        key = path.read_bytes().strip()
    finally:
        tmp.unlink(missing_ok=True)
    return key


class Signer:
    """HMAC-SHA256 under one key, with a purpose label so that a value signed for one use
    (a thinking signature) cannot be replayed as another (an encrypted reasoning item)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    @property
    def key(self) -> bytes:
        return self._key

    def sign(self, purpose: str, data: bytes) -> str:
        mac = hmac.new(self._key, purpose.encode() + b"\0" + data, hashlib.sha256)
        return mac.hexdigest()

    def verify(self, purpose: str, data: bytes, signature: str) -> bool:
        if not isinstance(signature, str):
            return False
        return hmac.compare_digest(self.sign(purpose, data), signature)


#: signers made on first use, per app (an app that is already running cannot take a new key
#: without aiohttp's deprecation warning, and the key file is only read when needed)
_MADE: WeakKeyDictionary[Any, Signer] = WeakKeyDictionary()


def app_signer(app: object) -> Signer:
    """The app's signer: one put under ``SIGNER`` before start, else one made on first use
    (the key file is only touched by a front that signs something)."""
    from toolmend.server.keys import SETTINGS, SIGNER

    signer = app.get(SIGNER) or _MADE.get(app)  # type: ignore[attr-defined]
    if signer is None:
        settings = app[SETTINGS]  # type: ignore[index]
        signer = _MADE[app] = Signer(load_key(settings.signing_key, settings.state_dir))
    return signer
