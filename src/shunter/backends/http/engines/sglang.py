"""SGLang's own HTTP server: native ``/generate``, its load and flush endpoints.

- load: ``GET /v1/loads?include=core`` (current SGLang: ``num_total_tokens`` and
  ``cache_hit_rate`` per DP rank), else ``GET /get_load`` (older SGLang, which newer ones
  no longer serve: ``num_tokens`` per rank, the hit rate then from ``sglang:cache_hit_rate``
  in ``/metrics``). Σ over the ranks, or the worker's own rank when it is one. Which of the
  two answered is remembered per worker, so an older worker is not asked for ``/v1/loads``
  on every poll; a worker that stops answering its remembered one (upgraded, say) is asked
  both again on the next poll. A worker that does not answer at all is not asked twice;
- flush: ``POST /flush_cache``;
- generation check: its own ``GET /health_generate``.
"""

from __future__ import annotations

from typing import Any

import orjson

from shunter.backends.base import Load, Runtime, Target
from shunter.backends.http.calls import WorkerCalls
from shunter.backends.http.engines.base import Engine
from shunter.wire.base import UpstreamError

V1_LOADS = "/v1/loads?include=core"  # the per-rank scalars only: no memory, queues, LoRA
GET_LOAD = "/get_load"
LOAD_PATHS = (V1_LOADS, GET_LOAD)


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


def v1_cache_hit_rate(payload: Any, dp_rank: int | None) -> float | None:
    """The mean ``cache_hit_rate`` of a ``/v1/loads`` answer's ranks (or of the worker's own
    rank); None if it has none."""
    loads = payload.get("loads") if isinstance(payload, dict) else None
    rates = [
        float(e["cache_hit_rate"])
        for e in loads or ()
        if isinstance(e, dict)
        and isinstance(e.get("cache_hit_rate"), int | float)
        and (dp_rank is None or e.get("dp_rank", dp_rank) == dp_rank)
    ]
    return sum(rates) / len(rates) if rates else None


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
        path, payload = await _load_report(calls, target)
        if payload is None:
            return Load()
        load = sglang_load(payload, target.dp_rank)
        if path == V1_LOADS:
            return Load(load, v1_cache_hit_rate(payload, target.dp_rank))
        metrics = await calls.get(target, "/metrics")
        return Load(load, None if metrics is None else cache_hit_rate(metrics))

    async def flush(self, calls: WorkerCalls, target: Target) -> None:
        await calls.call(target, "POST", "/flush_cache", b"")

    async def health_generate(self, calls: WorkerCalls, target: Target) -> bytes:
        return await calls.call(target, "GET", "/health_generate", long=True)


async def _load_report(calls: WorkerCalls, target: Target) -> tuple[str, Any]:
    """The path that answered and its JSON, or ``("", None)``: the remembered path if there
    is one, else ``/v1/loads`` then ``/get_load``."""
    known = calls.found.get("load")
    for path in (known,) if known else LOAD_PATHS:
        try:
            response = await calls.request(target, "GET", path)
        except UpstreamError:
            return "", None  # no answer at all: the other path would not get one either
        if response.status == 200:
            try:
                payload = orjson.loads(response.body)
            except orjson.JSONDecodeError:
                continue
            if path == V1_LOADS and not (
                isinstance(payload, dict) and isinstance(payload.get("loads"), list)
            ):
                continue  # not SGLang's /v1/loads (a catch-all route, say)
            calls.found["load"] = path
            return path, payload
    if known:
        del calls.found["load"]  # it stopped answering: look for one again next time
    return "", None
