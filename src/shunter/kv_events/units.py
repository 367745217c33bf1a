"""Units: the prompts sharing their first block, as precise rebalancing weighs and moves them.

A unit is keyed by its run's first block (``index.py``): a chat template's start and the
first words of a system prompt, so with many system prompts a unit is one system prompt and
its conversations. ``policies/engine_plans.py`` reads three things of each, and every
gateway reading the same engines' events must read the same three:

- **Which workers hold it, and how much** (``blocks``): the blocks each holds of it.
- **Its home** (``newest``): of the workers holding it, the one that began holding it last,
  by the engine's own clock (the batch's ``ts``), ties by URL. Requests between engines
  holding a prompt alike go there (``cache_aware``), so a prompt placed on two engines at
  once, or moved, gathers onto one. The engine's clock, not arrival order: a gateway that
  joined late and replayed the stream, or heard two engines' stores in the other order
  (their events arrive on separate sockets), still picks the same home.
- **Its demand** (``demand``): the tokens of it stored new (in blocks no worker held until
  then), halving every ``DEMAND_HALF_LIFE_SECS`` by the engine's clock: the prompt's text
  and the new text its requests brought lately, anywhere in the fleet. Rebalancing weighs
  this, not the blocks held: an engine's cache fills up, and then every engine holds about
  as many blocks as any other however many prompts it serves (8 sims with caches of 175
  blocks, 5 prompts on one and 3 on another: both held ~175, and the plan saw nothing to
  move). A copy stored on a second engine is not new, so a move adds nothing to its unit's
  demand.

A unit is forgotten, demand and all, when no worker holds any block of it.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import NamedTuple

DEMAND_HALF_LIFE_SECS = 60.0


class EngineUnit(NamedTuple):
    """A unit as the plan reads it: its key; the workers holding it, its home last; its
    demand; and the tokens its home holds of it (what a move of it brings its target)."""

    key: int
    holders: tuple[str, ...]
    demand: float
    tokens: int


class Units:
    """One model's units (``BlockIndex.units``), kept up to date block by block."""

    def __init__(self) -> None:
        self.blocks: dict[int, dict[str, int]] = {}  # unit -> worker -> blocks it holds of it
        self._began: dict[int, dict[str, float]] = {}  # unit -> worker -> when it began holding
        self._demand: dict[int, tuple[float, float]] = {}  # unit -> (demand, as of when)
        self.version = 0  # bumped whenever a worker's blocks of a unit change

    def __len__(self) -> int:
        return len(self.blocks)

    def hold(self, unit: int, worker: str, ts: float) -> None:
        """``worker`` holds one more block of ``unit`` (stored at ``ts``)."""
        held = self.blocks.setdefault(unit, {})
        count = held.get(worker, 0)
        held[worker] = count + 1
        if not count:
            self._began.setdefault(unit, {})[worker] = ts
        self.version += 1

    def release(self, unit: int, worker: str) -> None:
        """``worker`` holds one block of ``unit`` less."""
        held = self.blocks.get(unit)
        if held is None or worker not in held:
            return
        held[worker] -= 1
        if not held[worker]:
            self._lose(unit, worker)
        self.version += 1

    def drop(self, worker: str) -> None:
        """``worker`` holds nothing any more (a clear, a resync, the worker leaving)."""
        for unit in [u for u, held in self.blocks.items() if worker in held]:
            self._lose(unit, worker)
        self.version += 1

    def stored_new(self, unit: int, tokens: int, ts: float) -> None:
        """``tokens`` of ``unit`` were stored in blocks no worker held (at ``ts``)."""
        self._demand[unit] = (self.demand(unit, ts) + tokens, ts)

    def demand(self, unit: int, now: float) -> float:
        """``unit``'s demand as of ``now`` (the engines' clock, seconds since the epoch)."""
        value, since = self._demand.get(unit, (0.0, now))
        return value * math.exp2(min(0.0, since - now) / DEMAND_HALF_LIFE_SECS)

    def holders(self, unit: int, among: Collection[str]) -> list[str]:
        """The workers in ``among`` holding ``unit``, the one that began holding it first
        first and its home last (ties by URL)."""
        began = self._began.get(unit, {})
        return sorted((url for url in began if url in among), key=lambda u: (began[u], u))

    def newest(self, unit: int, among: Collection[str]) -> str | None:
        """``unit``'s home among ``among``: the worker that began holding it last (None:
        none of them holds it)."""
        began = self._began.get(unit, {})
        return max((u for u in began if u in among), key=lambda u: (began[u], u), default=None)

    def _lose(self, unit: int, worker: str) -> None:
        """``worker`` holds no block of ``unit`` any more: the unit is forgotten, demand and
        all, once no worker does."""
        held = self.blocks[unit]
        del held[worker]
        del self._began[unit][worker]
        if not held:
            del self.blocks[unit]
            del self._began[unit]
            self._demand.pop(unit, None)
