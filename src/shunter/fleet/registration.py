"""Adding, updating and removing workers: the only writer of the registry.

Adding follows smg's registration workflow: reach the worker (probing until it answers, up
to ``--worker-startup-timeout-secs``), ask what it is, expand DP ranks, register, activate.
The backend (``backends/connect.py``) does the talking; this module decides when to give
up and what the registry holds. It runs in background jobs, never on the request path.

An update builds new identities around the same backend and run-time state (so requests in
flight keep being counted where new ones are); a replacement registers a new spec as an
addition does (the old one serving until the new one is reached) and swaps it in under the
same id; a removal takes the worker out of the registry at once, lets its requests in
flight finish, then closes its connections.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from shunter.backends.base import Backend
from shunter.backends.connect import Connected, Connector, Probe
from shunter.fleet.registry import WorkerRegistry
from shunter.fleet.runtime import HealthConfig, WorkerRuntime
from shunter.fleet.spec import (
    SpecError,
    WorkerSpec,
    apply_health,
    breaker_overrides,
    health_overrides,
)
from shunter.fleet.worker import Worker

log = logging.getLogger("shunter.registration")

Changed = Callable[[Sequence[Worker], Sequence[Worker]], None]  # (added, removed)
# How often a removed worker's connections are checked for requests still in flight.
DRAIN_POLL_SECS = 0.5


class Registrar:
    def __init__(
        self,
        registry: WorkerRegistry,
        connector: Connector,
        new_runtime: Callable[[str], WorkerRuntime],
        health: HealthConfig,
        *,
        startup_timeout_secs: float,
        check_interval_secs: float,
        drain_timeout_secs: float = 1800.0,
        dp_aware: bool = False,
        on_change: Changed | None = None,
    ) -> None:
        self.registry = registry
        self.connector = connector
        self.new_runtime = new_runtime  # a worker's state, its breaker wired to the fleet
        self.health = health  # the --health-* flags, which per-worker settings override
        self.startup_timeout_secs = startup_timeout_secs
        self.check_interval_secs = check_interval_secs
        self.drain_timeout_secs = drain_timeout_secs
        self.dp_aware = dp_aware
        self.on_change = on_change
        # Removed workers whose requests may still be finishing, by the task closing them.
        self._draining: dict[asyncio.Task[None], Sequence[Worker]] = {}

    # --- add --------------------------------------------------------------------------------

    def taken(self, spec: WorkerSpec) -> str | None:
        """The registered URL ``spec`` would add again, if any: its own, or for a URL given
        without a scheme (registered as ``http://`` or ``grpc://``, whichever answered),
        the gRPC spelling too."""
        urls = [spec.url]
        if spec.probe_grpc:
            urls.append("grpc://" + spec.url.split("://", 1)[1])
        return next((url for url in urls if self.find(url)), None)

    async def add(self, spec: WorkerSpec) -> list[Worker]:
        if (taken := self.taken(spec)) is not None:
            raise SpecError(f"worker {taken} already exists; use PUT to update it")

        async def wait(probe: Probe, what: str) -> None:
            await self._wait_until(probe, what, spec.max_connection_attempts)

        connected = await self.connector.connect(
            spec.url, spec.api_key, spec.runtime, wait, probe_both=spec.probe_grpc
        )
        try:
            # Checked again: connecting takes a while, and the same worker may have been
            # added meanwhile (nothing awaits between this check and the registration).
            if self.find(connected.url):
                raise SpecError(f"worker {connected.url} already exists; use PUT to update it")
            workers = self._build(spec, connected)
        except BaseException:
            await connected.backend.close()
            raise
        for worker in workers:
            self.registry.register(worker)
        for worker in workers:
            worker.state.ready()
        log.info(
            "worker registered",
            extra={
                "url": connected.url,
                "connection_mode": connected.backend.mode.value,
                "runtime": connected.description.runtime.value,
                "models": [*workers[0].models],
                "ranks": len(workers),
            },
        )
        self._changed(workers, ())
        return workers

    async def _wait_until(self, probe: Probe, what: str, max_attempts: int | None) -> None:
        """Probe (it returns what is wrong, or None) with growing pauses until it passes;
        TimeoutError with the last reason after the start-up timeout or the attempts."""
        deadline = time.monotonic() + self.startup_timeout_secs
        delay = 0.05
        attempts = 0
        while (problem := await probe()) is not None:
            attempts += 1
            if max_attempts is not None and attempts >= max_attempts:
                raise TimeoutError(f"{what} not ready after {attempts} attempts: {problem}")
            if time.monotonic() + delay > deadline:
                raise TimeoutError(
                    f"{what} not ready after {self.startup_timeout_secs:g}s: {problem}"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0, self.check_interval_secs)

    def _build(self, spec: WorkerSpec, connected: Connected) -> list[Worker]:
        found = connected.description
        health = apply_health(self.health, spec.health)

        def make(url: str, rank: int | None = None) -> Worker:
            state = self.new_runtime(url)
            _apply_breaker(state, spec.breaker)
            return Worker(
                url=url,
                backend=connected.backend,  # DP ranks share one backend: one pool
                state=state,
                models=(spec.model_id,) if spec.model_id else found.models,
                worker_type=spec.worker_type,
                bootstrap_port=spec.bootstrap_port,
                labels={**found.labels, **spec.labels},
                api_key=spec.api_key,
                dp_rank=rank,
                dp_size=found.dp_size if rank is not None else None,
                base_url=connected.url,
                health=health,
                id=spec.worker_id,
            )

        if not self.dp_aware:
            return [make(connected.url)]
        if not found.dp_size or found.dp_size < 1:
            raise LookupError(f"--dp-aware: worker {spec.url} reports no dp_size in /server_info")
        return [make(f"{connected.url}@{rank}", rank) for rank in range(found.dp_size)]

    # --- update and remove ------------------------------------------------------------

    def find(self, url: str) -> list[Worker]:
        """The workers registered at ``url``: the worker itself or its DP ranks."""
        exact = self.registry.get_by_url(url)
        if exact is not None:
            return [exact]
        return [w for w in self.registry.all() if w.base_url == url and w.dp_rank is not None]

    def find_id(self, worker_id: str) -> list[Worker]:
        """The workers registered under ``worker_id``: one, or a DP worker's ranks."""
        return [w for w in self.registry.all() if w.id == worker_id]

    def draining(self) -> list[Worker]:
        """Removed workers with requests still in flight."""
        return [w for group in self._draining.values() for w in group if w.state.in_flight]

    async def replace(self, url: str, spec: WorkerSpec) -> list[Worker]:
        """Register ``spec`` in place of the worker at ``url``, under its id. The new spec is
        reached and probed first, so the old one keeps serving until the swap; the old
        one's requests in flight then finish on its connections."""
        spec.worker_id = self._id_at(url)

        async def wait(probe: Probe, what: str) -> None:
            await self._wait_until(probe, what, spec.max_connection_attempts)

        connected = await self.connector.connect(
            spec.url, spec.api_key, spec.runtime, wait, probe_both=spec.probe_grpc
        )
        try:
            old = self.find(url)
            if not old:  # removed while the new spec was being reached
                raise LookupError(f"worker {url} was removed before its replacement was ready")
            if connected.url != url and self.find(connected.url):
                raise SpecError(f"worker {connected.url} already exists")
            workers = self._build(spec, connected)
        except BaseException:
            await connected.backend.close()
            raise
        kept = {w.url for w in workers}
        for worker in workers:
            self.registry.register(worker)  # an upsert: a URL kept keeps its place
        for worker in old:
            if worker.url not in kept:
                self.registry.remove(worker.url)
            worker.state.retired()
        for worker in workers:
            worker.state.ready()
        log.info("worker replaced", extra={"url": url, "id": spec.worker_id})
        self._changed(workers, old)
        self._drain(old, listed=False)
        return workers

    def _id_at(self, url: str) -> str:
        current = self.find(url)
        if not current:
            raise LookupError(f"worker {url} not found")
        return current[0].id

    def update(self, url: str, changes: dict[str, Any]) -> list[Worker]:
        """Apply label, priority, cost, key and health changes (already checked by
        ``spec.check_update``): each rank gets a new identity around its same runtime."""
        current = self.find(url)
        if not current:
            raise LookupError(f"worker {url} not found")
        labels = {str(k): str(v) for k, v in (changes.get("labels") or {}).items()}
        for key in ("priority", "cost"):
            if changes.get(key) is not None:
                labels[key] = str(changes[key])
        health = health_overrides(changes)
        breaker = breaker_overrides(changes)
        updated = []
        for old in current:
            _apply_breaker(old.state, breaker)  # the runtime (and its breaker) carries over
            new = dataclasses.replace(old, labels={**old.labels, **labels})
            if "api_key" in changes:
                new = dataclasses.replace(new, api_key=changes["api_key"])
            if health:
                base = old.health or self.health
                new = dataclasses.replace(new, health=dataclasses.replace(base, **health))  # type: ignore[arg-type]
            self.registry.register(new)  # an upsert: same place, same state
            updated.append(new)
        log.info("worker updated", extra={"url": url, "fields": sorted(changes)})
        return updated

    def remove(self, url: str) -> list[Worker]:
        """Take the worker (and its DP ranks) out at once; its connections close once the
        requests it is serving have finished."""
        removed = self.registry.remove_base_url(url)
        if not removed:
            raise LookupError(f"worker {url} not found")
        for worker in removed:
            worker.state.retired()
        log.info("worker removed", extra={"url": url, "ranks": len(removed)})
        self._changed((), removed)
        self._drain(removed, listed=True)
        return removed

    def _drain(self, workers: Sequence[Worker], listed: bool) -> None:
        """Close ``workers``' connections once their requests have finished; ``listed``:
        show them as draining meanwhile (a removal; a replacement's old self is not shown
        beside its new one)."""
        task = asyncio.get_running_loop().create_task(self._close_when_drained(workers))
        self._draining[task] = workers if listed else ()
        task.add_done_callback(self._forget_drained)

    def _forget_drained(self, task: asyncio.Task[None]) -> None:
        self._draining.pop(task, None)

    async def _close_when_drained(self, removed: Sequence[Worker]) -> None:
        deadline = time.monotonic() + self.drain_timeout_secs
        try:
            while any(w.state.in_flight for w in removed) and time.monotonic() < deadline:
                await asyncio.sleep(DRAIN_POLL_SECS)
        finally:  # drained, out of time, or the gateway is shutting down: close now
            backends: dict[int, Backend] = {id(w.backend): w.backend for w in removed}
            for backend in backends.values():
                try:
                    await backend.close()
                except Exception:
                    log.warning("closing a removed worker's connections failed", exc_info=True)

    async def close(self) -> None:
        """Stop waiting on removed workers' drains: their connections close at once."""
        for task in list(self._draining):
            task.cancel()
        await asyncio.gather(*self._draining, return_exceptions=True)

    def _changed(self, added: Sequence[Worker], removed: Sequence[Worker]) -> None:
        if self.on_change is not None:
            self.on_change(added, removed)


def _apply_breaker(state: WorkerRuntime, overrides: dict[str, float]) -> None:
    """The worker's breaker takes its own settings over the flags' (or its current ones):
    the breaker reads its config on every outcome, so the change applies from the next."""
    breaker = state.breaker
    if overrides and breaker is not None:
        breaker.config = dataclasses.replace(breaker.config, **overrides)  # type: ignore[arg-type]
