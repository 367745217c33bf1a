"""The upstream client interface, so the network can be swapped (tests, other libraries)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

HeaderPairs = Sequence[tuple[str, str]]

# Hop-by-hop headers (RFC 9110 §7.6.1) and those the transport sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


class UpstreamError(Exception):
    """A worker could not be reached or broke off the exchange.

    ``kind`` is ``connect`` (no connection: nothing was sent), ``timeout``, ``io`` (the
    connection broke after the request left, or the answer broke HTTP/1.1 or one of our
    bounds: a malformed or oversized head, a body cut short), or ``oversize`` (a whole
    response over ``max_response_bytes``: the worker answered, this answer is too big).
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(slots=True)
class FullResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class StreamingResponse(Protocol):
    status: int
    headers: list[tuple[str, str]]

    async def next_chunk(self) -> bytes | None:
        """The next body chunk as it arrives, or None at the end."""

    async def aclose(self) -> None:
        """Release the response; an unfinished one closes its connection."""


class UpstreamClient(Protocol):
    async def request(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> FullResponse: ...

    async def stream(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> StreamingResponse: ...

    async def close(self) -> None: ...


class ClientFactory(Protocol):
    async def __call__(self) -> UpstreamClient: ...
