"""Reading an upstream body whole, with a bound.

``ClientResponse.read()`` keeps whatever the upstream sends: a 100 MB reply is 100 MB of RSS
before anyone looks at it, and a hostile or broken server can send far more. Every place that
reads an upstream body whole goes through :func:`read_bounded` instead, which stops at the bound
and says whether the body ended before it. (``StreamReader.read(n)`` is no substitute: it returns
whatever happens to be buffered, up to ``n``, so a body that arrives in several pieces is cut.)
"""

from __future__ import annotations

from typing import Protocol

#: Enough of an upstream's error body for the message toolmend relays (it keeps 2,000 chars).
ERROR_BODY_BYTES = 64 * 1024


class Readable(Protocol):
    """What is read: aiohttp's ``StreamReader``, or the upstream client's ``http1.Body``."""

    async def readany(self) -> bytes: ...


async def read_bounded(content: Readable, limit: int, *,
                       keep_prefix: bool = False) -> tuple[bytes, bool]:
    """The body, and True, when it ends within ``limit`` bytes; else what ``keep_prefix``
    asks for (the first ``limit`` bytes, or nothing) and False.

    Reading stops at the bound, so memory never exceeds it by more than one network chunk.
    The bytes gather in one buffer (not a list of chunks joined at the end), so a reply that
    is refused costs its bound once and gives the memory back when it is dropped.
    """
    buf = bytearray()
    while True:
        chunk = await content.readany()
        if not chunk:
            return bytes(buf), True
        if len(buf) + len(chunk) > limit:
            if not keep_prefix:
                return b"", False
            buf += chunk[:limit - len(buf)]
            return bytes(buf), False
        buf += chunk
