"""Streamed upstream requests on a small HTTP/1.1 client: asyncio Protocols and httptools.

Why our own: streams are where the clients we measured cost most (bench/README.md).
pyreqwest needs a thread hop per chunk and ~64 KiB per open stream; aiohttp ~12 KiB but
~400 µs more time to first byte here. This client writes the request in one ``write``,
hands each body chunk to the relay from the protocol callback with no extra task, and holds
a few KiB per connection. It does only what relaying an inference stream needs:

- keep-alive pool per worker; a connection goes back only after a complete response, and
  only while the worker sent nothing after it (see ``ConnectionState``);
- ``Content-Length``, chunked and close-delimited bodies (httptools decodes chunking);
  a body cut short, a bad chunk size, or both lengths at once is an error, never a success;
- read back-pressure: reading pauses while unconsumed chunks pile up, or, relaying
  (``H1Stream.relay``: each chunk written to the client from this connection's callback),
  while the client's buffer is full;
- bounds on what a worker can make us hold: a response head of at most ``max_head_bytes``,
  read within ``head_timeout`` of its first byte; an idle pool of at most ``max_idle``
  connections, none older than ``idle_timeout``;
- timeouts: connect, and the wait for the head and for each chunk (one timer per
  connection, not one per wait: a wait only notes when it began, and the timer, when it
  fires, sleeps again for what is left of the wait under way; no task, nor timer, per read);
- a request on a pooled connection that dies before any answer is sent again once on a new
  connection (the worker closed it while idle), never after bytes came back;
- a request line or header that could split the request (CR, LF, NUL, a space or non-ASCII
  in the target, a header name that is not a token) is refused before anything is written;
- TLS (and mTLS) through an ``ssl.SSLContext``;
- closing a stream before its end closes its connection, so the worker sees the client go.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httptools

from shunter.wire.base import BodySink, HeaderPairs, UpstreamError

log = logging.getLogger("shunter.wire.client")

PAUSE_AT = 64  # unconsumed chunks before reading pauses
# A response head is a status line and a few hundred bytes of headers; h11 refuses one over
# 16 KiB, aiohttp a line over 8 KiB. 64 KiB leaves room for a worker's odd big header and
# still bounds what one connection can make us buffer before the body.
MAX_HEAD_BYTES = 64 * 1024
# Once a head has started it arrives in a packet or two; only a broken or hostile worker
# dribbles it. The wait for the *start* of the head is the read timeout: a worker may hold a
# queued request for long before it answers.
HEAD_TIMEOUT_SECS = 30.0
IDLE_TIMEOUT_SECS = 50.0  # as ClientSettings.pool_idle_timeout_secs
MAX_IDLE = 512  # as ClientSettings.pool_max_idle_per_host

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class ConnectionState(enum.Enum):
    """Where a connection is in its life. Bytes are wanted only in ``HEAD`` and ``BODY``.

    A worker that writes after the end of a response (late, or in the same read as that
    end) would have those bytes read as the start of the *next* request's response, which
    may be another user's. So any byte that arrives in another state closes the
    connection (as httpcore does: an idle connection that became readable has expired).

    NEW -> HEAD -> BODY -> DONE -> IDLE -> HEAD ...; any state -> CLOSED, which is final.
    (httpcore's ACTIVE is our HEAD and BODY: the split lets the per-chunk path test one
    attribute.)
    """

    NEW = "new"  # connected; no request written yet
    HEAD = "head"  # a request written; its response head awaited or being read
    BODY = "body"  # reading the response body
    DONE = "done"  # the response ended and may be reused; its stream has not released it
    IDLE = "idle"  # in the pool, waiting for the next request
    CLOSED = "closed"  # closing or closed: never used again


_NEW = ConnectionState.NEW
_HEAD = ConnectionState.HEAD
_BODY = ConnectionState.BODY
_DONE = ConnectionState.DONE
_IDLE = ConnectionState.IDLE
_CLOSED = ConnectionState.CLOSED


class _SecondMessage(Exception):
    """The read that ended a response went on with another one; nothing asked for it."""


class _Connection(asyncio.Protocol):
    """One connection to the worker, and the response being read on it."""

    __slots__ = (
        "awaited",
        "chunks",
        "client",
        "ended",
        "error",
        "got_bytes",
        "head",
        "head_began",
        "head_bounded",
        "head_bytes",
        "headers",
        "idle_since",
        "keep_alive",
        "loop",
        "parser",
        "paused",
        "read_timer",
        "reader",
        "relayed",
        "sink",
        "state",
        "status",
        "timer",
        "transport",
        "until_close",
        "wait_began",
    )

    def __init__(self, client: H1StreamClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.state = _NEW
        self.idle_since = 0.0
        self.parser = httptools.HttpResponseParser(self)
        # The response being read. Its chunks not yet taken, a few (reading pauses at
        # PAUSE_AT): a list, not a deque, as an empty deque is 760 bytes against a list's
        # 56, held by every open connection.
        self.chunks: list[bytes] = []
        self.head: asyncio.Future[None] | None = None
        # The reader waiting for the next chunk: the chunk is its result (``H1Stream``).
        self.reader: asyncio.Future[bytes] | None = None
        # Relaying (``H1Stream.relay``): where each chunk goes, and the relay's end.
        self.sink: BodySink | None = None
        self.relayed: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_began = False  # a byte of the current head arrived
        self.head_bounded = False  # ... and the head bound runs (armed after its first read)
        self.head_bytes = 0  # read while reading heads (interim ones included)
        self.until_close = False  # no length, no chunking: the body ends with the connection
        self.ended = False
        self.error: UpstreamError | None = None
        self.got_bytes = False
        self.keep_alive = True
        self.paused = False
        self.timer: asyncio.TimerHandle | None = None  # a slow head's bound, a 1xx's wait
        # The read timeout: the wait under way (the head's future, or a chunk's), when it
        # began, and the one timer that checks it (``watch``).
        self.awaited: asyncio.Future[Any] | None = None
        self.wait_began = 0.0
        self.read_timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is _BODY:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                self._parse_failed(exc)
        elif state is _HEAD:
            self._head_received(data)
        else:
            self._unsolicited()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        state, self.state = self.state, _CLOSED
        self.disarm()
        self.stop_watching()
        if (state is _HEAD or state is _BODY) and self.error is None:
            if state is _BODY and self.until_close:
                self.ended = True
            else:
                self._abort(UpstreamError("io", "the worker closed the connection"))
        self._wake()

    # --- reading ------------------------------------------------------------------------------

    def _head_received(self, data: bytes) -> None:
        self.got_bytes = True
        room = self.client.max_head_bytes - self.head_bytes
        if len(data) <= room:
            self.head_bytes += len(data)
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                self._parse_failed(exc)
        else:
            # Feed only what the cap allows; the rest is body (or trailing bytes) if that
            # ended the head, else the head is too big.
            self.head_bytes += room
            self._feed(data[:room])
            if self.state is _HEAD:
                limit = self.client.max_head_bytes
                error = UpstreamError("io", f"the worker's response head exceeded {limit} bytes")
                self._abort(error)
            elif self.state is not _CLOSED:
                self.data_received(data[room:])
            return
        if self.state is _HEAD and self.head_began and not self.head_bounded:
            # Most heads arrive whole in one read; only one that did not costs a timer.
            self.head_bounded = True
            self.awaited = None  # the head began: its own bound takes over from the read timeout
            self.arm(self.client.head_timeout, "the worker sent its response head too slowly")

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)

    def _parse_failed(self, exc: httptools.HttpParserError) -> None:
        if self.ended:  # the response stands; what followed it does not
            self._unsolicited()
        else:
            self._abort(UpstreamError("io", f"malformed response from worker: {exc}"))

    def _unsolicited(self) -> None:
        if self.state is _CLOSED:
            return
        log.warning(
            "worker sent bytes outside a response; connection closed",
            extra={"worker": self.client.origin, "state": self.state.value},
        )
        self.close()

    # --- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.ended:
            raise _SecondMessage
        self.head_began = True

    def on_status(self, status: bytes) -> None:
        self.status = self.parser.get_status_code()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if 100 <= self.status < 200:  # an interim answer: the real one follows
            self.headers = []
            return
        self.state = _BODY
        self.keep_alive = self.parser.should_keep_alive()
        self.until_close = not self.keep_alive and _delimited_by_close(self.headers)
        head, self.head = self.head, None  # not kept for the body's life (144 bytes)
        if head is not None and not head.done():
            head.set_result(None)

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is not None:  # relaying: straight to the client, no task woken
            self.wait_began = self.loop.time()  # the read timeout counts from this chunk
            sink.write(body)
            return
        reader = self.reader
        if reader is not None:  # waiting, so nothing is buffered: the chunk goes to it
            self.reader = None
            if not reader.done():
                reader.set_result(body)
                return
        self.chunks.append(body)
        if len(self.chunks) >= PAUSE_AT:
            self.pause_transport()

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:  # back to waiting for a head to start
            self.head_began = self.head_bounded = False
            self.disarm()
            if self.head is not None:  # awaited until the real head completes
                self.watch(self.head)
            return
        self.ended = True
        self.disarm()
        if self.keep_alive:
            self.state = _DONE
        else:  # the worker said ``connection: close`` (or spoke HTTP/1.0)
            self.close()
        self._wake()

    # --- used by the client and the stream ----------------------------------------------------

    def start(self) -> asyncio.Future[None]:
        """A request is about to be written: expect its response."""
        self.state = _HEAD
        self.head_began = self.head_bounded = False
        self.head_bytes = 0
        self.head = self.loop.create_future()
        return self.head

    def _abort(self, error: UpstreamError) -> None:
        if self.error is None and not self.ended:
            self.error = error
            if self.head is not None and not self.head.done():
                self.head.set_exception(error)
        self.close()
        self._wake()

    def _wake(self) -> None:
        """The body ended, broke or was cut short: a waiting reader (or relay) learns which."""
        relayed = self.relayed
        if relayed is not None:
            self.sink = self.relayed = None
            if not relayed.done():
                end = self.end_of_body()
                if isinstance(end, StopAsyncIteration):
                    relayed.set_result(None)
                else:
                    relayed.set_exception(end)
        reader = self.reader
        if reader is not None:
            self.reader = None
            if not reader.done():
                reader.set_exception(self.end_of_body())

    def end_of_body(self) -> BaseException:
        """What a read past the last chunk raises: the error, or the end of the body."""
        if self.error is not None:
            return self.error
        if self.ended:
            return StopAsyncIteration()
        return UpstreamError("io", "the worker closed the connection")

    # --- the relay's back-pressure (``Throttled``: called by the client's side) -------------

    def pause_reading(self) -> None:
        """The client's buffer is full: stop reading the worker until it drains. The read
        timeout stops too: a worker is not slow because the client is."""
        if self.sink is None:  # not relaying (any more): not the client's to pause
            return
        self.awaited = None
        self.pause_transport()

    def resume_reading(self) -> None:
        self.resume_transport()
        if self.relayed is not None:
            self.watch(self.relayed)

    def pause_transport(self) -> None:
        """Stop reading the worker's socket (unread chunks piled up, or the client's buffer
        is full)."""
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume_transport(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def watch(self, awaited: asyncio.Future[Any]) -> None:
        """Fail ``awaited`` (a head, a chunk) if the worker sends nothing for the read
        timeout. Arming a timer per wait and cancelling it cost ~1.7 µs (uvloop, this
        project's machine), once per request and once per relayed chunk: each wait only
        notes when it began, and one timer per connection checks the wait under way when
        it fires, sleeping again for what is left of it."""
        self.awaited = awaited
        self.wait_began = self.loop.time()
        if self.read_timer is None:
            self.read_timer = self.loop.call_later(self.client.read_timeout, self._read_deadline)

    def _read_deadline(self) -> None:
        self.read_timer = None
        awaited = self.awaited
        if awaited is None or awaited.done():
            return  # nothing waits now: the next wait arms the timer again
        left = self.wait_began + self.client.read_timeout - self.loop.time()
        if left > 0:
            self.read_timer = self.loop.call_later(left, self._read_deadline)
        else:
            self._abort(UpstreamError("timeout", "worker timed out"))

    def arm(self, seconds: float, what: str = "worker timed out") -> None:
        self.disarm()
        self.timer = self.loop.call_later(seconds, self._timed_out, what)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def stop_watching(self) -> None:
        """No wait will follow (the connection closes): the read timer goes."""
        self.awaited = None
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None

    def _timed_out(self, what: str) -> None:
        self.timer = None
        self._abort(UpstreamError("timeout", what))

    def reset(self, now: float) -> None:
        """Into the pool: ready for the next request on this kept-alive connection. The
        parser is kept: after a complete response llhttp expects the next one (a fresh
        parser cost ~1 µs per request); one that failed never gets here (its connection
        closed)."""
        self.state = _IDLE
        self.idle_since = now
        self.chunks.clear()
        self.status, self.headers = 0, []
        self.ended = self.got_bytes = self.until_close = False
        self.error = self.head = self.reader = self.awaited = None
        self.resume_transport()  # an idle connection must see its EOF

    def close(self) -> None:
        self.state = _CLOSED
        self.disarm()
        self.stop_watching()
        if self.transport is not None:
            self.transport.close()


def _delimited_by_close(headers: list[tuple[bytes, bytes]]) -> bool:
    """No Content-Length and no final chunked coding: the body runs to the connection's end."""
    for name, value in headers:
        if name == b"content-length":
            return False
        if name == b"transfer-encoding" and value.rsplit(b",", 1)[-1].strip().lower() == b"chunked":
            return False
    return True


class H1Stream:
    """One streamed response, its own async iterator of body chunks (``async for``); it
    ends with the body, or raises UpstreamError when the body breaks. ``aclose`` returns
    or closes its connection.

    ``__anext__`` is a plain method handing back a future that the connection completes
    with the next chunk, as it arrives: relayed as a reply's body (``as_stream``) this is
    one async generator and one coroutine fewer per chunk than a generator looping on a
    ``next_chunk`` coroutine (callgrind: 35.8k -> 32.7k instructions per relayed chunk).
    """

    __slots__ = ("_client", "_conn", "_ended", "_released", "headers", "status")

    def __init__(self, client: H1StreamClient, conn: _Connection) -> None:
        self._client = client
        self._conn = conn
        self._released = False
        self._ended: Callable[[], None] | None = None
        self.status = conn.status
        self.headers = conn.headers

    def __aiter__(self) -> H1Stream:
        return self

    def __anext__(self) -> asyncio.Future[bytes]:
        conn = self._conn
        chunk: asyncio.Future[bytes] = conn.loop.create_future()
        if conn.chunks:
            chunk.set_result(conn.chunks.pop(0))
            if conn.paused and len(conn.chunks) < PAUSE_AT // 2:
                conn.resume_transport()
        elif conn.error is not None or conn.ended:
            conn.disarm()
            chunk.set_exception(conn.end_of_body())
        else:  # the connection completes it (``on_body``, ``_wake``), or the read timeout
            conn.reader = chunk
            conn.watch(chunk)
        return chunk

    async def relay(self, sink: BodySink) -> None:
        """Write the rest of the body to ``sink`` from the connection's own callback, as
        each chunk is parsed; returns at the end of the body, raises UpstreamError if it
        breaks (or is cut short by the read timeout). Back-pressure: ``sink`` pauses the
        connection's reading while the client's buffer is full (``pause_reading``).

        Why: iterated by a task, each chunk woke the task and passed up a chain of async
        generators and coroutines to the client's ``send`` (~25k instructions of a ~38k
        relayed chunk, callgrind); here a chunk is a few Python calls between two
        callbacks, and the task waits only for the end (32.7k -> 20.4k per chunk)."""
        conn = self._conn
        while conn.chunks:  # arrived before the relay began
            sink.write(conn.chunks.pop(0))
        if conn.error is not None or conn.ended:
            conn.disarm()
            end = conn.end_of_body()
            if isinstance(end, StopAsyncIteration):
                return
            raise end
        relayed = conn.relayed = conn.loop.create_future()
        conn.sink = sink
        conn.resume_reading()  # if many chunks had piled up; and the read timeout runs
        sink.throttle(conn)
        try:
            await relayed
        finally:
            conn.sink = conn.relayed = None

    async def next_chunk(self) -> bytes | None:
        """The next chunk, or None at the end (for readers of a whole body)."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            return None

    def as_stream(self, ended: Callable[[], None] | None = None) -> H1Stream:
        """This response as a reply's streamed body; ``ended`` is called once it is
        closed, however it ends."""
        self._ended = ended
        return self

    def whole(self, limit: int) -> bytes | None:
        """The whole body, when the response has ended before any of it was read and it is
        at most ``limit`` bytes; else None (read it with ``next_chunk``). Most whole
        answers arrive with their head: taking them at once skips a read loop's awaits
        and its buffer (~5k instructions of a proxied request, callgrind)."""
        conn = self._conn
        if not conn.ended or conn.error is not None:
            return None
        body = b"".join(conn.chunks)
        if len(body) > limit:
            return None
        conn.chunks.clear()
        conn.disarm()
        return body

    async def aclose(self) -> None:
        if self._released:  # a second close must not touch a connection now someone else's
            return
        self._released = True
        conn = self._conn
        conn.reader = None  # a read still waiting (its task cancelled) is not completed
        try:
            conn.disarm()
            if conn.state is _DONE:
                self._client.release(conn)
            else:
                conn.close()
        finally:
            ended, self._ended = self._ended, None  # once, and no loop left through it
            if ended is not None:
                ended()


def request_head(method: str, target: str, host: bytes, headers: HeaderPairs, length: int) -> bytes:
    """The request line and headers, refusing anything that could split the request.

    The target must be visible ASCII (h11 holds a request-target to the same), so a path
    that was percent-decoded on its way in cannot carry CR LF into the request line; the
    method and header names must be tokens and no name or value may hold CR, LF or NUL.
    A method or name is matched against the token pattern the first time it is seen and
    remembered (a gateway sends the same few): joining the names and matching them on
    every request was ~5k of a proxied request's ~360k instructions. The values are
    checked in one pass over the header lines.
    """
    if not (target.isascii() and target.isprintable()) or " " in target:
        raise ValueError(
            f"refusing a request target with a space, control or non-ASCII character: {target!r}"
        )
    line_start = _method_tokens.get(method) or _learn_method(method)
    tokens = _token_names
    for name, _ in headers:
        if name not in tokens:
            _learn_name(name)
    fields = b"".join([b"%s: %s\r\n" % pair for pair in headers])
    # Each line ends with CR LF, so a head with exactly those and no NUL loses 2 bytes a
    # line here: one ``translate`` where three scans cost 2.5k more instructions a request.
    if len(fields.translate(None, b"\r\n\0")) != len(fields) - 2 * len(headers):
        bad = next(n for n, v in headers if any(c in n + v for c in (b"\r", b"\n", b"\0")))
        raise ValueError(f"refusing a header with CR, LF or NUL in it: {bad!r}")
    return b"%s%s HTTP/1.1\r\nhost: %s\r\n%scontent-length: %d\r\n\r\n" % (
        line_start,
        target.encode("ascii"),
        host,
        fields,
        length,
    )


# Methods (as the request line's start) and header names already found to be tokens.
_method_tokens: dict[str, bytes] = {}
_token_names: set[bytes] = set()
_KNOWN_TOKENS_MAX = 1024  # past this many, a new one is checked every time


def _learn_method(method: str) -> bytes:
    encoded = method.encode("latin-1")
    if not _TOKEN.fullmatch(encoded):
        raise ValueError(f"refusing a method or header name that is not a token: {encoded!r}")
    if len(_method_tokens) < _KNOWN_TOKENS_MAX:
        _method_tokens[method] = encoded + b" "
    return encoded + b" "


def _learn_name(name: bytes) -> None:
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"refusing a method or header name that is not a token: {name!r}")
    if len(_token_names) < _KNOWN_TOKENS_MAX:
        _token_names.add(name)


class H1StreamClient:
    """One worker's pool of streaming connections."""

    def __init__(
        self,
        base_url: str,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        *,
        head_timeout: float = HEAD_TIMEOUT_SECS,
        max_head_bytes: int = MAX_HEAD_BYTES,
        idle_timeout: float = IDLE_TIMEOUT_SECS,
        max_idle: int = MAX_IDLE,
    ) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.host_header = parts.netloc.encode("latin-1")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        # The head bound never outlasts the read timeout: both bound the same wait.
        self.head_timeout = min(head_timeout, read_timeout)
        self.max_head_bytes = max_head_bytes
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.ssl_context = (ssl_context or ssl.create_default_context()) if self.tls else None
        self.idle: deque[_Connection] = deque()  # oldest first
        self.closed = False  # streams still running close their connections when they end

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for returns the connection when a
            # cancellation (a client that left) lands as the connect completes, and the
            # request then went out for nobody (seen as a PD decode leg left waiting).
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, loop), self.host, self.port, ssl=self.ssl_context
                )
        except TimeoutError:
            raise UpstreamError("timeout", "connecting to the worker timed out") from None
        except OSError as exc:
            raise UpstreamError("connect", f"cannot connect to worker: {exc}") from None
        return conn

    def _pooled(self) -> _Connection | None:
        """The most recently released idle connection that is still fit; the unfit close."""
        while self.idle:
            conn = self.idle.pop()
            if conn.state is _IDLE and conn.loop.time() - conn.idle_since < self.idle_timeout:
                return conn
            conn.close()
        return None

    def release(self, conn: _Connection) -> None:
        if self.closed:  # nobody would take it from the pool, or close it there
            conn.close()
            return
        now = conn.loop.time()
        conn.reset(now)
        idle = self.idle
        while idle and (
            now - idle[0].idle_since >= self.idle_timeout or len(idle) >= self.max_idle
        ):
            idle.popleft().close()  # expired, or over the cap: the oldest go first
        if len(idle) < self.max_idle:
            idle.append(conn)
        else:
            conn.close()

    async def stream(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> H1Stream:
        parts = url.split("/", 3)
        target = ("/" + parts[3]) if len(parts) > 3 else "/"
        payload = body or b""
        request = request_head(method, target, self.host_header, headers, len(payload)) + payload
        conn = self._pooled()
        if conn is not None:
            try:
                return await self._send(conn, request)
            except UpstreamError as exc:
                if conn.got_bytes or exc.kind != "io":
                    raise
                # The worker closed this idle connection as we wrote: once more, on a new one.
        return await self._send(await self._connect(), request)

    async def _send(self, conn: _Connection, request: bytes) -> H1Stream:
        if conn.transport is None or conn.state not in (_NEW, _IDLE):
            conn.close()
            raise UpstreamError("io", "the worker closed the connection")
        head = conn.start()
        conn.transport.write(request)
        conn.watch(head)
        try:
            await head
        except BaseException:
            conn.close()
            raise
        conn.disarm()  # a slow head's bound, if it was armed
        return H1Stream(self, conn)

    async def close(self) -> None:
        """Close the idle connections; those in use close when their streams end."""
        self.closed = True
        while self.idle:
            self.idle.pop().close()
