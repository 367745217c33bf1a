"""The sockets between peers: each gateway binds one ZeroMQ PUB, and SUBs to every peer's.

PUB/SUB rather than DEALER/ROUTER: everything a gateway shares goes to all its peers, and a
PUB sends one message to every subscriber with no per-peer bookkeeping here. Above all a
PUB never blocks: each subscriber has its own send queue, bounded by ``SNDHWM``, and a
slow, partitioned or dead peer's queue simply drops once full (and a non-blocking send
never waits), so no peer can slow the sender. ZeroMQ reconnects a SUB by itself when the
peer comes back (with backoff from ``RECONNECT_IVL_MS`` to ``RECONNECT_IVL_MAX_MS``), and
what the peer missed is recovered by the exchange's periodic snapshot, not by replay.

Plain (not ``zmq.asyncio``) sockets: the SUB's file descriptor is watched by the event loop
and every message waiting is read in one callback. With ``zmq.asyncio``, an await per
message cost 8 peered gateways ~2 ms of CPU per routed request (each receives every
peer's batches); draining in one callback costs a small fraction of that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import zmq

SNDHWM = 1000  # batches queued per peer (~5 s of batches at one per 5 ms)
RCVHWM = 10_000
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 5_000
MAX_DRAIN = 256  # messages read per callback before the loop gets a turn


class PeerSockets:
    def __init__(self, host: str, port: int, peers: list[str]) -> None:
        self.context = zmq.Context()
        self.pub = self.context.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, SNDHWM)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(f"tcp://{host}:{port}")
        self.sub = self.context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, RCVHWM)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        self.sub.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        for peer in peers:
            self.sub.connect(f"tcp://{peer}")
        self._fd: int = self.sub.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handler: Callable[[list[bytes]], None] | None = None

    def send(self, frames: list[bytes]) -> bool:
        """Queue ``frames`` for every peer without waiting; False when ZeroMQ refused."""
        try:
            self.pub.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def listen(self, handler: Callable[[list[bytes]], None]) -> None:
        """Call ``handler`` with every message that arrives (on the running loop)."""
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._readable)
        self._loop.call_soon(self._readable)  # messages may be waiting already

    def _readable(self) -> None:
        # ZeroMQ's descriptor is edge-triggered: read until EVENTS says nothing is left.
        sub, handler = self.sub, self._handler
        assert handler is not None
        for _ in range(MAX_DRAIN):
            events: int = sub.getsockopt(zmq.EVENTS)  # type: ignore[assignment]
            if not events & zmq.POLLIN:
                return
            handler(list(sub.recv_multipart(zmq.NOBLOCK)))
        assert self._loop is not None
        self._loop.call_soon(self._readable)  # more waiting: after the others' turn

    def close(self) -> None:
        if self._loop is not None and not self.sub.closed:
            self._loop.remove_reader(self._fd)
        self.pub.close()
        self.sub.close()
        self.context.term()
