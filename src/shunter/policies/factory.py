"""Policy names (smg's spellings included) and the constructor behind each."""

from __future__ import annotations

from collections.abc import Callable

from shunter.policies.base import Policy
from shunter.policies.random import RandomPolicy
from shunter.policies.round_robin import RoundRobinPolicy

BUILT: dict[str, Callable[[], Policy]] = {
    "random": RandomPolicy,
    "round_robin": RoundRobinPolicy,
}
ALIASES = {"roundrobin": "round_robin"}
# smg's policies that Shunter does not have yet: named so the CLI can say so clearly.
NOT_YET_BUILT = {
    "cache_aware",
    "power_of_two",
    "bucket",
    "consistent_hashing",
    "prefix_hash",
    "manual",
    "cacheaware",
    "poweroftwo",
}


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def create_policy(name: str) -> Policy:
    name = canonical_name(name)
    if name not in BUILT:
        raise ValueError(f"unknown policy {name!r}")
    return BUILT[name]()
