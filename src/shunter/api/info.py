"""Endpoints about the fleet rather than for inference: health, readiness, models, the
workers' own information and metrics, loads, and cache flushing.

Each asks the workers' backends, which know how their engine answers (SGLang's own
endpoints, vLLM's and llama.cpp's metrics, a gRPC worker's RPCs).

In PD mode a request needs a pair: readiness wants a healthy prefill worker and a healthy
decode worker, the generation check runs on one of each, and the server and model
information come from a healthy prefill worker (smg asks the first one, healthy or not).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from shunter.api.call import Call
from shunter.api.reply import json_reply, text_reply
from shunter.backends.base import EngineOpError, InfoKind
from shunter.fleet.load_monitor import LoadMonitor
from shunter.fleet.registry import WorkerRegistry
from shunter.fleet.worker import Worker, WorkerType
from shunter.observability.engine_metrics import merge
from shunter.protocols.errors import ApiError, upstream_failure
from shunter.protocols.reply import Reply
from shunter.routing.aliases import ModelAliases

log = logging.getLogger("shunter.api.info")

ENGINE_METRICS_SECS = 5.0  # each worker's /metrics, at most
ENGINE_METRICS_FANOUT = 32  # workers asked at once
PROMETHEUS_TEXT = (b"content-type", b"text/plain; version=0.0.4")


class InfoApi:
    def __init__(
        self,
        registry: WorkerRegistry,
        loads: LoadMonitor,
        draining: Callable[[], bool] = lambda: False,
        pd_mode: bool = False,
        discovery_problem: Callable[[], str | None] = lambda: None,
        aliases: ModelAliases | None = None,
    ) -> None:
        self.registry = registry
        self.loads = loads
        self.draining = draining  # the gateway is shutting down: not ready for new requests
        self.pd_mode = pd_mode
        # Why service discovery has no view of the pods yet (None: it has one, or is off).
        self.discovery_problem = discovery_problem
        self.aliases = aliases  # --model-alias: listed beside their models

    # --- health -----------------------------------------------------------------------------

    async def liveness(self, call: Call) -> Reply:
        return text_reply(200, "OK")

    async def readiness(self, call: Call) -> Reply:
        if self.draining():
            return json_reply(503, {"status": "not ready", "reason": "draining"})
        workers = self.registry.all()
        healthy = sum(1 for w in workers if w.state.healthy)
        counts: dict[str, int] = {"healthy_workers": healthy, "total_workers": len(workers)}
        missing = self.discovery_problem() or (
            "insufficient healthy workers" if not healthy else ""
        )
        if self.pd_mode:
            for kind in (WorkerType.PREFILL, WorkerType.DECODE):
                count = sum(1 for w in self.registry.get_by_type(kind) if w.state.healthy)
                counts[f"healthy_{kind.value}_workers"] = count
                if not count:
                    missing = missing or f"no healthy {kind.value} worker"
        if missing:
            return json_reply(503, {"status": "not ready", "reason": missing, **counts})
        return json_reply(200, {"status": "ready", **counts})

    async def models(self, call: Call) -> Reply:
        models = self.registry.models()
        if not models:
            raise ApiError(503, "no_models", "No models available")
        data = [{"id": m, "object": "model", "owned_by": "local"} for m in models]
        if self.aliases is not None:
            data += self.aliases.listed(models)
        return json_reply(200, {"object": "list", "data": data})

    def first_available(self, kind: WorkerType | None = None) -> Worker:
        """The first available worker (of ``kind``, when given)."""
        workers = self.registry.all() if kind is None else self.registry.get_by_type(kind)
        for worker in workers:
            if worker.state.available:
                return worker
        which = "" if kind is None else f"{kind.value} "
        raise ApiError(503, "no_available_workers", f"no healthy {which}worker is available")

    async def health_generate(self, call: Call) -> Reply:
        """A generation check on the first available worker (in PD mode, on a prefill and
        a decode worker), in its engine's way (SGLang's own endpoint; one token from
        /v1/completions elsewhere; gRPC's HealthCheck)."""
        if not self.pd_mode:
            return Reply(200, [], await _generates(self.first_available(), call))
        pair = [self.first_available(WorkerType.PREFILL), self.first_available(WorkerType.DECODE)]
        await asyncio.gather(*(_generates(worker, call) for worker in pair))
        return json_reply(
            200,
            {
                "status": "ok",
                "message": "Health generate passed on a pair",
                "prefill": pair[0].url,
                "decode": pair[1].url,
            },
        )

    # --- the workers' own information ----------------------------------------------------

    async def server_info(self, call: Call) -> Reply:
        return await self._info(call, "server")

    async def model_info(self, call: Call) -> Reply:
        return await self._info(call, "model")

    async def _info(self, call: Call, kind: InfoKind) -> Reply:
        worker = self.first_available(WorkerType.PREFILL if self.pd_mode else None)
        try:
            return await worker.backend.info(worker, kind, call.request_id)
        except EngineOpError as exc:
            _log_failure(f"{kind} info request failed", worker, exc, call)
            raise ApiError(502, "upstream_unavailable", upstream_failure(exc.kind)) from None

    async def engine_metrics(self, call: Call) -> Reply:
        """The workers' own metrics, fanned out and merged, each sample labelled with its
        worker's address."""
        workers = {w.base_url: w for w in self.registry.all()}
        if not workers:
            raise ApiError(503, "no_workers", "no workers are registered")
        gate = asyncio.Semaphore(ENGINE_METRICS_FANOUT)

        async def fetch(worker: Worker) -> str | None:
            async with gate:
                try:
                    async with asyncio.timeout(ENGINE_METRICS_SECS):
                        return await worker.backend.metrics(worker)
                except TimeoutError:
                    return None
                except Exception as exc:  # this worker is left out; the others are merged
                    log.warning(
                        "reading a worker's metrics raised",
                        extra={"url": worker.url, "error": repr(exc)},
                    )
                    return None

        texts = await asyncio.gather(*(fetch(w) for w in workers.values()))
        answered = {url: text for url, text in zip(workers, texts, strict=True) if text}
        if not answered:
            raise ApiError(502, "engine_metrics_unavailable", "no worker answered /metrics")
        return Reply(200, [PROMETHEUS_TEXT], merge(answered).encode())

    # --- loads and caches ---------------------------------------------------------------------

    async def get_loads(self, call: Call) -> Reply:
        workers = self.registry.all()
        loads = await asyncio.gather(*(self.loads.read(w) for w in workers))
        rows = [
            {"worker": w.url, "load": -1 if load.load is None else load.load}
            for w, load in zip(workers, loads, strict=True)
        ]
        return json_reply(200, {"workers": rows})

    async def flush_cache(self, call: Call) -> Reply:
        """Flush every engine that has a way to, concurrently (one call per base URL)."""
        workers = self.registry.all()
        bases = {w.base_url: w for w in workers if w.backend.can_flush}
        results = await asyncio.gather(*(_flush(w) for w in bases.values()))
        failed = [{"worker": url, "error": err} for url, err in results if err]
        ok = [url for url, err in results if not err]
        common = {"total_http_workers": len(bases), "total_workers": len(workers)}
        if not failed:
            return json_reply(
                200,
                {
                    "status": "success",
                    "message": f"Cache flushed on {len(ok)} workers",
                    "workers_flushed": len(ok),
                    **common,
                },
            )
        log.warning(
            "cache flush failed on %d of %d workers",
            len(failed),
            len(bases),
            extra={"failed": failed},
        )
        return json_reply(
            206,
            {
                "status": "partial_success",
                "message": "Cache flush failed on some workers",
                "successful": ok,
                "failed": failed,
                **common,
            },
        )


async def _generates(worker: Worker, call: Call) -> bytes:
    """The worker's answer to a generation check; a 503 ApiError naming only the kind of
    failure if it fails (the worker and the details go to the log)."""
    try:
        return await worker.backend.health_generate(worker)
    except EngineOpError as exc:
        _log_failure("generation check failed", worker, exc, call)
        message = f"the generation check failed: {upstream_failure(exc.kind)}"
        raise ApiError(503, "health_generate_failed", message) from None


def _log_failure(what: str, worker: Worker, exc: EngineOpError, call: Call) -> None:
    """The worker and the details go to the log; the client is told only the kind."""
    facts = {"url": worker.url, "error": str(exc), "request_id": call.request_id}
    log.warning(what, extra=facts)


async def _flush(worker: Worker) -> tuple[str, str | None]:
    try:
        await worker.backend.flush(worker)
    except EngineOpError as exc:
        log.warning("cache flush failed", extra={"url": worker.base_url, "error": str(exc)})
        return worker.base_url, upstream_failure(exc.kind)
    except Exception as exc:  # reported as this worker's failure, not the whole answer's
        log.warning("cache flush raised", extra={"url": worker.base_url, "error": repr(exc)})
        return worker.base_url, "the flush failed in the gateway"
    return worker.base_url, None
