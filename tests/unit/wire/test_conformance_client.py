"""The upstream client against broken or hostile workers: scripted raw-socket servers.

Each case states, in its docstring, which established client (h11, httpcore, aiohttp, or
the llhttp parser inside httptools and aiohttp) behaves that way; where none does, it says
whose rule we follow. The worker is a plain ``asyncio`` server on 127.0.0.1 that writes
exactly the bytes under test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from shunter.backends.http.client import WorkerClient, worker_client
from shunter.config import ConfigError, GatewayConfig
from shunter.wire.base import UpstreamError
from shunter.wire.client import MAX_HEAD_BYTES, H1Stream, H1StreamClient, request_head
from shunter.wire.reqwest import MAX_RESPONSE_BYTES, ClientSettings, ReqwestClient

Handler = Callable[["Peer"], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


@dataclass
class Peer:
    """One accepted connection, as the scripted worker sees it."""

    number: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def request(self) -> bytes:
        head = await self.reader.readuntil(b"\r\n\r\n")
        sized = head.lower().split(b"content-length: ")
        length = int(sized[1].split(b"\r\n")[0]) if len(sized) > 1 else 0
        return head + await self.reader.readexactly(length)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def client_closed(self) -> None:
        """Return once the client has closed this connection (EOF), ignoring its bytes."""
        while await self.reader.read(65536):
            pass


@dataclass
class Script:
    """A scripted worker; ``handler`` runs once per connection, in accept order."""

    handler: Handler
    peers: list[Peer] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)
    port: int = 0

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(len(self.peers) + 1, reader, writer)
        self.peers.append(peer)
        try:
            await self.handler(peer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


Serve = Callable[..., Awaitable[tuple[Script, H1StreamClient]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[asyncio.AbstractServer] = []
    clients: list[H1StreamClient] = []

    async def start(handler: Handler, **limits: Any) -> tuple[Script, H1StreamClient]:
        script = Script(handler)
        server = await asyncio.start_server(script.accept, "127.0.0.1", 0)
        servers.append(server)
        script.port = server.sockets[0].getsockname()[1]
        read_timeout = limits.pop("read_timeout", 2.0)
        client = H1StreamClient(script.url, 2.0, read_timeout, **limits)
        clients.append(client)
        return script, client

    yield start
    for client in clients:
        await client.close()
    for server in servers:
        server.close()


async def body_of(stream: H1Stream) -> bytes:
    chunks = []
    while (chunk := await stream.next_chunk()) is not None:
        chunks.append(chunk)
    await stream.aclose()
    return b"".join(chunks)


async def get(client: H1StreamClient, path: str = "/") -> H1Stream:
    return await client.stream("POST", f"http://worker{path}", [(b"x-test", b"1")], b"{}")


async def within(awaitable: Awaitable[Any], seconds: float = 5.0) -> Any:
    return await asyncio.wait_for(awaitable, seconds)


# --- pool isolation ------------------------------------------------------------------------


async def test_late_bytes_on_an_idle_connection_close_it(serve: Serve) -> None:
    """Bytes a worker writes after a complete response belong to no request: the connection
    is closed, and the next request gets its own answer on a new connection. httpcore does
    the same: an idle pooled connection whose socket became readable has expired
    (``has_expired``) and is closed, never handed to the next request."""
    released = asyncio.Event()
    late_seen = asyncio.Event()

    async def worker(peer: Peer) -> None:
        await peer.request()
        if peer.number == 1:
            await peer.send(OK)
            await released.wait()
            await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nLEAKED")
            await peer.client_closed()
            late_seen.set()
        else:
            await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nclean")

    script, client = await serve(worker)
    assert await body_of(await get(client)) == b"ok"
    released.set()
    await within(late_seen.wait())  # the client closed the connection the bytes came on
    second = await get(client)
    assert second.status == 200 and await body_of(second) == b"clean"
    assert len(script.peers) == 2


async def test_bytes_in_the_same_read_as_the_end_of_a_response_close_the_connection(
    serve: Serve,
) -> None:
    """A second response glued to the first one (one ``write``, so one read) is not parsed
    into the first response, nor kept for the next request: the first response is exactly
    what it declared, and the connection is closed. aiohttp does not reuse a connection
    that holds unread data when it is released (``ResponseHandler.should_close`` checks the
    parser's tail and buffer)."""
    first_closed = asyncio.Event()

    async def worker(peer: Peer) -> None:
        await peer.request()
        if peer.number == 1:
            await peer.send(OK + b"HTTP/1.1 200 OK\r\nx-leak: 1\r\ncontent-length: 6\r\n\r\nLEAKED")
            await peer.client_closed()
            first_closed.set()
        else:
            await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nclean")

    script, client = await serve(worker)
    first = await get(client)
    assert await body_of(first) == b"ok"
    assert (b"x-leak", b"1") not in first.headers
    await within(first_closed.wait())
    assert await body_of(await get(client)) == b"clean"
    assert len(script.peers) == 2


async def test_garbage_after_a_complete_response_keeps_the_response(serve: Serve) -> None:
    """Trailing bytes that are not even a response do not turn a complete response into an
    error; they only cost the connection (as in the cases above)."""
    closed = asyncio.Event()

    async def worker(peer: Peer) -> None:
        await peer.request()
        await peer.send(OK + b"\x00garbage")
        await peer.client_closed()
        closed.set()

    _, client = await serve(worker)
    assert await body_of(await get(client)) == b"ok"
    await within(closed.wait())


# --- bounds on the head --------------------------------------------------------------------


def head_of(size: int) -> bytes:
    """A 200 head of about ``size`` bytes (filler headers), body ``ok``."""
    lines = [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n"]
    total = len(lines[0]) + 2
    n = 0
    while total < size:
        line = b"x-filler-%05d: %s\r\n" % (n, b"a" * 80)
        lines.append(line)
        total += len(line)
        n += 1
    return b"".join(lines) + b"\r\n"


@pytest.mark.parametrize("pieces", [1, 40])
async def test_a_head_over_the_cap_fails_the_attempt_and_closes(serve: Serve, pieces: int) -> None:
    """A head over 64 KiB is an ``io`` error and its connection is closed, whether it comes
    in one read or many. h11 refuses a head over 16 KiB (``max_incomplete_event_size``,
    "Receive buffer too long"); aiohttp a line or field over 8190 bytes (``LineTooLong``)."""
    closed = asyncio.Event()
    head = head_of(MAX_HEAD_BYTES + 4096)

    async def worker(peer: Peer) -> None:
        await peer.request()
        step = -(-len(head) // pieces)
        for start in range(0, len(head), step):
            peer.writer.write(head[start : start + step])
        await peer.send(b"ok")
        await peer.client_closed()
        closed.set()

    _, client = await serve(worker)
    with pytest.raises(UpstreamError) as failed:
        await get(client)
    assert failed.value.kind == "io"
    assert f"head exceeded {MAX_HEAD_BYTES} bytes" in str(failed.value)
    await within(closed.wait())


async def test_a_head_under_the_cap_and_a_big_body_in_one_write_are_fine(serve: Serve) -> None:
    """Only the head counts toward the cap: a 60 KiB head followed, in the same write, by
    a 200 KiB body (so reads hold both) is a normal response."""
    body = b"b" * 200_000
    head = head_of(60 * 1024).replace(b"content-length: 2", b"content-length: %d" % len(body))

    async def worker(peer: Peer) -> None:
        await peer.request()
        await peer.send(head + body)

    _, client = await serve(worker)
    stream = await get(client)
    assert len(stream.headers) > 500
    assert await body_of(stream) == body


async def test_a_head_dribbled_slower_than_the_head_bound_times_out(serve: Serve) -> None:
    """Once the first byte of a head has come, the rest must come within the head bound,
    however often single bytes arrive (each of which would reset a per-read timeout, which
    is all h11, httpcore and aiohttp have). Go's ``Transport.ResponseHeaderTimeout`` bounds
    the whole head the same way."""

    async def worker(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n")
        for byte in b"x-slow: " + b"z" * 1000:
            await peer.send(bytes([byte]))
            await asyncio.sleep(0.02)

    _, client = await serve(worker, read_timeout=3.0, head_timeout=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamError) as failed:
        await get(client)
    assert failed.value.kind == "timeout"
    assert "head too slowly" in str(failed.value)
    assert 0.3 <= loop.time() - started < 3.0


async def test_the_wait_for_the_head_to_start_is_the_read_timeout(serve: Serve) -> None:
    """The head bound starts at the head's first byte: a worker may hold a request for
    long (a queue, a long prefill) before it answers, and that wait is the read timeout's."""

    async def worker(peer: Peer) -> None:
        await peer.request()
        await asyncio.sleep(0.5)  # longer than the head bound: the worker is busy
        await peer.send(OK)

    _, client = await serve(worker, read_timeout=3.0, head_timeout=0.2)
    assert await body_of(await get(client)) == b"ok"


async def test_interim_responses_come_before_the_real_one(serve: Serve) -> None:
    """1xx answers are skipped and the final response is returned, its headers only.
    httpcore skips h11's ``InformationalResponse`` events (all but 101); aiohttp's
    ``ClientResponse.start`` reads on past any 1xx. A long pause after a ``102 Processing``
    is a wait for the next head to start, not a slow head."""

    async def worker(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        await peer.send(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\n")
        await peer.send(b"HTTP/1.1 102 Processing\r\n\r\n")
        await asyncio.sleep(0.5)  # longer than the head bound
        await peer.send(b"HTTP/1.1 201 Created\r\ncontent-length: 4\r\nx-final: 1\r\n\r\ndone")
        await peer.request()
        await peer.send(OK)

    script, client = await serve(worker, read_timeout=3.0, head_timeout=0.2)
    stream = await get(client)
    assert stream.status == 201
    assert (b"x-final", b"1") in stream.headers and all(k != b"link" for k, _ in stream.headers)
    assert await body_of(stream) == b"done"
    assert await body_of(await get(client)) == b"ok"  # and the connection is reusable
    assert len(script.peers) == 1


# --- bodies --------------------------------------------------------------------------------


async def test_content_length_chunked_and_close_delimited_bodies(serve: Serve) -> None:
    """The three ways a response body ends (RFC 9112 §6.3), as h11 reads them
    (``content-length``, ``chunked``, and ``http/1.0``-style read-until-close): the first
    two keep the connection, the last ends it."""

    async def worker(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nsized")
        await peer.request()
        await peer.send(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nchu\r\n4\r\nnked\r\n0\r\nx-trailer: t\r\n\r\n"
        )
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end")
        peer.writer.close()

    script, client = await serve(worker)
    assert await body_of(await get(client)) == b"sized"
    assert await body_of(await get(client)) == b"chunked"
    assert await body_of(await get(client)) == b"until the end"
    assert len(script.peers) == 1


@pytest.mark.parametrize("close_header", [b"", b"connection: close\r\n"])
async def test_a_body_shorter_than_its_content_length_is_an_error(
    serve: Serve, close_header: bytes
) -> None:
    """A worker that closes before sending the Content-Length it declared broke off: an
    ``io`` error, not a short success, also when it said ``connection: close``. h11 raises
    ``RemoteProtocolError`` ("peer closed connection without sending complete message
    body"); aiohttp ``ClientPayloadError`` ("Response payload is not completed")."""

    async def worker(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n%scontent-length: 10\r\n\r\nshort" % close_header)

    _, client = await serve(worker)
    stream = await get(client)
    with pytest.raises(UpstreamError) as failed:
        await body_of(stream)
    assert failed.value.kind == "io"


async def test_an_invalid_chunk_size_is_an_error(serve: Serve) -> None:
    """llhttp (inside httptools, and aiohttp's parser) refuses a chunk size that is not
    hexadecimal ("Invalid character in chunk size"); h11 calls it an illegal chunk header."""

    async def worker(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhi\r\n")
        await peer.client_closed()

    _, client = await serve(worker)
    stream = await get(client)
    with pytest.raises(UpstreamError) as failed:
        await body_of(stream)
    assert failed.value.kind == "io" and "chunk size" in str(failed.value)


async def test_content_length_with_transfer_encoding_is_an_error(serve: Serve) -> None:
    """Both framings at once is how responses get split (RFC 9112 §6.3: "ought to be
    handled as an error"); llhttp refuses it ("Content-Length can't be present with
    Transfer-Encoding"), and so does aiohttp's parser."""

    async def worker(peer: Peer) -> None:
        await peer.request()
        await peer.send(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n"
            b"2\r\nhi\r\n0\r\n\r\n"
        )
        await peer.client_closed()

    _, client = await serve(worker)
    with pytest.raises(UpstreamError) as failed:
        await get(client)
    assert failed.value.kind == "io"


async def test_a_response_with_connection_close_is_not_reused(serve: Serve) -> None:
    """A worker that adds ``connection: close`` will not read another request there: the
    client closes the connection after the response even though the worker left it open.
    h11 moves the server to ``MUST_CLOSE`` and httpcore then closes instead of pooling."""
    first_closed = asyncio.Event()

    async def worker(peer: Peer) -> None:
        await peer.request()
        if peer.number == 1:
            await peer.send(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
            await peer.client_closed()
            first_closed.set()
        else:
            await peer.send(OK)

    script, client = await serve(worker)
    assert await body_of(await get(client)) == b"ok"
    await within(first_closed.wait())
    assert await body_of(await get(client)) == b"ok"
    assert len(script.peers) == 2


# --- the pool ------------------------------------------------------------------------------


async def test_a_pooled_connection_dropped_unanswered_is_retried_once(serve: Serve) -> None:
    """The worker closed its idle connection just as the next request went out (it read it,
    or not, and closed without a byte): the request goes again, once, on a new connection.
    aiohttp does the same for a reused connection that disconnects before any response
    (``ServerDisconnectedError``: one retry, on idempotent methods); we retry any method,
    but only when not one byte of an answer came back."""

    async def worker(peer: Peer) -> None:
        await peer.request()
        if peer.number == 1:
            await peer.send(OK)
            await peer.request()  # the second request arrives, and the worker goes away
        else:
            await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfresh")

    script, client = await serve(worker)
    assert await body_of(await get(client, "/a")) == b"ok"
    assert await body_of(await get(client, "/b")) == b"fresh"
    assert len(script.peers) == 2


async def test_a_pooled_connection_that_broke_mid_answer_is_not_retried(serve: Serve) -> None:
    """Once a byte of the answer came back the worker had the request: sending it again
    could run it twice, so the error stands (aiohttp's retry also covers only a disconnect
    before the response starts)."""

    async def worker(peer: Peer) -> None:
        await peer.request()
        await peer.send(OK)
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n")

    script, client = await serve(worker)
    assert await body_of(await get(client)) == b"ok"
    with pytest.raises(UpstreamError) as failed:
        await get(client)
    assert failed.value.kind == "io"
    assert len(script.peers) == 1


async def test_a_timeout_on_a_pooled_connection_is_not_retried(serve: Serve) -> None:
    """A worker that read the request and is silent may be working on it (a long queue):
    after the read timeout the request fails as a timeout, it is not sent again."""

    async def worker(peer: Peer) -> None:
        await peer.request()
        await peer.send(OK)
        await peer.request()
        await peer.client_closed()  # silent until the client gives up

    script, client = await serve(worker, read_timeout=0.3)
    assert await body_of(await get(client)) == b"ok"
    with pytest.raises(UpstreamError) as failed:
        await get(client)
    assert failed.value.kind == "timeout"
    assert len(script.peers) == 1


async def test_an_idle_connection_past_the_keep_alive_expiry_is_closed(serve: Serve) -> None:
    """An idle connection older than the pool's idle timeout is closed, not reused: the
    worker may have dropped it silently long ago. httpcore's ``keepalive_expiry`` and
    aiohttp's ``keepalive_timeout`` do the same."""
    first_closed = asyncio.Event()

    async def worker(peer: Peer) -> None:
        try:
            while True:  # the worker itself would serve this connection again
                await peer.request()
                await peer.send(OK)
        finally:
            if peer.number == 1:
                first_closed.set()

    script, client = await serve(worker, idle_timeout=0.1)
    assert await body_of(await get(client)) == b"ok"
    await asyncio.sleep(0.2)  # the connection idles past its expiry
    assert await body_of(await get(client)) == b"ok"
    assert len(script.peers) == 2
    await within(first_closed.wait())


async def test_the_idle_pool_keeps_at_most_max_idle_connections(serve: Serve) -> None:
    """Connections released beyond the cap are closed, the oldest first, as httpcore
    closes idle connections beyond ``max_keepalive_connections``; the one kept is reused."""
    both_asked = asyncio.Event()
    asked = 0
    closed: list[int] = []
    one_closed = asyncio.Event()

    async def worker(peer: Peer) -> None:
        nonlocal asked
        try:
            await peer.request()
            asked += 1
            if asked == 2:
                both_asked.set()
            await both_asked.wait()  # hold both answers until both connections are in use
            await peer.send(OK)
            while True:
                await peer.request()
                await peer.send(OK)
        finally:
            closed.append(peer.number)
            one_closed.set()

    script, client = await serve(worker, max_idle=1)
    first, second = await asyncio.gather(get(client), get(client))
    await body_of(first)
    await body_of(second)  # released last: the pool is over its cap, the oldest goes
    await within(one_closed.wait())
    assert await body_of(await get(client)) == b"ok"  # on the connection that was kept
    assert len(script.peers) == 2 and len(closed) == 1


# --- what we send --------------------------------------------------------------------------

BAD_TARGETS = ["/v1/x\r\nx-injected: 1", "/v1/x\ny", "/v1/x y", "/v1/x\x00", "/v1/\u00e9", "/\x7f"]
BAD_HEADERS = [
    [(b"x-ok", b"a\r\nx-injected: 1")],
    [(b"x-ok", b"a\nb")],
    [(b"x-ok", b"a\rb")],
    [(b"x-ok", b"a\x00b")],
    [(b"x bad", b"1")],
    [(b"x:bad", b"1")],
    [(b"x: bad", b"1")],
    [(b"", b"1")],
    [(b"x-ok\r\nx-injected", b"1")],
    [(b"x-ok\nx-injected", b"1")],
    [(b"x-ok", b"fine"), (b"x\x00", b"1")],
]


@pytest.mark.parametrize(
    ("target", "headers", "method"),
    [(t, [], "POST") for t in BAD_TARGETS]
    + [("/v1/x", h, "POST") for h in BAD_HEADERS]
    + [("/v1/x", [], "GET /evil HTTP/1.1\r\n")],
)
async def test_a_request_that_could_split_is_refused_before_anything_is_written(
    serve: Serve, target: str, headers: list[tuple[bytes, bytes]], method: str
) -> None:
    """h11 refuses a request-target that is not visible ASCII, a header name that is not a
    token and a header value with CR, LF or NUL (``LocalProtocolError``); aiohttp refuses
    CR or LF in a header ("Newline or carriage return character detected"). Nothing
    reaches the worker, not even on a pooled connection: the next valid request is the
    second one it sees."""

    async def worker(peer: Peer) -> None:
        while True:
            script.requests.append(await peer.request())
            await peer.send(OK)

    script, client = await serve(worker)
    assert await body_of(await get(client, "/first")) == b"ok"
    with pytest.raises(ValueError, match="refusing"):
        await client.stream(method, f"http://worker{target}", headers, b"{}")
    assert await body_of(await get(client, "/after")) == b"ok"
    assert [r.split(b" ")[1] for r in script.requests] == [b"/first", b"/after"]
    assert len(script.peers) == 1


def test_a_name_or_method_found_not_a_token_is_refused_every_time() -> None:
    """Tokens are remembered once matched (``request_head``); what failed never is."""
    for _ in range(2):
        with pytest.raises(ValueError, match="not a token"):
            request_head("POST", "/v1/x", b"w", [(b"x bad", b"1")], 0)
        with pytest.raises(ValueError, match="not a token"):
            request_head("GET /evil HTTP/1.1\r\n", "/v1/x", b"w", [], 0)
    assert request_head("POST", "/v1/x", b"w", [(b"x-ok", b"1")], 2) == (
        b"POST /v1/x HTTP/1.1\r\nhost: w\r\nx-ok: 1\r\ncontent-length: 2\r\n\r\n"
    )


# --- the whole-response cap (pyreqwest) -----------------------------------------------------


async def whole_worker(body: bytes, chunked: bool = False) -> tuple[asyncio.AbstractServer, str]:
    """A worker answering every request with ``body`` (declared, or chunked in 64 KiB)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(0, reader, writer)
        try:
            while True:
                await peer.request()
                if chunked:
                    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    for start in range(0, len(body), 65536):
                        part = body[start : start + 65536]
                        writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                    writer.write(b"0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body))
                    writer.write(body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def whole_client(kind: str, settings: ClientSettings, url: str) -> ReqwestClient | WorkerClient:
    """The control plane's client (pyreqwest) or a worker's data-plane one (``h1``)."""
    return ReqwestClient(settings) if kind == "reqwest" else worker_client(settings, url)


@pytest.mark.parametrize("kind", ["reqwest", "h1"])
@pytest.mark.parametrize(("size", "chunked"), [(300_000, False), (300_000, True), (100_001, False)])
async def test_a_whole_response_over_the_cap_fails_the_attempt(
    kind: str, size: int, chunked: bool
) -> None:
    """A declared length over the cap is refused before the body is read; an undeclared
    (chunked) one as soon as the running total passes it; one byte over, arrived whole,
    too. Each is an ``oversize`` error that names the cap."""
    server, url = await whole_worker(b"x" * size, chunked)
    client = whole_client(kind, ClientSettings(max_response_bytes=100_000), url)
    try:
        with pytest.raises(UpstreamError) as failed:
            await client.request("POST", url + "/v1/embeddings", [], b"{}")
        assert failed.value.kind == "oversize"
        assert "the worker's response exceeded 100000 bytes" in str(failed.value)
    finally:
        await client.close()
        server.close()


@pytest.mark.parametrize("kind", ["reqwest", "h1"])
@pytest.mark.parametrize(("size", "chunked"), [(1000, False), (1000, True), (1_500_000, False)])
async def test_a_whole_response_up_to_the_cap_is_read_whole(
    kind: str, size: int, chunked: bool
) -> None:
    """At the cap exactly, small or large (a large one is read chunk by chunk; a small one
    arrived whole is taken at once), declared or chunked: the body arrives intact, and the
    pooled connection is reused."""
    body = bytes(range(256)) * (size // 256) + b"e" * (size % 256)
    server, url = await whole_worker(body, chunked)
    client = whole_client(kind, ClientSettings(max_response_bytes=size), url)
    try:
        for _ in range(2):
            response = await client.request("GET", url + "/x", [], None)
            assert response.status == 200 and response.body == body
            assert isinstance(response.body, bytes)
    finally:
        await client.close()
        server.close()


async def test_the_worker_client_caps_whole_responses_but_not_streams() -> None:
    """The split client (transport/split.py) passes the cap to its whole-response side; a
    stream is relayed chunk by chunk and holds nothing, so it has no such cap."""
    server, url = await whole_worker(b"s" * 5000, chunked=True)
    client = worker_client(ClientSettings(max_response_bytes=4096), url)
    try:
        with pytest.raises(UpstreamError, match="exceeded 4096 bytes"):
            await client.request("POST", url + "/v1/embeddings", [], b"{}")
        stream = await client.stream("POST", url + "/v1/completions", [], b"{}")
        assert len(await body_of(stream)) == 5000
    finally:
        await client.close()
        server.close()


def test_max_response_bytes_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="--max-response-bytes"):
        GatewayConfig(max_response_bytes=0).validate()
    assert GatewayConfig().validate().max_response_bytes == MAX_RESPONSE_BYTES
