"""Policy names (smg's spellings included), their settings, and user plugins.

``--policy`` takes a built-in name or ``package.module:ClassName``: a class implementing
``shunter.policies.base.Policy``, constructed with no arguments.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from shunter.policies.base import Policy
from shunter.policies.bucket import BucketPolicy
from shunter.policies.cache_aware import (
    CacheAwareConfig,
    CacheAwarePolicy,
    DecisionListener,
    PrefixScorer,
)
from shunter.policies.consistent_hashing import ConsistentHashingPolicy
from shunter.policies.keys import DEFAULT_MAX_KEYS
from shunter.policies.least_load import LeastLoadPolicy
from shunter.policies.manual import ManualPolicy
from shunter.policies.power_of_two import PowerOfTwoPolicy
from shunter.policies.prefix_hash import PrefixHashConfig, PrefixHashPolicy
from shunter.policies.random import RandomPolicy
from shunter.policies.round_robin import RoundRobinPolicy


@dataclass(frozen=True)
class PolicySettings:
    cache_aware: CacheAwareConfig = field(default_factory=CacheAwareConfig)
    prefix_hash: PrefixHashConfig = field(default_factory=PrefixHashConfig)
    bucket_adjust_interval_secs: float = 5.0
    manual_max_idle_secs: float = 4 * 3600.0
    # Routing keys remembered at most (manual, and --routing-key-override on any policy).
    max_routing_keys: int = DEFAULT_MAX_KEYS
    # Precise cache_aware: the engines' KV events (set by the gateway, not a flag).
    prefix_scorer: PrefixScorer | None = field(default=None, compare=False)
    # Replicas: who hears cache_aware's decisions (set by the gateway, not a flag).
    decisions: DecisionListener | None = field(default=None, compare=False)

    def validate(self) -> PolicySettings:
        self.cache_aware.validate()
        self.prefix_hash.validate()
        if self.bucket_adjust_interval_secs <= 0:
            raise ValueError("--bucket-adjust-interval-secs must be > 0")
        if self.manual_max_idle_secs <= 0:
            raise ValueError("--max-idle-secs must be > 0")
        if self.max_routing_keys < 1:
            raise ValueError("--max-routing-keys must be >= 1")
        return self


def _cache_aware(settings: PolicySettings) -> CacheAwarePolicy:
    policy = CacheAwarePolicy(settings.cache_aware, settings.prefix_scorer)
    policy.decisions = settings.decisions
    return policy


BUILT: dict[str, Callable[[PolicySettings], Policy]] = {
    "random": lambda s: RandomPolicy(),
    "round_robin": lambda s: RoundRobinPolicy(),
    "power_of_two": lambda s: PowerOfTwoPolicy(),
    "least_load": lambda s: LeastLoadPolicy(),
    "cache_aware": lambda s: _cache_aware(s),
    "bucket": lambda s: BucketPolicy(
        s.bucket_adjust_interval_secs,
        s.cache_aware.balance_abs_threshold,
        s.cache_aware.balance_rel_threshold,
    ),
    "consistent_hashing": lambda s: ConsistentHashingPolicy(),
    "prefix_hash": lambda s: PrefixHashPolicy(s.prefix_hash),
    "manual": lambda s: ManualPolicy(s.manual_max_idle_secs, max_keys=s.max_routing_keys),
}


ALIASES = {
    "roundrobin": "round_robin",
    "poweroftwo": "power_of_two",
    "cacheaware": "cache_aware",
    "leastload": "least_load",
}


class PolicyError(ValueError):
    """An unknown policy name or a plugin that cannot be loaded."""


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def create_policy(name: str, settings: PolicySettings | None = None) -> Policy:
    settings = settings or PolicySettings()
    name = canonical_name(name)
    if name in BUILT:
        return BUILT[name](settings)
    if ":" in name:
        return load_plugin(name)
    raise PolicyError(
        f"unknown policy {name!r}; choose one of {', '.join(BUILT)} or give module:Class"
    )


def load_plugin(spec: str) -> Policy:
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PolicyError(f"policy plugin {spec!r}: cannot import {module_name}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, Policy):
        raise PolicyError(
            f"policy plugin {spec!r}: {class_name} must be a subclass of "
            "shunter.policies.base.Policy"
        )
    try:
        policy = cls()
    except Exception as exc:
        raise PolicyError(f"policy plugin {spec!r} failed to start: {exc}") from None
    if not policy.name:
        policy.name = spec
    return policy
