"""The fleet: the registry and everything that keeps it true, wired together once.

Registration adds, updates and removes workers; health checks and load polling refresh
their state; each worker's circuit breaker reports its moves to the ejection rule (which
decides who is excluded, with a panic threshold) and to whoever listens. Listeners hear
workers join and leave (``on_change``: the policies keep per-worker state); observers hear
checks, breaker moves and panics (metrics). None of it runs on the request path: requests
only read the registry and the workers' run-time state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from shunter.backends.connect import Connector
from shunter.fleet.breaker import BreakerConfig, CircuitBreaker, State
from shunter.fleet.ejection import Ejection
from shunter.fleet.health import HealthChecker
from shunter.fleet.jobs import JobQueue, JobStatus
from shunter.fleet.load_monitor import LoadMonitor
from shunter.fleet.registration import Changed, Registrar
from shunter.fleet.registry import WorkerRegistry
from shunter.fleet.runtime import HealthConfig, WorkerRuntime
from shunter.fleet.spec import WorkerSpec
from shunter.fleet.worker import Worker

log = logging.getLogger("shunter.fleet")


def _ignore(*_: Any) -> None:
    pass


@dataclass
class FleetObserver:
    """What the fleet tells the outside (metrics) as it happens."""

    health_checked: Callable[[Worker, bool], None] = _ignore
    breaker_moved: Callable[[str, str, str], None] = _ignore  # url, from, to
    panic: Callable[[str, str, bool], None] = _ignore  # model, worker type, in panic


@dataclass(frozen=True)
class FleetSettings:
    health: HealthConfig
    breaker: BreakerConfig
    startup_timeout_secs: float
    check_interval_secs: float  # registration probes' longest pause; load polling interval
    drain_timeout_secs: float = 1800.0  # how long a removed worker's requests may finish
    dp_aware: bool = False
    # --remove-unhealthy-workers: a worker that turns unhealthy is removed, not just skipped.
    remove_unhealthy: bool = False


class Fleet:
    def __init__(
        self,
        settings: FleetSettings,
        connector: Connector,
        observer: FleetObserver | None = None,
    ) -> None:
        self.settings = settings
        self.observer = observer or FleetObserver()
        self.registry = WorkerRegistry()
        self.jobs = JobQueue()
        self._listeners: list[Changed] = []
        self.ejection = Ejection(
            settings.breaker.panic_threshold, self.registry.get_by_model, self.observer.panic
        )
        self.registrar = Registrar(
            self.registry,
            connector,
            self._new_runtime,
            settings.health,
            startup_timeout_secs=settings.startup_timeout_secs,
            check_interval_secs=settings.check_interval_secs,
            drain_timeout_secs=settings.drain_timeout_secs,
            dp_aware=settings.dp_aware,
            on_change=self._changed,
        )
        self.health = HealthChecker(
            settings.health,
            self.registry.all,
            on_check=self.observer.health_checked,
            on_flip=self._health_flipped,
        )
        self.loads = LoadMonitor(self.registry.all, settings.check_interval_secs)

    # --- membership ------------------------------------------------------------------------

    def subscribe(self, listener: Changed) -> None:
        """Hear every change of membership: ``listener(added, removed)``."""
        self._listeners.append(listener)

    def _changed(self, added: Sequence[Worker], removed: Sequence[Worker]) -> None:
        for worker in removed:
            if worker.state.breaker is not None:
                worker.state.breaker.reset()  # no timer left running for it
        for listener in self._listeners:
            listener(added, removed)
        self.ejection.changed((*added, *removed))

    def _health_flipped(self, worker: Worker) -> None:
        """A worker turned healthy or unhealthy. With ``remove_unhealthy``, an unhealthy one
        (and its DP ranks, which share its check) leaves the registry as a removal through
        the API would: its requests in flight finish. Every registered worker was healthy
        once (registration adds only a worker that answered), so this never removes one
        that is still starting."""
        if self.settings.remove_unhealthy and not worker.state.healthy:
            if self.registrar.find(worker.base_url):  # the first of its ranks takes them all
                log.warning(
                    "removing a worker that failed its health checks",
                    extra={"url": worker.base_url, "id": worker.id},
                )
                self.registrar.remove(worker.base_url)
            return
        self.ejection.changed((worker,))

    def _new_runtime(self, url: str) -> WorkerRuntime:
        runtime = WorkerRuntime()

        def moved(breaker: CircuitBreaker, old: State, new: State) -> None:
            self.observer.breaker_moved(url, old.label, new.label)
            facts: dict[str, object] = {"url": url, "from": old.label, "to": new.label}
            if new is State.OPEN:
                facts["open_secs"] = breaker.open_secs
                facts["ejections"] = breaker.ejections
            log.warning("circuit breaker moved", extra=facts)
            worker = self.registry.get_by_url(url)
            if worker is not None:
                self.ejection.changed((worker,))

        runtime.breaker = CircuitBreaker(self.settings.breaker, moved)
        return runtime

    # --- what the API asks -------------------------------------------------------------------

    def submit_add(
        self, spec: WorkerSpec, done: Callable[[Exception | None], None] | None = None
    ) -> None:
        """Queue an addition; raises QueueFull when the job queue is. ``done`` hears how it
        ended (None: registered)."""

        async def add() -> None:
            try:
                await self.registrar.add(spec)
            except Exception as exc:
                if done is not None:
                    done(exc)
                raise
            if done is not None:
                done(None)

        self.jobs.submit("AddWorker", spec.url, add, spec.worker_id)

    def submit_replace(self, url: str, spec: WorkerSpec) -> None:
        """Queue the replacement of the worker at ``url`` by ``spec`` (same id); raises
        QueueFull when the job queue is."""

        async def replace() -> None:
            await self.registrar.replace(url, spec)

        self.jobs.submit("ReplaceWorker", url, replace, spec.worker_id)

    def job_status(self, url: str) -> JobStatus | None:
        return self.jobs.status(url)

    def job_of(self, worker_id: str) -> JobStatus | None:
        """The job of the worker with this id (an addition still under way, or failed)."""
        return next((j for j in self.jobs.statuses() if j.worker_id == worker_id), None)

    def pending(self) -> list[JobStatus]:
        """Additions queued or under way: workers with an id, not yet registered."""
        return [
            job
            for job in self.jobs.statuses()
            if job.job_type == "AddWorker" and job.status in ("pending", "processing")
        ]

    def find_id(self, worker_id: str) -> list[Worker]:
        return self.registrar.find_id(worker_id)

    def draining(self) -> list[Worker]:
        return self.registrar.draining()

    def adding(self, url: str) -> bool:
        """Whether an addition of ``url`` is queued or under way."""
        job = self.jobs.status(url)
        return job is not None and job.job_type == "AddWorker" and job.status != "failed"

    def find(self, url: str) -> list[Worker]:
        return self.registrar.find(url)

    def taken(self, spec: WorkerSpec) -> str | None:
        """The registered URL ``spec`` would add again, if any (see ``Registrar.taken``)."""
        return self.registrar.taken(spec)

    def update(self, url: str, changes: dict[str, Any]) -> list[Worker]:
        updated = self.registrar.update(url, changes)
        self.ejection.changed(updated)
        if updated:
            self.health.reschedule(updated[0].base_url)  # its check interval may have changed
        return updated

    def remove(self, url: str) -> list[Worker]:
        return self.registrar.remove(url)

    # --- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start background work; needs the running event loop."""
        self.loads.start()
        self.health.start()

    async def close(self) -> None:
        await self.jobs.cancel_all()
        await self.loads.stop()
        await self.health.stop()
        await self.registrar.close()
        backends = {id(w.backend): w.backend for w in self.registry.all()}
        for backend in backends.values():
            await backend.close()
