"""A worker's run-time state: requests in flight, health, circuit breaker, reported load.

One ``WorkerRuntime`` lives as long as the worker is registered, whatever happens to its
identity: ``PUT /workers/{url}`` builds a new frozen ``Worker`` around the *same* runtime, so
requests that started before the update and end after it count down the same in-flight
number that new requests count up. (Copying the counters into a new object instead left a
worker updated under load with a phantom in-flight count for good, and every load-aware
policy avoided it.)

Only this class's methods change its fields; everything else reads them. The event loop is
the only writer, so plain attributes need no lock. ``available`` is kept up to date by the
methods that change health or exclusion, so the hot path (every policy, on every request)
reads one attribute instead of combining two.
"""

from __future__ import annotations

from dataclasses import dataclass

from shunter.fleet.breaker import CircuitBreaker


@dataclass(frozen=True)
class HealthConfig:
    """How a worker's health is checked: the ``--health-*`` flags, or a worker's own
    settings from ``POST``/``PUT /workers``."""

    interval_secs: float = 60.0
    timeout_secs: float = 5.0
    endpoint: str = "/health"
    failure_threshold: int = 3  # consecutive failed checks that mark it unhealthy
    success_threshold: int = 2  # consecutive passed checks that mark it healthy again

    def validate(self) -> HealthConfig:
        if self.interval_secs <= 0 or self.timeout_secs <= 0:
            raise ValueError(
                "--health-check-interval-secs and --health-check-timeout-secs must be > 0"
            )
        if self.failure_threshold < 1 or self.success_threshold < 1:
            raise ValueError(
                "--health-failure-threshold and --health-success-threshold must be >= 1"
            )
        if not self.endpoint.startswith("/"):
            raise ValueError("--health-check-endpoint must start with '/'")
        return self


class WorkerRuntime:
    __slots__ = (
        "available",
        "breaker",
        "cache_hit_rate",
        "errors",
        "excluded",
        "health_failures",
        "health_successes",
        "healthy",
        "in_flight",
        "processed",
        "removed",
        "reported_load",
        "reserved",
    )

    def __init__(self, breaker: CircuitBreaker | None = None) -> None:
        self.in_flight = 0
        self.processed = 0
        self.errors = 0  # 5xx answers and failed connections
        self.healthy = False  # until registration finds the worker ready
        self.removed = False  # out of the registry: its requests in flight are finishing
        self.health_failures = 0  # consecutive failed checks
        self.health_successes = 0  # consecutive passed checks
        self.breaker = breaker
        self.excluded = False  # kept out by its breaker right now (fleet/ejection.py)
        self.available = False  # healthy and not excluded: what policies read
        self.reported_load: int | None = None  # the worker's own report; None: unknown
        self.cache_hit_rate: float | None = None  # its prefix-cache hit rate, if it reports one
        self.reserved = 0  # of in_flight: other gateways' requests just sent here (peers/)

    # --- requests ------------------------------------------------------------------------

    def started(self) -> None:
        self.in_flight += 1

    def finished(self) -> None:
        self.in_flight -= 1
        self.processed += 1

    def reserve(self) -> None:
        """Another gateway just sent this worker a request: count it in ``in_flight`` (which
        every load-aware policy reads) until ``unreserve``, so a burst spread over gateways
        does not herd onto the worker each of them sees as idle."""
        self.in_flight += 1
        self.reserved += 1

    def unreserve(self) -> None:
        self.in_flight -= 1
        self.reserved -= 1

    def failed(self) -> None:
        """A 5xx answer or a failed connection (the dashboard's error rate)."""
        self.errors += 1

    # --- health and exclusion ------------------------------------------------------------

    def ready(self) -> None:
        """Registration found the worker answering: it may take requests."""
        self._set_healthy(True)

    def retired(self) -> None:
        """Removed from the registry: requests still holding it must not pick it again."""
        self.removed = True
        self._set_healthy(False)

    def checked(self, ok: bool, settings: HealthConfig) -> bool:
        """Count one health check; True when it flipped the worker's health."""
        if ok:
            self.health_failures = 0
            self.health_successes += 1
            if not self.healthy and self.health_successes >= settings.success_threshold:
                self.health_successes = 0
                self._set_healthy(True)
                return True
            return False
        self.health_successes = 0
        self.health_failures += 1
        if self.healthy and self.health_failures >= settings.failure_threshold:
            self.health_failures = 0
            self._set_healthy(False)
            return True
        return False

    def exclude(self, excluded: bool) -> None:
        """Whether the worker's breaker keeps it out (decided by ``fleet/ejection.py``)."""
        self.excluded = excluded
        self.available = self.healthy and not excluded

    def _set_healthy(self, healthy: bool) -> None:
        self.healthy = healthy
        self.available = healthy and not self.excluded

    # --- reports -------------------------------------------------------------------------

    def reported(self, load: int | None, cache_hit_rate: float | None) -> None:
        """The worker's own load report (None: it could not be read, so unknown)."""
        self.reported_load = load
        self.cache_hit_rate = cache_hit_rate
