"""The sockets between peers: each gateway binds one ZeroMQ PUB, and SUBs to every peer's.

PUB/SUB rather than DEALER/ROUTER: everything a gateway shares goes to all its peers, and a
PUB sends one message to every subscriber with no per-peer bookkeeping here. Above all a
PUB never blocks: each subscriber has its own send queue, bounded by ``SNDHWM``, and a
slow, partitioned or dead peer's queue simply drops once full (and a non-blocking send
never waits), so no peer can slow the sender. ZeroMQ reconnects a SUB by itself when the
peer comes back (with backoff from ``RECONNECT_IVL_MS`` to ``RECONNECT_IVL_MAX_MS``), and
what the peer missed is recovered by the exchange's periodic snapshot, not by replay.
"""

from __future__ import annotations

import zmq
import zmq.asyncio

SNDHWM = 1000  # batches queued per peer (~5 s of batches at one per 5 ms)
RCVHWM = 10_000
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 5_000


class PeerSockets:
    def __init__(self, host: str, port: int, peers: list[str]) -> None:
        self.context = zmq.asyncio.Context()
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

    def send(self, frames: list[bytes]) -> bool:
        """Queue ``frames`` for every peer without waiting; False when ZeroMQ refused."""
        try:
            self.pub.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    async def receive(self) -> list[bytes]:
        return list(await self.sub.recv_multipart())

    def close(self) -> None:
        self.pub.close()
        self.sub.close()
        self.context.term()
