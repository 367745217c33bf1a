"""The sim's KV-cache event publisher: what SGLang and vLLM send over ZeroMQ, from the sim's
prefix cache, so precise routing is tested without a GPU.

Live stream, on a PUB socket: one message per step that changed the cache, three frames:
the topic, the sequence number (8 bytes, big-endian, from 0, +1 per batch) and a msgpack
payload ``[ts, events, dp_rank]``. Two event formats:

- ``sglang``: tagged arrays, one page per ``BlockStored``
  (``["BlockStored", [hash], parent, token_ids, block_size, None, "GPU"]``), the hash a
  *signed* int64 made of the first 8 bytes of the page digest;
  ``["BlockRemoved", [hash], "GPU"]``; ``["AllBlocksCleared"]``.
- ``vllm``: tagged maps as vLLM v0.26 sends them, one ``BlockStored`` carrying the run of
  blocks a request cached (hashes *unsigned*, the last 8 bytes of the digest), defaulted
  fields left out. The digests are the sim's SGLang-style chain, not vLLM's pickle/CBOR
  hash: a consumer must not recompute engine hashes anyway, only use them as handles.

Replay, on a ROUTER socket: a request ``[identity, b"", start_seq]`` (exactly three
frames, else ignored) is answered with every buffered batch from ``start_seq`` on, then an
end marker: ``[b"", seq, payload]`` ... ``[b"", ff*8, b""]`` (SGLang), or with the topic
before each seq (vLLM >= v0.26). The buffer keeps the last ``buffer_steps`` batches.

Unlike the engines, which *connect* a PUB whose endpoint names a host, the sim always binds
its endpoints: a gateway's subscriber connects to each worker, which is the layout tests use.
Sends never block the sim: the PUB and ROUTER drop at their high-water mark (a subscriber
sees a gap), and the work runs on the event loop between requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from shunter.sim.cache import CacheEvent, Cleared, Removed, Stored
from shunter.sim.config import KV_EVENT_FORMATS, Faults

log = logging.getLogger("shunter.sim.kv_events")

END_SEQ = b"\xff" * 8


def sglang_hash(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "big", signed=True)


def vllm_hash(digest: bytes) -> int:
    return int.from_bytes(digest[-8:], "big")


def sglang_events(events: list[CacheEvent], block_size: int) -> list[Any]:
    out: list[Any] = []
    for event in events:
        if isinstance(event, Stored):
            parent = None if event.parent is None else sglang_hash(event.parent)
            out.append(
                [
                    "BlockStored",
                    [sglang_hash(event.digest)],
                    parent,
                    event.token_ids,
                    block_size,
                    None,
                    "GPU",
                ]
            )
        elif isinstance(event, Removed):
            out.append(["BlockRemoved", [sglang_hash(event.digest)], "GPU"])
        else:
            out.append(["AllBlocksCleared"])
    return out


def vllm_events(events: list[CacheEvent], block_size: int) -> list[Any]:
    """vLLM's map form: consecutive stores of one chain become one ``BlockStored``."""
    out: list[Any] = []
    run: dict[str, Any] | None = None
    last: bytes | None = None
    for event in events:
        if isinstance(event, Stored) and run is not None and event.parent == last:
            run["block_hashes"].append(vllm_hash(event.digest))
            run["token_ids"].extend(event.token_ids)
            run["extra_keys"].append(None)
            last = event.digest
            continue
        run = None
        if isinstance(event, Stored):
            run = {
                "type": "BlockStored",
                "block_hashes": [vllm_hash(event.digest)],
                "parent_block_hash": None if event.parent is None else vllm_hash(event.parent),
                "token_ids": list(event.token_ids),
                "block_size": block_size,
                "lora_id": None,
                "medium": "GPU",
                "lora_name": None,
                "extra_keys": [None],
                "group_idx": 0,
                "kv_cache_spec_kind": "full_attention",
            }
            last = event.digest
            out.append(run)
        elif isinstance(event, Removed):
            hashes = [vllm_hash(event.digest)]
            out.append({"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU"})
        elif isinstance(event, Cleared):
            out.append({"type": "AllBlocksCleared"})
    return out


class KvEventPublisher:
    """Publishes the cache's events (``publish`` is the cache's listener) on ``endpoint``,
    and answers replay requests on ``replay_endpoint`` if given."""

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        *,
        fmt: str = "sglang",
        topic: str = "",
        block_size: int = 16,
        buffer_steps: int = 10_000,
        dp_rank: int = 0,
        faults: Faults | None = None,
    ) -> None:
        if fmt not in KV_EVENT_FORMATS:
            raise ValueError(f"kv events format must be one of {', '.join(KV_EVENT_FORMATS)}")
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.format = fmt
        self.topic = topic.encode()
        self.block_size = block_size
        self.dp_rank = dp_rank
        self.seq = 0
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        # Fault injection (``/sim/faults`` kv_events_drop_batches): batches numbered and
        # buffered for replay but not sent live, so a subscriber sees a gap.
        self.faults = faults or Faults()
        self._encoder = msgspec.msgpack.Encoder()
        self._pending: deque[list[CacheEvent]] = deque()
        self._wake = asyncio.Event()
        self._context = zmq.asyncio.Context()
        self._pub: zmq.asyncio.Socket | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def publish(self, events: list[CacheEvent]) -> None:
        """Queue one step's events; the sender task numbers, encodes and sends them."""
        self._pending.append(events)
        self._wake.set()

    async def start(self) -> None:
        """Bind the sockets and start the tasks; an OSError if an endpoint cannot be bound."""
        try:
            self._pub = self._context.socket(zmq.PUB)
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.bind(self.endpoint)
            if self.replay_endpoint:
                self._router = self._context.socket(zmq.ROUTER)
                self._router.setsockopt(zmq.LINGER, 0)
                self._router.bind(self.replay_endpoint)
        except zmq.ZMQError as exc:
            self._context.destroy(linger=0)
            raise OSError(f"kv events endpoint: {exc}") from None
        if self._router is not None:
            self._tasks.append(asyncio.create_task(self._serve_replays()))
        self._tasks.append(asyncio.create_task(self._send_batches()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._context.destroy(linger=0)

    def encode(self, events: list[CacheEvent]) -> bytes:
        convert = sglang_events if self.format == "sglang" else vllm_events
        batch = [time.time(), convert(events, self.block_size), self.dp_rank]
        return self._encoder.encode(batch)

    async def _send_batches(self) -> None:
        assert self._pub is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                payload = self.encode(self._pending.popleft())
                seq = self.seq
                self.seq += 1
                self.buffer.append((seq, payload))
                if self.faults.kv_events_drop_batches > 0:
                    self.faults.kv_events_drop_batches -= 1
                    continue
                try:
                    await self._pub.send_multipart(
                        [self.topic, seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK
                    )
                except zmq.ZMQError as exc:  # as the engines: the seq is spent, a gap shows
                    log.warning("kv event batch not sent", extra={"seq": seq, "error": str(exc)})

    async def _serve_replays(self) -> None:
        assert self._router is not None
        while True:
            frames = await self._router.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning("invalid kv events replay request", extra={"frames": len(frames)})
                continue
            identity, start = frames[0], int.from_bytes(frames[2], "big")
            prefix = [identity, b""] + ([self.topic] if self.format == "vllm" else [])
            for seq, payload in list(self.buffer):
                if seq >= start:
                    await self._reply([*prefix, seq.to_bytes(8, "big"), payload])
            await self._reply([*prefix, END_SEQ, b""])

    async def _reply(self, frames: list[bytes]) -> None:
        assert self._router is not None
        try:
            await self._router.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the client is gone or slow: it will see the hole
            log.warning("kv events replay frame dropped", extra={"error": str(exc)})
