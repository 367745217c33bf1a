"""Non-inference endpoints: health, models, info, loads, cache flush and ``/workers``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import unquote

from shunter.asgi import JSON_CONTENT
from shunter.config import normalize_worker_url
from shunter.core import engine_ops
from shunter.core.engine_ops import EngineOpError
from shunter.fleet.jobs import QueueFull
from shunter.fleet.registration import SpecError, WorkerSpec
from shunter.fleet.worker import Runtime, Worker, WorkerType
from shunter.observability.engine_metrics import merge
from shunter.protocols.errors import ApiError
from shunter.server.call import Call
from shunter.server.state import GatewayState
from shunter.transport.base import HOP_BY_HOP, UpstreamError

log = logging.getLogger("shunter.admin")

HEALTH_FIELDS = (
    "health_check_timeout_secs",
    "health_check_interval_secs",
    "health_success_threshold",
    "health_failure_threshold",
    "max_connection_attempts",
)


class AdminHandlers:
    def __init__(self, state: GatewayState) -> None:
        self.state = state

    # --- public ----------------------------------------------------------------------------

    async def liveness(self, call: Call) -> int:
        return await call.reply_text(200, "OK")

    async def readiness(self, call: Call) -> int:
        workers = self.state.registry.all()
        healthy = sum(1 for w in workers if w.healthy)
        if healthy:
            return await call.reply_json(
                200, {"status": "ready", "healthy_workers": healthy, "total_workers": len(workers)}
            )
        return await call.reply_json(
            503, {"status": "not ready", "reason": "insufficient healthy workers"}
        )

    async def models(self, call: Call) -> int:
        models = self.state.registry.models()
        if not models:
            raise ApiError(503, "no_models", "No models available")
        data = [{"id": m, "object": "model", "owned_by": "local"} for m in models]
        return await call.reply_json(200, {"object": "list", "data": data})

    async def health_generate(self, call: Call) -> int:
        """A generation check on the first available worker, in its engine's way.

        SGLang's own /health_generate is proxied; an OpenAI-compatible engine (vLLM,
        llama.cpp, other) is asked for one token from /v1/completions.
        """
        worker = self.state.router.first_available()
        cell = worker.client_cell
        client = None if cell is None else cell.value or await cell.get()
        try:
            body = await engine_ops.health_generate(client, worker)
        except EngineOpError as exc:
            raise ApiError(
                503, "health_generate_failed", f"worker {worker.url} failed to generate: {exc}"
            ) from None
        return await call.reply_raw(200, [], body)

    async def server_info(self, call: Call) -> int:
        return await self._proxy(call, "/get_server_info")

    async def model_info(self, call: Call) -> int:
        return await self._proxy(call, "/get_model_info")

    async def _proxy(self, call: Call, path: str, worker: Worker | None = None) -> int:
        worker = worker or self.state.router.first_available()
        if worker.scheduler_cell is not None:
            return await call.reply_raw(200, [JSON_CONTENT],
                                        await _grpc_info(worker, path))  # fmt: skip
        status, headers, body = await self.state.router.proxy_get(path, call.request_id, worker)
        return await call.reply_raw(status, [h for h in headers if h[0] != b"x-request-id"], body)

    async def engine_metrics(self, call: Call) -> int:
        """The workers' own metrics, fanned out (5 s each, 32 at a time) and merged."""
        workers = {w.base_url: w for w in self.state.registry.all()}
        if not workers:
            raise ApiError(503, "no_workers", "no workers are registered")
        gate = asyncio.Semaphore(32)

        async def fetch(worker: Worker) -> str | None:
            async with gate:
                try:
                    request = self.state.control.request(
                        "GET", worker.base_url + "/metrics", worker.auth_headers(), None
                    )
                    response = await asyncio.wait_for(request, 5)
                except (UpstreamError, TimeoutError):
                    return None
            return response.body.decode("utf-8", "replace") if response.status == 200 else None

        texts = await asyncio.gather(*(fetch(w) for w in workers.values()))
        answered = {url: text for url, text in zip(workers, texts, strict=True) if text}
        if not answered:
            raise ApiError(502, "engine_metrics_unavailable", "no worker answered /metrics")
        body = merge(answered).encode()
        return await call.reply_raw(200, [(b"content-type", b"text/plain; version=0.0.4")], body)

    # --- dashboard ----------------------------------------------------------------------------

    def dashboard_data(self) -> dict[str, Any]:
        """What the dashboard shows: every worker, the models, the default policy."""
        state = self.state
        return {
            "workers": [w.to_info() for w in state.registry.all()],
            "models": list(state.registry.models()),
            "policy": state.policies.default.name,
        }

    # --- admin -------------------------------------------------------------------------------

    async def get_loads(self, call: Call) -> int:
        workers = self.state.registry.all()
        loads = await asyncio.gather(*(self._load_of(w) for w in workers))
        return await call.reply_json(
            200,
            {
                "workers": [
                    {"worker": w.url, "load": load} for w, load in zip(workers, loads, strict=True)
                ]
            },
        )

    async def _load_of(self, worker: Worker) -> int:
        load = await self.state.load_monitor.read_load(worker)
        return -1 if load is None else load

    async def flush_cache(self, call: Call) -> int:
        """Flush every engine that has a way to (see core/engine_ops.py), concurrently."""
        workers = self.state.registry.all()
        bases = {w.base_url: w for w in workers if engine_ops.can_flush(w)}
        results = await asyncio.gather(*(self._flush(w) for w in bases.values()))
        failed = [{"worker": url, "error": err} for url, err in results if err]
        ok = [url for url, err in results if not err]
        common = {"total_http_workers": len(bases), "total_workers": len(workers)}
        if not failed:
            return await call.reply_json(200, {
                "status": "success", "message": f"Cache flushed on {len(ok)} workers",
                "workers_flushed": len(ok), **common,
            })  # fmt: skip
        log.warning("cache flush failed on %d of %d workers", len(failed), len(bases),
                    extra={"failed": failed})  # fmt: skip
        return await call.reply_json(206, {
            "status": "partial_success", "message": "Cache flush failed on some workers",
            "successful": ok, "failed": failed, **common,
        })  # fmt: skip

    async def _flush(self, worker: Worker) -> tuple[str, str | None]:
        try:
            await engine_ops.flush(self.state.control, worker)
        except EngineOpError as exc:
            return worker.base_url, str(exc)
        return worker.base_url, None

    # --- /workers ----------------------------------------------------------------------------

    async def list_workers(self, call: Call) -> int:
        registry = self.state.registry
        workers = [w.to_info() for w in registry.all()]
        stats = registry.stats()
        return await call.reply_json(200, {
            "workers": workers,
            "total": len(workers),
            "stats": {
                "prefill_count": stats["prefill_workers"],
                "decode_count": stats["decode_workers"],
                "regular_count": stats["regular_workers"],
            },
        })  # fmt: skip

    async def add_worker(self, call: Call) -> int:
        payload = await call.json()
        try:
            spec = WorkerSpec.from_json(payload)
        except SpecError as exc:
            raise ApiError(400, "invalid_worker_spec", str(exc)) from None
        if self.state.registrar.find(spec.url):
            raise ApiError(
                409,
                "WORKER_ALREADY_EXISTS",
                f"Worker {spec.url} already exists; use PUT /workers/{{url}}",
            )
        try:
            self.state.submit_add(spec)
        except QueueFull as exc:
            raise ApiError(500, "INTERNAL_SERVER_ERROR", str(exc)) from None
        return await call.reply_json(202, {
            "status": "accepted", "worker_id": spec.url,
            "message": "Worker addition queued for background processing",
        })  # fmt: skip

    async def worker(self, call: Call) -> int:
        """GET, PUT and DELETE on ``/workers/{url}`` (the URL percent-encoded once: it is
        decoded from the raw path, as the server's decoded ``path`` would decode it twice)."""
        raw_path: bytes = call.scope.get("raw_path") or call.path.encode("latin-1")
        url = normalize_worker_url(unquote(raw_path.decode("latin-1")[len("/workers/") :]))
        if call.method == "GET":
            return await self._get_worker(call, url)
        if not self.state.registrar.find(url):
            raise ApiError(404, "WORKER_NOT_FOUND", f"Worker {url} not found")
        if call.method == "DELETE":
            self.state.registrar.remove(url)
            return await call.reply_json(202, {
                "status": "accepted", "worker_id": url,
                "message": "Worker removal queued for background processing",
            })  # fmt: skip
        changes = await call.json()
        _check_update(changes)
        self.state.registrar.update(url, changes)
        return await call.reply_json(202, {
            "status": "accepted", "worker_id": url,
            "message": "Worker update queued for background processing",
        })  # fmt: skip

    async def _get_worker(self, call: Call, url: str) -> int:
        workers = self.state.registrar.find(url)
        job = self.state.jobs.status(url)
        if workers:
            info = workers[0].to_info() if len(workers) == 1 else {
                **workers[0].to_info(), "id": url, "url": url, "dp_ranks": len(workers),
            }  # fmt: skip
        elif job is not None:
            info = {
                "id": url,
                "url": url,
                "model_id": "unknown",
                "worker_type": "unknown",
                "is_healthy": False,
                "connection_mode": "unknown",
            }
        else:
            raise ApiError(404, "WORKER_NOT_FOUND", f"Worker {url} not found")
        if job is not None:
            info["job_status"] = job.as_dict()
        return await call.reply_json(200, info)


async def _grpc_info(worker: Worker, path: str) -> bytes:
    """/get_server_info or /get_model_info of a gRPC worker, from its RPCs, as JSON."""
    from google.protobuf.json_format import MessageToJson

    from shunter.transport.scheduler import SchedulerError

    assert worker.scheduler_cell is not None
    try:
        client = worker.scheduler_cell.value or await worker.scheduler_cell.get()
        info = await (client.server_info(5.0) if "server" in path else client.model_info(5.0))
    except SchedulerError as exc:
        raise ApiError(exc.status, "upstream_unavailable", str(exc)) from None
    return str(MessageToJson(info, preserving_proto_field_name=True)).encode()


def _check_update(changes: Any) -> None:
    if not isinstance(changes, dict):
        raise ApiError(400, "invalid_worker_update", "the body must be a JSON object")
    allowed = {"priority", "cost", "labels", "api_key", *HEALTH_FIELDS}
    unknown = set(changes) - allowed
    if unknown:
        raise ApiError(
            400, "invalid_worker_update", f"unknown fields: {', '.join(sorted(unknown))}"
        )
    for key in ("priority", "cost"):
        value = changes.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ApiError(400, "invalid_worker_update", f"'{key}' must be a number")
    if changes.get("api_key") is not None and not isinstance(changes["api_key"], str):
        raise ApiError(400, "invalid_worker_update", "'api_key' must be a string")
    if changes.get("labels") is not None and not isinstance(changes["labels"], dict):
        raise ApiError(400, "invalid_worker_update", "'labels' must be an object")


__all__ = ["HOP_BY_HOP", "AdminHandlers", "Runtime", "WorkerType"]
