"""Polls every worker's own load report, for the policies that compare loads.

Every ``interval`` seconds (smg uses ``--worker-startup-check-interval``) each worker is asked
concurrently, in the way its engine answers (``backends/``: SGLang's ``/v1/loads`` or
``/get_load``, vLLM's and llama.cpp's ``/metrics``, gRPC's ``GetLoads``). A load that cannot
be read is stored as None (unknown), never as a number, so a failing worker never looks
idle. The result lands in the worker's run-time state, which the policies read without I/O.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from shunter.aio.periodic import Periodic
from shunter.backends.base import Load
from shunter.fleet.worker import Worker

log = logging.getLogger("shunter.load_monitor")


class LoadMonitor:
    def __init__(self, workers: Callable[[], Sequence[Worker]], interval_secs: float) -> None:
        self.workers = workers
        self.interval_secs = interval_secs
        self._loop = Periodic("load polling", interval_secs, self.poll_once, run_first=True)

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def poll_once(self) -> None:
        workers = list(self.workers())
        loads = await asyncio.gather(*(self.read(w) for w in workers))
        for worker, load in zip(workers, loads, strict=True):
            worker.state.reported(load.load, load.cache_hit_rate)

    async def read(self, worker: Worker) -> Load:
        """The worker's report now, bounded by the polling interval; unknown if it cannot be
        read, whatever the reason (one worker's failure stops nobody else's read)."""
        try:
            async with asyncio.timeout(self.interval_secs):
                return await worker.backend.load(worker)
        except TimeoutError:
            return Load()
        except Exception as exc:
            log.warning("load read raised", extra={"url": worker.url, "error": repr(exc)})
            return Load()
