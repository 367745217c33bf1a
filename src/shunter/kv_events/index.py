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

A batch is applied whole (``apply_batch``): a block whose last copy a batch removes and a
later event of the same batch stores again (SGLang's node split) never stopped being held,
so it neither moves its worker to the end of its unit's holders nor counts as new.

Blocks are also grouped by **unit**, the key of their run's first block: the prompts sharing
their first block, as ``policies/rebalance.py`` moves them (``units.py``: who holds each,
its home, its demand), kept up to date as blocks come and go, so that every gateway reading
the same events plans the same moves without talking to the others.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from shunter.kv_events.units import Units
from shunter.kv_events.wire import AllBlocksCleared, BlockRemoved, BlockStored, Event

ROOT = 0
_GPU = (None, "GPU")


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
        self.units = Units()
        self._unit_of: dict[int, int] = {}  # our key -> its run's first block's key
        self._workers: dict[str, _WorkerBlocks] = {}
        self.counters = IndexCounters()
        self._ts = 0.0  # the engine's time of the batch being applied
        # Inside a batch: blocks whose last copy went, released when the batch ends.
        self._letting_go: list[tuple[str, _WorkerBlocks, int]] | None = None

    @property
    def version(self) -> int:
        """Changes whenever a worker's blocks of a unit change."""
        return self.units.version

    def apply_batch(self, worker: str, events: Iterable[Event], ts: float) -> None:
        """Apply one batch of ``worker``'s events, stamped ``ts`` by its engine."""
        self._letting_go = []
        try:
            for event in events:
                self.apply(worker, event, ts)
        finally:
            letting_go, self._letting_go = self._letting_go, None
            for owner, blocks, key in letting_go:
                if self._workers.get(owner) is blocks and not blocks.copies.get(key, 1):
                    self._let_go(owner, blocks, key)

    def apply(self, worker: str, event: Event, ts: float | None = None) -> None:
        """Apply one event (``ts``: its batch's time on the engine's clock; now if None)."""
        self._ts = time.time() if ts is None else ts
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
        for unit, added in new.items():
            self.units.stored_new(unit, added * size, self._ts)

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
        self.units.drop(worker)

    def blocks_of(self, worker: str) -> int:
        blocks = self._workers.get(worker)
        return 0 if blocks is None else len(blocks.copies)

    def block_size(self, worker: str) -> int:
        blocks = self._workers.get(worker)
        return 0 if blocks is None else blocks.block_size

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
        if not copies and worker not in self.holders.get(key, ()):
            self.holders.setdefault(key, set()).add(worker)
            self.units.hold(self._unit_of[key], worker, self._ts)

    def _release(self, worker: str, blocks: _WorkerBlocks, key: int) -> None:
        copies = blocks.copies.get(key)
        if not copies:
            return  # not held (an engine hash re-stored with other content, removed twice)
        blocks.copies[key] = copies - 1
        if copies > 1:
            return
        if self._letting_go is not None:  # at the batch's end, unless stored again by then
            self._letting_go.append((worker, blocks, key))
        else:
            self._let_go(worker, blocks, key)

    def _let_go(self, worker: str, blocks: _WorkerBlocks, key: int) -> None:
        """``worker``'s last copy of ``key`` is gone."""
        del blocks.copies[key]
        unit = self._unit_of.get(key)
        if unit is not None:
            self.units.release(unit, worker)
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
