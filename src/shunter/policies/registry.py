"""Which policy serves which model (smg's policy registry).

The first worker of a model fixes its policy: the worker's ``policy`` label if it has one
(a fresh instance of that policy for the model), else the gateway's default (``--policy``,
one instance shared by the models without a label). When a model's last worker leaves, its
mapping goes. The hot path reads one dict.

A PD gateway keeps one registry per leg (``worker_type``): the prefill and the decode
policies are separate instances that hear only of their own pool's workers, so a round
robin advances once per request on each leg and a cache_aware tree holds only its leg's
workers (smg once shared one instance between the legs).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from shunter.fleet.worker import Worker, WorkerType
from shunter.policies.base import Policy
from shunter.policies.factory import PolicyError, PolicySettings, create_policy

log = logging.getLogger("shunter.policies")


class PolicyRegistry:
    def __init__(
        self, default: Policy, settings: PolicySettings, worker_type: WorkerType | None = None
    ) -> None:
        self.default = default
        self.settings = settings
        self.worker_type = worker_type  # None: every worker; else only those of this type
        self.by_model: dict[str, Policy] = {}
        self._workers_per_model: dict[str, int] = {}
        self._running = False

    def policy_for(self, model: str) -> Policy:
        return self.by_model.get(model, self.default)

    def all(self) -> list[Policy]:
        return [self.default, *(p for p in self.by_model.values() if p is not self.default)]

    def fleet_changed(self, added: Sequence[Worker], removed: Sequence[Worker]) -> None:
        """The fleet's membership changed: tell each model's policy."""
        kind = self.worker_type
        for worker in removed:
            if kind is None or worker.worker_type is kind:
                self.on_worker_removed(worker)
        for worker in added:
            if kind is None or worker.worker_type is kind:
                self.on_worker_added(worker)

    def on_worker_added(self, worker: Worker) -> None:
        for model in worker.model_ids:
            count = self._workers_per_model.get(model, 0)
            self._workers_per_model[model] = count + 1
            if count == 0 and model not in self.by_model:
                self.by_model[model] = self._policy_from_label(worker)
            self.policy_for(model).on_worker_added(worker)

    def on_worker_removed(self, worker: Worker) -> None:
        for model in worker.model_ids:
            self.policy_for(model).on_worker_removed(worker)
            count = self._workers_per_model.get(model, 0) - 1
            if count > 0:
                self._workers_per_model[model] = count
                continue
            self._workers_per_model.pop(model, None)
            policy = self.by_model.pop(model, None)
            if policy is not None and policy is not self.default and self._running:
                asyncio.get_running_loop().create_task(policy.stop())

    def _policy_from_label(self, worker: Worker) -> Policy:
        hint = worker.labels.get("policy")
        if not hint:
            return self.default
        try:
            policy = create_policy(hint, self.settings)
        except PolicyError as exc:
            log.warning(
                "ignoring the worker's policy label", extra={"url": worker.url, "error": str(exc)}
            )
            return self.default
        if self._running:
            policy.start()
        return policy

    def start(self) -> None:
        self._running = True
        for policy in self.all():
            policy.start()

    async def stop(self) -> None:
        self._running = False
        for policy in self.all():
            await policy.stop()
