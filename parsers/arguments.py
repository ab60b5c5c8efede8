"""A tool call's argument text as it accumulates, fragment by fragment, in linear time.

Arguments arrive in thousands of small fragments. ``text += fragment`` on an attribute copies
everything so far on every fragment (CPython appends in place only to a local variable), which
made a 90 MB call cost 79 s; and asking "is this complete JSON yet?" of the whole text on every
fragment re-scans it each time. Here fragments go into a list that is joined once when the
whole is read, the newest fragments can be read without joining the rest, and completeness is
tracked by a scanner fed each fragment once.
"""

from __future__ import annotations

import orjson

from .formats.base import JsonScanner


class ArgumentText:
    """Fragments of one call's argument text; ``size`` is its length in characters."""

    __slots__ = ("_junk", "_parts", "_scanner", "_whole", "size")

    def __init__(self, text: str = "") -> None:
        self._parts: list[str] = [text] if text else []
        self.size = len(text)
        self._scanner: JsonScanner | None = None  # created by the first whole_json()
        self._junk = False  # non-space text after the scanned value: not one JSON value
        self._whole: bool | None = None  # orjson's verdict once the brackets balanced

    def add(self, fragment: str) -> None:
        self._parts.append(fragment)
        self.size += len(fragment)
        if self._scanner is not None:
            self._scan(fragment)

    def text(self) -> str:
        """The whole text; the fragments are joined once and kept joined."""
        parts = self._parts
        if len(parts) > 1:
            parts[:] = ["".join(parts)]
        return parts[0] if parts else ""

    def tail(self, start: int) -> str:
        """The text from character ``start`` on, joining only the fragments it spans (the
        newest), so streaming arguments on as they come stays linear."""
        need = self.size - start
        if need <= 0:
            return ""
        taken: list[str] = []
        got = 0
        for part in reversed(self._parts):
            taken.append(part)
            got += len(part)
            if got >= need:
                break
        text = "".join(reversed(taken))
        return text[len(text) - need:]

    def whole_json(self) -> bool:
        """Whether the text so far is one complete JSON object or array. The text is scanned
        once, then each fragment as it is added, however often this is asked."""
        if self._scanner is None:
            self._scanner = JsonScanner()
            self._scan(self.text())
        if self._junk or not self._scanner.done:
            return False
        if self._whole is None:  # the brackets balance; whether it parses is asked once
            try:
                orjson.loads(self.text())
                self._whole = True
            except orjson.JSONDecodeError:
                self._whole = False
        return self._whole

    def _scan(self, text: str) -> None:
        scanner = self._scanner
        assert scanner is not None
        if scanner.done:
            self._junk = self._junk or bool(text.strip())
            return
        k = scanner.feed(text)
        if k >= 0 and text[k:].strip():
            self._junk = True
