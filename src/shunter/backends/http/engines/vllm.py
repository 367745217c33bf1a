"""vLLM's OpenAI server: load from its gauges, flush through its dev-mode endpoint.

- load: ``vllm:num_requests_running + vllm:num_requests_waiting`` from ``/metrics``;
- flush: ``POST /reset_prefix_cache``, which vLLM serves only with
  ``VLLM_SERVER_DEV_MODE=1`` (otherwise the flush is reported failed with its 404).
"""

from __future__ import annotations

from shunter.backends.base import Runtime, Target
from shunter.backends.http.calls import WorkerCalls
from shunter.backends.http.engines.base import MetricsLoadEngine


class VllmEngine(MetricsLoadEngine):
    runtime = Runtime.VLLM
    owned_by = "vllm"
    can_flush = True
    load_metrics = ("vllm:num_requests_running", "vllm:num_requests_waiting")

    async def flush(self, calls: WorkerCalls, target: Target) -> None:
        await calls.call(target, "POST", "/reset_prefix_cache", b"")
