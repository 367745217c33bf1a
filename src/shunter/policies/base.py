"""The policy interface, and helpers the policies share. Policies choose; they never do I/O.

A policy plugin needs only this module: ``Policy``, ``RouteRequest``, and the ``Worker`` and
``Workers`` types it chooses among. Built-in policies read a worker's run-time state as
``worker.state.available`` and ``worker.state.in_flight``: an attribute chain costs a third
of a property call on a per-request scan (``fleet/worker.py``).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass

from shunter.fleet.registry import Workers
from shunter.fleet.worker import Worker

__all__ = [
    "CHARS_PER_TOKEN",
    "Decision",
    "Policy",
    "RouteRequest",
    "UrlIndex",
    "UrlIndexes",
    "Worker",
    "Workers",
]

# Characters per token where the gateway has not tokenized the text (HTTP workers): the
# usual rule for English text with BPE tokenizers, as ``prefix_hash`` and the PD skip rule use.
CHARS_PER_TOKEN = 4


@dataclass(slots=True)
class RouteRequest:
    """What a policy may look at.

    ``model`` is the registry's model id the workers belong to (not whatever name the
    client sent), ``text`` the routing text (only extracted for policies that set
    ``needs_text``), ``headers`` the raw request headers, ``routing_id`` the body's
    ``routing_id`` field if it has one, ``chat`` the body of a chat request when ``text``
    is extracted (a precise scorer renders its messages as the engine does; the text
    joins only their contents).
    """

    model: str = "default"
    text: str | None = None
    headers: list[tuple[bytes, bytes]] | None = None
    routing_id: str | None = None
    chat: bytes | None = None

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers or ():
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy's choice, explained: the route receipt's content.

    ``reason`` is one short word saying which rule chose (``prefix_match``,
    ``load_override``, ``round_robin``...); ``predicted_cached`` the leading prompt tokens
    the policy expects the worker to hold in its prefix cache, or None for a policy that
    keeps no record of the caches (it predicts nothing, so nothing is measured against it).
    """

    worker: Worker | None
    reason: str
    predicted_cached: int | None = None


class Policy(ABC):
    name: str = ""
    needs_text: bool = False  # whether the router must extract the routing text
    reason: str = "selected"  # the receipt's reason for the default ``decide``
    # Whether ``on_cached`` wants each answer's cached tokens (the router reads them then).
    learns_from_cache: bool = False

    @abstractmethod
    def select(self, workers: Workers, request: RouteRequest) -> Worker | None:
        """Pick an available worker from ``workers`` (which may hold unavailable ones)."""

    def decide(self, workers: Workers, request: RouteRequest) -> Decision:
        """``select``, explained: what the router calls. A policy that can say more than
        its constant ``reason`` (which rule chose, what it expects cached) overrides this
        and makes ``select`` return ``decide(...).worker``; one written against ``select``
        alone keeps working unchanged."""
        return Decision(self.select(workers, request), self.reason)

    def on_cached(  # noqa: B027 - optional hook
        self,
        request: RouteRequest,
        decision: Decision,
        cached_tokens: int,
        prompt_tokens: int | None,
        elapsed: float,
    ) -> None:
        """The chosen worker's answer to ``request`` reported ``cached_tokens`` of
        ``prompt_tokens`` (None: not reported) in its prefix cache, ``elapsed`` seconds
        after ``decision``. Called only for policies that set ``learns_from_cache``."""

    def cached_prefix(self, request: RouteRequest) -> tuple[int, frozenset[str]]:
        """What this policy has seen of ``request.text``: the longest prefix it routed before
        (in characters) and the URLs of the workers it sent that prefix to, which likely
        hold it in their prefix cache. ``(0, frozenset())`` for policies that keep no such
        record. Ask before ``select``, which records the request."""
        return 0, frozenset()

    def on_worker_added(self, worker: Worker) -> None:  # noqa: B027 - optional hook
        """Called when a worker of this policy's model joins."""

    def on_worker_removed(self, worker: Worker) -> None:  # noqa: B027 - optional hook
        """Called when a worker of this policy's model leaves."""

    def start(self) -> None:  # noqa: B027 - optional hook
        """Start background work (called on the event loop once the gateway runs)."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Stop background work."""


def available(workers: Workers) -> list[Worker]:
    """The available workers: the slow path, used only when a quick pick hit a bad one."""
    return [w for w in workers if w.state.available]


_tie_breaker = itertools.count()


def least_loaded(workers: Workers) -> Worker | None:
    """The available worker with the fewest requests in flight.

    Ties are broken by a rotating start, so equally idle workers share the traffic rather
    than the first one taking it all.
    """
    count = len(workers)
    if not count:
        return None
    start = next(_tie_breaker) % count
    best: Worker | None = None
    best_load = 0
    for offset in range(count):
        worker = workers[(start + offset) % count]
        if worker.state.available and (best is None or worker.state.in_flight < best_load):
            best, best_load = worker, worker.state.in_flight
    return best


class UrlIndexes:
    """A ``UrlIndex`` per model, for policies shared by several models."""

    __slots__ = ("_by_model",)

    def __init__(self) -> None:
        self._by_model: dict[str, UrlIndex] = {}

    def of(self, model: str, workers: Workers) -> dict[str, Worker]:
        index = self._by_model.get(model)
        if index is None:
            index = self._by_model[model] = UrlIndex()
        return index.of(workers)


class UrlIndex:
    """``url -> worker`` for one workers tuple, rebuilt only when the tuple changes.

    The registry publishes a new tuple on every fleet change, so identity tells us when the
    cached index is stale: readers pay one ``is`` check.
    """

    __slots__ = ("_index", "_workers")

    def __init__(self) -> None:
        self._workers: Workers | None = None
        self._index: dict[str, Worker] = {}

    def of(self, workers: Workers) -> dict[str, Worker]:
        if workers is not self._workers:
            self._index = {w.url: w for w in workers}
            self._workers = workers
        return self._index
