"""A consistent-hash ring with virtual nodes, built per workers tuple (copy-on-write).

The registry publishes a new tuple whenever the fleet changes; a ring is built the first
time a tuple is seen and reused while that tuple is current, so readers never lock and a
change rebuilds the ring once.
"""

from __future__ import annotations

import bisect
import hashlib

from shunter.fleet.registry import Workers
from shunter.fleet.worker import Worker

VIRTUAL_NODES = 150


def position(key: str | bytes) -> int:
    data = key.encode() if isinstance(key, str) else key
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Ring:
    __slots__ = ("owners", "points", "workers")

    def __init__(self, workers: Workers) -> None:
        self.workers = workers
        entries = sorted(
            (position(f"{w.url}#{i}"), index)
            for index, w in enumerate(workers)
            for i in range(VIRTUAL_NODES)
        )
        self.points = [p for p, _ in entries]
        self.owners = [workers[i] for _, i in entries]

    def lookup(self, key: str | bytes) -> Worker | None:
        """The first available worker clockwise from the key's position."""
        if not self.points:
            return None
        start = bisect.bisect(self.points, position(key))
        total = len(self.points)
        seen: set[int] = set()
        for step in range(total):
            worker = self.owners[(start + step) % total]
            if worker.state.available:
                return worker
            seen.add(id(worker))
            if len(seen) == len(self.workers):
                break
        return None


class RingCache:
    """One ring per model, replaced when the model's workers tuple changes."""

    def __init__(self) -> None:
        self._rings: dict[str, Ring] = {}

    def ring(self, model: str, workers: Workers) -> Ring:
        ring = self._rings.get(model)
        if ring is None or ring.workers is not workers:
            ring = self._rings[model] = Ring(workers)
        return ring
