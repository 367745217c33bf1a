"""``power_of_two``: two distinct random workers, the less loaded wins.

Loads come from the load monitor (``fleet/load_monitor.py``): each worker's own report
(SGLang ``/v1/loads``, vLLM and llama.cpp ``/metrics``). When both candidates have a report
they are compared on it, the gateway's in-flight count breaking ties; when either report is
missing they are compared on the gateway's in-flight counts. An unreadable load is unknown,
never "zero" (smg passed its -1 through, so a failing worker looked least loaded).
"""

from __future__ import annotations

import random as _random

from shunter.fleet.registry import Workers
from shunter.fleet.worker import Worker
from shunter.policies.base import Policy, RouteRequest, available


class PowerOfTwoPolicy(Policy):
    name = "power_of_two"
    reason = "less_loaded_of_two"

    def __init__(self, rng: _random.Random | None = None) -> None:
        self._rng = rng or _random.Random()

    def select(self, workers: Workers, request: RouteRequest) -> Worker | None:
        count = len(workers)
        if count == 0:
            return None
        if count == 1:
            return workers[0] if workers[0].state.available else None
        draw = self._rng.random
        first = int(draw() * count)
        second = (first + 1 + int(draw() * (count - 1))) % count
        a, b = workers[first], workers[second]
        if not (a.state.available and b.state.available):
            candidates = available(workers)
            if len(candidates) < 2:
                return candidates[0] if candidates else None
            a, b = self._rng.sample(candidates, 2)
        return b if _load(b, a) < _load(a, b) else a


def _load(worker: Worker, other: Worker) -> tuple[int, int]:
    reported, other_reported = worker.state.reported_load, other.state.reported_load
    if reported is not None and other_reported is not None:
        return reported, worker.state.in_flight
    return worker.state.in_flight, 0
