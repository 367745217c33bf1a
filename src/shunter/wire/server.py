"""A lean HTTP/1.1 server for ASGI ``http`` apps, on asyncio Protocols and httptools.

Why not uvicorn: measured on this project's proxy benchmark, uvicorn's per-request
machinery (header validation loops, a keep-alive timer per request, flow-control objects,
middleware) cost ~30 µs of CPU per proxied request, more than our whole router; a bare
protocol on the same parser and loop did not (bench/README.md). This server keeps the ASGI
message shapes, so the app stays a plain ASGI callable and could run under uvicorn again.

What it does: keep-alive (idle connections closed after ``keep_alive_secs``), pipelined
requests answered in order, request bodies streamed through ``receive()`` with read
back-pressure, ``Expect: 100-continue``, responses with a Content-Length written in one
``write`` (head and body together), chunked streaming with write back-pressure (and, for a
relay, a ``BodySink`` in the scope's extensions: chunks written from the worker
connection's callback, whose reading pauses while the client's buffer is full), no body for
HEAD, graceful shutdown that drains in-flight requests (``drain`` first, to send keep-alive
clients away while still serving, then ``shutdown``). When the client leaves before its
response is complete, the app's task is cancelled (aiohttp's "handler cancellation"): the
app needs no watcher of its own to give up on a worker nobody is waiting for, and
``receive()`` answers ``http.disconnect`` for an app that asks.

What it refuses, before the app sees anything (limits.py has the numbers and their sources):
a head over its size limits (431, or 414 for the request line; bytes are counted as they
arrive, so httptools never accumulates more than the limit), a head or a body that is too
slow (408), unparsable input and upgrades (400), more connections than the cap (503). An
error found behind pipelined requests is answered after their responses, in order. One
sweeper task enforces every deadline: no timer per request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import httptools

from shunter.wire.asgi import Message, Receive, Scope, Send
from shunter.wire.base import BODY_SINK, Throttled
from shunter.wire.limits import ServerLimits

log = logging.getLogger("shunter.http")

App = Callable[[Scope, Receive, Send], Awaitable[None]]

HIGH_WATER = 256 * 1024  # pause reading when this much request body waits unread
# After an error response the server stops writing (FIN) but keeps reading and dropping what
# the client still sends, for at most this long. Closing at once with unread input makes the
# kernel send a reset, which can destroy the error response before the client reads it.
LINGER_SECS = 2.0
REFUSAL_LOG_INTERVAL_SECS = 10.0  # at most one warning this often while connections are refused
# After the drain, the apps still running are cancelled and get this long to clean up (close
# their workers' streams, send a gRPC Abort) before the caller closes what they use.
CANCELLED_CLEANUP_SECS = 5.0
_LOCAL_ADDRESSES_MAX = 64  # the distinct local addresses whose tuple connections share

# A socket's address as asyncio gives it: (host, port) over IPv4, (host, port, flowinfo,
# scope_id) over IPv6. Not ``tuple[str, int]``: that is untrue of IPv6, and compiled (mypyc)
# it is unboxed and boxed again, so the one tuple connections share would become one each.
SocketAddress = tuple[Any, ...]

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_DISCONNECT: Message = {"type": "http.disconnect"}
# A request line is method SP target SP "HTTP/1.1", and no method is shorter than "GET".
_LINE_FRAME = len(b"  HTTP/1.1")
_SHORTEST_METHOD = len(b"GET")


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


def _error_response(status: int, text: bytes) -> bytes:
    """A complete response that ends the connection, for errors the server answers itself."""
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
        b"connection: close\r\ndate: %s\r\n\r\n%s"
        % (status, _REASONS[status], len(text), _date.get(), text)
    )


class _Refusal(Exception):
    """Raised inside a parser callback to stop parsing and answer ``status``."""

    def __init__(self, status: int, text: bytes) -> None:
        super().__init__(text.decode())
        self.status = status
        self.text = text


# --- response header checks (uvicorn's rules) ----------------------------------------------

_INVALID_NAME = re.compile(rb'[\x00-\x1F\x7F()<>@,;:\[\]={} \t\\"]')  # uvicorn's HEADER_RE
# A header value must hold no control byte but TAB (uvicorn's HEADER_VALUE_RE). This table
# maps each of them to a space and every other byte to itself: a value it changes is invalid
# (measured: ~60% of the instructions of a regex search per value).
_MARK_CONTROLS = bytes(0x20 if (c < 0x20 and c != 0x09) or c == 0x7F else c for c in range(256))
_PLAIN, _LENGTH, _TRANSFER, _CONNECTION, _DATE = range(5)
_SPECIAL = {
    b"content-length": _LENGTH,
    b"transfer-encoding": _TRANSFER,
    b"connection": _CONNECTION,
    b"date": _DATE,
}
# Header names already checked, with their kind. The relay sends the same few names on every
# response, so a dict lookup replaces a regex search and a lower() per header. Measured with
# callgrind for a 6-header head: 22k instructions with these checks, 17k without; a regex
# search per name and per value, as uvicorn does, would add ~19k.
_known_names: dict[bytes, int] = {}
_KNOWN_NAMES_MAX = 1024


def _learn_name(name: bytes) -> int:
    """The kind of a header name not seen before; raises RuntimeError if it is invalid."""
    if not name or _INVALID_NAME.search(name):
        raise RuntimeError(f"invalid response header name {name!r}")
    kind = _SPECIAL.get(name.lower(), _PLAIN)
    if len(_known_names) < _KNOWN_NAMES_MAX:
        _known_names[name] = kind
    return kind


# A scope's method and HTTP version as strings every request shares: decoded anew, each
# was a string of its own (~50 bytes a request, kept as long as its stream runs).
_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")}
_HTTP_VERSIONS = {v: v for v in ("1.0", "1.1")}
_BODYLESS_STATUSES = frozenset((*range(100, 200), 204, 304))
# How a response body goes on the wire.
_RAW = 0  # as sent: a declared Content-Length, or (HTTP/1.0) until the connection closes
_CHUNKED = 1
_NO_BODY = 2  # HEAD, 1xx, 204, 304: whatever the app sends is dropped


class Cycle:
    """One request/response exchange on a connection."""

    __slots__ = (
        "body",
        "body_complete",
        "body_delivered",
        "conn",
        "disconnected",
        "event",
        "expect_continue",
        "framing",
        "head",
        "head_request",
        "keep_alive",
        "reading",
        "remaining",
        "response_complete",
        "response_started",
        "scope",
        "task",
    )

    def __init__(
        self, conn: HttpProtocol, scope: Scope, keep_alive: bool, head_request: bool
    ) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.head_request = head_request
        self.body = bytearray()
        self.body_complete = False
        self.body_delivered = False
        # What receive() waits on, made when it first has to wait: most requests arrive
        # whole with their head and never wait (an Event per request was ~1 µs of them).
        self.event: asyncio.Event | None = None
        self.disconnected = False
        self.expect_continue = False
        self.response_started = False
        self.response_complete = False
        self.framing = _RAW
        self.remaining = -1  # body bytes still owed to a declared Content-Length; -1: none
        self.head = b""  # the response head, until it is written with the first body bytes
        self.task: asyncio.Task[None] | None = None  # the app running this exchange
        # A relay's source (``throttle``): paused while the client's buffer is full.
        self.reading: Throttled | None = None
        scope["extensions"] = {BODY_SINK: self}

    def wake(self) -> None:
        """Something receive() may be waiting for happened (a body chunk, the body's end,
        the client leaving, the response's end)."""
        if self.event is not None:
            self.event.set()

    def _waiting(self) -> asyncio.Event:
        if self.event is None:
            self.event = asyncio.Event()
        return self.event

    def nothing_sent(self) -> bool:
        """Whether no byte of the response has been written (so another can take its place)."""
        return not self.response_started or bool(self.head)

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
                    more = not self.body_complete
                    return {"type": "http.request", "body": chunk, "more_body": more}
                # The app waits for body bytes: the body deadline runs (HttpServer._sweep).
                self.conn.body_wait_since = time.monotonic()
                try:
                    await self._waiting().wait()
                finally:
                    self.conn.body_wait_since = 0.0
            elif self.response_complete:
                return _DISCONNECT
            else:
                # After the whole body, receive() waits for the end of the exchange: the
                # client leaving (http.disconnect) or the response completing.
                await self._waiting().wait()
            self._waiting().clear()

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
            self.head = self._head(message["status"], message.get("headers", ()))
            self.response_started = True
            self.expect_continue = False  # answered without the body: no 100 Continue now
            return
        if kind != "http.response.body" or self.response_complete:
            raise RuntimeError(f"unexpected ASGI message {kind} at this point")
        self._write_body(message.get("body", b""), message.get("more_body", False))

    # --- the relay's sink (``wire/base.py``'s ``BodySink``) -------------------------------------

    def write(self, chunk: bytes) -> None:
        """A chunk of a relayed body, written from the worker connection's callback once the
        response has started (``send``'s ``http.response.start``); the end still goes
        through ``send``. Dropped once the client has left: its task is being cancelled.

        Every chunk after the first of a chunked response is framed here, without the
        call through ``_write_body`` (20.4k -> 19.5k instructions per relayed chunk)."""
        if self.disconnected:
            return
        if self.framing == _CHUNKED and not self.head and chunk:
            self.conn.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        else:
            self._write_body(chunk, True)

    def throttle(self, reading: Throttled) -> None:
        """Pause ``reading`` whenever the client's buffer is full, and resume it once it
        has drained (the relay's back-pressure, in place of ``send`` awaiting a drain)."""
        self.reading = reading
        if self.conn.write_paused:
            reading.pause_reading()

    def _write_body(self, body: bytes, more: bool) -> None:
        conn = self.conn
        transport = conn.transport
        head = self.head
        framing = self.framing
        if framing == _RAW:
            if self.remaining >= 0:
                self.remaining -= len(body)
                if self.remaining < 0:
                    raise RuntimeError("response body longer than its Content-Length")
            if head:
                self.head = b""
                transport.write(head + body)
            elif body:
                transport.write(body)
        elif framing == _CHUNKED:
            out = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
            if not more:
                out += b"0\r\n\r\n"
            if head:
                self.head = b""
                out = head + out
            transport.write(out)
        elif head:  # _NO_BODY
            self.head = b""
            transport.write(head)
        if not more:
            self.response_complete = True
            if self.remaining > 0:
                log.warning(
                    "response shorter than its Content-Length: closing the connection",
                    extra={"path": self.scope["path"], "missing_bytes": self.remaining},
                )
                self.keep_alive = False
            self.wake()
            conn.response_done(self)

    def _head(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
        """The response head; raises RuntimeError (nothing written) on an invalid header."""
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))]
        length = -1
        app_chunked = has_date = has_connection = app_closed = False
        known = _known_names
        for name, value in headers:
            kind = known.get(name)
            if kind is None:
                kind = _learn_name(name)
            if kind == _LENGTH:
                if length >= 0 or app_chunked or not value.isdigit():
                    raise RuntimeError(f"invalid response content-length {value!r}")
                length = int(value)
            elif value.translate(_MARK_CONTROLS) != value:
                raise RuntimeError(f"invalid value for response header {name!r}")
            elif kind:
                if kind == _TRANSFER:
                    if value.lower() != b"chunked" or length >= 0:
                        raise RuntimeError(f"unsupported response transfer-encoding {value!r}")
                    app_chunked = True
                elif kind == _CONNECTION:
                    has_connection = True
                    if b"close" in [token.strip().lower() for token in value.split(b",")]:
                        app_closed = True
                        self.keep_alive = False
                else:
                    has_date = True
            lines.append(b"%s: %s\r\n" % (name, value))
        if not has_date:
            lines.append(b"date: %s\r\n" % _date.get())
        if status in _BODYLESS_STATUSES or self.head_request:
            self.framing = _NO_BODY
        elif length >= 0:
            self.remaining = length
        elif app_chunked:
            self.framing = _CHUNKED
        elif self.scope["http_version"] == "1.1":
            self.framing = _CHUNKED
            lines.append(b"transfer-encoding: chunked\r\n")
        else:
            self.keep_alive = False  # HTTP/1.0: the body ends when the connection does
        if self.expect_continue or self.conn.server.draining:
            # No 100 Continue now: the body may never come. Draining: the client's next
            # request must open a new connection, which a balancer sends elsewhere.
            self.keep_alive = False
        if not self.keep_alive:
            if not app_closed:
                lines.append(b"connection: close\r\n")
        elif not has_connection and self.scope["http_version"] == "1.0":
            lines.append(b"connection: keep-alive\r\n")  # HTTP/1.0 closes unless told
        lines.append(b"\r\n")
        return b"".join(lines)


class _Lingering(asyncio.Protocol):
    """Takes over a connection after its error response: drops what the client still sends
    and closes when the client does, or after ``LINGER_SECS``."""

    def __init__(self, conn: HttpProtocol) -> None:
        self.conn = conn
        self.timer = conn.loop.call_later(LINGER_SECS, conn.transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        self.conn.connection_lost(exc)


class HttpProtocol(asyncio.Protocol):
    """One client connection: parses requests and runs one ASGI cycle at a time."""

    __slots__ = (
        "app",
        "body_wait_since",
        "client",
        "cycle",
        "drain_waiter",
        "framing_bytes",
        "head_counted",
        "head_room",
        "head_started",
        "headers",
        "in_head",
        "last_activity",
        "local",
        "loop",
        "lost",
        "max_head",
        "max_header",
        "max_headers",
        "max_method_and_target",
        "max_target",
        "next_cycle",
        "parser",
        "pending_error",
        "queue",
        "reading_paused",
        "room_for_long_lines",
        "running",
        "scheme",
        "server",
        "task",
        "transport",
        "url",
        "waiter",
        "write_paused",
    )

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.app = server.app
        self.loop = server.loop
        limits = server.limits
        self.max_head = limits.max_request_head_bytes
        self.max_method_and_target = server.max_method_and_target
        self.max_target = server.max_target
        self.max_header = limits.max_header_bytes
        self.room_for_long_lines = server.room_for_long_lines
        self.max_headers = limits.max_headers
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.cycle: Cycle | None = None  # the one whose body is being parsed
        # Parsed or parsing, not yet answered. A list, not a deque: it rarely holds more
        # than one (pipelining is rare, and a read's worth at most), and an empty deque is
        # 760 bytes against a list's 56, held by every open connection.
        self.queue: list[Cycle] = []
        self.running: Cycle | None = None
        # The connection's task (``_serve``), the exchange handed to it and not yet begun,
        # what it waits on between exchanges, and whether the connection is gone.
        self.task: asyncio.Task[None] | None = None
        self.next_cycle: Cycle | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.lost = False
        self.reading_paused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.last_activity = time.monotonic()
        self.client: SocketAddress | None = None
        self.local: SocketAddress | None = None
        self.scheme = "http"
        # Head accounting: bytes received between requests and in a head count against
        # max_head as they arrive (head_room is what is left), so that httptools never holds
        # more of a head than the limit allows.
        self.in_head = True
        self.head_room = self.max_head
        self.head_started = 0.0  # monotonic time of a head's first byte; 0: no head begun
        self.head_counted = True  # False: it began inside the read that ended its predecessor
        # Bytes of reads after a head that carried no body: chunk lines and trailers (which
        # httptools accumulates). A read with body bytes resets it, so it grows only with a
        # long chunk line or long trailers, give or take one read.
        self.framing_bytes = 0
        self.body_wait_since = 0.0  # when the app started waiting for body bytes; 0: it isn't
        self.pending_error: bytes | None = None  # the error response owed after the queue

    # --- connection events -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        if len(server.connections) >= server.max_connections:
            server.refuse(self.transport)  # closing stops reading: nothing is ever parsed
            return
        self.client = transport.get_extra_info("peername")
        self.local = server.local_address(transport.get_extra_info("sockname"))
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for cycle in (*self.queue, *((self.running,) if self.running else ())):
            if not cycle.response_complete:
                cycle.disconnected = True
                if cycle.task is not None:
                    # Nobody will read the answer: stop the app now, so whatever it waits
                    # on (a worker's reply, a stream) is given up at once.
                    cycle.task.cancel()
            cycle.wake()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)
        self.lost = True
        self._wake_task()  # an idle task ends

    def data_received(self, data: bytes) -> None:
        now = self.last_activity = time.monotonic()
        try:
            if not self.in_head:
                self._feed_body(data)
            elif len(data) <= self.head_room:
                if not self.head_started:
                    self.head_started = now
                self.head_room -= len(data)
                self.parser.feed_data(data)
            else:
                if not self.head_started:
                    self.head_started = now
                self._feed_past_head_room(data)
            if self.head_started and len(self.headers) > self.max_headers:
                raise _Refusal(431, b"too many request headers")  # in a head still coming
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refusal):
                self.fail(cause.status, cause.text)
            elif isinstance(cause, httptools.HttpParserError):  # parse_url: a bad target
                self._reject_malformed(cause)
            else:
                log.error("HTTP parser callback failed", exc_info=cause)
                self.fail(500, b"internal server error")
            return
        except httptools.HttpParserUpgrade:
            # Connection: upgrade, or CONNECT. The parser stopped right after that request's
            # end, in this read, so its cycle is the last queued and has not started.
            if self.queue:
                self.queue.pop()
            self.fail(400, b"upgrades are not supported")
            return
        except httptools.HttpParserError as exc:
            self._reject_malformed(exc)
            return
        except _Refusal as refusal:
            self.fail(refusal.status, refusal.text)
            return
        if self.running is None and self.queue:
            self._start_next()  # started only now: a request that failed to parse never runs

    def _reject_malformed(self, exc: Exception) -> None:
        log.debug("bad HTTP request", extra={"client": self.client, "error": str(exc)})
        self.fail(400, b"malformed HTTP request: %s" % str(exc).encode("latin-1", "replace"))

    def _feed_body(self, data: bytes | memoryview) -> None:
        self.framing_bytes += len(data)
        self.parser.feed_data(data)
        if self.framing_bytes > self.max_head:
            raise _Refusal(431, b"chunk line or trailers too large")

    def _feed_past_head_room(self, data: bytes | memoryview) -> None:
        """Feed a read longer than what the current head may still take: up to the limit,
        and on only if the head ended within that (the rest is a body or the next request)."""
        while True:
            room = self.head_room
            view = memoryview(data)
            self.head_room = 0
            self.parser.feed_data(view[:room])
            if self.in_head and self.head_room == 0:  # on_message_complete gives room back
                if len(self.url) > self.max_target:  # still in the request line
                    raise _Refusal(414, b"request line too long")
                raise _Refusal(431, b"request head too large")
            data = view[room:]
            if not self.in_head:
                self._feed_body(data)
                return
            if len(data) <= self.head_room:
                self.head_room -= len(data)
                self.parser.feed_data(data)
                return

    def fail(self, status: int, text: bytes) -> None:
        """Stop reading; answer what was received in full, then ``status``, then close.

        The request being parsed when the error came is dropped: its app (if running) sees
        ``http.disconnect`` and what it sends is discarded.
        """
        if self.pending_error is not None:
            return
        log.debug(
            "refusing a request",
            extra={"client": self.client, "status": status, "reason": text.decode("latin-1")},
        )
        self.pending_error = _error_response(status, text)
        self.pause_reading()
        broken, self.cycle = self.cycle, None
        if broken is not None:
            broken.disconnected = True
            broken.wake()
            if broken is self.running:
                if broken.nothing_sent():
                    self._send_pending_error()
                else:
                    self.transport.close()  # its response has begun: nothing else can follow
                return
            self.queue.remove(broken)
        if self.running is None:
            if self.queue:
                self._start_next()  # response_done sends the error after the last one
            else:
                self._send_pending_error()

    def _send_pending_error(self) -> None:
        transport = self.transport
        if transport.is_closing() or self.pending_error is None:
            return
        transport.write(self.pending_error)
        if not transport.can_write_eof():  # TLS: no half-close
            transport.close()
            return
        transport.write_eof()
        transport.set_protocol(_Lingering(self))
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        running = self.running
        if running is not None and running.reading is not None:
            running.reading.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        running = self.running
        if running is not None and running.reading is not None:
            running.reading.resume_reading()
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
        if self.reading_paused and self.pending_error is None and not self.transport.is_closing():
            self.reading_paused = False
            self.transport.resume_reading()

    # --- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        if not self.head_started:  # the head began inside a read that finished a request
            self.head_started = self.last_activity
            self.head_counted = False

    def on_url(self, url: bytes) -> None:
        self.url += url  # bounded by the head room; checked when the head is complete

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        method = parser.get_method()
        if self.head_room < self.room_for_long_lines or not self.head_counted:
            self._check_line_lengths(method)
        self.head_counted = True
        if len(self.headers) > self.max_headers:
            raise _Refusal(431, b"too many request headers")
        self.in_head = False
        self.head_started = 0.0
        parsed: Any = httptools.parse_url(self.url)  # its query is None when absent
        path = parsed.path.decode("latin-1")
        if "%" in path:
            from urllib.parse import unquote

            path = unquote(path)
        headers, self.headers = self.headers, []  # trailers, if any, go to the new list
        version = parser.get_http_version()
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": _HTTP_VERSIONS.get(version, version),
            "server": self.local,
            "client": self.client,
            "scheme": self.scheme,
            "method": _METHODS.get(method) or method.decode("ascii"),
            "root_path": "",
            "path": path,
            "raw_path": parsed.path,
            "query_string": parsed.query or b"",
            "headers": headers,
        }
        cycle = Cycle(self, scope, parser.should_keep_alive(), method == b"HEAD")
        for name, value in headers:
            if name == b"expect" and value.lower() == b"100-continue":
                cycle.expect_continue = True
        self.cycle = cycle
        self.queue.append(cycle)

    def _check_line_lengths(self, method: bytes) -> None:
        """The request line and each header against their limits: needed only for a head
        that took more bytes than a limit (or whose size was not counted)."""
        if len(method) + len(self.url) > self.max_method_and_target:
            raise _Refusal(414, b"request line too long")
        max_header = self.max_header
        for name, value in self.headers:
            if len(name) + len(value) > max_header:
                raise _Refusal(431, b"request header too large")

    def on_body(self, body: bytes) -> None:
        self.framing_bytes = 0
        cycle = self.cycle
        if cycle is None or cycle.response_complete or cycle.disconnected:
            return
        cycle.body += body
        if len(cycle.body) > HIGH_WATER:
            self.pause_reading()
        cycle.wake()

    def on_message_complete(self) -> None:
        self.in_head = True
        self.head_room = self.max_head
        self.framing_bytes = 0
        if self.headers:
            self.headers = []  # trailers: ASGI has no place for them
        cycle = self.cycle
        if cycle is None:
            return
        cycle.body_complete = True
        cycle.wake()
        self.cycle = None
        if (self.running is not None and cycle is not self.running) or len(self.queue) > 1:
            self.pause_reading()  # pipelining: hold further input until we catch up

    # --- running cycles ----------------------------------------------------------------------

    def _start_next(self) -> None:
        if not self.queue:
            return
        cycle = self.queue.pop(0)
        self.running = cycle
        if self.task is None:
            self.task = self.loop.create_task(self._serve(cycle))
        else:  # it runs the exchange once the one before has returned
            self.next_cycle = cycle
            self._wake_task()

    def _wake_task(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _serve(self, cycle: Cycle | None) -> None:
        """The connection's task: its exchanges, one after another, until it closes.

        One task per connection, not per request: a task's making, its entry in asyncio's
        set of all tasks and its end cost ~6k instructions where waking one that waits
        costs ~1k (callgrind; a proxied request is ~365k). A client that leaves cancels the
        task (``connection_lost``): nothing else would run on its connection anyway.
        """
        task = self.task
        assert task is not None
        tasks = self.server.tasks  # the tasks running an app, for shutdown
        while cycle is not None and not cycle.disconnected:
            cycle.task = task
            tasks.add(task)
            try:
                await self.app(cycle.scope, cycle.receive, cycle.send)
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError):
                    if cycle.disconnected:
                        return  # we cancelled it: the client left
                    self.transport.close()
                    raise
                log.exception("error in ASGI application", extra={"path": cycle.scope["path"]})
                if not cycle.disconnected and cycle.nothing_sent():
                    cycle.keep_alive = False
                    cycle.response_started = cycle.response_complete = True
                    self.transport.write(_error_response(500, b"Internal Server Error"))
                    cycle.wake()
                    self.response_done(cycle)
                else:
                    self.transport.close()
                    return
            else:
                if not cycle.response_complete and not cycle.disconnected:
                    log.error("ASGI app returned without completing the response")
                    self.transport.close()
                    return
            finally:
                tasks.discard(task)
                # The scope's sink is the cycle itself, and the cycle holds the scope: left
                # in place, that loop kept every request's objects for the cyclic GC, whose
                # passes took the p99 at 32 connections from ~1 ms to 17-45 ms.
                cycle.scope.pop("extensions", None)
            cycle = self._take_next_cycle()
            if cycle is None and not self.lost:
                self.waiter = self.loop.create_future()
                await self.waiter
                self.waiter = None
                cycle = self._take_next_cycle()

    def _take_next_cycle(self) -> Cycle | None:
        """The exchange handed to the task, if any, taken (a call, not an inline read: across
        the ``await`` above, mypy would still see the None assigned before it)."""
        cycle, self.next_cycle = self.next_cycle, None
        return cycle

    def response_done(self, cycle: Cycle) -> None:
        now = self.last_activity = time.monotonic()
        self.running = None
        cycle.reading = None  # the relay's source goes on without this client
        if self.head_started:
            self.head_started = now  # a head that waited behind this response starts afresh
        if not cycle.keep_alive or not cycle.body_complete:
            # An unread request body would be parsed as the next request: close instead.
            self.transport.close()
            return
        if self.queue:
            self._start_next()
        elif self.pending_error is not None:
            self._send_pending_error()
            return
        self.resume_reading()

    def is_idle(self) -> bool:
        return self.running is None and not self.queue


class HttpServer:
    def __init__(
        self,
        app: App,
        *,
        keep_alive_secs: float = 75.0,
        limits: ServerLimits | None = None,
    ) -> None:
        self.app = app
        self.keep_alive_secs = keep_alive_secs
        self.limits = limits = (limits or ServerLimits()).validate()
        # The limits' derived forms, worked out here once: computed per connection, each
        # was an int object of its own (96 bytes a connection).
        self.max_method_and_target = limits.max_request_line_bytes - _LINE_FRAME
        self.max_target = self.max_method_and_target - _SHORTEST_METHOD
        # While a head's room stays above this, none of its lines can be over its limit.
        self.room_for_long_lines = limits.max_request_head_bytes - min(
            limits.max_header_bytes, limits.max_request_line_bytes
        )
        self.max_connections = self.limits.connection_cap()
        self.loop = asyncio.get_running_loop()
        self.connections: set[HttpProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.draining = False  # every response ends its connection (drain(), shutdown())
        self.refused = 0  # connections refused at the cap, ever
        self._refused_at_last_warning = 0
        self._next_refusal_warning = 0.0
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._local_addresses: dict[SocketAddress, SocketAddress] = {}

    def local_address(self, address: SocketAddress) -> SocketAddress:
        """``address`` (a connection's own end), as one object shared by every connection
        to it: each would otherwise keep a tuple of its own (~140 bytes a connection). The
        machine has a few addresses; past a few, the rest stay unshared."""
        shared = self._local_addresses.get(address)
        if shared is not None:
            return shared
        if len(self._local_addresses) < _LOCAL_ADDRESSES_MAX:
            self._local_addresses[address] = address
        return address

    async def listen(self, host: str, port: int, ssl: Any = None, reuse_port: bool = False) -> int:
        """Listen on host:port; ``reuse_port``: alongside other processes listening there
        with it too (SO_REUSEPORT: the kernel spreads new connections over them)."""
        server = await self.loop.create_server(
            lambda: HttpProtocol(self),
            host,
            port,
            backlog=4096,
            ssl=ssl,
            reuse_address=True,
            reuse_port=reuse_port or None,
        )
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep())
        sockets: Any = getattr(server, "sockets")  # noqa: B009 (uvloop: a list; typeshed: tuple)
        bound: int = sockets[0].getsockname()[1]
        return bound

    def refuse(self, transport: asyncio.Transport) -> None:
        """Answer a connection over the cap with a 503 and close it; warn now and then."""
        transport.write(_error_response(503, b"too many connections"))
        transport.close()
        self.refused += 1
        now = time.monotonic()
        if now >= self._next_refusal_warning:
            self._next_refusal_warning = now + REFUSAL_LOG_INTERVAL_SECS
            log.warning(
                "connection limit reached: refusing new connections with 503",
                extra={
                    "max_connections": self.max_connections,
                    "refused_since_last_warning": self.refused - self._refused_at_last_warning,
                },
            )
            self._refused_at_last_warning = self.refused

    async def _sweep(self) -> None:
        """Enforce the deadlines: idle keep-alive, slow heads, stalled bodies.

        One pass over the connections every ``interval``, so a deadline fires up to a
        quarter of itself late (at most 5 s): 30-35 s for the 30 s defaults.
        """
        limits = self.limits
        head_secs = limits.request_head_timeout_secs
        body_secs = limits.request_body_timeout_secs
        interval = min(5.0, self.keep_alive_secs / 2, head_secs / 4, body_secs / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            idle_cutoff = now - self.keep_alive_secs
            head_cutoff = now - head_secs
            body_cutoff = now - body_secs
            for conn in list(self.connections):
                if conn.pending_error is not None:
                    continue
                if conn.running is None and not conn.queue:
                    if conn.head_started:
                        if conn.head_started < head_cutoff:
                            conn.fail(408, b"request head not received in time")
                    elif conn.last_activity < idle_cutoff:
                        conn.transport.close()
                elif 0.0 < conn.body_wait_since < body_cutoff:
                    conn.fail(408, b"request body not received in time")

    def drain(self) -> None:
        """Send keep-alive clients away, still serving: from now on each response says
        ``Connection: close`` and ends its connection, so the client's next request opens a
        new one, which a balancer that has seen us turn unready sends to another server.

        Idle kept-alive connections are left open until ``shutdown``: closing them now
        would race a request the client may be sending on one (lost: POST is not retried),
        and leaving them costs nothing while the server still serves. A client active on
        one gets one more response, with the close; one idle for the whole settle window
        is closed by ``shutdown``.
        """
        self.draining = True

    async def shutdown(self, drain_secs: float) -> None:
        """Stop accepting, let in-flight requests finish (up to ``drain_secs``), cancel the
        rest and wait for their cleanup, close. When this returns, no app code runs."""
        self.draining = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            if conn.is_idle():
                conn.transport.close()
        deadline = self.loop.time() + drain_secs
        while self.tasks and self.loop.time() < deadline:
            await asyncio.wait(set(self.tasks), timeout=max(0.0, deadline - self.loop.time()))
        cancelled = set(self.tasks)
        for task in cancelled:
            task.cancel()
        if cancelled:
            await asyncio.wait(cancelled, timeout=CANCELLED_CLEANUP_SECS)
        for conn in list(self.connections):
            conn.transport.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers:
            await server.wait_closed()
