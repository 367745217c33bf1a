"""The route receipt: what the policy decided, told to the client, the trace and the metrics,
and what the worker's answer says of it.

``Routed`` is the router's record of one attempt's decision. With ``--route-receipt`` the
answer carries it as ``x-shunter-route: worker=URL; policy=NAME; reason=WORD;
predicted_cached=N`` (``predicted_cached`` only from a policy that predicts: one keeping
no record of the caches says nothing rather than a made-up 0). With tracing on, the
``route`` span carries the same as ``shunter.route.*`` attributes, and the worker's
reported cached tokens as ``shunter.route.actual_cached``.

After the answer, ``settle`` reads the worker's cached tokens off its bytes
(``protocols/usage.py``), only when something consumes them: a policy that predicted
(``shunter_routing_precision`` observes how far apart they were) or one that learns from
them (``on_cached``: cache_aware's self-correction).
"""

from __future__ import annotations

import functools
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from shunter.observability.metrics import Metrics
from shunter.policies.base import Decision, Policy, RouteRequest
from shunter.protocols.usage import reported_cache

log = logging.getLogger("shunter.router")

HEADER = b"x-shunter-route"


@dataclass(slots=True)
class Routed:
    """One attempt's decision, and what settling it needs."""

    policy: Policy
    route: RouteRequest
    decision: Decision
    decided_at: float  # perf_counter()

    @property
    def measured(self) -> bool:
        """Whether the answer's cached tokens are wanted (read them only then)."""
        return self.decision.predicted_cached is not None or self.policy.learns_from_cache

    def header(self, worker_url: str) -> tuple[bytes, bytes]:
        decision = self.decision
        value = (
            f"worker={worker_url}; policy={_token(self.policy.name)}; "
            f"reason={_token(decision.reason)}"
        )
        if decision.predicted_cached is not None:
            value += f"; predicted_cached={decision.predicted_cached}"
        return HEADER, value.encode("latin-1")

    def annotate(self, span: Any, worker_url: str) -> None:
        """The decision as attributes of the ``route`` span (tracing on)."""
        span.set_attribute("shunter.route.worker", worker_url)
        span.set_attribute("shunter.route.policy", self.policy.name)
        span.set_attribute("shunter.route.reason", self.decision.reason)
        if self.decision.predicted_cached is not None:
            span.set_attribute("shunter.route.predicted_cached", self.decision.predicted_cached)

    def settle(self, data: bytes | None, model: str, metrics: Metrics, span: Any) -> None:
        """The worker answered (``data``: its whole body, or the stream's last chunk that
        carried counts): compare, record, and let the policy learn."""
        found = None if data is None else reported_cache(data)
        if found is None:
            return
        cached, prompt = found
        if span is not None:
            span.set_attribute("shunter.route.actual_cached", cached)
        predicted = self.decision.predicted_cached
        if predicted is not None:
            metrics.routing_precision(model, self.policy.name, cached, predicted)
        if self.policy.learns_from_cache:
            elapsed = time.perf_counter() - self.decided_at
            try:
                self.policy.on_cached(self.route, self.decision, cached, prompt, elapsed)
            except Exception:  # a plugin's bug must not break an answer already sent
                log.exception(
                    "policy failed to learn from an answer", extra={"policy": self.policy.name}
                )


_UNSAFE = re.compile(r"[^A-Za-z0-9_.:/@+-]")


@functools.lru_cache(maxsize=256)
def _token(text: str) -> str:
    """``text`` fit for the header (a plugin's name or reason may hold anything)."""
    return _UNSAFE.sub("_", text) or "_"
