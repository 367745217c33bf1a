"""The upstream client interface, so the network can be swapped (tests, other libraries).

As in httpx's transport layer, plain values only: a method, a URL string, headers as a list
of byte pairs (names lower-case, as they came off the wire), a body as bytes. Headers stay
bytes from the client's socket to the worker's and back; only an adapter to a library that
wants strings (``reqwest.py``) converts, at its edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

HeaderPairs = Sequence[tuple[bytes, bytes]]

# Hop-by-hop headers (RFC 9110 §7.6.1) and those the transport sets itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
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
    headers: list[tuple[bytes, bytes]]
    body: bytes


class StreamingResponse(Protocol):
    status: int
    headers: list[tuple[bytes, bytes]]

    async def next_chunk(self) -> bytes | None:
        """The next body chunk as it arrives, or None at the end."""

    async def aclose(self) -> None:
        """Release the response; an unfinished one closes its connection."""


class WholeClient(Protocol):
    """A client for whole (non-streamed) exchanges: the control plane's probes."""

    async def request(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> FullResponse: ...

    async def close(self) -> None: ...


class UpstreamClient(WholeClient, Protocol):
    """A worker's client: whole exchanges and streamed ones."""

    async def stream(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> StreamingResponse: ...

    async def retire(self, grace: float) -> None:
        """Close once the exchanges running on it have ended, or after ``grace`` seconds:
        it was replaced, and new exchanges go to its successor."""
