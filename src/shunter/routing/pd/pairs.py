"""Choosing a prefill worker and a decode worker for one attempt, each by its own policy.

Each leg has its pool (the model's prefill workers, its decode workers: the registry's
``get_pool``) and its policy registry, so ``--prefill-policy`` and ``--decode-policy`` are
independent instances (a shared round robin advances twice per request and covers the
pools unevenly: smg's bug, fixed there in #2035). A retry avoids, per leg, the workers that
failed this request, when the pool has others.

The skip rule (``--pd-min-prefill-tokens``) is decided here, since it needs the decode
policy's view of the caches before it records the request: a prompt whose tokens the
chosen decode worker does not already hold are fewer than the threshold costs more to hand
over than to compute, so the decode worker runs it alone (``Pair.prefill`` is None). Only
an engine that serves a whole request on a decode worker is sent one: vLLM's (a connector
in the ``kv_both`` role serves requests that carry no transfer), not SGLang's (its decode
workers wait for a bootstrap room).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from shunter.backends.base import SGLANG_ONLY_PATHS, Runtime
from shunter.fleet.registry import WorkerRegistry, Workers
from shunter.fleet.worker import Worker, WorkerType
from shunter.policies.base import Decision, Policy, RouteRequest
from shunter.policies.registry import PolicyRegistry
from shunter.protocols.errors import ApiError
from shunter.routing.receipt import Routed
from shunter.routing.request import InferenceRequest
from shunter.routing.sticky import StickySessions
from shunter.routing.target import TARGET_REASON, find_worker, target_of, targeted

# The engines whose decode workers serve a request alone (see the module docstring).
RUNS_ALONE = frozenset({Runtime.VLLM})
# Characters per token when a prompt's tokens are not known (the gateway does not tokenize
# for HTTP workers): the usual rule for English text with BPE tokenizers.
CHARS_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class Pair:
    """One attempt's workers. ``prefill`` None: the decode worker runs the request alone.
    ``routed``: the decode leg's decision, carrying the prefill leg's (the route receipt)."""

    prefill: Worker | None
    decode: Worker
    prefill_policy: str = ""
    decode_policy: str = ""
    routed: Routed | None = None


class PairSelector:
    def __init__(
        self,
        registry: WorkerRegistry,
        prefill: PolicyRegistry,
        decode: PolicyRegistry,
        min_prefill_tokens: int = 0,
    ) -> None:
        self.registry = registry
        self.prefill = prefill
        self.decode = decode
        self.min_prefill_tokens = min_prefill_tokens  # 0: always disaggregate
        # --routing-key-override: each leg's key memory (routing/sticky.py); None: off.
        self.sticky: dict[WorkerType, StickySessions] | None = None

    def has_pools(self, model: str) -> bool:
        """Whether ``model`` is served by prefill/decode pairs (it has a worker of either)."""
        registry = self.registry
        return bool(
            registry.get_pool(WorkerType.PREFILL, model)
            or registry.get_pool(WorkerType.DECODE, model)
        )

    def select(
        self,
        request: InferenceRequest,
        model: str,
        avoid_prefill: Sequence[Worker] = (),
        avoid_decode: Sequence[Worker] = (),
    ) -> Pair:
        prefills = self._pool(WorkerType.PREFILL, model, request.path, avoid_prefill)
        decodes = self._pool(WorkerType.DECODE, model, request.path, avoid_decode)
        prefill_policy = self.prefill.policy_for(model)
        decode_policy = self.decode.policy_for(model)
        needs_text = prefill_policy.needs_text or decode_policy.needs_text
        text = request.routing_text if needs_text or self.min_prefill_tokens else None
        chat = request.body if text is not None and request.fields.messages is not None else None
        route = RouteRequest(model, text, request.headers, request.fields.routing_id, chat)
        named: dict[WorkerType, Worker] = {}
        target = target_of(request.headers)
        if target is not None:
            named = self._named(target, model)
        held = decode_policy.cached_prefix(route) if self.min_prefill_tokens else None
        decode, routed = self._chosen(decode_policy, decodes, route, WorkerType.DECODE, named)
        if (
            held is not None
            and decode.runtime in RUNS_ALONE
            and self._decode_alone(request, held, decode)
        ):
            return Pair(None, decode, "", decode_policy.name, routed)
        prefill, routed.prefill = self._chosen(
            prefill_policy, prefills, route, WorkerType.PREFILL, named
        )
        routed.prefill_url = prefill.url
        return Pair(prefill, decode, prefill_policy.name, decode_policy.name, routed)

    def _named(self, target: bytes, model: str) -> dict[WorkerType, Worker]:
        """The worker ``X-SMG-Target-Worker`` names, by leg (``routing/target.py``): it pins
        the leg whose pool holds it, the other leg goes by its policy."""
        name = target.decode("latin-1").strip()
        named = {}
        for kind in (WorkerType.PREFILL, WorkerType.DECODE):
            pool = self.registry.get_pool(kind, model)
            if find_worker(name, pool) is not None:
                named[kind] = targeted(target, model, pool)
        if not named:
            targeted(target, model, ())  # raises: not a worker of the model
        return named

    def _chosen(
        self,
        policy: Policy,
        workers: Workers,
        route: RouteRequest,
        kind: WorkerType,
        named: dict[WorkerType, Worker],
    ) -> tuple[Worker, Routed]:
        """The leg's worker, and the decision that chose it: the one the client named, its
        routing key's (sticky sessions), or the policy's. Neither leg learns from the
        answer's cached tokens: the decode worker's answer does not say what the prefill
        worker held, and the decode worker holds what the prefill handed over."""
        worker = named.get(kind)
        sticky = self.sticky
        if worker is not None:
            decision = Decision(worker, TARGET_REASON)
        elif sticky is None:
            decision = policy.decide(workers, route)
        else:
            decision = sticky[kind].decide(policy, workers, route)
        if decision.worker is None:
            raise ApiError(
                503,
                "no_available_workers",
                f"no healthy {kind.value} worker is available (all unhealthy or their circuits "
                "open)",
            )
        routed = Routed(policy, route, decision, time.perf_counter(), learns=False)
        return decision.worker, routed

    def _pool(self, kind: WorkerType, model: str, path: str, avoid: Sequence[Worker]) -> Workers:
        workers = self.registry.get_pool(kind, model)
        if not workers:
            other = "decode" if kind is WorkerType.PREFILL else "prefill"
            raise ApiError(
                503,
                f"no_{kind.value}_workers",
                f"model `{model}` has {other} workers but no {kind.value} worker: add one "
                f"(--{kind.value} URL at start, or POST /workers with "
                f'"worker_type": "{kind.value}")',
            )
        if path in SGLANG_ONLY_PATHS:
            workers = tuple(w for w in workers if w.serves_generate)
            if not workers:
                raise ApiError(
                    400,
                    "endpoint_not_supported",
                    f"{path} is an SGLang endpoint and the {kind.value} workers of `{model}` do "
                    "not have it; use /v1/completions or /v1/chat/completions",
                )
        if avoid:
            workers = tuple(w for w in workers if w not in avoid) or workers
        return workers

    def _decode_alone(
        self, request: InferenceRequest, held: tuple[int, frozenset[str]], decode: Worker
    ) -> bool:
        """Whether the prompt's tokens not already in ``decode``'s cache are too few to be
        worth a prefill worker."""
        tokens = prompt_tokens(request)
        matched, holders = held
        text = len(request.routing_text)
        if decode.url in holders and text:
            tokens = tokens * (text - matched) // text
        return tokens < self.min_prefill_tokens


def prompt_tokens(request: InferenceRequest) -> int:
    """The prompt's length in tokens: counted when the client sent token ids (``input_ids``,
    or a completion ``prompt`` of ids), estimated from its characters otherwise
    (``CHARS_PER_TOKEN``)."""
    fields = request.fields
    for ids in (fields.input_ids, fields.prompt):
        if isinstance(ids, list) and ids and not isinstance(ids[0], str):
            if isinstance(ids[0], list):
                return sum(len(item) for item in ids if isinstance(item, list))
            return len(ids)
    return -(-len(request.routing_text) // CHARS_PER_TOKEN)
