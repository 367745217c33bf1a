"""Stop strings over streamed text: emit what cannot be the start of a stop string.

Text that could still grow into a stop string is held back (at most the longest stop
string minus one character); when a stop string completes, the text before it is released
and the output ends. ``no_stop_trim`` keeps the stop string in the output.
"""

from __future__ import annotations

from collections.abc import Sequence


def partial_tag(text: str, tag: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``tag``: what
    must be held back in case the next text completes ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class StopStrings:
    __slots__ = ("_held", "_keep", "_stops", "matched", "stopped")

    def __init__(self, stops: Sequence[str], no_stop_trim: bool = False) -> None:
        self._stops = tuple(s for s in stops if s)
        self._keep = no_stop_trim
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string found

    def feed(self, text: str) -> str:
        """The part of ``text`` (after what was held) that is safe to emit."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buffer = self._held + text
        first: tuple[int, str] | None = None
        for stop in self._stops:
            at = buffer.find(stop)
            if at >= 0 and (first is None or at < first[0]):
                first = (at, stop)
        if first is not None:
            self.stopped = True
            self._held = ""
            at, stop = first
            self.matched = stop
            return buffer[: at + len(stop)] if self._keep else buffer[:at]
        hold = max(partial_tag(buffer, stop) for stop in self._stops)
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        """The held text, when the output ends without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
