"""Stored responses, for ``previous_response_id`` and ``GET``/``DELETE /v1/responses/{id}``.

In memory and bounded three ways (configuration: ``responses_store_max``,
``responses_store_bytes``, ``responses_store_ttl``): a count, a size, and an age. Each entry is
charged for the whole conversation it holds (the history it continues plus its own request and
output), an upper bound of what keeping it alive costs, since an entry keeps the items of the
response it continues alive even after that one is dropped. The oldest go first; an expired one
is gone for ``previous_response_id`` as for ``GET``.

Each entry belongs to the API key's agent that made it (``None`` without keys): another key
cannot read, continue or delete it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class StoredResponse:
    response: dict[str, Any]
    #: the conversation before this response's output: the continued response's items, then
    #: this request's input items (``instructions`` are not carried over, as in the API)
    items: list[Any]
    owner: str | None
    size: int
    at: float

    def history(self) -> list[Any]:
        """What a response continuing this one reads first: its items, then its output."""
        return [*self.items, *self.response.get("output", ())]


class ResponseStore:
    def __init__(self, max_items: int, max_bytes: int, ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, rid: str, response: dict[str, Any], items: list[Any], owner: str | None,
            size: int) -> bool:
        """Keep a response; False when it alone is over the size limit (not kept)."""
        if self.max_items <= 0 or size > self.max_bytes:
            return False
        self.delete(rid)
        self._entries[rid] = StoredResponse(response, items, owner, size, self._clock())
        self.bytes += size
        self._expire()
        while len(self._entries) > self.max_items or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        return True

    def get(self, rid: str, owner: str | None) -> StoredResponse | None:
        self._expire()
        entry = self._entries.get(rid)
        if entry is None or entry.owner != owner:
            return None
        return entry

    def delete(self, rid: str, owner: str | None = None, *, any_owner: bool = True) -> bool:
        entry = self._entries.get(rid)
        if entry is None or (not any_owner and entry.owner != owner):
            return False
        self._drop(rid)
        return True

    def _expire(self) -> None:
        if self.ttl <= 0:
            return
        oldest = self._clock() - self.ttl
        while self._entries:
            rid, entry = next(iter(self._entries.items()))
            if entry.at > oldest:
                break
            self._drop(rid)

    def _drop(self, rid: str) -> None:
        entry = self._entries.pop(rid)
        self.bytes -= entry.size
