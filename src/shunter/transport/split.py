"""A worker's upstream client: whole responses on pyreqwest, streams on our HTTP/1.1 client.

Measured (bench/README.md): pyreqwest is the cheapest client for whole responses
(DESIGN §5), but costs a thread hop per streamed chunk and ~64 KiB per open stream;
``h1stream`` relays chunks from the protocol callback and holds a few KiB per stream.
"""

from __future__ import annotations

from shunter.transport.base import FullResponse, HeaderPairs, UpstreamClient
from shunter.transport.h1stream import H1Stream, H1StreamClient
from shunter.transport.reqwest import ClientSettings, ReqwestClient


class WorkerClient:
    def __init__(self, whole: UpstreamClient, streams: H1StreamClient) -> None:
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
