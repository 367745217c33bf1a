"""``shunter serve`` (alias ``launch``): the gateway, with sglang-router's flags and defaults.

Every default comes from the config object the flag sets (``cli/options.py``). Flags of
sglang-router / smg features Shunter does not have yet are recognised and refused at start,
naming the feature, so that nothing a user asked for is silently ignored.
"""

from __future__ import annotations

import argparse

from shunter.cli.options import (
    ConfigFlags,
    non_negative_float,
    non_negative_int,
    positive_float,
)
from shunter.config import ConfigError, GatewayConfig
from shunter.discovery.config import DiscoveryConfig, DiscoveryConfigError, parse_selector
from shunter.fleet.breaker import BreakerConfig
from shunter.fleet.runtime import HealthConfig
from shunter.observability.metrics import DEFAULT_DURATION_BUCKETS
from shunter.policies.cache_aware import CacheAwareConfig
from shunter.policies.factory import (
    BUILT,
    PolicyError,
    PolicySettings,
    canonical_name,
    create_policy,
)
from shunter.policies.prefix_hash import PrefixHashConfig
from shunter.routing.aliases import AliasError, parse_aliases
from shunter.routing.limiter import AdmissionConfig
from shunter.routing.retry import RetryConfig
from shunter.wire.limits import RESERVED_FILES, ServerLimits

_SWITCH = "switch"
_VALUE = "value"
NOT_YET_SUPPORTED: dict[str, tuple[str, str]] = {
    "--enable-igw": (_SWITCH, "inference gateway (multi-router) mode"),
    "--tokenizer-cache-enable-l0": (_SWITCH, "the gRPC data plane (tokenizer cache)"),
    "--tokenizer-cache-l0-max-entries": (_VALUE, "the gRPC data plane (tokenizer cache)"),
    "--tokenizer-cache-enable-l1": (_SWITCH, "the gRPC data plane (tokenizer cache)"),
    "--tokenizer-cache-l1-max-memory": (_VALUE, "the gRPC data plane (tokenizer cache)"),
    "--mcp-config-path": (_VALUE, "MCP tool servers"),
    "--history-backend": (_VALUE, "the Responses API history storage"),
    "--oracle-wallet-path": (_VALUE, "Oracle history storage"),
    "--oracle-tns-alias": (_VALUE, "Oracle history storage"),
    "--oracle-dsn": (_VALUE, "Oracle history storage"),
    "--oracle-connect-descriptor": (_VALUE, "Oracle history storage"),
    "--oracle-user": (_VALUE, "Oracle history storage"),
    "--oracle-username": (_VALUE, "Oracle history storage"),
    "--oracle-password": (_VALUE, "Oracle history storage"),
    "--oracle-pool-min": (_VALUE, "Oracle history storage"),
    "--oracle-pool-max": (_VALUE, "Oracle history storage"),
    "--oracle-pool-timeout-secs": (_VALUE, "Oracle history storage"),
    "--postgres-db-url": (_VALUE, "Postgres history storage"),
    "--postgres-pool-max-size": (_VALUE, "Postgres history storage"),
    "--postgres-pool-max": (_VALUE, "Postgres history storage"),
    "--enable-wasm": (_SWITCH, "WASM middleware"),
    "--mini-lb": (_SWITCH, "the Python mini load balancer"),
}
_BACKENDS_BUILT = ("sglang",)


class ServeFlags:
    """The parser for ``shunter serve``, and the ``GatewayConfig`` its arguments make."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.gateway = ConfigFlags(parser, GatewayConfig(), "gateway")
        self._gateway_flags(self.gateway)
        self.cache_aware = ConfigFlags(parser, CacheAwareConfig(), "cache_aware")
        self.prefix_hash = ConfigFlags(parser, PrefixHashConfig(), "prefix_hash")
        self.policies = ConfigFlags(parser, PolicySettings(), "policies")
        self._policy_flags()
        self.retry = ConfigFlags(parser, RetryConfig(), "retry")
        self.breaker = ConfigFlags(parser, BreakerConfig(), "breaker")
        self.health = ConfigFlags(parser, HealthConfig(), "health")
        self.admission = ConfigFlags(parser, AdmissionConfig(), "admission")
        self._reliability_flags()
        limits = parser.add_argument_group(
            "client limits (what one client may make the server hold)"
        )
        self.limits = ConfigFlags(limits, ServerLimits(), "limits")
        self._limit_flags()
        self._grpc_flags(parser.add_argument_group("gRPC workers (the gateway tokenizes for them)"))
        self._pd_flags(parser.add_argument_group("prefill/decode disaggregation"))
        self._kv_events_flags(
            parser.add_argument_group("KV-cache events (precise cache_aware routing)")
        )
        self._peer_flags(
            ConfigFlags(
                parser.add_argument_group("replicas (gateways sharing routing state)"),
                GatewayConfig(),
                "gateway",
            )
        )
        self._responses_flags(
            ConfigFlags(
                parser.add_argument_group("the Responses API (which worker stored a response)"),
                GatewayConfig(),
                "gateway",
            )
        )
        self.discovery = ConfigFlags(
            parser.add_argument_group("Kubernetes service discovery"),
            DiscoveryConfig(),
            "discovery",
        )
        self._discovery_flags()
        parser.add_argument(
            "--backend",
            "--runtime",
            dest="backend",
            default="sglang",
            help="worker backend; only 'sglang' (any SGLang or OpenAI-compatible HTTP worker)",
        )
        for flag, (kind, _feature) in NOT_YET_SUPPORTED.items():
            dest = "unsupported_" + flag.lstrip("-").replace("-", "_")
            if kind == _SWITCH:
                parser.add_argument(
                    flag,
                    dest=dest,
                    action="store_true",
                    default=argparse.SUPPRESS,
                    help=argparse.SUPPRESS,
                )
            else:
                parser.add_argument(
                    flag,
                    dest=dest,
                    nargs="*",
                    action="append",
                    default=argparse.SUPPRESS,
                    help=argparse.SUPPRESS,
                )

    # --- the flags ---------------------------------------------------------------------------

    @staticmethod
    def _gateway_flags(g: ConfigFlags[GatewayConfig]) -> None:
        g.flag("--host", "host", help="address to listen on (default %(default)s)")
        g.flag("--port", "port", help="port (default %(default)s)")
        g.flag(
            "--workers",
            "workers",
            help="gateway processes sharing --port (SO_REUSEPORT), kept by a supervisor that "
            "restarts one that crashes, forwards SIGTERM/SIGINT so that all drain, and serves "
            "their merged /metrics on --prometheus-port; 1: one process, no supervisor "
            "(default %(default)s)",
        )
        # Set by the supervisor on each of its --workers children, never by hand.
        for flag, field in (
            ("--worker-index", "worker_index"),
            ("--supervisor-pid", "supervisor_pid"),
        ):
            g.flag(flag, field, type=int, help=argparse.SUPPRESS)
        g.flag("--control-socket", "control_socket", type=str, help=argparse.SUPPRESS)
        g.flag("--sibling-sockets", "sibling_sockets", type=str, nargs="*", help=argparse.SUPPRESS)
        g.flag("--peer-endpoint", "peer_endpoint", type=str, help=argparse.SUPPRESS)
        g.flag(
            "--worker-urls",
            "worker_urls",
            type=str,
            nargs="*",
            metavar="URL",
            help="workers to register at start (http://, https:// or grpc://)",
        )
        g.flag(
            "--policy",
            "policy",
            help="routing policy: " + ", ".join(BUILT) + ", or module:Class (default %(default)s)",
        )
        g.flag(
            "--max-payload-size",
            "max_payload_size",
            type=non_negative_int,
            help="largest request body in bytes (default %(default)s)",
        )
        g.flag(
            "--max-response-bytes",
            "max_response_bytes",
            type=non_negative_int,
            help="largest whole (non-streamed) response body taken from a worker, in bytes; "
            "a bigger one fails the attempt, 502 (default %(default)s)",
        )
        g.flag(
            "--request-timeout-secs",
            "request_timeout_secs",
            type=positive_float,
            help="longest wait for a worker's first byte and between chunks",
        )
        g.flag(
            "--api-key",
            "api_key",
            type=str,
            help="require 'Authorization: Bearer <key>' from clients; never sent to workers",
        )
        g.flag(
            "--worker-api-key",
            "worker_api_key",
            type=str,
            help="the key sent as a Bearer token to the --worker-urls workers",
        )
        g.flag("--log-level", "log_level", help="debug, info, warn, error")
        g.flag("--log-dir", "log_dir", type=str, help="also log to a daily-rotated file here")
        g.flag("--log-json", "log_json", action="store_true", help="log JSON lines")
        g.flag("--prometheus-host", "prometheus_host")
        g.flag(
            "--prometheus-port",
            "prometheus_port",
            help="Prometheus /metrics port; 0 turns the listener off",
        )
        g.flag(
            "--health-check-port",
            "health_check_port",
            type=int,
            help="also serve /health, /liveness and /readiness on this port (on --host), "
            "a listener of their own: a saturated --port never fails a probe",
        )
        g.flag(
            "--enable-trace",
            "enable_trace",
            action="store_true",
            help="export OpenTelemetry spans over OTLP/gRPC",
        )
        g.flag(
            "--route-receipt",
            "route_receipt",
            action="store_true",
            help="tell clients which worker served them and why: an x-shunter-route header "
            "(worker, policy, reason, predicted cached tokens) on every relayed answer",
        )
        g.flag(
            "--routing-key-override",
            "routing_key_override",
            "--sticky-sessions",
            action="store_true",
            help="sticky sessions on any policy: a request with a routing key "
            "(X-SMG-Routing-Key, or --routing-key-headers) goes to the worker its key was "
            "first routed to while that worker is available; the key moves when the worker "
            "is removed",
        )
        g.flag(
            "--routing-key-headers",
            "routing_key_headers",
            type=str,
            nargs="*",
            metavar="HEADER",
            help="more headers a routing key is read from, after X-SMG-Routing-Key (the "
            "first present wins)",
        )
        g.group.add_argument(
            "--model-alias",
            dest="model_alias",
            action="append",
            default=[],
            metavar="ALIAS=MODEL",
            help="serve requests for ALIAS as the served model MODEL (the worker is sent "
            "MODEL; /v1/models lists ALIAS too); repeat for each",
        )
        g.flag(
            "--otlp-traces-endpoint",
            "otlp_traces_endpoint",
            help="where spans go (default %(default)s)",
        )
        g.flag(
            "--prometheus-duration-buckets",
            "duration_buckets",
            type=float,
            nargs="*",
            metavar="SECONDS",
            help="upper bounds of the *_duration_seconds buckets",
        )
        g.flag(
            "--cors-allowed-origins", "cors_allowed_origins", type=str, nargs="*", metavar="ORIGIN"
        )
        g.flag("--request-id-headers", "request_id_headers", type=str, nargs="*", metavar="HEADER")
        g.flag(
            "--forward-headers",
            "forward_headers",
            type=str,
            nargs="*",
            metavar="HEADER",
            help="client headers HTTP workers also receive, beyond authorization, "
            "x-request-id, x-correlation-id, x-request-id-*, traceparent, tracestate, "
            "x-smg-routing-key, content-type and accept (any other stays at the gateway; "
            "cookie and hop-by-hop headers are never forwarded)",
        )
        g.flag("--worker-startup-timeout-secs", "worker_startup_timeout_secs", type=positive_float)
        g.flag(
            "--worker-startup-check-interval",
            "worker_startup_check_interval",
            type=positive_float,
        )
        g.flag(
            "--dp-aware",
            "dp_aware",
            action="store_true",
            help="route to each data-parallel rank of a worker separately",
        )
        g.flag(
            "--slot-wait-secs",
            "slot_wait_secs",
            type=non_negative_float,
            metavar="SECONDS",
            help="llama.cpp workers hold one prompt per slot: a request whose prompt is "
            "running on its worker already waits up to this long for that slot rather than "
            "evict another prompt (for CPU workers, where a prefill costs more than a wait; "
            "default %(default)s: never waits)",
        )
        g.flag(
            "--remove-unhealthy-workers",
            "remove_unhealthy_workers",
            "--worker-auto-recovery",
            action="store_true",
            help="remove a worker that fails its health checks (--health-failure-threshold "
            "in a row) instead of only routing around it; discovery adds it back once its "
            "pod answers again, a --worker-urls or POSTed one must be POSTed again",
        )
        g.flag(
            "--tls-cert-path", "tls_cert_path", type=str, help="serve HTTPS with this certificate"
        )
        g.flag("--tls-key-path", "tls_key_path", type=str, help="and this private key")
        g.flag(
            "--client-cert-path", "client_cert_path", type=str, help="mTLS to workers: certificate"
        )
        g.flag(
            "--client-key-path", "client_key_path", type=str, help="mTLS to workers: private key"
        )
        g.flag(
            "--ca-cert-paths",
            "ca_cert_paths",
            type=str,
            nargs="*",
            metavar="PEM",
            help="CA certificates to trust for https:// workers",
        )
        g.flag(
            "--shutdown-grace-period-secs",
            "shutdown_grace_secs",
            "--graceful-shutdown-timeout-secs",
            help="on SIGTERM: /readiness turns 503 at once, new requests are served for "
            "min(this / 2, 5 s), then requests in flight may finish within the rest "
            "(default %(default)s)",
        )

    def _policy_flags(self) -> None:
        c, h, p = self.cache_aware, self.prefix_hash, self.policies
        c.flag(
            "--cache-threshold",
            "cache_threshold",
            help="cache_aware: share of the text that must match to follow the cache",
        )
        c.flag(
            "--balance-abs-threshold",
            "balance_abs_threshold",
            help="cache_aware/bucket: in-flight gap that counts as imbalance",
        )
        c.flag(
            "--balance-rel-threshold",
            "balance_rel_threshold",
            help="cache_aware/bucket: in-flight ratio that counts as imbalance",
        )
        c.flag(
            "--eviction-interval-secs",
            "eviction_interval_secs",
            "--eviction-interval",
            help="cache_aware: seconds between tree trims",
        )
        c.flag(
            "--no-cache-self-correction",
            "self_correct",
            action="store_false",
            help="cache_aware: keep tree entries that workers' answers show evicted",
        )
        c.flag(
            "--max-tree-size",
            "max_tree_size",
            help="cache_aware: characters kept per worker in a model's tree",
        )
        p.flag(
            "--bucket-adjust-interval-secs",
            "bucket_adjust_interval_secs",
            help="bucket: seconds between boundary adjustments",
        )
        h.flag(
            "--prefix-token-count",
            "prefix_token_count",
            help="prefix_hash: tokens of the prompt start that pick the worker",
        )
        h.flag(
            "--prefix-hash-load-factor",
            "load_factor",
            help="prefix_hash: load over the average that sends a request elsewhere",
        )
        p.flag(
            "--max-idle-secs",
            "manual_max_idle_secs",
            help="manual and --routing-key-override: seconds before an unused routing key is "
            "forgotten",
        )
        p.flag(
            "--max-routing-keys",
            "max_routing_keys",
            help="manual and --routing-key-override: routing keys remembered at most; the "
            "least recently used goes first (default %(default)s)",
        )

    def _reliability_flags(self) -> None:
        r, b, h, a = self.retry, self.breaker, self.health, self.admission
        r.flag(
            "--retry-max-retries", "max_retries", help="attempts per request, the first included"
        )
        r.flag("--retry-initial-backoff-ms", "initial_backoff_ms")
        r.flag("--retry-max-backoff-ms", "max_backoff_ms")
        r.flag("--retry-backoff-multiplier", "backoff_multiplier")
        r.flag("--retry-jitter-factor", "jitter_factor")
        r.flag("--disable-retries", "disabled", action="store_true")
        b.flag(
            "--cb-failure-threshold",
            "failure_threshold",
            help="consecutive failures (within the window) that open a circuit",
        )
        b.flag(
            "--cb-success-threshold",
            "success_threshold",
            help="consecutive half-open successes that close it",
        )
        b.flag(
            "--cb-timeout-duration-secs",
            "timeout_secs",
            help="the longest an open circuit waits before half-open (openings back off to it)",
        )
        b.flag(
            "--cb-base-open-secs",
            "base_open_secs",
            help="how long a first opening lasts; each consecutive one doubles it",
        )
        b.flag(
            "--cb-panic-threshold",
            "panic_threshold",
            help="ignore a model's breakers when fewer than this share of its healthy "
            "workers are left in by them (0: never)",
        )
        b.flag(
            "--cb-window-duration-secs",
            "window_secs",
            help="failures further apart than this do not add up",
        )
        b.flag("--disable-circuit-breaker", "disabled", action="store_true")
        h.flag("--health-check-interval-secs", "interval_secs")
        h.flag("--health-check-timeout-secs", "timeout_secs")
        h.flag("--health-check-endpoint", "endpoint")
        h.flag("--health-failure-threshold", "failure_threshold")
        h.flag("--health-success-threshold", "success_threshold")
        a.flag(
            "--max-concurrent-requests",
            "max_concurrent",
            help="requests in progress at once; -1: no limit",
        )
        a.flag("--queue-size", "queue_size", help="requests that may wait for a slot (429 beyond)")
        a.flag(
            "--queue-timeout-secs",
            "queue_timeout_secs",
            help="longest wait for a slot (408 beyond)",
        )
        a.flag(
            "--rate-limit-tokens-per-second",
            "tokens_per_second",
            type=float,
            help="admissions per second (default: no rate limit)",
        )

    def _limit_flags(self) -> None:
        s = self.limits
        s.flag(
            "--max-request-line-bytes",
            "max_request_line_bytes",
            help="longest request line; 414 beyond (default %(default)s)",
        )
        s.flag(
            "--max-header-bytes",
            "max_header_bytes",
            help="longest header, name and value; 431 beyond (default %(default)s)",
        )
        s.flag(
            "--max-headers",
            "max_headers",
            help="most headers in a request; 431 beyond (default %(default)s)",
        )
        s.flag(
            "--max-request-head-bytes",
            "max_request_head_bytes",
            help="largest request head, line ends included; 431 beyond (default %(default)s)",
        )
        s.flag(
            "--request-head-timeout-secs",
            "request_head_timeout_secs",
            help="longest time from a head's first byte to its end; 408 beyond (default "
            "%(default)s)",
        )
        s.flag(
            "--request-body-timeout-secs",
            "request_body_timeout_secs",
            help="longest wait for a body byte the app waits for; 408 beyond (default %(default)s)",
        )
        s.flag(
            "--max-connections",
            "max_connections",
            type=int,
            help="open client connections; 503 beyond (default: (open-file limit - "
            f"{RESERVED_FILES}) / 2, computed at start and logged)",
        )

    def _grpc_flags(self, group: argparse._ArgumentGroup) -> None:
        g = ConfigFlags(group, GatewayConfig(), "gateway")
        group.add_argument("--model-path", default=None, help="a local model directory (tokenizer)")
        g.flag(
            "--tokenizer-path",
            "tokenizer_path",
            type=str,
            help="a local tokenizer directory; default: --model-path, else the worker's "
            "GetTokenizer",
        )
        g.flag(
            "--chat-template", "chat_template", type=str, help="a Jinja file overriding the model's"
        )
        g.flag("--reasoning-parser", "reasoning_parser", type=str, help="deepseek_r1 or qwen3")
        g.flag("--tool-call-parser", "tool_call_parser", type=str, help="json, qwen or hermes")
        self.gateway.fields += g.fields

    def _peer_flags(self, g: ConfigFlags[GatewayConfig]) -> None:
        g.flag(
            "--peer-port",
            "peer_port",
            type=int,
            help="share routing state with other gateways: they subscribe to this port "
            "(hand-registered workers, cache-aware decisions, in-flight reservations)",
        )
        g.flag(
            "--peer-urls",
            "peer_urls",
            type=str,
            nargs="*",
            metavar="HOST:PORT",
            help="the other gateways' --peer-port (this gateway's own is ignored if listed)",
        )
        g.flag(
            "--peer-secret-file",
            "peer_secret_file",
            type=str,
            metavar="PATH",
            help="a file holding a secret every peer shares (at least 16 bytes; else "
            "$SHUNTER_PEER_SECRET): the peer channel is then encrypted (ZeroMQ CURVE) and "
            "open only to gateways holding it",
        )
        g.flag(
            "--peer-reservation-ttl-secs",
            "peer_reservation_ttl_secs",
            type=float,
            help="how long a peer's routing decision counts as a request in flight on its "
            "worker here, so bursts over several gateways do not herd; 0 turns it off "
            "(default %(default)s)",
        )
        self.gateway.fields += g.fields

    def _responses_flags(self, g: ConfigFlags[GatewayConfig]) -> None:
        g.flag(
            "--response-affinity-max-entries",
            "response_affinity_max_entries",
            type=non_negative_int,
            metavar="N",
            help="how many /v1/responses ids the gateway remembers the worker of (for GET, "
            "DELETE and previous_response_id), the oldest forgotten first; 0 remembers "
            "none (default %(default)s)",
        )
        g.flag(
            "--response-affinity-ttl-secs",
            "response_affinity_ttl_secs",
            type=positive_float,
            metavar="SECONDS",
            help="how long a response's worker is remembered (default %(default)s)",
        )
        self.gateway.fields += g.fields

    def _kv_events_flags(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--kv-events-endpoint",
            dest="kv_events_endpoint",
            action="append",
            default=[],
            metavar="URL=ENDPOINT[,REPLAY_ENDPOINT]",
            help="subscribe to a --worker-urls worker's KV-cache events (its engine's "
            "--kv-events-config endpoint, and replay_endpoint if set), e.g. "
            "http://w1:30000=tcp://w1:5557,tcp://w1:6557; repeat per worker. "
            "cache_aware then scores that worker by its exact cached blocks",
        )
        g = ConfigFlags(group, GatewayConfig(), "gateway")
        g.flag(
            "--kv-events-tokenizer",
            "kv_events_tokenizer",
            help="how a request's text becomes the engine's token ids for precise scoring: "
            "'words' (shunter sim's whitespace words) or a tokenizer directory or "
            "tokenizer.json (default %(default)s)",
        )
        self.gateway.fields += g.fields

    def _kv_events_endpoints(self, given: list[str]) -> dict[str, tuple[str, str | None]]:
        """``--kv-events-endpoint URL=ENDPOINT[,REPLAY]`` values, split (checked later)."""
        endpoints: dict[str, tuple[str, str | None]] = {}
        for value in given:
            url, sep, rest = value.rpartition("=")
            endpoint, _, replay = rest.partition(",")
            if not sep or not url or not endpoint:
                self.parser.error(
                    f"--kv-events-endpoint {value}: give WORKER_URL=ENDPOINT[,REPLAY_ENDPOINT]"
                )
            endpoints[url] = (endpoint, replay or None)
        return endpoints

    def _model_aliases(self, given: list[str]) -> dict[str, str]:
        """``--model-alias ALIAS=MODEL`` values; exits when one is malformed."""
        try:
            return parse_aliases(given)
        except AliasError as exc:
            self.parser.error(str(exc))
        raise AssertionError("unreachable")

    def _pd_flags(self, group: argparse._ArgumentGroup) -> None:
        g = ConfigFlags(group, GatewayConfig(), "gateway")
        g.flag(
            "--pd-disaggregation",
            "pd_disaggregation",
            action="store_true",
            help="serve requests with a prefill and a decode worker together",
        )
        group.add_argument(
            "--prefill",
            dest="pd_prefill",
            nargs="+",
            action="append",
            default=[],
            metavar=("URL", "BOOTSTRAP_PORT"),
            help="a prefill worker, and its bootstrap port (or 'none', or nothing: the "
            "engine's default); repeat for each",
        )
        g.flag(
            "--decode",
            "decode_urls",
            type=str,
            action="append",
            metavar="URL",
            help="a decode worker; repeat for each",
        )
        g.flag(
            "--prefill-policy",
            "prefill_policy",
            type=str,
            help="the prefill leg's (default --policy)",
        )
        g.flag(
            "--decode-policy",
            "decode_policy",
            type=str,
            help="the decode leg's (default --policy; not bucket)",
        )
        g.flag(
            "--pd-min-prefill-tokens",
            "pd_min_prefill_tokens",
            type=non_negative_int,
            help="send a prompt to the decode worker alone when fewer of its tokens than this "
            "are not in that worker's cache already (as the decode policy sees it: "
            "cache_aware); 0, the default: always disaggregate",
        )
        self.gateway.fields += g.fields

    def _discovery_flags(self) -> None:
        d = self.discovery
        d.flag(
            "--service-discovery",
            "enabled",
            action="store_true",
            help="register the workers of the pods a selector matches, as they come and go",
        )
        for flag, field, what in (
            ("--selector", "selector", "the worker pods' labels"),
            ("--prefill-selector", "prefill_selector", "PD: the prefill pods' labels"),
            ("--decode-selector", "decode_selector", "PD: the decode pods' labels"),
            (
                "--router-selector",
                "router_selector",
                "the gateway pods' labels: their podIP:--peer-port are this gateway's "
                "peers, as they come and go (needs --peer-port; not --service-discovery)",
            ),
        ):
            d.flag(flag, field, type=str, nargs="*", metavar="KEY=VALUE", help=what)
        d.flag(
            "--service-discovery-port",
            "port",
            help="the workers' port in each pod, unless its smg.ai/worker-ports annotation "
            "lists them (default %(default)s)",
        )
        d.flag(
            "--service-discovery-namespace",
            "namespace",
            type=str,
            help="watch pods in this namespace (default: every namespace, which needs a "
            "ClusterRole)",
        )
        d.flag(
            "--model-id-from",
            "model_id_from",
            type=str,
            metavar="namespace|label:KEY|annotation:KEY",
            help="the model id of a pod's workers (default: what the worker reports)",
        )
        d.flag(
            "--kubeconfig",
            "kubeconfig",
            type=str,
            help="a kubeconfig file (default: the in-cluster service account in a pod, "
            "else $KUBECONFIG or ~/.kube/config)",
        )
        d.flag(
            "--service-discovery-resync-secs",
            "resync_secs",
            type=positive_float,
            help="a full list of the pods and a reconcile pass at least this often "
            "(default %(default)s)",
        )

    def _prefill_urls(self, given: list[list[str]]) -> list[tuple[str, int | None]]:
        """``--prefill URL [BOOTSTRAP_PORT|none]`` values, checked."""
        prefills: list[tuple[str, int | None]] = []
        for values in given:
            if len(values) > 2 or (len(values) == 2 and "://" in values[1]):
                self.parser.error(
                    f"--prefill {' '.join(values)}: takes a URL and at most one bootstrap port; "
                    "repeat --prefill for each prefill worker"
                )
            url, port = values[0], values[1] if len(values) == 2 else "none"
            if port.lower() == "none":
                prefills.append((url, None))
            elif port.isascii() and port.isdigit() and 0 < int(port) < 65536:
                prefills.append((url, int(port)))
            else:
                self.parser.error(
                    f"--prefill {url} {port}: the bootstrap port must be a number from 1 to "
                    "65535, or 'none'"
                )
        return prefills

    def _discovery_config(self, args: argparse.Namespace) -> DiscoveryConfig:
        """The discovery settings, the selectors parsed; exits when one is malformed."""
        selectors = {}
        for flag, field in (
            ("--selector", "selector"),
            ("--prefill-selector", "prefill_selector"),
            ("--decode-selector", "decode_selector"),
            ("--router-selector", "router_selector"),
        ):
            try:
                selectors[field] = parse_selector(flag, getattr(args, f"discovery.{field}"))
            except DiscoveryConfigError as exc:
                self.parser.error(str(exc))
        return self.discovery.build(args, **selectors)

    def _policy_name(self, flag: str, name: str, settings: PolicySettings) -> str:
        """A policy name from ``flag``, canonical and known; exits when it is not."""
        policy = canonical_name(name)
        try:
            create_policy(policy, settings)  # fail at start on an unknown name or a bad plugin
        except PolicyError as exc:
            self.parser.error(f"{flag}: {exc}")
        return policy

    # --- the config --------------------------------------------------------------------------

    def config(self, args: argparse.Namespace) -> GatewayConfig:
        """The validated config; exits with the parser's error message when it is not."""
        parser = self.parser
        for flag, (_kind, feature) in NOT_YET_SUPPORTED.items():
            if hasattr(args, "unsupported_" + flag.lstrip("-").replace("-", "_")):
                parser.error(f"{flag} is not supported yet: Shunter does not have {feature} yet")
        if args.backend not in _BACKENDS_BUILT:
            parser.error(f"--backend {args.backend} is not supported yet (only: sglang)")
        settings = self.policies.build(
            args, cache_aware=self.cache_aware.build(args), prefix_hash=self.prefix_hash.build(args)
        )
        policy = self._policy_name("--policy", getattr(args, "gateway.policy"), settings)
        leg_policies: dict[str, str | None] = {}
        for flag, field in (
            ("--prefill-policy", "prefill_policy"),
            ("--decode-policy", "decode_policy"),
        ):
            name = getattr(args, f"gateway.{field}")
            leg_policies[field] = None if name is None else self._policy_name(flag, name, settings)
        buckets = getattr(args, "gateway.duration_buckets") or DEFAULT_DURATION_BUCKETS
        config = self.gateway.build(
            args,
            policy=policy,
            policy_settings=settings,
            duration_buckets=tuple(buckets),
            tokenizer_path=getattr(args, "gateway.tokenizer_path") or args.model_path,
            retry=self.retry.build(args),
            breaker=self.breaker.build(args),
            health=self.health.build(args),
            admission=self.admission.build(args),
            server_limits=self.limits.build(args),
            prefill_urls=self._prefill_urls(args.pd_prefill),
            discovery=self._discovery_config(args),
            kv_events_endpoints=self._kv_events_endpoints(args.kv_events_endpoint),
            model_aliases=self._model_aliases(args.model_alias),
            **leg_policies,
        )
        try:
            return config.validate()
        except ConfigError as exc:
            parser.error(str(exc))
        raise AssertionError("unreachable")


def run(flags: ServeFlags, args: argparse.Namespace) -> None:
    """Run the gateway: one process, or with ``--workers N`` a supervisor of N."""
    config = flags.config(args)
    if config.workers > 1 and not config.supervised:
        from shunter.supervise import run_supervisor

        # The children run this same command line, each with its slot's hidden flags.
        run_supervisor(config, args.argv)
        return
    from shunter.run import run_gateway

    run_gateway(config)
