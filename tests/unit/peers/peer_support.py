"""Helpers for the peer tests: a gateway on the mock network and an exchange whose sockets
record what is sent (no ZeroMQ), for tests that drive ``flush`` and ``receive`` directly."""

from __future__ import annotations

from typing import Any

from shunter.gateway import Gateway
from shunter.peers.exchange import Exchange
from shunter.peers.messages import Batch, decode

from support.fakes import gateway, ready

URLS = ("http://w:1", "http://w:2", "http://w:3", "http://w:4")


class RecordingSockets:
    def __init__(self, accept: bool = True) -> None:
        self.sent: list[list[bytes]] = []
        self.accept = accept

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
