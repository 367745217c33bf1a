"""Kubernetes service discovery, running: the pod watcher and the reconcile loop.

The watcher keeps the pod cache and asks for a pass on every change; the loop runs a pass
once changes have settled for a moment (``SETTLE_SECS``: a rollout's burst of events makes
one pass, not fifty), and at least every ``resync_secs``. When a pass leaves workers
unregistered (an engine still loading), the next one comes sooner: after 1 s, doubling to
the resync interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from lightkube import AsyncClient

from shunter.discovery.config import DiscoveryConfig
from shunter.discovery.reconciler import DiscoveryObserver, Reconciler
from shunter.discovery.watcher import PodWatcher
from shunter.fleet.fleet import Fleet

log = logging.getLogger("shunter.discovery")

SETTLE_SECS = 0.2
FIRST_RETRY_SECS = 1.0


class Discovery:
    def __init__(
        self,
        fleet: Fleet,
        config: DiscoveryConfig,
        pd_mode: bool,
        api_key: str | None,
        max_connection_attempts: int,
        observer: DiscoveryObserver | None = None,
        client: Callable[[], AsyncClient] | None = None,
    ) -> None:
        self.config = config
        self.observer = observer or DiscoveryObserver()
        self._wake = asyncio.Event()
        self.reconciler = Reconciler(
            fleet, config, pd_mode, api_key, max_connection_attempts, self.observer, self.wake
        )
        self.watcher = PodWatcher(config, self.reconciler.pods, self.wake, client)
        self._tasks: list[asyncio.Task[None]] = []

    def wake(self) -> None:
        self._wake.set()

    @property
    def problem(self) -> str | None:
        """Why discovery has no view of the pods yet (None once it has one)."""
        if self.watcher.listed:
            return None
        return self.watcher.error or "service discovery has not listed the pods yet"

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.watcher.run()), loop.create_task(self._loop())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        retry = FIRST_RETRY_SECS
        wait = self.config.resync_secs
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            await asyncio.sleep(SETTLE_SECS)
            self._wake.clear()
            if not self.watcher.listed:
                wait = self.config.resync_secs
                continue  # no view of the pods: a pass would remove every owned worker
            started = time.perf_counter()
            try:
                result = self.reconciler.reconcile()
            except Exception:
                log.exception("reconcile pass failed")
                result = None
            self.observer.synced(time.perf_counter() - started)
            if result is not None and result.missing:
                wait, retry = retry, min(retry * 2, self.config.resync_secs)
            else:
                wait, retry = self.config.resync_secs, FIRST_RETRY_SECS
