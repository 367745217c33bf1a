"""Polls every worker's own load report, for the policies that compare loads.

Every ``interval`` seconds (smg uses ``--worker-startup-check-interval``) each worker is
asked concurrently, in the way its runtime answers:

- SGLang: ``GET /get_load`` (Σ ``num_tokens`` over its DP ranks, or the worker's own rank),
  else ``GET /v1/loads``;
- vLLM: ``/metrics``, ``vllm:num_requests_running + vllm:num_requests_waiting``;
- llama.cpp: ``/metrics``, ``llamacpp:requests_processing + llamacpp:requests_deferred``.

A load that cannot be read is stored as None (unknown), never as a number, so a failing
worker never looks idle. The result lands in ``worker.reported_load``: an attribute the
policies read without I/O.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from shunter.aio.periodic import Periodic
from shunter.fleet.worker import Runtime, Worker
from shunter.transport.base import UpstreamClient, UpstreamError

log = logging.getLogger("shunter.load_monitor")

METRIC_SUMS = {
    Runtime.VLLM: ("vllm:num_requests_running", "vllm:num_requests_waiting"),
    Runtime.LLAMACPP: ("llamacpp:requests_processing", "llamacpp:requests_deferred"),
}


def sum_metrics(text: str, names: Sequence[str]) -> int | None:
    """Σ of the samples of ``names`` in Prometheus text; None if none is present."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            try:
                total += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
            found = True
    return int(total) if found else None


def sglang_load(payload: Any, dp_rank: int | None) -> int | None:
    """Σ ``num_tokens`` of a ``/get_load`` answer (a list per DP rank), or of ``/v1/loads``."""
    if isinstance(payload, dict) and isinstance(payload.get("loads"), list):
        entries = [
            {"dp_rank": e.get("dp_rank"), "num_tokens": e.get("num_total_tokens", 0)}
            for e in payload["loads"] if isinstance(e, dict)
        ]  # fmt: skip
    else:
        entries = payload if isinstance(payload, list) else [payload]
    total = 0
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("num_tokens", 0), int | float):
            return None
        if dp_rank is None or entry.get("dp_rank", dp_rank) == dp_rank:
            total += int(entry.get("num_tokens", 0))
    return total


class LoadMonitor:
    def __init__(
        self,
        workers: Callable[[], Sequence[Worker]],
        client: UpstreamClient,
        interval_secs: float,
    ) -> None:
        self.workers = workers
        self.client = client
        self.interval_secs = interval_secs
        self._loop = Periodic("load polling", interval_secs, self.poll_once, run_first=True)

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def poll_once(self) -> None:
        workers = list(self.workers())
        grpc = [w for w in workers if w.scheduler_cell is not None]
        if grpc:
            reports = await asyncio.gather(*(self._grpc_loads(w) for w in grpc))
            for worker, (load, hit) in zip(grpc, reports, strict=True):
                worker.reported_load, worker.cache_hit_rate = load, hit
            workers = [w for w in workers if w.scheduler_cell is None]
        loads = await asyncio.gather(*(self.read_load(w) for w in workers))
        hits = await asyncio.gather(*(self.read_cache_hit_rate(w) for w in workers))
        for worker, load, hit in zip(workers, loads, hits, strict=True):
            worker.reported_load = load
            worker.cache_hit_rate = hit

    async def _grpc_loads(self, worker: Worker) -> tuple[int | None, float | None]:
        """``GetLoads``: tokens in use (Σ over DP ranks) and the cache hit rate."""
        from shunter.transport.scheduler import SchedulerError

        cell = worker.scheduler_cell
        assert cell is not None
        try:
            client = cell.value or await cell.get()
            reply = await client.loads(self.interval_secs)
        except SchedulerError:
            return None, None
        rates = [load.cache_hit_rate for load in reply.loads]
        hit = sum(rates) / len(rates) if rates else None
        return sum(load.num_used_tokens for load in reply.loads), hit

    async def read_cache_hit_rate(self, worker: Worker) -> float | None:
        """The prefix-cache hit rate an SGLang worker (or the sim) reports in /metrics."""
        if worker.runtime is not Runtime.SGLANG:
            return None
        headers = worker.auth_headers()
        text = await self._get(worker.base_url + "/metrics", headers)
        if text is None:
            return None
        for line in text.decode("utf-8", "replace").splitlines():
            if line.startswith("sglang:cache_hit_rate"):
                try:
                    return float(line.rsplit(" ", 1)[1])
                except (IndexError, ValueError):
                    return None
        return None

    async def read_load(self, worker: Worker) -> int | None:
        if worker.scheduler_cell is not None:
            return (await self._grpc_loads(worker))[0]
        headers = worker.auth_headers()
        if worker.runtime is Runtime.SGLANG:
            for path in ("/get_load", "/v1/loads"):
                payload = await self._get(worker.base_url + path, headers)
                if payload is not None:
                    try:
                        return sglang_load(orjson.loads(payload), worker.dp_rank)
                    except orjson.JSONDecodeError:
                        continue
            return None
        names = METRIC_SUMS.get(worker.runtime)
        if names is None:
            return None
        text = await self._get(worker.base_url + "/metrics", headers)
        return sum_metrics(text.decode("utf-8", "replace"), names) if text is not None else None

    async def _get(self, url: str, headers: list[tuple[str, str]]) -> bytes | None:
        try:
            response = await self.client.request("GET", url, headers, None)
        except UpstreamError:
            return None
        return response.body if response.status == 200 else None
