"""``cache_aware``: send a request where its prefix is likely cached, unless load is skewed.

As smg's, after its fix that picks the least-loaded worker on imbalance:

1. If the fleet is imbalanced (max - min in-flight > ``balance_abs_threshold`` and
   max > min * ``balance_rel_threshold``), pick the least loaded worker.
2. Otherwise match the routing text against this model's tree. If more than
   ``cache_threshold`` of it matches, pick a worker that holds the match (the most recently
   used available one); else place the new prefix on the worker holding the least text
   among those not overloaded (smg: the least loaded; see ``_place_new_prefix``).
3. Record the text under the chosen worker.

Precise mode: given a ``PrefixScorer`` (the engines' KV-cache events, ``kv_events/``), a
worker that publishes events is judged by what its engine says it holds, not by the tree:
step 2 first takes the available worker with the longest run of cached blocks from the start
of the prompt (ties: the less loaded), if that run covers more than ``cache_threshold`` of
the prompt; otherwise the tree is matched as above, among the workers *without* events
only. The tree still records every decision, so a worker that stops publishing falls back
to it.

Unlike smg, the matched tenant is the most recently used *available* worker at the deepest
node (smg takes the first in its map, and falls back to an arbitrary worker if that one is
gone). Trees are per model and trimmed by a background task every
``eviction_interval_secs`` to ``max_tree_size`` characters per worker, in slices of at most
2 ms so the event loop never stalls.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from shunter.aio.periodic import Periodic
from shunter.fleet.registry import Workers
from shunter.fleet.worker import Worker
from shunter.policies.base import Policy, RouteRequest, UrlIndexes, least_loaded
from shunter.policies.tree import Tree

log = logging.getLogger("shunter.policies.cache_aware")

# Hears every decision (model, routing text, worker URL): the peers' exchange, when on.
DecisionListener = Callable[[str, str, str], None]


@dataclass(frozen=True)
class CacheAwareConfig:
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    eviction_interval_secs: float = 120.0
    max_tree_size: int = 2**26

    def validate(self) -> CacheAwareConfig:
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError("--cache-threshold must be between 0 and 1")
        if self.balance_rel_threshold < 1.0:
            raise ValueError("--balance-rel-threshold must be >= 1")
        if self.balance_abs_threshold < 0:
            raise ValueError("--balance-abs-threshold must be >= 0")
        if self.eviction_interval_secs <= 0:
            raise ValueError("--eviction-interval-secs must be > 0")
        if self.max_tree_size <= 0:
            raise ValueError("--max-tree-size must be > 0")
        return self


class PrefixScorer(Protocol):
    """Exact cache state, read-only: what the engines' KV events say each worker holds."""

    active: bool  # whether any worker publishes events (read per request)

    def tracks(self, url: str) -> bool:
        """Whether ``url``'s engine publishes events (its cache is known exactly)."""
        ...

    def cached_tokens(self, model: str, text: str) -> tuple[int, Mapping[str, int]]:
        """The prompt's length in tokens, and per tracked worker the leading tokens it holds
        in whole cached blocks (workers holding none may be left out)."""
        ...


class CacheAwarePolicy(Policy):
    name = "cache_aware"
    needs_text = True
    decisions: DecisionListener | None = None  # set by the gateway when it has peers

    def __init__(
        self, config: CacheAwareConfig | None = None, scorer: PrefixScorer | None = None
    ) -> None:
        self.config = config or CacheAwareConfig()
        self.scorer = scorer
        self.trees: dict[str, Tree] = {}
        self._indexes = UrlIndexes()
        # Trims every eviction_interval_secs, or as soon as a worker's text exceeds
        # max_tree_size (select wakes it), so trees stay within bound between intervals.
        self._evictor = Periodic(
            "tree eviction", self.config.eviction_interval_secs, self.evict_all
        )
        self.longest_eviction_slice = 0.0

    def tree_for(self, model: str) -> Tree:
        tree = self.trees.get(model)
        if tree is None:
            tree = self.trees[model] = Tree()
        return tree

    def select(self, workers: Workers, request: RouteRequest) -> Worker | None:
        config = self.config
        if not workers:
            return None
        if len(workers) == 1:
            only = workers[0]
            chosen: Worker | None = only if only.state.available else None
        else:
            chosen = self._choose(workers, request.text or "", request.model, config)
        if chosen is not None and request.text:
            tree = self.tree_for(request.model)
            tree.insert(request.text, chosen.url)
            if tree.tenant_chars[chosen.url] > config.max_tree_size:
                self._evictor.wake.set()  # trim now rather than at the next interval
            if self.decisions is not None:
                self.decisions(request.model, request.text, chosen.url)
        return chosen

    def insert_remote(self, model: str, text: str, url: str) -> None:
        """Record another gateway's decision: ``url`` was routed ``text`` (a prefix of the
        prompt). As a local decision's insert, so this gateway's next match finds it."""
        tree = self.tree_for(model)
        tree.insert(text, url)
        if tree.tenant_chars[url] > self.config.max_tree_size:
            self._evictor.wake.set()

    def cached_prefix(self, request: RouteRequest) -> tuple[int, frozenset[str]]:
        tree = self.trees.get(request.model)
        if tree is None or not request.text:
            return 0, frozenset()
        matched, tenants = tree.match(request.text)
        return matched, frozenset(tenants)

    def _choose(
        self, workers: Workers, text: str, tree_key: str, config: CacheAwareConfig
    ) -> Worker | None:
        loads = [w.state.in_flight for w in workers]
        low, high = min(loads), max(loads)
        if high - low > config.balance_abs_threshold and high > low * config.balance_rel_threshold:
            return least_loaded(workers)
        scorer = self.scorer
        precise = scorer is not None and scorer.active and bool(text)
        if precise:
            assert scorer is not None
            holder = _longest_cached(workers, scorer, tree_key, text, config)
            if holder is not None:
                return holder
        tree = self.trees.get(tree_key)
        if tree is None or not text:
            return least_loaded(workers)
        matched, tenants = tree.match(text)
        if tenants and matched / len(text) > config.cache_threshold:
            if precise:  # the tree speaks only for workers without events
                assert scorer is not None
                tenants = {u: t for u, t in tenants.items() if not scorer.tracks(u)}
            holder = self._most_recent_available(workers, tree_key, tenants)
            if holder is not None:
                return holder
        return _place_new_prefix(workers, tree, low, config)

    def _most_recent_available(
        self, workers: Workers, tree_key: str, tenants: dict[str, float]
    ) -> Worker | None:
        by_url = self._indexes.of(tree_key, workers)
        best: Worker | None = None
        best_stamp = -1.0
        for url, stamp in tenants.items():
            if stamp > best_stamp:
                worker = by_url.get(url)
                if worker is not None and worker.state.available:
                    best, best_stamp = worker, stamp
        return best

    def on_worker_removed(self, worker: Worker) -> None:
        for tree in self.trees.values():
            tree.remove_tenant(worker.url)

    # --- eviction ---------------------------------------------------------------------------

    def start(self) -> None:
        self._evictor.start()

    async def stop(self) -> None:
        await self._evictor.stop()

    async def evict_all(self, slice_secs: float = 0.002) -> None:
        """Trim every tree, handing the event loop back every ``slice_secs`` of work."""
        started = time.perf_counter()
        for tree in list(self.trees.values()):
            for _ in tree.eviction_work(self.config.max_tree_size):
                elapsed = time.perf_counter() - started
                if elapsed > slice_secs:
                    self.longest_eviction_slice = max(self.longest_eviction_slice, elapsed)
                    await asyncio.sleep(0)
                    started = time.perf_counter()
        self.longest_eviction_slice = max(
            self.longest_eviction_slice, time.perf_counter() - started
        )


_rotation = itertools.count()


def _longest_cached(
    workers: Workers, scorer: PrefixScorer, model: str, text: str, config: CacheAwareConfig
) -> Worker | None:
    """The available worker whose engine holds the longest cached run of the prompt, if
    that run is more than ``cache_threshold`` of it; ties go to the less loaded."""
    total, cached = scorer.cached_tokens(model, text)
    if not total or not cached:
        return None
    best: Worker | None = None
    best_key = (0, 0)
    for worker in workers:
        tokens = cached.get(worker.url, 0)
        if tokens and worker.state.available:
            key = (tokens, -worker.state.in_flight)
            if best is None or key > best_key:
                best, best_key = worker, key
    if best is None or best_key[0] / total <= config.cache_threshold:
        return None
    return best


def _place_new_prefix(
    workers: Workers, tree: Tree, low: int, config: CacheAwareConfig
) -> Worker | None:
    """Where a prefix no worker holds should go: the smallest cache among the workers that
    are not overloaded (by the same thresholds that define imbalance).

    smg sends misses to the least-loaded worker; in-flight counts are noisy at the moment a
    prefix first appears, so prefixes land unevenly and the worker holding the most thrashes
    its cache. Balancing what each worker holds keeps the distinct prefixes spread evenly;
    the load condition keeps a small-cache worker from becoming a sink (smg's "death spiral"
    with smallest-tree placement).
    """
    chars = tree.tenant_chars
    count = len(workers)
    start = next(_rotation) % count  # equal caches (a cold start) take turns
    best: Worker | None = None
    best_key = (0, 0)
    for offset in range(count):
        worker = workers[(start + offset) % count]
        if not worker.state.available:
            continue
        load = worker.state.in_flight
        if load - low > config.balance_abs_threshold and load > low * config.balance_rel_threshold:
            continue
        key = (chars.get(worker.url, 0), load)
        if best is None or key < best_key:
            best, best_key = worker, key
    return best or least_loaded(workers)
