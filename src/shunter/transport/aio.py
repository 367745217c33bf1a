"""Streamed upstream requests on aiohttp, and the per-worker client that splits the work.

Measured in this project (bench/README.md): a stream held open through pyreqwest costs
~64 KiB of memory (10,000 slow streams took the gateway to 649 MiB), through aiohttp ~12 KiB;
and aiohttp hands each chunk over without a thread hop. pyreqwest stays the client for whole
responses, where it is the cheapest measured (DESIGN §5).
"""

from __future__ import annotations

import asyncio

import aiohttp

from shunter.transport.base import FullResponse, HeaderPairs, UpstreamClient, UpstreamError
from shunter.transport.reqwest import ClientSettings, ReqwestClient

# aiohttp adds these unless told not to; the client's own headers are forwarded instead, and
# an automatic Accept-Encoding would invite the worker to compress the event stream.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def _translate(exc: BaseException) -> UpstreamError:
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamError("timeout", f"worker timed out: {exc}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError("connect", f"cannot connect to worker: {exc}")
    return UpstreamError("io", f"worker connection failed: {exc}")


class AioStream:
    __slots__ = ("_done", "_response", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._done = False
        self.status = response.status
        self.headers = [(k.decode("latin-1").lower(), v.decode("latin-1"))
                        for k, v in response.raw_headers]  # fmt: skip

    async def next_chunk(self) -> bytes | None:
        try:
            chunk = await self._response.content.readany()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _translate(exc) from None
        if not chunk:
            self._done = True
            return None
        return chunk

    async def aclose(self) -> None:
        if self._done:
            self._response.release()  # the connection goes back to the pool
        else:
            self._response.close()  # abandoned mid-stream: close it, so the worker sees it


class AioStreamClient:
    """One worker's pool of streaming connections."""

    def __init__(self, settings: ClientSettings) -> None:
        context = settings.ssl_context
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=0, keepalive_timeout=settings.pool_idle_timeout_secs,
            ssl=context if context is not None else True,
        )  # fmt: skip
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.connect_timeout_secs,
            sock_read=settings.read_timeout_secs,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
        )

    async def stream(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> AioStream:
        try:
            response = await self._session.request(
                method, url, headers=list(headers), data=body, allow_redirects=False
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _translate(exc) from None
        return AioStream(response)

    async def close(self) -> None:
        await self._session.close()


class WorkerClient:
    """A worker's upstream client: whole responses on one pool, streams on another."""

    def __init__(self, whole: UpstreamClient, streams: AioStreamClient) -> None:
        self._whole = whole
        self._streams = streams

    async def request(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> FullResponse:
        return await self._whole.request(method, url, headers, body)

    async def stream(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> AioStream:
        return await self._streams.stream(method, url, headers, body)

    async def close(self) -> None:
        await self._whole.close()
        await self._streams.close()


def worker_client(settings: ClientSettings) -> WorkerClient:
    """The default client for a worker; call it on the event loop (aiohttp needs one)."""
    return WorkerClient(ReqwestClient(settings), AioStreamClient(settings))
