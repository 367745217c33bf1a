"""A policy plugin used by the tests (and the README's example, nearly verbatim)."""

from shunter.policies.base import Policy, RouteRequest, Worker, Workers


class LightestFirst(Policy):
    """Send each request to the available worker with the fewest requests in flight,
    breaking ties by URL, so the choice is predictable."""

    name = "lightest_first"

    def select(self, workers: Workers, request: RouteRequest) -> Worker | None:
        candidates = [w for w in workers if w.is_available]
        if not candidates:
            return None
        return min(candidates, key=lambda w: (w.in_flight, w.url))
