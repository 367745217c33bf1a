"""What metrics cost per request: Shunter's counters against prometheus-client's own metrics.

Run: python bench/metrics_bench.py

Per request the gateway records one HTTP observation (count, duration histogram, response
code), one routing observation (router requests, worker selection), one upstream answer
and the routed request's duration. Measured both ways in
one run: with ``shunter.observability.metrics.Metrics`` (plain counters, families built at
scrape time) and with prometheus-client ``Counter``/``Histogram`` children, label lookups
cached, as a straightforward implementation would do.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from common import make_worker
from shunter.fleet.worker import Worker
from shunter.observability.metrics import DEFAULT_DURATION_BUCKETS, Metrics

N = 200_000


def shunter_cost(worker: Worker) -> float:
    metrics = Metrics(lambda: (worker,))
    started = time.perf_counter()
    for i in range(N):
        metrics.observe_http("POST", "/v1/chat/completions", 200, "", 0.0123 + (i % 7) * 0.01)
        metrics.observe_route(worker, "m", "/v1/chat/completions", False, "cache_aware")
        metrics.upstream_answer(200)
        metrics.routed_request("m", "/v1/chat/completions", 0.01, 200, "")
    cost = (time.perf_counter() - started) / N * 1e6
    assert b"smg_http_requests_total" in generate_latest(metrics.registry)
    return cost


def prometheus_client_cost() -> float:
    registry = CollectorRegistry()
    requests = Counter("r", "r", ["method", "path", "status"], registry=registry)
    duration = Histogram(
        "d", "d", ["method", "path"], buckets=DEFAULT_DURATION_BUCKETS, registry=registry
    )
    responses = Counter("s", "s", ["status_code", "error_code"], registry=registry)
    routed = Counter("x", "x", ["a", "b", "c", "d", "e", "f"], registry=registry)
    selected = Counter("y", "y", ["a", "b", "c", "d"], registry=registry)
    upstream = Counter("u", "u", ["a", "b", "c"], registry=registry)
    routed_duration = Histogram(
        "z", "z", ["a", "b", "c", "d", "e"], buckets=DEFAULT_DURATION_BUCKETS, registry=registry
    )
    children = (
        requests.labels("POST", "/v1/chat/completions", "2xx"),
        duration.labels("POST", "/v1/chat/completions"),
        responses.labels("200", ""),
        routed.labels("http", "regular", "HTTP", "m", "/v1/chat/completions", "false"),
        selected.labels("regular", "HTTP", "m", "cache_aware"),
        upstream.labels("http", "200", ""),
        routed_duration.labels("http", "regular", "HTTP", "m", "/v1/chat/completions"),
    )
    started = time.perf_counter()
    for i in range(N):
        children[0].inc()
        children[1].observe(0.0123 + (i % 7) * 0.01)
        children[2].inc()
        children[3].inc()
        children[4].inc()
        children[5].inc()
        children[6].observe(0.01)
    return (time.perf_counter() - started) / N * 1e6


def main() -> None:
    worker = make_worker("http://w:1")
    ours = min(shunter_cost(worker) for _ in range(3))
    theirs = min(prometheus_client_cost() for _ in range(3))
    print(
        f"metrics per request: shunter {ours:.2f} µs, prometheus-client children "
        f"{theirs:.2f} µs ({theirs / ours:.1f}x)"
    )


if __name__ == "__main__":
    main()
