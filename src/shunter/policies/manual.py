"""``manual``: sticky routing by a key the client chooses.

As smg's manual policy: the key is the ``X-SMG-Routing-Key`` header, or the body's
``routing_id``. A known key goes to the first available of its (at most two) workers; a new
key, or one whose workers are all gone, is assigned a random available worker, which is
remembered. Without a key, a random worker. Keys unused for ``max_idle_secs`` are forgotten
by a sweep every minute, and at most ``max_keys`` are kept (``keys.py``). New workers never
take over existing keys.
"""

from __future__ import annotations

import random as _random

from shunter.fleet.registry import Workers
from shunter.fleet.worker import Worker
from shunter.policies.base import Decision, Policy, RouteRequest, UrlIndexes
from shunter.policies.consistent_hashing import KEY_HEADER
from shunter.policies.keys import DEFAULT_MAX_KEYS, KeyMemory

MAX_CANDIDATES = 2


class ManualPolicy(Policy):
    name = "manual"

    def __init__(
        self,
        max_idle_secs: float = 4 * 3600,
        rng: _random.Random | None = None,
        max_keys: int = DEFAULT_MAX_KEYS,
    ):
        self._rng = rng or _random.Random()
        # (model, key) -> the key's workers' URLs, most recent last
        self.assignments: KeyMemory[list[str]] = KeyMemory(max_idle_secs, max_keys)
        self._indexes = UrlIndexes()

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
        urls = self.assignments.get(slot) or []
        for url in urls:
            worker = by_url.get(url)
            if worker is not None and worker.state.available:
                self.assignments.put(slot, urls)
                return Decision(worker, "sticky")
        chosen = self._rng.choice(candidates)
        self.assignments.put(slot, [*urls, chosen.url][-MAX_CANDIDATES:])
        return Decision(chosen, "new_key")

    def sweep(self, now: float | None = None) -> int:
        """Forget keys idle for longer than ``max_idle_secs``; returns how many went."""
        return self.assignments.sweep(now)

    def start(self) -> None:
        self.assignments.start()

    async def stop(self) -> None:
        await self.assignments.stop()
