"""The policies built so far: random and round_robin."""

from __future__ import annotations

import random
from collections import Counter

from shunter.core.worker import Worker
from shunter.policies.base import RouteRequest
from shunter.policies.factory import create_policy
from shunter.policies.random import RandomPolicy
from shunter.policies.round_robin import RoundRobinPolicy

REQ = RouteRequest()


def fleet(n: int, unhealthy: tuple[int, ...] = ()) -> tuple[Worker, ...]:
    return tuple(
        Worker(url=f"http://w{i}", models=("m",), healthy=i not in unhealthy) for i in range(n)
    )


def test_round_robin_cycles_in_order() -> None:
    workers = fleet(3)
    policy = RoundRobinPolicy()
    picks = [policy.select(workers, REQ) for _ in range(6)]
    assert [w.url for w in picks if w] == ["http://w0", "http://w1", "http://w2"] * 2


def test_round_robin_skips_unavailable_workers() -> None:
    workers = fleet(4, unhealthy=(1, 2))
    policy = RoundRobinPolicy()
    picks = [policy.select(workers, REQ) for _ in range(4)]
    assert [w.url for w in picks if w] == ["http://w0", "http://w3", "http://w0", "http://w3"]


def test_policies_return_none_when_nothing_is_available() -> None:
    for policy in (RoundRobinPolicy(), RandomPolicy()):
        assert policy.select((), REQ) is None
        assert policy.select(fleet(3, unhealthy=(0, 1, 2)), REQ) is None


def test_single_worker_is_always_chosen() -> None:
    only = fleet(1)
    for policy in (RoundRobinPolicy(), RandomPolicy()):
        assert all(policy.select(only, REQ) is only[0] for _ in range(10))


def test_round_robin_survives_the_fleet_shrinking_under_it() -> None:
    policy = RoundRobinPolicy()
    big = fleet(5)
    for _ in range(4):
        policy.select(big, REQ)
    small = big[:2]
    assert policy.select(small, REQ) in small


def test_random_is_uniform_over_available_workers() -> None:
    policy = RandomPolicy(random.Random(7))
    workers = fleet(4, unhealthy=(2,))
    counts = Counter(policy.select(workers, REQ).url for _ in range(6000))  # type: ignore[union-attr]
    assert set(counts) == {"http://w0", "http://w1", "http://w3"}
    assert all(1700 < c < 2300 for c in counts.values()), counts


def test_factory_knows_smg_spellings() -> None:
    assert create_policy("roundrobin").name == "round_robin"
    assert create_policy("random").name == "random"
