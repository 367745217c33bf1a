"""One /metrics for ``--workers N``: the children's expositions merged (observability/merged.py),
read over real Unix sockets from real ``Metrics`` objects."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shunter.observability.merged import (
    ChildrenCollector,
    fetch_exposition,
    merge_expositions,
    parse_exposition,
)
from shunter.observability.metrics import Metrics
from shunter.supervisor.control import METRICS, ControlSocket

BOUNDS = (0.01, 0.1, 1.0)


def child(requests: list[float], connections: int = 0) -> Metrics:
    """A process's metrics after serving requests that took ``requests`` seconds each."""
    metrics = Metrics(duration_buckets=BOUNDS)
    for seconds in requests:
        metrics.observe_http("POST", "/v1/completions", 200, "", seconds)
    metrics.discovery_count(7)  # a state gauge (kept per process)
    metrics.connections_active = connections
    return metrics


def exposition(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def scrape(collector: ChildrenCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


ROUTE = (("method", "POST"), ("path", "/v1/completions"))
COUNT = ("smg_http_request_duration_seconds_count", ROUTE)


def test_counters_and_histograms_are_summed_bucket_by_bucket_in_flight_gauges_too() -> None:
    first, second = child([0.005, 0.05], connections=2), child([0.5, 5.0, 0.005], connections=3)
    merged = merge_expositions(
        [(str(i), parse_exposition(exposition(m))) for i, m in enumerate((first, second))]
    )
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in merged for s in f.samples
    }
    status = (("method", "POST"), ("path", "/v1/completions"), ("status", "2xx"))
    assert samples[("smg_http_requests_total", status)] == 5
    buckets = {
        le: samples[("smg_http_request_duration_seconds_bucket", (("le", le), *ROUTE))]
        for le in ("0.01", "0.1", "1.0", "+Inf")
    }
    assert buckets == {"0.01": 2, "0.1": 3, "1.0": 4, "+Inf": 5}  # cumulative, summed
    assert samples[("smg_http_request_duration_seconds_count", ROUTE)] == 5
    assert samples[("smg_http_request_duration_seconds_sum", ROUTE)] == pytest.approx(5.56)
    assert samples[("smg_http_connections_active", ())] == 5
    discovered = "smg_discovery_workers_discovered"
    assert samples[(discovered, (("process", "0"),))] == 7  # a state: per process, not summed
    assert samples[(discovered, (("process", "1"),))] == 7
    assert (discovered, ()) not in samples


def test_the_merged_exposition_is_read_from_each_child_over_its_unix_socket(
    tmp_path: Path,
) -> None:
    children = [child([0.005]), child([0.05, 0.05])]
    paths = [str(tmp_path / f"{i}.sock") for i in range(2)]
    sockets = [
        ControlSocket(path, {METRICS: (metrics.exposition, True)})
        for metrics, path in zip(children, paths, strict=True)
    ]

    async def scrapes() -> list[float]:
        for control in sockets:
            control.start()
        collector = ChildrenCollector(2, lambda i: fetch_exposition(paths[i]))
        counts = []
        try:
            # The supervisor scrapes in its exporter's thread, as here.
            counts.append((await asyncio.to_thread(scrape, collector))[COUNT])
            children[0].observe_http("POST", "/v1/completions", 200, "", 0.2)
            counts.append((await asyncio.to_thread(scrape, collector))[COUNT])
        finally:
            for control in sockets:
                await control.close()
        return counts

    assert asyncio.run(scrapes()) == [3, 4]


def test_a_malformed_exposition_is_skipped_with_a_log_line_and_the_rest_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    texts = {0: exposition(child([0.005, 0.005])), 1: "smg_http_requests_total{ 3\n"}
    collector = ChildrenCollector(2, texts.__getitem__)
    with caplog.at_level(logging.WARNING, "shunter.metrics"):
        samples = scrape(collector)
    assert samples[("smg_http_request_duration_seconds_count", ROUTE)] == 2
    assert [(r.getMessage(), r.index) for r in caplog.records] == [  # type: ignore[attr-defined]
        ("a gateway process's metrics did not parse; skipped for this scrape", 1)
    ]


def test_counters_never_go_down_while_a_child_is_unreadable_or_after_it_crashed() -> None:
    texts: dict[int, str] = {0: exposition(child([0.005])), 1: exposition(child([0.05] * 3))}

    def fetch(index: int) -> str:
        if index not in texts:
            raise ConnectionRefusedError("restarting")
        return texts[index]

    collector = ChildrenCollector(2, fetch)
    count = ("smg_http_request_duration_seconds_count", ROUTE)
    active = ("smg_http_connections_active", ())
    assert scrape(collector)[count] == 4
    del texts[1]  # it crashed: unreadable until its successor listens
    assert scrape(collector)[count] == 4  # its last counts stand in
    collector.retire(1)  # the supervisor starts its successor
    texts[1] = exposition(child([0.5], connections=1))  # which counts from zero
    samples = scrape(collector)
    assert samples[count] == 5  # 1 + the dead one's 3 + the new one's 1
    assert samples[active] == 1  # only the live processes' in-flight count


def test_a_scrape_racing_a_retire_does_not_count_the_dead_child_twice() -> None:
    texts = {0: exposition(child([0.005] * 2))}
    collector: ChildrenCollector

    def fetch(index: int) -> str:
        collector.retire(0)  # the child died and was replaced while we read it
        return texts[index]

    collector = ChildrenCollector(1, lambda i: texts[i])
    scrape(collector)  # its counts are known: 2
    collector.fetch = fetch
    count = ("smg_http_request_duration_seconds_count", ROUTE)
    assert scrape(collector)[count] == 2  # carried once, the stale read not stored again
    collector.fetch = lambda i: exposition(child([]))  # the successor, fresh
    assert scrape(collector)[count] == 2
