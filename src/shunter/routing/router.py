"""The regular HTTP router: request → model's workers → policy → worker client → relay.

The hot path: decode two fields of the body, one registry read, one policy call, one
attribute read for the worker's client, then bytes straight through. The client's body is
forwarded unchanged unless a field must be injected (a DP rank).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from shunter.asgi import (
    DisconnectWatch,
    Receive,
    Send,
    end_stream,
    send_bytes,
    send_chunk,
    start_stream,
)
from shunter.fleet.registry import WorkerRegistry, Workers
from shunter.fleet.worker import Worker
from shunter.observability.metrics import Metrics
from shunter.observability.streams import StreamStats
from shunter.observability.tracing import Tracing, without_trace_headers
from shunter.policies.base import Policy, RouteRequest
from shunter.policies.registry import PolicyRegistry
from shunter.protocols.errors import ApiError, stream_broken_event, upstream_failure
from shunter.protocols.routing import RoutingFields, decode_routing_fields, routing_text
from shunter.routing.attempt import RetryAttempt
from shunter.routing.retry import RETRYABLE_STATUSES, RetryConfig
from shunter.routing.verdict import Verdict
from shunter.transport.base import HOP_BY_HOP, UpstreamClient, UpstreamError

if TYPE_CHECKING:
    from shunter.routers.grpc import GrpcAttempt

log = logging.getLogger("shunter.router")

# Hop-by-hop headers, the request id (the gateway's own goes instead), and Expect (the
# gateway answered any 100-continue itself; the worker gets the whole body at once).
_NOT_FORWARDED = HOP_BY_HOP | {"x-request-id", "expect"}
# Endpoints only SGLang workers serve; OpenAI-compatible servers answer them with 404.
SGLANG_ONLY_PATHS = frozenset({"/generate"})
# What a gRPC worker serves (the gateway tokenizes and formats for it).
GRPC_PATHS = frozenset({"/generate", "/v1/chat/completions", "/v1/completions"})
_UPSTREAM_STATUS = {"connect": 502, "io": 502, "timeout": 504}


@dataclass(slots=True)
class _Attempt:
    """One try of a request on one worker."""

    client: UpstreamClient
    worker: Worker
    url: str
    headers: list[tuple[str, str]]
    body: bytes
    last: bool  # no retry after this one
    verdict: Verdict  # the request's attempts, for the breakers


@dataclass(slots=True)
class Inbound:
    """An inference request as the router sees it."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    request_id: str
    worker: str | None = None  # set per attempt: the worker last tried
    model: str = ""  # the registry's model id, once selected
    started: float = 0.0  # perf_counter() when the request arrived


class RegularRouter:
    def __init__(
        self,
        registry: WorkerRegistry,
        policies: PolicyRegistry,
        metrics: Metrics,
        retry: RetryConfig | None = None,
        tracing: Tracing | None = None,
        grpc: GrpcAttempt | None = None,
        gateway_auth: bytes | None = None,
    ) -> None:
        self.grpc = grpc  # serves attempts on gRPC workers; None without the grpc extra
        # The client's Authorization that carries the gateway's own key: never forwarded.
        self.gateway_auth = gateway_auth
        self.registry = registry
        self.policies = policies
        self.metrics = metrics
        self.retry = retry or RetryConfig()
        self.tracing = tracing

    def _span(self, name: str, **options: Any) -> AbstractContextManager[Any]:
        return nullcontext() if self.tracing is None else self.tracing.span(name, **options)

    # --- selection --------------------------------------------------------------------------

    def workers_for(self, model: str | None) -> tuple[str, Workers]:
        """The registry's model id for ``model`` and that model's workers.

        A fleet serving one model takes any model name, or none, as sglang-router does.
        """
        only = self.registry.only_model()
        if only is not None:
            return only
        if not self.registry.models():
            raise ApiError(503, "no_workers", "no workers are registered yet")
        if model is None:
            models = ", ".join(sorted(self.registry.models()))
            raise ApiError(
                400, "model_required", f"this gateway serves several models; name one of: {models}"
            )
        workers = self.registry.get_by_model(model)
        if not workers:
            raise ApiError(404, "model_not_found", f"The model `{model}` does not exist.")
        return model, workers

    def _native_workers(self, model: str, path: str) -> Workers:
        """The model's workers that serve an SGLang-only endpoint; a 400 if none does."""
        workers = self.registry.get_native_by_model(model)
        if not workers:
            raise ApiError(
                400,
                "endpoint_not_supported",
                f"{path} is an SGLang endpoint and the workers serving `{model}` are all "
                "OpenAI-compatible servers (vLLM, llama.cpp or other) that do not have it; "
                "use /v1/completions or /v1/chat/completions",
            )
        return workers

    def select(
        self, fields: RoutingFields, request: Inbound, avoid: Sequence[Worker] = ()
    ) -> tuple[Worker, Policy, str]:
        model, workers = self.workers_for(fields.model)
        if request.path in SGLANG_ONLY_PATHS:
            workers = self._native_workers(model, request.path)
        if avoid:  # a retry: prefer workers this request has not failed on yet
            workers = tuple(w for w in workers if w not in avoid) or workers
        policy = self.policies.policy_for(model)
        text = routing_text(request.body) if policy.needs_text else None
        route = RouteRequest(model, text, request.headers, fields.routing_id)
        worker = policy.select(workers, route)
        if worker is None:
            raise ApiError(503, "no_available_workers", "no healthy worker is available")
        return worker, policy, model

    # --- forwarding -------------------------------------------------------------------------

    async def route(self, request: Inbound, send: Send, receive: Receive) -> int:
        """Serve one inference request; returns the status sent to the client.

        Each attempt selects a worker afresh (avoiding the ones that failed this request);
        a retryable failure (a 408/429/5xx status, no connection) waits the backoff and tries
        again, as long as nothing has reached the client yet. The breakers hear the
        request's attempts once, when the loop ends (core/verdict.py).
        """
        fields = decode_routing_fields(request.body)
        incoming = None if self.tracing is None else self.tracing.incoming(request.headers)
        status, error_code = 500, "internal_error"
        try:
            with self._span("route", context=incoming, path=request.path,
                            request_id=request.request_id):  # fmt: skip
                status = await self._route(fields, request, send, receive)
                error_code = ""
                return status
        except ApiError as exc:
            status, error_code = exc.status, exc.code
            raise
        finally:
            self.metrics.routed_request(request.model or "unknown", request.path,
                                        time.perf_counter() - request.started, status,
                                        error_code)  # fmt: skip

    async def _route(
        self, fields: RoutingFields, request: Inbound, send: Send, receive: Receive
    ) -> int:
        watch = DisconnectWatch(receive) if fields.stream else None
        attempts = self.retry.attempts
        failed: list[Worker] = []
        verdict = Verdict()
        try:
            for attempt in range(attempts):
                last = attempt + 1 == attempts
                if attempt:
                    delay = self.retry.backoff_secs(attempt - 1)
                    self.metrics.retry_backoff(attempt, delay)
                    await asyncio.sleep(delay)
                try:
                    with self._span("select_worker", attempt=attempt):
                        worker, policy, model = self.select(fields, request, failed)
                except ApiError as exc:
                    if exc.status != 503 or last:
                        raise
                    continue
                if attempt:
                    self.metrics.retried(worker, request.path)
                request.model = model
                self.metrics.observe_route(
                    worker, model, request.path, watch is not None, policy.name
                )
                try:
                    return await self._attempt(worker, request, send, watch, last, verdict)
                except RetryAttempt:
                    failed.append(worker)
            raise AssertionError("the last attempt never asks for a retry")
        except asyncio.CancelledError:
            if watch is not None and watch.absorb_cancel():
                log.info(
                    "client left; upstream cancelled", extra={"request_id": request.request_id}
                )
                return 499
            raise
        finally:
            if not verdict.settled:  # a relayed answer settles it; errors end up here
                verdict.settle(request.request_id)
            if watch is not None:
                watch.finish()

    async def _attempt(
        self,
        worker: Worker,
        request: Inbound,
        send: Send,
        watch: DisconnectWatch | None,
        last: bool,
        verdict: Verdict,
    ) -> int:
        """One try on ``worker``, over HTTP or gRPC, its load counted while it runs."""
        over_grpc = worker.scheduler_cell is not None
        if over_grpc and (self.grpc is None or request.path not in GRPC_PATHS):
            raise ApiError(501, "not_implemented",
                           f"{request.path} is not served by gRPC workers")  # fmt: skip
        request.worker = worker.url
        with self._span("upstream", client=True, worker=worker.url):
            worker.in_flight += 1
            try:
                if over_grpc:
                    assert self.grpc is not None
                    return await self.grpc.serve(worker, request.model, request.path,
                                                 request.body, request.request_id, send, watch,
                                                 last, verdict)  # fmt: skip
                return await self._http_attempt(worker, request, send, watch, last, verdict)
            finally:
                worker.in_flight -= 1
                worker.processed += 1

    async def _http_attempt(
        self,
        worker: Worker,
        request: Inbound,
        send: Send,
        watch: DisconnectWatch | None,
        last: bool,
        verdict: Verdict,
    ) -> int:
        cell = worker.client_cell
        assert cell is not None
        url = worker.base_url + request.path
        if request.query:
            url += "?" + request.query.decode("latin-1")
        attempt = _Attempt(
            client=cell.value or await cell.get(),
            worker=worker,
            url=url,
            headers=upstream_headers(request, worker, self.gateway_auth),
            body=request.body if worker.dp_rank is None else inject_rank(request.body, worker),
            last=last,
            verdict=verdict,
        )
        if self.tracing is not None:  # the worker continues our trace, not the client's
            attempt.headers = [*without_trace_headers(attempt.headers), *self.tracing.outgoing()]
        if watch is None:
            return await self._relay_whole(attempt, request, send)
        return await self._relay_stream(attempt, request, send, watch)

    async def _relay_whole(self, attempt: _Attempt, request: Inbound, send: Send) -> int:
        try:
            response = await attempt.client.request(
                request.method, attempt.url, attempt.headers, attempt.body
            )
        except UpstreamError as exc:
            raise self._upstream_failure(attempt, exc, request) from None
        self._retry_on_status(attempt, response.status, request)
        await send_bytes(
            send, response.status, response.body, downstream_headers(response.headers, request)
        )
        return response.status

    async def _relay_stream(
        self, attempt: _Attempt, request: Inbound, send: Send, watch: DisconnectWatch
    ) -> int:
        worker = attempt.worker
        try:
            upstream = await attempt.client.stream(
                request.method, attempt.url, attempt.headers, attempt.body
            )
        except UpstreamError as exc:
            raise self._upstream_failure(attempt, exc, request) from None
        try:
            self._retry_on_status(attempt, upstream.status, request)
            await start_stream(send, upstream.status, downstream_headers(upstream.headers, request))
            # From here on the client has bytes: no more retries.
            stats = StreamStats(request.started)
            while (chunk := await upstream.next_chunk()) is not None:
                stats.on_chunk(chunk)
                await send_chunk(send, chunk)
            if upstream.status == 200:
                self.metrics.observe_stream(request.model, request.path, stats)
        except UpstreamError as exc:
            # The status is sent, so tell the client in-band.
            log.warning(
                "stream broke",
                extra={"worker": worker.url, "error": str(exc), "request_id": request.request_id},
            )
            self.metrics.worker_error(worker, "stream_" + exc.kind)
            Verdict.stream_broke(worker)
            await send_chunk(send, stream_broken_event(exc.kind))
        finally:
            await upstream.aclose()
        watch.finish()
        await end_stream(send)
        return upstream.status

    def _retry_on_status(self, attempt: _Attempt, status: int, request: Inbound) -> None:
        """Ask for another attempt on a retryable status if one is left; otherwise this
        answer is relayed, so the request's attempts are told to the breakers now."""
        worker = attempt.worker
        self.metrics.upstream_answer(status)
        if status >= 500:
            self.metrics.worker_error(worker, f"status_{status}")
        if status in RETRYABLE_STATUSES:
            if not attempt.last:
                attempt.verdict.answered(worker, status)
                raise RetryAttempt
            if self.retry.attempts > 1:
                self.metrics.retries_exhausted(worker, request.path)
        attempt.verdict.relayed(worker, status, request.request_id)

    def _upstream_failure(
        self, attempt: _Attempt, exc: UpstreamError, request: Inbound
    ) -> Exception:
        worker = attempt.worker
        self.metrics.worker_error(worker, "upstream_" + exc.kind)
        self.metrics.upstream_answer(_UPSTREAM_STATUS.get(exc.kind, 502), "upstream_" + exc.kind)
        if exc.kind == "oversize":
            # The worker answered, too much: this request's answer, not the worker's health
            # or its connections. Another worker would send as much again: no retry.
            attempt.verdict.relayed(worker, 200, request.request_id)
            log.warning(
                "worker response too large",
                extra={"worker": worker.url, "error": str(exc), "request_id": request.request_id},
            )
            return ApiError(502, "upstream_response_too_large", upstream_failure(exc.kind))
        attempt.verdict.unreachable(worker)
        if exc.kind != "timeout" and worker.client_cell is not None:
            # The pool may hold connections to a worker that restarted: build a fresh one
            # in the background; requests keep using this one until it is ready.
            worker.client_cell.replace(attempt.client)
        log.warning(
            "worker call failed",
            extra={"worker": worker.url, "error": str(exc), "request_id": request.request_id},
        )
        if not attempt.last:
            return RetryAttempt()
        if self.retry.attempts > 1:
            self.metrics.retries_exhausted(worker, request.path)
        status = _UPSTREAM_STATUS.get(exc.kind, 502)
        code = "upstream_timeout" if status == 504 else "upstream_unavailable"
        return ApiError(status, code, upstream_failure(exc.kind))

    def first_available(self) -> Worker:
        """The first available worker, for the proxied info endpoints."""
        for worker in self.registry.all():
            if worker.is_available:
                return worker
        raise ApiError(503, "no_available_workers", "no healthy worker is available")

    async def proxy_get(
        self, path: str, request_id: str, worker: Worker | None = None
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """GET ``path`` from ``worker``, by default the first available one."""
        worker = worker or self.first_available()
        cell = worker.client_cell
        assert cell is not None
        client = cell.value or await cell.get()
        headers = [("x-request-id", request_id), *worker.auth_headers()]
        try:
            response = await client.request("GET", worker.base_url + path, headers, None)
        except UpstreamError as exc:
            status = _UPSTREAM_STATUS.get(exc.kind, 502)
            raise ApiError(
                status, "upstream_unavailable", f"worker {worker.url} failed: {exc}"
            ) from None
        relayed = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in response.headers
            if k not in HOP_BY_HOP
        ]
        return response.status, relayed, response.body


def upstream_headers(
    request: Inbound, worker: Worker, gateway_auth: bytes | None
) -> list[tuple[str, str]]:
    """The headers the worker receives: the client's, less hop-by-hop ones, those the
    client's ``Connection`` header names and ``Expect``, plus the request id.

    Credentials: a worker with its own key gets that key, never the client's header; a
    worker without one gets the client's ``Authorization``, unless that is the gateway's
    own key (whoever runs a worker must not learn how to administer the gateway).
    """
    headers = request.headers
    dropped = _NOT_FORWARDED
    for name, value in headers:
        if name == b"connection":
            named = {t.strip().lower() for t in value.decode("latin-1").split(",")}
            dropped = dropped | named
    has_key = worker.api_key is not None
    forwarded = [
        (k.decode("latin-1"), v.decode("latin-1"))
        for k, v in headers
        if k.decode("latin-1") not in dropped
        and not (k == b"authorization" and (has_key or v == gateway_auth))
    ]
    if has_key:
        forwarded.append(("authorization", f"Bearer {worker.api_key}"))
    forwarded.append(("x-request-id", request.request_id))
    return forwarded


def downstream_headers(
    headers: list[tuple[str, str]], request: Inbound
) -> list[tuple[bytes, bytes]]:
    relayed = [
        (k.encode("latin-1"), v.encode("latin-1"))
        for k, v in headers
        if k not in HOP_BY_HOP and k != "x-request-id"
    ]
    relayed.append((b"x-request-id", request.request_id.encode()))
    return relayed


def inject_rank(body: bytes, worker: Worker) -> bytes:
    """The body with ``data_parallel_rank`` set: the one case where the gateway rewrites it."""
    payload = orjson.loads(body)
    payload["data_parallel_rank"] = worker.dp_rank
    return orjson.dumps(payload)
