"""Which worker holds which prompt blocks, per model, from the engines' KV-cache events.

Blocks are keyed by *our* chained key, computed from the token ids the event carries:
``key = hash((parent_key, tokens_of_the_block))``, the first block chained from ``ROOT``. A
request's blocks get the same keys from its token ids, so matching needs neither the engine's
hash algorithm nor its seed (vLLM's hashes are not reproducible without both). The engine's
hash is kept only as a handle, per worker: to find the parent of a stored run and to apply a
``BlockRemoved``. Python's tuple hash of ints is the same in every process and takes ~0.2 µs
per 16-token block; a collision needs two different 64-bit chains to meet, which a routing
hint can afford.

Copies are counted: vLLM can cache the same block twice and remove it twice, and SGLang's
node split removes and re-stores the same pages in one batch; a worker holds a block while
it has at least one copy. A store whose parent the index does not know (it joined late or
lost events) is skipped and counted: placing it at position 0 would fake matches. Blocks of
another tier than the GPU (``medium`` CPU, disk...) are not indexed: the score is what the
engine can reuse without a copy.

Blocks are also grouped by **unit**, the key of their run's first block: the prompts sharing
their first block (a chat template's start and the first words of a system prompt), as
``policies/rebalance.py`` moves them. ``units`` says how many blocks each worker holds of
each unit, in the order the workers began holding it (the newest holder is the unit's home,
``policies/engine_plans.py``), kept up to date as blocks come and go, so that every gateway
reading the same events plans the same moves without talking to the others.

A unit's **demand** is how many tokens of it were stored new (in blocks no worker held
until then), decayed with a half-life of ``DEMAND_HALF_LIFE_SECS``: the prompt's text and the new
text its requests brought recently (each conversation's turns), anywhere in the fleet. It is
what rebalancing weighs, not the blocks held: an engine's cache fills up, and then every
engine holds about as many blocks as any other however many prompts it serves (8 sims with
caches of 175 blocks, 5 prompts on one and 3 on another: both held ~175, and the plan saw
nothing to move). A copy of a prompt stored on a second engine is not new, so a move does
not add to its prompt's demand.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from shunter.kv_events.wire import AllBlocksCleared, BlockRemoved, BlockStored, Event

ROOT = 0
_GPU = (None, "GPU")
DEMAND_HALF_LIFE_SECS = 60.0


@dataclass
class IndexCounters:
    stored_blocks: int = 0
    removed_blocks: int = 0
    clears: int = 0
    unknown_parent: int = 0  # stores skipped: the parent block is not known
    unknown_removal: int = 0  # removals of a block never stored (or already removed)
    inconsistent: int = 0  # stores whose token count does not match hashes x block size
    other_tier: int = 0  # events for a tier other than the GPU


@dataclass
class _WorkerBlocks:
    block_size: int
    by_engine: dict[int, list[int]] = field(default_factory=dict)  # hash -> [key, copies]
    copies: dict[int, int] = field(default_factory=dict)  # our key -> copies held


class BlockIndex:
    """One model's index: ``holders`` (our key -> the workers holding it)."""

    def __init__(self) -> None:
        self.holders: dict[int, set[str]] = {}
        # unit -> worker -> blocks it holds of it, the workers in the order they began holding it
        self.units: dict[int, dict[str, int]] = {}
        self._demand: dict[int, tuple[float, float]] = {}  # unit -> (demand, as of when)
        self.version = 0  # bumped when ``units`` changes
        self._unit_of: dict[int, int] = {}  # our key -> its run's first block's key
        self._workers: dict[str, _WorkerBlocks] = {}
        self.counters = IndexCounters()

    def apply(self, worker: str, event: Event) -> None:
        if isinstance(event, BlockStored):
            self.store(worker, event)
        elif isinstance(event, BlockRemoved):
            self.remove(worker, event)
        elif isinstance(event, AllBlocksCleared):
            self.counters.clears += 1
            self.drop(worker)

    def store(self, worker: str, event: BlockStored) -> None:
        if event.medium not in _GPU:
            self.counters.other_tier += 1
            return
        size = event.block_size
        blocks = self._workers.get(worker)
        if blocks is not None and blocks.block_size != size:  # the engine was reconfigured
            self.drop(worker)
            blocks = None
        if event.parent is None:
            parent = ROOT
        else:
            known = None if blocks is None else blocks.by_engine.get(event.parent)
            if known is None:
                self.counters.unknown_parent += 1
                return
            parent = known[0]
        tokens = event.token_ids
        count = len(event.block_hashes)
        if len(tokens) != count * size:  # keep the blocks the tokens fully describe
            self.counters.inconsistent += 1
            count = min(count, len(tokens) // size)
        if blocks is None:
            blocks = self._workers[worker] = _WorkerBlocks(size)
        unit_of = self._unit_of
        holders = self.holders
        new: dict[int, int] = {}  # unit -> its blocks no worker held until now
        for index in range(count):
            above = parent
            parent = hash((parent, tokens[index * size : (index + 1) * size]))
            if parent not in unit_of:
                unit_of[parent] = parent if above == ROOT else unit_of.get(above, above)
            if parent not in holders:
                unit = unit_of[parent]
                new[unit] = new.get(unit, 0) + 1
            engine_hash = event.block_hashes[index]
            entry = blocks.by_engine.get(engine_hash)
            if entry is None:
                blocks.by_engine[engine_hash] = [parent, 1]
            else:
                entry[1] += 1
            self._hold(worker, blocks, parent)
        self.counters.stored_blocks += count
        if new:
            now = time.monotonic()
            for unit, added in new.items():
                self._demand[unit] = (self.demand(unit, now) + added * size, now)

    def remove(self, worker: str, event: BlockRemoved) -> None:
        if event.medium not in _GPU:
            self.counters.other_tier += 1
            return
        blocks = self._workers.get(worker)
        for engine_hash in event.block_hashes:
            entry = None if blocks is None else blocks.by_engine.get(engine_hash)
            if blocks is None or entry is None:
                self.counters.unknown_removal += 1
                continue
            entry[1] -= 1
            if not entry[1]:
                del blocks.by_engine[engine_hash]
            self._release(worker, blocks, entry[0])
            self.counters.removed_blocks += 1

    def drop(self, worker: str) -> None:
        """Forget every block of ``worker`` (a clear, a resync, the worker leaving)."""
        blocks = self._workers.pop(worker, None)
        if blocks is None:
            return
        for key in blocks.copies:
            holding = self.holders.get(key)
            if holding is not None:
                holding.discard(worker)
                if not holding:
                    del self.holders[key]
                    self._unit_of.pop(key, None)
        for unit in [u for u, held in self.units.items() if worker in held]:
            held = self.units[unit]
            del held[worker]
            if not held:
                del self.units[unit]
                self._demand.pop(unit, None)
        self.version += 1

    def demand(self, unit: int, now: float) -> float:
        """``unit``'s demand as of ``now`` (monotonic seconds): see the module's docstring."""
        value, since = self._demand.get(unit, (0.0, now))
        return value * math.exp2((since - now) / DEMAND_HALF_LIFE_SECS)

    def blocks_of(self, worker: str) -> int:
        blocks = self._workers.get(worker)
        return 0 if blocks is None else len(blocks.copies)

    def tokens_of(self, worker: str) -> int:
        """The tokens ``worker`` holds in cached blocks."""
        blocks = self._workers.get(worker)
        return 0 if blocks is None else len(blocks.copies) * blocks.block_size

    def unit_of(self, token_ids: Any) -> int | None:
        """The unit of a prompt with these token ids: its first block's key (None: shorter
        than a block)."""
        for size in {blocks.block_size for blocks in self._workers.values()}:
            if len(token_ids) >= size:
                return hash((ROOT, tuple(token_ids[:size])))
        return None

    def longest_prefix(self, token_ids: Any) -> dict[str, int]:
        """Per worker, the tokens of the longest run of cached blocks from the start of
        ``token_ids`` (a block after a miss is worth nothing, as in the engine)."""
        cached: dict[str, int] = {}
        if not self.holders:
            return cached
        for size in {blocks.block_size for blocks in self._workers.values()}:
            parent = ROOT
            for start in range(0, len(token_ids) - size + 1, size):
                parent = hash((parent, tuple(token_ids[start : start + size])))
                holding = self.holders.get(parent)
                if not holding:
                    break
                advanced = False
                for worker in holding:
                    if cached.get(worker, 0) == start:
                        cached[worker] = start + size
                        advanced = True
                if not advanced:
                    break
        return cached

    def _hold(self, worker: str, blocks: _WorkerBlocks, key: int) -> None:
        copies = blocks.copies.get(key, 0)
        blocks.copies[key] = copies + 1
        if not copies:
            self.holders.setdefault(key, set()).add(worker)
            held = self.units.setdefault(self._unit_of[key], {})
            held[worker] = held.get(worker, 0) + 1
            self.version += 1

    def _release(self, worker: str, blocks: _WorkerBlocks, key: int) -> None:
        if key not in blocks.copies:
            return  # not held (an engine hash re-stored with other content, removed twice)
        copies = blocks.copies[key] - 1
        if copies > 0:
            blocks.copies[key] = copies
            return
        blocks.copies.pop(key, None)
        unit = self._unit_of.get(key)
        held = {} if unit is None else self.units.get(unit, {})
        if worker in held:
            held[worker] -= 1
            if not held[worker]:
                del held[worker]
                if not held and unit is not None:
                    del self.units[unit]
                    self._demand.pop(unit, None)
            self.version += 1
        holding = self.holders.get(key)
        if holding is not None:
            holding.discard(worker)
            if not holding:
                del self.holders[key]
                self._unit_of.pop(key, None)


class KvIndex:
    """The block index of every model; what subscribers write and the scorer reads."""

    def __init__(self) -> None:
        self.models: dict[str, BlockIndex] = {}

    def of(self, model: str) -> BlockIndex:
        index = self.models.get(model)
        if index is None:
            index = self.models[model] = BlockIndex()
        return index

    def longest_prefix(self, model: str, token_ids: Any) -> dict[str, int]:
        index = self.models.get(model)
        return {} if index is None else index.longest_prefix(token_ids)

    def held_tokens(self, model: str, worker: str) -> int:
        index = self.models.get(model)
        return 0 if index is None else index.tokens_of(worker)

    def drop_worker(self, worker: str) -> None:
        for index in self.models.values():
            index.drop(worker)
