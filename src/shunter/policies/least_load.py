"""``least_load``: the available worker with the lowest reported load (smg's ``least_load``).

Loads come from the load monitor (``fleet/load_monitor.py``): each worker's own report
(SGLang's ``/v1/loads`` tokens, vLLM's and llama.cpp's requests from ``/metrics``, gRPC's
``GetLoads``). When every available worker has a report, the lowest wins and the gateway's
in-flight count breaks ties; when any of them has none (an engine that reports nothing, or a
report that could not be read), all are compared on the in-flight count alone: an unknown
load is never taken for an idle worker, nor are the others judged on a figure it lacks.
Equally loaded workers take the requests in turn.

A report is as old as the polling interval: between two polls the gateway's own in-flight
count is the only thing that moves, which is why it breaks the ties.
"""

from __future__ import annotations

from shunter.fleet.registry import Workers
from shunter.fleet.worker import Worker
from shunter.policies.base import Decision, Policy, RouteRequest


class LeastLoadPolicy(Policy):
    name = "least_load"
    reason = "least_load"

    def __init__(self) -> None:
        self._turn = 0  # which of equally loaded workers takes the next request

    def select(self, workers: Workers, request: RouteRequest) -> Worker | None:
        return self.decide(workers, request).worker

    def decide(self, workers: Workers, request: RouteRequest) -> Decision:
        """Reasons: ``least_load`` (compared on reported loads), ``least_in_flight`` (on
        in-flight counts: some available worker has no report)."""
        best: list[Worker] = []
        best_key = (0, 0)
        reported = True
        for worker in workers:
            state = worker.state
            if not state.available:
                continue
            load = state.reported_load
            if load is None:
                reported = False
                load = 0
            key = (load, state.in_flight)
            if not best or key < best_key:
                best, best_key = [worker], key
            elif key == best_key:
                best.append(worker)
        reason = "least_load"
        if not reported:
            reason = "least_in_flight"
            best = _fewest_in_flight(workers)
        if not best:
            return Decision(None, reason)
        self._turn += 1
        return Decision(best[self._turn % len(best)], reason)


def _fewest_in_flight(workers: Workers) -> list[Worker]:
    """The available workers with the fewest requests in flight."""
    best: list[Worker] = []
    fewest = 0
    for worker in workers:
        state = worker.state
        if not state.available:
            continue
        if not best or state.in_flight < fewest:
            best, fewest = [worker], state.in_flight
        elif state.in_flight == fewest:
            best.append(worker)
    return best
