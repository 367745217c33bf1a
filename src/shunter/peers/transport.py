"""The sockets between peers: each gateway binds one ZeroMQ PUB, and SUBs to every peer's.

PUB/SUB rather than DEALER/ROUTER: everything a gateway shares goes to all its peers, and a
PUB sends one message to every subscriber with no per-peer bookkeeping here. Above all a
PUB never blocks: each subscriber has its own send queue, bounded by ``SNDHWM``, and a
slow, partitioned or dead peer's queue simply drops once full (and a non-blocking send
never waits), so no peer can slow the sender. ZeroMQ reconnects a SUB by itself when the
peer comes back (with backoff from ``RECONNECT_IVL_MS`` to ``RECONNECT_IVL_MAX_MS``), and
what the peer missed is recovered by the exchange's periodic snapshot, not by replay.

The peers named at start (``--peer-urls``) stay for the life of the sockets; peers found
later (pods selected by ``--router-selector``) come and go with ``set_found``: a SUB
connects to a new endpoint and disconnects from one that went away, so that ZeroMQ stops
retrying a pod that no longer exists. An endpoint named at start is never disconnected,
nor connected twice (a SUB connected twice to one PUB receives every message twice).

With ``keys`` (``security.py``) both sockets speak CURVE: encrypted, and only with gateways
holding the same secret; a failed handshake is counted and logged (``_handshakes``).

Plain (not ``zmq.asyncio``) sockets: the SUB's file descriptor is watched by the event loop
and every message waiting is read in one callback. With ``zmq.asyncio``, an await per
message cost 8 peered gateways ~2 ms of CPU per routed request (each receives every
peer's batches); draining in one callback costs a small fraction of that.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from shunter.peers.security import PeerKeys, secure

log = logging.getLogger("shunter.peers")

SNDHWM = 1000  # batches queued per peer (~5 s of batches at one per 5 ms)
RCVHWM = 10_000
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 5_000
MAX_DRAIN = 256  # messages read per callback before the loop gets a turn
# A handshake refused (another secret, or none where one is required), as ZeroMQ reports it.
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
LOG_EVERY_SECS = 60.0  # a peer whose handshakes keep failing is logged again this often


def endpoint(peer: str) -> str:
    """A peer as ZeroMQ names it: ``HOST:PORT`` over TCP, or an ``ipc://PATH`` as given."""
    return peer if peer.startswith("ipc://") else f"tcp://{peer}"


class PeerSockets:
    """This gateway's PUB, bound at ``bind`` (``HOST:PORT`` or ``ipc://PATH``), and a SUB
    connected to every one of ``peers`` (the same forms); over CURVE with ``keys``."""

    def __init__(self, bind: str, peers: list[str], keys: PeerKeys | None = None) -> None:
        self.context = zmq.Context()
        self.pub = self.context.socket(zmq.PUB)
        self.sub = self.context.socket(zmq.SUB)
        self._authenticator = (
            None if keys is None else secure(self.context, self.pub, self.sub, keys)
        )
        self.handshake_failures = 0
        self._logged: dict[str, float] = {}  # peer address -> when its failure was logged
        # Handshakes fail for a reason worth telling only over CURVE (another secret).
        self._monitors = [
            socket.get_monitor_socket(HANDSHAKE_FAILED)
            for socket in ((self.pub, self.sub) if keys is not None else ())
        ]
        self.pub.setsockopt(zmq.SNDHWM, SNDHWM)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(endpoint(bind))
        self.sub.setsockopt(zmq.RCVHWM, RCVHWM)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        self.sub.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.static = frozenset(peers)
        self.found: frozenset[str] = frozenset()  # connected by set_found
        for peer in self.static:
            self.sub.connect(endpoint(peer))
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

    def set_found(self, peers: frozenset[str]) -> tuple[set[str], set[str]]:
        """Connect to the ``peers`` found now, and disconnect from those found before that
        are gone; returns (connected, disconnected)."""
        wanted = peers - self.static
        added, gone = set(wanted - self.found), set(self.found - wanted)
        for peer in gone:
            self.sub.disconnect(endpoint(peer))
        for peer in added:
            self.sub.connect(endpoint(peer))
        self.found = wanted
        return added, gone

    def listen(self, handler: Callable[[list[bytes]], None]) -> None:
        """Call ``handler`` with every message that arrives (on the running loop)."""
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._readable)
        self._loop.call_soon(self._readable)  # messages may be waiting already
        for monitor in self._monitors:
            self._loop.add_reader(monitor.getsockopt(zmq.FD), self._handshakes, monitor)  # type: ignore[arg-type]
            self._loop.call_soon(self._handshakes, monitor)

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

    def _handshakes(self, monitor: zmq.Socket[bytes]) -> None:
        """Count and log the failed handshakes ZeroMQ reports (edge-triggered, as the SUB)."""
        while True:
            events: int = monitor.getsockopt(zmq.EVENTS)  # type: ignore[assignment]
            if not events & zmq.POLLIN:
                return
            event = parse_monitor_message(list(monitor.recv_multipart(zmq.NOBLOCK)))
            self.handshake_failures += 1
            peer = event["endpoint"].decode("utf-8", "replace")
            now = time.monotonic()
            if now - self._logged.get(peer, -LOG_EVERY_SECS) >= LOG_EVERY_SECS:
                self._logged[peer] = now
                log.warning(
                    "peer handshake failed: the other side has another peer secret, or none",
                    extra={"peer": peer, "failures": self.handshake_failures},
                )

    def close(self) -> None:
        if self._loop is not None and not self.sub.closed:
            self._loop.remove_reader(self._fd)
            for monitor in self._monitors:
                self._loop.remove_reader(monitor.getsockopt(zmq.FD))  # type: ignore[arg-type]
        if self._monitors:
            for socket in (self.pub, self.sub):
                socket.disable_monitor()
        for monitor in self._monitors:
            monitor.close(linger=0)
        self.pub.close()
        self.sub.close()
        if self._authenticator is not None:
            self._authenticator.stop()
        self.context.term()
