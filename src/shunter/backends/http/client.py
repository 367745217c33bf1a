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

from shunter.wire.base import FullResponse, HeaderPairs, read_capped
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
            whole = response.whole(self._max_response_bytes)
            if whole is None:  # still arriving, or too large (which this refuses)
                whole = await read_capped(
                    response.next_chunk, _declared_length(response), self._max_response_bytes
                )
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


def _declared_length(response: H1Stream) -> int | None:
    for name, value in response.headers:
        if name == b"content-length" and value.isdigit():
            return int(value)
    return None


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
