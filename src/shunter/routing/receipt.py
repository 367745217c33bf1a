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
    """One attempt's decision, and what settling it needs.

    A prefill/decode pair is one ``Routed`` for the decode leg (the worker that answers)
    carrying the prefill leg's as ``prefill``; neither learns from the answer
    (``learns=False``: see routing/pd/pairs.py).
    """

    policy: Policy
    route: RouteRequest
    decision: Decision
    decided_at: float  # perf_counter()
    learns: bool = True  # whether the answer's cached tokens are held against the decision
    prefill: Routed | None = None  # PD: the prefill leg's decision
    prefill_url: str = ""

    @property
    def measured(self) -> bool:
        """Whether the answer's cached tokens are wanted (read them only then)."""
        return self.learns and (
            self.decision.predicted_cached is not None or self.policy.learns_from_cache
        )

    def header(self, worker_url: str) -> tuple[bytes, bytes]:
        """``x-shunter-route``; a pair's adds ``prefill=URL; prefill_policy=NAME;
        prefill_reason=WORD`` (and ``prefill_predicted_cached=N``) after the decode's."""
        value = self._fields(worker_url, "")
        if self.prefill is not None:
            value += "; " + self.prefill._fields(self.prefill_url, "prefill_")
        return HEADER, value.encode("latin-1")

    def _fields(self, worker_url: str, prefix: str) -> str:
        decision = self.decision
        name = "prefill" if prefix else "worker"
        value = (
            f"{name}={worker_url}; {prefix}policy={_token(self.policy.name)}; "
            f"{prefix}reason={_token(decision.reason)}"
        )
        if decision.predicted_cached is not None:
            value += f"; {prefix}predicted_cached={decision.predicted_cached}"
        return value

    def annotate(self, span: Any, worker_url: str) -> None:
        """The decision as attributes of the ``route`` span (tracing on)."""
        self._annotate(span, worker_url, "shunter.route.")
        if self.prefill is not None:
            self.prefill._annotate(span, self.prefill_url, "shunter.route.prefill.")

    def _annotate(self, span: Any, worker_url: str, prefix: str) -> None:
        span.set_attribute(prefix + "worker", worker_url)
        span.set_attribute(prefix + "policy", self.policy.name)
        span.set_attribute(prefix + "reason", self.decision.reason)
        if self.decision.predicted_cached is not None:
            span.set_attribute(prefix + "predicted_cached", self.decision.predicted_cached)

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
