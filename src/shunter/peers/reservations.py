"""Short-lived in-flight reservations for other gateways' routing decisions.

When a peer routes a request to a worker, this gateway counts it in that worker's
``in_flight`` for ``ttl_secs``: the load-aware policies read that number, so a burst that
arrives at several gateways at once does not send every gateway's share to the same
worker. A reservation is not released when the peer's request ends (that would cost the
peer a message per request end, and a hook on its request path); the TTL is the bound,
and a burst's herding happens within its first milliseconds.

Every reservation lives the same TTL, so arrival order is expiry order: a deque, popped
from the left.
"""

from __future__ import annotations

from collections import deque

from shunter.fleet.runtime import WorkerRuntime

DEFAULT_TTL_SECS = 1.0


class Reservations:
    def __init__(self, ttl_secs: float = DEFAULT_TTL_SECS) -> None:
        self.ttl_secs = ttl_secs
        self._live: deque[tuple[float, WorkerRuntime]] = deque()

    def __len__(self) -> int:
        return len(self._live)

    def reserve(self, state: WorkerRuntime, now: float) -> None:
        state.reserve()
        self._live.append((now + self.ttl_secs, state))

    def expire(self, now: float) -> int:
        """Release the reservations whose time is up; how many were released."""
        live = self._live
        released = 0
        while live and live[0][0] <= now:
            _, state = live.popleft()
            state.unreserve()
            released += 1
        return released

    def release_all(self) -> None:
        while self._live:
            self._live.popleft()[1].unreserve()
