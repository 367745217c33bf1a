"""A worker: one inference server (or one DP rank of it) the gateway can route to."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shunter.aio.once import OnceCell
from shunter.fleet.breaker import CircuitBreaker
from shunter.transport.base import UpstreamClient

if TYPE_CHECKING:  # the gRPC client needs grpcio, which only gRPC workers use
    from shunter.transport.scheduler import SchedulerClient


class WorkerType(enum.Enum):
    REGULAR = "regular"
    PREFILL = "prefill"
    DECODE = "decode"


class ConnectionMode(enum.Enum):
    HTTP = "HTTP"
    GRPC = "gRPC"


class Runtime(enum.Enum):
    SGLANG = "sglang"
    VLLM = "vllm"
    LLAMACPP = "llamacpp"
    OPENAI = "openai"  # any other OpenAI-compatible server

    @property
    def speaks_sglang(self) -> bool:
        """Whether the worker serves SGLang's native endpoints (/generate, /get_load…)."""
        return self is Runtime.SGLANG


DEFAULT_PRIORITY = 50
DEFAULT_COST = 1.0


@dataclass(eq=False)
class Worker:
    """A routing target. Identity is the object; the registry keys it by ``url``.

    ``url`` is the registry key: for a DP-aware rank it is ``base_url@rank``, while
    requests go to ``base_url`` with ``data_parallel_rank`` in the body.
    """

    url: str
    models: tuple[str, ...] = ()
    worker_type: WorkerType = WorkerType.REGULAR
    bootstrap_port: int | None = None
    connection_mode: ConnectionMode = ConnectionMode.HTTP
    runtime: Runtime = Runtime.SGLANG
    labels: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None
    dp_rank: int | None = None
    dp_size: int | None = None
    base_url: str = ""
    # Run-time state. Plain attributes: the event loop is the only writer on the hot path.
    healthy: bool = False
    in_flight: int = 0
    processed: int = 0
    reported_load: int | None = None  # the worker's own load report; None: unknown
    cache_hit_rate: float | None = None  # the worker's prefix-cache hit rate, if it reports one
    errors: int = 0  # 5xx answers and failed connections
    health_failures: int = 0  # consecutive failed health checks
    health_successes: int = 0  # consecutive passed health checks
    breaker: CircuitBreaker | None = None
    # Whether the breaker keeps the worker out right now: its breaker is open and its model
    # is not in panic (core/ejection.py keeps it right, so is_available is attribute reads).
    breaker_open: bool = False
    client_cell: OnceCell[UpstreamClient] | None = None  # HTTP workers
    scheduler_cell: OnceCell[SchedulerClient] | None = None  # gRPC workers

    def __post_init__(self) -> None:
        if not self.base_url:
            self.base_url = self.url.split("@", 1)[0] if self.dp_rank is not None else self.url

    def attach_client_factory(
        self,
        factory: Callable[[], Awaitable[UpstreamClient]],
        closer: Callable[[UpstreamClient], Awaitable[None]] | None = None,
    ) -> None:
        self.client_cell = OnceCell(factory, closer)

    @property
    def model_id(self) -> str:
        if self.models:
            return self.models[0]
        return self.labels.get("model_id", "unknown")

    @property
    def model_ids(self) -> tuple[str, ...]:
        """Every model the worker serves (the registry indexes it under each)."""
        return self.models or (self.model_id,)

    @property
    def priority(self) -> int:
        try:
            return int(self.labels.get("priority", DEFAULT_PRIORITY))
        except ValueError:
            return DEFAULT_PRIORITY

    @property
    def cost(self) -> float:
        try:
            return float(self.labels.get("cost", DEFAULT_COST))
        except ValueError:
            return DEFAULT_COST

    def auth_headers(self) -> list[tuple[str, str]]:
        """The header that carries the worker's API key, if it has one."""
        return [("authorization", f"Bearer {self.api_key}")] if self.api_key else []

    @property
    def is_available(self) -> bool:
        return self.healthy and not self.breaker_open

    def to_info(self) -> dict[str, Any]:
        """The worker's JSON as smg's ``WorkerInfo``."""
        info: dict[str, Any] = {
            "id": self.url,
            "url": self.url,
            "model_id": self.model_id,
            "models": list(self.models),
            "priority": self.priority,
            "cost": self.cost,
            "worker_type": self.worker_type.value,
            "is_healthy": self.healthy,
            "load": self.in_flight,
            "processed": self.processed,
            "connection_mode": self.connection_mode.value,
            "runtime_type": self.runtime.value,
            "circuit_state": self.breaker.state.label if self.breaker else "closed",
            "errors": self.errors,
            "cache_hit_rate": self.cache_hit_rate,
        }
        if self.bootstrap_port is not None:
            info["bootstrap_port"] = self.bootstrap_port
        if self.dp_rank is not None:
            info["dp_rank"] = self.dp_rank
            info["dp_size"] = self.dp_size
        if self.labels:
            info["metadata"] = dict(self.labels)
        return info
