"""In-process stand-ins for the network: workers, a whole gateway, and an ASGI client.

Workers are real ``Worker`` values over a real ``HttpBackend`` whose client is a
``wire/mock.py`` ``MockClient``: only the socket is fake. ``gateway(...)`` builds a whole
``Gateway`` on a mock network whose workers answer through ``handler``; ``call(app, ...)``
drives its ASGI app the way our server does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import Any

import orjson

from shunter.aio.once import OnceCell
from shunter.backends.base import Runtime
from shunter.backends.http.backend import HttpBackend
from shunter.backends.http.calls import WorkerCalls
from shunter.backends.http.engines import ENGINES
from shunter.config import GatewayConfig
from shunter.fleet.breaker import BreakerConfig, CircuitBreaker, State
from shunter.fleet.runtime import WorkerRuntime
from shunter.fleet.worker import Worker
from shunter.gateway import Gateway, Network
from shunter.policies.engine_plans import EngineUnit
from shunter.wire.base import UpstreamClient
from shunter.wire.mock import Handler, MockClient, MockRequest, MockResponse


def ok(request: MockRequest) -> MockResponse:
    """A worker that answers every request 200 with a small JSON body."""
    return MockResponse(200, [(b"content-type", b"application/json")], b'{"ok": true}')


def backend(handler: Handler = ok, runtime: Runtime = Runtime.SGLANG) -> HttpBackend:
    """A real HTTP backend whose data and control clients are ``MockClient(handler)``."""
    client = MockClient(handler)

    async def create() -> UpstreamClient:
        return client

    async def data() -> UpstreamClient:
        return client

    cell: OnceCell[UpstreamClient] = OnceCell(create)
    return HttpBackend(ENGINES[runtime], cell, WorkerCalls(client, data))


def make_worker(
    url: str = "http://w:1",
    *,
    models: tuple[str, ...] = ("m",),
    healthy: bool = True,
    in_flight: int = 0,
    handler: Handler = ok,
    runtime: Runtime = Runtime.SGLANG,
    **fields: Any,
) -> Worker:
    """A registered-looking worker (healthy unless told otherwise)."""
    state = WorkerRuntime()
    if healthy:
        state.ready()
    state.in_flight = in_flight
    return Worker(url, backend(handler, runtime), state, models=models, **fields)


def with_breaker(worker: Worker, **config: float) -> CircuitBreaker:
    """Give ``worker`` a breaker whose opening excludes it (no panic: it is alone)."""

    def moved(breaker: CircuitBreaker, old: State, new: State) -> None:
        worker.state.exclude(new is State.OPEN)

    breaker = CircuitBreaker(BreakerConfig(**config), moved)  # type: ignore[arg-type]
    worker.state.breaker = breaker
    return breaker


class Workers:
    """A mock network: each worker URL gets a ``MockClient`` answering through ``handler``
    (which can look at ``request.url`` to play several workers), kept by URL."""

    def __init__(self, handler: Handler = ok, **server_info: Any) -> None:
        self.handler = handler
        self.server_info = {"served_model_name": "m", **server_info}
        self.healthy = True  # what /health answers: 200, or 503 once set false
        self.clients: dict[str, list[MockClient]] = {}  # base URL -> clients made, in order
        self.control = MockClient(self._control)

    def _control(self, request: MockRequest) -> MockResponse:
        """The control plane: /health and SGLang's /server_info answer for every worker;
        anything else is a 404 unless ``control`` answers it."""
        if request.url.endswith("/health"):
            return MockResponse(200 if self.healthy else 503)
        if request.url.endswith(("/server_info", "/get_server_info")):
            return MockResponse(200, body=orjson.dumps(self.server_info))
        return self.control_handler(request)

    def control_handler(self, request: MockRequest) -> MockResponse:
        return MockResponse(404)

    def client(self, base_url: str) -> MockClient:
        client = MockClient(self.handler)
        self.clients.setdefault(base_url, []).append(client)
        return client

    def network(self) -> Network:
        return Network(control=lambda _: self.control, worker=lambda _, url: self.client(url))

    def requests(self, base_url: str) -> list[MockRequest]:
        return [r for c in self.clients.get(base_url, []) for r in c.requests]


class Engines(Workers):
    """Every address answers, except those in ``down`` (an engine still loading)."""

    def __init__(self) -> None:
        super().__init__()
        self.down: set[str] = set()

    def _control(self, request: MockRequest) -> MockResponse:
        if any(address in request.url for address in self.down):
            return MockResponse(503)
        return super()._control(request)


def gateway(
    urls: tuple[str, ...] = ("http://w:1",),
    handler: Handler = ok,
    network: Workers | None = None,
    **settings: Any,
) -> Gateway:
    """A gateway on a mock network; ``await ready(gw, n)`` once started."""
    settings = {"prometheus_port": 0, "policy": "round_robin", **settings}
    config = GatewayConfig(worker_urls=list(urls), **settings).validate()
    return Gateway(config, (network or Workers(handler)).network())


def pd_gateway(
    prefills: tuple[str, ...],
    decodes: tuple[str, ...],
    network: Workers,
    bootstrap_port: int | None = 8998,
    **settings: Any,
) -> Gateway:
    """A PD gateway on a mock network: ``prefills`` (each with ``bootstrap_port``) and
    ``decodes``; ``await ready(gw, len(prefills) + len(decodes))`` once started."""
    settings = {"prometheus_port": 0, "policy": "round_robin", **settings}
    config = GatewayConfig(
        pd_disaggregation=True,
        prefill_urls=[(url, bootstrap_port) for url in prefills],
        decode_urls=list(decodes),
        **settings,
    ).validate()
    return Gateway(config, network.network())


async def ready(gw: Gateway, count: int | None = None, timeout: float = 5.0) -> None:
    """Start ``gw`` and wait until ``count`` workers (default: its --worker-urls) are up."""
    gw.start()
    want = len(gw.config.worker_urls) if count is None else count
    deadline = asyncio.get_running_loop().time() + timeout
    while sum(1 for w in gw.fleet.registry.all() if w.state.healthy) < want:
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{want} workers never registered")
        await asyncio.sleep(0.005)


class Answer:
    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], chunks: list[bytes]):
        self.status = status
        self.headers = headers
        self.chunks = chunks
        self.body = b"".join(chunks)

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    def json(self) -> Any:
        return orjson.loads(self.body)


async def call(
    app: Callable[..., Any],
    method: str,
    path: str,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    raw_path: bytes | None = None,
    query: bytes = b"",
) -> Answer:
    """One request through an ASGI app, as our server hands it over (path decoded once)."""
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": raw_path or path.encode(),
        "query_string": query,
        "scheme": "http",
        "headers": [(b"content-length", b"%d" % len(body)), *(headers or [])],
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

    async def collect(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, collect)
    start = sent[0]
    return Answer(start["status"], list(start["headers"]), [m.get("body", b"") for m in sent[1:]])


class WithoutUnits:
    """What precise rebalancing reads of a scorer (``PrefixScorer``: ``version``, ``units``,
    ``unit_of``, ``newest``), for fake scorers whose engines report no units: nothing to
    plan, no unit to break a tie."""

    def version(self, model: str) -> int:
        return 0

    def units(self, model: str, eligible: Collection[str], limit: int) -> list[EngineUnit] | None:
        return []

    def unit_of(self, model: str, text: str, chat: bytes | None = None) -> int | None:
        return None

    def newest(
        self, model: str, text: str, chat: bytes | None, among: Collection[str]
    ) -> str | None:
        return None
