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
holding the same secret; a failed handshake is counted and logged. The SUB's link to each
peer (connecting, connected, retrying with backoff, refused at the handshake) is kept from
ZeroMQ's monitor events (``links``), for the dashboard.

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
from zmq.auth.thread import ThreadAuthenticator
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
# What the SUB's monitor reports of each peer, and the link state each event means (a
# failed handshake: "refused").
SUB_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | HANDSHAKE_FAILED
)
_LINK_STATES: dict[int, str] = {
    int(zmq.EVENT_HANDSHAKE_SUCCEEDED): "connected",
    int(zmq.EVENT_DISCONNECTED): "retrying",
    int(zmq.EVENT_CONNECT_RETRIED): "retrying",
}


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
        self._authenticator: ThreadAuthenticator | None = None
        # Each peer's link as the SUB's monitor last told it (``links``); the PUB's monitor
        # reports the subscribers it refused, which only CURVE does (another secret).
        self._monitors: list[zmq.Socket[bytes]] = []
        self._sub_monitor: zmq.Socket[bytes] | None = None
        self.links: dict[str, str] = {}
        self.handshake_failures = 0
        self._logged: dict[str, float] = {}  # peer address -> when its failure was logged
        self.static = frozenset(peers)
        self.found: frozenset[str] = frozenset()  # connected by set_found
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handler: Callable[[list[bytes]], None] | None = None
        try:
            self._open(bind, keys)
        except BaseException:  # a port taken, an address refused: leave nothing running
            self._release()
            raise

    def _open(self, bind: str, keys: PeerKeys | None) -> None:
        if keys is not None:
            self._authenticator = secure(self.context, self.pub, self.sub, keys)
        self._sub_monitor = self.sub.get_monitor_socket(SUB_EVENTS)
        self._monitors.append(self._sub_monitor)
        if keys is not None:
            self._monitors.append(self.pub.get_monitor_socket(HANDSHAKE_FAILED))
        self.pub.setsockopt(zmq.SNDHWM, SNDHWM)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(endpoint(bind))
        self.sub.setsockopt(zmq.RCVHWM, RCVHWM)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        self.sub.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        for peer in self.static:
            self._connect(peer)
        self._fd: int = self.sub.getsockopt(zmq.FD)  # type: ignore[assignment]

    def _connect(self, peer: str) -> None:
        self.sub.connect(endpoint(peer))
        self.links[peer] = "connecting"

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
            self.links.pop(peer, None)
        for peer in added:
            self._connect(peer)
        self.found = wanted
        return added, gone

    def listen(self, handler: Callable[[list[bytes]], None]) -> None:
        """Call ``handler`` with every message that arrives (on the running loop)."""
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._readable)
        self._loop.call_soon(self._readable)  # messages may be waiting already
        for monitor in self._monitors:
            self._loop.add_reader(monitor.getsockopt(zmq.FD), self._monitored, monitor)  # type: ignore[arg-type]
            self._loop.call_soon(self._monitored, monitor)

    def _readable(self) -> None:
        # ZeroMQ's descriptor is edge-triggered: read until EVENTS says nothing is left.
        sub, handler = self.sub, self._handler
        assert handler is not None
        for _ in range(MAX_DRAIN):
            if not _has_message(sub):
                return
            handler(list(sub.recv_multipart(zmq.NOBLOCK)))
        assert self._loop is not None
        self._loop.call_soon(self._readable)  # more waiting: after the others' turn

    def _monitored(self, monitor: zmq.Socket[bytes]) -> None:
        """What the monitors report (edge-triggered, as the SUB): the peers' links, and
        failed handshakes, counted and logged."""
        while _has_message(monitor):
            event = parse_monitor_message(list(monitor.recv_multipart(zmq.NOBLOCK)))
            address = event["endpoint"].decode("utf-8", "replace")
            peer = address.removeprefix("tcp://")
            failed = event["event"] & HANDSHAKE_FAILED
            if monitor is self._sub_monitor and peer in self.links:
                state = _LINK_STATES.get(int(event["event"]), "refused")
                # A refused peer is dropped and retried; it stays "refused" until a
                # handshake succeeds.
                if state != "retrying" or self.links[peer] != "refused":
                    self.links[peer] = state
            if failed:
                self._handshake_failed(address)

    def _handshake_failed(self, address: str) -> None:
        self.handshake_failures += 1
        now = time.monotonic()
        if now - self._logged.get(address, -LOG_EVERY_SECS) >= LOG_EVERY_SECS:
            self._logged[address] = now
            log.warning(
                "peer handshake failed: the other side has another peer secret, or none",
                extra={"peer": address, "failures": self.handshake_failures},
            )

    def close(self) -> None:
        if self._loop is not None and not self.sub.closed:
            self._loop.remove_reader(self._fd)
            for monitor in self._monitors:
                self._loop.remove_reader(monitor.getsockopt(zmq.FD))  # type: ignore[arg-type]
        self._release()

    def _release(self) -> None:
        """Close every socket, stop the ZAP thread and end the context (also after a failed
        start: a context left with open sockets blocks whoever collects it)."""
        if self._monitors:
            self.sub.disable_monitor()
        if len(self._monitors) > 1:
            self.pub.disable_monitor()
        for socket in (*self._monitors, self.pub, self.sub):
            socket.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()
        self.context.term()


def _has_message(socket: zmq.Socket[bytes]) -> bool:
    """Whether ``socket`` has a message waiting (its descriptor is edge-triggered, so a
    reader drains until this says no)."""
    events: int = socket.getsockopt(zmq.EVENTS)  # type: ignore[assignment]
    return bool(events & zmq.POLLIN)
