"""``manual``: sticky routing by a key the client chooses.

As smg's manual policy: the key is the ``X-SMG-Routing-Key`` header, or the body's
``routing_id``. A known key goes to the first available of its (at most two) workers; a new
key, or one whose workers are all gone, is assigned a random available worker, which is
remembered. Without a key, a random worker. Keys unused for ``max_idle_secs`` are forgotten
by a sweep every minute. New workers never take over existing keys.
"""

from __future__ import annotations

import random as _random
import time

from shunter.aio.periodic import Periodic
from shunter.fleet.registry import Workers
from shunter.fleet.worker import Worker
from shunter.policies.base import Decision, Policy, RouteRequest, UrlIndexes
from shunter.policies.consistent_hashing import KEY_HEADER

MAX_CANDIDATES = 2
SWEEP_INTERVAL_SECS = 60.0


class ManualPolicy(Policy):
    name = "manual"

    def __init__(self, max_idle_secs: float = 4 * 3600, rng: _random.Random | None = None):
        self.max_idle_secs = max_idle_secs
        self._rng = rng or _random.Random()
        self.assignments: dict[tuple[str, str], tuple[list[str], float]] = {}
        self._indexes = UrlIndexes()
        self._sweeper = Periodic("routing-key sweep", SWEEP_INTERVAL_SECS, self.sweep)

    def select(self, workers: Workers, request: RouteRequest) -> Worker | None:
        return self.decide(workers, request).worker

    def decide(self, workers: Workers, request: RouteRequest) -> Decision:
        """Reasons: ``sticky`` (the key's remembered worker), ``new_key`` (a worker drawn
        for a key seen for the first time, or whose workers are gone), ``random`` (no key)."""
        if not workers:
            return Decision(None, "sticky")
        raw = request.header(KEY_HEADER)
        key = raw.decode("latin-1") if raw is not None else request.routing_id
        candidates = [w for w in workers if w.state.available]
        if not candidates:
            return Decision(None, "sticky")
        if key is None:
            return Decision(self._rng.choice(candidates), "random")
        by_url = self._indexes.of(request.model, workers)
        slot = (request.model, key)
        urls, _ = self.assignments.get(slot, ([], 0.0))
        for url in urls:
            worker = by_url.get(url)
            if worker is not None and worker.state.available:
                self.assignments[slot] = (urls, time.monotonic())
                return Decision(worker, "sticky")
        chosen = self._rng.choice(candidates)
        urls = [*urls, chosen.url][-MAX_CANDIDATES:]
        self.assignments[slot] = (urls, time.monotonic())
        return Decision(chosen, "new_key")

    def sweep(self, now: float | None = None) -> int:
        """Forget keys idle for longer than ``max_idle_secs``; returns how many went."""
        cutoff = (time.monotonic() if now is None else now) - self.max_idle_secs
        stale = [slot for slot, (_, used) in self.assignments.items() if used < cutoff]
        for slot in stale:
            del self.assignments[slot]
        return len(stale)

    def start(self) -> None:
        self._sweeper.start()

    async def stop(self) -> None:
        await self._sweeper.stop()
