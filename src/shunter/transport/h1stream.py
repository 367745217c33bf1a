"""Streamed upstream requests on a small HTTP/1.1 client: asyncio Protocols and httptools.

Why our own: streams are where the clients we measured cost most (bench/README.md).
pyreqwest needs a thread hop per chunk and ~64 KiB per open stream; aiohttp ~12 KiB but
~400 µs more time to first byte here. This client writes the request in one ``write``,
hands each body chunk to the relay from the protocol callback with no extra task, and holds
a few KiB per connection. It does only what relaying an inference stream needs:

- keep-alive pool per worker; a connection goes back only after a complete response;
- ``Content-Length``, chunked and close-delimited bodies (httptools decodes chunking);
- read back-pressure: reading pauses while unconsumed chunks pile up;
- timeouts: connect, and the wait for the head and between chunks (one timer handle,
  re-armed per read, not a task per read);
- a request on a pooled connection that dies before any answer is sent again once on a new
  connection (the worker closed it while idle), never after bytes came back;
- TLS (and mTLS) through an ``ssl.SSLContext``;
- closing a stream before its end closes its connection, so the worker sees the client go.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from urllib.parse import urlsplit

import httptools

from shunter.transport.base import HeaderPairs, UpstreamError

PAUSE_AT = 64  # unconsumed chunks before reading pauses


class _Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.chunks: deque[bytes] = deque()
        self.head: asyncio.Future[None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.complete = False
        self.error: UpstreamError | None = None
        self.got_bytes = False
        self.keep_alive = True
        self.paused = False
        self.timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError("io", f"malformed response from worker: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.complete and self.error is None:
            if self.head is not None and self.head.done() and not self.keep_alive:
                # No length and no chunking: the body ends when the connection does.
                self.complete = True
            else:
                self._fail(UpstreamError("io", "the worker closed the connection"))
        self._wake()

    # --- httptools callbacks ------------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.status = self.parser.get_status_code()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        if 100 <= self.status < 200:  # an interim answer: the real one follows
            self.headers = []
            return
        self.keep_alive = self.parser.should_keep_alive()
        if self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        if len(self.chunks) >= PAUSE_AT and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:
            return
        self.complete = True
        self._wake()

    # --- used by the client ----------------------------------------------------------------

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def arm(self, seconds: float) -> None:
        self.disarm()
        self.timer = self.loop.call_later(seconds, self._timed_out)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        self._fail(UpstreamError("timeout", "worker timed out"))
        self.close()

    def reset(self) -> None:
        """Ready for the next request on this (kept-alive) connection."""
        self.parser = httptools.HttpResponseParser(self)
        self.chunks.clear()
        self.status, self.headers = 0, []
        self.complete = self.got_bytes = self.paused = False
        self.error = self.head = self.waiter = None

    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        self.disarm()
        if self.transport is not None:
            self.transport.close()


class H1Stream:
    """One streamed response; ``aclose`` returns or closes its connection."""

    __slots__ = ("_client", "_conn", "headers", "status")

    def __init__(self, client: H1StreamClient, conn: _Connection) -> None:
        self._client = client
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers

    async def next_chunk(self) -> bytes | None:
        conn = self._conn
        while True:
            if conn.chunks:
                chunk = conn.chunks.popleft()
                if conn.paused and len(conn.chunks) < PAUSE_AT // 2 and conn.transport:
                    conn.paused = False
                    conn.transport.resume_reading()
                return chunk
            if conn.error is not None:
                raise conn.error
            if conn.complete:
                conn.disarm()
                return None
            conn.waiter = conn.loop.create_future()
            conn.arm(self._client.read_timeout)
            await conn.waiter
            conn.waiter = None

    async def aclose(self) -> None:
        conn = self._conn
        conn.disarm()
        if conn.complete and conn.error is None and conn.keep_alive and conn.usable():
            self._client.release(conn)
        else:
            conn.close()


class H1StreamClient:
    """One worker's pool of streaming connections."""

    def __init__(self, base_url: str, connect_timeout: float, read_timeout: float,
                 ssl_context: ssl.SSLContext | None = None) -> None:  # fmt: skip
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.host_header = parts.netloc.encode("latin-1")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.ssl_context = (ssl_context or ssl.create_default_context()) if self.tls else None
        self.idle: deque[_Connection] = deque()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(loop), self.host, self.port,
                                       ssl=self.ssl_context),
                self.connect_timeout,
            )  # fmt: skip
        except TimeoutError:
            raise UpstreamError("timeout", "connecting to the worker timed out") from None
        except OSError as exc:
            raise UpstreamError("connect", f"cannot connect to worker: {exc}") from None
        return conn

    def release(self, conn: _Connection) -> None:
        conn.reset()
        self.idle.append(conn)

    async def stream(self, method: str, url: str, headers: HeaderPairs,
                     body: bytes | None) -> H1Stream:  # fmt: skip
        target = url.split("/", 3)
        path = ("/" + target[3]) if len(target) > 3 else "/"
        head = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method.encode(), path.encode("latin-1"),
                                                     self.host_header)]  # fmt: skip
        head += [b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        payload = body or b""
        head.append(b"content-length: %d\r\n\r\n" % len(payload))
        request = b"".join(head) + payload
        while self.idle:
            conn = self.idle.pop()
            if not conn.usable():
                continue
            try:
                return await self._send(conn, request)
            except UpstreamError:
                if conn.got_bytes:
                    raise
                # The worker had closed this idle connection: try once on a new one.
                break
        return await self._send(await self._connect(), request)

    async def _send(self, conn: _Connection, request: bytes) -> H1Stream:
        conn.head = conn.loop.create_future()
        assert conn.transport is not None
        conn.transport.write(request)
        conn.arm(self.read_timeout)
        try:
            await conn.head
        except BaseException:
            conn.close()
            raise
        finally:
            conn.disarm()
        return H1Stream(self, conn)

    async def close(self) -> None:
        while self.idle:
            self.idle.pop().close()
