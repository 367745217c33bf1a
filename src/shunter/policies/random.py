"""``random``: a uniform choice among the available workers."""

from __future__ import annotations

import random as _random

from shunter.fleet.registry import Workers
from shunter.fleet.worker import Worker
from shunter.policies.base import Policy, RouteRequest, available


class RandomPolicy(Policy):
    name = "random"
    reason = "random"

    def __init__(self, rng: _random.Random | None = None) -> None:
        self._rng = rng or _random.Random()

    def select(self, workers: Workers, request: RouteRequest) -> Worker | None:
        if not workers:
            return None
        # Fast path: one draw, no copy; only when it lands on an unavailable worker do we
        # build the list of available ones (which keeps the choice uniform among them).
        worker = workers[int(self._rng.random() * len(workers))]
        if worker.state.available:
            return worker
        candidates = available(workers)
        return self._rng.choice(candidates) if candidates else None
