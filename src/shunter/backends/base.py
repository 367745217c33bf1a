"""The one interface every worker is reached through, and the values that cross it.

A ``Backend`` belongs to one worker (its DP ranks share it) and is created at
registration. It knows the transport and the engine; nothing above it does. The router
calls ``send`` with an ``Outbound`` request and gets a ``Reply`` back, or an
``UpstreamError`` when the worker gave no answer (``kind`` says why: connect, timeout, io,
oversize). A streamed reply's chunks may also end in an ``UpstreamError``: the worker broke
off. The fleet calls the other methods: health, load, cache flush, server information.

Backends receive the worker's identity as a ``Target`` value with each call (its URL, its
key, its DP rank), so an update of the identity (a new key) needs no new backend, and this
package imports nothing from the fleet above it.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from shunter.protocols.bootstrap import Bootstrap
from shunter.protocols.reply import Headers, Reply


class ConnectionMode(enum.Enum):
    HTTP = "HTTP"
    GRPC = "gRPC"


class Runtime(enum.Enum):
    SGLANG = "sglang"
    VLLM = "vllm"
    LLAMACPP = "llamacpp"
    OPENAI = "openai"  # any other OpenAI-compatible server


# Endpoints only SGLang's own server has; OpenAI-compatible servers answer them 404.
SGLANG_ONLY_PATHS = frozenset({"/generate"})
# Runtimes known to serve Anthropic's /v1/messages (over gRPC the gateway serves it). Other
# HTTP servers are tried only when a model has no such worker (llama.cpp's newer servers
# have it too); one that answers 404 does not (``backends/http/backend.py``).
MESSAGES_RUNTIMES = frozenset({Runtime.SGLANG, Runtime.VLLM})
InfoKind = Literal["server", "model"]


class Target(Protocol):
    """What a backend needs to know of the worker it is called for."""

    @property
    def url(self) -> str: ...
    @property
    def base_url(self) -> str: ...
    @property
    def api_key(self) -> str | None: ...
    @property
    def dp_rank(self) -> int | None: ...
    @property
    def labels(self) -> Mapping[str, str]: ...
    @property
    def model_id(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Address:
    """A worker not registered yet: enough of a ``Target`` to probe and describe it."""

    url: str
    api_key: str | None = None
    dp_rank: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    model_id: str = "unknown"

    @property
    def base_url(self) -> str:
        return self.url


@dataclass(slots=True)
class Outbound:
    """One attempt of an inference request, as the router hands it to a backend.

    ``headers`` are the client's, as byte pairs (the backend decides what its transport
    forwards); ``trace`` carries the gateway's own trace context, when tracing is on;
    ``bootstrap``, for one leg of a prefill/decode pair, where the pair hands the KV cache
    over (the backend puts it in the request in its transport's way); ``prompt``, the
    request's routing text, for a backend that asks for it (``Backend.wants_prompt``).
    """

    method: str
    path: str
    query: bytes
    headers: Headers
    body: bytes
    stream: bool
    request_id: str
    model: str
    trace: Headers = field(default_factory=list)
    bootstrap: Bootstrap | None = None
    prompt: str | None = None


@dataclass(frozen=True, slots=True)
class Load:
    """A worker's own load report. None: it reports nothing, or could not be read (unknown,
    never zero: a failing worker must not look idle)."""

    load: int | None = None
    cache_hit_rate: float | None = None


@dataclass
class Description:
    """What registration learns of a worker from the worker itself."""

    runtime: Runtime
    models: tuple[str, ...]
    dp_size: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    slots: int | None = None  # llama.cpp: its slots, each holding one prompt's cache


class EngineOpError(Exception):
    """An engine operation (flush, generation check, info) failed. The message says how, for
    the log (it may name the worker and quote its client library); ``kind`` says which way,
    for the client: an ``UpstreamError`` kind, or ``answer`` (the worker answered, wrongly)."""

    def __init__(self, message: str, kind: str = "answer") -> None:
        super().__init__(message)
        self.kind = kind


class Backend(ABC):
    mode: ConnectionMode
    runtime: Runtime
    # Whether ``send`` wants ``Outbound.prompt`` (llama.cpp's slot turns key on it); the
    # router joins the text only then.
    wants_prompt: bool = False

    @abstractmethod
    def serves(self, path: str) -> bool:
        """Whether this worker answers the inference endpoint ``path``."""

    @abstractmethod
    async def send(self, target: Target, request: Outbound) -> Reply:
        """Send one attempt; raises UpstreamError when the worker gave no answer."""

    @abstractmethod
    async def probe(self, target: Target, timeout: float) -> str | None:
        """A health check: None when healthy, else what is wrong. A failing probe may start
        replacing the backend's connections in the background."""

    @abstractmethod
    async def load(self, target: Target) -> Load:
        """The worker's own load report."""

    @property
    def can_flush(self) -> bool:
        """Whether ``flush`` has a way to empty this engine's prefix cache."""
        return True

    @abstractmethod
    async def flush(self, target: Target) -> None:
        """Empty the worker's prefix cache; raises EngineOpError."""

    @abstractmethod
    async def health_generate(self, target: Target) -> bytes:
        """Make the worker generate (a token); its answer's body, or EngineOpError."""

    @abstractmethod
    async def info(self, target: Target, kind: InfoKind, request_id: str) -> Reply:
        """The worker's server or model information, as its own endpoint answers it."""

    async def metrics(self, target: Target) -> str | None:
        """The worker's own Prometheus text, if it serves any."""
        return None

    @abstractmethod
    async def close(self) -> None:
        """Release connections (at removal, or at shutdown after the drain)."""
