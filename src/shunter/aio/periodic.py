"""A background task that runs a piece of work every so often, started and stopped once.

Health checks, load polling, tree trimming, bucket adjustment and idle-key sweeps all need
the same loop: run on the event loop, survive a failing round (log it, go on), stop cleanly.
The pause between rounds is a number, or a function asked after each round (health checks
wait until the next worker is due, whatever each worker's own interval).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable

log = logging.getLogger("shunter.periodic")


class Periodic:
    def __init__(
        self,
        name: str,
        interval_secs: float | Callable[[], float],
        work: Callable[[], object],  # a plain or async function; its result is ignored
        *,
        run_first: bool = False,
    ) -> None:
        self.name = name
        self.interval_secs = interval_secs
        self.work = work
        self.run_first = run_first
        self.wake = asyncio.Event()  # set() runs the work now rather than at the next interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        if self.run_first:
            await self._once()
        while True:
            pause = self.interval_secs
            if callable(pause):
                pause = max(0.0, pause())
            # asyncio.timeout, not wait_for, which on 3.11 can lose a cancellation that lands
            # as the wait ends (the loop would then outlive its stop).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self.wake.wait()
            self.wake.clear()
            await self._once()

    async def _once(self) -> None:
        try:
            result = self.work()
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("background work failed", extra={"work": self.name})
