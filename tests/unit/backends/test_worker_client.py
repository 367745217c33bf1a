"""An HTTP worker's data-plane client: a call the gateway gives up on ends at the worker."""

from __future__ import annotations

import asyncio

from shunter.backends.http.client import worker_client
from shunter.wire.reqwest import ClientSettings


async def test_a_cancelled_whole_request_closes_the_workers_connection() -> None:
    """A client that leaves, or a PD leg cancelled because the other failed, must stop the
    worker: it sees its connection close (SGLang and vLLM abort the request then)."""
    arrived, closed = asyncio.Event(), asyncio.Event()

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)  # the body
        arrived.set()
        if await reader.read(1) == b"":  # EOF: the gateway closed the connection
            closed.set()

    server = await asyncio.start_server(worker, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = worker_client(ClientSettings(), url)
    try:
        call = asyncio.ensure_future(client.request("POST", url + "/generate", [], b"{}"))
        await asyncio.wait_for(arrived.wait(), 5)
        call.cancel()
        await asyncio.wait_for(closed.wait(), 1)
    finally:
        await client.close()
        server.close()


async def test_whole_answers_come_back_whole_and_the_connection_is_reused() -> None:
    connections = 0

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(2)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            body = b'{"text": "' + b"x" * 100_000 + b'"}'
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    server = await asyncio.start_server(worker, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = worker_client(ClientSettings(), url)
    try:
        for _ in range(3):
            answer = await client.request("POST", url + "/generate", [], b"{}")
            assert answer.status == 200 and len(answer.body) == 100_012
        assert connections == 1
    finally:
        await client.close()
        server.close()
