"""What differs between inference engines served over HTTP, and the defaults.

An ``Engine`` is stateless: the same instance serves every worker of its runtime, and is
handed the worker (``Target``) and a way to call it (``WorkerCalls``). The defaults are
those of a plain OpenAI-compatible server: no load report, no way to flush, and a
generation check that asks ``/v1/completions`` for one token (the closest thing to
SGLang's ``/health_generate``).
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from shunter.backends.base import EngineOpError, Load, Runtime, Target
from shunter.backends.http.calls import WorkerCalls


class Engine:
    runtime = Runtime.OPENAI
    owned_by = ""  # what its /v1/models says in ``owned_by``: how it is recognised
    native_generate = False  # whether it serves SGLang's /generate
    can_flush = False

    async def load(self, calls: WorkerCalls, target: Target) -> Load:
        return Load()

    async def flush(self, calls: WorkerCalls, target: Target) -> None:
        raise EngineOpError(f"a {self.runtime.value} server has no way to flush its cache")

    async def health_generate(self, calls: WorkerCalls, target: Target) -> bytes:
        body = orjson.dumps({"model": target.model_id, "prompt": "ping", "max_tokens": 1})
        await calls.call(target, "POST", "/v1/completions", body, long=True)
        return b""


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


class MetricsLoadEngine(Engine):
    """An engine whose load is a sum of its own Prometheus gauges (requests running and
    waiting), read from its ``/metrics``."""

    load_metrics: tuple[str, ...] = ()

    async def load(self, calls: WorkerCalls, target: Target) -> Load:
        text = await calls.get(target, "/metrics")
        if text is None:
            return Load()
        return Load(sum_metrics(text.decode("utf-8", "replace"), self.load_metrics))
