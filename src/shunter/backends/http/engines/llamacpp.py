"""llama.cpp's server: load from its gauges, and a prefix cache that lives in its slots.

- load: ``llamacpp:requests_processing + llamacpp:requests_deferred`` from ``/metrics``;
- flush: ``GET /slots`` lists the slots and ``POST /slots/{id}?action=erase`` empties one
  (the server needs ``--slot-save-path`` for slot actions, else it answers 501 and the flush
  is reported failed with that reason; ``shunter llamacpp`` sets one).
"""

from __future__ import annotations

import asyncio

import orjson

from shunter.backends.base import EngineOpError, Runtime, Target
from shunter.backends.http.calls import WorkerCalls
from shunter.backends.http.engines.base import MetricsLoadEngine


class LlamaCppEngine(MetricsLoadEngine):
    runtime = Runtime.LLAMACPP
    owned_by = "llamacpp"
    can_flush = True
    load_metrics = ("llamacpp:requests_processing", "llamacpp:requests_deferred")

    async def flush(self, calls: WorkerCalls, target: Target) -> None:
        try:
            slots = orjson.loads(await calls.call(target, "GET", "/slots"))
            ids = [int(slot["id"]) for slot in slots]
        except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
            raise EngineOpError("GET /slots did not answer a list of slots") from None
        await asyncio.gather(
            *(calls.call(target, "POST", f"/slots/{i}?action=erase", b"") for i in ids)
        )
