"""``round_robin``: each request to the next available worker, one counter per policy."""

from __future__ import annotations

from shunter.fleet.registry import Workers
from shunter.fleet.worker import Worker
from shunter.policies.base import Policy, RouteRequest


class RoundRobinPolicy(Policy):
    name = "round_robin"
    reason = "round_robin"

    def __init__(self) -> None:
        self._counter = 0

    def select(self, workers: Workers, request: RouteRequest) -> Worker | None:
        count = len(workers)
        if not count:
            return None
        start = self._counter
        for offset in range(count):
            worker = workers[(start + offset) % count]
            if worker.state.available:
                self._counter = start + offset + 1
                return worker
        return None

    def reset(self) -> None:
        self._counter = 0
