"""The router: an inference request in, a reply out. Select, attempt, retry.

The hot path: the routing fields decoded once, one registry read, one policy call, then
the worker's backend does the talking and hands back a ``Reply``. The router counts the
worker's load for as long as the attempt lasts (for a stream: until its last chunk or its
client leaves), records what the attempts say about the workers (metrics, and the breakers
once per request: ``verdict.py``), and decides on retries.

A retryable failure (a 408/429/5xx status, no connection, a timeout) waits the backoff and
tries again on a worker chosen afresh, avoiding those that failed this request, as long as
nothing has been handed back yet. A stream that breaks after its reply was handed back ends
with an SSE error event instead.

``select`` decides in this order, the first rule that applies winning: the workers that
serve the endpoint (SGLang-only paths, Messages, tokenize, HTTP-only Responses); a worker
the client named (``X-SMG-Target-Worker``, ``target.py``); on a retry, the workers this
request has not failed on; the worker holding a ``previous_response_id``'s conversation
(``responses.py``); the routing key's worker (sticky sessions, ``sticky.py``); the policy.

Each attempt's decision is kept as a ``Routed`` (``receipt.py``): with ``route_receipt`` the
answer tells the client which worker and why (``x-shunter-route``), the ``route`` span
carries it when tracing, and the worker's reported cached tokens are held against the
policy's prediction once the answer is whole (a stream: at its end).

No ASGI here: whoever called ``route`` writes the reply, and a client that leaves reaches the
router as a cancellation of ``route`` or a close of the stream's body.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from mypy_extensions import mypyc_attr

from shunter.backends.base import MESSAGES_RUNTIMES, SGLANG_ONLY_PATHS, Outbound
from shunter.fleet.registry import WorkerRegistry, Workers
from shunter.fleet.worker import Worker
from shunter.observability.metrics import Metrics
from shunter.observability.tracing import Tracing
from shunter.policies.base import Decision, RouteRequest
from shunter.policies.registry import PolicyRegistry
from shunter.protocols.anthropic import MESSAGES_PATH
from shunter.protocols.errors import ApiError, upstream_failure
from shunter.protocols.reply import Reply
from shunter.protocols.tokenize import TOKEN_PATHS
from shunter.routing.aliases import ModelAliases
from shunter.routing.receipt import Routed
from shunter.routing.relay import WatchedStream
from shunter.routing.request import InferenceRequest
from shunter.routing.retry import RETRYABLE_STATUSES, RetryConfig
from shunter.routing.sticky import StickySessions
from shunter.routing.target import TARGET_REASON, target_of, targeted
from shunter.routing.verdict import Verdict
from shunter.wire.base import UpstreamError

log = logging.getLogger("shunter.router")

_UPSTREAM_STATUS = {"connect": 502, "io": 502, "timeout": 504, "oversize": 502}
_NO_SPAN = nullcontext()  # reusable: one object for every span not traced
# Endpoints that not every worker serves: selection keeps those that do (``_serving``).
_SOME_WORKERS_PATHS = SGLANG_ONLY_PATHS | TOKEN_PATHS | {MESSAGES_PATH}


def _serving_or_501(path: str, workers: Workers, why: str) -> Workers:
    """Those of ``workers`` that serve ``path``; a 501 saying ``why`` when none does."""
    serving = tuple(w for w in workers if w.backend.serves(path))
    if not serving:
        raise ApiError(501, "endpoint_not_supported", why)
    return serving


# Compiled (a mypyc build), a class refuses subclasses that are not compiled with it unless
# it allows them: the PD router (routing/pd/) is one, and so may a user's.
@mypyc_attr(allow_interpreted_subclasses=True)
class Router:
    def __init__(
        self,
        registry: WorkerRegistry,
        policies: PolicyRegistry,
        metrics: Metrics,
        retry: RetryConfig | None = None,
        tracing: Tracing | None = None,
        route_receipt: bool = False,
    ) -> None:
        self.registry = registry
        self.policies = policies
        self.metrics = metrics
        self.retry = retry or RetryConfig()
        self.tracing = tracing
        # Opt-in: the header names a worker, which the gateway's own errors never do.
        self.route_receipt = route_receipt
        # --routing-key-override: a key keeps its worker (sticky.py); None: off, one check.
        self.sticky: StickySessions | None = None
        # --model-alias: a request for an alias is served as its model (aliases.py).
        self.aliases: ModelAliases | None = None

    def _span(self, name: str, **options: Any) -> AbstractContextManager[Any]:
        """A tracing span, or a no-op one when tracing is off. The spans every request
        opens (``route``, ``select_worker``, ``upstream``) test ``self.tracing`` instead:
        three no-op spans cost 13k instructions per proxied request (3.4%, callgrind),
        for the call with its keywords and ``nullcontext``'s Python-level enter and exit."""
        return _NO_SPAN if self.tracing is None else self.tracing.span(name, **options)

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

    def _http_workers(self, model: str, path: str, workers: Workers) -> Workers:
        """The model's workers reached over HTTP (the ones serving ``path``); a 501 if none."""
        return _serving_or_501(
            path,
            workers,
            f"{path} is served by HTTP workers only, and the workers serving `{model}` "
            "are all gRPC workers",
        )

    @staticmethod
    def _holds(worker: Worker, model: str, avoid: Sequence[Worker]) -> bool:
        """Whether ``worker``, holding the request's conversation, may serve it: available,
        of the model, and not failed by this request already."""
        return worker.state.available and model in worker.model_ids and worker not in avoid

    def _serving(self, model: str, path: str, workers: Workers) -> Workers:
        """The model's workers for an endpoint not every worker serves."""
        if path in SGLANG_ONLY_PATHS:
            return self._native_workers(model, path)
        if path == MESSAGES_PATH:
            # Workers known to serve it, else the others are tried (their 404 says no).
            known = tuple(w for w in workers if w.backend.runtime in MESSAGES_RUNTIMES)
            return known or workers
        return _serving_or_501(
            path,
            workers,
            f"{path} needs the model's tokenizer: the gateway has none for `{model}` "
            "and its workers do not serve it (SGLang and vLLM servers do)",
        )

    def select(
        self, request: InferenceRequest, avoid: Sequence[Worker] = ()
    ) -> tuple[Worker, str, Routed]:
        """The worker, the registry's model id, and the decision explained."""
        model, workers = self.workers_for(request.fields.model)
        # Tokenizing fills no worker's cache: its text is not for a prefix-aware policy.
        cacheless = False
        if request.path in _SOME_WORKERS_PATHS:
            workers = self._serving(model, request.path, workers)
            cacheless = request.path in TOKEN_PATHS
        if request.http_only:
            workers = self._http_workers(model, request.path, workers)
        policy = self.policies.policy_for(model)
        target = target_of(request.headers)
        if target is not None:  # the client named its worker (target.py)
            named = targeted(target, model, workers)
            route = RouteRequest(model, None, request.headers, request.fields.routing_id)
            decision = Decision(named, TARGET_REASON)
            return named, model, Routed(policy, route, decision, time.perf_counter())
        if avoid:  # a retry: prefer workers this request has not failed on yet
            workers = tuple(w for w in workers if w not in avoid) or workers
        held = request.held_by
        if held is not None and self._holds(held, model, avoid):
            route = RouteRequest(model, None, request.headers, request.fields.routing_id)
            decision = Decision(held, "previous_response")
            return held, model, Routed(policy, route, decision, time.perf_counter())
        text, chat = None, None
        if cacheless:
            text = ""
        elif policy.needs_text:
            text = request.routing_text
            if request.fields.messages is not None:
                chat = request.body
        route = RouteRequest(model, text, request.headers, request.fields.routing_id, chat)
        sticky = self.sticky
        if sticky is None:
            decision = policy.decide(workers, route)
        else:
            decision = sticky.decide(policy, workers, route)
        worker = decision.worker
        if worker is None:
            raise ApiError(503, "no_available_workers", "no healthy worker is available")
        return worker, model, Routed(policy, route, decision, time.perf_counter())

    # --- routing ----------------------------------------------------------------------------

    async def route(self, request: InferenceRequest) -> Reply:
        """Serve one inference request: the reply to send, or an ApiError to answer."""
        if self.aliases is not None:
            self.aliases.resolve(request)
        tracing = self.tracing
        try:
            if tracing is None:  # no span, and no ``with`` (see ``_span``)
                span = None
                reply = await self._route(request)
            else:
                with tracing.span(
                    "route",
                    context=tracing.incoming(request.headers),
                    held=True,  # a stream's relay ends it
                    path=request.path,
                    request_id=request.request_id,
                ) as span:
                    request.span = span
                    reply = await self._route(request)
        except (ApiError, asyncio.CancelledError) as exc:
            self._unanswered(request, exc)
            raise
        if isinstance(reply.body, bytes):
            _end(span)
            self._routed(request, reply.status, "")
        return reply

    def _routed(self, request: InferenceRequest, status: int, code: str) -> None:
        elapsed = time.perf_counter() - request.started
        self.metrics.routed_request(request.model, request.path, elapsed, status, code)

    def _unanswered(
        self, request: InferenceRequest, exc: ApiError | asyncio.CancelledError
    ) -> None:
        """Record a request that ends without a reply: the gateway's error, or the client
        leaving (499)."""
        if isinstance(exc, ApiError):
            self._routed(request, exc.status, exc.code)
        else:
            self._routed(request, 499, "client_closed")

    async def _route(self, request: InferenceRequest) -> Reply:
        attempts = self.retry.attempts
        failed: list[Worker] = []
        verdict = Verdict()
        try:
            for attempt in range(attempts):
                last = attempt + 1 == attempts
                if attempt:
                    await self._back_off(attempt)
                try:
                    if self.tracing is None:
                        worker, model, routed = self.select(request, failed)
                    else:
                        with self.tracing.span("select_worker", attempt=attempt):
                            worker, model, routed = self.select(request, failed)
                except ApiError as exc:
                    retry_if_none_available(exc, last)
                    continue
                request.model, request.worker = model, worker.url
                if attempt:
                    self.metrics.retried(worker, request.path)
                policy_name = routed.policy.name
                self.metrics.observe_route(worker, model, request.path, request.stream, policy_name)
                if request.span is not None:
                    routed.annotate(request.span, worker.url)
                reply = await self._attempt(worker, model, request, last, verdict, routed=routed)
                if reply is not None:
                    return reply
                failed.append(worker)
            raise AssertionError("the last attempt never asks for a retry")
        finally:
            if not verdict.settled:  # a relayed answer settles it; errors end up here
                verdict.settle(request.request_id)

    async def forward(self, worker: Worker, request: InferenceRequest, path: str) -> Reply:
        """``request`` sent to ``worker`` alone, at ``path`` (``request.path`` names the
        endpoint in metrics): one attempt, no policy, no retry, recorded as any. For what
        only one worker can answer: a response it stored (``responses.py``)."""
        request.model, request.worker = worker.model_id, worker.url
        verdict = Verdict()
        try:
            reply = await self._attempt(worker, worker.model_id, request, True, verdict, path=path)
        except (ApiError, asyncio.CancelledError) as exc:
            self._unanswered(request, exc)
            raise
        finally:
            if not verdict.settled:
                verdict.settle(request.request_id)
        assert reply is not None, "the last attempt never asks for a retry"
        if isinstance(reply.body, bytes):
            self._routed(request, reply.status, "")
        return reply

    async def _back_off(self, attempt: int) -> None:
        """The pause before attempt number ``attempt`` (a retry), recorded."""
        delay = self.retry.backoff_secs(attempt - 1)
        self.metrics.retry_backoff(attempt, delay)
        await asyncio.sleep(delay)

    async def _attempt(
        self,
        worker: Worker,
        model: str,
        request: InferenceRequest,
        last: bool,
        verdict: Verdict,
        body: bytes | None = None,
        routed: Routed | None = None,
        path: str | None = None,
    ) -> Reply | None:
        """One try on ``worker`` (with ``body`` in place of the client's, and at ``path``
        in place of ``request.path``, when given): its reply, or None to try again
        elsewhere. ``routed``: the decision that chose it."""
        backend = worker.backend
        if not backend.serves(request.path):
            raise ApiError(
                501,
                "not_implemented",
                f"{request.path} is not served by {backend.mode.value} workers",
            )
        outbound = outbound_for(request, model, body, path)
        if backend.wants_prompt:
            outbound.prompt = request.routing_text
        state = worker.state
        state.started()
        tracing = self.tracing
        try:
            if tracing is None:
                span = None
                reply = await backend.send(worker, outbound)
            else:
                with tracing.span("upstream", client=True, held=True, worker=worker.url) as span:
                    outbound.trace = tracing.outgoing()  # the worker continues our trace
                    reply = await backend.send(worker, outbound)
        except UpstreamError as exc:
            state.finished()
            self._no_answer(worker, exc, request, last, verdict)  # raises unless retrying
            return None
        except BaseException:
            state.finished()
            raise
        if isinstance(reply.body, bytes):
            _end(span)  # a stream's ends with it (``WatchedStream``)
        return await self._answered(worker, model, request, reply, last, verdict, span, routed)

    async def _answered(
        self,
        worker: Worker,
        model: str,
        request: InferenceRequest,
        reply: Reply,
        last: bool,
        verdict: Verdict,
        span: Any = None,
        routed: Routed | None = None,
    ) -> Reply | None:
        """What becomes of ``worker``'s answer (the worker still counted in flight): the
        reply to hand back (a stream relayed, ending the held ``span`` with it), or None to
        try again elsewhere."""
        state = worker.state
        status = reply.status
        self.metrics.upstream_answer(status)
        if status >= 500:
            state.failed()
            self.metrics.worker_error(worker, f"status_{status}")
        if status in RETRYABLE_STATUSES:
            if not last:
                verdict.answered(worker, status)
                if not isinstance(reply.body, bytes):
                    await reply.body.aclose()
                    _end(span)
                state.finished()
                return None
            if self.retry.attempts > 1:
                self.metrics.retries_exhausted(worker, request.path)
        verdict.relayed(worker, status, request.request_id)
        reply.headers.append(worker.routed_header)  # X-SMG-Routed-Worker-Id, built once
        if routed is not None and self.route_receipt:
            reply.headers.append(routed.header(worker.url))
        if isinstance(reply.body, bytes):
            state.finished()
            if status == 200 and routed is not None and routed.measured:
                routed.settle(reply.body, model, self.metrics, request.span)
        else:
            reply.body = WatchedStream(
                reply.body, status, worker, model, request, self.metrics, self._routed, span, routed
            )
        return reply

    def _no_answer(
        self,
        worker: Worker,
        exc: UpstreamError,
        request: InferenceRequest,
        last: bool,
        verdict: Verdict,
    ) -> None:
        """Record an attempt the worker gave no answer to; returns to ask for another
        attempt, else raises the ApiError to answer."""
        status = _UPSTREAM_STATUS.get(exc.kind, 502)
        worker.state.failed()
        self.metrics.worker_error(worker, "upstream_" + exc.kind)
        self.metrics.upstream_answer(status, "upstream_" + exc.kind)
        facts = {"worker": worker.url, "error": str(exc), "request_id": request.request_id}
        if exc.kind == "oversize":
            # The worker answered, too much: this request's answer, not the worker's
            # health. Another worker would send as much again: no retry.
            verdict.relayed(worker, 200, request.request_id)
            log.warning("worker response too large", extra=facts)
            raise ApiError(502, "upstream_response_too_large", upstream_failure(exc.kind))
        verdict.unreachable(worker)
        log.warning("worker call failed", extra=facts)
        if not last:
            return
        if self.retry.attempts > 1:
            self.metrics.retries_exhausted(worker, request.path)
        code = "upstream_timeout" if status == 504 else "upstream_unavailable"
        raise ApiError(status, code, upstream_failure(exc.kind))


def _end(span: Any) -> None:
    """End a held tracing span (None: tracing is off)."""
    if span is not None:
        span.end()


def retry_if_none_available(exc: ApiError, last: bool) -> None:
    """A selection that found no available worker (503) is tried again after the backoff,
    as workers come back; any other refusal, or the last attempt's, is the answer."""
    if exc.status != 503 or last:
        raise exc


def outbound_for(
    request: InferenceRequest, model: str, body: bytes | None = None, path: str | None = None
) -> Outbound:
    """The attempt a backend is handed: the client's request, or ``body`` (``path``) in
    its place."""
    return Outbound(
        request.method,
        request.path if path is None else path,
        request.query,
        request.headers,
        request.body if body is None else body,
        request.stream,
        request.request_id,
        model,
    )
