"""Stop strings matched on decoded text, so a stop split across tokens is still caught and never emitted."""

from __future__ import annotations


class StopStringFilter:
    """Streams text through, holding back any tail that could still grow into a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Returns the text that is safe to emit; sets `stopped` once a stop string appears."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return buf[: min(hits)]
        keep = self._held_back(buf)
        self._pending = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The held-back tail, once generation ended without a stop string."""
        tail, self._pending = self._pending, ""
        return "" if self.stopped else tail

    def _held_back(self, buf: str) -> int:
        # Longest suffix of `buf` that is a proper prefix of some stop string.
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), longest, -1):
                if buf.endswith(stop[:n]):
                    longest = n
                    break
        return longest
