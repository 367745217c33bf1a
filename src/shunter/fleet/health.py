"""Periodic health checks, as smg does them, with per-worker settings applied.

Each worker is checked every ``interval_secs`` (its own, when ``POST``/``PUT /workers`` gave
one, else ``--health-check-interval-secs``); the checks due at the same time run at once,
each bounded by its ``timeout_secs``, so a slow worker delays nobody else's. A check is the
worker backend's probe (HTTP: ``GET {base_url}{endpoint}`` answering 2xx; gRPC: the
scheduler's ``HealthCheck``). ``failure_threshold`` consecutive failures mark a worker
unhealthy, ``success_threshold`` consecutive successes mark it healthy again; the counters
restart after each flip. A worker is removed for failing checks only with
``--remove-unhealthy-workers`` (``Fleet._health_flipped``). DP ranks share their base URL's
check.

Health is separate from the circuit breaker, with one link: a passing check turns an open
breaker half-open at once, so a worker that came back is tried again within one interval
instead of waiting out its open time (a proxy's "uneject on a successful active health
check"). If the worker still fails real requests, the first failure opens it again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from shunter.aio.periodic import Periodic
from shunter.fleet.runtime import HealthConfig
from shunter.fleet.worker import Worker

log = logging.getLogger("shunter.health")


class HealthChecker:
    def __init__(
        self,
        config: HealthConfig,
        workers: Callable[[], Sequence[Worker]],
        on_check: Callable[[Worker, bool], None] | None = None,
        on_flip: Callable[[Worker], None] | None = None,
    ) -> None:
        self.config = config
        self.workers = workers
        self.on_check = on_check  # every check
        self.on_flip = on_flip  # a worker turned healthy or unhealthy
        self._due: dict[str, float] = {}  # base URL -> when its next check is due
        self._loop = Periodic("health checks", self._until_next, self._check_due)

    @property
    def wake(self) -> asyncio.Event:
        """set(): reconsider the schedule now (a worker's settings changed)."""
        return self._loop.wake

    def next_check(self, base_url: str) -> float | None:
        """When the worker at ``base_url`` is checked next (``time.monotonic()``), if known."""
        return self._due.get(base_url)

    def reschedule(self, base_url: str) -> None:
        """The worker's settings changed: its next check is due one *new* interval from now,
        not at the time its old interval set (up to a minute away)."""
        self._due.pop(base_url, None)
        self.wake.set()

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    def _settings(self, worker: Worker) -> HealthConfig:
        return worker.health or self.config

    def _schedule(self) -> dict[str, list[Worker]]:
        """The workers by base URL; a new one is first due one interval from now."""
        groups = _by_base_url(self.workers())
        now = time.monotonic()
        due = self._due
        for base in [b for b in due if b not in groups]:
            del due[base]  # removed
        for base, group in groups.items():
            due.setdefault(base, now + self._settings(group[0]).interval_secs)
        return groups

    def _until_next(self) -> float:
        self._schedule()
        next_due = min(self._due.values(), default=time.monotonic() + self.config.interval_secs)
        return next_due - time.monotonic()

    async def _check_due(self) -> None:
        now = time.monotonic()
        ready = [g for base, g in self._schedule().items() if self._due[base] <= now]
        if not ready:
            return
        try:
            await self._check(ready)
        finally:
            for group in ready:
                interval = self._settings(group[0]).interval_secs
                self._due[group[0].base_url] = time.monotonic() + interval

    async def _check(self, groups: list[list[Worker]]) -> None:
        results = await asyncio.gather(*(self._probe(group[0]) for group in groups))
        for group, ok in zip(groups, results, strict=True):
            for worker in group:
                self.apply(worker, ok)

    async def _probe(self, worker: Worker) -> bool:
        """Whether ``worker`` passed; a probe that raised failed (and the round goes on for
        the other workers)."""
        timeout = self._settings(worker).timeout_secs
        try:
            async with asyncio.timeout(timeout):
                problem = await worker.backend.probe(worker, timeout)
        except TimeoutError:
            return False
        except Exception as exc:
            log.warning("health probe raised", extra={"url": worker.url, "error": repr(exc)})
            return False
        return problem is None

    def apply(self, worker: Worker, ok: bool) -> None:
        """Count one check result and flip the worker's health at a threshold."""
        if self.on_check is not None:
            self.on_check(worker, ok)
        state = worker.state
        if ok and state.breaker is not None:
            state.breaker.health_passed()
        if not state.checked(ok, self._settings(worker)):
            return
        if state.healthy:
            log.info("worker healthy again", extra={"url": worker.url})
        else:
            log.warning("worker unhealthy", extra={"url": worker.url})
        if self.on_flip is not None:
            self.on_flip(worker)


def _by_base_url(workers: Sequence[Worker]) -> dict[str, list[Worker]]:
    groups: dict[str, list[Worker]] = {}
    for worker in workers:
        groups.setdefault(worker.base_url, []).append(worker)
    return groups
