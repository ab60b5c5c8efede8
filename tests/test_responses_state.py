"""What the Responses front keeps: the bounded store of responses, and the signed reasoning a
client brings back (``encrypted_content``)."""

from __future__ import annotations

import base64
from pathlib import Path

from toolmend.fronts.responses import SEAL_PURPOSE, open_sealed, seal
from toolmend.fronts.responses_store import ResponseStore
from toolmend.server.signing import Signer, load_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def doc(rid: str) -> dict:
    return {"id": rid, "output": [{"type": "message", "id": f"msg_{rid}"}]}


def test_count_limit_drops_the_oldest() -> None:
    store = ResponseStore(max_items=2, max_bytes=10_000, ttl=60, clock=Clock())
    for rid in ("a", "b", "c"):
        assert store.put(rid, doc(rid), [], None, 10)
    assert store.get("a", None) is None
    assert store.get("b", None) is not None and store.get("c", None) is not None
    assert len(store) == 2 and store.bytes == 20


def test_size_limit_drops_the_oldest_and_refuses_what_alone_is_too_big() -> None:
    store = ResponseStore(max_items=100, max_bytes=100, ttl=60, clock=Clock())
    assert store.put("a", doc("a"), [], None, 60)
    assert store.put("b", doc("b"), [], None, 50)  # 110 > 100: a goes
    assert store.get("a", None) is None and store.bytes == 50
    assert not store.put("huge", doc("huge"), [], None, 101)
    assert store.get("huge", None) is None and store.bytes == 50


def test_age_limit() -> None:
    clock = Clock()
    store = ResponseStore(max_items=10, max_bytes=1000, ttl=60, clock=clock)
    store.put("a", doc("a"), [], None, 1)
    clock.now += 30
    store.put("b", doc("b"), [], None, 1)
    clock.now += 30  # a is 60 s old
    assert store.get("a", None) is None
    assert store.get("b", None) is not None
    assert len(store) == 1 and store.bytes == 1


def test_history_is_the_items_then_the_output() -> None:
    store = ResponseStore(max_items=10, max_bytes=1000, ttl=60, clock=Clock())
    store.put("a", doc("a"), [{"role": "user", "content": "hi"}], None, 1)
    entry = store.get("a", None)
    assert entry is not None
    assert entry.history() == [{"role": "user", "content": "hi"},
                               {"type": "message", "id": "msg_a"}]


def test_a_response_belongs_to_its_keys_agent() -> None:
    store = ResponseStore(max_items=10, max_bytes=1000, ttl=60, clock=Clock())
    store.put("a", doc("a"), [], "planner", 1)
    assert store.get("a", "coder") is None and store.get("a", None) is None
    assert not store.delete("a", "coder", any_owner=False)
    assert store.get("a", "planner") is not None
    assert store.delete("a", "planner", any_owner=False)
    assert store.get("a", "planner") is None and store.bytes == 0


def test_nothing_kept_when_the_count_is_zero() -> None:
    store = ResponseStore(max_items=0, max_bytes=1000, ttl=60, clock=Clock())
    assert not store.put("a", doc("a"), [], None, 1)
    assert len(store) == 0


# --- encrypted_content -------------------------------------------------------------------------

def signer(tmp_path: Path, secret: str = "k1") -> Signer:
    return Signer(load_key(secret, str(tmp_path)))


def test_sealed_reasoning_opens_with_the_same_key_only(tmp_path: Path) -> None:
    s = signer(tmp_path)
    value = seal(s, "Think about Oslo, é ✓.")
    assert value.startswith("tm1.") and "Oslo" not in value
    assert open_sealed(s, value) == "Think about Oslo, é ✓."
    assert open_sealed(signer(tmp_path, "k1"), value) == "Think about Oslo, é ✓."  # replica
    assert open_sealed(signer(tmp_path, "k2"), value) is None


def test_altered_or_foreign_values_do_not_open(tmp_path: Path) -> None:
    s = signer(tmp_path)
    value = seal(s, "original")
    _, body, mac = value.split(".")
    other = base64.urlsafe_b64encode(b"altered").rstrip(b"=").decode()
    assert open_sealed(s, f"tm1.{other}.{mac}") is None  # text changed, signature kept
    assert open_sealed(s, f"tm1.{body}.{mac[:-1]}0") is None  # signature changed
    assert open_sealed(s, "gAAAAABo-an-openai-encrypted-blob") is None
    assert open_sealed(s, "tm1.!!!.abc") is None
    assert open_sealed(s, "tm1.") is None
    raw = b"\xff\xfe"  # signed, but not UTF-8
    bad = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    assert open_sealed(s, f"tm1.{bad}.{s.sign(SEAL_PURPOSE, raw)}") is None
    # signed for another purpose (a thinking signature): not reasoning of this front
    text = base64.urlsafe_b64encode(b"x").rstrip(b"=").decode()
    assert open_sealed(s, f"tm1.{text}.{s.sign('thinking', b'x')}") is None
