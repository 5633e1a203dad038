"""Token bytes to text deltas, holding back what might become a stop string.

A token is a piece of bytes that may end inside a UTF-8 character, and a stop string may
span several tokens. This class emits only text that can no longer turn into a stop
string, so the caller never sees a stop string (or half of one) in the output.
"""

from __future__ import annotations

import codecs

__all__ = ["TextStream"]


class TextStream:
    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = stops
        self._pending = ""  # decoded but not emitted (could start a stop string)
        self.stopped = False
        self.stopped_by: str | None = None  # the stop string that ended the text

    def feed(self, piece: bytes) -> str:
        """Add a token's bytes; return the text that is now safe to emit."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(piece)
        if not self._stops:
            out, self._pending = self._pending, ""
            return out
        first = self._first_stop()
        if first is not None:
            cut, self.stopped_by = first
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        hold = self._held_suffix()
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold :]
        return out

    def flush(self) -> str:
        """The end of generation: everything not part of a stop string is emitted."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        out, self._pending = self._pending, ""
        return out

    def _first_stop(self) -> tuple[int, str] | None:
        """Where the first stop string begins, and which one it is."""
        found = [(at, stop) for stop in self._stops if (at := self._pending.find(stop)) >= 0]
        return min(found) if found else None

    def _held_suffix(self) -> int:
        """Length of the longest suffix of pending text that begins some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best
