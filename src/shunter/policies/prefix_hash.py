"""``prefix_hash``: hash the start of the prompt onto a ring, with bounded load.

Requests that share their first ``prefix_token_count`` tokens (approximated over HTTP, where
the gateway has no tokenizer, as 4 characters a token) go to the same worker, so its prefix
cache serves them all; distinct prefixes spread over the ring. If that worker carries more
than ``load_factor`` times the average in-flight load, the least-loaded worker takes the
request instead (consistent hashing with bounded loads), as smg's prefix_hash does.
"""

from __future__ import annotations

from dataclasses import dataclass

from shunter.fleet.registry import Workers
from shunter.fleet.worker import Worker
from shunter.policies.base import Decision, Policy, RouteRequest, least_loaded
from shunter.policies.ring import RingCache

CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class PrefixHashConfig:
    prefix_token_count: int = 256
    load_factor: float = 1.25

    def validate(self) -> PrefixHashConfig:
        if self.prefix_token_count < 1:
            raise ValueError("--prefix-token-count must be >= 1")
        if self.load_factor < 1.0:
            raise ValueError("--prefix-hash-load-factor must be >= 1")
        return self


class PrefixHashPolicy(Policy):
    name = "prefix_hash"
    needs_text = True

    def __init__(self, config: PrefixHashConfig | None = None) -> None:
        self.config = config or PrefixHashConfig()
        self._prefix_chars = self.config.prefix_token_count * CHARS_PER_TOKEN
        self._rings = RingCache()

    def select(self, workers: Workers, request: RouteRequest) -> Worker | None:
        return self.decide(workers, request).worker

    def decide(self, workers: Workers, request: RouteRequest) -> Decision:
        """Reasons: ``prefix_hash`` (the ring's worker), ``load_override`` (it was over the
        bound, the least loaded took it)."""
        if not workers:
            return Decision(None, "prefix_hash")
        key = (request.text or "")[: self._prefix_chars]
        chosen = self._rings.ring(request.model, workers).lookup(key)
        if chosen is None:
            return Decision(None, "prefix_hash")
        total = up = 0
        for worker in workers:
            if worker.state.available:
                total += worker.state.in_flight
                up += 1
        # Bounded load: the ring's pick may exceed the average by load_factor (plus one, so
        # an idle fleet does not bounce the first requests around).
        if chosen.state.in_flight > (total / up) * self.config.load_factor + 1:
            return Decision(least_loaded(workers), "load_override")
        return Decision(chosen, "prefix_hash")
