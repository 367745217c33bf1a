"""Peers added and removed at run time (``PeerSockets.set_found``), on real ZeroMQ sockets
on 127.0.0.1: a found peer is heard, a peer gone is disconnected (its publisher sees the
connection close) and never heard again, and a peer named at start is left alone."""

from __future__ import annotations

import asyncio

import zmq
from peer_support import sample_gateway

from shunter.peers.exchange import Exchange
from shunter.peers.transport import PeerSockets

from support.harness import free_port

HOST = "127.0.0.1"


async def heard(listener: PeerSockets, speaker: PeerSockets, marker: bytes) -> list[bytes]:
    """Send ``marker`` from ``speaker`` until ``listener`` receives it (a SUB misses what
    is sent before its subscription reaches the PUB); every message received."""
    got: list[bytes] = []
    arrived = asyncio.Event()

    def handler(frames: list[bytes]) -> None:
        got.append(frames[0])
        if frames[0] == marker:
            arrived.set()

    listener.listen(handler)
    async with asyncio.timeout(5):
        while not arrived.is_set():
            speaker.send([marker])
            with_timeout = asyncio.create_task(arrived.wait())
            await asyncio.wait([with_timeout], timeout=0.02)
            with_timeout.cancel()
    return got


async def test_a_found_peer_is_heard_and_a_gone_one_disconnected() -> None:
    a_port, b_port, c_port = free_port(), free_port(), free_port()
    c = PeerSockets(f"{HOST}:{c_port}", [])
    b = PeerSockets(f"{HOST}:{b_port}", [])
    a = PeerSockets(f"{HOST}:{a_port}", [f"{HOST}:{c_port}"])  # C named at start
    monitor = b.pub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        assert a.set_found(frozenset({f"{HOST}:{b_port}", f"{HOST}:{c_port}"})) == (
            {f"{HOST}:{b_port}"},
            set(),
        )
        assert a.found == {f"{HOST}:{b_port}"}  # C stays a start peer, not connected twice
        assert b"from-b" in await heard(a, b, b"from-b")

        assert a.set_found(frozenset()) == (set(), {f"{HOST}:{b_port}"})
        async with asyncio.timeout(5):  # B sees A's connection close
            while not monitor.poll(0):
                await asyncio.sleep(0.01)
        b.send([b"after-b-gone"])
        got = await heard_again(a, c)
        assert b"after-b-gone" not in got
        assert b"from-c" in got  # the start peer is still heard
    finally:
        monitor.close()
        for sockets in (a, b, c):
            sockets.close()


async def heard_again(listener: PeerSockets, speaker: PeerSockets) -> list[bytes]:
    """What ``listener`` receives until a marker from ``speaker`` arrives."""
    assert listener._loop is not None
    listener._loop.remove_reader(listener._fd)
    return await heard(listener, speaker, b"from-c")


async def test_peers_found_before_the_exchange_starts_are_connected_at_start() -> None:
    gw = await sample_gateway()
    port = free_port()
    exchange = Exchange(gw.fleet, gw.policies.policy_for, lambda: PeerSockets(f"{HOST}:{port}", []))
    try:
        exchange.peers_found(frozenset({f"{HOST}:1234"}))  # the watcher may list first
        exchange.start()
        assert exchange.stats()["found"] == [f"{HOST}:1234"]
        exchange.peers_found(frozenset({f"{HOST}:1235"}))
        assert exchange.stats()["found"] == [f"{HOST}:1235"]
    finally:
        await exchange.close()
        await gw.close()
