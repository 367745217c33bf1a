"""Settings and run-time faults of the simulated worker."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

RUNTIMES = ("sglang", "openai", "llamacpp", "vllm")
# SGLang's --disaggregation-mode values: a regular worker, or one leg of a PD pair.
DISAGGREGATION_MODES = ("null", "prefill", "decode")
# The runtimes that play PD: SGLang's (bootstrap rooms) and vLLM's (kv_transfer_params).
PD_RUNTIMES = ("sglang", "vllm")
KV_EVENT_FORMATS = ("sglang", "vllm")  # sim/kv_events.py


@dataclass
class Faults:
    """Faults the sim injects; set by flag at start or at run time through ``/sim/faults``."""

    error_rate: float = 0.0  # share of inference requests answered with error_status
    error_status: int = 500
    extra_latency_ms: float = 0.0  # added before any inference work
    drop_after_chunks: int = -1  # close the connection after N body chunks (-1: never)
    hang: bool = False  # inference requests never answer (until the client leaves)
    fail_health: bool = False  # /health and /health_generate answer 503
    # An inference request whose body contains this text is answered 500 (a poison input:
    # every worker fails it, while it serves everything else).
    poison_text: str = ""
    # Not a fault: when set, gRPC outputs are this text, then end-of-sequence (parser tests).
    scripted_reply: str = ""
    # With --kv-events-endpoint: the next N event batches are numbered but not sent live
    # (they stay in the replay buffer), so a subscriber sees a gap.
    kv_events_drop_batches: int = 0

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial update, checking names and types; raises ValueError."""
        known = {f.name: f.type for f in fields(self)}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown fault {name!r}; known: {', '.join(sorted(known))}")
            current = getattr(self, name)
            if isinstance(current, str):
                if not isinstance(value, str):
                    raise ValueError(f"{name!r} takes a string")
            elif isinstance(current, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"fault {name!r} takes true or false")
            elif isinstance(current, int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"fault {name!r} takes an integer")
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"fault {name!r} takes a number")
        if not 0.0 <= float(changes.get("error_rate", self.error_rate)) <= 1.0:
            raise ValueError("fault 'error_rate' must be between 0 and 1")
        status = changes.get("error_status", self.error_status)
        if not 100 <= status <= 599:
            raise ValueError("fault 'error_status' must be an HTTP status code")
        for name, value in changes.items():
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    worker_id: str | None = None  # defaults to host:port
    served_model_name: str = "sim-model"
    # "openai": only the OpenAI API; "llamacpp": that plus llama.cpp's /slots and metrics;
    # "vllm": that plus vLLM's metrics and /reset_prefix_cache
    runtime: str = "sglang"
    ttft_ms: float = 5.0  # fixed time to first token, on top of prefill
    itl_ms: float = 2.0  # inter-token latency
    prefill_us_per_token: float = 20.0  # prefill cost of each uncached prompt token
    max_running: int = 8  # running slots; more requests wait in a queue
    cache_tokens: int = 65536  # KV prefix cache capacity, in tokens
    block_size: int = 16
    max_tokens: int = 16  # output tokens when the request names none
    dp_size: int = 1
    api_key: str | None = None  # when set, inference needs `Authorization: Bearer <key>`
    tls_cert_path: str | None = None  # serve HTTPS
    tls_key_path: str | None = None
    tls_client_ca_path: str | None = None  # and require client certificates from this CA
    grpc: bool = False  # serve SGLang's gRPC scheduler service on `port`
    http_port: int | None = None  # with grpc: the HTTP API (and /sim/*) on this port too
    # PD disaggregation, with SGLang's flag names and defaults (sim/pd.py).
    disaggregation_mode: str = "null"
    disaggregation_bootstrap_port: int = 8998  # a prefill's bootstrap server listens here
    disaggregation_bootstrap_timeout: float = 300.0  # seconds a room waits for its other leg
    # KV-cache events (sim/kv_events.py): a PUB endpoint to bind, an optional replay ROUTER,
    # the wire format ("sglang" or "vllm") and the topic (default kv@<name>@<model>).
    kv_events_endpoint: str | None = None
    kv_events_replay_endpoint: str | None = None
    kv_events_format: str = "sglang"
    kv_events_topic: str | None = None
    faults: Faults = field(default_factory=Faults)

    @property
    def name(self) -> str:
        return self.worker_id or f"{self.host}:{self.port}"
