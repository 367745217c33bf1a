"""Units as the block index keeps them: blocks per worker, the home, the demand; a batch
applied whole (SGLang's node split), and the engines' clock rather than arrival order."""

from __future__ import annotations

import pytest

from shunter.kv_events.index import BlockIndex
from shunter.kv_events.units import DEMAND_HALF_LIFE_SECS
from shunter.kv_events.wire import AllBlocksCleared, BlockRemoved, BlockStored, Event

PROMPT = list(range(100, 112))  # three blocks of 4
EVERYONE = {"a", "b", "c"}


def chain(tokens: list[int], first_hash: int, parent: int | None = None) -> BlockStored:
    """One event storing ``tokens`` as consecutive blocks of 4, hashes from ``first_hash``."""
    count = len(tokens) // 4
    return BlockStored(tuple(range(first_hash, first_hash + count)), parent, tuple(tokens), 4)


def unit_of(index: BlockIndex, tokens: list[int]) -> int:
    unit = index.unit_of(tokens)
    assert unit is not None
    return unit


def test_units_count_each_workers_blocks_of_each_first_block_and_follow_removals() -> None:
    index = BlockIndex()
    other = list(range(500, 512))
    index.apply("a", chain(PROMPT, 1))
    index.apply("a", chain([*PROMPT[:4], 7, 7, 7, 7], 10))  # another turn, same unit
    index.apply("b", chain(PROMPT[:4], 50))
    index.apply("b", BlockStored((60,), 50, tuple(PROMPT[4:8]), 4))  # chained by parent
    index.apply("b", chain(other, 70))
    unit = unit_of(index, [*PROMPT, 1, 2])
    assert unit != index.unit_of(other)
    assert index.units.blocks == {unit: {"a": 4, "b": 2}, unit_of(index, other): {"b": 3}}
    version = index.version
    index.apply("b", BlockRemoved((60, 50)))
    assert index.units.blocks[unit] == {"a": 4} and index.version > version
    index.apply("a", AllBlocksCleared())
    assert index.units.blocks == {unit_of(index, other): {"b": 3}}
    index.drop("b")
    assert index.units.blocks == {} and index.unit_of([1, 2]) is None  # shorter than a block


def test_demand_counts_new_blocks_not_copies_and_halves_every_half_life() -> None:
    index = BlockIndex()
    index.apply("a", chain(PROMPT, 1), ts=1000.0)  # 3 blocks of 4 no worker held: 12 tokens
    index.apply("b", chain(PROMPT, 50), ts=1000.0)  # a copy: nothing new
    index.apply("b", chain([*PROMPT[:8], 9, 9, 9, 9], 60), ts=1000.0)  # one new block
    unit = unit_of(index, PROMPT)
    assert index.units.demand(unit, 1000.0) == pytest.approx(16)
    assert index.units.demand(unit, 1000.0 + DEMAND_HALF_LIFE_SECS) == pytest.approx(8)
    assert index.units.demand(unit, 999.0) == pytest.approx(16)  # a clock behind: no growth


def test_a_unit_is_forgotten_with_its_last_block_however_it_goes() -> None:
    index = BlockIndex()
    index.apply("a", chain(PROMPT, 1), ts=1000.0)
    unit = unit_of(index, PROMPT)
    index.apply("a", BlockRemoved((1, 2, 3)))  # evicted block by block
    assert index.units.demand(unit, 1000.0) == 0 and unit not in index.units.blocks
    index.apply("a", chain(PROMPT, 1), ts=1000.0)
    index.apply("b", chain(PROMPT, 50), ts=1000.0)
    index.apply("a", AllBlocksCleared())
    assert index.units.demand(unit, 1000.0) == pytest.approx(12)  # b still holds it
    index.drop("b")
    assert index.units.demand(unit, 1000.0) == 0


def test_the_home_is_the_worker_that_began_holding_the_unit_last_by_the_engines_clock() -> None:
    index = BlockIndex()
    index.apply("b", chain(PROMPT, 50), ts=2000.0)
    index.apply("a", chain(PROMPT, 1), ts=1000.0)  # heard later, stored earlier (a replay)
    unit = unit_of(index, PROMPT)
    assert index.units.newest(unit, EVERYONE) == "b"
    assert index.units.holders(unit, EVERYONE) == ["a", "b"]
    assert index.units.newest(unit, {"a", "c"}) == "a" and index.units.newest(unit, {"c"}) is None
    index.apply("b", BlockRemoved((50, 51, 52)))  # b evicts it, then holds it anew
    index.apply("b", chain(PROMPT, 50), ts=3000.0)
    assert index.units.holders(unit, EVERYONE) == ["a", "b"]
    index.apply("a", BlockRemoved((1, 2, 3)))
    index.apply("a", chain(PROMPT, 1), ts=4000.0)
    assert index.units.newest(unit, EVERYONE) == "a"


def test_a_node_split_in_one_batch_neither_moves_its_worker_nor_adds_demand() -> None:
    """SGLang splits a radix node by removing its pages and storing them again, in one
    batch: the worker never stopped holding them."""
    index = BlockIndex()
    index.apply("a", chain(PROMPT, 1), ts=1000.0)
    index.apply("b", chain(PROMPT, 50), ts=2000.0)
    unit = unit_of(index, PROMPT)
    split: list[Event] = [
        BlockRemoved((1, 2, 3)),
        chain(PROMPT[:4], 1),
        BlockStored((2, 3), 1, tuple(PROMPT[4:]), 4),
    ]
    index.apply_batch("a", split, ts=3000.0)
    assert index.units.holders(unit, EVERYONE) == ["a", "b"]  # a is still the older holder
    assert index.units.demand(unit, 1000.0) == pytest.approx(12)
    assert index.longest_prefix(PROMPT) == {"a": 12, "b": 12}
    index.apply_batch("a", [BlockRemoved((1, 2, 3))], ts=4000.0)  # gone for good this time
    assert index.units.holders(unit, EVERYONE) == ["b"] and index.longest_prefix(PROMPT) == {
        "b": 12
    }
