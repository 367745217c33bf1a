"""What the gateway remembers per routing key, bounded by count and by idle age.

Sticky routing (the ``manual`` policy, and ``--routing-key-override`` on any policy) keeps a
key's worker for as long as the key is used. Clients choose the keys, so the memory is
bounded twice: by count (a new key beyond ``max_keys`` pushes out the least recently used
one) and by idle age (a sweep every minute forgets keys unused for ``max_idle_secs``). The
dict is kept in order of last use (a use moves its key to the end), so both the eviction
and the sweep start at the front and stop at the first key still wanted: neither scans the
whole memory.

At 100,000 keys the memory holds some 25 MB (a key of a few dozen bytes, a URL, a tuple and
the dict's slot each).
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from itertools import islice
from typing import Generic, TypeVar

from shunter.aio.periodic import Periodic

V = TypeVar("V")

DEFAULT_MAX_KEYS = 100_000
SWEEP_INTERVAL_SECS = 60.0


class KeyMemory(Generic[V]):
    __slots__ = ("_entries", "_sweeper", "max_idle_secs", "max_keys")

    def __init__(self, max_idle_secs: float, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.max_idle_secs = max_idle_secs
        self.max_keys = max_keys
        self._entries: dict[Hashable, tuple[V, float]] = {}
        self._sweeper = Periodic("routing-key sweep", SWEEP_INTERVAL_SECS, self.sweep)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, slot: Hashable) -> V | None:
        """What is remembered for ``slot`` (not counted as a use: ``put`` it again)."""
        entry = self._entries.get(slot)
        return None if entry is None else entry[0]

    def put(self, slot: Hashable, value: V) -> None:
        """Remember ``value`` for ``slot``, used now."""
        entries = self._entries
        if entries.pop(slot, None) is None and len(entries) >= self.max_keys:
            del entries[next(iter(entries))]  # the least recently used
        entries[slot] = (value, time.monotonic())

    def forget(self, slot: Hashable) -> None:
        self._entries.pop(slot, None)

    def sweep(self, now: float | None = None) -> int:
        """Forget keys idle for longer than ``max_idle_secs``; returns how many went."""
        cutoff = (time.monotonic() if now is None else now) - self.max_idle_secs
        entries = self._entries
        stale = 0
        for _, used in entries.values():
            if used >= cutoff:
                break
            stale += 1
        for slot in list(islice(entries, stale)):
            del entries[slot]
        return stale

    def start(self) -> None:
        self._sweeper.start()

    async def stop(self) -> None:
        await self._sweeper.stop()
