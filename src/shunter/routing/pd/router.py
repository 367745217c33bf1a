"""The PD router: a model's requests served by a prefill worker and a decode worker together.

A router over two backends: per attempt it chooses a pair (``pairs.py``), hands each leg
its request and relays the decode worker's answer, as the regular router relays a worker's.
How the two legs work together depends on the prefill worker's engine:

- SGLang (HTTP or gRPC): both legs at once, with the same bootstrap fields (host, port,
  fresh rooms: ``protocols/bootstrap.py``), the first leg to fail ending the attempt
  (``legs.py``). The prefill's input logprobs go in front of the decode's when the client
  asked for logprobs (``protocols/logprobs.py``);
- vLLM (HTTP): the prefill first, as a one-token request, then the decode with the
  ``kv_transfer_params`` the prefill answered (``protocols/kv_transfer.py``). ``n > 1``
  skips the prefill (vLLM's connectors hand over one sequence's cache);
- a short prompt under ``--pd-min-prefill-tokens``: the decode worker alone.

Retries and breakers follow the regular router's rules, per leg: a failed pair is tried
again on a new pair with new rooms, avoiding the worker that failed, as long as the client
has received nothing; each leg's workers hear their outcome once (``verdict.py``). An error
the prefill worker answered is passed to the client as the prefill's, with its status and
an ``error.code`` that names the leg (``prefill_bad_request``...); the worker's URL stays in
the log.

A model with no prefill or decode worker is served by the regular router, so a gateway in
PD mode can also front ordinary workers (for embeddings, say, or another model).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from functools import partial

import orjson

from shunter.backends.base import ConnectionMode, Runtime
from shunter.fleet.registry import WorkerRegistry
from shunter.fleet.worker import Worker
from shunter.observability.metrics import Metrics
from shunter.observability.tracing import Tracing
from shunter.policies.registry import PolicyRegistry
from shunter.protocols import kv_transfer
from shunter.protocols.bootstrap import (
    GRPC_ROOM_BITS,
    HTTP_ROOM_BITS,
    Bootstrap,
    bootstrap_host,
    new_rooms,
    sequences,
)
from shunter.protocols.errors import ApiError, upstream_failure
from shunter.protocols.logprobs import (
    EventMerger,
    InputLogprobs,
    merged_body,
    prefill_logprobs,
    wants_input_logprobs,
)
from shunter.protocols.reply import Chunks, Reply, Stream, primed
from shunter.routing.pd.legs import DecodeAnswer, Legs, PrefillAnswer, prefill_leg
from shunter.routing.pd.pairs import Pair, PairSelector
from shunter.routing.request import InferenceRequest
from shunter.routing.retry import RETRYABLE_STATUSES, RetryConfig
from shunter.routing.router import Router, outbound_for, retry_if_none_available
from shunter.routing.verdict import Verdict

log = logging.getLogger("shunter.router.pd")

# What prefill/decode pairs serve; other endpoints of a PD model are refused (501).
PD_PATHS = frozenset({"/generate", "/v1/chat/completions", "/v1/completions"})
# smg's codes for an error the prefill worker answered.
_PREFILL_CODES = {
    400: "prefill_bad_request",
    404: "prefill_not_found",
    500: "prefill_internal_error",
    502: "prefill_bad_gateway",
    503: "prefill_unavailable",
}
_WORKER_MESSAGE_CHARS = 500


class PdRouter(Router):
    def __init__(
        self,
        registry: WorkerRegistry,
        policies: PolicyRegistry,
        pairs: PairSelector,
        metrics: Metrics,
        retry: RetryConfig | None = None,
        tracing: Tracing | None = None,
        route_receipt: bool = False,
    ) -> None:
        super().__init__(registry, policies, metrics, retry, tracing, route_receipt=route_receipt)
        self.pairs = pairs

    async def _route(self, request: InferenceRequest) -> Reply:
        model, _workers = self.workers_for(request.fields.model)
        if not self.pairs.has_pools(model):
            return await super()._route(request)  # a model of ordinary workers
        if request.path not in PD_PATHS:
            raise ApiError(
                501,
                "not_implemented",
                f"{request.path} is not served by prefill/decode pairs, and `{model}` is "
                f"served by prefill and decode workers; PD serves {', '.join(sorted(PD_PATHS))}",
            )
        attempts = self.retry.attempts
        avoid_prefill: list[Worker] = []
        avoid_decode: list[Worker] = []
        prefill_verdict, decode_verdict = Verdict(), Verdict()
        try:
            for attempt in range(attempts):
                last = attempt + 1 == attempts
                if attempt:
                    await self._back_off(attempt)
                try:
                    with self._span("select_pair", attempt=attempt):
                        pair = self.pairs.select(request, model, avoid_prefill, avoid_decode)
                except ApiError as exc:
                    retry_if_none_available(exc, last)
                    continue
                decode = pair.decode
                request.model, request.worker = model, decode.url
                if attempt:
                    self.metrics.retried(decode, request.path)
                self.metrics.observe_route(
                    decode, model, request.path, request.stream, pair.decode_policy, "pd"
                )
                if request.span is not None and pair.routed is not None:
                    pair.routed.annotate(request.span, decode.url)
                if pair.prefill is None:
                    reply = await self._attempt(
                        decode, model, request, last, decode_verdict, routed=pair.routed
                    )
                    if reply is not None:
                        return reply
                    avoid_decode.append(decode)
                    continue
                self.metrics.observe_selection(pair.prefill, model, pair.prefill_policy)
                verdicts = (prefill_verdict, decode_verdict)
                if pair.prefill.runtime is Runtime.VLLM:
                    outcome = await self._two_phases(pair, model, request, last, verdicts)
                else:
                    outcome = await self._both_at_once(pair, model, request, last, verdicts)
                if isinstance(outcome, Reply):
                    return outcome
                (avoid_prefill if outcome is pair.prefill else avoid_decode).append(outcome)
            raise AssertionError("the last attempt never asks for a retry")
        finally:
            for verdict in (prefill_verdict, decode_verdict):
                if not verdict.settled:
                    verdict.settle(request.request_id)

    # --- SGLang: both legs at once ------------------------------------------------------

    async def _both_at_once(
        self,
        pair: Pair,
        model: str,
        request: InferenceRequest,
        last: bool,
        verdicts: tuple[Verdict, Verdict],
    ) -> Reply | Worker:
        """One attempt on ``pair``: the reply, or the worker that failed (to avoid)."""
        prefill, decode = pair.prefill, pair.decode
        assert prefill is not None
        count, batch = sequences(request.path, request.fields)
        grpc = ConnectionMode.GRPC in (prefill.connection_mode, decode.connection_mode)
        rooms = new_rooms(count, GRPC_ROOM_BITS if grpc else HTTP_ROOM_BITS)
        host = bootstrap_host(prefill.base_url)
        prefill_out = outbound_for(request, model)
        prefill_out.bootstrap = Bootstrap(host, prefill.bootstrap_port, rooms, batch)
        decode_out = outbound_for(request, model)
        decode_out.bootstrap = Bootstrap(
            host, prefill.bootstrap_port, rooms, batch, prefill.dp_rank
        )
        if self.tracing is not None:  # both workers continue our trace
            prefill_out.trace = decode_out.trace = self.tracing.outgoing()
        logprobs = wants_input_logprobs(request.fields)
        self.metrics.pd_dispatched(model, request.path)
        started = time.perf_counter()
        with self._span("upstream_pair", client=True, prefill=prefill.url, decode=decode.url):
            settled = await Legs(prefill, decode).race(
                prefill_out, decode_out, logprobs, partial(self._late_prefill, prefill, model)
            )
        answer, decoded = settled.prefill, settled.decode
        if answer is not None and not answer.ok:
            if decoded is None:  # the decode leg was cancelled: the attempt failed
                return self._prefill_failed(prefill, model, request, answer, last, verdicts[0])
            self._late_prefill(prefill, model, answer)  # the decode answered all the same
            answer = None
        if answer is not None:
            self._prefill_done(prefill, model, answer, verdicts[0])
        if settled.decode_error is not None:
            self.metrics.pd_failed(model, "decode", settled.decode_error.kind)
            self._no_answer(decode, settled.decode_error, request, last, verdicts[1])
            return decode
        assert decoded is not None
        if decoded.ok:
            self.metrics.pd_first_token(model, request.path, time.perf_counter() - started)
        else:
            self.metrics.pd_failed(model, "decode", f"status_{decoded.reply.status}")
        lists = prefill_logprobs(answer.body) if logprobs and answer is not None else {}
        assembled = await _assembled(decoded, lists)
        reply = await self._answered(
            decode, model, request, assembled, last, verdicts[1], routed=pair.routed
        )
        return decode if reply is None else reply

    # --- vLLM: the prefill, then the decode -----------------------------------------------

    async def _two_phases(
        self,
        pair: Pair,
        model: str,
        request: InferenceRequest,
        last: bool,
        verdicts: tuple[Verdict, Verdict],
    ) -> Reply | Worker:
        prefill, decode = pair.prefill, pair.decode
        assert prefill is not None
        if sequences(request.path, request.fields)[0] > 1:  # one cache per sequence
            alone = None if pair.routed is None else replace(pair.routed, prefill=None)
            reply = await self._attempt(decode, model, request, last, verdicts[1], routed=alone)
            return decode if reply is None else reply
        self.metrics.pd_dispatched(model, request.path)
        started = time.perf_counter()
        prefill_out = outbound_for(request, model, kv_transfer.prefill_body(request.body))
        prefill_out.stream = False
        answer = await prefill_leg(prefill, prefill_out, keep_body=True)
        if not answer.ok:
            return self._prefill_failed(prefill, model, request, answer, last, verdicts[0])
        params = kv_transfer.transfer_params(answer.body)
        if params is None:
            log.warning(
                "vLLM prefill answered without kv_transfer_params",
                extra={"worker": prefill.url, "request_id": request.request_id},
            )
            self.metrics.pd_failed(model, "prefill", "no_kv_transfer_params")
            verdicts[0].relayed(prefill, 502, request.request_id)
            raise ApiError(
                502,
                "prefill_bad_gateway",
                "the prefill worker's answer has no kv_transfer_params: it must run vLLM with "
                "a KV connector as a producer (kv_role kv_producer or kv_both)",
            )
        self._prefill_done(prefill, model, answer, verdicts[0])
        body = kv_transfer.decode_body(request.body, params)
        reply = await self._attempt(
            decode, model, request, last, verdicts[1], body, routed=pair.routed
        )
        if reply is None:
            return decode
        self.metrics.pd_first_token(model, request.path, time.perf_counter() - started)
        return reply

    # --- the prefill leg's outcomes ---------------------------------------------------------

    def _prefill_done(
        self, prefill: Worker, model: str, answer: PrefillAnswer, verdict: Verdict
    ) -> None:
        self.metrics.pd_prefilled(model, answer.seconds)
        self.metrics.upstream_answer(answer.status)
        verdict.answered(prefill, answer.status)

    def _late_prefill(self, prefill: Worker, model: str, answer: PrefillAnswer) -> None:
        """A prefill that finished after its decode had answered: recorded, not waited on."""
        if answer.ok:
            self.metrics.pd_prefilled(model, answer.seconds)
            Verdict.after(prefill, True)
            return
        reason = answer.error.kind if answer.error is not None else f"status_{answer.status}"
        log.warning(
            "prefill failed after its decode had answered",
            extra={"worker": prefill.url, "reason": reason},
        )
        prefill.state.failed()
        self.metrics.worker_error(prefill, reason)
        Verdict.after(prefill, answer.error is None and answer.status < 500)

    def _prefill_failed(
        self,
        prefill: Worker,
        model: str,
        request: InferenceRequest,
        answer: PrefillAnswer,
        last: bool,
        verdict: Verdict,
    ) -> Worker:
        """Record a prefill leg that failed the attempt; returns the worker to avoid on the
        next attempt, or raises the error to answer."""
        error = answer.error
        facts = {"worker": prefill.url, "request_id": request.request_id}
        if error is not None:
            self.metrics.pd_failed(model, "prefill", error.kind)
            prefill.state.failed()
            self.metrics.worker_error(prefill, "upstream_" + error.kind)
            verdict.unreachable(prefill)
            log.warning("prefill worker gave no answer", extra={**facts, "error": str(error)})
            if not last:
                return prefill
            timeout = error.kind == "timeout"
            raise ApiError(
                504 if timeout else 502,
                "prefill_timeout" if timeout else "prefill_unavailable",
                "the prefill worker failed: " + upstream_failure(error.kind),
            )
        status = answer.status
        self.metrics.pd_failed(model, "prefill", f"status_{status}")
        self.metrics.upstream_answer(status)
        if status >= 500:
            prefill.state.failed()
            self.metrics.worker_error(prefill, f"status_{status}")
        if status in RETRYABLE_STATUSES and not last:
            verdict.answered(prefill, status)
            return prefill
        verdict.relayed(prefill, status, request.request_id)
        log.warning("prefill worker refused the request", extra={**facts, "status": status})
        raise ApiError(
            status,
            _PREFILL_CODES.get(status, "prefill_error"),
            f"the prefill worker answered {status}{_worker_message(status, answer.body)}",
        )


def _worker_message(status: int, body: bytes) -> str:
    """The prefill worker's own words about a request it refused (a 4xx: about the
    request, worth passing on); nothing for a 5xx, which is about the worker."""
    if status >= 500:
        return ""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
    else:
        error = payload.get("error") if isinstance(payload, dict) else None
        found = error if isinstance(error, dict) else payload
        text = ""
        if isinstance(found, dict):
            for key in ("message", "detail"):
                if isinstance(found.get(key), str):
                    text = found[key]
                    break
        elif isinstance(error, str):
            text = error
    return f": {text[:_WORKER_MESSAGE_CHARS]}" if text else ""


async def _assembled(decoded: DecodeAnswer, lists: InputLogprobs) -> Reply:
    """The decode's reply, whole again: a stream's first chunk back in front, and the
    prefill's input logprobs merged in when there are any."""
    reply = decoded.reply
    if isinstance(reply.body, bytes):
        if lists and decoded.ok:
            reply.body = merged_body(reply.body, lists)
        return reply
    if decoded.ok:
        merger = EventMerger(lists) if lists else None
        reply.body = await primed(_resumed(decoded.first, reply.body, merger))
    return reply


async def _resumed(first: bytes | None, rest: Stream, merger: EventMerger | None) -> Chunks:
    """A decode stream from its first chunk (already read) on."""
    try:
        yield b""  # primed: see protocols/reply.py
        if first is None:
            return
        chunk: bytes | None = first
        while chunk is not None:
            out = chunk if merger is None else merger.feed(chunk)
            if out:
                yield out
            chunk = await anext(rest, None)
        if merger is not None and (tail := merger.end()):
            yield tail
    finally:
        await rest.aclose()
