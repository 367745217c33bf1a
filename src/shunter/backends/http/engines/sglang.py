"""SGLang's own HTTP server: native ``/generate``, its load and flush endpoints.

- load: ``GET /get_load`` (a list of ranks; Σ ``num_tokens`` over them, or over the
  worker's own DP rank), else ``GET /v1/loads`` (newer SGLang: ``num_total_tokens`` per
  rank); the prefix-cache hit rate from ``sglang:cache_hit_rate`` in ``/metrics``;
- flush: ``POST /flush_cache``;
- generation check: its own ``GET /health_generate``.
"""

from __future__ import annotations

from typing import Any

from shunter.backends.base import Load, Runtime, Target
from shunter.backends.http.calls import WorkerCalls
from shunter.backends.http.engines.base import Engine


def sglang_load(payload: Any, dp_rank: int | None) -> int | None:
    """Σ ``num_tokens`` of a ``/get_load`` answer (a list per DP rank), or of ``/v1/loads``."""
    if isinstance(payload, dict) and isinstance(payload.get("loads"), list):
        entries = [
            {"dp_rank": e.get("dp_rank"), "num_tokens": e.get("num_total_tokens", 0)}
            for e in payload["loads"]
            if isinstance(e, dict)
        ]
    else:
        entries = payload if isinstance(payload, list) else [payload]
    total = 0
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("num_tokens", 0), int | float):
            return None
        if dp_rank is None or entry.get("dp_rank", dp_rank) == dp_rank:
            total += int(entry.get("num_tokens", 0))
    return total


def cache_hit_rate(metrics: bytes) -> float | None:
    for line in metrics.decode("utf-8", "replace").splitlines():
        if line.startswith("sglang:cache_hit_rate"):
            try:
                return float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                return None
    return None


class SGLangEngine(Engine):
    runtime = Runtime.SGLANG
    # Recognised by its /server_info (discovery asks that first), not by /v1/models.
    native_generate = True
    can_flush = True

    async def load(self, calls: WorkerCalls, target: Target) -> Load:
        load = None
        for path in ("/get_load", "/v1/loads"):
            payload = await calls.get_json(target, (path,))
            if payload is not None:
                load = sglang_load(payload, target.dp_rank)
                break
        metrics = await calls.get(target, "/metrics")
        return Load(load, None if metrics is None else cache_hit_rate(metrics))

    async def flush(self, calls: WorkerCalls, target: Target) -> None:
        await calls.call(target, "POST", "/flush_cache", b"")

    async def health_generate(self, calls: WorkerCalls, target: Target) -> bytes:
        return await calls.call(target, "GET", "/health_generate", long=True)
