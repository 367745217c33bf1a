"""Helpers for the peer tests: a gateway on the mock network and an exchange whose sockets
record what is sent (no ZeroMQ), for tests that drive ``flush`` and ``receive`` directly."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from shunter.gateway import Gateway
from shunter.peers.exchange import Exchange
from shunter.peers.messages import Batch, decode

from support.fakes import Workers, gateway, ready

URLS = ("http://w:1", "http://w:2", "http://w:3", "http://w:4")


class RecordingSockets:
    def __init__(self, accept: bool = True) -> None:
        self.sent: list[list[bytes]] = []
        self.accept = accept
        self.found: frozenset[str] = frozenset()
        self.handshake_failures = 0  # as PeerSockets counts them

    def listen(self, handler: Callable[[list[bytes]], None]) -> None:
        pass  # the tests hand batches to ``receive`` themselves (``deliver``)

    def set_found(self, peers: frozenset[str]) -> tuple[set[str], set[str]]:
        return set(), set()

    def send(self, frames: list[bytes]) -> bool:
        if self.accept:
            self.sent.append(frames)
        return self.accept

    async def receive(self) -> list[bytes]:  # pragma: no cover - the tests call receive()
        raise NotImplementedError

    def close(self) -> None:
        pass

    def batches(self) -> list[Batch]:
        return [decode(frames) for frames in self.sent]


async def sample_gateway(urls: tuple[str, ...] = URLS, **settings: Any) -> Gateway:
    gw = gateway(urls, policy="cache_aware", **settings)
    await ready(gw)
    return gw


def exchange_on(gw: Gateway, sockets: RecordingSockets | None = None, **options: Any) -> Exchange:
    """An exchange over ``gw``'s fleet and policies that sends into ``sockets``."""
    recorder = sockets or RecordingSockets()
    exchange = Exchange(
        gw.fleet,
        gw.policies.policy_for,
        lambda: recorder,  # type: ignore[arg-type,return-value]
        **options,
    )
    exchange._sockets = recorder  # type: ignore[assignment]
    return exchange


async def peered_gateway(
    urls: tuple[str, ...] = ("http://w:1",), network: Workers | None = None, wait: bool = True
) -> tuple[Gateway, RecordingSockets]:
    """A started gateway whose peer exchange (the one its ``/workers`` API tells) sends into
    the returned sockets; ``deliver`` hands what it sent to another such gateway. Its
    ``urls`` are registered, unless not ``wait``: then they are still being added."""
    sockets = RecordingSockets()
    gw = gateway(urls, network=network, policy="cache_aware", peer_endpoint="ipc:///not-bound")
    assert gw.peers is not None
    gw.peers.connect = lambda: sockets  # type: ignore[assignment,return-value]
    if wait:
        await ready(gw)
    else:
        gw.start()
    return gw, sockets


def deliver(sockets: RecordingSockets, to: Gateway) -> None:
    """Everything sent into ``sockets`` so far, received by ``to`` (and no longer queued)."""
    assert to.peers is not None
    for frames in sockets.sent:
        to.peers.receive(frames, 0.0)
    sockets.sent.clear()


async def until(done: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not done():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)
