"""The sim publishes its prefix cache's KV events as SGLang (and vLLM) do: three frames,
big-endian seq from 0, ``[ts, events, dp_rank]``; replay on a ROUTER with the end marker."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio

from shunter.sim.config import SimConfig
from shunter.sim.engine import Engine, Generation
from shunter.sim.kv_events import KvEventPublisher
from shunter.tokenizer.words import text_ids

from support.harness import free_port

END = b"\xff" * 8


async def _run(engine: Engine, prompt: str) -> None:
    async for _ in engine.run(Generation(prompt.split(), 1)):
        pass


@pytest.fixture
async def context() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


async def _engine(fmt: str = "sglang", replay: bool = True, **extra: Any) -> Engine:
    config = SimConfig(
        ttft_ms=0,
        itl_ms=0,
        prefill_us_per_token=0,
        block_size=4,
        kv_events_endpoint=f"tcp://127.0.0.1:{free_port()}",
        kv_events_replay_endpoint=f"tcp://127.0.0.1:{free_port()}" if replay else None,
        kv_events_format=fmt,
        **extra,
    )
    engine = Engine(config)
    assert engine.kv_events is not None
    await engine.kv_events.start()
    return engine


async def _subscribed(
    ctx: zmq.asyncio.Context, engine: Engine, poke: Callable[[], None]
) -> zmq.asyncio.Socket:
    """A SUB that receives: poke the publisher until a message arrives (ZMQ's slow joiner
    drops what is published before the subscription reaches the PUB), then drain."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    assert engine.config.kv_events_endpoint is not None
    sub.connect(engine.config.kv_events_endpoint)
    for _ in range(200):
        poke()
        if await sub.poll(20):
            while await sub.poll(20):
                await sub.recv_multipart()
            return sub
    raise AssertionError("the subscription never took")


async def test_sglang_stores_one_page_per_event_with_chained_signed_hashes(
    context: zmq.asyncio.Context,
) -> None:
    engine = await _engine()
    try:
        sub = await _subscribed(context, engine, engine.cache.flush)
        first = engine.kv_events.seq if engine.kv_events else 0
        await _run(engine, "a b c d e f g h i")  # two full blocks of 4, one partial token
        topic, seq, payload = await asyncio.wait_for(sub.recv_multipart(), 5)
        assert topic == f"kv@{engine.config.name}@sim-model".encode()
        assert seq == first.to_bytes(8, "big")
        ts, events, rank = msgspec.msgpack.decode(payload)
        assert isinstance(ts, float) and rank == 0
        ids = text_ids("a b c d e f g h")
        digest0 = hashlib.sha256(b"".join(i.to_bytes(4, "little") for i in ids[:4])).digest()
        digest1 = hashlib.sha256(
            digest0 + b"".join(i.to_bytes(4, "little") for i in ids[4:])
        ).digest()
        h0 = int.from_bytes(digest0[:8], "big", signed=True)
        h1 = int.from_bytes(digest1[:8], "big", signed=True)
        assert events == [
            ["BlockStored", [h0], None, ids[:4], 4, None, "GPU"],
            ["BlockStored", [h1], h0, ids[4:], 4, None, "GPU"],
        ]
        await _run(engine, "a b c d e f g h j k")  # a hit: nothing new to announce
        await _run(engine, "a b c d x y z w")  # one new block after the shared one
        _, seq, payload = await asyncio.wait_for(sub.recv_multipart(), 5)
        assert int.from_bytes(seq, "big") == first + 1
        (event,) = msgspec.msgpack.decode(payload)[1]
        assert event[0] == "BlockStored" and event[2] == h0 and event[3] == text_ids("x y z w")
        engine.cache.flush()
        _, seq, payload = await asyncio.wait_for(sub.recv_multipart(), 5)
        assert msgspec.msgpack.decode(payload)[1] == [["AllBlocksCleared"]]
    finally:
        assert engine.kv_events is not None
        await engine.kv_events.stop()


async def test_eviction_publishes_one_removal_per_block(context: zmq.asyncio.Context) -> None:
    engine = await _engine(cache_tokens=8)  # room for two blocks of 4
    try:
        sub = await _subscribed(context, engine, engine.cache.flush)
        await _run(engine, "a b c d e f g h")
        stored = msgspec.msgpack.decode((await sub.recv_multipart())[2])[1]
        await _run(engine, "p q r s")
        events = msgspec.msgpack.decode((await sub.recv_multipart())[2])[1]
        assert [e[0] for e in events] == ["BlockStored", "BlockRemoved"]
        assert events[1] == ["BlockRemoved", stored[0][1], "GPU"]  # the LRU block went
    finally:
        assert engine.kv_events is not None
        await engine.kv_events.stop()


async def test_vllm_format_sends_maps_one_event_per_run_with_unsigned_hashes(
    context: zmq.asyncio.Context,
) -> None:
    engine = await _engine("vllm")
    try:
        sub = await _subscribed(context, engine, engine.cache.flush)
        await _run(engine, "a b c d e f g h")
        (event,) = msgspec.msgpack.decode((await sub.recv_multipart())[2])[1]
        assert event["type"] == "BlockStored" and event["parent_block_hash"] is None
        assert len(event["block_hashes"]) == 2 and min(event["block_hashes"]) >= 0
        assert event["token_ids"] == text_ids("a b c d e f g h")
        assert event["block_size"] == 4 and event["medium"] == "GPU"
    finally:
        assert engine.kv_events is not None
        await engine.kv_events.stop()


async def _replay(ctx: zmq.asyncio.Context, endpoint: str, start: int) -> list[list[bytes]]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    await dealer.send_multipart([b"", start.to_bytes(8, "big")])
    replies = []
    while True:
        frames = await asyncio.wait_for(dealer.recv_multipart(), 5)
        replies.append(frames)
        if frames[-1] == b"":
            break
    dealer.close(linger=0)
    return replies


@pytest.mark.parametrize("fmt", ["sglang", "vllm"])
async def test_replay_answers_buffered_batches_then_the_end_marker(
    context: zmq.asyncio.Context, fmt: str
) -> None:
    engine = await _engine(fmt)
    publisher = engine.kv_events
    assert publisher is not None and engine.config.kv_events_replay_endpoint
    try:
        sub = await _subscribed(context, engine, engine.cache.flush)
        await _run(engine, "a b c d")
        await _run(engine, "e f g h")
        await sub.recv_multipart()
        await sub.recv_multipart()
        last = publisher.seq - 1
        replies = await _replay(context, engine.config.kv_events_replay_endpoint, last - 1)
        topic = [publisher.topic] if fmt == "vllm" else []  # vLLM >= v0.26 adds the topic
        assert replies[-1] == [b"", *topic, END, b""]
        assert [r[:-1] for r in replies[:-1]] == [
            [b"", *topic, (last - 1).to_bytes(8, "big")],
            [b"", *topic, last.to_bytes(8, "big")],
        ]
        assert replies[1][-1] == publisher.buffer[-1][1]  # the same bytes as sent live
        assert await _replay(context, engine.config.kv_events_replay_endpoint, last + 5) == [
            [b"", *topic, END, b""]
        ]
    finally:
        await publisher.stop()


async def test_a_dropped_batch_keeps_its_seq_and_stays_replayable(
    context: zmq.asyncio.Context,
) -> None:
    engine = await _engine()
    publisher = engine.kv_events
    assert publisher is not None
    try:
        sub = await _subscribed(context, engine, engine.cache.flush)
        engine.config.faults.kv_events_drop_batches = 1
        await _run(engine, "a b c d")
        await _run(engine, "e f g h")
        _, seq, _ = await asyncio.wait_for(sub.recv_multipart(), 5)
        assert int.from_bytes(seq, "big") == publisher.seq - 1  # the one before was dropped
        assert publisher.buffer[-2][0] == publisher.seq - 2
    finally:
        await publisher.stop()


async def test_vllm_format_removals_and_clears(context: zmq.asyncio.Context) -> None:
    engine = await _engine("vllm", cache_tokens=4)  # one block
    publisher = engine.kv_events
    assert publisher is not None
    try:
        sub = await _subscribed(context, engine, engine.cache.flush)
        await _run(engine, "a b c d")
        await _run(engine, "e f g h")
        await sub.recv_multipart()
        events = msgspec.msgpack.decode((await sub.recv_multipart())[2])[1]
        assert [e["type"] for e in events] == ["BlockStored", "BlockRemoved"]
        assert events[1]["medium"] == "GPU"
        engine.cache.flush()
        assert msgspec.msgpack.decode((await sub.recv_multipart())[2])[1] == [
            {"type": "AllBlocksCleared"}
        ]
    finally:
        await publisher.stop()


async def test_a_replay_request_of_the_wrong_shape_is_ignored(
    context: zmq.asyncio.Context,
) -> None:
    engine = await _engine()
    publisher = engine.kv_events
    assert publisher is not None and engine.config.kv_events_replay_endpoint
    try:
        dealer = context.socket(zmq.DEALER)
        dealer.connect(engine.config.kv_events_replay_endpoint)
        await dealer.send_multipart([(0).to_bytes(8, "big")])  # no delimiter: ignored
        await dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        assert await asyncio.wait_for(dealer.recv_multipart(), 5) == [b"", END, b""]
        dealer.close(linger=0)
    finally:
        await publisher.stop()


async def test_an_endpoint_in_use_fails_the_start_with_an_oserror() -> None:
    engine = await _engine(replay=False)
    assert engine.kv_events is not None
    try:
        other = KvEventPublisher(engine.kv_events.endpoint)
        with pytest.raises(OSError, match="kv events endpoint"):
            await other.start()
        with pytest.raises(ValueError, match="format"):
            KvEventPublisher("tcp://127.0.0.1:1", fmt="json")
    finally:
        await engine.kv_events.stop()
