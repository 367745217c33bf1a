"""The composition root: one gateway's parts, built from its config and wired together.

No request logic lives here: each part is built with exactly what it uses, and the ASGI
app at the end is handed the handler groups. ``Network`` is the seam to the outside world:
the clients the gateway uses to reach workers. Tests pass a ``wire/mock.py`` network and
run a whole gateway in process.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from shunter.api.app import AppSettings, GatewayApp
from shunter.api.dashboard import Dashboard
from shunter.api.inference import InferenceApi
from shunter.api.info import InfoApi
from shunter.api.middleware import KeyCheck
from shunter.api.workers import WorkersApi
from shunter.backends.connect import Connector, GrpcSupport, grpc_available
from shunter.backends.http.client import worker_client
from shunter.config import GatewayConfig
from shunter.fleet.fleet import Fleet, FleetObserver, FleetSettings
from shunter.fleet.spec import WorkerSpec
from shunter.observability.metrics import Metrics
from shunter.observability.tracing import Tracing
from shunter.policies.factory import PolicyError, create_policy
from shunter.policies.registry import PolicyRegistry
from shunter.routing.limiter import Admission
from shunter.routing.router import Router
from shunter.wire.base import UpstreamClient, WholeClient
from shunter.wire.reqwest import ClientSettings, ReqwestClient

log = logging.getLogger("shunter.gateway")

# Fetching a tokenizer from a worker (GetTokenizer streams a zip of a few MB) may take
# longer than a probe.
TOKENIZER_FETCH_TIMEOUT_SECS = 30.0


@dataclass(frozen=True)
class Network:
    """How the gateway reaches workers: a client for the control plane's probes, and one
    data-plane client per HTTP worker."""

    control: Callable[[ClientSettings], WholeClient] = ReqwestClient
    worker: Callable[[ClientSettings, str], UpstreamClient] = worker_client


class Gateway:
    def __init__(self, config: GatewayConfig, network: Network | None = None) -> None:
        network = network or Network()
        self.config = config
        self.draining = False  # set on SIGTERM: /readiness turns 503 at once
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
        self.control = network.control(control_settings)
        connector = Connector(
            self.control,
            worker_settings,
            config.probe_timeout_secs,
            config.health.endpoint,
            _grpc_support(config),
            network.worker,
        )
        self.metrics = Metrics(duration_buckets=config.duration_buckets)
        observer = FleetObserver(
            health_checked=self.metrics.health_checked,
            breaker_moved=self.metrics.breaker_moved,
            panic=self.metrics.breaker_panic,
        )
        settings = FleetSettings(
            health=config.health,
            breaker=config.breaker,
            startup_timeout_secs=config.worker_startup_timeout_secs,
            check_interval_secs=config.worker_startup_check_interval,
            drain_timeout_secs=config.request_timeout_secs,
            dp_aware=config.dp_aware,
        )
        self.fleet = Fleet(settings, connector, observer)
        self.metrics.workers = self.fleet.registry.all
        self.policies = PolicyRegistry(
            create_policy(config.policy, config.policy_settings), config.policy_settings
        )
        self.fleet.subscribe(self.policies.fleet_changed)
        self.tracing = Tracing(config.otlp_traces_endpoint) if config.enable_trace else None
        self.router = Router(
            self.fleet.registry, self.policies, self.metrics, config.retry, self.tracing
        )
        admission = Admission(config.admission) if config.admission.enabled else None
        keys = KeyCheck(config.api_key)
        self.app = GatewayApp(
            AppSettings(
                cors_allowed_origins=tuple(config.cors_allowed_origins),
                listen_host=config.host,
                request_id_headers=tuple(config.request_id_headers),
                max_payload_size=config.max_payload_size,
            ),
            keys,
            self.metrics,
            InferenceApi(self.router, self.metrics, admission, keys.expected),
            InfoApi(self.fleet.registry, self.fleet.loads, lambda: self.draining),
            WorkersApi(self.fleet, _check_policy),
            Dashboard(config.api_key, keys.carried_by, self._dashboard_data),
        )

    def _dashboard_data(self) -> dict[str, object]:
        """What the dashboard shows: every worker, the models, the default policy."""
        registry = self.fleet.registry
        return {
            "workers": [w.to_info() for w in registry.all()],
            "models": list(registry.models()),
            "policy": self.policies.default.name,
        }

    def start(self) -> None:
        """Start background work and queue the ``--worker-urls`` workers (needs the loop)."""
        config = self.config
        if config.prometheus_port:
            self.metrics.serve(config.prometheus_host, config.prometheus_port)
        self.policies.start()
        self.fleet.start()
        for url in config.worker_urls:
            # Their key is --worker-api-key: smg gave them the gateway's own key, so whoever
            # ran a worker could administer the gateway.
            spec = WorkerSpec(
                url, api_key=config.worker_api_key, probe_grpc=url in config.probe_both
            )
            self.fleet.submit_add(spec)

    async def close(self) -> None:
        await self.fleet.close()
        await self.policies.stop()
        await self.control.close()
        if self.tracing is not None:
            self.tracing.shutdown()  # flushes the spans not yet exported
        self.metrics.shutdown()


def _check_policy(name: str) -> None:
    try:
        create_policy(name)
    except PolicyError as exc:
        raise ValueError(str(exc)) from None


def _grpc_support(config: GatewayConfig) -> GrpcSupport | None:
    """What gRPC workers share, when the grpc extra is installed."""
    if not grpc_available():
        return None
    from shunter.backends.grpc.pipeline import GrpcPipeline
    from shunter.backends.grpc.tokenizers import Tokenizers

    tokenizers = Tokenizers(
        config.tokenizer_path, config.chat_template, TOKENIZER_FETCH_TIMEOUT_SECS
    )
    pipeline = GrpcPipeline(
        tokenizers, config.request_timeout_secs, config.reasoning_parser, config.tool_call_parser
    )
    return GrpcSupport(pipeline, retire_grace_secs=config.request_timeout_secs)


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
