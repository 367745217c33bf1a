"""`shunter serve | sim | demo | llamacpp`; the gateway takes sglang-router's flags and defaults."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from shunter import __version__
from shunter.config import DEFAULT_REQUEST_ID_HEADERS, ConfigError, GatewayConfig
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
from shunter.routing.limiter import AdmissionConfig
from shunter.routing.retry import RetryConfig
from shunter.wire.limits import RESERVED_FILES, ServerLimits

# sglang-router / smg flags whose features Shunter does not have yet. Naming one exits at
# start with a message, so that nothing a user asked for is silently ignored.
_SWITCH = "switch"
_VALUE = "value"
NOT_YET_SUPPORTED: dict[str, tuple[str, str]] = {
    "--pd-disaggregation": (_SWITCH, "prefill/decode disaggregation"),
    "--prefill": (_VALUE, "prefill/decode disaggregation"),
    "--decode": (_VALUE, "prefill/decode disaggregation"),
    "--prefill-policy": (_VALUE, "prefill/decode disaggregation"),
    "--decode-policy": (_VALUE, "prefill/decode disaggregation"),
    "--enable-igw": (_SWITCH, "inference gateway (multi-router) mode"),
    "--service-discovery": (_SWITCH, "Kubernetes service discovery"),
    "--selector": (_VALUE, "Kubernetes service discovery"),
    "--service-discovery-port": (_VALUE, "Kubernetes service discovery"),
    "--service-discovery-namespace": (_VALUE, "Kubernetes service discovery"),
    "--prefill-selector": (_VALUE, "Kubernetes service discovery"),
    "--decode-selector": (_VALUE, "Kubernetes service discovery"),
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


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_policy_flags(p: argparse.ArgumentParser) -> None:
    c, h = CacheAwareConfig(), PrefixHashConfig()
    p.add_argument(
        "--cache-threshold",
        type=float,
        default=c.cache_threshold,
        help="cache_aware: share of the text that must match to follow the cache",
    )
    p.add_argument(
        "--balance-abs-threshold",
        type=int,
        default=c.balance_abs_threshold,
        help="cache_aware/bucket: in-flight gap that counts as imbalance",
    )
    p.add_argument(
        "--balance-rel-threshold",
        type=float,
        default=c.balance_rel_threshold,
        help="cache_aware/bucket: in-flight ratio that counts as imbalance",
    )
    p.add_argument(
        "--eviction-interval-secs",
        "--eviction-interval",
        type=float,
        dest="eviction_interval_secs",
        default=c.eviction_interval_secs,
        help="cache_aware: seconds between tree trims",
    )
    p.add_argument(
        "--max-tree-size",
        type=int,
        default=c.max_tree_size,
        help="cache_aware: characters kept per worker in a model's tree",
    )
    p.add_argument(
        "--bucket-adjust-interval-secs",
        type=float,
        default=5.0,
        help="bucket: seconds between boundary adjustments",
    )
    p.add_argument(
        "--prefix-token-count",
        type=int,
        default=h.prefix_token_count,
        help="prefix_hash: tokens of the prompt start that pick the worker",
    )
    p.add_argument(
        "--prefix-hash-load-factor",
        type=float,
        default=h.load_factor,
        help="prefix_hash: load over the average that sends a request elsewhere",
    )
    p.add_argument(
        "--max-idle-secs",
        type=float,
        default=4 * 3600.0,
        help="manual: seconds before an unused routing key is forgotten",
    )


def _add_reliability_flags(p: argparse.ArgumentParser) -> None:
    r, b, h, a = RetryConfig(), BreakerConfig(), HealthConfig(), AdmissionConfig()
    p.add_argument(
        "--retry-max-retries",
        type=int,
        default=r.max_retries,
        help="attempts per request, the first included",
    )
    p.add_argument("--retry-initial-backoff-ms", type=float, default=r.initial_backoff_ms)
    p.add_argument("--retry-max-backoff-ms", type=float, default=r.max_backoff_ms)
    p.add_argument("--retry-backoff-multiplier", type=float, default=r.backoff_multiplier)
    p.add_argument("--retry-jitter-factor", type=float, default=r.jitter_factor)
    p.add_argument("--disable-retries", action="store_true")
    p.add_argument(
        "--cb-failure-threshold",
        type=int,
        default=b.failure_threshold,
        help="consecutive failures (within the window) that open a circuit",
    )
    p.add_argument(
        "--cb-success-threshold",
        type=int,
        default=b.success_threshold,
        help="consecutive half-open successes that close it",
    )
    p.add_argument(
        "--cb-timeout-duration-secs",
        type=float,
        default=b.timeout_secs,
        help="the longest an open circuit waits before half-open (openings back off to it)",
    )
    p.add_argument(
        "--cb-base-open-secs",
        type=float,
        default=b.base_open_secs,
        help="how long a first opening lasts; each consecutive one doubles it",
    )
    p.add_argument(
        "--cb-panic-threshold",
        type=float,
        default=b.panic_threshold,
        help="ignore a model's breakers when fewer than this share of its healthy workers "
        "are left in by them (0: never)",
    )
    p.add_argument(
        "--cb-window-duration-secs",
        type=float,
        default=b.window_secs,
        help="failures further apart than this do not add up",
    )
    p.add_argument("--disable-circuit-breaker", action="store_true")
    p.add_argument("--health-check-interval-secs", type=float, default=h.interval_secs)
    p.add_argument("--health-check-timeout-secs", type=float, default=h.timeout_secs)
    p.add_argument("--health-check-endpoint", default=h.endpoint)
    p.add_argument("--health-failure-threshold", type=int, default=h.failure_threshold)
    p.add_argument("--health-success-threshold", type=int, default=h.success_threshold)
    p.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=a.max_concurrent,
        help="requests in progress at once; -1: no limit",
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=a.queue_size,
        help="requests that may wait for a slot (429 beyond)",
    )
    p.add_argument(
        "--queue-timeout-secs",
        type=float,
        default=a.queue_timeout_secs,
        help="longest wait for a slot (408 beyond)",
    )
    p.add_argument(
        "--rate-limit-tokens-per-second",
        type=float,
        default=None,
        help="admissions per second (default: --max-concurrent-requests)",
    )
    p.add_argument("--tls-cert-path", default=None, help="serve HTTPS with this certificate")
    p.add_argument("--tls-key-path", default=None, help="and this private key")
    p.add_argument("--client-cert-path", default=None, help="mTLS to workers: certificate")
    p.add_argument("--client-key-path", default=None, help="mTLS to workers: private key")
    p.add_argument(
        "--ca-cert-paths",
        nargs="*",
        default=[],
        metavar="PEM",
        help="CA certificates to trust for https:// workers",
    )
    p.add_argument(
        "--graceful-shutdown-timeout-secs",
        type=float,
        default=30.0,
        help="on SIGTERM, how long in-flight requests may finish",
    )


def _add_server_limit_flags(p: argparse.ArgumentParser) -> None:
    s = ServerLimits()
    g = p.add_argument_group("client limits (what one client may make the server hold)")
    g.add_argument(
        "--max-request-line-bytes",
        type=int,
        default=s.max_request_line_bytes,
        help="longest request line; 414 beyond (default %(default)s)",
    )
    g.add_argument(
        "--max-header-bytes",
        type=int,
        default=s.max_header_bytes,
        help="longest header, name and value; 431 beyond (default %(default)s)",
    )
    g.add_argument(
        "--max-headers",
        type=int,
        default=s.max_headers,
        help="most headers in a request; 431 beyond (default %(default)s)",
    )
    g.add_argument(
        "--max-request-head-bytes",
        type=int,
        default=s.max_request_head_bytes,
        help="largest request head, line ends included; 431 beyond (default %(default)s)",
    )
    g.add_argument(
        "--request-head-timeout-secs",
        type=float,
        default=s.request_head_timeout_secs,
        help="longest time from a head's first byte to its end; 408 beyond (default %(default)s)",
    )
    g.add_argument(
        "--request-body-timeout-secs",
        type=float,
        default=s.request_body_timeout_secs,
        help="longest wait for a body byte the app waits for; 408 beyond (default %(default)s)",
    )
    g.add_argument(
        "--max-connections",
        type=int,
        default=s.max_connections,
        help="open client connections; 503 beyond (default: (open-file limit - "
        f"{RESERVED_FILES}) / 2, computed at start and logged)",
    )


def _server_limits_from_args(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(
        max_request_line_bytes=args.max_request_line_bytes,
        max_header_bytes=args.max_header_bytes,
        max_headers=args.max_headers,
        max_request_head_bytes=args.max_request_head_bytes,
        request_head_timeout_secs=args.request_head_timeout_secs,
        request_body_timeout_secs=args.request_body_timeout_secs,
        max_connections=args.max_connections,
    )


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    d = GatewayConfig()
    p.add_argument("--host", default=d.host, help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=d.port, help="port (default %(default)s)")
    p.add_argument(
        "--worker-urls",
        nargs="*",
        default=[],
        metavar="URL",
        help="workers to register at start (http:// or https://)",
    )
    p.add_argument(
        "--policy",
        default=d.policy,
        help="routing policy: " + ", ".join(BUILT) + ", or module:Class (default %(default)s)",
    )
    _add_policy_flags(p)
    _add_reliability_flags(p)
    _add_server_limit_flags(p)
    p.add_argument(
        "--max-payload-size",
        type=_non_negative_int,
        default=d.max_payload_size,
        help="largest request body in bytes (default %(default)s)",
    )
    p.add_argument(
        "--max-response-bytes",
        type=_non_negative_int,
        default=d.max_response_bytes,
        help="largest whole (non-streamed) response body taken from a worker, in bytes; "
        "a bigger one fails the attempt, 502 (default %(default)s)",
    )
    p.add_argument(
        "--request-timeout-secs",
        type=_positive_float,
        default=d.request_timeout_secs,
        help="longest wait for a worker's first byte and between chunks",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer <key>' from clients; never sent to workers",
    )
    p.add_argument(
        "--worker-api-key",
        default=None,
        help="the key sent as a Bearer token to the --worker-urls workers",
    )
    p.add_argument("--log-level", default=d.log_level, help="debug, info, warn, error")
    p.add_argument("--log-dir", default=None, help="also log to a daily-rotated file here")
    p.add_argument("--log-json", action="store_true", help="log JSON lines")
    p.add_argument("--prometheus-host", default=d.prometheus_host)
    p.add_argument(
        "--prometheus-port",
        type=int,
        default=d.prometheus_port,
        help="Prometheus /metrics port; 0 turns the listener off",
    )
    p.add_argument(
        "--enable-trace", action="store_true", help="export OpenTelemetry spans over OTLP/gRPC"
    )
    p.add_argument(
        "--otlp-traces-endpoint",
        default="localhost:4317",
        help="where spans go (default %(default)s)",
    )
    p.add_argument(
        "--prometheus-duration-buckets",
        nargs="*",
        type=float,
        default=None,
        metavar="SECONDS",
        help="upper bounds of the *_duration_seconds buckets",
    )
    p.add_argument("--cors-allowed-origins", nargs="*", default=[], metavar="ORIGIN")
    p.add_argument(
        "--request-id-headers",
        nargs="*",
        default=list(DEFAULT_REQUEST_ID_HEADERS),
        metavar="HEADER",
    )
    p.add_argument(
        "--worker-startup-timeout-secs", type=_positive_float, default=d.worker_startup_timeout_secs
    )
    p.add_argument(
        "--worker-startup-check-interval",
        type=_positive_float,
        default=d.worker_startup_check_interval,
    )
    p.add_argument(
        "--dp-aware",
        action="store_true",
        help="route to each data-parallel rank of a worker separately",
    )
    grpc = p.add_argument_group("gRPC workers (the gateway tokenizes for them)")
    grpc.add_argument("--model-path", default=None, help="a local model directory (tokenizer)")
    grpc.add_argument(
        "--tokenizer-path",
        default=None,
        help="a local tokenizer directory; default: --model-path, else the worker's GetTokenizer",
    )
    grpc.add_argument("--chat-template", default=None, help="a Jinja file overriding the model's")
    grpc.add_argument("--reasoning-parser", default=None, help="deepseek_r1 or qwen3")
    grpc.add_argument("--tool-call-parser", default=None, help="json, qwen or hermes")
    p.add_argument(
        "--backend",
        "--runtime",
        dest="backend",
        default="sglang",
        help="worker backend; only 'sglang' (any SGLang or OpenAI-compatible HTTP worker) is built",
    )
    for flag, (kind, _feature) in NOT_YET_SUPPORTED.items():
        dest = "unsupported_" + flag.lstrip("-").replace("-", "_")
        if kind == _SWITCH:
            p.add_argument(
                flag,
                dest=dest,
                action="store_true",
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )
        else:
            p.add_argument(
                flag,
                dest=dest,
                nargs="*",
                action="append",
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )


def _config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> GatewayConfig:
    for flag, (_kind, feature) in NOT_YET_SUPPORTED.items():
        if hasattr(args, "unsupported_" + flag.lstrip("-").replace("-", "_")):
            parser.error(f"{flag} is not supported yet: Shunter does not have {feature} yet")
    if args.backend not in _BACKENDS_BUILT:
        parser.error(f"--backend {args.backend} is not supported yet (only: sglang)")
    policy = canonical_name(args.policy)
    settings = PolicySettings(
        cache_aware=CacheAwareConfig(
            cache_threshold=args.cache_threshold,
            balance_abs_threshold=args.balance_abs_threshold,
            balance_rel_threshold=args.balance_rel_threshold,
            eviction_interval_secs=args.eviction_interval_secs,
            max_tree_size=args.max_tree_size,
        ),
        prefix_hash=PrefixHashConfig(args.prefix_token_count, args.prefix_hash_load_factor),
        bucket_adjust_interval_secs=args.bucket_adjust_interval_secs,
        manual_max_idle_secs=args.max_idle_secs,
    )
    try:
        create_policy(policy, settings)  # fail at start on an unknown name or a bad plugin
    except PolicyError as exc:
        parser.error(f"--policy: {exc}")
    config = GatewayConfig(
        host=args.host, port=args.port, worker_urls=args.worker_urls, policy=policy,
        max_payload_size=args.max_payload_size, request_timeout_secs=args.request_timeout_secs,
        max_response_bytes=args.max_response_bytes,
        api_key=args.api_key, worker_api_key=args.worker_api_key, log_level=args.log_level,
        log_dir=args.log_dir,
        log_json=args.log_json, prometheus_host=args.prometheus_host,
        prometheus_port=args.prometheus_port, cors_allowed_origins=args.cors_allowed_origins,
        request_id_headers=args.request_id_headers,
        worker_startup_timeout_secs=args.worker_startup_timeout_secs,
        worker_startup_check_interval=args.worker_startup_check_interval,
        dp_aware=args.dp_aware, policy_settings=settings,
        tokenizer_path=args.tokenizer_path or args.model_path, chat_template=args.chat_template,
        reasoning_parser=args.reasoning_parser, tool_call_parser=args.tool_call_parser,
        retry=RetryConfig(args.retry_max_retries, args.retry_initial_backoff_ms,
                          args.retry_max_backoff_ms, args.retry_backoff_multiplier,
                          args.retry_jitter_factor, args.disable_retries),
        breaker=BreakerConfig(failure_threshold=args.cb_failure_threshold,
                              success_threshold=args.cb_success_threshold,
                              timeout_secs=args.cb_timeout_duration_secs,
                              window_secs=args.cb_window_duration_secs,
                              disabled=args.disable_circuit_breaker,
                              base_open_secs=args.cb_base_open_secs,
                              panic_threshold=args.cb_panic_threshold),
        health=HealthConfig(args.health_check_interval_secs, args.health_check_timeout_secs,
                            args.health_check_endpoint, args.health_failure_threshold,
                            args.health_success_threshold),
        admission=AdmissionConfig(args.max_concurrent_requests, args.queue_size,
                                  args.queue_timeout_secs, args.rate_limit_tokens_per_second),
        tls_cert_path=args.tls_cert_path, tls_key_path=args.tls_key_path,
        client_cert_path=args.client_cert_path, client_key_path=args.client_key_path,
        ca_cert_paths=args.ca_cert_paths,
        shutdown_drain_secs=args.graceful_shutdown_timeout_secs,
        duration_buckets=tuple(args.prometheus_duration_buckets or DEFAULT_DURATION_BUCKETS),
        enable_trace=args.enable_trace, otlp_traces_endpoint=args.otlp_traces_endpoint,
        server_limits=_server_limits_from_args(args),
    )  # fmt: skip
    try:
        return config.validate()
    except ConfigError as exc:
        parser.error(str(exc))
    raise AssertionError("unreachable")


def _add_sim_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--worker-id", default=None, help="name in X-Worker-Id (default host:port)")
    p.add_argument("--served-model-name", default="sim-model")
    p.add_argument(
        "--runtime",
        choices=("sglang", "openai", "llamacpp"),
        default="sglang",
        help="'openai': only the OpenAI API; 'llamacpp': that, plus llama.cpp's /slots "
        "(erasing a slot flushes the cache) and llamacpp:* metrics",
    )
    p.add_argument("--ttft-ms", type=float, default=5.0, help="fixed time to first token")
    p.add_argument("--itl-ms", type=float, default=2.0, help="inter-token latency")
    p.add_argument(
        "--prefill-us-per-token",
        type=float,
        default=20.0,
        help="prefill time of each uncached prompt token",
    )
    p.add_argument("--max-running", type=int, default=8, help="running slots")
    p.add_argument("--cache-tokens", type=int, default=65536, help="prefix cache capacity")
    p.add_argument("--block-size", type=int, default=16, help="prefix cache block, in tokens")
    p.add_argument("--max-tokens", type=int, default=16, help="default output length")
    p.add_argument("--dp-size", type=int, default=1)
    p.add_argument("--api-key", default=None)
    p.add_argument("--log-level", default="warning")
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--error-status", type=int, default=500)
    p.add_argument("--extra-latency-ms", type=float, default=0.0)
    p.add_argument("--drop-after-chunks", type=int, default=-1)
    p.add_argument("--hang", action="store_true")
    p.add_argument(
        "--grpc",
        action="store_true",
        help="serve SGLang's gRPC scheduler service on --port (needs the grpc extra)",
    )
    p.add_argument(
        "--http-port", type=int, default=None, help="with --grpc: the HTTP API on this port too"
    )
    p.add_argument("--fail-health", action="store_true")
    p.add_argument("--tls-cert-path", default=None, help="serve HTTPS")
    p.add_argument("--tls-key-path", default=None)
    p.add_argument(
        "--tls-client-ca-path",
        default=None,
        help="require client certificates signed by this CA (mTLS)",
    )


def _run_sim(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from shunter.sim.config import Faults, SimConfig
    from shunter.sim.server import run_sim

    faults = Faults()
    try:
        faults.update({
            "error_rate": args.error_rate, "error_status": args.error_status,
            "extra_latency_ms": args.extra_latency_ms,
            "drop_after_chunks": args.drop_after_chunks, "hang": args.hang,
            "fail_health": args.fail_health,
        })  # fmt: skip
    except ValueError as exc:
        parser.error(str(exc))
    if args.max_running < 1 or args.block_size < 1 or args.dp_size < 1:
        parser.error("--max-running, --block-size and --dp-size must be >= 1")
    config = SimConfig(
        host=args.host, port=args.port, worker_id=args.worker_id,
        served_model_name=args.served_model_name, runtime=args.runtime, ttft_ms=args.ttft_ms,
        itl_ms=args.itl_ms, prefill_us_per_token=args.prefill_us_per_token,
        max_running=args.max_running, cache_tokens=args.cache_tokens,
        block_size=args.block_size, max_tokens=args.max_tokens, dp_size=args.dp_size,
        api_key=args.api_key, faults=faults, tls_cert_path=args.tls_cert_path,
        tls_key_path=args.tls_key_path, tls_client_ca_path=args.tls_client_ca_path,
        grpc=args.grpc, http_port=args.http_port,
    )  # fmt: skip
    run_sim(config, args.log_level)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="shunter", description=__doc__)
    parser.add_argument("--version", "-V", action="version", version=f"shunter {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", aliases=["launch"], help="run the gateway")
    _add_serve_flags(serve)
    sim = commands.add_parser("sim", help="run a simulated inference worker")
    _add_sim_flags(sim)
    demo = commands.add_parser("demo", help="run the gateway in front of two simulated workers")
    demo.add_argument("--port", type=int, default=30000)
    demo.add_argument("--prometheus-port", type=int, default=29000)
    llama = commands.add_parser(
        "llamacpp", help="run llama.cpp's server with SmolLM2 (needs the e2e extra)"
    )
    _add_llamacpp_flags(llama)
    return parser, {
        "serve": serve, "launch": serve, "sim": sim, "demo": demo, "llamacpp": llama
    }  # fmt: skip


def _add_llamacpp_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model-path", default=None, help="a GGUF file (default: SmolLM2-135M)")
    p.add_argument("--alias", default="smollm2", help="the model id the server reports")
    p.add_argument("--slots", type=int, default=4, help="requests decoded at once")
    p.add_argument("--ctx-per-slot", type=int, default=2048, help="context tokens per slot")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--cache-ram-mib",
        type=int,
        default=0,
        help="llama.cpp's host-RAM prompt cache; 0 (default) keeps only what the slots hold",
    )
    p.add_argument("--log-level", default="info")


def _run_llamacpp(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from shunter.llamacpp import LlamaCppConfig, LlamaCppUnavailable, run_llamacpp
    from shunter.observability.logging import setup_logging

    if args.slots < 1 or args.ctx_per_slot < 64 or args.threads < 1 or args.cache_ram_mib < 0:
        parser.error("--slots and --threads must be >= 1, --ctx-per-slot >= 64, "
                     "--cache-ram-mib >= 0")  # fmt: skip
    setup_logging(args.log_level)
    config = LlamaCppConfig(
        host=args.host, port=args.port, model_path=args.model_path, alias=args.alias,
        slots=args.slots, ctx_per_slot=args.ctx_per_slot, threads=args.threads,
        cache_ram_mib=args.cache_ram_mib,
    )  # fmt: skip
    try:
        run_llamacpp(config)
    except LlamaCppUnavailable as exc:
        parser.exit(2, f"shunter llamacpp: {exc}\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    command = commands[args.command]
    if command.prog.endswith(("serve", "launch")):
        from shunter.run import run_gateway

        run_gateway(_config_from_args(args, command))
    elif args.command == "sim":
        _run_sim(args, command)
    elif args.command == "llamacpp":
        _run_llamacpp(args, command)
    else:
        from shunter.demo import run_demo

        run_demo(args.port, args.prometheus_port)


if __name__ == "__main__":
    main(sys.argv[1:])
