"""An HTTP worker's data-plane client: whole responses on pyreqwest, streams on our own
HTTP/1.1 client.

Measured (bench/README.md): pyreqwest is the cheapest client for whole responses, but costs
a thread hop per streamed chunk and ~64 KiB per open stream; ``wire/client.py`` relays
chunks from the protocol callback and holds a few KiB per stream.

pyreqwest carries only UTF-8 header values; a request with another byte in one (HTTP allows
any) goes over the stream client, which sends header bytes as they came, and is read whole
there, within the same size bound.

A client that is replaced (the worker refused a connection: it may have restarted) is
retired, not closed: closing pyreqwest's client fails every request still running on it,
so one refused connection would fail every concurrent request to that worker. ``retire``
closes the stream pool at once (a stream running on it keeps its connection, which is closed
when the stream ends) and the whole-response client once its requests have ended.
"""

from __future__ import annotations

import asyncio
import contextlib

from shunter.wire.base import FullResponse, HeaderPairs, UpstreamError, WholeClient
from shunter.wire.client import H1Stream, H1StreamClient
from shunter.wire.reqwest import (
    MAX_RESPONSE_BYTES,
    ClientSettings,
    ReqwestClient,
    UnsendableHeaders,
)


class WorkerClient:
    __slots__ = ("_max_response_bytes", "_quiet", "_streams", "_whole", "running")

    def __init__(
        self,
        whole: WholeClient,
        streams: H1StreamClient,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self._whole = whole
        self._streams = streams
        self._max_response_bytes = max_response_bytes
        self.running = 0  # whole-response requests in flight
        self._quiet: asyncio.Event | None = None  # set when ``running`` drops to 0, if retiring

    async def request(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> FullResponse:
        self.running += 1
        try:
            try:
                return await self._whole.request(method, url, headers, body)
            except UnsendableHeaders:
                return await self._whole_over_streams(method, url, headers, body)
        finally:
            self.running -= 1
            if self._quiet is not None and not self.running:
                self._quiet.set()

    async def stream(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> H1Stream:
        return await self._streams.stream(method, url, headers, body)

    async def _whole_over_streams(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> FullResponse:
        limit = self._max_response_bytes
        stream = await self._streams.stream(method, url, headers, body)
        parts: list[bytes] = []
        total = 0
        try:
            while (chunk := await stream.next_chunk()) is not None:
                total += len(chunk)
                if total > limit:
                    raise UpstreamError("oversize", f"the worker's response exceeded {limit} bytes")
                parts.append(chunk)
        finally:
            await stream.aclose()
        return FullResponse(stream.status, stream.headers, b"".join(parts))

    async def retire(self, grace: float) -> None:
        """Close without failing what runs on this client: its requests get ``grace``
        seconds to end."""
        await self._streams.close()
        if self.running:
            self._quiet = asyncio.Event()
            with contextlib.suppress(TimeoutError):  # past the grace: closed all the same
                await asyncio.wait_for(self._quiet.wait(), grace)
        await self._whole.close()

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
    return WorkerClient(ReqwestClient(settings), streams, settings.max_response_bytes)
