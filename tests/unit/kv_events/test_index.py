"""The block index: stores, removals, clears, copies, unknown parents, longest prefix."""

from __future__ import annotations

from shunter.kv_events.index import BlockIndex, KvIndex
from shunter.kv_events.wire import AllBlocksCleared, BlockRemoved, BlockStored


def _chain(tokens: list[int], size: int, first_hash: int, parent: int | None = None) -> BlockStored:
    """One vLLM-style event storing ``tokens`` as consecutive blocks with hashes from
    ``first_hash`` on."""
    count = len(tokens) // size
    return BlockStored(tuple(range(first_hash, first_hash + count)), parent, tuple(tokens), size)


PROMPT = list(range(100, 112))  # three blocks of 4


def test_longest_prefix_counts_consecutive_blocks_from_the_start() -> None:
    index = BlockIndex()
    index.apply("a", _chain(PROMPT, 4, 1))  # all three blocks
    index.apply("b", _chain(PROMPT[:4], 4, 50))  # only the first
    assert index.longest_prefix([*PROMPT, 999]) == {"a": 12, "b": 4}
    assert index.longest_prefix(PROMPT[:7]) == {"a": 4, "b": 4}  # partial blocks never match
    assert index.longest_prefix([0, *PROMPT]) == {}


def test_pages_chained_by_parent_hash_match_like_one_run() -> None:
    index = BlockIndex()
    index.apply("a", BlockStored((-1 & (2**64 - 1),), None, tuple(PROMPT[:4]), 4))
    index.apply("a", BlockStored((7,), 2**64 - 1, tuple(PROMPT[4:8]), 4))
    assert index.longest_prefix(PROMPT) == {"a": 8}


def test_a_block_after_a_miss_is_worth_nothing() -> None:
    index = BlockIndex()
    index.apply("a", _chain(PROMPT, 4, 1))
    index.apply("a", BlockRemoved((1,)))  # the first block went
    assert index.longest_prefix(PROMPT) == {}
    assert index.counters.removed_blocks == 1


def test_a_store_with_an_unknown_parent_is_skipped_and_counted() -> None:
    index = BlockIndex()
    index.apply("a", BlockStored((9,), 12345, tuple(PROMPT[4:8]), 4))
    assert index.counters.unknown_parent == 1 and index.blocks_of("a") == 0
    # Not placed at position 0: a request starting with those tokens does not match.
    assert index.longest_prefix(PROMPT[4:8]) == {}


def test_copies_are_counted_so_a_second_copy_survives_one_removal() -> None:
    index = BlockIndex()
    index.apply("a", _chain(PROMPT[:4], 4, 1))
    index.apply("a", _chain(PROMPT[:4], 4, 1))  # vLLM: the same block cached twice
    index.apply("a", BlockRemoved((1,)))
    assert index.longest_prefix(PROMPT) == {"a": 4}
    index.apply("a", BlockRemoved((1,)))
    assert index.longest_prefix(PROMPT) == {}
    index.apply("a", BlockRemoved((1,)))  # once more: never stored any longer
    assert index.counters.unknown_removal == 1


def test_a_split_removing_and_restoring_in_order_keeps_the_block() -> None:
    index = BlockIndex()
    index.apply("a", _chain(PROMPT[:4], 4, 1))
    for event in (BlockRemoved((1,)), _chain(PROMPT[:4], 4, 1)):  # SGLang's node split
        index.apply("a", event)
    assert index.longest_prefix(PROMPT) == {"a": 4}


def test_clear_and_drop_forget_only_that_worker() -> None:
    index = BlockIndex()
    index.apply("a", _chain(PROMPT, 4, 1))
    index.apply("b", _chain(PROMPT, 4, 1))  # the same hashes on another engine
    index.apply("a", AllBlocksCleared())
    assert index.longest_prefix(PROMPT) == {"b": 12}
    index.drop("b")
    assert index.longest_prefix(PROMPT) == {} and not index.holders


def test_inconsistent_token_counts_keep_the_blocks_the_tokens_describe() -> None:
    index = BlockIndex()
    index.apply("a", BlockStored((1, 2, 3), None, tuple(PROMPT[:6]), 4))  # 6 tokens, 3 hashes
    assert index.counters.inconsistent == 1
    assert index.longest_prefix(PROMPT) == {"a": 4}
    index.apply("a", BlockStored((4,), 3, tuple(PROMPT[8:12]), 4))  # parent 3 never indexed
    assert index.counters.unknown_parent == 1


def test_other_tiers_are_not_indexed() -> None:
    index = BlockIndex()
    index.apply("a", BlockStored((1,), None, tuple(PROMPT[:4]), 4, "CPU"))
    assert index.longest_prefix(PROMPT) == {} and index.counters.other_tier == 1


def test_workers_of_different_block_sizes_are_scored_in_tokens() -> None:
    index = BlockIndex()
    index.apply("a", _chain(PROMPT, 4, 1))
    index.apply("b", _chain(PROMPT[:8], 8, 1))
    assert index.longest_prefix(PROMPT) == {"a": 12, "b": 8}


def test_models_are_separate_and_a_leaving_worker_is_dropped_everywhere() -> None:
    index = KvIndex()
    index.of("m1").apply("a", _chain(PROMPT, 4, 1))
    assert index.longest_prefix("m2", PROMPT) == {}
    assert index.longest_prefix("m1", PROMPT) == {"a": 12}
    index.drop_worker("a")
    assert index.longest_prefix("m1", PROMPT) == {}
