"""Selection cost of every policy, cache_aware against prompt size, and eviction pauses.

Run: python bench/policy_bench.py

- Per policy, at 2, 16 and 256 workers: the mean cost of one ``select`` (1 KB routing text,
  the request headers a client sends), after a warm-up.
- cache_aware at 1, 4, 32 and 128 KB prompts (16 workers): prompts share one of 32 system
  prompts and differ in a user turn, so every selection walks a real tree, matches and
  inserts.
- Eviction: trees filled well past ``--max-tree-size``, then trimmed the way the gateway
  does it (slices that yield to the event loop); the longest slice is the longest pause.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time

from common import make_worker
from shunter.fleet.worker import Worker
from shunter.policies.base import RouteRequest
from shunter.policies.cache_aware import CacheAwareConfig, CacheAwarePolicy
from shunter.policies.factory import BUILT, create_policy

HEADERS = [
    (b"host", b"gw"),
    (b"content-type", b"application/json"),
    (b"authorization", b"Bearer user-7"),
    (b"x-smg-routing-key", b"session-42"),
]


def fleet(size: int) -> tuple[Worker, ...]:
    return tuple(make_worker(f"http://10.0.0.{i}:8000") for i in range(size))


def requests(prompt_chars: int, count: int, systems: int = 32) -> list[RouteRequest]:
    rng = random.Random(1)
    prefixes = [
        f"system {s}: " + "".join(rng.choice("abcdefgh ") for _ in range(prompt_chars))
        for s in range(systems)
    ]
    out = []
    for i in range(count):
        user = f" user {i}: " + "".join(rng.choice("ijklmnop ") for _ in range(100))
        text = prefixes[i % systems][: prompt_chars - len(user)] + user
        out.append(RouteRequest("m", text, HEADERS, f"key-{i % 50}"))
    return out


def mean_select_us(
    policy_name: str, workers: tuple[Worker, ...], reqs: list[RouteRequest], warm: int = 500
) -> float:
    policy = create_policy(policy_name)
    for worker in workers:
        policy.on_worker_added(worker)
    for request in reqs[:warm]:
        policy.select(workers, request)
    measured = reqs[warm:]
    started = time.perf_counter()
    for request in measured:
        policy.select(workers, request)
    return (time.perf_counter() - started) / len(measured) * 1e6


async def eviction_pause(
    workers: int, fill_chars: int, max_tree_size: int
) -> tuple[float, int, int]:
    policy = CacheAwarePolicy(CacheAwareConfig(max_tree_size=max_tree_size))
    fleet_ = fleet(workers)
    for request in requests(4096, fill_chars // 4096, systems=4096):
        policy.select(fleet_, request)
    biggest = max(policy.tree_for("m").tenant_chars.values())
    await policy.evict_all()
    after = max(policy.tree_for("m").tenant_chars.values())
    return policy.longest_eviction_slice * 1000, biggest, after


def main() -> None:
    print("select cost, mean µs per request (1 KB routing text)")
    sizes = (2, 16, 256)
    reqs = requests(1024, 3000)
    print(f"{'policy':>20} " + " ".join(f"{n:>8}w" for n in sizes))
    for name in sorted(BUILT):
        costs = [mean_select_us(name, fleet(n), reqs) for n in sizes]
        print(f"{name:>20} " + " ".join(f"{c:>8.2f}us" for c in costs))
    print()
    print("cache_aware select cost against prompt size (16 workers), mean µs")
    for kb in (1, 4, 32, 128):
        count = 2000 if kb <= 32 else 800
        runs = [
            mean_select_us("cache_aware", fleet(16), requests(kb * 1024, count), warm=count // 2)
            for _ in range(3)
        ]
        print(f"{kb:>6} KB: {statistics.median(runs):>8.2f}us")
    print()
    pause_ms, before, after = asyncio.run(eviction_pause(16, 40_000_000, 1_000_000))
    print(
        f"eviction: trees holding up to {before:,} chars per worker trimmed to "
        f"max-tree-size 1,000,000 -> {after:,}; longest event-loop pause {pause_ms:.2f} ms"
    )


if __name__ == "__main__":
    main()
