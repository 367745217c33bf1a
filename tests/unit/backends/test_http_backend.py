"""An HTTP worker's backend: its client created once, headers in and out, engine quirks."""

from __future__ import annotations

import asyncio

import pytest

from shunter.backends.base import Address, Outbound, Runtime
from shunter.backends.connect import Connector
from shunter.backends.http.backend import HttpBackend
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
