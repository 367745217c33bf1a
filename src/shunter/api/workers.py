"""``/workers``: list, add, inspect, replace, update and remove workers at run time.

Every worker has an id, a UUID kept for as long as it is registered (``fleet/ids.py``);
``/workers/{id}`` takes it, or (as before ids) the worker's URL percent-encoded once,
decoded from the raw path, as the server's decoded ``path`` would decode it a second time.
Anything else there (a mistyped id, a bare word) is a 400 that says what was expected.

- ``POST /workers`` answers 202 at once with the new worker's id and ``Location``, and
  registers it in a background job (a worker may take minutes to come up); until then it is
  listed as ``pending`` and ``GET /workers/{id}`` shows its job.
- ``PUT`` with a whole spec (its ``url`` given) replaces: the new spec is registered as an
  addition is, in the background, under the same id, the old spec serving until the swap.
  A ``PUT`` without ``url`` is the update it was before ids (sglang-router's scripts send
  only the fields to change), so those scripts keep working.
- ``PATCH`` updates labels, priority, cost, api_key and the health settings at once.
- ``DELETE`` removes at once; the worker is listed as ``draining`` while its requests finish.

A change that ran answers with ``"queued": false``, one left to a job with ``"queued": true``;
removals and PUT keep smg's 202 (scripts check it), PATCH answers 200.

Every change made here (POST, PUT, PATCH, DELETE) is also handed to ``shared``, the peer
exchange when there is one, which carries it to the other gateways and ``--workers``
processes; what they do with it is ``peers/manual.py``'s.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote

from shunter.api.call import Call
from shunter.api.reply import json_reply
from shunter.fleet.fleet import Fleet
from shunter.fleet.ids import looks_like_worker_id, new_worker_id, parse_worker_id
from shunter.fleet.jobs import JobStatus, QueueFull
from shunter.fleet.spec import SpecError, WorkerSpec, check_update
from shunter.fleet.urls import normalize_worker_url
from shunter.fleet.worker import Worker, WorkerType
from shunter.protocols.errors import ApiError
from shunter.protocols.reply import Reply

_MALFORMED = (
    "{given!r} is neither a worker id (a UUID: 8-4-4-4-12 hexadecimal digits) nor a worker "
    "URL (percent-encoded once, with its scheme or port, e.g. http%3A%2F%2Fhost%3A8000)"
)


class HandChanges(Protocol):
    """Who hears of the changes made to workers through this API (the peer exchange: every
    one of them reaches the other gateways and ``--workers`` processes, ``peers/manual.py``)."""

    def worker_added(self, url: str, body: dict[str, object], worker_id: str) -> None: ...

    def worker_replaced(self, url: str, body: dict[str, object], worker_id: str) -> None: ...

    def worker_updated(self, url: str, changes: dict[str, object]) -> None: ...

    def worker_removed(self, url: str) -> None: ...


Rows = list[dict[str, Any]]


class Target:
    """What a ``/workers/{id}`` path names: a registered worker (its ranks), an addition's
    job, or a removed worker still draining (which only GET shows)."""

    __slots__ = ("draining", "id", "job", "url", "workers")

    def __init__(
        self,
        url: str,
        worker_id: str,
        workers: list[Worker],
        job: JobStatus | None,
        draining: list[Worker] | None = None,
    ) -> None:
        self.url = url  # the registration's URL (a DP worker's base URL)
        self.id = worker_id
        self.workers = workers
        self.job = job
        self.draining = draining or []


class WorkersApi:
    def __init__(
        self,
        fleet: Fleet,
        check_policy: Callable[[str], None],
        pd_mode: bool = False,
        shared: HandChanges | None = None,
        merge_siblings: Callable[[Rows], Awaitable[Rows]] | None = None,
    ) -> None:
        self.fleet = fleet
        self.check_policy = check_policy  # raises ValueError for a policy name it refuses
        self.pd_mode = pd_mode  # prefill and decode workers are routed to only in PD mode
        self.shared = shared  # told of every change made here (peer gateways)
        # --workers N: this process's rows merged with its siblings' (supervisor/siblings.py)
        self.merge_siblings = merge_siblings

    async def list_workers(self, call: Call) -> Reply:
        query = parse_qs(call.scope.get("query_string", b"").decode("latin-1"))
        model = query.get("model", [None])[0]
        fleet = self.fleet
        listed = [*fleet.registry.all(), *fleet.draining()]
        if model is not None:
            listed = [w for w in listed if model in w.model_ids]
        workers = [w.to_info() for w in listed]
        if model is None:  # an addition under way has no model known yet
            workers += [_job_info(job) for job in fleet.pending() if not fleet.find(job.worker_url)]
        if self.merge_siblings is not None:
            workers = await self.merge_siblings(workers)
            if model is not None:  # the siblings list all theirs
                workers = [w for w in workers if _serves(w, model)]
        kinds = [w.get("worker_type") for w in workers]
        counts = {f"{kind}_count": kinds.count(kind) for kind in ("prefill", "decode", "regular")}
        return json_reply(200, {"workers": workers, "total": len(workers), "stats": counts})

    async def add_worker(self, call: Call) -> Reply:
        payload = await call.json()
        spec = self._spec(payload)
        spec.worker_id = new_worker_id()
        taken = self.fleet.taken(spec)
        if taken is not None:
            held = self.fleet.find(taken)[0].id
            raise ApiError(
                409,
                "WORKER_ALREADY_EXISTS",
                f"Worker {taken} already exists with id {held}; "
                f"PUT /workers/{held} replaces it, PATCH updates it",
            )
        if self.fleet.adding(spec.url):
            job = self.fleet.job_status(spec.url)
            held = job.worker_id if job is not None else "?"
            raise ApiError(
                409,
                "WORKER_ADD_IN_PROGRESS",
                f"Worker {spec.url} is already being added as {held}; GET /workers/{held} "
                "shows how far",
            )
        try:
            self.fleet.submit_add(spec)
        except QueueFull as exc:
            raise ApiError(500, "INTERNAL_SERVER_ERROR", str(exc)) from None
        if self.shared is not None:
            self.shared.worker_added(spec.url, payload, spec.worker_id)
        location = f"/workers/{spec.worker_id}"
        body = {
            "status": "accepted",
            "worker_id": spec.worker_id,
            "url": spec.url,
            "location": location,
            "message": "Worker addition queued for background processing",
        }
        return json_reply(202, body, [(b"location", location.encode())])

    def _spec(self, payload: Any) -> WorkerSpec:
        """A ``POST``/``PUT`` body as a spec this gateway can register; 400 otherwise."""
        try:
            spec = WorkerSpec.from_json(payload)
            if "policy" in spec.labels:
                self.check_policy(spec.labels["policy"])
            if spec.worker_type is not WorkerType.REGULAR and not self.pd_mode:
                raise SpecError(
                    f"'worker_type' {spec.worker_type.value}: this gateway routes to prefill "
                    "and decode workers only when started with --pd-disaggregation"
                )
        except SpecError as exc:
            raise ApiError(400, "invalid_worker_spec", str(exc)) from None
        except ValueError as exc:
            raise ApiError(400, "invalid_worker_spec", f"labels.policy: {exc}") from None
        return spec

    async def worker(self, call: Call) -> Reply:
        """GET, PUT, PATCH and DELETE on ``/workers/{id}``."""
        raw_path: bytes = call.scope.get("raw_path") or call.path.encode("latin-1")
        given = unquote(raw_path.decode("latin-1")[len("/workers/") :])
        target = self._resolve(given)
        if call.method in ("GET", "HEAD"):
            info = _info(target, given)
            if self.merge_siblings is not None and len(target.workers) == 1:
                info = (await self.merge_siblings([info]))[0]
            return json_reply(200, info)
        if not target.workers:
            if target.job is not None and target.job.status != "failed":
                raise ApiError(
                    409,
                    "WORKER_ADD_IN_PROGRESS",
                    f"Worker {target.id} ({target.url}) is still being added; "
                    f"GET /workers/{target.id} shows how far",
                )
            raise ApiError(404, "WORKER_NOT_FOUND", f"Worker {given} not found")
        if call.method == "DELETE":
            self.fleet.remove(target.url)
            if self.shared is not None:
                self.shared.worker_removed(target.url)
            return _done(202, target, False, "Worker removed; requests it is serving finish first")
        payload = await call.json()
        if call.method == "PUT" and isinstance(payload, dict) and "url" in payload:
            return self._replace(target, payload)
        try:
            changes = check_update(payload)
        except SpecError as exc:
            raise ApiError(400, "invalid_worker_update", str(exc)) from None
        try:
            self.fleet.update(target.url, changes)
        except LookupError:  # removed while its body was on its way
            raise ApiError(404, "WORKER_NOT_FOUND", f"Worker {given} not found") from None
        if self.shared is not None:
            self.shared.worker_updated(target.url, changes)
        if call.method == "PATCH":
            return _done(200, target, False, "Worker updated")
        return _done(202, target, False, "Worker updated")

    def _replace(self, target: Target, payload: dict[str, Any]) -> Reply:
        spec = self._spec(payload)
        if self.fleet.taken(spec) != target.url:
            raise ApiError(
                400,
                "invalid_worker_spec",
                f"'url' {spec.url}: PUT /workers/{target.id} replaces the worker at "
                f"{target.url}; to move it, POST the new URL and DELETE this one",
            )
        job = self.fleet.job_status(target.url)
        if job is not None and job.status in ("pending", "processing"):
            raise ApiError(
                409,
                "WORKER_UPDATE_IN_PROGRESS",
                f"Worker {target.id} has a {job.job_type} job under way; "
                f"GET /workers/{target.id} shows how far",
            )
        spec.worker_id = target.id
        try:
            self.fleet.submit_replace(target.url, spec)
        except QueueFull as exc:
            raise ApiError(500, "INTERNAL_SERVER_ERROR", str(exc)) from None
        if self.shared is not None:
            self.shared.worker_replaced(spec.url, payload, target.id)
        return _done(
            202,
            target,
            True,
            "Worker replacement queued: the new spec is registered in the background under "
            "the same id, the current one serving until then",
        )

    def _resolve(self, given: str) -> Target:
        """The worker or job ``given`` (an id or a URL) names; 404 for an id nobody has,
        400 for what is neither. A URL nobody has is left to each method."""
        fleet = self.fleet
        worker_id = parse_worker_id(given)
        if worker_id is not None:
            workers = fleet.find_id(worker_id)
            if workers:
                url = workers[0].base_url
                return Target(url, worker_id, workers, fleet.job_status(url))
            job = fleet.job_of(worker_id)
            if job is not None:
                return Target(job.worker_url, worker_id, [], job)
            draining = [w for w in fleet.draining() if w.id == worker_id]
            if draining:
                return Target(draining[0].base_url, worker_id, [], None, draining)
            raise ApiError(404, "WORKER_NOT_FOUND", f"Worker {worker_id} not found")
        if looks_like_worker_id(given) or not (":" in given or "/" in given):
            raise ApiError(400, "BAD_REQUEST", _MALFORMED.format(given=given))
        url = normalize_worker_url(given)
        workers = fleet.find(url)
        job = fleet.job_status(url)
        worker_id = workers[0].id if workers else job.worker_id if job is not None else ""
        return Target(url, worker_id, workers, job)


def _info(target: Target, given: str) -> dict[str, Any]:
    """``GET /workers/{id}``: the worker (a DP worker as one, its ranks counted), its job."""
    workers = target.workers or target.draining
    if workers:
        info = workers[0].to_info()
        if len(workers) > 1:
            load = sum(w.state.in_flight for w in workers)
            info |= {"url": target.url, "dp_ranks": len(workers), "load": load}
    elif target.job is not None:
        info = _job_info(target.job)
    else:
        raise ApiError(404, "WORKER_NOT_FOUND", f"Worker {given} not found")
    if target.job is not None:
        info["job_status"] = target.job.as_dict()
    return info


def _serves(row: dict[str, Any], model: str) -> bool:
    """Whether a worker's row (``to_info``) lists ``model``, as ``Worker.model_ids`` would."""
    return model in (row.get("models") or (row.get("model_id"),))


def _job_info(job: JobStatus) -> dict[str, Any]:
    """A worker known only by its job: an addition under way (``pending``) or failed."""
    return {
        "id": job.worker_id,
        "url": job.worker_url,
        "model_id": "unknown",
        "worker_type": "unknown",
        "connection_mode": "unknown",
        "runtime_type": "unknown",
        "labels": {},
        "is_healthy": False,
        "status": "failed" if job.status == "failed" else "pending",
        "load": 0,
    }


def _done(status: int, target: Target, queued: bool, message: str) -> Reply:
    return json_reply(
        status,
        {
            "status": "accepted",
            "worker_id": target.id,
            "url": target.url,
            "location": f"/workers/{target.id}",
            "queued": queued,
            "message": message,
        },
    )
