"""A reply, as backends and routers hand it back: status, headers, and a body.

The body is either the whole of it (``bytes``) or a ``Stream`` of chunks, each relayed as
it comes: an async generator (``Chunks``), or an object that is its own async iterator (an
HTTP worker's response, ``wire/client.py``: one generator fewer per relayed chunk).
Whoever writes the reply to the client iterates the stream and must ``aclose()`` it in the
end, finished or not: closing is what releases the worker's connection and the request's
bookkeeping when a client leaves half way.

A stream that cleans up in its ``finally`` (every one here does: it closes a worker's
connection, cancels a call, or counts a request as done) starts with ``yield b""`` and is
handed on ``primed``: an async generator closed before it ever ran skips its ``finally``,
which would leave a connection open, or a request counted in flight for good, whenever a
client leaves before the first chunk.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Protocol

Headers = list[tuple[bytes, bytes]]
Chunks = AsyncGenerator[bytes, None]  # what a stream written as an async generator is


class Stream(Protocol):
    """A streamed body: chunks by ``async for``, and ``aclose`` to release it."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    def __anext__(self) -> Awaitable[bytes]: ...

    def aclose(self) -> Awaitable[None]: ...


# The content types replies carry (the gateway's own and the simulated worker's).
JSON_CONTENT = (b"content-type", b"application/json")
TEXT_CONTENT = (b"content-type", b"text/plain; charset=utf-8")
SSE_CONTENT = (b"content-type", b"text/event-stream")


@dataclass(slots=True)
class Reply:
    status: int
    headers: Headers = field(default_factory=list)
    body: bytes | Stream = b""


async def primed(stream: Chunks) -> Chunks:
    """``stream`` advanced past its leading ``yield b""``, so that closing it always runs
    its cleanup (see the module docstring)."""
    first = await stream.__anext__()
    assert first == b"", "a primed stream starts with an empty chunk"
    return stream
