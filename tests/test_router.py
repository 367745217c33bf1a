"""The router with the network swapped for an in-process transport."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from shunter.aio.once import OnceCell
from shunter.api.app import GatewayApp
from shunter.config import GatewayConfig
from shunter.fleet.worker import Worker
from shunter.routing.retry import RetryConfig
from shunter.server.state import GatewayState
from shunter.wire.base import FullResponse, HeaderPairs, UpstreamError


class FakeClient:
    """Records requests; fails with ``fail`` while it is set."""

    made = 0

    def __init__(self) -> None:
        FakeClient.made += 1
        self.serial = FakeClient.made
        self.seen: list[tuple[str, list[tuple[str, str]], bytes | None]] = []
        self.fail: str | None = None

    async def request(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> FullResponse:
        self.seen.append((url, list(headers), body))
        if self.fail:
            raise UpstreamError(self.fail, "refused")
        reply = orjson.dumps({"client": self.serial})
        return FullResponse(200, [("content-type", "application/json"), ("connection", "x")], reply)

    async def close(self) -> None:
        pass


async def call(
    app: GatewayApp, path: str, body: bytes, headers: list[tuple[bytes, bytes]] = ()
) -> tuple[int, dict[bytes, bytes], Any]:  # type: ignore[assignment]
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "query_string": b"",
        "headers": [(b"content-length", str(len(body)).encode()), *headers],
    }
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()
        return {}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, payload = sent[0], sent[1]["body"]
    return start["status"], dict(start["headers"]), orjson.loads(payload)


def gateway_with(*workers: Worker, retries: bool = False) -> tuple[GatewayApp, list[FakeClient]]:
    state = GatewayState(
        GatewayConfig(
            prometheus_port=0, policy="round_robin", retry=RetryConfig(disabled=not retries)
        ).validate(),
        client_factory=lambda settings: FakeClient(),
    )  # type: ignore[arg-type,return-value]
    clients: list[FakeClient] = []

    async def create() -> FakeClient:
        client = FakeClient()
        clients.append(client)
        return client

    for worker in workers:
        worker.client_cell = OnceCell(create)  # type: ignore[arg-type]
        worker.healthy = True
        state.registry.register(worker)
        state.fleet_changed([worker], ())
    return GatewayApp(state), clients


async def test_a_connection_failure_is_502_and_the_client_is_replaced() -> None:
    app, clients = gateway_with(Worker(url="http://w:1", models=("m",)))
    status, _, _ = await call(app, "/v1/completions", b'{"prompt": "x"}')
    assert status == 200 and len(clients) == 1
    clients[0].fail = "connect"
    status, _, error = await call(app, "/v1/completions", b'{"prompt": "x"}')
    assert status == 502 and error["error"]["code"] == "upstream_unavailable"
    for _ in range(50):
        if len(clients) == 2:
            break
        await asyncio.sleep(0.001)
    status, _, answer = await call(app, "/v1/completions", b'{"prompt": "x"}')
    assert status == 200 and answer == {"client": clients[1].serial}


async def test_with_retries_a_connection_failure_is_retried_on_the_fresh_client() -> None:
    app, clients = gateway_with(Worker(url="http://w:1", models=("m",)), retries=True)
    await call(app, "/v1/completions", b"{}")
    clients[0].fail = "connect"
    status, _, answer = await call(app, "/v1/completions", b"{}")
    assert status == 200 and answer == {"client": clients[1].serial}


async def test_retries_move_to_another_worker_and_feed_the_breakers() -> None:
    a, b = Worker(url="http://a:1", models=("m",)), Worker(url="http://b:1", models=("m",))
    app, clients = gateway_with(a, b, retries=True)
    await call(app, "/v1/completions", b"{}")
    await call(app, "/v1/completions", b"{}")
    failing = next(c for c in clients if c.seen[0][0].startswith("http://a"))
    failing.fail = "io"
    for _ in range(4):
        status, _, _ = await call(app, "/v1/completions", b"{}")
        assert status == 200
    assert a.breaker is not None and a.breaker.outcomes["failure"] >= 1


async def test_a_timeout_is_504_and_keeps_the_client() -> None:
    app, clients = gateway_with(Worker(url="http://w:1", models=("m",)))
    await call(app, "/v1/completions", b"{}")
    clients[0].fail = "timeout"
    status, _, error = await call(app, "/v1/completions", b"{}")
    assert status == 504 and error["error"]["code"] == "upstream_timeout"
    await asyncio.sleep(0.01)
    assert len(clients) == 1


async def test_headers_forwarded_and_relayed() -> None:
    app, clients = gateway_with(Worker(url="http://w:1", models=("m",), api_key="wk"))
    status, headers, _ = await call(
        app, "/v1/chat/completions", b'{"messages": []}',
        [(b"host", b"gw"), (b"connection", b"keep-alive"), (b"authorization", b"Bearer client"),
         (b"x-trace", b"t1"), (b"transfer-encoding", b"chunked")],
    )  # fmt: skip
    assert status == 200
    url, sent, body = clients[0].seen[0]
    names = [k for k, _ in sent]
    assert url == "http://w:1/v1/chat/completions" and body == b'{"messages": []}'
    assert ("authorization", "Bearer wk") in sent and ("x-trace", "t1") in sent
    assert not {"host", "connection", "transfer-encoding", "content-length"} & set(names)
    assert names.count("authorization") == 1 and names.count("x-request-id") == 1
    assert b"connection" not in headers and headers[b"x-request-id"].startswith(b"chatcmpl-")


async def test_dp_rank_is_injected_into_the_body_sent_to_the_base_url() -> None:
    ranks = [Worker(url=f"http://w:1@{r}", models=("m",), dp_rank=r, dp_size=2) for r in (0, 1)]
    app, clients = gateway_with(*ranks)
    for _ in range(2):
        await call(app, "/generate", b'{"text": "x", "extra": [1]}')
    sent = [(url, orjson.loads(body)) for client in clients for url, _, body in client.seen]
    assert [url for url, _ in sent] == ["http://w:1/generate"] * 2
    assert sorted(body["data_parallel_rank"] for _, body in sent) == [0, 1]
    assert all(body["extra"] == [1] for _, body in sent)
