"""Periodic health checks, as smg does them, with per-worker settings applied.

Each worker is checked every ``interval_secs`` (its own, when ``POST``/``PUT /workers`` gave
one, else ``--health-check-interval-secs``); the checks due at the same time run at once,
each bounded by its ``timeout_secs``, so a slow worker delays nobody else's. A check is the
worker backend's probe (HTTP: ``GET {base_url}{endpoint}`` answering 2xx; gRPC: the
scheduler's ``HealthCheck``). ``failure_threshold`` consecutive failures mark a worker
unhealthy, ``success_threshold`` consecutive successes mark it healthy again; the counters
restart after each flip. Workers are never removed for failing checks. DP ranks share
their base URL's check.

Health is separate from the circuit breaker, with one link: a passing check turns an open
breaker half-open at once, so a worker that came back is tried again within one interval
instead of waiting out its open time (a proxy's "uneject on a successful active health
check"). If the worker still fails real requests, the first failure opens it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

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
        self._task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()  # set(): reconsider the schedule now (settings changed)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _settings(self, worker: Worker) -> HealthConfig:
        return worker.health or self.config

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            groups = _by_base_url(self.workers())
            due = self._due
            for base in list(due):
                if base not in groups:
                    del due[base]  # removed
            for base, group in groups.items():
                due.setdefault(base, now + self._settings(group[0]).interval_secs)
            ready = [group for base, group in groups.items() if due[base] <= now]
            if ready:
                try:
                    await self._check(ready)
                except Exception:
                    log.exception("health checks failed")
                for group in ready:
                    due[group[0].base_url] = (
                        time.monotonic() + self._settings(group[0]).interval_secs
                    )
            wait = min(due.values(), default=now + self.config.interval_secs) - time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=max(0.0, wait))
            self.wake.clear()

    async def check_all(self) -> None:
        """Check every worker now (tests, and an operator's explicit request)."""
        await self._check(list(_by_base_url(self.workers()).values()))

    async def _check(self, groups: list[list[Worker]]) -> None:
        results = await asyncio.gather(*(self._probe(group[0]) for group in groups))
        for group, ok in zip(groups, results, strict=True):
            for worker in group:
                self.apply(worker, ok)

    async def _probe(self, worker: Worker) -> bool:
        timeout = self._settings(worker).timeout_secs
        try:
            problem = await asyncio.wait_for(worker.backend.probe(worker, timeout), timeout)
        except TimeoutError:
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
