"""``/workers``: list, add, inspect, update and remove workers at run time.

An addition answers 202 at once and runs as a background job (a worker may take minutes
to come up); ``GET /workers/{url}`` shows the job while it runs or after it failed. An update
or a removal touches only the registry, so it is done by the time the answer leaves: the
answer keeps smg's 202 (scripts check it) and says what was done.

``{url}`` is the worker's URL percent-encoded once; it is decoded from the raw path, as the
server's decoded ``path`` would decode it a second time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import unquote

from shunter.api.call import Call
from shunter.api.reply import json_reply
from shunter.fleet.fleet import Fleet
from shunter.fleet.jobs import QueueFull
from shunter.fleet.spec import SpecError, WorkerSpec, check_update
from shunter.fleet.urls import normalize_worker_url
from shunter.fleet.worker import WorkerType
from shunter.protocols.errors import ApiError
from shunter.protocols.reply import Reply


class HandChanges(Protocol):
    """Who hears of the workers added and removed by hand through this API."""

    def worker_added(self, url: str, body: dict[str, object]) -> None: ...

    def worker_removed(self, url: str) -> None: ...


Rows = list[dict[str, Any]]


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
        self.shared = shared  # told of additions and removals made here (peer gateways)
        # --workers N: this process's rows merged with its siblings' (supervisor/siblings.py)
        self.merge_siblings = merge_siblings

    async def list_workers(self, call: Call) -> Reply:
        workers = [w.to_info() for w in self.fleet.registry.all()]
        if self.merge_siblings is not None:
            workers = await self.merge_siblings(workers)
        kinds = [w.get("worker_type") for w in workers]
        counts = {f"{kind}_count": kinds.count(kind) for kind in ("prefill", "decode", "regular")}
        return json_reply(200, {"workers": workers, "total": len(workers), "stats": counts})

    async def add_worker(self, call: Call) -> Reply:
        payload = await call.json()
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
        taken = self.fleet.taken(spec)
        if taken is not None:
            raise ApiError(
                409,
                "WORKER_ALREADY_EXISTS",
                f"Worker {taken} already exists; use PUT /workers/{{url}}",
            )
        if self.fleet.adding(spec.url):
            raise ApiError(
                409,
                "WORKER_ADD_IN_PROGRESS",
                f"Worker {spec.url} is already being added; GET /workers/{{url}} shows how far",
            )
        try:
            self.fleet.submit_add(spec)
        except QueueFull as exc:
            raise ApiError(500, "INTERNAL_SERVER_ERROR", str(exc)) from None
        if self.shared is not None:
            self.shared.worker_added(spec.url, payload)
        return _accepted(spec.url, "Worker addition queued for background processing")

    async def worker(self, call: Call) -> Reply:
        """GET, PUT and DELETE on ``/workers/{url}``."""
        raw_path: bytes = call.scope.get("raw_path") or call.path.encode("latin-1")
        url = normalize_worker_url(unquote(raw_path.decode("latin-1")[len("/workers/") :]))
        if call.method in ("GET", "HEAD"):
            return await self._get_worker(url)
        if not self.fleet.find(url):
            raise ApiError(404, "WORKER_NOT_FOUND", f"Worker {url} not found")
        if call.method == "DELETE":
            self.fleet.remove(url)
            if self.shared is not None:
                self.shared.worker_removed(url)
            return _accepted(url, "Worker removed; requests it is serving finish first")
        try:
            changes = check_update(await call.json())
        except SpecError as exc:
            raise ApiError(400, "invalid_worker_update", str(exc)) from None
        try:
            self.fleet.update(url, changes)
        except LookupError:  # removed while its body was on its way
            raise ApiError(404, "WORKER_NOT_FOUND", f"Worker {url} not found") from None
        return _accepted(url, "Worker updated")

    async def _get_worker(self, url: str) -> Reply:
        workers = self.fleet.find(url)
        job = self.fleet.job_status(url)
        if workers:
            info = workers[0].to_info()
            if self.merge_siblings is not None and len(workers) == 1:
                info = (await self.merge_siblings([info]))[0]
            if len(workers) > 1:
                info |= {"id": url, "url": url, "dp_ranks": len(workers)}
        elif job is not None:
            info = {
                "id": url,
                "url": url,
                "model_id": "unknown",
                "worker_type": "unknown",
                "is_healthy": False,
                "connection_mode": "unknown",
            }
        else:
            raise ApiError(404, "WORKER_NOT_FOUND", f"Worker {url} not found")
        if job is not None:
            info["job_status"] = job.as_dict()
        return json_reply(200, info)


def _accepted(url: str, message: str) -> Reply:
    return json_reply(202, {"status": "accepted", "worker_id": url, "message": message})
