"""``cache_aware``: send a request where its prefix is likely cached, unless load is skewed.

As smg's, after its fix that picks the least-loaded worker on imbalance:

1. If the fleet is imbalanced (max - min in-flight > ``balance_abs_threshold`` and
   max > min * ``balance_rel_threshold``), pick the least loaded worker.
2. Otherwise match the routing text against this model's tree. If more than
   ``cache_threshold`` of it matches, pick a worker that holds the match (the most recently
   used available one); else place the new prefix on a worker holding the least text
   among those not overloaded, the prompt's hash choosing among equals (smg: the least
   loaded; see ``_place_new_prefix``).
3. Record the text under the chosen worker.

Precise mode: given a ``PrefixScorer`` (the engines' KV-cache events, ``kv_events/``), a
worker that publishes events is judged by what its engine says it holds, not by the tree:
step 2 first takes the available worker with the longest run of cached blocks from the start
of the prompt (ties: the less loaded), if that run covers more than ``cache_threshold`` of
the prompt; otherwise the tree is matched as above, among the workers *without* events
and those routed the match in the last ``EVENTS_LAG_SECS`` (their events may not have
arrived yet). The tree still records every decision, so a worker that stops publishing
falls back to it.

The decision is explained (``decide``): ``prefix_match`` (the tree's holder),
``cached_blocks`` (precise: the engine's holder), ``rebalanced`` (precise: the engines'
planned move took the prompt elsewhere, ``engine_plans.py``), ``load_override`` (imbalance broke
the match), ``new_prefix`` (placed on the smallest cache), ``least_loaded`` (no text to
match), ``only_worker``; and the prompt tokens the chosen worker should find cached: the tree's
match for it at the model's characters per token (learnt from the answers' prompt token
counts, ``CHARS_PER_TOKEN`` until then), or the engine's exact count for a worker with events.

Self-correction (``self_correct``): the answer's ``cached_tokens`` are compared with the
tree's match for the chosen worker; when the worker evidently lost part of the prefix (its
engine evicted it), the tree forgets everything that worker held beyond what was cached,
this prefix's other extensions included (an engine evicts a prefix only after everything
that extends it), and records this request's text again (answering it cached it anew).
So the tree follows the engines' caches: its predictions stay near what the workers report,
its per-worker sizes (which place new prefixes) near what they hold, and a request is no
longer pulled to a worker by a long match the worker lost (``_correct`` says what
"evidently" means).

Unlike smg, the matched tenant is the most recently used *available* worker at the deepest
node (smg takes the first in its map, and falls back to an arbitrary worker if that one is
gone). Trees are per model and trimmed by a background task every
``eviction_interval_secs`` to ``max_tree_size`` characters per worker, in slices of at most
2 ms so the event loop never stalls.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

from shunter.aio.periodic import Periodic
from shunter.fleet.registry import Workers
from shunter.fleet.worker import Worker
from shunter.policies.base import (
    CHARS_PER_TOKEN,
    Decision,
    Policy,
    RouteRequest,
    UrlIndexes,
    least_loaded,
)
from shunter.policies.engine_plans import EnginePlans, EngineUnits
from shunter.policies.rebalance import Move, Unit, plan_move, scan_units
from shunter.policies.tree import Tree

log = logging.getLogger("shunter.policies.cache_aware")

# Hears every decision (model, routing text, worker URL, whether it placed a new prefix):
# the peers' exchange, when on.
DecisionListener = Callable[[str, str, str, bool], None]


@dataclass(frozen=True)
class CacheAwareConfig:
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    eviction_interval_secs: float = 120.0
    max_tree_size: int = 2**26
    self_correct: bool = True  # forget what the workers' answers show they evicted

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


class PrefixScorer(EngineUnits, Protocol):
    """Exact cache state, read-only: what the engines' KV events say each worker holds (and,
    for precise mode's rebalancing, their units: ``EngineUnits``)."""

    active: bool  # whether any worker publishes events (read per request)

    def tracks(self, url: str) -> bool:
        """Whether ``url``'s engine publishes events (its cache is known exactly)."""
        ...

    def cached_tokens(
        self, model: str, text: str, chat: bytes | None = None
    ) -> tuple[int, Mapping[str, int]]:
        """The prompt's length in tokens, and per tracked worker the leading tokens it holds
        in whole cached blocks (workers holding none may be left out). ``chat``: a chat
        request's body, to be rendered as the engine renders it (``RouteRequest.chat``)."""
        ...

    def held_tokens(self, model: str, url: str) -> int:
        """The tokens ``url``'s engine holds for ``model`` in cached blocks."""
        ...

    def newest(
        self, model: str, text: str, chat: bytes | None, among: Collection[str]
    ) -> str | None:
        """Of the workers in ``among``, the one whose engine began holding the prompt's unit
        last (its home, ``engine_plans.py``); None: none of them holds it."""
        ...


# What counts as an evident loss (``_correct``): the worker's cached characters fall short
# of the tree's match by more than this many tokens' worth (engines cache whole blocks, 16
# tokens in vLLM and the sim, and never the prompt's last token, so up to two blocks short
# is normal) and by more than this share of the match (the characters-per-token conversion
# and a chat template's tokens blur the comparison by a few percent).
SLACK_TOKENS = 32
SLACK_SHARE = 0.25

# Precise mode: an engine publishes a prompt's blocks once it has prefilled them, so a
# prompt routed to it in the last few seconds may not be in its events yet; the tree's
# record of that route is trusted meanwhile. Without it, the second request of a new prompt,
# arriving while the first is prefilling, is placed as new on another worker: one gateway
# over 8 sims split 3 of 32 prompts over two workers that way (requests max/min 1.63).
EVENTS_LAG_SECS = 5.0
MAX_RATIO_MODELS = 1024  # models whose token ratio is kept (a bound on the dictionary)
# After a move (``rebalance``), a peer's decision for the moved prompt's old worker counts as
# one for its new worker this long: the peer decided before it heard of the move (a flush
# takes 5 ms), and inserting the old worker afresh would make it the prompt's most recent
# holder again here while the peer itself follows the move.
MOVE_REDIRECT_SECS = 2.0
OVERRIDE_QUIET_SECS = 60.0  # see ``rebalance``
# Precise mode: between engines holding a prompt's run alike, those within this many
# in-flight requests of the least loaded count as equal, and the prompt's home among them
# takes it (``engine_plans.py``); a home busier than that does not, so a hot prompt still
# spreads before the load override trips.
LOAD_BAND = 8


@dataclass(frozen=True, slots=True)
class CacheAwareDecision(Decision):
    """A ``Decision`` with what the self-correction needs: the characters of the text the
    tree says the worker holds, when the worker was last routed them (monotonic seconds;
    -1.0: never), when this decision was taken, and whether the prediction came from the
    engine's own events (then the tree is not the one to correct)."""

    matched_chars: int = 0
    since: float = -1.0
    decided_at: float = 0.0
    exact: bool = False


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
        self.learns_from_cache = True  # the token ratio always; the tree if self_correct
        self.corrections = 0  # times the tree forgot a prefix a worker had lost
        # Per model, the routing text's characters per prompt token, as the workers count
        # them (``_learn_ratio``); CHARS_PER_TOKEN until an answer says.
        self.chars_per_token: dict[str, float] = {}
        # Precise placements of the last EVENTS_LAG_SECS: (when, worker URL, model, tokens).
        self._placed: deque[tuple[float, str, str, int]] = deque(maxlen=4096)
        self.moves = 0  # prompts moved between workers (``rebalance``, here or by a peer)
        self.last_override = -OVERRIDE_QUIET_SECS  # when load last overrode a match
        # Precise mode's rebalancing (``engine_plans.py``), when there are engines' events.
        self.engine_plans = None if scorer is None else EnginePlans(scorer)
        # Moves of the last MOVE_REDIRECT_SECS: (until, model, old worker, new worker, the
        # text every prompt of the moved unit starts with).
        self._moved: deque[tuple[float, str, str, str, str]] = deque(maxlen=64)

    def tree_for(self, model: str) -> Tree:
        tree = self.trees.get(model)
        if tree is None:
            tree = self.trees[model] = Tree()
        return tree

    def select(self, workers: Workers, request: RouteRequest) -> Worker | None:
        return self.decide(workers, request).worker

    def decide(self, workers: Workers, request: RouteRequest) -> Decision:
        config = self.config
        if not workers:
            return Decision(None, "only_worker")
        text = request.text or ""
        if len(workers) == 1:
            only = workers[0]
            chosen: Worker | None = only if only.state.available else None
            reason, exact, known = "only_worker", None, None
        else:
            chosen, reason, exact, known = self._choose(
                workers, text, request.model, config, request.chat
            )
        if chosen is None:
            return Decision(None, reason)
        now = time.monotonic()
        if not text:
            return CacheAwareDecision(chosen, reason, 0, decided_at=now)
        tree = self.tree_for(request.model)
        if exact is not None:  # the engine's own count: the tree's view is not needed
            decision = CacheAwareDecision(chosen, reason, exact, decided_at=now, exact=True)
        else:
            # What the tree holds for the chosen worker: known from the match when it
            # followed it (one walk per request), else one more walk.
            held, since = known if known is not None else tree.held(text, chosen.url)
            decision = CacheAwareDecision(
                chosen,
                reason,
                int(held / self.chars_per_token.get(request.model, CHARS_PER_TOKEN)),
                matched_chars=held,
                since=since,
                decided_at=now,
            )
        tree.insert(text, chosen.url, now)
        if tree.tenant_chars[chosen.url] > config.max_tree_size:
            self._evictor.wake.set()  # trim now rather than at the next interval
        if self.decisions is not None:  # replicas hear of it (peers/)
            self.decisions(request.model, text, chosen.url, reason == "new_prefix")
        return decision

    def insert_remote(self, model: str, text: str, url: str) -> None:
        """Record another gateway's decision: ``url`` was routed ``text`` (a prefix of the
        prompt). As a local decision's insert, so this gateway's next match finds it."""
        tree = self.tree_for(model)
        if self._moved:
            url = self._redirect(model, text, url)
        tree.insert(text, url)
        if tree.tenant_chars[url] > self.config.max_tree_size:
            self._evictor.wake.set()

    # --- rebalancing (peers: the leader plans, every gateway applies) ------------------------

    async def rebalance(
        self, model: str, workers: Workers, slice_secs: float = 0.002
    ) -> Move | None:
        """Plan one move of a prompt between ``model``'s workers (``policies/rebalance.py``),
        apply it here and return it (for the peers), or None. The tree is scanned in slices
        of at most ``slice_secs``, handing the event loop back between them."""
        tree = self.trees.get(model)
        scorer = self.scorer
        if tree is None or (scorer is not None and scorer.active):
            return None  # precise mode: the engines say where a prompt is, not the tree
        eligible = {w.url for w in workers if w.state.available}
        units: list[Unit] = []
        started = time.perf_counter()
        for _ in scan_units(tree, eligible, units):
            if time.perf_counter() - started > slice_secs:
                await asyncio.sleep(0)
                started = time.perf_counter()
        # Gathering a prompt held by several workers waits OVERRIDE_QUIET_SECS after a load
        # override: the override spread it on purpose, and loads look even right after.
        quiet = time.monotonic() - self.last_override >= OVERRIDE_QUIET_SECS
        move = plan_move(units, eligible, consolidate=quiet)
        if move is not None:
            self.apply_move(model, move)
        return move

    def apply_move(self, model: str, move: Move, now: float | None = None) -> int:
        """Hand the moved prompt to its new worker in ``model``'s tree (the characters moved;
        0 when this tree held none of it there), and redirect late decisions for it."""
        stamp = time.monotonic() if now is None else now
        tree = self.tree_for(model)
        moved = tree.move(move.text, move.cut, move.source, move.target, stamp)
        if tree.tenant_chars.get(move.target, 0) > self.config.max_tree_size:
            self._evictor.wake.set()
        key = move.text[: move.cut + 1]
        self._moved.append((stamp + MOVE_REDIRECT_SECS, model, move.source, move.target, key))
        self.moves += 1
        log.debug(
            "prompt moved",
            extra={"from": move.source, "to": move.target, "chars": moved, "why": move.reason},
        )
        return moved

    def _redirect(self, model: str, text: str, url: str) -> str:
        """``url``, or the new worker of a prompt moved off it in the last seconds."""
        moved, now = self._moved, time.monotonic()
        while moved and moved[0][0] < now:
            moved.popleft()
        for _, where, source, target, key in moved:
            if source == url and where == model and text.startswith(key):
                return target
        return url

    def cached_prefix(self, request: RouteRequest) -> tuple[int, frozenset[str]]:
        tree = self.trees.get(request.model)
        if tree is None or not request.text:
            return 0, frozenset()
        matched, tenants = tree.match(request.text)
        return matched, frozenset(tenants)

    def _choose(
        self,
        workers: Workers,
        text: str,
        tree_key: str,
        config: CacheAwareConfig,
        chat: bytes | None = None,
    ) -> tuple[Worker | None, str, int | None, tuple[int, float] | None]:
        """The worker, the reason, the engine's exact cached tokens for it when its events
        said so (None: the tree's estimate applies), and the tree's characters and stamp
        for it when the match already told them (None: ask the tree)."""
        loads = [w.state.in_flight for w in workers]
        low, high = min(loads), max(loads)
        scorer = self.scorer
        precise = scorer is not None and scorer.active and bool(text)
        if _imbalanced(low, high, config):
            self.last_override = time.monotonic()
            chosen = least_loaded(workers)
            exact = _exact(scorer, chosen, tree_key, text, chat, precise)
            return chosen, "load_override", exact, None
        counts: Mapping[str, int] = {}
        tokens = 0  # the prompt's, when the engines' tokenizer counted them
        if precise:
            plans = self.engine_plans
            assert scorer is not None and plans is not None
            plans.watch(tree_key, workers)
            holder, counts, tokens = _longest_cached(workers, scorer, tree_key, text, chat, config)
            if holder is not None:
                by_url = self._indexes.of(tree_key, workers)
                target = plans.moved_to(tree_key, holder, by_url, text, chat)
                if target is not None:
                    return target, "rebalanced", counts.get(target.url, 0), None
                return holder, "cached_blocks", counts.get(holder.url, 0), None
        if not text:
            return least_loaded(workers), "least_loaded", None, _NOTHING
        # A model's first prompt is placed as any new one (by its hash), not by load: the
        # gateways of one fleet would all put their first prompts on the same worker.
        tree = self.tree_for(tree_key)
        matched, tenants = tree.match(text)
        if tenants and matched / len(text) > config.cache_threshold:
            if precise:  # the tree speaks for workers without events, and for recent routes
                assert scorer is not None
                lately = time.monotonic() - EVENTS_LAG_SECS
                tenants = {u: t for u, t in tenants.items() if t >= lately or not scorer.tracks(u)}
            holder = self._most_recent_available(workers, tree_key, tenants)
            if holder is not None:  # it holds the whole match: it is at the deepest node
                return holder, "prefix_match", None, (matched, tenants[holder.url])
        if scorer is not None and tokens and all(scorer.tracks(w.url) for w in workers):
            chosen = self._place_by_engines(workers, scorer, tree_key, tokens, text, low)
        else:
            chosen = _place_new_prefix(
                workers, tree.tenant_chars, len(text) // 2, text, low, config
            )
        if chosen is not None and precise and scorer is not None and scorer.tracks(chosen.url):
            return chosen, "new_prefix", counts.get(chosen.url, 0), None
        return chosen, "new_prefix", None, _NOTHING if not matched else None

    def _place_by_engines(
        self,
        workers: Workers,
        scorer: PrefixScorer,
        model: str,
        tokens: int,
        text: str,
        low: int,
    ) -> Worker | None:
        """Precise placement: each cache's size is what its engine holds (every gateway
        subscribed to it sees the same, where each tree knows only its own routes), plus
        the prompts this gateway placed on it in the last ``EVENTS_LAG_SECS``, not yet in
        its events. Without those, a gateway placing prompts faster than the engines
        publish them took the same smallest engine for several (one gateway over 8 sims:
        5 prompts on one, 3 on another; requests max/min 1.67).

        The target of a planned move (``engine_plans.py``) counts as holding the moved
        prompt already (the tokens its old engine holds of it): it is on its way there.
        Otherwise a new prompt and a moved one both went to the lightest engine, which then
        had too many, and the next moves took prompts off it again (``bench/README.md``,
        "Precise rebalancing, second design")."""
        sizes = {w.url: scorer.held_tokens(model, w.url) for w in workers}
        now = time.monotonic()
        placed = self._placed
        while placed and placed[0][0] < now - EVENTS_LAG_SECS:
            placed.popleft()
        for _, where, what, count in placed:
            if what == model and where in sizes:
                sizes[where] += count
        if self.engine_plans is not None:
            for target, arriving in self.engine_plans.arriving(model):
                if target in sizes:
                    sizes[target] += arriving  # the moved prompt, on its way there
        chosen = _place_new_prefix(workers, sizes, tokens // 2, text, low, self.config)
        if chosen is not None:
            placed.append((now, chosen.url, model, tokens))
        return chosen

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

    # --- self-correction -----------------------------------------------------------------

    def on_cached(
        self,
        request: RouteRequest,
        decision: Decision,
        cached_tokens: int,
        prompt_tokens: int | None,
        elapsed: float,
    ) -> None:
        """Learn the model's token ratio (``_learn_ratio``); forget what the chosen worker
        evidently lost (``_correct``)."""
        if prompt_tokens and request.text:
            self._learn_ratio(request.model, len(request.text) / prompt_tokens)
        if (
            self.config.self_correct
            and isinstance(decision, CacheAwareDecision)
            and decision.matched_chars
            and not decision.exact
            and request.text
            and decision.worker is not None
        ):
            self._correct(request, decision, cached_tokens, prompt_tokens, elapsed)

    def _learn_ratio(self, model: str, observed: float) -> None:
        """Follow the model's characters per token: the prediction (``predicted_cached``)
        turns the tree's characters into tokens at this ratio. A fixed 4 over-predicted 46
        of 48 answers of SmolLM2 on llama.cpp and every answer of the sim (whose tokens are
        whole words, ~6 characters). A moving average (1/16 per answer): one odd prompt
        (code, another language, a long chat template) moves it little."""
        observed = min(max(observed, 1.0), 32.0)
        ratio = self.chars_per_token.get(model)
        if ratio is None:
            if len(self.chars_per_token) >= MAX_RATIO_MODELS:
                return
            self.chars_per_token[model] = observed
        else:
            self.chars_per_token[model] = ratio + (observed - ratio) / 16

    def _correct(
        self,
        request: RouteRequest,
        decision: CacheAwareDecision,
        cached_tokens: int,
        prompt_tokens: int | None,
        elapsed: float,
    ) -> None:
        """The worker evidently lost the prefix beyond what it reported cached when both:

        - it cached fewer characters than the tree matched for it, by more than
          ``SLACK_TOKENS`` tokens' worth and more than ``SLACK_SHARE`` of the match. Its
          cached tokens are turned into characters at this very prompt's ratio (its
          characters over the ``prompt_tokens`` the worker counted), not at a fixed 4;
        - the worker was last routed that prefix longer before this request than this
          request took. Otherwise the miss may be a race, not an eviction: the request that
          put the prefix there may still have been prefilling it (engines cache a prompt
          once its prefill is done), and a burst sharing a new prefix would wipe it.
        """
        text = request.text
        assert text is not None and decision.worker is not None
        length = len(text)
        if prompt_tokens:
            cached_chars = min(length, cached_tokens * length // prompt_tokens)
        else:
            cached_chars = cached_tokens * CHARS_PER_TOKEN
        chars_per_token = length / prompt_tokens if prompt_tokens else CHARS_PER_TOKEN
        shortfall = decision.matched_chars - cached_chars
        if shortfall <= SLACK_TOKENS * chars_per_token or shortfall <= (
            SLACK_SHARE * decision.matched_chars
        ):
            return
        if decision.decided_at - decision.since <= elapsed:
            return
        tree = self.trees.get(request.model)
        url = decision.worker.url
        if tree is None or url not in tree.tenant_chars:  # the worker has left since
            return
        dropped = tree.forget(text, url, cached_chars)
        if dropped:
            tree.insert(text, url, decision.decided_at)  # the answer cached it again
            self.corrections += 1
            log.debug(
                "tree forgot an evicted prefix",
                extra={
                    "worker": decision.worker.url,
                    "predicted_chars": decision.matched_chars,
                    "cached_chars": cached_chars,
                },
            )

    def on_worker_removed(self, worker: Worker) -> None:
        for tree in self.trees.values():
            tree.remove_tenant(worker.url)

    # --- eviction ---------------------------------------------------------------------------

    def start(self) -> None:
        self._evictor.start()
        if self.engine_plans is not None:
            self.engine_plans.start()

    async def stop(self) -> None:
        await self._evictor.stop()
        if self.engine_plans is not None:
            await self.engine_plans.stop()

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


_NOTHING = (0, -1.0)  # the tree holds none of the text for the worker


def _imbalanced(low: int, high: int, config: CacheAwareConfig) -> bool:
    """Whether in-flight loads this far apart override a cache match (smg's two thresholds);
    also whether a worker at ``high`` is too busy for a new prefix."""
    return high - low > config.balance_abs_threshold and high > low * config.balance_rel_threshold


def _exact(
    scorer: PrefixScorer | None,
    worker: Worker | None,
    model: str,
    text: str,
    chat: bytes | None,
    precise: bool,
) -> int | None:
    """The engine's cached tokens for ``worker`` if it publishes events, else None."""
    if not precise or scorer is None or worker is None or not scorer.tracks(worker.url):
        return None
    return scorer.cached_tokens(model, text, chat)[1].get(worker.url, 0)


def _longest_cached(
    workers: Workers,
    scorer: PrefixScorer,
    model: str,
    text: str,
    chat: bytes | None,
    config: CacheAwareConfig,
) -> tuple[Worker | None, Mapping[str, int], int]:
    """The available worker whose engine holds the longest cached run of the prompt, if
    that run is more than ``cache_threshold`` of it; the engines' counts; and the prompt's
    tokens. Between engines holding the run alike: the prompt's home (the newest holder of
    its unit, ``engine_plans.py``) among those within ``LOAD_BAND`` in-flight requests of
    the least loaded, else the least loaded."""
    total, cached = scorer.cached_tokens(model, text, chat)
    if not total or not cached:
        return None, cached, total
    longest: list[Worker] = []
    best = 0
    for worker in workers:
        tokens = cached.get(worker.url, 0)
        if tokens >= best and tokens and worker.state.available:
            if tokens > best:
                longest, best = [], tokens
            longest.append(worker)
    if not longest or best / total <= config.cache_threshold:
        return None, cached, total
    if len(longest) == 1:
        return longest[0], cached, total
    low = min(w.state.in_flight for w in longest)
    tied = [w for w in longest if w.state.in_flight - low < LOAD_BAND]
    home = scorer.newest(model, text, chat, {w.url for w in tied}) if len(tied) > 1 else None
    for worker in tied:
        if worker.url == home:
            return worker, cached, total
    return min(tied, key=lambda w: w.state.in_flight), cached, total


def _place_new_prefix(
    workers: Workers,
    sizes: Mapping[str, int],
    half: int,
    text: str,
    low: int,
    config: CacheAwareConfig,
) -> Worker | None:
    """Where a prefix no worker holds should go: a worker with the smallest cache among
    those that are not overloaded (by the same thresholds that define imbalance). A cache's
    size (``sizes``) is the characters the tree holds for the worker, or in precise mode,
    when every worker publishes events, the tokens its engine holds (independent gateways
    then agree on it); ``half``: half the prompt, in the same unit.

    smg sends misses to the least-loaded worker; in-flight counts are noisy at the moment a
    prefix first appears, so prefixes land unevenly and the worker holding the most thrashes
    its cache. Balancing what each worker holds keeps the distinct prefixes spread evenly;
    the load condition keeps a small-cache worker from becoming a sink (smg's "death spiral"
    with smallest-tree placement).

    "The smallest" is a level, not one worker: every worker holding less than half this
    prompt (``half``) more than the smallest cache. Among them the prompt's own hash picks
    (``_spread``). Gateways that share their decisions (peers/, ``--workers N``) hold nearly
    the same trees, so each would pick the same unique smallest worker for the different
    prefixes they place in the few milliseconds before they hear of each other: 4 and 8
    peered gateways over 8 workers put 5 of 32 prompts on one worker and 3 on another that
    way (requests max/min 1.48-1.67 in 7 of 8 runs). Hashed, they mostly spread (1.00 in 6
    of 10 runs, at most 1.5 in 8, 1.67 at worst); the same new prompt arriving at two
    gateways at once goes to one worker; and a lone gateway is as even as before, since
    each placement lifts its worker out of the level.
    """
    chars = sizes
    candidates: list[Worker] = []
    smallest = -1
    for worker in workers:
        if not worker.state.available:
            continue
        if _imbalanced(low, worker.state.in_flight, config):
            continue
        held = chars.get(worker.url, 0)
        candidates.append(worker)
        if smallest < 0 or held < smallest:
            smallest = held
    if not candidates:
        return least_loaded(workers)
    ceiling = smallest + half
    return _spread([w for w in candidates if chars.get(w.url, 0) <= ceiling], text)


def _spread(workers: list[Worker], text: str) -> Worker:
    """One of ``workers`` by rendezvous hashing of the prompt's first half (a new system
    prompt is the bulk of a first turn, so its requests agree whoever their user is): the
    same on every gateway (CRC-32, not Python's per-process ``hash``), and a worker leaving
    the level moves only the prompts it would have taken."""
    if len(workers) == 1:
        return workers[0]
    half = max(1, len(text) // 2)
    sample = text[: half : max(1, half // 512)]  # 512 characters of it: ~1 us to hash
    seed = zlib.crc32(sample.encode("utf-8", "surrogatepass"))
    return max(workers, key=lambda w: _mix(zlib.crc32(w.url.encode()) << 32 | seed))


def _mix(value: int) -> int:
    """SplitMix64's finaliser: CRC-32 is linear, so CRCs of one URL under different seeds
    order the workers alike; mixed, each prompt gets its own order."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return value ^ (value >> 31)
