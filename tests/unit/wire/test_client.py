"""The streaming HTTP/1.1 client against scripted raw-socket servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from shunter.wire.base import UpstreamError
from shunter.wire.client import H1Stream, H1StreamClient

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[H1StreamClient]]]:
    servers: list[asyncio.AbstractServer] = []

    async def start(handler: Handler) -> H1StreamClient:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return H1StreamClient(f"http://127.0.0.1:{port}", 2.0, 0.5)

    yield start
    for server in servers:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head + await reader.readexactly(length)


async def drain(stream: H1Stream) -> list[bytes]:
    chunks = []
    while (chunk := await stream.next_chunk()) is not None:
        chunks.append(chunk)
    await stream.aclose()
    return chunks


async def test_chunked_stream_then_reuse_of_the_kept_alive_connection(serve) -> None:  # type: ignore[no-untyped-def]
    connections = 0
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        for _ in range(2):
            seen.append(await read_request(reader))
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            for part in (b"data: 1\n\n", b"data: 2\n\n"):
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")
        await writer.drain()

    client = await serve(handler)
    for _ in range(2):
        stream = await client.stream(
            "POST", "http://x/v1/completions?a=1", [(b"x-test", b"yes")], b'{"stream": true}'
        )
        assert stream.status == 200
        assert (b"content-type", b"text/event-stream") in stream.headers
        assert b"".join(await drain(stream)) == b"data: 1\n\ndata: 2\n\n"
    assert connections == 1
    assert seen[0].startswith(b"POST /v1/completions?a=1 HTTP/1.1\r\n")
    assert b"x-test: yes\r\n" in seen[0] and seen[0].endswith(b'{"stream": true}')


async def test_content_length_and_close_delimited_bodies(serve) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert b"/sized" in await read_request(reader)
        writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 5\r\n\r\nhello")
        assert b"/open" in await read_request(reader)  # on the same, kept-alive connection
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    client = await serve(handler)
    sized = await client.stream("POST", "http://x/sized", [], b"{}")
    assert sized.status == 400 and b"".join(await drain(sized)) == b"hello"
    open_ended = await client.stream("POST", "http://x/open", [], b"{}")
    assert b"".join(await drain(open_ended)) == b"until the end"


async def test_a_stale_pooled_connection_is_replaced_transparently(serve) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # the worker drops the idle keep-alive connection

    client = await serve(handler)
    assert await drain(await client.stream("POST", "http://x/a", [], b"")) == [b"ok"]
    await asyncio.sleep(0.2)
    assert await drain(await client.stream("POST", "http://x/b", [], b"")) == [b"ok"]


async def test_timeouts_and_refused_connections(serve) -> None:  # type: ignore[no-untyped-def]
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    client = await serve(silent)
    with pytest.raises(UpstreamError) as waited:
        await client.stream("POST", "http://x/", [], b"")
    assert waited.value.kind == "timeout"

    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    client = await serve(stalls)
    stream = await client.stream("POST", "http://x/", [], b"")
    assert await stream.next_chunk() == b"hi"
    with pytest.raises(UpstreamError) as stalled:
        await stream.next_chunk()
    assert stalled.value.kind == "timeout"
    refused = H1StreamClient("http://127.0.0.1:9", 1.0, 1.0)
    with pytest.raises(UpstreamError) as no_one:
        await refused.stream("POST", "http://x/", [], b"")
    assert no_one.value.kind == "connect"


async def test_a_connection_arms_one_read_timer_not_one_per_wait(serve) -> None:  # type: ignore[no-untyped-def]
    """Each wait for a head or a chunk is bounded by the read timeout, but through one timer
    per connection: arming and cancelling one per wait was a measured share of a request's
    and of a relayed chunk's cost. Two streamed exchanges of 20 chunks on one kept-alive
    connection arm it once."""
    asked: asyncio.Queue[None] = asyncio.Queue()

    async def lockstep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for i in range(20):
                await asked.get()  # the client waits for this chunk
                writer.write(b"1\r\n%d\r\n" % (i % 10))
                await writer.drain()
            await asked.get()
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    client = await serve(lockstep)
    patient = H1StreamClient(client.origin, 2.0, 30.0)  # no deadline comes due in the test
    loop = asyncio.get_running_loop()
    armed = 0
    call_later = loop.call_later

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal armed
        armed += 1
        return call_later(*args, **kwargs)

    loop.call_later = counting  # type: ignore[method-assign, assignment]
    try:
        for _ in range(2):
            stream = await patient.stream("POST", "http://x/", [], b"")
            chunks = []
            while True:
                asked.put_nowait(None)
                chunk = await stream.next_chunk()
                if chunk is None:
                    break
                chunks.append(chunk)
            await stream.aclose()
            assert b"".join(chunks) == b"01234567890123456789"
    finally:
        del loop.call_later
    assert armed == 1
    await patient.close()


async def test_a_kept_alive_connection_keeps_its_parser(serve) -> None:  # type: ignore[no-untyped-def]
    """After a complete response llhttp expects the next one: a connection back from the
    pool parses with the parser it had (a fresh one per request was a measured cost), and
    a length-delimited answer followed by a chunked one both parse whole."""

    async def two(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst")
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 201 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nsecond\r\n0\r\n\r\n"
        )
        await writer.drain()

    client = await serve(two)
    first = await client.stream("POST", "http://x/", [], b"")
    parser = first._conn.parser
    assert await drain(first) == [b"first"]
    second = await client.stream("POST", "http://x/", [], b"")
    assert second._conn.parser is parser
    assert (second.status, await drain(second)) == (201, [b"second"])


async def test_chunks_within_the_read_timeout_may_outlast_it_together(serve) -> None:  # type: ignore[no-untyped-def]
    """The read timeout bounds each wait, not the stream: the one timer, firing during a
    wait that began late, sleeps again for the rest of that wait."""

    async def paced(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for part in (b"a", b"b", b"c", b"d"):
            await asyncio.sleep(0.12)
            writer.write(b"1\r\n%s\r\n" % part)
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    client = await serve(paced)
    short = H1StreamClient(client.origin, 2.0, 0.2)  # 4 x 0.12 s: twice the read timeout
    assert await drain(await short.stream("POST", "http://x/", [], b"")) == [b"a", b"b", b"c", b"d"]


async def test_closing_a_stream_early_closes_its_connection(serve) -> None:  # type: ignore[no-untyped-def]
    closed = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(b"1\r\nx\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
        except (ConnectionError, OSError):
            closed.set()

    client = await serve(endless)
    stream = await client.stream("POST", "http://x/", [], b"")
    assert await stream.next_chunk() == b"x"
    await stream.aclose()
    await asyncio.wait_for(closed.wait(), 5)
    assert not client.idle


async def test_a_worker_dying_mid_stream_is_an_error(serve) -> None:  # type: ignore[no-untyped-def]
    async def dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n")
        await writer.drain()
        writer.close()

    client = await serve(dies)
    stream = await client.stream("POST", "http://x/", [], b"")
    assert await stream.next_chunk() == b"hi"
    with pytest.raises(UpstreamError) as broke:
        await stream.next_chunk()
    assert broke.value.kind == "io"


async def test_reading_pauses_while_the_consumer_lags(serve) -> None:  # type: ignore[no-untyped-def]
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(500):
            writer.write(b"1\r\n%d\r\n" % (i % 10))
            await writer.drain()
            await asyncio.sleep(0)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    client = await serve(flood)
    stream = await client.stream("POST", "http://x/", [], b"")
    await asyncio.sleep(0.2)  # let chunks pile up unread
    chunks = await drain(stream)
    assert len(b"".join(chunks)) == 500


async def test_a_stream_that_ends_after_its_client_closed_closes_its_connection(serve) -> None:  # type: ignore[no-untyped-def]
    finish = asyncio.Event()
    eof = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nlast\r\n")
        await finish.wait()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        if await reader.read(1) == b"":
            eof.set()

    client = await serve(handler)
    stream = await client.stream("POST", "http://x/v1/completions", [], b"{}")
    await client.close()  # a replaced client: its streams run on
    finish.set()
    assert await drain(stream) == [b"last"]  # the stream ended whole...
    assert not client.idle  # ...and its connection did not go back to a pool nobody reads
    await asyncio.wait_for(eof.wait(), 2)


async def test_as_a_streamed_body_chunks_come_by_async_for_and_the_close_is_reported(serve) -> None:  # type: ignore[no-untyped-def]
    """The relay's path: each chunk completes the future a waiting ``__anext__`` handed
    out; chunks that arrive together are buffered in order; ``ended`` is called once."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await writer.drain()
        for parts in ((b"a",), (b"b", b"c"), (b"d",)):
            await asyncio.sleep(0.02)  # the reader waits for each read
            writer.write(b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    client = await serve(handler)
    ended: list[bool] = []
    stream = (await client.stream("POST", "http://x/", [], b"")).as_stream(
        lambda: ended.append(True)
    )
    assert [chunk async for chunk in stream] == [b"a", b"b", b"c", b"d"]
    await stream.aclose()
    await stream.aclose()
    assert ended == [True]
    assert len(client.idle) == 1  # whole: back in the pool


async def test_a_read_cancelled_while_waiting_loses_no_chunk(serve) -> None:  # type: ignore[no-untyped-def]
    sent = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await writer.drain()
        await sent.wait()
        writer.write(b"2\r\nhi\r\n0\r\n\r\n")
        await writer.drain()

    client = await serve(handler)
    stream = await client.stream("POST", "http://x/", [], b"")
    waiting = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0.01)
    waiting.cancel()
    sent.set()
    await asyncio.sleep(0.05)  # "hi" arrives with nobody waiting: buffered
    assert await stream.next_chunk() == b"hi"
    assert await stream.next_chunk() is None


async def test_a_worker_dying_mid_stream_breaks_the_async_for(serve) -> None:  # type: ignore[no-untyped-def]
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.transport.abort()

    client = await serve(handler)
    ended: list[bool] = []
    stream = (await client.stream("POST", "http://x/", [], b"")).as_stream(
        lambda: ended.append(True)
    )
    got = []
    with pytest.raises(UpstreamError) as broke:
        async for chunk in stream:
            got.append(chunk)
    assert got == [b"hi"] and broke.value.kind == "io"
    await stream.aclose()
    assert ended == [True] and not client.idle
