"""From a worker's URL to its backend: wait until it answers, ask what it is, build it.

``http://`` and ``https://`` workers get an ``HttpBackend`` for the engine they turn out to
run; ``grpc://`` workers a ``GrpcBackend``. A URL given without a scheme is probed as HTTP
and as gRPC at once, and the first protocol to answer decides (smg does the same).

How long to wait for a worker that is still starting is the caller's (the fleet's) rule:
``connect`` takes a ``wait(probe, what)`` that calls ``probe`` until it returns None.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shunter.aio.once import OnceCell
from shunter.backends.base import Address, Backend, Description, Runtime
from shunter.backends.http.backend import HttpBackend, probe_http
from shunter.backends.http.calls import WorkerCalls
from shunter.backends.http.client import worker_client
from shunter.backends.http.discovery import describe
from shunter.backends.http.engines import ENGINES
from shunter.backends.http.forwarding import DEFAULT_RULE, ForwardRule
from shunter.backends.http.slot_turns import SlotTurns, TurnTakingBackend
from shunter.wire.base import UpstreamClient, WholeClient
from shunter.wire.reqwest import ClientSettings

if TYPE_CHECKING:  # grpcio is only imported when the grpc extra is there
    from shunter.backends.grpc.pipeline import GrpcPipeline

log = logging.getLogger("shunter.backends")

Probe = Callable[[], Awaitable[str | None]]
Wait = Callable[[Probe, str], Awaitable[None]]


def grpc_available() -> bool:
    """Whether the grpc extra (grpcio, smg-grpc-proto, tokenizers, jinja2) is installed."""
    from importlib.util import find_spec

    modules = ("grpc", "smg_grpc_proto", "tokenizers", "jinja2")
    return all(find_spec(m) is not None for m in modules)


class ConnectError(ValueError):
    """A worker URL this gateway cannot serve (a gRPC worker without the grpc extra)."""


@dataclass
class Connected:
    url: str  # as registered: a URL probed both ways gets the scheme that answered
    backend: Backend
    description: Description


@dataclass(frozen=True)
class GrpcSupport:
    """What gRPC backends share: the request pipeline, and how long a replaced channel's
    running calls may take to finish."""

    pipeline: GrpcPipeline
    retire_grace_secs: float


class Connector:
    def __init__(
        self,
        control: WholeClient,
        worker_settings: ClientSettings,
        probe_timeout_secs: float,
        health_endpoint: str = "/health",
        grpc: Callable[[], GrpcSupport] | None = None,
        data_client: Callable[[ClientSettings, str], UpstreamClient] = worker_client,
        forward: ForwardRule = DEFAULT_RULE,
        slot_wait_secs: float = 0.0,
    ) -> None:
        self.control = control
        self.worker_settings = worker_settings
        self.probe_timeout_secs = probe_timeout_secs
        self.health_endpoint = health_endpoint
        # Makes what gRPC backends share, for the first gRPC worker: grpcio and the
        # pipeline's imports take ~0.1 s, which a gateway without one never spends.
        self.make_grpc = grpc  # None: the grpc extra is not installed
        self._grpc_shared: GrpcSupport | None = None
        self.data_client = data_client  # tests swap the network here
        self.forward = forward  # the client headers HTTP workers receive
        self.slot_wait_secs = slot_wait_secs  # llama.cpp slot turns (0: off)

    async def connect(
        self,
        url: str,
        api_key: str | None,
        runtime: Runtime | None,
        wait: Wait,
        probe_both: bool = False,
    ) -> Connected:
        """The worker's backend and description, once it answers; raises what went wrong."""
        if url.startswith("grpc://"):
            return await self._grpc(url, wait)
        address = Address(url, api_key)
        if not (probe_both and self.make_grpc is not None):
            await wait(lambda: self._probe_http(address), f"worker {url}")
        else:
            grpc_url = "grpc://" + url.split("://", 1)[1]
            grpc = self._grpc_backend(grpc_url)
            over_http = asyncio.ensure_future(
                wait(lambda: self._probe_http(address), f"worker {url}")
            )
            over_grpc = asyncio.ensure_future(
                wait(lambda: grpc.probe(address, self.probe_timeout_secs), "gRPC worker")
            )
            try:
                first = await _first_to_answer(over_http, over_grpc)
            except BaseException:  # neither answered, or the addition was cancelled
                await grpc.close()
                raise
            if first == 1:
                return await self._described_grpc(grpc_url, grpc)
            await grpc.close()
        calls = self._calls(None)
        description = await describe(calls, address, runtime)
        return Connected(url, self._http_backend(url, description), description)

    # --- HTTP --------------------------------------------------------------------------------

    def _calls(self, clients: OnceCell[UpstreamClient] | None) -> WorkerCalls:
        async def data() -> UpstreamClient:
            assert clients is not None, "no data-plane client before registration"
            return clients.value or await clients.get()

        return WorkerCalls(self.control, data)

    async def _probe_http(self, address: Address) -> str | None:
        return await probe_http(self._calls(None), address, self.health_endpoint)

    def _http_backend(self, url: str, description: Description) -> HttpBackend:
        settings = self.worker_settings

        async def create() -> UpstreamClient:
            return self.data_client(settings, url)

        async def close(client: UpstreamClient) -> None:
            await client.close()

        async def retire(client: UpstreamClient) -> None:
            # A request may take as long as the read timeout allows; no longer.
            await client.retire(settings.read_timeout_secs)

        clients: OnceCell[UpstreamClient] = OnceCell(create, close, retire)
        engine = ENGINES[description.runtime]
        calls = self._calls(clients)
        if self.slot_wait_secs > 0 and description.slots:  # only llama.cpp says its slots
            turns = SlotTurns(description.slots, self.slot_wait_secs)
            return TurnTakingBackend(
                turns, engine, clients, calls, self.health_endpoint, self.forward
            )
        return HttpBackend(engine, clients, calls, self.health_endpoint, self.forward)

    # --- gRPC --------------------------------------------------------------------------------

    def _grpc_backend(self, url: str) -> Backend:
        if self.make_grpc is None:
            raise ConnectError(
                f"{url}: gRPC workers need the grpc extra (pip install 'shunter[grpc]')"
            )
        from shunter.backends.grpc.backend import GrpcBackend

        if self._grpc_shared is None:
            self._grpc_shared = self.make_grpc()
        shared = self._grpc_shared
        return GrpcBackend(url, shared.pipeline, shared.retire_grace_secs)

    async def _grpc(self, url: str, wait: Wait) -> Connected:
        backend = self._grpc_backend(url)
        address = Address(url)
        try:
            await wait(lambda: backend.probe(address, self.probe_timeout_secs), "gRPC worker")
        except BaseException:
            await backend.close()
            raise
        return await self._described_grpc(url, backend)

    async def _described_grpc(self, url: str, backend: Backend) -> Connected:
        from shunter.backends.grpc.backend import GrpcBackend

        assert isinstance(backend, GrpcBackend)
        try:
            description = await backend.describe(self.probe_timeout_secs)
        except BaseException:
            await backend.close()
            raise
        return Connected(url, backend, description)


async def _first_to_answer(http: asyncio.Future[None], grpc: asyncio.Future[None]) -> int:
    """0 when the HTTP wait succeeds first, 1 for gRPC. If both fail, raise the HTTP one's
    error (the usual case for a URL without a scheme); the other wait is cancelled, and has
    stopped by the time this returns (so its backend can be closed)."""
    order = {http: 0, grpc: 1}
    errors: dict[int, BaseException] = {}
    try:
        pending: set[asyncio.Future[None]] = {http, grpc}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if error is None:
                    return order[task]
                errors[order[task]] = error
        raise errors[0]
    finally:
        for task in order:
            task.cancel()
        await asyncio.wait(order)
