"""A client that answers from a function instead of the network, for tests.

As httpx's ``MockTransport``: ``MockClient(handler)`` calls ``handler(request)`` (a plain or
an ``async`` function) for every request and returns what it answers. A handler can raise
``UpstreamError`` to play a worker that is down, answer a ``MockResponse`` whose body is a
list of chunks to play a stream, or wait (``async``) to play a slow worker. ``requests``
keeps what was sent, in order, for assertions.

A whole gateway runs in process on mock clients: ``shunter.gateway.Network(control=...,
worker=...)`` takes factories that return them (one per worker URL), so routing, retries,
breakers and the API are tested without a socket.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from shunter.wire.base import BodySink, FullResponse, HeaderPairs, UpstreamError

__all__ = ["MockClient", "MockRequest", "MockResponse", "UpstreamError"]


@dataclass(frozen=True)
class MockRequest:
    method: str
    url: str
    headers: list[tuple[bytes, bytes]]
    body: bytes | None
    stream: bool  # sent through ``stream`` rather than ``request``

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


@dataclass
class MockResponse:
    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes | Sequence[bytes | UpstreamError] = b""  # chunks; an error breaks the stream


Handler = Callable[[MockRequest], "MockResponse | Awaitable[MockResponse]"]


class MockStream:
    """A streamed ``MockResponse``: its chunks one by one, then the end."""

    def __init__(self, response: MockResponse) -> None:
        self.status = response.status
        self.headers = list(response.headers)
        body = response.body
        self._chunks = [body] if isinstance(body, bytes) else list(body)
        self._ended: Callable[[], None] | None = None
        self.closed = False

    def __aiter__(self) -> MockStream:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.next_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def next_chunk(self) -> bytes | None:
        if not self._chunks:
            return None
        chunk = self._chunks.pop(0)
        if isinstance(chunk, UpstreamError):
            raise chunk
        return chunk

    async def relay(self, sink: BodySink) -> None:
        while (chunk := await self.next_chunk()) is not None:
            sink.write(chunk)

    def as_stream(self, ended: Callable[[], None] | None = None) -> MockStream:
        self._ended = ended
        return self

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._ended is not None:
            self._ended()


class MockClient:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[MockRequest] = []
        self.streams: list[MockStream] = []
        self.retired = False  # replaced: closed with ``retire`` rather than ``close``
        self.closed = False

    async def _answer(self, request: MockRequest) -> MockResponse:
        self.requests.append(request)
        answer = self.handler(request)
        if inspect.isawaitable(answer):
            answer = await answer
        assert isinstance(answer, MockResponse)
        return answer

    async def request(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> FullResponse:
        response = await self._answer(MockRequest(method, url, list(headers), body, False))
        whole = response.body
        if not isinstance(whole, bytes):
            whole = b"".join(c for c in whole if isinstance(c, bytes))
        return FullResponse(response.status, list(response.headers), whole)

    async def stream(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> MockStream:
        response = await self._answer(MockRequest(method, url, list(headers), body, True))
        stream = MockStream(response)
        self.streams.append(stream)
        return stream

    async def retire(self, grace: float) -> None:
        self.retired = True
        self.closed = True

    async def close(self) -> None:
        self.closed = True
