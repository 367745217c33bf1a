"""The upstream client interface, so the network can be swapped (tests, other libraries).

As in httpx's transport layer, plain values only: a method, a URL string, headers as a list
of byte pairs (names lower-case, as they came off the wire), a body as bytes. Headers stay
bytes from the client's socket to the worker's and back; only an adapter to a library that
wants strings (``reqwest.py``) converts, at its edge.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

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


# The ASGI scope extension under which our server (``server.py``) offers a ``BodySink``.
BODY_SINK = "shunter.body_sink"


class Throttled(Protocol):
    """A source of chunks whose reading can be paused (a worker connection's transport)."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class BodySink(Protocol):
    """Where a relayed stream's chunks are written from the worker connection's callback,
    with no task woken per chunk (``server.py``'s ``Cycle``)."""

    def write(self, chunk: bytes) -> None:
        """Write one chunk of the response body (framed as the response is)."""

    def throttle(self, reading: Throttled) -> None:
        """Pause ``reading`` while the client's buffer is full, resume it when it drains."""


Relay = Callable[[BodySink], Awaitable[None]]


def relay_of(stream: object) -> Relay | None:
    """``stream.relay`` when it has one (a stream that can write its chunks to a
    ``BodySink`` from its source's callback), else None: iterate it with ``async for``."""
    relay: Relay | None = getattr(stream, "relay", None)
    return relay


class StreamingResponse(Protocol):
    status: int
    headers: list[tuple[bytes, bytes]]

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    def __anext__(self) -> Awaitable[bytes]:
        """The next body chunk as it arrives; StopAsyncIteration at the end."""

    async def next_chunk(self) -> bytes | None:
        """The next body chunk as it arrives, or None at the end."""

    async def relay(self, sink: BodySink) -> None:
        """Write the rest of the body to ``sink`` as it arrives, from the connection's own
        callback; returns at the end of the body, raises UpstreamError if it breaks."""

    def as_stream(self, ended: Callable[[], None] | None = None) -> StreamingResponse:
        """This response as a reply's streamed body (``protocols/reply.py``'s ``Stream``);
        ``ended`` is called once it is closed, however it ends."""

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


async def read_capped(
    next_chunk: Callable[[], Awaitable[ReadableBuffer | None]], declared: int | None, limit: int
) -> bytes:
    """A whole body read chunk by chunk with ``next_chunk``, refused once past ``limit``
    bytes (UpstreamError "oversize"): a ``declared`` length over it before any of the body
    is read, else as chunks arrive, the rest never read.

    Chunks go into a ``BytesIO``, whose ``getvalue()`` hands over its own buffer (no copy)
    and grows by ``realloc``: a 200 MiB body peaks at ~210 MiB of RSS, where reading it in
    one call into Rust and copying it into ``bytes`` peaked at ~630 MiB (``bench/client_bench.py
    rss``), and it arrives in 0.5-0.7x the time (fewer copies).
    """
    if declared is not None and declared > limit:
        raise _too_large(limit)
    buffer = io.BytesIO()
    total = 0
    while (chunk := await next_chunk()) is not None:
        total += buffer.write(chunk)  # bytes, or pyreqwest's own buffer type
        if total > limit:
            raise _too_large(limit)
    return buffer.getvalue()


def _too_large(limit: int) -> UpstreamError:
    return UpstreamError("oversize", f"the worker's response exceeded {limit} bytes")
