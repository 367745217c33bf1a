"""An HTTP worker's data-plane client: our own HTTP/1.1 client, for streams and whole answers.

A request the gateway gives up on must end at the worker at once: a client that leaves,
or a prefill/decode leg cancelled because the other failed, would otherwise keep the worker
generating (or, for a decode, waiting minutes for a cache that never comes). Cancelling a
call on ``wire/client.py`` closes its connection, which SGLang and vLLM take as an abort.
pyreqwest, cheaper per whole response (``wire/reqwest.py``), cannot: a cancelled call keeps
its connection, and the worker its request (checked: the connection was still open 2 s
after the cancel). So whole answers are read off a stream too, up to ``max_response_bytes``;
pyreqwest serves the control plane's probes, where nothing is abandoned.
"""

from __future__ import annotations

import io

from shunter.wire.base import FullResponse, HeaderPairs, UpstreamError
from shunter.wire.client import H1Stream, H1StreamClient
from shunter.wire.reqwest import ClientSettings


class WorkerClient:
    def __init__(self, streams: H1StreamClient, max_response_bytes: int) -> None:
        self._streams = streams
        self._max_response_bytes = max_response_bytes

    async def request(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> FullResponse:
        response = await self._streams.stream(method, url, headers, body)
        try:
            whole = await read_whole(response, self._max_response_bytes)
        finally:
            await response.aclose()  # back to the pool once read; closed if not
        return FullResponse(response.status, response.headers, whole)

    async def stream(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> H1Stream:
        return await self._streams.stream(method, url, headers, body)

    async def retire(self, grace: float) -> None:
        """Close without failing what runs on this client: closing the pool closes its idle
        connections at once, and a call still running keeps its connection until it ends
        (``grace`` is not needed: nothing here fails running calls)."""
        await self._streams.close()

    async def close(self) -> None:
        await self._streams.close()


async def read_whole(response: H1Stream, limit: int) -> bytes:
    """The body of ``response``, refused once it is past ``limit`` bytes: a declared length
    over it before any of the body is read, else as chunks arrive (the rest never read).
    Chunks go into a ``BytesIO``, whose ``getvalue()`` hands over its own buffer: a body is
    held once."""
    for name, value in response.headers:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise _too_large(limit)
    buffer = io.BytesIO()
    total = 0
    while (chunk := await response.next_chunk()) is not None:
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        buffer.write(chunk)
    return buffer.getvalue()


def _too_large(limit: int) -> UpstreamError:
    return UpstreamError("oversize", f"the worker's response exceeded {limit} bytes")


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
    return WorkerClient(streams, settings.max_response_bytes)
