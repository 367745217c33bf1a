"""An HTTP worker's backend: its client created once, headers in and out, engine quirks."""

from __future__ import annotations

import asyncio
import json

import orjson
import pytest

from shunter.backends.base import Address, Outbound, Runtime
from shunter.backends.connect import Connector
from shunter.backends.http.backend import HttpBackend, with_rank
from shunter.backends.http.client import WorkerClient, worker_client
from shunter.wire.base import UpstreamError
from shunter.wire.mock import MockClient, MockRequest, MockResponse
from shunter.wire.reqwest import ClientSettings


def answer_models(request: MockRequest) -> MockResponse:
    if request.url.endswith("/v1/models"):
        return MockResponse(200, body=b'{"data": [{"id": "m", "owned_by": "vllm"}]}')
    if request.url.endswith("/health"):
        return MockResponse(200)
    return MockResponse(404)


@pytest.mark.parametrize("users", [1, 1000])
async def test_a_workers_client_is_created_once_by_concurrent_first_requests(users: int) -> None:
    made: list[MockClient] = []

    def data_client(settings: ClientSettings, url: str) -> MockClient:
        client = MockClient(lambda r: MockResponse(200, body=b"{}"))
        made.append(client)
        return client

    connector = Connector(MockClient(answer_models), ClientSettings(), 1.0, data_client=data_client)

    async def wait(probe, what):  # type: ignore[no-untyped-def]
        assert await probe() is None

    connected = await connector.connect("http://w:1", None, None, wait)
    backend = connected.backend
    assert isinstance(backend, HttpBackend) and backend.runtime is Runtime.VLLM
    request = Outbound("POST", "/v1/completions", b"", [], b"{}", False, "r", "m")
    replies = await asyncio.gather(
        *(backend.send(Address("http://w:1"), request) for _ in range(users))
    )
    assert {r.status for r in replies} == {200}
    assert len(made) == 1 and len(made[0].requests) == users
    assert not backend.serves("/generate")  # vLLM has no SGLang /generate


# --- one failure, many requests ------------------------------------------------------------


class HoldingWorker:
    """A worker on a real socket that holds ``/v1/held`` requests until ``release`` is set,
    answers ``/v1/bad`` with a malformed head and anything else at once."""

    def __init__(self, holding: int) -> None:
        self.holding = holding
        self.arrived = 0
        self.all_arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                path = head.split(b" ")[1]
                if path == b"/v1/bad":
                    writer.write(b"HTTP/1.1 200 OK\r\nnot a header\r\n\r\n")
                    writer.close()
                    return
                if path == b"/v1/held":
                    self.arrived += 1
                    if self.arrived == self.holding:
                        self.all_arrived.set()
                    await self.release.wait()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def post(path: str) -> Outbound:
    return Outbound("POST", path, b"", [], b"{}", False, "r", "m")


async def connect_to(url: str, made: list[WorkerClient]) -> HttpBackend:
    def data_client(settings: ClientSettings, base_url: str) -> WorkerClient:
        client = worker_client(settings, base_url)
        made.append(client)
        return client

    connector = Connector(MockClient(answer_models), ClientSettings(), 1.0, data_client=data_client)

    async def wait(probe, what):  # type: ignore[no-untyped-def]
        assert await probe() is None

    backend = (await connector.connect(url, None, None, wait)).backend
    assert isinstance(backend, HttpBackend)
    return backend


async def test_a_broken_exchange_fails_alone_and_keeps_the_workers_client() -> None:
    worker = HoldingWorker(holding=4)
    url = await worker.start()
    made: list[WorkerClient] = []
    backend = await connect_to(url, made)
    address = Address(url)
    held = [asyncio.ensure_future(backend.send(address, post("/v1/held"))) for _ in range(4)]
    await worker.all_arrived.wait()
    with pytest.raises(UpstreamError) as failed:
        await backend.send(address, post("/v1/bad"))
    assert failed.value.kind == "io"
    assert (await backend.send(address, post("/v1/quick"))).status == 200
    worker.release.set()
    assert [r.status for r in await asyncio.gather(*held)] == [200] * 4
    assert len(made) == 1  # one broken connection says nothing about the pool
    await backend.close()
    assert worker.server is not None
    worker.server.close()


async def test_a_refused_connection_replaces_the_client_and_its_requests_finish_on_it() -> None:
    worker = HoldingWorker(holding=4)
    url = await worker.start()
    made: list[WorkerClient] = []
    backend = await connect_to(url, made)
    address = Address(url)
    held = [asyncio.ensure_future(backend.send(address, post("/v1/held"))) for _ in range(4)]
    await worker.all_arrived.wait()
    assert worker.server is not None
    worker.server.close()  # the worker stops accepting; its open connections go on
    with pytest.raises(UpstreamError) as failed:
        await backend.send(address, post("/v1/quick"))
    assert failed.value.kind == "connect"
    worker.release.set()
    assert [r.status for r in await asyncio.gather(*held)] == [200] * 4
    assert len(made) == 2  # replaced; the requests on the old one finished on it
    await backend.close()


# --- header bytes --------------------------------------------------------------------------


async def recording_worker(answer: bytes) -> tuple[str, list[bytes], asyncio.AbstractServer]:
    """A worker on a real socket that records each request head and sends ``answer``."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if b"content-length: " in head.lower():
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        heads.append(head)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", heads, server


@pytest.mark.parametrize("value", [b"caf\xc3\xa9 \xe2\x82\xac", b"caf\xe9", b"plain"])
async def test_header_bytes_reach_the_worker_as_the_client_sent_them(value: bytes) -> None:
    answer = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}"
    url, heads, server = await recording_worker(answer)
    client = worker_client(ClientSettings(), url)
    response = await client.request("POST", url + "/v1/completions", [(b"x-name", value)], b"{}")
    assert response.status == 200 and response.body == b"{}"
    lines = [line.lower() for line in heads[0].split(b"\r\n")]
    assert b"x-name: " + value.lower() in lines
    await client.close()
    server.close()


async def test_a_whole_answers_header_bytes_come_back_as_the_worker_sent_them() -> None:
    answer = b"HTTP/1.1 200 OK\r\nx-name: caf\xc3\xa9\r\ncontent-length: 2\r\n\r\n{}"
    url, _, server = await recording_worker(answer)
    client = worker_client(ClientSettings(), url)
    response = await client.request("GET", url + "/get_model_info", [], None)
    assert (b"x-name", b"caf\xc3\xa9") in response.headers and response.body == b"{}"
    await client.close()
    server.close()


# --- the DP rank -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "sent"),
    [
        (b'{"text": "x"}', b'{"text": "x","data_parallel_rank":1}'),
        (b"{}", b'{"data_parallel_rank":1}'),
        (b" { \n } \r\n", b' {"data_parallel_rank":1}'),
        (b'{"a": "{"}\n', b'{"a": "{","data_parallel_rank":1}'),
        (b'{"n": 1e400, "big": 123456789012345678901234567890}', None),
    ],
)
def test_the_rank_is_spliced_into_the_clients_bytes(body: bytes, sent: bytes | None) -> None:
    spliced = with_rank(body, 1)
    if sent is not None:
        assert spliced == sent
    else:  # numbers orjson cannot carry through arrive as the client wrote them
        assert spliced == body[:-1] + b',"data_parallel_rank":1}'


def test_a_rank_the_client_gave_is_overridden_by_the_gateways() -> None:
    spliced = with_rank(b'{"data_parallel_rank": 7, "text": "x"}', 0)
    assert json.loads(spliced)["data_parallel_rank"] == 0
    assert orjson.loads(spliced)["data_parallel_rank"] == 0
