"""Which workers their circuit breakers exclude, with a panic threshold per model.

A breaker is there to take a failing worker out of a healthy fleet. When most of a model's
workers are out, the breakers have stopped telling the failing from the healthy (several
workers restarted in turn, or one bad stretch hit them all) and excluding them only turns
capacity away. So, as a proxy's panic threshold does: when, among a model's workers that
pass their health checks, the share that their breaker leaves in falls below
``threshold``, that model's breakers are ignored and every healthy worker of it is
routable. The retry loop then steps over a worker that really is down.

Measured with ``bench/chaos_bench.py breakers`` (three sims, 32 clients, one sim SIGKILLed
every 6 s and restarted 2 s later, 60 s): with 60 s openings and no panic, every breaker
was open while every worker was back and 3,440 of 9,826 requests got a 503; with backed-off
openings but panic off, 297 of 29,959 still did; with both, none of 26,689.

Policies read ``worker.state.available`` (healthy and not excluded) on every request, so
the decision is made here, on the rare events that can change it (a breaker transition, a
health flip, a worker added or removed), and stored with ``WorkerRuntime.exclude``:
requests pay one attribute read.

Panic is decided per pool: a model's workers of one type. A PD model's prefill and decode
workers are separate pools (every decode worker out is an outage however healthy the
prefill workers are), and a regular model has one pool.

A worker that serves several models is routable if any of its pools is in panic (one flag
per worker; the point of panic is that a healthy worker is never refused).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from shunter.fleet.breaker import State
from shunter.fleet.worker import Worker, WorkerType

Pool = tuple[str, WorkerType]  # a model's workers of one type

log = logging.getLogger("shunter.breaker")


def excluded_by_breaker(worker: Worker) -> bool:
    """Whether the worker's own breaker keeps it out (open; half-open lets requests in)."""
    breaker = worker.state.breaker
    return breaker is not None and breaker.state is State.OPEN


def in_panic(workers: Iterable[Worker], threshold: float) -> bool:
    """Whether the share of healthy workers that their breaker leaves in is below
    ``threshold`` (never with no healthy worker, or with a threshold of 0)."""
    healthy = 0
    left_in = 0
    for worker in workers:
        if worker.state.healthy:
            healthy += 1
            left_in += not excluded_by_breaker(worker)
    # A quotient of integers and the threshold, both correctly rounded, compare as the
    # exact values do: 3 of 10 left in is not below 0.3.
    return healthy > 0 and left_in / healthy < threshold


class Ejection:
    """Keeps every worker's exclusion right; ``changed`` is called on each event."""

    def __init__(
        self,
        threshold: float,
        workers_of: Callable[[str], Iterable[Worker]],
        on_panic: Callable[[str, str, bool], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.workers_of = workers_of  # a model's registered workers
        self.on_panic = on_panic  # (model, worker type, in panic)
        self.panicking: set[Pool] = set()  # pools whose breakers are ignored

    def changed(self, workers: Iterable[Worker]) -> None:
        """Something about these workers changed: decide again for each model they serve."""
        models = {model for worker in workers for model in worker.model_ids}
        for model in sorted(models):
            self.refresh(model)

    def refresh(self, model: str) -> None:
        pools: dict[WorkerType, list[Worker]] = {}
        for worker in self.workers_of(model):
            pools.setdefault(worker.worker_type, []).append(worker)
        for kind, workers in pools.items():
            pool = (model, kind)
            panic = in_panic(workers, self.threshold)
            if panic != (pool in self.panicking):
                self._switch(pool, panic, workers)
        for workers in pools.values():
            for worker in workers:
                worker.state.exclude(excluded_by_breaker(worker) and not self._panics(worker))

    def _panics(self, worker: Worker) -> bool:
        kind = worker.worker_type
        return any((model, kind) in self.panicking for model in worker.model_ids)

    def _switch(self, pool: Pool, panic: bool, workers: list[Worker]) -> None:
        model, kind = pool
        healthy = [w for w in workers if w.state.healthy]
        facts = {
            "model": model,
            "worker_type": kind.value,
            "healthy": len(healthy),
            "excluded": sum(1 for w in healthy if excluded_by_breaker(w)),
            "threshold": self.threshold,
        }
        if panic:
            self.panicking.add(pool)
            log.warning("breaker panic: too few workers left in, breakers ignored", extra=facts)
        else:
            self.panicking.discard(pool)
            log.info("breaker panic over: breakers apply again", extra=facts)
        if self.on_panic is not None:
            self.on_panic(model, kind.value, panic)
