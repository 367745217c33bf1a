"""One reconcile pass: make the fleet's discovered workers what the pods say they should be.

Level-triggered: each pass compares the whole desired state (``pods.py``) with the workers
discovery owns (those labelled with a pod uid) and acts on the difference, so a missed event,
a failed registration or a restart is repaired by the next pass, whatever happened before.

- An owned worker whose pod is gone (deleted, or no longer selected), terminating, or whose
  address now belongs to another pod (a new uid on the same IP) is removed: taken out of
  selection at once, its requests in flight allowed to finish (``Fleet.remove``).
- A pod that turns NotReady keeps its worker: health checks decide (as smg does).
- An addable worker that is not registered, and has no registration running, is queued for
  registration. One that fails (the engine is still loading) is queued again on a later pass:
  never given up on.
- Workers added by hand (``--worker-urls``, ``POST /workers``) carry no pod uid: never touched,
  and a pod on the same address is not registered over them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from shunter.discovery.config import DiscoveryConfig
from shunter.discovery.pods import POD_NAME, POD_UID, Desired, DesiredWorker, PodView
from shunter.discovery.pods import desired_state as compute_desired
from shunter.fleet.fleet import Fleet
from shunter.fleet.jobs import QueueFull
from shunter.fleet.spec import WorkerSpec
from shunter.fleet.urls import validate_worker_url
from shunter.fleet.worker import Worker, WorkerType

log = logging.getLogger("shunter.discovery")

_ROLES = {"regular": WorkerType.REGULAR, "prefill": WorkerType.PREFILL, "decode": WorkerType.DECODE}


def _ignore(*_: object) -> None:
    pass


@dataclass
class DiscoveryObserver:
    """What discovery tells the outside (metrics) as it happens."""

    registered: Callable[[bool], None] = _ignore  # a registration ended: succeeded or not
    deregistered: Callable[[str], None] = _ignore  # a worker removed, and why
    discovered: Callable[[int], None] = _ignore  # workers the pods say there should be
    synced: Callable[[float], None] = _ignore  # a pass's duration, seconds


@dataclass
class PassResult:
    added: int = 0  # registrations queued
    removed: int = 0
    missing: int = 0  # addable workers not registered yet (a later pass tries again)


class Reconciler:
    def __init__(
        self,
        fleet: Fleet,
        config: DiscoveryConfig,
        pd_mode: bool,
        api_key: str | None,
        max_connection_attempts: int,
        observer: DiscoveryObserver | None = None,
        wake: Callable[[], None] = _ignore,
    ) -> None:
        self.fleet = fleet
        self.config = config
        self.pd_mode = pd_mode
        self.api_key = api_key  # --worker-api-key: what discovered workers are sent
        self.max_connection_attempts = max_connection_attempts
        self.observer = observer or DiscoveryObserver()
        self.wake = wake  # asks for another pass (a registration ended)
        self.pods: dict[str, PodView] = {}  # by uid: the watcher keeps it current
        self._reported: dict[str, str] = {}  # pod key -> the refusal already logged

    def desired(self) -> Desired:
        return compute_desired(list(self.pods.values()), self.config, self.pd_mode)

    def reconcile(self) -> PassResult:
        desired = self.desired()
        self._report_refused(desired.refused)
        self.observer.discovered(len(desired.workers))
        result = PassResult()
        at_address = _by_address(self.fleet.registry.all())
        for address, workers in list(at_address.items()):
            uid = workers[0].labels.get(POD_UID)
            if uid is None:
                continue  # added by hand: never discovery's to touch
            reason = _removal_reason(desired.workers.get(address), uid)
            if reason is not None:
                self._remove(workers[0], address, reason)
                del at_address[address]
                result.removed += 1
        for address, want in desired.workers.items():
            if not want.addable or address in at_address:
                continue
            result.missing += 1
            url = validate_worker_url(address)
            status = self.fleet.job_status(url)
            if status is not None and status.status in ("pending", "processing"):
                continue
            if self._add(want, url):
                result.added += 1
        return result

    def _remove(self, worker: Worker, address: str, reason: str) -> None:
        try:
            self.fleet.remove(worker.base_url)
        except LookupError:
            return  # removed meanwhile
        self.observer.deregistered(reason)
        log.info(
            "discovered worker removed",
            extra={"pod": worker.labels.get(POD_NAME), "url": worker.base_url, "reason": reason},
        )

    def _add(self, want: DesiredWorker, url: str) -> bool:
        spec = WorkerSpec(
            url,
            api_key=self.api_key,
            model_id=want.model_id,
            worker_type=_ROLES[want.role],
            bootstrap_port=want.bootstrap_port,
            labels=want.labels(),
            probe_grpc=True,  # a bare podIP:port: HTTP or gRPC, whichever answers
            max_connection_attempts=self.max_connection_attempts,
        )
        try:
            self.fleet.submit_add(spec, self._registered)
        except QueueFull:
            return False  # the next pass tries again
        log.info(
            "discovered worker queued for registration",
            extra={"pod": want.pod.key, "url": url, "role": want.role},
        )
        return True

    def _registered(self, error: Exception | None) -> None:
        self.observer.registered(error is None)
        self.wake()  # the pod may have changed meanwhile: look again

    def _report_refused(self, refused: dict[str, str]) -> None:
        """Log each refused pod once per reason (a pass runs every few seconds)."""
        for pod, why in refused.items():
            if self._reported.get(pod) != why:
                log.warning("pod skipped: bad annotation", extra={"pod": pod, "error": why})
        self._reported = dict(refused)


def _by_address(workers: tuple[Worker, ...]) -> dict[str, list[Worker]]:
    """Registered workers by bare ``host:port`` (a worker's DP ranks share one)."""
    found: dict[str, list[Worker]] = {}
    for worker in workers:
        found.setdefault(urlsplit(worker.base_url).netloc, []).append(worker)
    return found


def _removal_reason(want: DesiredWorker | None, owned_uid: str) -> str | None:
    """Why an owned worker must go, or None to keep it."""
    if want is None:
        return "pod_gone"
    if want.pod.uid != owned_uid:
        return "pod_replaced"
    if want.pod.terminating:
        return "pod_terminating"
    return None
