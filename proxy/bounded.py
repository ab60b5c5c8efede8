"""Reading an upstream body whole, with a bound.

``ClientResponse.read()`` keeps whatever the upstream sends: a 100 MB reply is 100 MB of RSS
before anyone looks at it, and a hostile or broken server can send far more. Every place that
reads an upstream body whole goes through :func:`read_bounded` instead, which stops at the bound
and says whether the body ended before it. (``StreamReader.read(n)`` is no substitute: it returns
whatever happens to be buffered, up to ``n``, so a body that arrives in several pieces is cut.)
"""

from __future__ import annotations

import aiohttp

#: Enough of an upstream's error body for the message toolmend relays (it keeps 2,000 chars).
ERROR_BODY_BYTES = 64 * 1024


async def read_bounded(content: aiohttp.StreamReader, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of the body; the flag is True when the body ended within them.

    Reading stops at the bound, so memory never exceeds it by more than one network chunk.
    """
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await content.readany()
        if not chunk:
            return b"".join(parts), True
        size += len(chunk)
        if size > limit:
            parts.append(chunk[:len(chunk) - (size - limit)])
            return b"".join(parts), False
        parts.append(chunk)
