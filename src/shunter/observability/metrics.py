"""Prometheus metrics with smg's names and labels, for the layers that exist.

The hot path only bumps plain Python numbers in dicts (tens of nanoseconds, no lock: the
event loop is their only writer). A prometheus-client ``Collector`` turns them into metric
families when Prometheus scrapes, and reads gauges that already exist elsewhere (a worker's
in-flight count, the registry's size) at that moment instead of keeping copies in step.
Measured against prometheus-client's own labelled metrics in ``bench/metrics_bench.py``.

Each gateway owns its own ``CollectorRegistry`` (tests run several in one process).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from shunter.backends.http.slot_turns import TurnTakingBackend
from shunter.fleet.worker import Worker
from shunter.observability.exporter import Exporter
from shunter.observability.streams import StreamStats

log = logging.getLogger("shunter.metrics")

# smg's default duration buckets: 1 ms to 240 s, 20 buckets.
DEFAULT_DURATION_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
    30.0,
    45.0,
    60.0,
    90.0,
    120.0,
    180.0,
    240.0,
)

# ``shunter_routing_precision``: per answer, how far the policy's predicted cached tokens
# were from those the worker reported, in tokens, by ``direction``: ``over`` (it predicted
# more than the worker held: a stale view, an eviction it missed, or a race with a prefill),
# ``under`` (the worker held more: another gateway's traffic, a longer shared prefix than it
# knew), ``exact``. A size, not a signed value, so the histogram keeps its _sum and _count
# (Prometheus drops both from a histogram with negative buckets): the mean absolute error is
# the _sum over the _count of all directions. Powers of four from a block (16) up.
PRECISION_BUCKETS = (0.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0)


# The KV-event subscribers' figures (kv_events/subscriber.py): metric, field, help.
KV_EVENT_COUNTERS = (
    ("shunter_kv_events_applied", "events", "KV-cache events applied to the block index"),
    ("shunter_kv_events_batches", "batches", "Event batches applied (live and replayed)"),
    ("shunter_kv_events_gaps", "gaps", "Gaps in the batch sequence numbers"),
    ("shunter_kv_events_replays", "replays", "Replays asked of the worker to fill a gap"),
    ("shunter_kv_events_replay_failures", "replay_failures", "Replays that failed"),
    ("shunter_kv_events_resyncs", "resyncs", "Times the worker's blocks were dropped"),
    ("shunter_kv_events_malformed", "malformed", "Messages that were no event batch"),
    ("shunter_kv_events_skipped", "skipped_events", "Malformed events inside good batches"),
    ("shunter_kv_events_publisher_restarts", "restarts", "Publisher restarts seen"),
)
KV_EVENT_GAUGES = (
    ("shunter_kv_events_blocks", "blocks", "Blocks the index holds for the worker"),
    ("shunter_kv_events_connected", "connected", "1 while connected to the worker's events"),
)


class HistogramCell:
    """One label set's histogram: per-bucket counts (not cumulative), sum."""

    __slots__ = ("buckets", "count", "total")

    def __init__(self, size: int) -> None:
        self.buckets = [0] * (size + 1)  # the last one is +Inf
        self.count = 0
        self.total = 0.0


class Metrics:
    def __init__(
        self,
        workers: Callable[[], Sequence[Worker]] = tuple,
        duration_buckets: Sequence[float] = DEFAULT_DURATION_BUCKETS,
    ) -> None:
        self.workers = workers
        self.bounds = tuple(duration_buckets)
        self.connections_active = 0
        # method, path, status, error code: both the requests' and the responses' families
        self.http: dict[tuple[str, str, int, str], HistogramCell] = {}
        # backend type (regular, pd), worker type, mode, model, endpoint, stream, policy: both
        # the routed requests' and the worker selections' families
        self.routed: dict[tuple[str, str, str, str, str, bool, str], int] = {}
        # selections not routed to (a prefill/decode pair's prefill): type, mode, model, policy
        self.selected: dict[tuple[str, str, str, str], int] = {}
        self.worker_errors: dict[tuple[str, str, str], int] = {}
        self.retries: dict[tuple[str, str], int] = {}  # worker type, endpoint
        self.exhausted: dict[tuple[str, str], int] = {}
        self.cb_transitions: dict[tuple[str, str, str], int] = {}  # worker, from, to
        # (model, worker type) pools whose breakers are ignored (fleet/ejection.py)
        self.cb_panic: set[tuple[str, str]] = set()
        self.health_checks: dict[tuple[str, str], int] = {}  # worker type, result
        self.rate_limit: dict[str, int] = {}  # result
        self.ttft: dict[tuple[str, str], HistogramCell] = {}  # model, endpoint
        self.tpot: dict[tuple[str, str], HistogramCell] = {}
        self.generation: dict[tuple[str, str], HistogramCell] = {}
        self.tokens: dict[tuple[str, str, str], int] = {}  # model, endpoint, token type
        self.router_duration: dict[tuple[str, str], HistogramCell] = {}  # model, endpoint
        self.router_errors: dict[tuple[str, str, str], int] = {}  # model, endpoint, error type
        self.upstream: dict[tuple[int, str], int] = {}  # status code, error code
        self.backoff: dict[tuple[str], HistogramCell] = {}  # attempt
        # Prefill/decode pairs (routing/pd/): dispatched pairs, the time from dispatch to
        # the decode's first chunk (a whole answer: to the answer), the prefill's duration,
        # and pairs that failed before the client got anything, by leg and reason.
        self.pd_requests: dict[tuple[str, str], int] = {}  # model, endpoint
        self.pd_ttft: dict[tuple[str, str], HistogramCell] = {}  # model, endpoint
        self.pd_prefill: dict[tuple[str], HistogramCell] = {}  # model
        self.pd_failures: dict[tuple[str, str, str], int] = {}  # model, leg, reason
        # Kubernetes service discovery (discovery/): registrations by result, removals by
        # reason, the workers the pods say there should be, and each pass's duration.
        self.discovery_registrations: dict[tuple[str, str], int] = {}  # source, result
        self.discovery_deregistrations: dict[tuple[str], int] = {}  # reason
        self.discovery_discovered = 0
        self.discovery_sync: dict[tuple[()], HistogramCell] = {}
        self.precision: dict[tuple[str, str, str], HistogramCell] = {}  # model, policy, direction
        # KV-cache event subscribers (kv_events/): per worker URL, its counters, "blocks"
        # and "connected", read at scrape time from the hub (set by the composition root).
        self.kv_events: Callable[[], Mapping[str, Mapping[str, int]]] = dict
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Collector(self))
        self._exporter: Exporter | None = None

    # --- hot path ---------------------------------------------------------------------------
    # A whole proxied request records four things (observe_route, upstream_answer,
    # routed_request, observe_http). Each is one table entry, keyed by every label of the
    # families it feeds, which the scrape sums down to each family's labels: one tuple and
    # two dict look-ups per record, no label turned into text, no second table or call
    # (callgrind, in process, the four and the connection count: 20.8k -> 15.5k instructions).

    def observe_http(
        self, method: str, path: str, status: int, error_code: str, seconds: float
    ) -> None:
        key = (method, path, status, error_code)
        cell = self.http.get(key)
        if cell is None:
            cell = self.http[key] = HistogramCell(len(self.bounds))
        cell.count += 1
        cell.total += seconds
        cell.buckets[bisect.bisect_left(self.bounds, seconds)] += 1

    def observe_route(
        self,
        worker: Worker,
        model: str,
        endpoint: str,
        streaming: bool,
        policy: str,
        backend_type: str = "regular",
    ) -> None:
        """A request routed to ``worker``, which ``policy`` selected."""
        key = (backend_type, *worker.kind, model, endpoint, streaming, policy)
        self.routed[key] = self.routed.get(key, 0) + 1

    def observe_selection(self, worker: Worker, model: str, policy: str) -> None:
        """``worker`` selected by ``policy`` but not routed to (a pair's prefill)."""
        chosen = (*worker.kind, model, policy)
        self.selected[chosen] = self.selected.get(chosen, 0) + 1

    def pd_dispatched(self, model: str, endpoint: str) -> None:
        key = (model, endpoint)
        self.pd_requests[key] = self.pd_requests.get(key, 0) + 1

    def pd_first_token(self, model: str, endpoint: str, seconds: float) -> None:
        self._observe(self.pd_ttft, (model, endpoint), seconds)

    def pd_prefilled(self, model: str, seconds: float) -> None:
        self._observe(self.pd_prefill, (model,), seconds)

    def pd_failed(self, model: str, leg: str, reason: str) -> None:
        key = (model, leg, reason)
        self.pd_failures[key] = self.pd_failures.get(key, 0) + 1

    def worker_error(self, worker: Worker, error_type: str) -> None:
        key = (*worker.kind, error_type)
        self.worker_errors[key] = self.worker_errors.get(key, 0) + 1

    def _observe(self, table: dict[Any, HistogramCell], key: Any, seconds: float) -> None:
        cell = table.get(key)
        if cell is None:
            cell = table[key] = HistogramCell(len(self.bounds))
        cell.count += 1
        cell.total += seconds
        cell.buckets[bisect.bisect_left(self.bounds, seconds)] += 1

    def observe_stream(self, model: str, endpoint: str, stats: StreamStats) -> None:
        """Time to first token, generation time, per-token time and tokens of a stream."""
        if stats.first is None:
            return
        key = (model, endpoint)
        end = time.perf_counter()
        self._observe(self.ttft, key, stats.first - stats.started)
        self._observe(self.generation, key, end - stats.started)
        counts = stats.tokens()
        if counts is None:
            return
        prompt, completion = counts
        for kind, count in (("input", prompt), ("output", completion)):
            token_key = (model, endpoint, kind)
            self.tokens[token_key] = self.tokens.get(token_key, 0) + count
        if completion > 1:
            self._observe(self.tpot, key, (end - stats.first) / (completion - 1))

    def routing_precision(self, model: str, policy: str, actual: int, predicted: int) -> None:
        """One answer's cached tokens against the prediction (``PRECISION_BUCKETS``)."""
        error = actual - predicted
        direction = "exact" if not error else "under" if error > 0 else "over"
        size = abs(error)
        key = (model, policy, direction)
        cell = self.precision.get(key)
        if cell is None:
            cell = self.precision[key] = HistogramCell(len(PRECISION_BUCKETS))
        cell.count += 1
        cell.total += size
        cell.buckets[bisect.bisect_left(PRECISION_BUCKETS, size)] += 1

    def routed_request(
        self, model: str, endpoint: str, seconds: float, status: int, error_code: str
    ) -> None:
        """One routed request, end to end (all its attempts)."""
        key = (model, endpoint)
        cell = self.router_duration.get(key)
        if cell is None:
            cell = self.router_duration[key] = HistogramCell(len(self.bounds))
        cell.count += 1
        cell.total += seconds
        cell.buckets[bisect.bisect_left(self.bounds, seconds)] += 1
        if status >= 400:
            error = (model, endpoint, error_code or f"status_{status}")
            self.router_errors[error] = self.router_errors.get(error, 0) + 1

    def upstream_answer(self, status: int, error_code: str = "") -> None:
        key = (status, error_code)
        self.upstream[key] = self.upstream.get(key, 0) + 1

    def retry_backoff(self, attempt: int, seconds: float) -> None:
        self._observe(self.backoff, (str(attempt),), seconds)

    def retried(self, worker: Worker, endpoint: str) -> None:
        key = (worker.kind[0], endpoint)
        self.retries[key] = self.retries.get(key, 0) + 1

    def retries_exhausted(self, worker: Worker, endpoint: str) -> None:
        key = (worker.kind[0], endpoint)
        self.exhausted[key] = self.exhausted.get(key, 0) + 1

    def discovery_registered(self, success: bool) -> None:
        key = ("kubernetes", "success" if success else "failure")
        self.discovery_registrations[key] = self.discovery_registrations.get(key, 0) + 1

    def discovery_deregistered(self, reason: str) -> None:
        key = (reason,)
        self.discovery_deregistrations[key] = self.discovery_deregistrations.get(key, 0) + 1

    def discovery_count(self, workers: int) -> None:
        self.discovery_discovered = workers

    def discovery_synced(self, seconds: float) -> None:
        self._observe(self.discovery_sync, (), seconds)

    def breaker_moved(self, url: str, old: str, new: str) -> None:
        key = (url, old, new)
        self.cb_transitions[key] = self.cb_transitions.get(key, 0) + 1

    def breaker_panic(self, model: str, worker_type: str, panic: bool) -> None:
        if panic:
            self.cb_panic.add((model, worker_type))
        else:
            self.cb_panic.discard((model, worker_type))

    def health_checked(self, worker: Worker, ok: bool) -> None:
        key = (worker.worker_type.value, "success" if ok else "failure")
        self.health_checks[key] = self.health_checks.get(key, 0) + 1

    def admission(self, result: str) -> None:
        self.rate_limit[result] = self.rate_limit.get(result, 0) + 1

    # --- exposition ------------------------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port in a background thread; returns the bound port."""
        self._exporter = Exporter(host, port, self.registry)
        bound = self._exporter.port
        log.info("metrics listening", extra={"host": host, "port": bound})
        return bound

    def exposition(self) -> bytes:
        """The text exposition, as a scrape gets it (a ``--workers`` child hands it to its
        supervisor, which serves the merged ``/metrics``: observability/merged.py)."""
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        if self._exporter is not None:
            self._exporter.close()
            self._exporter = None


class _Collector:
    """Builds metric families from ``Metrics`` at scrape time (in the exporter's thread).

    ``dict.copy()`` is atomic under the GIL, so a scrape sees each table whole.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._http()
        yield from self._router()
        yield from self._workers()
        yield from self._kv_events()

    def _http(self) -> Iterator[Metric]:
        m = self.m
        http = m.http.copy()
        requests = CounterMetricFamily(
            "smg_http_requests",
            "HTTP requests by route and status class",
            labels=["method", "path", "status"],
        )
        by_class: dict[tuple[str, str, str], int] = {}
        by_route: dict[tuple[str, str], HistogramCell] = {}
        by_code: dict[tuple[int, str], int] = {}
        for (method, path, status, error_code), cell in http.items():
            key = (method, path, f"{status // 100}xx")
            by_class[key] = by_class.get(key, 0) + cell.count
            merged = by_route.setdefault((method, path), HistogramCell(len(m.bounds)))
            merged.count += cell.count
            merged.total += cell.total
            merged.buckets = [a + b for a, b in zip(merged.buckets, cell.buckets, strict=True)]
            answer = (status, error_code)
            by_code[answer] = by_code.get(answer, 0) + cell.count
        for labels, count in by_class.items():
            requests.add_metric(list(labels), count)
        yield requests
        yield _histogram(
            "smg_http_request_duration_seconds",
            "HTTP request duration",
            ["method", "path"],
            by_route,
            m.bounds,
        )
        responses = CounterMetricFamily(
            "smg_http_responses",
            "HTTP responses by status code and gateway error code",
            labels=["status_code", "error_code"],
        )
        for (status, error_code), count in by_code.items():
            responses.add_metric([str(status), error_code], count)
        yield responses
        active = GaugeMetricFamily("smg_http_connections_active", "Requests being served")
        active.add_metric([], m.connections_active)
        yield active

    def _router(self) -> Iterator[Metric]:
        m = self.m
        routed = CounterMetricFamily(
            "smg_router_requests",
            "Requests routed to workers",
            labels=[
                "router_type",
                "backend_type",
                "connection_mode",
                "model",
                "endpoint",
                "streaming",
            ],
        )
        by_route: dict[tuple[str, str, str, str, bool], int] = {}
        by_selection = m.selected.copy()
        for key, count in m.routed.copy().items():
            backend, kind, mode, model, endpoint, stream, policy = key
            route = (backend, mode, model, endpoint, stream)
            by_route[route] = by_route.get(route, 0) + count
            chosen = (kind, mode, model, policy)
            by_selection[chosen] = by_selection.get(chosen, 0) + count
        for (backend, mode, model, endpoint, stream), count in by_route.items():
            streaming = "true" if stream else "false"
            routed.add_metric(["http", backend, mode, model, endpoint, streaming], count)
        yield routed
        yield from self._pd()
        yield from self._discovery()
        selected = CounterMetricFamily(
            "smg_worker_selection",
            "Worker selections by policy",
            labels=["worker_type", "connection_mode", "model", "policy"],
        )
        for labels, count in by_selection.items():
            selected.add_metric(list(labels), count)
        yield selected
        errors = CounterMetricFamily(
            "smg_worker_errors",
            "Errors talking to workers",
            labels=["worker_type", "connection_mode", "error_type"],
        )
        for error_labels, count in m.worker_errors.copy().items():
            errors.add_metric(list(error_labels), count)
        yield errors
        route_labels = ["router_type", "backend_type", "model", "endpoint"]
        for name, doc, table in (
            ("smg_router_ttft_seconds", "Time to the first streamed chunk", m.ttft),
            ("smg_router_tpot_seconds", "Time per output token of streams", m.tpot),
            ("smg_router_generation_duration_seconds", "Duration of streams", m.generation),
        ):
            cells = {("http", "regular", *key): cell for key, cell in table.copy().items()}
            yield _histogram(name, doc, route_labels, cells, m.bounds)
        durations = {
            ("http", "regular", "HTTP", *key): cell
            for key, cell in m.router_duration.copy().items()
        }
        yield _histogram(
            "smg_router_request_duration_seconds",
            "Routed requests, end to end",
            ["router_type", "backend_type", "connection_mode", "model", "endpoint"],
            durations,
            m.bounds,
        )
        yield _counter(
            "smg_router_request_errors",
            "Routed requests that failed",
            ["router_type", "backend_type", "connection_mode", "model", "endpoint", "error_type"],
            {("http", "regular", "HTTP", *k): v for k, v in m.router_errors.copy().items()},
        )
        yield _counter(
            "smg_router_upstream_responses",
            "Answers from workers, per attempt",
            ["router_type", "status_code", "error_code"],
            {("http", str(status), code): v for (status, code), v in m.upstream.copy().items()},
        )
        yield _histogram(
            "smg_worker_retry_backoff_seconds",
            "Backoff before a retry",
            ["attempt"],
            m.backoff.copy(),
            m.bounds,
        )
        yield _histogram(
            "shunter_routing_precision",
            "Distance in tokens between the cached tokens a worker reported and the policy's "
            "prediction; direction over: predicted more, under: less",
            ["model", "policy", "direction"],
            m.precision.copy(),
            PRECISION_BUCKETS,
        )
        tokens = {("http", "regular", *key): count for key, count in m.tokens.copy().items()}
        yield _counter(
            "smg_router_tokens",
            "Tokens of streamed responses, as workers report them",
            [*route_labels, "token_type"],
            tokens,
        )
        yield _counter(
            "smg_worker_retries", "Retried attempts", ["worker_type", "endpoint"], m.retries
        )
        yield _counter(
            "smg_worker_retries_exhausted",
            "Requests whose last attempt failed",
            ["worker_type", "endpoint"],
            m.exhausted,
        )
        yield _counter(
            "smg_worker_health_checks",
            "Health checks by result",
            ["worker_type", "result"],
            m.health_checks,
        )
        yield _counter(
            "smg_http_rate_limit",
            "Admission decisions",
            ["result"],
            {(k,): v for k, v in m.rate_limit.copy().items()},
        )

    def _pd(self) -> Iterator[Metric]:
        m = self.m
        yield _counter(
            "smg_pd_requests",
            "Requests dispatched to a prefill/decode pair",
            ["model", "endpoint"],
            m.pd_requests,
        )
        yield _histogram(
            "smg_pd_ttft_seconds",
            "From dispatch to the decode worker's first chunk (a whole answer: the answer)",
            ["model", "endpoint"],
            m.pd_ttft.copy(),
            m.bounds,
        )
        yield _histogram(
            "smg_pd_prefill_duration_seconds",
            "From dispatch to the prefill worker's whole answer",
            ["model"],
            m.pd_prefill.copy(),
            m.bounds,
        )
        yield _counter(
            "smg_pd_bootstrap_failures",
            "Pairs that failed before the client got an answer, by leg and reason",
            ["model", "leg", "reason"],
            m.pd_failures,
        )

    def _discovery(self) -> Iterator[Metric]:
        m = self.m
        yield _counter(
            "smg_discovery_registrations",
            "Registrations of discovered workers, by result",
            ["source", "result"],
            m.discovery_registrations,
        )
        yield _counter(
            "smg_discovery_deregistrations",
            "Discovered workers removed, by reason",
            ["reason"],
            m.discovery_deregistrations,
        )
        discovered = GaugeMetricFamily(
            "smg_discovery_workers_discovered", "Workers the selected pods say there should be"
        )
        discovered.add_metric([], m.discovery_discovered)
        yield discovered
        yield _histogram(
            "smg_discovery_sync_duration_seconds",
            "Duration of a reconcile pass",
            [],
            m.discovery_sync.copy(),
            m.bounds,
        )

    def _workers(self) -> Iterator[Metric]:
        workers = self.m.workers()
        active = GaugeMetricFamily(
            "smg_worker_requests_active", "In-flight requests per worker", labels=["worker"]
        )
        pool = GaugeMetricFamily(
            "smg_worker_pool_size",
            "Registered workers",
            labels=["worker_type", "connection_mode", "model"],
        )
        sizes: dict[tuple[str, str, str], int] = {}
        for worker in workers:
            active.add_metric([worker.url], worker.in_flight)
            key = (worker.worker_type.value, worker.connection_mode.value, worker.model_id)
            sizes[key] = sizes.get(key, 0) + 1
        for labels, count in sizes.items():
            pool.add_metric(list(labels), count)
        connections = GaugeMetricFamily(
            "smg_worker_connections_active",
            "Requests in flight by worker type",
            labels=["worker_type", "connection_mode"],
        )
        by_kind: dict[tuple[str, str], int] = {}
        for worker in workers:
            kind = (worker.worker_type.value, worker.connection_mode.value)
            by_kind[kind] = by_kind.get(kind, 0) + worker.in_flight
        for (kind_label, mode_label), count in by_kind.items():
            connections.add_metric([kind_label, mode_label], count)
        yield active
        yield pool
        yield connections
        yield self._slot_waits(workers)
        yield from self._breakers(workers)

    @staticmethod
    def _slot_waits(workers: Sequence[Worker]) -> Metric:
        """llama.cpp workers' slot turns (--slot-wait-secs): requests that waited for their
        prompt's busy slot, and those of them that went anyway when the wait ran out."""
        family = CounterMetricFamily(
            "shunter_slot_waits",
            "Requests that waited for their prompt's busy llama.cpp slot, by outcome",
            labels=["worker", "outcome"],
        )
        seen: set[int] = set()  # a DP-aware worker's ranks share one backend
        for worker in workers:
            backend = worker.backend
            if not isinstance(backend, TurnTakingBackend) or id(backend) in seen:
                continue
            seen.add(id(backend))
            turns = backend.turns
            family.add_metric([worker.base_url, "turn"], turns.waits - turns.timeouts)
            family.add_metric([worker.base_url, "timeout"], turns.timeouts)
        return family

    def _kv_events(self) -> Iterator[Metric]:
        """One series per worker whose KV events the gateway follows."""
        subscribers = self.m.kv_events()
        for name, field, documentation in KV_EVENT_COUNTERS:
            family = CounterMetricFamily(name, documentation, labels=["worker"])
            for url, counts in subscribers.items():
                family.add_metric([url], counts.get(field, 0))
            yield family
        for name, field, documentation in KV_EVENT_GAUGES:
            gauge = GaugeMetricFamily(name, documentation, labels=["worker"])
            for url, counts in subscribers.items():
                gauge.add_metric([url], counts.get(field, 0))
            yield gauge

    def _breakers(self, workers: Sequence[Worker]) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "smg_worker_cb_state",
            "Circuit state (0 closed, 1 open, 2 half-open)",
            labels=["worker"],
        )
        failures = GaugeMetricFamily(
            "smg_worker_cb_consecutive_failures", "Consecutive failures", labels=["worker"]
        )
        successes = GaugeMetricFamily(
            "smg_worker_cb_consecutive_successes", "Consecutive successes", labels=["worker"]
        )
        outcomes = CounterMetricFamily(
            "smg_worker_cb_outcomes", "Outcomes fed to the breaker", labels=["worker", "outcome"]
        )
        panic = GaugeMetricFamily(
            "shunter_breaker_panic",
            "1 while a pool's breakers are ignored: too few of its healthy workers left in",
            labels=["model", "worker_type"],
        )
        panicking = self.m.cb_panic.copy()
        pools = {(m, w.worker_type.value) for w in workers for m in w.model_ids}
        for pool in sorted(pools):
            panic.add_metric(list(pool), 1 if pool in panicking else 0)
        for worker in workers:
            breaker = worker.state.breaker
            if breaker is None:
                continue
            state.add_metric([worker.url], breaker.state.value)
            failures.add_metric([worker.url], breaker.consecutive_failures)
            successes.add_metric([worker.url], breaker.consecutive_successes)
            for outcome, count in breaker.outcomes.items():
                outcomes.add_metric([worker.url, outcome], count)
        yield from (state, failures, successes, outcomes, panic)
        yield _counter(
            "smg_worker_cb_transitions",
            "Circuit state changes",
            ["worker", "from", "to"],
            self.m.cb_transitions,
        )


def _histogram(
    name: str,
    documentation: str,
    labels: list[str],
    cells: dict[Any, HistogramCell],
    bounds: Sequence[float],
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for key, cell in cells.items():
        cumulative, running = [], 0
        for bound, count in zip((*map(str, bounds), "+Inf"), cell.buckets, strict=True):
            running += count
            cumulative.append((bound, running))
        family.add_metric(list(key), cumulative, cell.total)
    return family


def _counter(
    name: str, documentation: str, labels: list[str], table: dict[Any, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, count in table.copy().items():
        family.add_metric(list(key), count)
    return family
