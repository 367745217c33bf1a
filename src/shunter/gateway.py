"""The composition root: one gateway's parts, built from its config and wired together.

No request logic lives here: each part is built with exactly what it uses, and the ASGI
app at the end is handed the handler groups. ``Network`` is the seam to the outside world:
the clients the gateway uses to reach workers. Tests pass a ``wire/mock.py`` network and
run a whole gateway in process.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from shunter.api.app import AppSettings, GatewayApp
from shunter.api.dashboard import Dashboard
from shunter.api.inference import InferenceApi
from shunter.api.info import InfoApi
from shunter.api.middleware import KeyCheck
from shunter.api.responses import ResponsesApi
from shunter.api.workers import WorkersApi
from shunter.backends.connect import Connector, GrpcSupport, grpc_available
from shunter.backends.http.client import worker_client
from shunter.backends.http.forwarding import ForwardRule
from shunter.config import GatewayConfig
from shunter.discovery.reconciler import DiscoveryObserver
from shunter.fleet.fleet import Fleet, FleetObserver, FleetSettings
from shunter.fleet.spec import WorkerSpec
from shunter.fleet.worker import Worker, WorkerType
from shunter.kv_events.chat import chat_ids_from
from shunter.kv_events.hub import KvEvents, tokenizer_from
from shunter.observability.metrics import Metrics
from shunter.observability.tracing import Tracing
from shunter.peers.exchange import Exchange
from shunter.policies.factory import PolicyError, create_policy
from shunter.policies.registry import PolicyRegistry
from shunter.routing.affinity import ResponseAffinity
from shunter.routing.aliases import ModelAliases
from shunter.routing.limiter import Admission
from shunter.routing.pd.pairs import PairSelector
from shunter.routing.pd.router import PdRouter
from shunter.routing.responses import ResponseRouter
from shunter.routing.router import Router
from shunter.routing.sticky import StickySessions
from shunter.supervisor.control import METRICS, WORKERS, ControlSocket
from shunter.supervisor.siblings import Siblings
from shunter.wire.base import UpstreamClient, WholeClient
from shunter.wire.reqwest import ClientSettings, ReqwestClient

if TYPE_CHECKING:
    from shunter.discovery.gateways import GatewayPods
    from shunter.discovery.service import Discovery

log = logging.getLogger("shunter.gateway")

# Fetching a tokenizer from a worker (GetTokenizer streams a zip of a few MB) may take
# longer than a probe.
TOKENIZER_FETCH_TIMEOUT_SECS = 30.0
PD_LEGS = (WorkerType.PREFILL, WorkerType.DECODE)


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
            ForwardRule(config.forward_headers),
            config.slot_wait_secs,
        )
        self.metrics = Metrics(duration_buckets=config.duration_buckets)
        # A --workers child answers its supervisor and siblings on a socket of its own, and
        # merges its siblings' view of the workers into its /workers (supervisor/).
        self.control_socket = self._control_socket(config)
        siblings = Siblings(config.sibling_sockets) if config.sibling_sockets else None
        self.merge_siblings = siblings.merged if siblings is not None else None
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
            remove_unhealthy=config.remove_unhealthy_workers,
        )
        self.fleet = Fleet(settings, connector, observer)
        self.policy_registries: list[PolicyRegistry] = []
        self.sticky_sessions: list[StickySessions] = []  # --routing-key-override's memories
        # Precise cache_aware: the engines' KV events (subscribers start with their workers).
        source = config.kv_events_tokenizer
        self.kv_events = KvEvents(tokenizer_from(source), chat=chat_ids_from(source))
        self.fleet.subscribe(self._kv_events_changed)
        self.metrics.kv_events = self.kv_events.counters
        self.metrics.workers = self.fleet.registry.all
        # The Responses API: which worker stored each response (shared with the peers).
        self.response_affinity = ResponseAffinity(
            config.response_affinity_max_entries, config.response_affinity_ttl_secs
        )
        # Replicas: the regular policies' decisions go to the peers, theirs come back.
        self.peers = self._peers(config)
        self.policies = self._policies(config.policy, WorkerType.REGULAR)
        self.tracing = Tracing(config.otlp_traces_endpoint) if config.enable_trace else None
        self.aliases = ModelAliases(config.model_aliases) if config.model_aliases else None
        if self.aliases is not None:
            self.fleet.subscribe(self.aliases.fleet_changed)
        self.router = self._router(config)
        self.discovery = self._discovery(config)
        self.gateway_pods = self._gateway_pods(config)
        admission = Admission(config.admission) if config.admission.enabled else None
        keys = KeyCheck(config.api_key)
        responses = ResponseRouter(
            self.router,
            self.response_affinity,
            None if self.peers is None else self.peers.response_created,
        )
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
            InfoApi(
                self.fleet.registry,
                self.fleet.loads,
                lambda: self.draining,
                config.pd_disaggregation,
                self._discovery_problem,
                self.aliases,
            ),
            WorkersApi(
                self.fleet,
                _check_policy,
                config.pd_disaggregation,
                self.peers,
                self.merge_siblings,
            ),
            Dashboard(config.api_key, keys.carried_by, self._dashboard_data),
            ResponsesApi(
                InferenceApi(responses, self.metrics, admission, keys.expected),
                responses,
                keys.expected,
            ),
        )

    def _control_socket(self, config: GatewayConfig) -> ControlSocket | None:
        if config.control_socket is None:
            return None
        rows = self.fleet_rows
        questions = {
            METRICS: (self.metrics.exposition, True),
            WORKERS: (lambda: orjson.dumps(rows()), False),
        }
        return ControlSocket(config.control_socket, questions)

    def fleet_rows(self) -> list[dict[str, Any]]:
        """This process's view of every registered worker, each as ``GET /workers`` lists
        it (what its siblings merge, and the dashboard's rows)."""
        return [w.to_info() for w in self.fleet.registry.all()]

    def _peers(self, config: GatewayConfig) -> Exchange | None:
        """The exchange with the other gateways, when ``--peer-port`` is given (or, for a
        ``--workers`` child, an endpoint of its supervisor's choosing)."""
        bind = config.peer_endpoint
        if bind is None:
            if config.peer_port is None:
                return None
            bind = f"{config.host}:{config.peer_port}"
        peers = list(config.peer_urls)
        from shunter.peers.security import PeerKeys, load_secret  # ZeroMQ: only when peering
        from shunter.peers.transport import PeerSockets

        secret = load_secret(config.peer_secret_file)  # checked by the config already
        keys = None if secret is None else PeerKeys.from_secret(secret)
        if keys is None and not bind.startswith("ipc://"):
            log.warning(
                "the peer channel is neither encrypted nor authenticated (it carries prompt "
                "prefixes and workers' API keys): give the gateways a shared "
                "--peer-secret-file, or keep --peer-port on a private network",
                extra={"peer_port": config.peer_port},
            )
        return Exchange(
            self.fleet,
            lambda model: self.policies.policy_for(model),
            lambda: PeerSockets(bind, peers, keys),
            reservation_ttl_secs=config.peer_reservation_ttl_secs,
            stored_response=self.response_affinity.remember,
        )

    def _gateway_pods(self, config: GatewayConfig) -> GatewayPods | None:
        """The other gateways' pods as peers, with ``--router-selector`` (and ``--peer-port``)."""
        if self.peers is None or not config.discovery.router_selector:
            return None
        from shunter.discovery.gateways import GatewayPods

        assert config.peer_port is not None
        # A --workers child binds --peer-port + its index: every pod's ports start at the
        # operator's --peer-port.
        first = config.peer_port - (config.worker_index or 0)
        return GatewayPods(
            config.discovery, first, self.peers.peers_found, processes=config.workers
        )

    def _discovery(self, config: GatewayConfig) -> Discovery | None:
        """Kubernetes service discovery, when asked for (its client is imported only then)."""
        if not config.discovery.enabled:
            return None
        from shunter.discovery.service import Discovery

        metrics = self.metrics
        observer = DiscoveryObserver(
            registered=metrics.discovery_registered,
            deregistered=metrics.discovery_deregistered,
            discovered=metrics.discovery_count,
            synced=metrics.discovery_synced,
        )
        return Discovery(
            self.fleet,
            config.discovery,
            config.pd_disaggregation,
            config.worker_api_key,
            # smg's bound: a registration probes 20 health thresholds' worth, then the next
            # reconcile pass starts another (an engine loading its model is never given up).
            max(1, config.health.success_threshold * 20),
            observer,
        )

    def _discovery_problem(self) -> str | None:
        return None if self.discovery is None else self.discovery.problem

    def _policies(self, name: str, worker_type: WorkerType) -> PolicyRegistry:
        """The policy registry of one kind of worker, told of the fleet's changes."""
        settings = dataclasses.replace(self.config.policy_settings, prefix_scorer=self.kv_events)
        if self.peers is not None and worker_type is WorkerType.REGULAR:
            settings = dataclasses.replace(settings, decisions=self.peers.decided)
        registry = PolicyRegistry(create_policy(name, settings), settings, worker_type)
        self.fleet.subscribe(registry.fleet_changed)
        self.policy_registries.append(registry)
        return registry

    def _kv_events_changed(self, added: Sequence[Worker], removed: Sequence[Worker]) -> None:
        """Follow the KV events of the workers that publish them (the endpoints are labels,
        from ``POST /workers`` or ``--kv-events-endpoint``); a DP rank's publisher is on
        the base port + rank, as the engines do."""
        for worker in removed:
            self.kv_events.remove(worker.url)
        for worker in added:
            endpoint = worker.labels.get("kv_events_endpoint")
            if endpoint:
                replay = worker.labels.get("kv_events_replay_endpoint")
                rank = worker.dp_rank or 0
                self.kv_events.add(
                    worker.url,
                    worker.model_id,
                    _rank_endpoint(endpoint, rank),
                    None if replay is None else _rank_endpoint(replay, rank),
                )

    def _router(self, config: GatewayConfig) -> Router:
        """The regular router, or in PD mode the PD router with a policy per leg."""
        registry = self.fleet.registry
        if not config.pd_disaggregation:
            router = Router(
                registry,
                self.policies,
                self.metrics,
                config.retry,
                self.tracing,
                route_receipt=config.route_receipt,
            )
            if config.routing_key_override:
                router.sticky = self._sticky(config)
            router.aliases = self.aliases
            return router
        pairs = PairSelector(
            registry,
            self._policies(config.prefill_policy or config.policy, WorkerType.PREFILL),
            self._policies(config.decode_policy or config.policy, WorkerType.DECODE),
            config.pd_min_prefill_tokens,
        )
        if config.routing_key_override:  # a memory per leg: a key keeps a worker on each
            pairs.sticky = {kind: self._sticky(config) for kind in PD_LEGS}
        router = PdRouter(
            registry,
            self.policies,
            pairs,
            self.metrics,
            config.retry,
            self.tracing,
            route_receipt=config.route_receipt,
        )
        router.aliases = self.aliases
        return router

    def _sticky(self, config: GatewayConfig) -> StickySessions:
        """A memory of routing keys for ``--routing-key-override``, started and stopped with
        the gateway."""
        settings = config.policy_settings
        sticky = StickySessions(
            self.fleet.registry,
            config.routing_key_headers,
            settings.manual_max_idle_secs,
            settings.max_routing_keys,
        )
        self.sticky_sessions.append(sticky)
        return sticky

    async def _dashboard_data(self) -> dict[str, object]:
        """What the dashboard shows: every worker, the models, the default policy."""
        registry = self.fleet.registry
        workers = self.fleet_rows()
        if self.merge_siblings is not None:
            workers = await self.merge_siblings(workers)
        return {
            "workers": workers,
            "models": list(registry.models()),
            "policy": self._policy_names(),
            "kv_events": self.kv_events.counters(),
            "peers": None if self.peers is None else self.peers.stats(),
        }

    def _policy_names(self) -> str:
        """The default policy, or in PD mode each leg's ("prefill round_robin, ...")."""
        if not self.config.pd_disaggregation:
            return self.policies.default.name
        return ", ".join(
            f"{p.worker_type.value if p.worker_type else 'any'} {p.default.name}"
            for p in self.policy_registries
        )

    def start(self) -> None:
        """Start background work and queue the ``--worker-urls`` workers (needs the loop)."""
        config = self.config
        if self.control_socket is not None:  # a --workers child: the supervisor serves /metrics
            self.control_socket.start()
        elif config.prometheus_port:
            self.metrics.serve(config.prometheus_host, config.prometheus_port)
        for policies in self.policy_registries:
            policies.start()
        for sticky in self.sticky_sessions:
            sticky.start()
        self.fleet.start()
        if self.peers is not None:
            self.peers.start()
        # Their key is --worker-api-key (both legs' in PD): smg gave them the gateway's own
        # key, so whoever ran a worker could administer the gateway.
        key, probe_both = config.worker_api_key, config.probe_both
        specs = [
            WorkerSpec(
                url,
                api_key=key,
                probe_grpc=url in probe_both,
                labels=_kv_events_labels(config.kv_events_endpoints.get(url)),
            )
            for url in config.worker_urls
        ]
        specs += [
            WorkerSpec(
                url,
                api_key=key,
                worker_type=WorkerType.PREFILL,
                bootstrap_port=port,
                probe_grpc=url in probe_both,
            )
            for url, port in config.prefill_urls
        ]
        specs += [
            WorkerSpec(
                url, api_key=key, worker_type=WorkerType.DECODE, probe_grpc=url in probe_both
            )
            for url in config.decode_urls
        ]
        for spec in specs:
            self.fleet.submit_add(spec)
        if self.discovery is not None:
            self.discovery.start()
        if self.gateway_pods is not None:
            self.gateway_pods.start()

    async def close(self) -> None:
        if self.gateway_pods is not None:
            await self.gateway_pods.stop()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.peers is not None:
            await self.peers.close()
        await self.fleet.close()
        await self.kv_events.close()
        for policies in self.policy_registries:
            await policies.stop()
        for sticky in self.sticky_sessions:
            await sticky.stop()
        await self.control.close()
        if self.tracing is not None:
            self.tracing.shutdown()  # flushes the spans not yet exported
        self.metrics.shutdown()
        if self.control_socket is not None:
            await self.control_socket.close()


def _kv_events_labels(endpoints: tuple[str, str | None] | None) -> dict[str, str]:
    """A ``--kv-events-endpoint`` as the labels ``POST /workers`` would set."""
    if endpoints is None:
        return {}
    endpoint, replay = endpoints
    labels = {"kv_events_endpoint": endpoint}
    if replay:
        labels["kv_events_replay_endpoint"] = replay
    return labels


def _rank_endpoint(endpoint: str, rank: int) -> str:
    """A DP rank's endpoint: ``tcp://host:port`` becomes port + rank (rank 0 unchanged)."""
    if not rank or not endpoint.startswith("tcp://"):
        return endpoint
    host, _, port = endpoint.rpartition(":")
    return f"{host}:{int(port) + rank}" if port.isdigit() else endpoint


def _check_policy(name: str) -> None:
    try:
        create_policy(name)
    except PolicyError as exc:
        raise ValueError(str(exc)) from None


def _grpc_support(config: GatewayConfig) -> Callable[[], GrpcSupport] | None:
    """What makes what gRPC workers share, when the grpc extra is installed (the connector
    calls it for the first gRPC worker)."""
    if not grpc_available():
        return None

    def make() -> GrpcSupport:
        from shunter.backends.grpc.pipeline import GrpcPipeline
        from shunter.backends.grpc.tokenizers import Tokenizers

        tokenizers = Tokenizers(
            config.tokenizer_path, config.chat_template, TOKENIZER_FETCH_TIMEOUT_SECS
        )
        pipeline = GrpcPipeline(
            tokenizers,
            config.request_timeout_secs,
            config.reasoning_parser,
            config.tool_call_parser,
        )
        return GrpcSupport(pipeline, retire_grace_secs=config.request_timeout_secs)

    return make


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
