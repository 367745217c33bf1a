"""From pods to the workers they should be: the desired state of one reconcile pass.

A pod is reduced to ``PodView`` (what discovery reads of it) where it arrives from the API
server; everything here is a pure function of those views and the settings, so every rule
is tested without a watch. Per pod that its role selector matches, and per port (the
``smg.ai/worker-ports`` annotation's list, else ``--service-discovery-port``):

- the worker's address is the bare ``podIP:port`` (probed as HTTP and as gRPC at
  registration, as for ``--worker-urls``);
- it may be added only when the pod is Running and Ready, has an IP and is not terminating;
- it carries the pod's name and uid (``smg.ai/pod-name``, ``smg.ai/pod-uid``: the uid is how
  discovery knows which workers are its own), its model id (``--model-id-from``), its role,
  and a prefill's bootstrap port (``sglang.ai/bootstrap-port``: one value for every port,
  or a list aligned with them).

A malformed annotation (a port out of range, a list of the wrong length) makes the pod
``refused`` with the reason, never an exception: the pass skips it and logs why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shunter.discovery.config import DiscoveryConfig, Selector

WORKER_PORTS = "smg.ai/worker-ports"
BOOTSTRAP_PORT = "sglang.ai/bootstrap-port"
POD_NAME = "smg.ai/pod-name"
POD_UID = "smg.ai/pod-uid"
POD_NAMESPACE = "smg.ai/pod-namespace"
Role = Literal["regular", "prefill", "decode"]


@dataclass(frozen=True, slots=True)
class PodView:
    """What discovery reads of a pod."""

    name: str
    namespace: str
    uid: str
    ip: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    running: bool = False  # status.phase == Running
    ready: bool = False  # the Ready condition is True
    terminating: bool = False  # metadata.deletionTimestamp is set

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class DesiredWorker:
    address: str  # bare host:port
    pod: PodView
    role: Role
    bootstrap_port: int | None
    model_id: str | None
    addable: bool  # Running, Ready, with an IP, not terminating

    def labels(self) -> dict[str, str]:
        return {POD_NAME: self.pod.name, POD_UID: self.pod.uid, POD_NAMESPACE: self.pod.namespace}


@dataclass
class Desired:
    """One pass's view: the workers pods should be (by address), and pods refused."""

    workers: dict[str, DesiredWorker] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # pod key -> why


def desired_state(pods: list[PodView], config: DiscoveryConfig, pd_mode: bool) -> Desired:
    desired = Desired()
    for pod in pods:
        role = role_of(pod, config, pd_mode)
        if role is None or pod.ip is None:
            continue
        try:
            for worker in workers_of(pod, role, config):
                current = desired.workers.get(worker.address)
                # Two pods on one address (a replacement whose old pod is still leaving):
                # the one that can take requests wins.
                if current is None or (worker.addable and not current.addable):
                    desired.workers[worker.address] = worker
        except ValueError as exc:
            desired.refused[pod.key] = str(exc)
    return desired


def role_of(pod: PodView, config: DiscoveryConfig, pd_mode: bool) -> Role | None:
    """The pod's role by the selectors; None when no selector matches it."""
    if not pd_mode:
        return "regular" if _matches(pod.labels, config.selector) else None
    if _matches(pod.labels, config.prefill_selector):
        return "prefill"
    if _matches(pod.labels, config.decode_selector):
        return "decode"
    return None


def _matches(labels: dict[str, str], selector: Selector) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def workers_of(pod: PodView, role: Role, config: DiscoveryConfig) -> list[DesiredWorker]:
    """The workers of one pod; ValueError saying what is wrong with its annotations."""
    assert pod.ip is not None
    ports = _ports(pod.annotations.get(WORKER_PORTS), WORKER_PORTS) or [config.port]
    bootstraps: list[int | None] = [None] * len(ports)
    if role == "prefill" and BOOTSTRAP_PORT in pod.annotations:
        given = _ports(pod.annotations[BOOTSTRAP_PORT], BOOTSTRAP_PORT)
        if len(given) == 1:
            bootstraps = [given[0]] * len(ports)
        elif len(given) == len(ports):
            bootstraps = list(given)
        else:
            raise ValueError(
                f"{BOOTSTRAP_PORT} lists {len(given)} ports for {len(ports)} worker ports; "
                "give one, or one per port"
            )
    host = f"[{pod.ip}]" if ":" in pod.ip else pod.ip
    addable = pod.running and pod.ready and not pod.terminating
    model = model_id(pod, config.model_id_from)
    return [
        DesiredWorker(f"{host}:{port}", pod, role, bootstrap, model, addable)
        for port, bootstrap in zip(ports, bootstraps, strict=True)
    ]


def _ports(text: str | None, what: str) -> list[int]:
    if text is None or not text.strip():
        return []
    ports = []
    for part in text.split(","):
        part = part.strip()
        if not (part.isascii() and part.isdigit() and 0 < int(part) < 65536):
            raise ValueError(f"{what} {text!r}: {part!r} is not a port (1-65535)")
        ports.append(int(part))
    return ports


def model_id(pod: PodView, source: str | None) -> str | None:
    """The model id ``--model-id-from`` names for this pod (None: ask the worker)."""
    if source is None:
        return None
    if source == "namespace":
        return pod.namespace
    kind, key = source.split(":", 1)
    return (pod.labels if kind == "label" else pod.annotations).get(key) or None
