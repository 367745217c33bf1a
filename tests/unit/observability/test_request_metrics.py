"""What requests add to the ``/metrics`` scrape: every family the request path records,
with its labels and values, through a whole gateway on a mock network."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from shunter.gateway import Gateway
from shunter.routing.retry import RetryConfig
from shunter.wire.mock import MockRequest, MockResponse

from support.fakes import Workers, call, gateway, ok, ready

Sample = tuple[str, tuple[tuple[str, str], ...]]


def scrape(gw: Gateway) -> dict[Sample, float]:
    """The scrape's samples, less histogram buckets and sums (they depend on timing)."""
    text = gw.metrics.exposition().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.endswith(("_bucket", "_sum"))
    }


def sample(name: str, *labels: tuple[str, str]) -> Sample:
    return name, tuple(sorted(labels))


def added(before: dict[Sample, float], after: dict[Sample, float]) -> dict[Sample, float]:
    return {
        key: value - before.get(key, 0.0)
        for key, value in after.items()
        if value != before.get(key, 0.0)
    }


async def test_requests_add_what_they_did_to_each_family() -> None:
    answers = {"next_completion": 503}

    def handler(request: MockRequest) -> MockResponse:
        if request.url.endswith("/v1/completions") and answers["next_completion"] != 200:
            status, answers["next_completion"] = answers["next_completion"], 200
            return MockResponse(status, [], b"{}")
        if request.url.endswith("/generate"):
            return MockResponse(400, [(b"x-smg-error-code", b"bad_prompt")], b"{}")
        return ok(request)

    gw = gateway(
        network=Workers(handler), retry=RetryConfig(initial_backoff_ms=1, max_backoff_ms=1)
    )
    await ready(gw)
    before = scrape(gw)
    for _ in range(2):
        assert (await call(gw.app, "POST", "/v1/chat/completions", b'{"model": "m"}')).status == 200
    assert (await call(gw.app, "POST", "/v1/completions", b'{"stream": true}')).status == 200
    assert (await call(gw.app, "GET", "/nothing-here")).status == 404
    assert (await call(gw.app, "POST", "/generate", b"{}")).status == 400
    after = scrape(gw)
    await gw.close()
    http = ("router_type", "http"), ("backend_type", "regular")
    route = (*http, ("connection_mode", "HTTP"), ("model", "m"))
    chat, completions = ("endpoint", "/v1/chat/completions"), ("endpoint", "/v1/completions")
    generate = ("endpoint", "/generate")
    worker = ("worker_type", "regular"), ("connection_mode", "HTTP")
    post_chat = ("method", "POST"), ("path", "/v1/chat/completions")
    post_completions = ("method", "POST"), ("path", "/v1/completions")
    post_generate = ("method", "POST"), ("path", "/generate")
    get_other = ("method", "GET"), ("path", "other")
    upstream = ("router_type", "http"), ("error_code", "")
    expected = {
        # the gateway's answers: two chats, a stream (retried once), a 404, a worker's 400
        sample("smg_http_requests_total", *post_chat, ("status", "2xx")): 2,
        sample("smg_http_requests_total", *post_completions, ("status", "2xx")): 1,
        sample("smg_http_requests_total", *get_other, ("status", "4xx")): 1,
        sample("smg_http_requests_total", *post_generate, ("status", "4xx")): 1,
        sample("smg_http_request_duration_seconds_count", *post_chat): 2,
        sample("smg_http_request_duration_seconds_count", *post_completions): 1,
        sample("smg_http_request_duration_seconds_count", *get_other): 1,
        sample("smg_http_request_duration_seconds_count", *post_generate): 1,
        sample("smg_http_responses_total", ("status_code", "200"), ("error_code", "")): 3,
        sample("smg_http_responses_total", ("status_code", "404"), ("error_code", "not_found")): 1,
        sample("smg_http_responses_total", ("status_code", "400"), ("error_code", "bad_prompt")): 1,
        # routing: each attempt routed and selected, each answer counted, one retry
        sample("smg_router_requests_total", *route, chat, ("streaming", "false")): 2,
        sample("smg_router_requests_total", *route, completions, ("streaming", "true")): 2,
        sample("smg_router_requests_total", *route, generate, ("streaming", "false")): 1,
        sample("smg_worker_selection_total", *worker, ("model", "m"), ("policy", "round_robin")): 5,
        sample("smg_router_upstream_responses_total", *upstream, ("status_code", "200")): 3,
        sample("smg_router_upstream_responses_total", *upstream, ("status_code", "503")): 1,
        sample("smg_router_upstream_responses_total", *upstream, ("status_code", "400")): 1,
        sample("smg_worker_errors_total", *worker, ("error_type", "status_503")): 1,
        sample("smg_worker_retries_total", ("worker_type", "regular"), completions): 1,
        sample("smg_worker_retry_backoff_seconds_count", ("attempt", "1")): 1,
        sample("smg_router_request_duration_seconds_count", *route, chat): 2,
        sample("smg_router_request_duration_seconds_count", *route, completions): 1,
        sample("smg_router_request_duration_seconds_count", *route, generate): 1,
        sample(
            "smg_router_request_errors_total", *route, generate, ("error_type", "status_400")
        ): 1,
        # the stream's own
        sample("smg_router_ttft_seconds_count", *http, ("model", "m"), completions): 1,
        sample(
            "smg_router_generation_duration_seconds_count", *http, ("model", "m"), completions
        ): 1,
    }
    # (The breaker's families are left out: its own tests hold them.)
    changed = {key: value for key, value in added(before, after).items() if "_cb_" not in key[0]}
    assert changed == expected
