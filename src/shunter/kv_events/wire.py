"""KV-cache event messages as SGLang and vLLM send them, decoded into plain values.

A live message is three frames: topic, sequence number (8 bytes, big-endian, unsigned) and
a msgpack payload ``[ts, events, dp_rank]`` (very old publishers send two elements; one vLLM
tree sent a map envelope, accepted too). Events come in two eras: tagged arrays
(``["BlockStored", hashes, parent, token_ids, block_size, ...]``, fields by position, every
declared field present) and tagged maps (``{"type": "BlockStored", ...}``, defaulted fields
left out). Fields appended by newer engines are ignored; missing trailing ones read as nil.

Hashes are normalised to unsigned 64-bit: an int is masked (SGLang's negative int64 and
vLLM's uint64 meet), bytes (vLLM without int hashes) keep their last 8 bytes. They are
handles only: the index keys blocks by their token ids.

Malformed input never raises past ``decode_message``: a message that is not three frames
with an 8-byte seq, or whose payload is not a batch, raises ``WireError`` (the subscriber
counts it and treats the batch as lost); a malformed *event* inside a good batch is skipped
and counted in ``Batch.skipped``, so one bad event does not cost the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

U64 = 0xFFFF_FFFF_FFFF_FFFF
END_SEQ = b"\xff" * 8

# Positions of the array era (vLLM and SGLang agree on the first ones).
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id")
_STORED_MEDIUM = 6
_REMOVED_MEDIUM = 2


class WireError(ValueError):
    """A message or payload that is not a KV event batch."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent: int | None
    token_ids: tuple[Any, ...]  # ints; SGLang EAGLE pages carry (int, int) pairs
    block_size: int
    medium: str | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: str | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class Batch:
    seq: int
    ts: float
    events: tuple[Event, ...]
    dp_rank: int | None
    skipped: int = 0  # malformed or unknown events left out
    topic: bytes = b""


def decode_message(frames: Sequence[bytes]) -> Batch:
    """A live message (three frames) as a batch; ``WireError`` if it is not one."""
    if len(frames) != 3:
        raise WireError(f"expected 3 frames, got {len(frames)}")
    topic, seq, payload = frames
    return decode_payload(parse_seq(seq), payload, bytes(topic))


def parse_seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise WireError(f"sequence frame of {len(frame)} bytes, expected 8")
    return int.from_bytes(frame, "big")


def decode_payload(seq: int, payload: bytes, topic: bytes = b"") -> Batch:
    try:
        value = msgspec.msgpack.decode(payload)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise WireError(f"payload is not msgpack: {exc}") from None
    if isinstance(value, dict):
        ts, raw_events, rank = (
            value.get("ts"),
            value.get("events"),
            value.get("data_parallel_rank", value.get("attn_dp_rank")),
        )
    elif isinstance(value, list) and len(value) >= 2:
        ts, raw_events, rank = value[0], value[1], value[2] if len(value) > 2 else None
    else:
        raise WireError("payload is not a [ts, events, dp_rank] batch")
    if not isinstance(raw_events, list):
        raise WireError("the batch's events are not an array")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise WireError("the batch's timestamp is not a number")
    events: list[Event] = []
    skipped = 0
    for raw in raw_events:
        event = decode_event(raw)
        if event is None:
            skipped += 1
        else:
            events.append(event)
    dp_rank = rank if isinstance(rank, int) and not isinstance(rank, bool) else None
    return Batch(seq, float(ts), tuple(events), dp_rank, skipped, topic)


def decode_event(raw: Any) -> Event | None:
    """One event of either era; None if it is malformed or of an unknown type."""
    if isinstance(raw, list) and raw:
        tag = raw[0]
        fields = _array_fields(tag, raw)
    elif isinstance(raw, dict):
        tag = raw.get("type")
        fields = raw
    else:
        return None
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    if fields is None:
        return None
    hashes = _hashes(fields.get("block_hashes"))
    if hashes is None:
        return None
    medium = fields.get("medium")
    medium = medium if isinstance(medium, str) else None
    if tag == "BlockRemoved":
        return BlockRemoved(hashes, medium)
    parent_raw = fields.get("parent_block_hash")
    parent = None if parent_raw is None else normalise_hash(parent_raw)
    tokens = _tokens(fields.get("token_ids"))
    size = fields.get("block_size")
    if tokens is None or (parent_raw is not None and parent is None):
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        return None
    return BlockStored(hashes, parent, tokens, size, medium)


def _array_fields(tag: Any, raw: list[Any]) -> dict[str, Any] | None:
    if tag == "BlockStored":
        named = dict(zip(_STORED_FIELDS, raw[1:], strict=False))
        if len(raw) > _STORED_MEDIUM:
            named["medium"] = raw[_STORED_MEDIUM]
        return named
    if tag == "BlockRemoved":
        named = {"block_hashes": raw[1] if len(raw) > 1 else None}
        if len(raw) > _REMOVED_MEDIUM:
            named["medium"] = raw[_REMOVED_MEDIUM]
        return named
    return None


def normalise_hash(value: Any) -> int | None:
    """An engine hash as an unsigned 64-bit int; None if it is neither int nor bytes."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value & U64
    if isinstance(value, bytes) and value:
        return int.from_bytes(value[-8:], "big")
    return None


def _hashes(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, list) or not value:
        return None
    hashes = tuple(normalise_hash(v) for v in value)
    if None in hashes:
        return None
    return hashes  # type: ignore[return-value]  # no None left


def _tokens(value: Any) -> tuple[Any, ...] | None:
    """Token ids: ints, or (int, int) pairs (SGLang EAGLE bigram pages)."""
    if not isinstance(value, list):
        return None
    out: list[Any] = []
    for token in value:
        if isinstance(token, int) and not isinstance(token, bool):
            out.append(token)
        elif (
            isinstance(token, list)
            and len(token) == 2
            and all(isinstance(t, int) and not isinstance(t, bool) for t in token)
        ):
            out.append((token[0], token[1]))
        else:
            return None
    return tuple(out)
