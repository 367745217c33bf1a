"""One worker's KV event stream: a ZMQ SUB on its publisher, applied in order to the index.

The state machine is llm-d's (the most careful of the consumers), per endpoint:

- ``last_seq`` is the last batch applied. A batch is applied only when it is the next one
  (``seq == last_seq + 1``); one at or below ``last_seq`` (already applied by a replay, or a
  duplicate) is dropped.
- A gap (``seq > last_seq + 1``: the PUB's high-water mark, a slow joiner, a dropped
  message) asks the worker's replay ROUTER for the missing batches from ``last_seq + 1``;
  the reply must be contiguous and end with the end marker within ``replay_timeout``.
  Without a replay endpoint, or when the replay fails, the worker is *resynced*: its blocks
  are dropped and the stream is applied afresh from the current batch. Stale entries would
  send requests to a worker that no longer holds the prefix; missing ones cost only a miss,
  and every later store rebuilds them.
- A sequence number going backwards is the publisher restarting (engines restart at 0,
  with an empty cache, and say nothing): the worker's blocks are dropped and the stream
  starts over.
- The first batch seen with ``seq > 0`` means we joined mid-stream: with a replay endpoint
  the buffer is replayed from 0 first (whatever it still holds; applying from any point on
  never leaves stale entries, since no later removal is missed).
- A message that is no batch is counted and skipped. One whose payload does not decode but
  whose seq does is a lost batch: counted, the worker resynced, its seq taken as consumed
  (a replay would return the same bytes).

ZeroMQ reconnects the SUB by itself when the worker goes away and comes back; the interval
starts at ``reconnect_ivl`` and doubles up to ``reconnect_ivl_max`` (the backoff). Whether
the SUB is connected now (``connected``) comes from the socket's monitor, so an operator
sees an unreachable publisher (``shunter_kv_events_connected``) rather than a silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from shunter.kv_events.index import BlockIndex
from shunter.kv_events.wire import (
    END_SEQ,
    Batch,
    WireError,
    decode_message,
    decode_payload,
    parse_seq,
)

log = logging.getLogger("shunter.kv_events")


@dataclass
class SubscriberCounters:
    batches: int = 0  # applied
    events: int = 0  # applied
    skipped_events: int = 0  # malformed or unknown events inside good batches
    malformed: int = 0  # messages that were no batch
    duplicates: int = 0  # batches already applied
    gaps: int = 0
    replays: int = 0  # replay requests sent
    replay_failures: int = 0
    replayed_batches: int = 0
    resyncs: int = 0  # times the worker's blocks were dropped to start over
    restarts: int = 0  # publisher restarts seen


class Subscriber:
    def __init__(
        self,
        worker: str,
        endpoint: str,
        index: BlockIndex,
        context: zmq.asyncio.Context,
        replay_endpoint: str | None = None,
        *,
        replay_timeout: float = 2.0,
        reconnect_ivl: float = 0.1,
        reconnect_ivl_max: float = 5.0,
    ) -> None:
        self.worker = worker
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.index = index
        self.counters = SubscriberCounters()
        self.last_seq: int | None = None  # last batch applied
        self.last_live: int | None = None  # last seq seen on the live stream
        self._context = context
        self._replay_timeout = replay_timeout
        self._ivl = (int(reconnect_ivl * 1000), int(reconnect_ivl_max * 1000))
        self.connected = False  # the SUB's TCP (or IPC) connection is up
        self._task: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._socket: zmq.asyncio.Socket | None = None

    def start(self) -> None:
        """Connect and start reading (on the running loop). A malformed endpoint raises
        ``zmq.ZMQError`` here, at registration, rather than in the background."""
        sub = self._context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RECONNECT_IVL, self._ivl[0])
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, self._ivl[1])
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        # The monitor first: the connection is made in ZeroMQ's I/O thread, and a CONNECTED
        # event sent before the monitor exists is lost (the SUB then showed disconnected
        # until its next reconnect, which on a steady publisher never comes).
        monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        try:
            sub.connect(self.endpoint)
        except zmq.ZMQError:
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)
            raise
        self._socket = sub
        self._watcher = asyncio.create_task(self._watch(sub, monitor))
        self._task = asyncio.create_task(self._read(sub), name=f"kv events {self.worker}")

    async def close(self) -> None:
        """Stop reading and forget the worker's blocks."""
        for task in (self._task, self._watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.connected = False
        if self._socket is not None:
            self._socket.close(linger=0)
        self.index.drop(self.worker)

    async def _watch(self, sub: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
        """Follow the SUB's connection from its monitor's events."""
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                self.connected = event == zmq.EVENT_CONNECTED
        finally:
            with contextlib.suppress(zmq.ZMQError):
                sub.disable_monitor()
            monitor.close(linger=0)

    async def _read(self, sub: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sub.recv_multipart()
            try:
                await self.receive(frames)
            except Exception:  # a bug must not end the stream: resync and go on
                log.exception("kv events: batch not applied", extra={"worker": self.worker})
                self._resync()

    async def receive(self, frames: Sequence[bytes]) -> None:
        """One live message."""
        try:
            batch = decode_message(frames)
        except WireError as exc:
            self.counters.malformed += 1
            log.warning(
                "kv events: malformed message skipped",
                extra={"worker": self.worker, "error": str(exc)},
            )
            seq = _seq_of(frames)
            if seq is not None:  # a lost batch: what it changed is unknown
                self._resync()
                self.last_seq = self.last_live = seq
            return
        seq = batch.seq
        if self.last_live is not None and seq < self.last_live:
            self.counters.restarts += 1
            log.info("kv events: publisher restarted", extra={"worker": self.worker, "seq": seq})
            self._resync()
        if seq == self.last_live:
            self.counters.duplicates += 1
            return
        self.last_live = seq
        if self.last_seq is None:
            # Joined mid-stream: fetch what came before, if the worker can replay it.
            if seq > 0 and self.replay_endpoint and not await self._replay(0, exact=False):
                self._resync()
            self._continue_with(batch)
            return
        if seq <= self.last_seq:
            self.counters.duplicates += 1
            return
        if seq > self.last_seq + 1:
            self.counters.gaps += 1
            log.info(
                "kv events: gap",
                extra={"worker": self.worker, "expected": self.last_seq + 1, "seq": seq},
            )
            if not (self.replay_endpoint and await self._replay(self.last_seq + 1, exact=True)):
                self._resync()
        self._continue_with(batch)

    def _continue_with(self, batch: Batch) -> None:
        """Apply a live batch after any replay: it may have come in the replay already, or
        the replay may have ended short of it (then start over from it)."""
        last = self.last_seq
        if last is not None and batch.seq <= last:
            self.counters.duplicates += 1
            return
        if last is not None and batch.seq != last + 1:
            self._resync()
        self._apply(batch)

    def _apply(self, batch: Batch) -> None:
        self.index.apply_batch(self.worker, batch.events, batch.ts)
        self.last_seq = batch.seq
        counters = self.counters
        counters.batches += 1
        counters.events += len(batch.events)
        counters.skipped_events += batch.skipped

    def _resync(self) -> None:
        self.counters.resyncs += 1
        self.index.drop(self.worker)
        self.last_seq = None

    async def _replay(self, start: int, *, exact: bool) -> bool:
        """Ask for the batches from ``start`` and apply them; whether the reply was whole
        (contiguous, from ``start`` if ``exact``, ended by the end marker in time)."""
        assert self.replay_endpoint is not None
        self.counters.replays += 1
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(self.replay_endpoint)
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            expected = start if exact else None
            while True:
                if not await dealer.poll(int(self._replay_timeout * 1000)):
                    raise WireError("replay stalled")
                frames = await dealer.recv_multipart()
                if frames and frames[0] == b"":
                    frames = frames[1:]  # the DEALER's delimiter
                if len(frames) < 2:
                    raise WireError("replay reply of fewer than 2 frames")
                seq_frame, payload = frames[-2], frames[-1]
                if seq_frame == END_SEQ or not payload:
                    return True
                batch = decode_payload(parse_seq(seq_frame), payload)
                if self.last_seq is not None and batch.seq <= self.last_seq:
                    continue
                if expected is not None and batch.seq != expected:
                    raise WireError(f"replay gave seq {batch.seq}, expected {expected}")
                self._apply(batch)
                self.counters.replayed_batches += 1
                expected = batch.seq + 1
        except (WireError, zmq.ZMQError) as exc:
            self.counters.replay_failures += 1
            log.warning(
                "kv events: replay failed", extra={"worker": self.worker, "error": str(exc)}
            )
            return False
        finally:
            dealer.close(linger=0)


def _seq_of(frames: Sequence[bytes]) -> int | None:
    if len(frames) == 3 and len(frames[1]) == 8:
        return int.from_bytes(frames[1], "big")
    return None
