"""The command line: sglang-router's flag names and defaults, clear refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shunter.cli import main, serve_config
from shunter.cli.serve import NOT_YET_SUPPORTED
from shunter.compiled import installed_build
from shunter.config import GatewayConfig


def config_for(*argv: str) -> GatewayConfig:
    return serve_config(argv)


def refusal(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_defaults_are_sglang_routers() -> None:
    config = config_for()
    assert (config.host, config.port) == ("0.0.0.0", 30000)
    assert config.max_payload_size == 64 * 1024 * 1024
    assert config.request_timeout_secs == 1800
    assert (config.prometheus_host, config.prometheus_port) == ("0.0.0.0", 29000)
    assert config.worker_startup_timeout_secs == 1800
    assert config.worker_startup_check_interval == 30
    assert config.request_id_headers == [
        "x-request-id",
        "x-correlation-id",
        "x-trace-id",
        "request-id",
    ]
    assert config.cors_allowed_origins == [] and config.dp_aware is False
    assert config.log_level == "info" and config.api_key is None
    assert config.policy == "cache_aware"
    cache = config.policy_settings.cache_aware
    assert (
        cache.cache_threshold,
        cache.balance_abs_threshold,
        cache.balance_rel_threshold,
        cache.eviction_interval_secs,
        cache.max_tree_size,
    ) == (0.3, 64, 1.5, 120, 2**26)
    assert config.policy_settings.bucket_adjust_interval_secs == 5
    assert (
        config.retry.max_retries,
        config.retry.initial_backoff_ms,
        config.retry.max_backoff_ms,
        config.retry.backoff_multiplier,
        config.retry.jitter_factor,
    ) == (5, 50, 30000, 1.5, 0.2)
    assert (
        config.breaker.failure_threshold,
        config.breaker.success_threshold,
        config.breaker.timeout_secs,
        config.breaker.window_secs,
    ) == (10, 3, 60, 120)
    assert (
        config.health.interval_secs,
        config.health.timeout_secs,
        config.health.endpoint,
        config.health.failure_threshold,
        config.health.success_threshold,
    ) == (60, 5, "/health", 3, 2)
    assert (
        config.admission.max_concurrent,
        config.admission.queue_size,
        config.admission.queue_timeout_secs,
    ) == (-1, 100, 60)


def test_flags_are_read() -> None:
    config = config_for(
        "--host",
        "127.0.0.1",
        "--port",
        "8080",
        "--worker-urls",
        "http://a:1",
        "b:2",
        "--policy",
        "random",
        "--max-payload-size",
        "1024",
        "--request-timeout-secs",
        "5",
        "--api-key",
        "k",
        "--log-level",
        "debug",
        "--cors-allowed-origins",
        "http://x.io",
        "--request-id-headers",
        "X-My-Id",
        "--dp-aware",
    )
    assert config.worker_urls == ["http://a:1", "http://b:2"]
    assert config.policy == "random" and config.max_payload_size == 1024
    assert config.request_id_headers == ["x-my-id"] and config.dp_aware


@pytest.mark.parametrize(
    "flag",
    [
        "--enable-igw",
        "--mini-lb",
        "--tokenizer-cache-enable-l0",
        "--history-backend",
    ],
)
def test_flags_of_features_not_built_are_refused_by_name(
    capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    argv = ["serve", flag] if NOT_YET_SUPPORTED[flag][0] == "switch" else ["serve", flag, "1"]
    err = refusal(capsys, *argv)
    assert f"{flag} is not supported yet" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policy", "fastest"], "unknown policy 'fastest'"),
        (["--policy", "no_such_module:Policy"], "cannot import no_such_module"),
        (["--policy", "json:JSONDecoder"], "must be a subclass of"),
        (["--cache-threshold", "1.5"], "--cache-threshold must be between 0 and 1"),
        (["--balance-rel-threshold", "0.5"], "--balance-rel-threshold must be >= 1"),
        (["--max-tree-size", "0"], "--max-tree-size must be > 0"),
        (["--retry-max-retries", "0"], "--retry-max-retries must be >= 1"),
        (["--retry-jitter-factor", "2"], "--retry-jitter-factor must be between 0 and 1"),
        (["--cb-failure-threshold", "0"], "must be >= 1"),
        (["--health-check-endpoint", "health"], "must start with '/'"),
        (["--queue-size", "-1"], "--queue-size must be >= 0"),
        (["--prometheus-duration-buckets", "1", "0.5"], "increasing"),
        (["--tls-cert-path", "/nonexistent.pem"], "--tls-cert-path and --tls-key-path go together"),
        (["--tls-cert-path", "/no/c.pem", "--tls-key-path", "/no/k.pem"], "cannot read it"),
        (["--worker-urls", "ftp://w:1"], "scheme 'ftp'"),
        (["--worker-urls", "http://w:notaport"], "malformed"),
        (["--worker-urls", "grpcs://w:1"], "TLS to gRPC workers is not supported yet"),
        (["--reasoning-parser", "nope"], "--reasoning-parser must be one of deepseek_r1, qwen3"),
        (["--tool-call-parser", "nope"], "--tool-call-parser must be one of json"),
        (["--tokenizer-path", "/nonexistent"], "no tokenizer.json there"),
        (["--max-payload-size", "-5"], "must be >= 0"),
        (["--max-payload-size", "0"], "--max-payload-size must be > 0"),
        (["--port", "70000"], "--port must be between 1 and 65535"),
        (["--request-timeout-secs", "0"], "must be > 0"),
        (["--log-level", "chatty"], "--log-level must be one of"),
        (["--backend", "openai"], "--backend openai is not supported yet"),
    ],
)
def test_bad_values_fail_at_start_with_a_reason(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert message in refusal(capsys, "serve", *argv)


def test_pd_flags_as_smg_takes_them() -> None:
    config = config_for(
        "--pd-disaggregation",
        "--prefill",
        "http://p1:8000",
        "9001",
        "--prefill",
        "http://p2:8000",
        "--prefill",
        "http://p3:8000",
        "none",
        "--decode",
        "http://d1:8000",
        "--decode",
        "http://d2:8000",
        "--policy",
        "round_robin",
        "--prefill-policy",
        "cacheaware",
        "--pd-min-prefill-tokens",
        "256",
    )
    assert config.pd_disaggregation
    assert config.prefill_urls == [
        ("http://p1:8000", 9001),
        ("http://p2:8000", None),
        ("http://p3:8000", None),
    ]
    assert config.decode_urls == ["http://d1:8000", "http://d2:8000"]
    assert config.prefill_policy == "cache_aware"  # canonical, as --policy's
    assert config.decode_policy is None  # falls back to --policy
    assert config.pd_min_prefill_tokens == 256


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--pd-disaggregation", "--prefill", "http://p:1", "99999"],
            "--prefill http://p:1 99999: the bootstrap port must be a number from 1 to 65535",
        ),
        (
            ["--pd-disaggregation", "--prefill", "http://p:1", "eight"],
            "the bootstrap port must be a number from 1 to 65535, or 'none'",
        ),
        (
            ["--pd-disaggregation", "--prefill", "http://p:1", "http://p:2"],
            "repeat --prefill for each prefill worker",
        ),
        (
            ["--pd-disaggregation", "--prefill", "http://p:1", "--decode-policy", "bucket"],
            "--decode-policy bucket",
        ),
        (
            ["--pd-disaggregation", "--prefill-policy", "fastest"],
            "--prefill-policy: unknown policy 'fastest'",
        ),
        (
            ["--prefill", "http://p:1"],
            "--prefill: prefill/decode settings need --pd-disaggregation",
        ),
        (["--decode", "http://d:1"], "--decode: prefill/decode settings need --pd-disaggregation"),
        (
            ["--pd-disaggregation", "--worker-urls", "http://w:1"],
            "with --pd-disaggregation give the workers with --prefill",
        ),
        (["--pd-disaggregation", "--decode", "ftp://d:1"], "has scheme 'ftp'"),
    ],
)
def test_bad_pd_flags_say_what_to_change(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert message in refusal(capsys, "serve", *argv)


def test_both_spellings_of_the_eviction_interval() -> None:
    for flag in ("--eviction-interval", "--eviction-interval-secs"):
        config = config_for(flag, "7")
        assert config.policy_settings.cache_aware.eviction_interval_secs == 7


def test_sim_rejects_bad_faults(capsys: pytest.CaptureFixture[str]) -> None:
    assert "error_rate" in refusal(capsys, "sim", "--error-rate", "2")


def test_module_entry_point_and_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "shunter", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("shunter ")
    assert out.stdout.rstrip().endswith(f"({installed_build()})")  # which build: compiled or not
