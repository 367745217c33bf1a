"""``shunter sim``: a simulated SGLang/OpenAI worker, the default test peer."""

from __future__ import annotations

import argparse

from shunter.cli.options import ConfigFlags
from shunter.sim.config import (
    DISAGGREGATION_MODES,
    KV_EVENT_FORMATS,
    PD_RUNTIMES,
    RUNTIMES,
    Faults,
    SimConfig,
)


class SimFlags:
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        s = self.sim = ConfigFlags(parser, SimConfig(), "sim")
        s.flag("--host", "host")
        s.flag("--port", "port")
        s.flag("--worker-id", "worker_id", type=str, help="name in X-Worker-Id (default host:port)")
        s.flag("--served-model-name", "served_model_name")
        s.flag(
            "--runtime",
            "runtime",
            choices=RUNTIMES,
            help="'openai': only the OpenAI API; 'llamacpp': that, plus llama.cpp's /slots "
            "(erasing a slot flushes the cache) and llamacpp:* metrics; 'vllm': the OpenAI API, "
            "vllm:* metrics and POST /reset_prefix_cache",
        )
        s.flag("--ttft-ms", "ttft_ms", help="fixed time to first token")
        s.flag("--itl-ms", "itl_ms", help="inter-token latency")
        s.flag(
            "--prefill-us-per-token",
            "prefill_us_per_token",
            help="prefill time of each uncached prompt token",
        )
        s.flag("--max-running", "max_running", help="running slots")
        s.flag("--cache-tokens", "cache_tokens", help="prefix cache capacity")
        s.flag("--block-size", "block_size", help="prefix cache block, in tokens")
        s.flag("--max-tokens", "max_tokens", help="default output length")
        s.flag("--dp-size", "dp_size")
        s.flag("--api-key", "api_key", type=str)
        s.flag(
            "--grpc",
            "grpc",
            action="store_true",
            help="serve SGLang's gRPC scheduler service on --port (needs the grpc extra)",
        )
        s.flag(
            "--http-port", "http_port", type=int, help="with --grpc: the HTTP API on this port too"
        )
        s.flag(
            "--disaggregation-mode",
            "disaggregation_mode",
            choices=DISAGGREGATION_MODES,
            help="play one leg of a PD pair: 'prefill' serves a bootstrap server on "
            "--disaggregation-bootstrap-port and answers once its decode took the KV; "
            "'decode' takes the KV from the prefill the request names, then generates",
        )
        s.flag(
            "--disaggregation-bootstrap-port",
            "disaggregation_bootstrap_port",
            help="a prefill's bootstrap server port; a decode's when a request's "
            "bootstrap_port is null",
        )
        s.flag(
            "--disaggregation-bootstrap-timeout",
            "disaggregation_bootstrap_timeout",
            help="seconds a prefill holds a room for its decode, and a decode polls for it",
        )
        s.flag("--tls-cert-path", "tls_cert_path", type=str, help="serve HTTPS")
        s.flag("--tls-key-path", "tls_key_path", type=str)
        s.flag(
            "--tls-client-ca-path",
            "tls_client_ca_path",
            type=str,
            help="require client certificates signed by this CA (mTLS)",
        )
        s.flag(
            "--kv-events-endpoint",
            "kv_events_endpoint",
            type=str,
            help="publish the prefix cache's KV events on a ZMQ PUB bound here "
            "(e.g. tcp://127.0.0.1:5557), as SGLang's --kv-events-config endpoint",
        )
        s.flag(
            "--kv-events-replay-endpoint",
            "kv_events_replay_endpoint",
            type=str,
            help="answer replay requests on a ZMQ ROUTER bound here",
        )
        s.flag(
            "--kv-events-format",
            "kv_events_format",
            choices=KV_EVENT_FORMATS,
            help="'sglang': tagged arrays, one page per BlockStored, signed hashes; "
            "'vllm': tagged maps as vLLM v0.26, one BlockStored per run, unsigned hashes",
        )
        s.flag(
            "--kv-events-topic",
            "kv_events_topic",
            type=str,
            help="frame 0 of each event message (default kv@<worker-id>@<model>)",
        )
        f = self.faults = ConfigFlags(parser, Faults(), "faults")
        f.flag("--error-rate", "error_rate")
        f.flag("--error-status", "error_status")
        f.flag("--extra-latency-ms", "extra_latency_ms")
        f.flag("--drop-after-chunks", "drop_after_chunks")
        f.flag("--hang", "hang", action="store_true")
        f.flag("--fail-health", "fail_health", action="store_true")
        parser.add_argument("--log-level", default="warning")

    def config(self, args: argparse.Namespace) -> SimConfig:
        faults = Faults()
        try:  # checked as /sim/faults checks a change at run time
            faults.update(self.faults.build(args).as_dict())
        except ValueError as exc:
            self.parser.error(str(exc))
        config = self.sim.build(args, faults=faults)
        if config.max_running < 1 or config.block_size < 1 or config.dp_size < 1:
            self.parser.error("--max-running, --block-size and --dp-size must be >= 1")
        if config.disaggregation_mode != "null":
            if config.runtime not in PD_RUNTIMES:
                self.parser.error("--disaggregation-mode needs --runtime sglang or vllm")
            if config.runtime == "vllm" and config.grpc:
                self.parser.error("--runtime vllm serves HTTP only: no --grpc")
        if config.kv_events_replay_endpoint and not config.kv_events_endpoint:
            self.parser.error("--kv-events-replay-endpoint needs --kv-events-endpoint")
        if not 0 < config.disaggregation_bootstrap_port < 65536:
            self.parser.error("--disaggregation-bootstrap-port must be a port (1-65535)")
        if config.disaggregation_bootstrap_timeout <= 0:
            self.parser.error("--disaggregation-bootstrap-timeout must be > 0")
        return config


def run(flags: SimFlags, args: argparse.Namespace) -> None:
    from shunter.sim.server import run_sim

    run_sim(flags.config(args), args.log_level)
