"""Prometheus metrics with smg's names and labels (inventory §8.1), for the layers that exist.

Each gateway owns its own ``CollectorRegistry`` (tests run several in one process). Label
children are cached in dicts, so the hot path pays a dict lookup and an increment rather
than prometheus_client's label resolution on every request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

from shunter.core.worker import Worker

log = logging.getLogger("shunter.metrics")

# The *_created series double the exposition for no operational value.
disable_created_metrics()  # type: ignore[no-untyped-call]

# smg's default duration buckets: 1 ms to 240 s, 20 buckets.
DEFAULT_DURATION_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 15.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 240.0,
)  # fmt: skip


class Metrics:
    def __init__(self, duration_buckets: Sequence[float] = DEFAULT_DURATION_BUCKETS) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "smg_http_requests",
            "HTTP requests by route and status class",
            ["method", "path", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "smg_http_request_duration_seconds",
            "HTTP request duration",
            ["method", "path"],
            buckets=duration_buckets,
            registry=r,
        )
        self.http_responses = Counter(
            "smg_http_responses",
            "HTTP responses by status code and gateway error code",
            ["status_code", "error_code"],
            registry=r,
        )
        self.connections_active = Gauge(
            "smg_http_connections_active",
            "Requests being served",
            registry=r,
        )
        self.router_requests = Counter(
            "smg_router_requests",
            "Requests routed to workers",
            ["router_type", "backend_type", "connection_mode", "model", "endpoint", "streaming"],
            registry=r,
        )
        self.worker_active = Gauge(
            "smg_worker_requests_active",
            "In-flight requests per worker",
            ["worker"],
            registry=r,
        )
        self.worker_pool = Gauge(
            "smg_worker_pool_size",
            "Registered workers",
            ["worker_type", "connection_mode", "model"],
            registry=r,
        )
        self.worker_selection = Counter(
            "smg_worker_selection",
            "Worker selections by policy",
            ["worker_type", "connection_mode", "model", "policy"],
            registry=r,
        )
        self.worker_errors = Counter(
            "smg_worker_errors", "Errors talking to workers",
            ["worker_type", "connection_mode", "error_type"], registry=r,
        )  # fmt: skip
        self._http_children: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}
        self._active_children: dict[str, Any] = {}
        self._route_children: dict[tuple[str, str, bool, str], tuple[Any, Any]] = {}
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # --- hot path ---------------------------------------------------------------------------

    def observe_http(
        self, method: str, path: str, status: int, error_code: str, seconds: float
    ) -> None:
        key = (method, path, status)
        children = self._http_children.get(key)
        if children is None:
            children = (
                self.http_requests.labels(method, path, f"{status // 100}xx"),
                self.http_duration.labels(method, path),
                self.http_responses.labels(str(status), error_code),
            )
            if not error_code:
                self._http_children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        children[2].inc()

    def worker_gauge(self, worker: Worker) -> Any:
        gauge = self._active_children.get(worker.url)
        if gauge is None:
            gauge = self._active_children[worker.url] = self.worker_active.labels(worker.url)
        return gauge

    def observe_route(
        self, worker: Worker, model: str, endpoint: str, streaming: bool, policy: str
    ) -> None:
        key = (model, endpoint, streaming, worker.url)
        children = self._route_children.get(key)
        if children is None:
            mode, kind = worker.connection_mode.value, worker.worker_type.value
            children = (
                self.router_requests.labels(
                    "http", "regular", mode, model, endpoint, str(streaming).lower()
                ),
                self.worker_selection.labels(kind, mode, model, policy),
            )
            self._route_children[key] = children
        children[0].inc()
        children[1].inc()

    def worker_error(self, worker: Worker, error_type: str) -> None:
        self.worker_errors.labels(
            worker.worker_type.value, worker.connection_mode.value, error_type
        ).inc()

    # --- fleet changes ------------------------------------------------------------------

    def set_pool(self, workers: Sequence[Worker]) -> None:
        counts: dict[tuple[str, str, str], int] = {}
        for w in workers:
            key = (w.worker_type.value, w.connection_mode.value, w.model_id)
            counts[key] = counts.get(key, 0) + 1
        self.worker_pool.clear()
        for labels, count in counts.items():
            self.worker_pool.labels(*labels).set(count)

    def forget_worker(self, worker: Worker) -> None:
        if self._active_children.pop(worker.url, None) is not None:
            self.worker_active.remove(worker.url)
        self._route_children = {k: v for k, v in self._route_children.items() if k[3] != worker.url}

    # --- exposition ------------------------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port in a background thread; returns the bound port."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound: int = self._server.server_address[1]
        log.info("metrics listening", extra={"host": host, "port": bound})
        return bound

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
