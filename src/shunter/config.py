"""Typed gateway settings, validated with messages that say what is wrong."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from shunter.backends.connect import grpc_available
from shunter.backends.http.forwarding import ForwardRule
from shunter.discovery.config import DiscoveryConfig, DiscoveryConfigError, discovery_available
from shunter.fleet.breaker import BreakerConfig
from shunter.fleet.runtime import HealthConfig
from shunter.fleet.spec import API_KEY_RULE, check_kv_events_endpoint, valid_api_key
from shunter.fleet.urls import WorkerUrlError, validate_worker_url
from shunter.observability.metrics import DEFAULT_DURATION_BUCKETS
from shunter.policies.factory import PolicySettings
from shunter.routing.aliases import AliasError, parse_aliases
from shunter.routing.limiter import AdmissionConfig
from shunter.routing.retry import RetryConfig
from shunter.wire.limits import ServerLimits

DEFAULT_REQUEST_ID_HEADERS = ("x-request-id", "x-correlation-id", "x-trace-id", "request-id")
LOG_LEVELS = ("debug", "info", "warn", "warning", "error", "critical")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+").fullmatch  # an HTTP token


class ConfigError(ValueError):
    """A setting is invalid; the message names it and says why."""


@dataclass
class GatewayConfig:
    host: str = "0.0.0.0"
    port: int = 30000
    worker_urls: list[str] = field(default_factory=list)
    policy: str = "cache_aware"
    policy_settings: PolicySettings = field(default_factory=PolicySettings)
    # An inference request needs a few MiB: a 1M-token prompt is ~4 MiB of text, and OpenAI
    # takes up to 50 MB of images per request. smg's 512 MiB let a handful of clients make
    # the gateway buffer gigabytes.
    max_payload_size: int = 64 * 1024 * 1024
    max_response_bytes: int = 268_435_456  # a worker's whole reply (reqwest.MAX_RESPONSE_BYTES)
    request_timeout_secs: float = 1800
    api_key: str | None = None  # what clients must send; never sent to workers
    worker_api_key: str | None = None  # what the --worker-urls workers are sent
    log_level: str = "info"
    log_dir: str | None = None
    log_json: bool = False
    prometheus_host: str = "0.0.0.0"
    prometheus_port: int = 29000
    # The probes (/health, /liveness, /readiness) also on a listener of their own, on --host
    # (api/probes.py); None: only on --port.
    health_check_port: int | None = None
    cors_allowed_origins: list[str] = field(default_factory=list)
    request_id_headers: list[str] = field(default_factory=lambda: list(DEFAULT_REQUEST_ID_HEADERS))
    # Client headers HTTP workers receive beyond the default allow-list
    # (backends/http/forwarding.py), lowercased by validate().
    forward_headers: list[str] = field(default_factory=list)
    worker_startup_timeout_secs: float = 1800
    worker_startup_check_interval: float = 30
    dp_aware: bool = False
    remove_unhealthy_workers: bool = False  # fleet/fleet.py Fleet._health_flipped
    # llama.cpp workers: how long a request may wait for its prompt's busy slot rather
    # than evict another prompt (backends/http/slot_turns.py); 0: never waits.
    slot_wait_secs: float = 0.0
    connect_timeout_secs: float = 10.0
    probe_timeout_secs: float = 5.0  # one registration probe (health, discovery)
    # On SIGTERM: /readiness turns 503 at once, new requests are still served for a settle
    # window (min(grace / 2, 5 s): the time a Service takes to stop sending), then requests
    # in flight may finish for what is left of the grace period.
    shutdown_grace_secs: float = 180.0
    retry: RetryConfig = field(default_factory=RetryConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    server_limits: ServerLimits = field(default_factory=ServerLimits)
    tls_cert_path: str | None = None
    tls_key_path: str | None = None
    client_cert_path: str | None = None
    client_key_path: str | None = None
    ca_cert_paths: list[str] = field(default_factory=list)
    duration_buckets: tuple[float, ...] = DEFAULT_DURATION_BUCKETS
    enable_trace: bool = False
    # x-shunter-route on each relayed answer (routing/receipt.py): opt-in, it names a worker.
    route_receipt: bool = False
    # Sticky sessions on any policy (routing/sticky.py): a routing key keeps its worker; the
    # key from X-SMG-Routing-Key, else the first of these headers present.
    routing_key_override: bool = False
    routing_key_headers: list[str] = field(default_factory=list)
    # --model-alias: alias -> the served model a request for it is routed as.
    model_aliases: dict[str, str] = field(default_factory=dict)
    otlp_traces_endpoint: str = "localhost:4317"
    # gRPC data plane: where tokenizers come from, and the output parsers.
    tokenizer_path: str | None = None
    chat_template: str | None = None
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    probe_both: set[str] = field(default_factory=set)  # filled by validate()
    # Prefill/decode disaggregation (routing/pd/): the workers of each leg (a prefill
    # worker's bootstrap port, None: its engine's default), each leg's policy (None:
    # --policy), and the prompt size under which the decode worker runs a request alone.
    pd_disaggregation: bool = False
    prefill_urls: list[tuple[str, int | None]] = field(default_factory=list)
    decode_urls: list[str] = field(default_factory=list)
    prefill_policy: str | None = None
    decode_policy: str | None = None
    pd_min_prefill_tokens: int = 0
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    # KV-cache events of --worker-urls workers: URL -> (PUB endpoint, replay endpoint).
    kv_events_endpoints: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    # How precise cache_aware turns a request's text into the engines' token ids: "words"
    # (shunter sim's) or a tokenizer directory / tokenizer.json.
    kv_events_tokenizer: str = "words"
    # Replicas (peers/): the port this gateway's peers subscribe to (None: no peers), and
    # the other gateways' peer ports, HOST:PORT.
    peer_port: int | None = None
    peer_urls: list[str] = field(default_factory=list)
    # A ZeroMQ endpoint bound instead of --host:--peer-port: the supervisor of --workers N
    # gives its children IPC endpoints ("ipc://PATH") when the operator named no --peer-port.
    peer_endpoint: str | None = None
    # How long a peer's routing decision counts in its worker's in-flight here (0: not at all).
    peer_reservation_ttl_secs: float = 1.0
    # A file holding the secret the peers share (else $SHUNTER_PEER_SECRET): the channel is
    # then encrypted, and open only to gateways holding it (peers/security.py).
    peer_secret_file: str | None = None
    # The Responses API (routing/affinity.py): how many response ids the gateway remembers
    # the creating worker of, and for how long.
    response_affinity_max_entries: int = 100_000
    response_affinity_ttl_secs: float = 3600.0
    # --workers N: N gateway processes share the port under a supervisor (supervise.py).
    # In each child the supervisor sets the four below (hidden flags): the child's slot,
    # the supervisor's pid (the child exits when it dies), the Unix socket the child
    # answers its supervisor (metrics) and its siblings (workers) on, and its siblings'.
    workers: int = 1
    worker_index: int | None = None
    supervisor_pid: int | None = None
    control_socket: str | None = None
    sibling_sockets: list[str] = field(default_factory=list)

    @property
    def supervised(self) -> bool:
        """Whether this process is one of a supervisor's ``--workers`` children."""
        return self.worker_index is not None

    def validate(self) -> GatewayConfig:
        _check_port("--port", self.port)
        _check_port("--prometheus-port", self.prometheus_port, allow_zero=True)
        self._validate_health_check_port()
        self._validate_workers()
        if self.max_payload_size <= 0:
            raise ConfigError(f"--max-payload-size must be > 0 bytes, got {self.max_payload_size}")
        if self.max_response_bytes <= 0:
            raise ConfigError(f"--max-response-bytes must be > 0, got {self.max_response_bytes}")
        for flag, value in (
            ("--request-timeout-secs", self.request_timeout_secs),
            ("--worker-startup-timeout-secs", self.worker_startup_timeout_secs),
            ("--worker-startup-check-interval", self.worker_startup_check_interval),
        ):
            if value <= 0:
                raise ConfigError(f"{flag} must be > 0, got {value}")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        # A URL without a scheme is probed as HTTP and as gRPC when the worker is added.
        try:
            self.probe_both |= {validate_worker_url(u) for u in self.worker_urls if "://" not in u}
            # Each worker once, however often or however spelled it was given.
            urls = dict.fromkeys(validate_worker_url(url) for url in self.worker_urls)
            self.worker_urls = list(urls)
        except WorkerUrlError as exc:
            raise ConfigError(str(exc)) from None
        try:
            for part in (
                self.policy_settings,
                self.retry,
                self.breaker,
                self.health,
                self.admission,
                self.server_limits,
            ):
                part.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.shutdown_grace_secs < 0:
            raise ConfigError("--shutdown-grace-period-secs must be >= 0")
        self._validate_tls()
        self._validate_pd()
        self._validate_discovery()
        self._validate_grpc()
        self._validate_kv_events()
        self._validate_peers()
        if self.response_affinity_max_entries < 0 or self.response_affinity_ttl_secs <= 0:
            raise ConfigError(
                "--response-affinity-max-entries must be >= 0 and --response-affinity-ttl-secs > 0"
            )
        buckets = self.duration_buckets
        if not buckets or any(b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
            raise ConfigError(
                "--prometheus-duration-buckets needs positive, increasing, distinct seconds"
            )
        for flag, key in (("--api-key", self.api_key), ("--worker-api-key", self.worker_api_key)):
            if key is not None and not key:
                raise ConfigError(f"{flag} must not be empty")
            if key is not None and not valid_api_key(key):
                raise ConfigError(f"{flag} must be {API_KEY_RULE}")
        self._validate_sticky()
        try:
            self.model_aliases = parse_aliases(f"{a}={c}" for a, c in self.model_aliases.items())
        except AliasError as exc:
            raise ConfigError(str(exc)) from None
        if not self.request_id_headers:
            raise ConfigError("--request-id-headers needs at least one header name")
        self.request_id_headers = [h.lower() for h in self.request_id_headers]
        try:
            ForwardRule(self.forward_headers)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.forward_headers = [h.strip().lower() for h in self.forward_headers]
        return self

    def _validate_health_check_port(self) -> None:
        port = self.health_check_port
        if port is None:
            return
        _check_port("--health-check-port", port)
        for flag, taken in (
            ("--port", self.port),
            ("--prometheus-port", self.prometheus_port),
            ("--peer-port", self.peer_port),
        ):
            if port == taken:
                raise ConfigError(
                    f"--health-check-port {port} is also {flag}: the probes need a port of "
                    "their own (or leave --health-check-port out to serve them on --port only)"
                )

    def _validate_workers(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.workers == 1:
            return
        # The one policy whose routing is a memory of its own: each process would stick a
        # key to a worker of its choosing, so one key would go to up to N workers.
        for flag, policy in (
            ("--policy", self.policy),
            ("--prefill-policy", self.prefill_policy),
            ("--decode-policy", self.decode_policy),
        ):
            if policy == "manual":
                raise ConfigError(
                    f"{flag} manual remembers each routing key's worker in one process: with "
                    f"--workers {self.workers} a key would stick to up to {self.workers} "
                    "different workers. Use consistent_hashing (the same key goes to the same "
                    "worker in every process), or --workers 1"
                )

    def _validate_sticky(self) -> None:
        headers = self.routing_key_headers
        if headers and not self.routing_key_override:
            raise ConfigError(
                "--routing-key-headers names where sticky sessions find their key: it needs "
                "--routing-key-override (alias --sticky-sessions)"
            )
        for name in headers:
            if not _HEADER_NAME(name):
                raise ConfigError(f"--routing-key-headers: {name!r} is not a header name")
        self.routing_key_headers = [h.lower() for h in headers]
        if self.routing_key_override and self.workers > 1:
            raise ConfigError(
                "--routing-key-override remembers each routing key's worker in one process: "
                f"with --workers {self.workers} a key would stick to up to {self.workers} "
                "different workers. Use --policy consistent_hashing (the same key goes to the "
                "same worker in every process), or --workers 1"
            )

    def _validate_pd(self) -> None:
        given = [
            flag
            for flag, value in (
                ("--prefill", self.prefill_urls),
                ("--decode", self.decode_urls),
                ("--prefill-policy", self.prefill_policy),
                ("--decode-policy", self.decode_policy),
                ("--pd-min-prefill-tokens", self.pd_min_prefill_tokens),
            )
            if value
        ]
        if not self.pd_disaggregation:
            if given:
                raise ConfigError(
                    f"{', '.join(given)}: prefill/decode settings need --pd-disaggregation"
                )
            return
        if self.worker_urls:
            raise ConfigError(
                "--worker-urls registers ordinary workers; with --pd-disaggregation give the "
                "workers with --prefill URL [BOOTSTRAP_PORT] and --decode URL"
            )
        if self.decode_policy == "bucket":
            raise ConfigError(
                "--decode-policy bucket: bucket balances prompt lengths, which only the "
                "prefill leg's work depends on; choose another policy for the decode leg"
            )
        if self.pd_min_prefill_tokens < 0:
            raise ConfigError("--pd-min-prefill-tokens must be >= 0")
        for url, port in self.prefill_urls:
            if port is not None:
                _check_port(f"--prefill {url}: the bootstrap port", port)
        try:
            given_urls = [*(u for u, _ in self.prefill_urls), *self.decode_urls]
            self.probe_both |= {validate_worker_url(u) for u in given_urls if "://" not in u}
            self.prefill_urls = [(validate_worker_url(u), p) for u, p in self.prefill_urls]
            self.decode_urls = [validate_worker_url(url) for url in self.decode_urls]
        except WorkerUrlError as exc:
            raise ConfigError(str(exc)) from None

    def _validate_discovery(self) -> None:
        try:
            self.discovery.validate(self.pd_disaggregation)
        except DiscoveryConfigError as exc:
            raise ConfigError(str(exc)) from None
        if self.discovery.enabled and not discovery_available():
            raise ConfigError(
                "--service-discovery needs the kubernetes extra: pip install 'shunter[kubernetes]'"
            )

    def _validate_grpc(self) -> None:
        urls = [*self.worker_urls, *(u for u, _ in self.prefill_urls), *self.decode_urls]
        if any(url.startswith("grpc://") for url in urls) and not grpc_available():
            raise ConfigError("grpc:// workers need the grpc extra: pip install 'shunter[grpc]'")
        from shunter.parsers.reasoning import REASONING_PARSERS
        from shunter.parsers.tool_calls import TOOL_CALL_PARSERS

        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ConfigError(f"--reasoning-parser must be one of {', '.join(REASONING_PARSERS)}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ConfigError(f"--tool-call-parser must be one of {', '.join(TOOL_CALL_PARSERS)}")
        if self.tokenizer_path is not None and not os.path.isfile(
            os.path.join(self.tokenizer_path, "tokenizer.json")
        ):
            raise ConfigError(
                f"--tokenizer-path/--model-path {self.tokenizer_path}: no tokenizer.json there "
                "(a local directory is needed; the gateway does not download from a hub)"
            )

    def _validate_peers(self) -> None:
        if self.peer_port is None and self.peer_endpoint is None:
            if self.peer_urls:
                raise ConfigError("--peer-urls needs --peer-port (where the peers reach us)")
            if self.discovery.router_selector:
                raise ConfigError(
                    "--router-selector needs --peer-port (the port every gateway listens to "
                    "its peers on)"
                )
            if self.peer_secret_file is not None:
                raise ConfigError("--peer-secret-file needs --peer-port")
            return
        from shunter.peers.security import PeerSecretError, load_secret  # ZeroMQ's

        try:
            load_secret(self.peer_secret_file)
        except PeerSecretError as exc:
            raise ConfigError(str(exc)) from None
        if self.discovery.router_selector and not discovery_available():
            raise ConfigError(
                "--router-selector needs the kubernetes extra: pip install 'shunter[kubernetes]'"
            )
        if self.peer_port is not None:
            _check_port("--peer-port", self.peer_port)
        elif self.discovery.router_selector:
            raise ConfigError("--router-selector needs --peer-port")
        if not 0 <= self.peer_reservation_ttl_secs <= 60:
            raise ConfigError("--peer-reservation-ttl-secs must be between 0 and 60")
        for peer in self.peer_urls:
            if peer.startswith("ipc://") and len(peer) > len("ipc://"):
                continue  # a sibling process's endpoint (--workers N)
            host, _, port = peer.rpartition(":")
            if not host or "/" in peer or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"--peer-urls {peer}: give HOST:PORT (a peer's --peer-port)")

    def _validate_kv_events(self) -> None:
        try:
            given = {validate_worker_url(u): e for u, e in self.kv_events_endpoints.items()}
        except WorkerUrlError as exc:
            raise ConfigError(f"--kv-events-endpoint: {exc}") from None
        unknown = set(given) - set(self.worker_urls)
        if unknown:
            raise ConfigError(
                f"--kv-events-endpoint names {', '.join(sorted(unknown))}, not in --worker-urls"
            )
        for url, (endpoint, replay) in given.items():
            for value in (endpoint, replay):
                if value is not None:
                    try:
                        check_kv_events_endpoint("--kv-events-endpoint", value)
                    except ValueError as exc:
                        raise ConfigError(f"{url}: {exc}") from None
        self.kv_events_endpoints = given
        source = self.kv_events_tokenizer
        if source != "words" and not os.path.exists(source):
            raise ConfigError(
                f"--kv-events-tokenizer {source}: no such file or directory (or 'words')"
            )

    def _validate_tls(self) -> None:
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            raise ConfigError("--tls-cert-path and --tls-key-path go together")
        if (self.client_cert_path is None) != (self.client_key_path is None):
            raise ConfigError("--client-cert-path and --client-key-path go together")
        for flag, path in (
            ("--tls-cert-path", self.tls_cert_path),
            ("--tls-key-path", self.tls_key_path),
            ("--client-cert-path", self.client_cert_path),
            ("--client-key-path", self.client_key_path),
            *(("--ca-cert-paths", p) for p in self.ca_cert_paths),
        ):
            if path is not None:
                _readable(flag, path)


def _readable(flag: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read it ({exc.strerror})") from None


def _check_port(flag: str, port: int, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ConfigError(f"{flag} must be between {low} and 65535, got {port}")
