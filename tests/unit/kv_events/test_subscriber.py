"""The subscriber against a real PUB and replay ROUTER made in the test: in-order apply,
gaps repaired by replay, resync without one, publisher restarts, malformed messages."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio

from shunter.kv_events.index import BlockIndex
from shunter.kv_events.subscriber import Subscriber

from support.harness import free_port

END = b"\xff" * 8
PROMPT = list(range(1, 13))


def _stored(hash_: int, parent: int | None, tokens: list[int]) -> list[Any]:
    return ["BlockStored", [hash_], parent, tokens, 4, None, "GPU"]


class Publisher:
    """An engine's two sockets: batches are numbered, buffered, and sent live unless
    told not to; replays answer SGLang's shape."""

    def __init__(self, context: zmq.asyncio.Context, replay: bool = True) -> None:
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.replay_endpoint = f"tcp://127.0.0.1:{free_port()}" if replay else None
        self.pub = context.socket(zmq.PUB)
        self.pub.bind(self.endpoint)
        self.router: zmq.asyncio.Socket | None = None
        self.task: asyncio.Task[None] | None = None
        if self.replay_endpoint:
            self.router = context.socket(zmq.ROUTER)
            self.router.bind(self.replay_endpoint)
            self.task = asyncio.create_task(self._serve())
        self.seq = 0
        self.buffer: list[tuple[int, bytes]] = []
        self.replay_requests: list[int] = []

    async def publish(self, events: list[Any], live: bool = True) -> int:
        seq = self.seq
        self.seq += 1
        payload = msgspec.msgpack.encode([time.time(), events, 0])
        self.buffer.append((seq, payload))
        if live:
            await self.pub.send_multipart([b"kv@w@m", seq.to_bytes(8, "big"), payload])
        return seq

    async def send_raw(self, frames: list[bytes]) -> None:
        await self.pub.send_multipart(frames)

    async def _serve(self) -> None:
        assert self.router is not None
        while True:
            identity, _, start = await self.router.recv_multipart()
            first = int.from_bytes(start, "big")
            self.replay_requests.append(first)
            for seq, payload in self.buffer:
                if seq >= first:
                    await self.router.send_multipart(
                        [identity, b"", seq.to_bytes(8, "big"), payload]
                    )
            await self.router.send_multipart([identity, b"", END, b""])

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        for socket in (self.pub, self.router):
            if socket is not None:
                socket.close(linger=0)


async def until(predicate: Callable[[], bool], what: str = "condition") -> None:
    deadline = time.monotonic() + 5
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@pytest.fixture
async def context() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


async def _connected(
    context: zmq.asyncio.Context, publisher: Publisher, index: BlockIndex, **options: Any
) -> Subscriber:
    """A subscriber that has received batch 0 (sent until it arrives: the SUB misses what is
    published before its subscription reaches the PUB, and resends of seq 0 are duplicates)."""
    subscriber = Subscriber(
        "w", publisher.endpoint, index, context, publisher.replay_endpoint, **options
    )
    subscriber.start()
    payload = msgspec.msgpack.encode([time.time(), [_stored(100, None, PROMPT[:4])], 0])
    publisher.buffer.append((0, payload))
    publisher.seq = 1
    deadline = time.monotonic() + 5
    while subscriber.counters.batches == 0:
        assert time.monotonic() < deadline, "the subscription never took"
        await publisher.send_raw([b"kv@w@m", (0).to_bytes(8, "big"), payload])
        await asyncio.sleep(0.01)
    return subscriber


async def test_batches_apply_in_order_and_a_gap_is_replayed(context: zmq.asyncio.Context) -> None:
    publisher = Publisher(context)
    index = BlockIndex()
    subscriber = await _connected(context, publisher, index)
    try:
        assert index.longest_prefix(PROMPT) == {"w": 4}
        await publisher.publish([_stored(101, 100, PROMPT[4:8])], live=False)  # lost live
        await publisher.publish([_stored(102, 101, PROMPT[8:12])])
        await until(lambda: subscriber.last_seq == 2, "the gap repaired")
        assert publisher.replay_requests == [1]
        assert subscriber.counters.gaps == 1 and subscriber.counters.replayed_batches >= 1
        assert subscriber.counters.resyncs == 0
        assert index.longest_prefix(PROMPT) == {"w": 12}
    finally:
        await subscriber.close()
        await publisher.close()
    assert index.longest_prefix(PROMPT) == {}  # closing forgets the worker


async def test_a_gap_without_replay_resyncs_the_worker(context: zmq.asyncio.Context) -> None:
    publisher = Publisher(context, replay=False)
    index = BlockIndex()
    subscriber = await _connected(context, publisher, index)
    try:
        await publisher.publish([["BlockRemoved", [100], "GPU"]], live=False)  # lost
        await publisher.publish([_stored(200, None, [9, 9, 9, 9])])
        await until(lambda: subscriber.last_seq == 2, "the batch after the gap")
        assert subscriber.counters.gaps == 1 and subscriber.counters.resyncs == 1
        # The lost removal cannot leave a stale block: the worker's old blocks are gone.
        assert index.longest_prefix(PROMPT) == {}
        assert index.longest_prefix([9, 9, 9, 9]) == {"w": 4}
    finally:
        await subscriber.close()
        await publisher.close()


async def test_a_replay_that_cannot_fill_the_gap_resyncs(context: zmq.asyncio.Context) -> None:
    publisher = Publisher(context)
    index = BlockIndex()
    subscriber = await _connected(context, publisher, index)
    try:
        await publisher.publish([["BlockRemoved", [100], "GPU"]], live=False)
        publisher.buffer.pop()  # the buffer no longer holds it
        await publisher.publish([_stored(200, None, [9, 9, 9, 9])])
        await until(lambda: subscriber.last_seq == 2, "the batch after the gap")
        assert subscriber.counters.replay_failures == 1 and subscriber.counters.resyncs == 1
        assert index.longest_prefix(PROMPT) == {}
    finally:
        await subscriber.close()
        await publisher.close()


async def test_a_publisher_restart_drops_the_worker_and_starts_over(
    context: zmq.asyncio.Context,
) -> None:
    publisher = Publisher(context)
    index = BlockIndex()
    subscriber = await _connected(context, publisher, index)
    try:
        await publisher.publish([_stored(101, 100, PROMPT[4:8])])
        await until(lambda: subscriber.last_seq == 1)
        publisher.seq, publisher.buffer = 0, []  # the engine restarted: seq 0, empty cache
        await publisher.publish([_stored(300, None, [5, 5, 5, 5])])
        await until(lambda: subscriber.counters.restarts == 1, "the restart seen")
        assert subscriber.last_seq == 0
        assert index.longest_prefix(PROMPT) == {}
        assert index.longest_prefix([5, 5, 5, 5]) == {"w": 4}
    finally:
        await subscriber.close()
        await publisher.close()


async def test_malformed_messages_are_counted_and_skipped(context: zmq.asyncio.Context) -> None:
    publisher = Publisher(context, replay=False)
    index = BlockIndex()
    subscriber = await _connected(context, publisher, index)
    try:
        await publisher.send_raw([b"kv", b"\x00\x01"])  # two frames
        await publisher.send_raw([b"kv", b"\x01", b"\x90"])  # a 1-byte seq
        await until(lambda: subscriber.counters.malformed == 2)
        assert index.longest_prefix(PROMPT) == {"w": 4}  # nothing known lost: kept
        # A batch whose seq reads but payload does not: lost, so the worker resyncs.
        publisher.seq += 1
        await publisher.send_raw([b"kv", (1).to_bytes(8, "big"), b"\xc1"])
        await until(lambda: subscriber.counters.malformed == 3)
        assert subscriber.counters.resyncs == 1 and index.longest_prefix(PROMPT) == {}
        await publisher.publish([_stored(400, None, PROMPT[:4]), ["Unknown"]])
        await until(lambda: subscriber.last_seq == 2, "the stream going on")
        assert subscriber.counters.skipped_events == 1 and subscriber.counters.gaps == 0
        assert index.longest_prefix(PROMPT) == {"w": 4}
    finally:
        await subscriber.close()
        await publisher.close()


async def test_joining_mid_stream_replays_from_zero(context: zmq.asyncio.Context) -> None:
    publisher = Publisher(context)
    index = BlockIndex()
    await publisher.publish([_stored(100, None, PROMPT[:4])], live=False)  # before we came
    await publisher.publish([_stored(101, 100, PROMPT[4:8])], live=False)
    subscriber = Subscriber("w", publisher.endpoint, index, context, publisher.replay_endpoint)
    subscriber.start()
    try:
        batch = [_stored(102, 101, PROMPT[8:12])]
        payload = msgspec.msgpack.encode([time.time(), batch, 0])
        publisher.buffer.append((2, payload))
        publisher.seq = 3
        deadline = time.monotonic() + 5
        while subscriber.last_seq != 2:  # resent until the subscription takes
            assert time.monotonic() < deadline
            await publisher.send_raw([b"kv", (2).to_bytes(8, "big"), payload])
            await asyncio.sleep(0.01)
        assert publisher.replay_requests[0] == 0
        assert index.longest_prefix(PROMPT) == {"w": 12}
    finally:
        await subscriber.close()
        await publisher.close()


def test_a_malformed_endpoint_is_refused_at_start(context: zmq.asyncio.Context) -> None:
    subscriber = Subscriber("w", "nonsense", BlockIndex(), context)
    with pytest.raises(zmq.ZMQError):
        subscriber.start()


async def test_duplicates_and_a_stalled_replay(context: zmq.asyncio.Context) -> None:
    publisher = Publisher(context)
    index = BlockIndex()
    subscriber = await _connected(context, publisher, index, replay_timeout=0.2)
    try:
        await publisher.publish([_stored(101, 100, PROMPT[4:8])])
        await until(lambda: subscriber.last_seq == 1)
        duplicates = subscriber.counters.duplicates
        await subscriber.receive([b"kv", (1).to_bytes(8, "big"), publisher.buffer[1][1]])
        await subscriber.receive([b"kv", (0).to_bytes(8, "big"), publisher.buffer[0][1]])
        assert subscriber.counters.duplicates == duplicates + 1  # seq 0 was a restart...
        assert subscriber.counters.restarts == 1  # ... going backwards from 1
        assert publisher.task is not None
        publisher.task.cancel()  # the ROUTER stops answering: the replay stalls
        await publisher.publish([_stored(102, 101, PROMPT[8:12])], live=False)
        await publisher.publish([_stored(200, None, [9, 9, 9, 9])])
        await until(lambda: subscriber.counters.replay_failures == 1, "the stalled replay")
        assert subscriber.counters.resyncs >= 1 and subscriber.last_seq == publisher.seq - 1
    finally:
        await subscriber.close()
        await publisher.close()


async def test_the_hub_follows_workers_and_refuses_bad_endpoints(
    context: zmq.asyncio.Context,
) -> None:
    from shunter.kv_events.hub import KvEvents

    publisher = Publisher(context, replay=False)
    hub = KvEvents(lambda text: [int(t) for t in text.split()])
    hub.add("w", "m", "not an endpoint", None)
    assert not hub.active and not hub.tracks("w")
    hub.add("w", "m", publisher.endpoint, None)
    hub.add("w", "m", publisher.endpoint, None)  # once only
    assert hub.active and hub.tracks("w") and len(hub.subscribers) == 1
    try:
        subscriber = hub.subscribers["w"]
        deadline = time.monotonic() + 5
        while subscriber.counters.batches == 0:
            assert time.monotonic() < deadline
            await publisher.publish([_stored(100, None, PROMPT[:4])])
            await asyncio.sleep(0.01)
        text = " ".join(map(str, PROMPT))
        assert hub.cached_tokens("m", text) == (12, {"w": 4})
        assert hub.counters()["w"]["blocks"] == 1
        hub.remove("w")
        hub.remove("w")  # a worker that was never or no longer followed
        assert not hub.active and hub.cached_tokens("m", text) == (12, {})
    finally:
        await hub.close()
        await publisher.close()
