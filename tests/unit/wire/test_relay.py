"""The relay: a worker's streamed body written to the client from the worker connection's
callback (``H1Stream.relay`` into the server's ``BodySink``), over real sockets at both
ends: back-pressure from a slow client, a client leaving, a worker stalling or dying."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from shunter.api.reply import body_sink, write_reply
from shunter.protocols.reply import Reply
from shunter.wire.asgi import Receive, Scope, Send
from shunter.wire.base import UpstreamError
from shunter.wire.client import H1StreamClient
from shunter.wire.server import HttpServer

Worker = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
REQUEST = b"POST /relay HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
WORKER_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
CYCLE = bytes(range(256))


class Relay:
    """A gateway in miniature: each request streams the worker's answer through
    ``write_reply`` with the server's sink, as the inference API does."""

    def __init__(self, read_timeout: float) -> None:
        self.read_timeout = read_timeout
        self.ended = asyncio.Event()
        self.errors: list[BaseException] = []
        self.client: H1StreamClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        assert self.client is not None
        upstream = await self.client.stream("POST", "http://w/", [], b"")
        assert body_sink(scope) is not None
        body = upstream.as_stream(self.ended.set)
        try:
            await write_reply(send, Reply(200, [], body), [], body_sink(scope))
        except BaseException as exc:
            self.errors.append(exc)
            raise


Start = Callable[[Worker, float], Awaitable[tuple[int, Relay]]]


@pytest.fixture
async def relay() -> AsyncIterator[Start]:
    servers: list[asyncio.AbstractServer] = []
    gateways: list[HttpServer] = []

    async def start(worker: Worker, read_timeout: float = 2.0) -> tuple[int, Relay]:
        upstream = await asyncio.start_server(worker, "127.0.0.1", 0)
        servers.append(upstream)
        app = Relay(read_timeout)
        worker_port = upstream.sockets[0].getsockname()[1]
        app.client = H1StreamClient(f"http://127.0.0.1:{worker_port}", 2.0, read_timeout)
        gateway = HttpServer(app)
        gateways.append(gateway)
        return await gateway.listen("127.0.0.1", 0), app

    yield start
    for gateway in gateways:
        await gateway.shutdown(0.5)
    for server in servers:
        server.close()


async def skip_request(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


def chunked(part: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(part), part)


async def test_a_slow_client_pauses_the_worker_and_the_read_timeout_waits_for_it(
    relay: Start,
) -> None:
    """A client that does not read fills its buffers; the relay then stops reading the
    worker (the worker cannot finish writing) instead of holding the rest in memory, and
    the worker's read timeout (0.3 s) does not fire while the client is the slow one."""
    part = CYCLE * 256  # 64 KiB
    count = 512  # 32 MiB: more than the loopback buffers on the way can hold
    finished = asyncio.Event()

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await skip_request(reader)
        writer.write(WORKER_HEAD)
        for _ in range(count):
            writer.write(chunked(part))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        finished.set()

    port, app = await relay(worker, 0.3)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(REQUEST)
    await asyncio.sleep(1.0)  # not reading: three read timeouts long
    assert not finished.is_set(), "the relay read the whole worker answer into memory"
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    received = 0
    while True:
        size = int(await reader.readuntil(b"\r\n"), 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            break
        start = received % 256  # the body repeats every 256 bytes: each piece in its place
        assert data[:-2] == (CYCLE * (size // 256 + 2))[start : start + size]
        received += size
    assert received == count * len(part)
    assert finished.is_set() and not app.errors
    writer.close()


async def test_a_client_leaving_mid_relay_closes_the_worker_connection(relay: Start) -> None:
    worker_saw_close = asyncio.Event()

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await skip_request(reader)
        writer.write(WORKER_HEAD + chunked(b"data: 1\n\n"))
        await writer.drain()
        try:
            while await reader.read(1024):  # the gateway sends nothing more: until it closes
                pass
        except ConnectionError:
            pass
        worker_saw_close.set()

    port, app = await relay(worker, 5.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(REQUEST)
    await reader.readuntil(b"data: 1\n\n")
    writer.close()
    await asyncio.wait_for(worker_saw_close.wait(), 2)
    await asyncio.wait_for(app.ended.wait(), 2)
    assert [type(e) for e in app.errors] == [asyncio.CancelledError]


@pytest.mark.parametrize("how", ["stalls", "dies"])
async def test_a_worker_that_stalls_or_dies_mid_relay_ends_it_with_an_error(
    relay: Start, how: str
) -> None:
    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await skip_request(reader)
        writer.write(WORKER_HEAD + chunked(b"data: 1\n\n"))
        await writer.drain()
        if how == "dies":
            writer.transport.abort()
        else:
            await asyncio.sleep(3)

    port, app = await relay(worker, 0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(REQUEST)
    await reader.readuntil(b"data: 1\n\n")
    await asyncio.wait_for(app.ended.wait(), 2)
    assert len(app.errors) == 1 and isinstance(app.errors[0], UpstreamError)
    assert app.errors[0].kind == ("timeout" if how == "stalls" else "io")
    writer.close()
