"""An HTTP worker's data-plane client: whole responses on pyreqwest, streams on our own
HTTP/1.1 client.

Measured (bench/README.md): pyreqwest is the cheapest client for whole responses, but costs
a thread hop per streamed chunk and ~64 KiB per open stream; ``wire/client.py`` relays
chunks from the protocol callback and holds a few KiB per stream.
"""

from __future__ import annotations

from shunter.wire.base import FullResponse, HeaderPairs, WholeClient
from shunter.wire.client import H1Stream, H1StreamClient
from shunter.wire.reqwest import ClientSettings, ReqwestClient


class WorkerClient:
    def __init__(self, whole: WholeClient, streams: H1StreamClient) -> None:
        self._whole = whole
        self._streams = streams

    async def request(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> FullResponse:
        return await self._whole.request(method, url, headers, body)

    async def stream(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> H1Stream:
        return await self._streams.stream(method, url, headers, body)

    async def close(self) -> None:
        await self._whole.close()
        await self._streams.close()


def worker_client(settings: ClientSettings, base_url: str) -> WorkerClient:
    """The client for the worker at ``base_url``."""
    streams = H1StreamClient(
        base_url,
        settings.connect_timeout_secs,
        settings.read_timeout_secs,
        settings.ssl_context,
        idle_timeout=settings.pool_idle_timeout_secs,
        max_idle=settings.pool_max_idle_per_host,
    )
    return WorkerClient(ReqwestClient(settings), streams)
