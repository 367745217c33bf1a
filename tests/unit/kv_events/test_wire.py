"""Decoding KV event batches of every era, and refusing what is not one."""

from __future__ import annotations

import msgspec
import pytest

from shunter.kv_events.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    WireError,
    decode_message,
    decode_payload,
)

# The reference's byte-level sample: one 4-token block, hash 0x1122334455667788, no parent,
# ts 1.5, DP rank 0, as vLLM sends it in the array era (12 positions) ...
ARRAY_ERA = bytes.fromhex(
    "93cb3ff8000000000000919c"
    "ab426c6f636b53746f726564"
    "91cf1122334455667788"
    "c0"
    "9401020304"
    "04"
    "c0"
    "a3475055"
    "c0"
    "c0c0c0c0"
    "00"
)
# ... and in the map era (v0.26: 11 keys, the sliding window left out).
MAP_ERA = msgspec.msgpack.encode(
    [
        1.5,
        [
            {
                "type": "BlockStored",
                "block_hashes": [0x1122334455667788],
                "parent_block_hash": None,
                "token_ids": [1, 2, 3, 4],
                "block_size": 4,
                "lora_id": None,
                "medium": "GPU",
                "lora_name": None,
                "extra_keys": [None],
                "group_idx": 0,
                "kv_cache_spec_kind": "full_attention",
            }
        ],
        0,
    ]
)
SAMPLE = BlockStored((0x1122334455667788,), None, (1, 2, 3, 4), 4, "GPU")


def test_the_reference_array_era_bytes_decode() -> None:
    batch = decode_message([b"kv", (42).to_bytes(8, "big"), ARRAY_ERA])
    assert (batch.topic, batch.seq, batch.ts, batch.dp_rank) == (b"kv", 42, 1.5, 0)
    assert batch.events == (SAMPLE,) and batch.skipped == 0


def test_the_map_era_decodes_to_the_same_event() -> None:
    assert decode_payload(0, MAP_ERA).events == (SAMPLE,)


def test_sglang_arrays_with_negative_hashes_and_old_short_shapes() -> None:
    payload = msgspec.msgpack.encode(
        [
            2.0,
            [
                ["BlockStored", [-2], -1, [7, 8], 2, None, "GPU"],
                ["BlockStored", [5], None, [1, 2], 2, None],  # older: no medium
                ["BlockStored", [6], None, [[1, 2], [3, 4]], 2, None, "GPU", {"cache_salt": "s"}],
                ["BlockRemoved", [-2], "GPU"],
                ["BlockRemoved", [5]],
                ["AllBlocksCleared"],
            ],
        ]  # a two-element envelope, as the oldest publishers sent
    )
    batch = decode_payload(3, payload)
    u64 = 2**64
    assert batch.dp_rank is None
    assert batch.events == (
        BlockStored((u64 - 2,), u64 - 1, (7, 8), 2, "GPU"),
        BlockStored((5,), None, (1, 2), 2, None),
        BlockStored((6,), None, ((1, 2), (3, 4)), 2, "GPU"),
        BlockRemoved((u64 - 2,), "GPU"),
        BlockRemoved((5,), None),
        AllBlocksCleared(),
    )


def test_maps_with_unknown_keys_bytes_hashes_and_a_map_envelope() -> None:
    digest = bytes(range(32))
    payload = msgspec.msgpack.encode(
        {
            "ts": 1.0,
            "data_parallel_rank": 1,
            "events": [
                {
                    "type": "BlockStored",
                    "block_hashes": [digest],
                    "parent_block_hash": None,
                    "token_ids": [1],
                    "block_size": 1,
                    "locality": "LOCAL",
                },
                {"type": "BlockRemoved", "block_hashes": [digest], "medium": "CPU"},
                {"type": "AllBlocksCleared", "session_id": "x"},
            ],
        }
    )
    batch = decode_payload(0, payload)
    handle = int.from_bytes(digest[-8:], "big")
    assert batch.dp_rank == 1
    assert batch.events == (
        BlockStored((handle,), None, (1,), 1, None),
        BlockRemoved((handle,), "CPU"),
        AllBlocksCleared(),
    )


def test_bad_events_are_skipped_and_counted_and_the_rest_kept() -> None:
    payload = msgspec.msgpack.encode(
        [
            1.0,
            [
                ["NewKindOfEvent", 1],
                ["BlockStored", [], None, [1], 1],  # no hash
                ["BlockStored", ["x"], None, [1], 1],  # a hash that is not one
                ["BlockStored", [1], None, "tokens", 1],
                ["BlockStored", [1], None, [1], 0],  # block size 0
                ["BlockStored", [1], None, [1, 2.5], 1],
                {"block_hashes": [1]},  # no type
                "BlockRemoved",
                ["BlockRemoved"],
                ["AllBlocksCleared"],
            ],
            0,
        ]
    )
    batch = decode_payload(0, payload)
    assert batch.events == (AllBlocksCleared(),) and batch.skipped == 9


@pytest.mark.parametrize(
    "frames",
    [
        [b"", (0).to_bytes(8, "big")],  # two frames
        [b"", b"\x00" * 4, msgspec.msgpack.encode([1.0, [], 0])],  # a 4-byte seq
        [b"", (0).to_bytes(8, "big"), b"\xc1"],  # not msgpack
        [b"", (0).to_bytes(8, "big"), msgspec.msgpack.encode([1.0])],  # too short
        [b"", (0).to_bytes(8, "big"), msgspec.msgpack.encode([1.0, "events", 0])],
        [b"", (0).to_bytes(8, "big"), msgspec.msgpack.encode(["now", [], 0])],
        [b"", (0).to_bytes(8, "big"), msgspec.msgpack.encode(7)],
        [b"", (0).to_bytes(8, "big"), b"\x91" * 5000 + b"\xc0"],  # nested too deep
    ],
)
def test_a_message_that_is_no_batch_is_refused(frames: list[bytes]) -> None:
    with pytest.raises(WireError):
        decode_message(frames)
