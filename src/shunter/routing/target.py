"""``X-SMG-Target-Worker``: a request that names its worker goes there, whatever the policy.

smg HEAD honours the header in every policy (at the seed only ``consistent_hashing`` read
it). It is for a client that must reach one worker: a benchmark of one replica, a check of
a worker just added, a debugging session. So the request goes to that worker or fails
saying why; it never falls back to the policy, which would answer from another worker as
if nothing were wrong (smg's policies return no worker, a 503, too):

- the worker is not one of the model's: 400 ``target_worker_not_found``, naming it;
- it is one, but unavailable (unhealthy, or its breaker open): 503
  ``target_worker_unavailable``, naming it. A 503 at selection is retried after the
  backoff, as any selection that found no worker, so a brief outage within the retry
  budget is ridden out; a retry after a failed attempt goes to the same worker.

Any client the gateway admits may use it, as in smg: it lets a client pin its requests on
one worker, which routing keys (``consistent_hashing``, ``manual``, sticky sessions) let it
do already; the breaker and the health checks still take an overwhelmed worker out.

The header names a worker by its id (the UUID ``GET /workers`` lists), its URL (a trailing
slash aside) or, as smg's ``consistent_hashing`` took it, by its index among the model's
workers (at most 6 digits: a longer number is no index, and Python refuses to convert one of
more than 4,300 digits). ``find_worker`` is the one place a client's name for a worker is
looked up. The errors name the worker as the client gave it, or by its id: never its
address, which a client that named it by index or id may not know.
"""

from __future__ import annotations

from shunter.fleet.registry import Workers
from shunter.fleet.worker import Worker
from shunter.protocols.errors import ApiError
from shunter.protocols.reply import Headers

TARGET_HEADER = b"x-smg-target-worker"
TARGET_REASON = "target_worker"  # the route receipt's reason
_MAX_INDEX_DIGITS = 6
_MAX_ECHOED = 128  # of the header's value, in an error


def target_of(headers: Headers) -> bytes | None:
    """The request's ``X-SMG-Target-Worker``, if it has one (one pass over the headers)."""
    for name, value in headers:
        if name == TARGET_HEADER:
            return value
    return None


def find_worker(name: str, workers: Workers) -> Worker | None:
    """The worker of ``workers`` that ``name`` names: its id, its URL, or its index."""
    if name.isascii() and name.isdigit():
        if len(name) > _MAX_INDEX_DIGITS:
            return None
        index = int(name)
        return workers[index] if index < len(workers) else None
    url = name.rstrip("/")
    worker_id = name.lower()
    for worker in workers:
        if worker.url == url or worker.id == worker_id:
            return worker
    return None


def targeted(value: bytes, model: str, workers: Workers) -> Worker:
    """The available worker the header's ``value`` names; an ApiError saying why not."""
    name = value.decode("latin-1").strip()
    worker = find_worker(name, workers)
    if worker is None:
        raise ApiError(
            400,
            "target_worker_not_found",
            f"x-smg-target-worker: {name[:_MAX_ECHOED]!r} is not a worker of model `{model}` "
            "that serves this endpoint (give a worker id or URL as GET /workers lists it)",
        )
    if not worker.state.available:
        raise ApiError(
            503,
            "target_worker_unavailable",
            f"x-smg-target-worker: the worker {worker.id} is not available (unhealthy or "
            "its circuit open)",
        )
    return worker
