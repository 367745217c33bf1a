"""Everything one gateway owns, built from its config: registry, router, jobs, metrics."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from shunter.aio.once import OnceCell
from shunter.config import GatewayConfig, grpc_available
from shunter.fleet.breaker import CircuitBreaker, State
from shunter.fleet.ejection import Ejection
from shunter.fleet.health import HealthChecker
from shunter.fleet.jobs import JobQueue
from shunter.fleet.load_monitor import LoadMonitor
from shunter.fleet.registration import Registrar, WorkerSpec
from shunter.fleet.registry import WorkerRegistry
from shunter.fleet.worker import Worker
from shunter.observability.metrics import Metrics
from shunter.observability.tracing import Tracing
from shunter.policies.factory import create_policy
from shunter.policies.registry import PolicyRegistry
from shunter.routing.limiter import Admission
from shunter.routing.router import RegularRouter
from shunter.transport.base import UpstreamClient
from shunter.transport.reqwest import ClientSettings, ReqwestClient
from shunter.transport.split import worker_client

if TYPE_CHECKING:  # grpcio is only imported when the grpc extra is there
    from shunter.routers.grpc import GrpcAttempt

log = logging.getLogger("shunter.gateway")

ClientFactory = Callable[[ClientSettings], UpstreamClient]


async def _close_client(client: UpstreamClient) -> None:
    await client.close()


def _worker_tls(config: GatewayConfig) -> tuple[bytes | None, tuple[bytes, ...]]:
    """The client identity (certificate + key, PEM) and CA bundle for mTLS to workers."""
    identity = None
    if config.client_cert_path and config.client_key_path:
        with open(config.client_cert_path, "rb") as cert, open(config.client_key_path, "rb") as key:
            identity = cert.read() + b"\n" + key.read()
    cas = []
    for path in config.ca_cert_paths:
        with open(path, "rb") as ca:
            cas.append(ca.read())
    return identity, tuple(cas)


def _ssl_context(config: GatewayConfig) -> ssl.SSLContext | None:
    """mTLS and extra CAs for the asyncio-based stream client, from the same files."""
    if not config.client_cert_path and not config.ca_cert_paths:
        return None
    context = ssl.create_default_context()
    for path in config.ca_cert_paths:
        context.load_verify_locations(cafile=path)
    if config.client_cert_path and config.client_key_path:
        context.load_cert_chain(config.client_cert_path, config.client_key_path)
    return context


def _scheduler_cell_factory(
    retire_grace_secs: float = 1800.0,
) -> Callable[[str], OnceCell[Any]] | None:
    """Cells for gRPC workers' channels: created on first use, replaced when broken. A
    replaced channel is retired (closed once its running calls end), not cut."""
    if not grpc_available():
        return None
    from shunter.transport.scheduler import SchedulerClient

    def new_cell(url: str) -> OnceCell[Any]:
        async def create() -> SchedulerClient:
            return SchedulerClient(url)

        async def retire(client: SchedulerClient) -> None:
            await client.retire(retire_grace_secs)

        return OnceCell(create, retire)

    return new_cell


# Fetching a tokenizer from a worker (GetTokenizer streams a zip of a few MB) may take
# longer than a probe.
TOKENIZER_FETCH_TIMEOUT_SECS = 30.0


def _grpc_attempt(config: GatewayConfig, metrics: Metrics) -> GrpcAttempt | None:
    if not grpc_available():
        return None
    from shunter.routers.grpc import GrpcAttempt, Tokenizers

    tokenizers = Tokenizers(
        config.tokenizer_path, config.chat_template, TOKENIZER_FETCH_TIMEOUT_SECS
    )
    return GrpcAttempt(metrics, tokenizers, config.request_timeout_secs,
                       config.reasoning_parser, config.tool_call_parser)  # fmt: skip


class GatewayState:
    def __init__(self, config: GatewayConfig, client_factory: ClientFactory | None = None) -> None:
        self.config = config
        self.registry = WorkerRegistry()
        self.metrics = Metrics(self.registry.all, config.duration_buckets)
        self.jobs = JobQueue()
        self.policies = PolicyRegistry(
            create_policy(config.policy, config.policy_settings), config.policy_settings
        )
        self.tracing = Tracing(config.otlp_traces_endpoint) if config.enable_trace else None
        self.router = RegularRouter(
            self.registry, self.policies, self.metrics, config.retry, self.tracing,
            _grpc_attempt(config, self.metrics),
            gateway_auth=None if config.api_key is None else f"Bearer {config.api_key}".encode(),
        )  # fmt: skip
        self.admission = Admission(config.admission) if config.admission.enabled else None
        identity, cas = _worker_tls(config)
        worker_settings = ClientSettings(
            connect_timeout_secs=config.connect_timeout_secs,
            read_timeout_secs=config.request_timeout_secs,
            max_response_bytes=config.max_response_bytes,
            client_cert_pem=identity,
            ca_certs_pem=cas,
            ssl_context=_ssl_context(config),
        )
        control_settings = ClientSettings(
            connect_timeout_secs=min(config.connect_timeout_secs, config.probe_timeout_secs),
            read_timeout_secs=config.probe_timeout_secs,
            client_cert_pem=identity,
            ca_certs_pem=cas,
        )
        # Tests pass one factory for everything; by default the control plane uses pyreqwest
        # and each worker a split client (transport/split.py).
        self.control = (client_factory or ReqwestClient)(control_settings)

        def new_client_cell(base_url: str) -> OnceCell[UpstreamClient]:
            async def create() -> UpstreamClient:
                if client_factory is not None:
                    return client_factory(worker_settings)
                return worker_client(worker_settings, base_url)

            return OnceCell(create, _close_client)

        self.ejection = Ejection(
            config.breaker.panic_threshold, self.registry.get_by_model, self.metrics.breaker_panic
        )
        self.health = HealthChecker(
            config.health,
            self.registry.all,
            self.control,
            self.metrics.health_checked,
            on_flip=lambda worker: self.ejection.changed((worker,)),
        )
        self.load_monitor = LoadMonitor(
            self.registry.all, self.control, config.worker_startup_check_interval
        )
        self.registrar = Registrar(
            self.registry,
            self.control,
            new_client_cell,
            new_scheduler_cell=_scheduler_cell_factory(config.request_timeout_secs),
            probe_timeout_secs=config.probe_timeout_secs,
            startup_timeout_secs=config.worker_startup_timeout_secs,
            check_interval_secs=config.worker_startup_check_interval,
            dp_aware=config.dp_aware,
            on_change=self.fleet_changed,
        )

    def fleet_changed(self, added: Sequence[Worker], removed: Sequence[Worker]) -> None:
        for worker in removed:
            self.policies.on_worker_removed(worker)
            if worker.breaker is not None:
                worker.breaker.reset()
        for worker in added:
            self._attach_breaker(worker)
            self.policies.on_worker_added(worker)
        self.ejection.changed((*added, *removed))

    def _attach_breaker(self, worker: Worker) -> None:
        def moved(breaker: CircuitBreaker, old: State, new: State) -> None:
            self.metrics.breaker_moved(worker, old.label, new.label)
            facts: dict[str, object] = {"url": worker.url, "from": old.label, "to": new.label}
            if new is State.OPEN:
                facts["open_secs"] = breaker.open_secs
                facts["ejections"] = breaker.ejections
            log.warning("circuit breaker moved", extra=facts)
            self.ejection.changed((worker,))

        worker.breaker_open = False
        worker.breaker = CircuitBreaker(self.config.breaker, moved)

    def submit_add(self, spec: WorkerSpec) -> None:
        async def add() -> None:
            await self.registrar.add(spec)

        self.jobs.submit("AddWorker", spec.url, add)

    def register_configured_workers(self) -> None:
        """Queue the ``--worker-urls`` workers, with ``--worker-api-key`` as their key (smg
        gave them the gateway's own key, so whoever ran a worker could administer it)."""
        for url in self.config.worker_urls:
            self.submit_add(WorkerSpec(url=url, api_key=self.config.worker_api_key,
                                       probe_grpc=url in self.config.probe_both))  # fmt: skip

    def start(self) -> None:
        """Start background work; needs the running event loop."""
        self.policies.start()
        self.load_monitor.start()
        self.health.start()
        self.register_configured_workers()

    async def close(self) -> None:
        await self.jobs.cancel_all()
        await self.load_monitor.stop()
        await self.health.stop()
        await self.policies.stop()
        for worker in self.registry.all():
            if worker.client_cell is not None:
                await worker.client_cell.close()
            if worker.scheduler_cell is not None and worker.scheduler_cell.value is not None:
                await worker.scheduler_cell.value.close()
        await self.control.close()
        if self.tracing is not None:
            self.tracing.shutdown()  # flushes the spans not yet exported
