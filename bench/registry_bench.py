"""Registry read cost against fleet size, quiet and while a writer churns the fleet.

Run: python bench/registry_bench.py
The last line is `get_by_model ns: n8=<ns> n4096=<ns> ratio=<n4096/n8>`, measured while
another thread keeps adding and removing workers (the harder case).

Each figure is the median over batches of 1,000 reads (a batch that a thread switch or the
writer's GIL hold happened to hit is an outlier, not the read's cost), best of 5 rounds.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

from common import make_worker
from shunter.fleet.registry import WorkerRegistry

BATCH = 1000
BATCHES = 400
ROUNDS = 5
SIZES = (8, 64, 1024, 4096)


def fleet(size: int) -> WorkerRegistry:
    registry = WorkerRegistry()
    for i in range(size):
        registry.register(make_worker(f"http://10.0.{i // 250}.{i % 250}:8000"))
    return registry


def per_call_ns(call: Callable[[str], object]) -> float:
    """Median ns per ``call("m")`` over batches of 1,000 calls, best of ``ROUNDS``."""
    best = float("inf")
    for _ in range(ROUNDS):
        samples = []
        for _ in range(BATCHES):
            start = time.perf_counter_ns()
            for _ in range(BATCH // 10):
                call("m"), call("m"), call("m"), call("m"), call("m")
                call("m"), call("m"), call("m"), call("m"), call("m")
            samples.append((time.perf_counter_ns() - start) / BATCH)
        best = min(best, statistics.median(samples))
    return best


def read_ns(registry: WorkerRegistry) -> float:
    return per_call_ns(registry.get_by_model)


def loop_overhead_ns() -> float:
    """The cost of the timing loop itself with a trivial call, subtracted from the figures."""

    def noop(_: str) -> None:
        return None

    return per_call_ns(noop)


class Churn:
    """A writer thread that keeps adding and removing workers of the read model."""

    def __init__(self, registry: WorkerRegistry) -> None:
        self.registry = registry
        self.stop = threading.Event()
        self.writes = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            url = f"http://churn-{i % 16}:8000"
            if self.registry.get_by_url(url) is None:
                self.registry.register(make_worker(url))
            else:
                self.registry.remove(url)
            self.writes += 1
            i += 1
            time.sleep(0.0005)

    def __enter__(self) -> Churn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def main() -> None:
    overhead = loop_overhead_ns()
    quiet: dict[int, float] = {}
    churned: dict[int, float] = {}
    writes: dict[int, float] = {}
    for size in SIZES:
        registry = fleet(size)
        quiet[size] = read_ns(registry) - overhead
        with Churn(registry) as churn:
            started = time.perf_counter()
            churned[size] = read_ns(registry) - overhead
            writes[size] = churn.writes / (time.perf_counter() - started)
    print(f"call overhead subtracted: {overhead:.1f} ns (a no-op Python call in the same loop)")
    print(f"{'workers':>8} {'quiet ns/read':>14} {'churn ns/read':>14} {'writes/s':>9}")
    for size in SIZES:
        print(f"{size:>8} {quiet[size]:>14.1f} {churned[size]:>14.1f} {writes[size]:>9.0f}")
    print(f"quiet: n8={quiet[8]:.1f} n4096={quiet[4096]:.1f} ratio={quiet[4096] / quiet[8]:.2f}")
    ratio = churned[4096] / churned[8]
    print(f"get_by_model ns: n8={churned[8]:.1f} n4096={churned[4096]:.1f} ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
