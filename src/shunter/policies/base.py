"""The policy interface. Policies choose; they never do I/O."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from shunter.core.registry import Workers
from shunter.core.worker import Worker


@dataclass(slots=True)
class RouteRequest:
    """What a policy may look at: the model, the routing text, the request headers."""

    model: str | None = None
    text: str | None = None
    headers: list[tuple[bytes, bytes]] | None = None


class Policy(ABC):
    name: str = ""
    needs_text: bool = False  # whether the router must extract the routing text

    @abstractmethod
    def select(self, workers: Workers, request: RouteRequest) -> Worker | None:
        """Pick an available worker from ``workers`` (which may hold unavailable ones)."""

    def on_worker_added(self, worker: Worker) -> None:  # noqa: B027 - optional hook
        """Called when a worker of this policy's model joins."""

    def on_worker_removed(self, worker: Worker) -> None:  # noqa: B027 - optional hook
        """Called when a worker of this policy's model leaves."""


def available(workers: Workers) -> list[Worker]:
    """The available workers: the slow path, used only when a quick pick hit a bad one."""
    return [w for w in workers if w.is_available]
