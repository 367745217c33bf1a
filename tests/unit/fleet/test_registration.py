"""Adding workers: one worker is registered once, however it is asked for."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from shunter.aio.once import CellClosed
from shunter.backends.base import Address, Backend, Outbound, Runtime
from shunter.backends.connect import Connected, Connector, GrpcSupport, Probe, Wait
from shunter.backends.grpc.backend import GrpcBackend
from shunter.backends.grpc.pipeline import GrpcPipeline
from shunter.backends.grpc.tokenizers import Tokenizers
from shunter.config import GatewayConfig
from shunter.fleet.spec import SpecError, WorkerSpec
from shunter.wire.reqwest import ClientSettings

from support.fakes import Workers, call, gateway, make_worker, ready
from support.harness import free_port


class SlowToConnect(Connector):
    """A connector whose connections all finish together, once ``go`` is set, so that two
    additions of one worker both get past the first check before either registers."""

    def __init__(self, inner: Connector) -> None:
        super().__init__(inner.control, inner.worker_settings, inner.probe_timeout_secs)
        self.inner = inner
        self.go = asyncio.Event()
        self.two_connected = asyncio.Event()
        self.connected: list[Connected] = []

    async def connect(
        self,
        url: str,
        api_key: str | None,
        runtime: Runtime | None,
        wait: Wait,
        probe_both: bool = False,
    ) -> Connected:
        connected = await self.inner.connect(url, api_key, runtime, wait, probe_both)
        self.connected.append(connected)
        if len(self.connected) == 2:
            self.two_connected.set()
        await self.go.wait()
        return connected


async def test_two_additions_of_one_worker_register_it_once_and_close_the_spare() -> None:
    gw = gateway(())
    await ready(gw, 0)
    registrar = gw.fleet.registrar
    connector = SlowToConnect(registrar.connector)
    registrar.connector = connector
    spec = WorkerSpec("http://w:1")
    adds = [asyncio.ensure_future(registrar.add(spec)) for _ in range(2)]
    await connector.two_connected.wait()
    connector.go.set()
    results = await asyncio.gather(*adds, return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["SpecError", "list"]
    assert [w.url for w in gw.fleet.registry.all()] == ["http://w:1"]
    kept = gw.fleet.registry.all()[0].backend
    [spare] = [c.backend for c in connector.connected if c.backend is not kept]
    request = Outbound("POST", "/v1/completions", b"", [], b"{}", False, "r", "m")
    with pytest.raises(CellClosed):  # the spare backend was closed: it makes no client
        await spare.send(Address("http://w:1"), request)
    await gw.close()


async def test_a_second_addition_while_the_first_is_under_way_is_409() -> None:
    network = Workers()
    network.healthy = False  # the worker is still starting: the first addition waits
    gw = gateway((), network=network)
    await ready(gw, 0)
    body = orjson.dumps({"url": "http://w:1"})
    assert (await call(gw.app, "POST", "/workers", body)).status == 202
    again = await call(gw.app, "POST", "/workers", body)
    assert again.status == 409 and again.json()["error"]["code"] == "WORKER_ADD_IN_PROGRESS"
    network.healthy = True
    await ready(gw, 1)
    assert len(gw.fleet.registry.all()) == 1
    await gw.close()


async def test_a_worker_added_without_a_scheme_is_found_under_its_grpc_url() -> None:
    gw = gateway(())
    await ready(gw, 0)
    gw.fleet.registry.register(make_worker("grpc://w:1"))  # "w:1" turned out to speak gRPC
    answer = await call(gw.app, "POST", "/workers", orjson.dumps({"url": "w:1"}))
    assert answer.status == 409 and answer.json()["error"]["code"] == "WORKER_ALREADY_EXISTS"
    with pytest.raises(SpecError, match="grpc://w:1 already exists"):
        await gw.fleet.registrar.add(WorkerSpec("http://w:1", probe_grpc=True))
    await gw.close()


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        (["http://a:1", "http://a:1"], ["http://a:1"]),
        (["a:1", "http://a:1/", "HTTP://a:1", "http://b:1"], ["http://a:1", "http://b:1"]),
    ],
)
def test_repeated_worker_urls_are_kept_once(given: list[str], kept: list[str]) -> None:
    settings: dict[str, Any] = {"worker_urls": given}
    assert GatewayConfig(**settings).validate().worker_urls == kept


# --- what is closed ------------------------------------------------------------------------


async def test_a_removed_worker_still_draining_at_shutdown_is_closed() -> None:
    network = Workers()
    gw = gateway(network=network)
    await ready(gw)
    assert (await call(gw.app, "POST", "/v1/completions", b"{}")).status == 200
    [client] = network.clients["http://w:1"]
    worker = gw.fleet.registry.all()[0]
    worker.state.started()  # a request still running on it
    gw.fleet.remove("http://w:1")
    await gw.close()  # long before the drain would end
    assert client.closed


class RecordingGrpc(Connector):
    """Keeps the gRPC backends it builds, to see whether they were closed."""

    made: list[GrpcBackend]

    def _grpc_backend(self, url: str) -> Backend:
        backend = super()._grpc_backend(url)
        assert isinstance(backend, GrpcBackend)
        self.made = [*getattr(self, "made", []), backend]
        return backend


def grpc_connector(network: Workers) -> RecordingGrpc:
    pipeline = GrpcPipeline(Tokenizers(None, None, 1.0), 1.0, None, None)
    support = GrpcSupport(pipeline, retire_grace_secs=1.0)
    return RecordingGrpc(network.control, ClientSettings(), 0.2, grpc=lambda: support)


async def assert_closed(backend: GrpcBackend) -> None:
    assert backend.channel.value is None
    with pytest.raises(CellClosed):
        await backend.channel.get()


async def test_a_url_without_a_scheme_that_answers_neither_way_leaves_no_channel_open() -> None:
    network = Workers()
    network.healthy = False  # /health answers 503
    connector = grpc_connector(network)
    url = f"http://127.0.0.1:{free_port()}"  # and no gRPC server listens there

    async def once(probe: Probe, what: str) -> None:
        if (problem := await probe()) is not None:
            raise TimeoutError(f"{what}: {problem}")

    with pytest.raises(TimeoutError):
        await connector.connect(url, None, None, once, probe_both=True)
    [made] = connector.made
    await assert_closed(made)


async def test_a_cancelled_addition_probing_both_ways_leaves_no_channel_open() -> None:
    connector = grpc_connector(Workers())
    waiting = asyncio.Event()

    async def forever(probe: Probe, what: str) -> None:
        waiting.set()
        await asyncio.Event().wait()

    url = f"http://127.0.0.1:{free_port()}"
    adding = asyncio.ensure_future(connector.connect(url, None, None, forever, probe_both=True))
    await waiting.wait()
    adding.cancel()
    await asyncio.gather(adding, return_exceptions=True)
    [made] = connector.made
    await assert_closed(made)
