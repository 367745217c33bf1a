"""The background job queue behind ``POST /workers``, as smg's.

Adding a worker can take minutes (it may still be loading its model), so an addition
answers 202 at once and runs here. Updates and removals touch only the registry and run at
once (their answers say so). A job's status is kept while it is pending or processing and,
when it fails, for ``FAILED_TTL_SECS``; a job that succeeds drops its status, as smg does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("shunter.jobs")

FAILED_TTL_SECS = 300.0


@dataclass
class JobStatus:
    job_type: str
    worker_url: str
    status: str  # pending | processing | failed
    message: str | None = None
    timestamp: int = 0
    worker_id: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_type": self.job_type,
            "worker_id": self.worker_id,
            "worker_url": self.worker_url,
            "status": self.status,
            "message": self.message,
            "timestamp": self.timestamp,
        }


class QueueFull(Exception):
    pass


class JobQueue:
    def __init__(self, capacity: int = 1000, concurrency: int = 10) -> None:
        self.capacity = capacity
        self._slots = asyncio.Semaphore(concurrency)
        self._statuses: dict[str, JobStatus] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(
        self, job_type: str, url: str, work: Callable[[], Awaitable[None]], worker_id: str = ""
    ) -> None:
        if len(self._tasks) >= self.capacity:
            raise QueueFull(f"the job queue is full ({self.capacity} jobs)")
        self._statuses[url] = JobStatus(job_type, url, "pending", None, int(time.time()), worker_id)
        task = asyncio.get_running_loop().create_task(self._run(job_type, url, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, job_type: str, url: str, work: Callable[[], Awaitable[None]]) -> None:
        async with self._slots:
            status = self._statuses.get(url)
            if status is not None:
                status.status = "processing"
            try:
                await work()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("job failed", extra={"job": job_type, "url": url, "error": str(exc)})
                worker_id = status.worker_id if status is not None else ""
                self._statuses[url] = JobStatus(
                    job_type, url, "failed", str(exc), int(time.time()), worker_id
                )
                return
            current = self._statuses.get(url)
            if current is not None and current.job_type == job_type:
                del self._statuses[url]

    def status(self, url: str) -> JobStatus | None:
        self._expire()
        return self._statuses.get(url)

    def statuses(self) -> list[JobStatus]:
        """Every job known now: queued, running, or failed not long ago."""
        self._expire()
        return list(self._statuses.values())

    def _expire(self) -> None:
        cutoff = time.time() - FAILED_TTL_SECS
        stale = [
            url
            for url, s in self._statuses.items()
            if s.status == "failed" and s.timestamp < cutoff
        ]
        for url in stale:
            del self._statuses[url]

    async def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
