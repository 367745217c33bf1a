"""Periodic health checks, as smg (inventory §4.1).

Every ``interval_secs`` all workers are checked at once, each bounded by ``timeout_secs``, so
a slow worker delays nobody else's check. ``GET {base_url}{endpoint}`` answering 2xx is a
success. ``failure_threshold`` consecutive failures mark a worker unhealthy,
``success_threshold`` consecutive successes mark it healthy again; the counters restart
after each transition. Workers are never removed for failing checks. DP ranks share their
base URL's check.

Health is separate from the circuit breaker, with one link: a passing check turns an open
breaker half-open at once, so a worker that came back is tried again within one interval
instead of waiting out its open time (a proxy's "uneject on a successful active health
check"). If the worker still fails real requests, the first failure opens it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shunter.aio.periodic import Periodic
from shunter.core.grpc_discovery import health_problem
from shunter.fleet.worker import Worker
from shunter.transport.base import UpstreamClient, UpstreamError

log = logging.getLogger("shunter.health")


@dataclass(frozen=True)
class HealthConfig:
    interval_secs: float = 60.0
    timeout_secs: float = 5.0
    endpoint: str = "/health"
    failure_threshold: int = 3
    success_threshold: int = 2

    def validate(self) -> HealthConfig:
        if self.interval_secs <= 0 or self.timeout_secs <= 0:
            raise ValueError(
                "--health-check-interval-secs and --health-check-timeout-secs must be > 0"
            )
        if self.failure_threshold < 1 or self.success_threshold < 1:
            raise ValueError(
                "--health-failure-threshold and --health-success-threshold must be >= 1"
            )
        if not self.endpoint.startswith("/"):
            raise ValueError("--health-check-endpoint must start with '/'")
        return self


class HealthChecker:
    def __init__(
        self,
        config: HealthConfig,
        workers: Callable[[], Sequence[Worker]],
        client: UpstreamClient,
        on_check: Callable[[Worker, bool], None] | None = None,
        on_flip: Callable[[Worker], None] | None = None,
    ) -> None:
        self.config = config
        self.workers = workers
        self.client = client
        self.on_check = on_check  # every check
        self.on_flip = on_flip  # a worker turned healthy or unhealthy
        self._loop = Periodic("health checks", config.interval_secs, self.check_all)

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def check_all(self) -> None:
        by_base: dict[str, list[Worker]] = {}
        for worker in self.workers():
            by_base.setdefault(worker.base_url, []).append(worker)
        groups = list(by_base.values())
        results = await asyncio.gather(*(self._probe(group[0]) for group in groups))
        for group, ok in zip(groups, results, strict=True):
            for worker in group:
                self.apply(worker, ok)

    async def _probe(self, worker: Worker) -> bool:
        if worker.scheduler_cell is not None:
            return await self._probe_grpc(worker)
        headers = worker.auth_headers()
        try:
            response = await asyncio.wait_for(
                self.client.request("GET", worker.base_url + self.config.endpoint, headers, None),
                self.config.timeout_secs,
            )
        except (UpstreamError, TimeoutError):
            return False
        return 200 <= response.status < 300

    async def _probe_grpc(self, worker: Worker) -> bool:
        """``HealthCheck`` on the worker's channel. A failed check starts building a fresh
        channel in the background (the old one serves until it is ready): a worker that
        restarted, or a channel stuck in a bad state, heals without being re-added."""
        cell = worker.scheduler_cell
        assert cell is not None
        probed = cell.value  # the channel this check judges (None: created by the check)
        healthy = await health_problem(cell, self.config.timeout_secs) is None
        client = probed or cell.value
        if not healthy and client is not None:
            cell.replace(client)
        return healthy

    def apply(self, worker: Worker, ok: bool) -> None:
        """Count one check result and flip the worker's health at a threshold."""
        if self.on_check is not None:
            self.on_check(worker, ok)
        if ok:
            if worker.breaker is not None:
                worker.breaker.health_passed()
            worker.health_failures = 0
            worker.health_successes += 1
            if not worker.healthy and worker.health_successes >= self.config.success_threshold:
                worker.healthy = True
                worker.health_successes = 0
                log.info("worker healthy again", extra={"url": worker.url})
                self._flipped(worker)
        else:
            worker.health_successes = 0
            worker.health_failures += 1
            if worker.healthy and worker.health_failures >= self.config.failure_threshold:
                worker.healthy = False
                worker.health_failures = 0
                log.warning("worker unhealthy", extra={"url": worker.url})
                self._flipped(worker)

    def _flipped(self, worker: Worker) -> None:
        if self.on_flip is not None:
            self.on_flip(worker)
