"""``consistent_hashing``: the same key always lands on the same worker while it is up.

As smg: ``X-SMG-Target-Worker`` (an index into the model's workers, or a worker URL) routes
straight to that worker, or nowhere if it is unavailable; otherwise ``X-SMG-Routing-Key``
is hashed onto a ring of 150 virtual nodes per worker, walking clockwise to the first
available worker; without it the key is taken from ``Authorization``, then
``X-Forwarded-For``, then ``Cookie``; with none of those, a random worker.
"""

from __future__ import annotations

import random as _random

from shunter.fleet.registry import Workers
from shunter.fleet.worker import Worker
from shunter.policies.base import Decision, Policy, RouteRequest
from shunter.policies.random import RandomPolicy
from shunter.policies.ring import RingCache

TARGET_HEADER = b"x-smg-target-worker"
KEY_HEADER = b"x-smg-routing-key"
IMPLICIT_KEY_HEADERS = (b"authorization", b"x-forwarded-for", b"cookie")


class ConsistentHashingPolicy(Policy):
    name = "consistent_hashing"

    def __init__(self, rng: _random.Random | None = None) -> None:
        self._rings = RingCache()
        self._fallback = RandomPolicy(rng)

    def select(self, workers: Workers, request: RouteRequest) -> Worker | None:
        return self.decide(workers, request).worker

    def decide(self, workers: Workers, request: RouteRequest) -> Decision:
        """Reasons: ``target_worker`` (the header named it), ``routing_key`` (the key's
        place on the ring), ``random`` (no key)."""
        if not workers:
            return Decision(None, "routing_key")
        target = request.header(TARGET_HEADER)
        if target is not None:
            return Decision(_target(workers, target.decode("latin-1").strip()), "target_worker")
        key = request.header(KEY_HEADER)
        for name in IMPLICIT_KEY_HEADERS:
            if key is not None:
                break
            key = request.header(name)
        if key is None:
            return Decision(self._fallback.select(workers, request), "random")
        return Decision(self._rings.ring(request.model, workers).lookup(key), "routing_key")


def _target(workers: Workers, target: str) -> Worker | None:
    if target.isdigit():
        index = int(target)
        worker = workers[index] if index < len(workers) else None
    else:
        worker = next((w for w in workers if w.url == target.rstrip("/")), None)
    return worker if worker is not None and worker.state.available else None
