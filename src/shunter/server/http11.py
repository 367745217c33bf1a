"""A lean HTTP/1.1 server for ASGI ``http`` apps, on asyncio Protocols and httptools.

Why not uvicorn: measured on this project's proxy benchmark, uvicorn's per-request
machinery (header validation loops, a keep-alive timer per request, flow-control objects,
middleware) cost ~30 µs of CPU per proxied request, more than our whole router; a bare
protocol on the same parser and loop did not (bench/README.md). This server keeps the ASGI
message shapes, so the app stays a plain ASGI callable and could run under uvicorn again.

What it does: keep-alive (idle connections closed after ``keep_alive_secs`` by one sweeper,
not a timer per request), pipelined requests answered in order, request bodies streamed
through ``receive()`` with read back-pressure, ``Expect: 100-continue``, responses with a
Content-Length written in one ``write`` (head and body together), chunked streaming with
write back-pressure, ``http.disconnect`` when the client leaves, 400 on unparsable input,
graceful shutdown that drains in-flight requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import httptools

from shunter.wire.asgi import Message, Receive, Scope, Send

log = logging.getLogger("shunter.http")

App = Callable[[Scope, Receive, Send], Awaitable[None]]

HIGH_WATER = 256 * 1024  # pause reading when this much request body waits unread
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_DISCONNECT: Message = {"type": "http.disconnect"}


class _DateCache:
    """The Date header value, formatted at most once a second."""

    def __init__(self) -> None:
        self._second = 0
        self._value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


_date = _DateCache()


class Cycle:
    """One request/response exchange on a connection."""

    __slots__ = (
        "body",
        "body_complete",
        "body_delivered",
        "chunked",
        "conn",
        "disconnected",
        "event",
        "expect_continue",
        "head",
        "keep_alive",
        "response_complete",
        "response_started",
        "scope",
    )

    def __init__(self, conn: HttpProtocol, scope: Scope, keep_alive: bool) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.body = bytearray()
        self.body_complete = False
        self.body_delivered = False
        self.event = asyncio.Event()
        self.disconnected = False
        self.expect_continue = False
        self.response_started = False
        self.response_complete = False
        self.chunked = False
        self.head = b""

    # --- ASGI receive ------------------------------------------------------------------------

    async def receive(self) -> Message:
        if self.expect_continue and not self.disconnected:
            self.expect_continue = False
            self.conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while True:
            if self.disconnected:
                return _DISCONNECT
            if not self.body_delivered:
                if self.body or self.body_complete:
                    chunk = bytes(self.body)
                    self.body.clear()
                    self.conn.resume_reading()
                    self.body_delivered = self.body_complete
                    return {"type": "http.request", "body": chunk,
                            "more_body": not self.body_complete}  # fmt: skip
            elif self.response_complete:
                return _DISCONNECT
            # After the whole body, receive() waits for the end of the exchange: the
            # client leaving (http.disconnect) or the response completing.
            await self.event.wait()
            self.event.clear()

    # --- ASGI send -----------------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        conn = self.conn
        if self.disconnected:
            return
        if conn.write_paused:
            await conn.drain()
            if self.disconnected:
                return
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected http.response.start, got {kind}")
            self.response_started = True
            self.head = self._head(message["status"], message.get("headers", ()))
            return
        if kind != "http.response.body" or self.response_complete:
            raise RuntimeError(f"unexpected ASGI message {kind} at this point")
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        transport = conn.transport
        head, self.head = self.head, b""
        if self.chunked:
            out = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
            if not more:
                out += b"0\r\n\r\n"
            transport.write(head + out if head else out)
        elif head or body:
            transport.write(head + body)
        if not more:
            self.response_complete = True
            self.event.set()
            conn.response_done(self)

    def _head(self, status: int, headers: Any) -> bytes:
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))]
        has_length = has_date = False
        for name, value in headers:
            if name == b"content-length":
                has_length = True
            elif name == b"date":
                has_date = True
            elif name == b"connection" and value.lower() == b"close":
                self.keep_alive = False
            lines.append(b"%s: %s\r\n" % (name, value))
        if not has_date:
            lines.append(b"date: %s\r\n" % _date.get())
        if not has_length and status >= 200 and status not in (204, 304):
            if self.scope["http_version"] == "1.1":
                self.chunked = True
                lines.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False  # HTTP/1.0: the body ends when the connection does
        if not self.keep_alive:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)


class HttpProtocol(asyncio.Protocol):
    """One client connection: parses requests and runs one ASGI cycle at a time."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.app = server.app
        self.loop = server.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.cycle: Cycle | None = None  # the one being parsed
        self.queue: deque[Cycle] = deque()  # parsed or parsing, not yet answered
        self.running: Cycle | None = None
        self.reading_paused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.last_activity = time.monotonic()
        self.client: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        self.scheme = "http"

    # --- connection events -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.client = transport.get_extra_info("peername")
        self.local = transport.get_extra_info("sockname")
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for cycle in (*self.queue, *((self.running,) if self.running else ())):
            if not cycle.response_complete:
                cycle.disconnected = True
            cycle.event.set()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, b"upgrades are not supported")
        except httptools.HttpParserError as exc:
            log.debug("bad HTTP request", extra={"client": self.client, "error": str(exc)})
            self._reject(400, b"malformed HTTP request")

    def _reject(self, status: int, text: bytes) -> None:
        if self.running is None or self.running.response_complete:
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(text), text)
            )
        self.transport.close()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    async def drain(self) -> None:
        if self.transport.is_closing():
            return
        self.drain_waiter = self.loop.create_future()
        await self.drain_waiter
        self.drain_waiter = None

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.transport.is_closing():
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.transport.is_closing():
            self.reading_paused = False
            self.transport.resume_reading()

    # --- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parsed = httptools.parse_url(self.url)
        path = parsed.path.decode("latin-1")
        if "%" in path:
            from urllib.parse import unquote

            path = unquote(path)
        version = self.parser.get_http_version()
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": version,
            "server": self.local,
            "client": self.client,
            "scheme": self.scheme,
            "method": self.parser.get_method().decode("ascii"),
            "root_path": "",
            "path": path,
            "raw_path": parsed.path,
            "query_string": parsed.query or b"",
            "headers": self.headers,
        }
        keep_alive = self.parser.should_keep_alive() and not self.server.stopping
        cycle = Cycle(self, scope, keep_alive)
        for name, value in self.headers:
            if name == b"expect" and value.lower() == b"100-continue":
                cycle.expect_continue = True
        self.cycle = cycle
        self.queue.append(cycle)
        if self.running is None:
            self._start_next()

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if cycle is None or cycle.response_complete or cycle.disconnected:
            return
        cycle.body += body
        if len(cycle.body) > HIGH_WATER:
            self.pause_reading()
        cycle.event.set()

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if cycle is None:
            return
        cycle.body_complete = True
        cycle.event.set()
        self.cycle = None
        if self.running is not None and cycle is not self.running:
            self.pause_reading()  # pipelining: hold further input until we catch up

    # --- running cycles ----------------------------------------------------------------------

    def _start_next(self) -> None:
        if not self.queue:
            return
        cycle = self.queue.popleft()
        self.running = cycle
        task = self.loop.create_task(self._run(cycle))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    async def _run(self, cycle: Cycle) -> None:
        try:
            await self.app(cycle.scope, cycle.receive, cycle.send)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                self.transport.close()
                raise
            log.exception("error in ASGI application", extra={"path": cycle.scope["path"]})
            if not cycle.response_started and not cycle.disconnected:
                body = b"Internal Server Error"
                cycle.keep_alive = False
                await cycle.send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [
                            (b"content-type", b"text/plain"),
                            (b"content-length", b"%d" % len(body)),
                        ],
                    }
                )
                await cycle.send({"type": "http.response.body", "body": body})
            else:
                self.transport.close()
            return
        if not cycle.response_complete and not cycle.disconnected:
            log.error("ASGI app returned without completing the response")
            self.transport.close()

    def response_done(self, cycle: Cycle) -> None:
        self.last_activity = time.monotonic()
        self.running = None
        if not cycle.keep_alive or not cycle.body_complete:
            # An unread request body would be parsed as the next request: close instead.
            self.transport.close()
            return
        self.resume_reading()
        self._start_next()

    def is_idle(self) -> bool:
        return self.running is None and not self.queue


class HttpServer:
    def __init__(self, app: App, *, keep_alive_secs: float = 75.0) -> None:
        self.app = app
        self.keep_alive_secs = keep_alive_secs
        self.loop = asyncio.get_running_loop()
        self.connections: set[HttpProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.Task[None] | None = None

    async def listen(self, host: str, port: int, ssl: Any = None) -> int:
        server = await self.loop.create_server(
            lambda: HttpProtocol(self), host, port, backlog=4096, ssl=ssl, reuse_address=True
        )
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep())
        bound: int = server.sockets[0].getsockname()[1]
        return bound

    async def _sweep(self) -> None:
        """Close keep-alive connections idle for longer than ``keep_alive_secs``."""
        interval = min(5.0, self.keep_alive_secs / 2)
        while True:
            await asyncio.sleep(interval)
            cutoff = time.monotonic() - self.keep_alive_secs
            for conn in list(self.connections):
                if conn.is_idle() and conn.last_activity < cutoff:
                    conn.transport.close()

    async def shutdown(self, drain_secs: float) -> None:
        """Stop accepting, let in-flight requests finish (up to ``drain_secs``), close."""
        self.stopping = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            if conn.is_idle():
                conn.transport.close()
        deadline = self.loop.time() + drain_secs
        while self.tasks and self.loop.time() < deadline:
            await asyncio.wait(set(self.tasks), timeout=max(0.0, deadline - self.loop.time()))
        for task in list(self.tasks):
            task.cancel()
        for conn in list(self.connections):
            conn.transport.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers:
            await server.wait_closed()
