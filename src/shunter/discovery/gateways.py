"""The other gateways, found from their pods (``--router-selector``): the peers of replicas.

The pods the selector matches are watched with the same LIST+WATCH as the workers'
(``watcher.py``: relist, backoff, 401/403 reported), and every change recomputes the set of
peer endpoints, ``podIP:port``, handed to ``found`` (the peer exchange subscribes to new
ones and drops those gone). ``peer_endpoints`` is a pure function of the pods:

- a pod counts when it is Running and Ready, has an IP and is not terminating. Ready
  matters: a gateway is not Ready until it has a healthy worker, and it needs no one to
  listen to it before then (it serves nothing), while it subscribes to the Ready ones at
  once and so learns their hand-registered workers;
- its port is ``--peer-port`` (every gateway uses the same), unless its
  ``shunter.ai/peer-port`` annotation names another (gateways sharing one address); with
  ``--workers N`` a pod has N peer ports from that port on (child ``i`` binds ``port + i``);
- this gateway's own pod is left out: the pod named ``$POD_NAME`` (give it from the
  downward API), else the host name, which Kubernetes sets to the pod's name. Were it
  ever included, nothing would break: the exchange ignores its own messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterable

from lightkube import AsyncClient

from shunter.discovery.config import DiscoveryConfig
from shunter.discovery.pods import PodView
from shunter.discovery.watcher import PodWatcher

log = logging.getLogger("shunter.discovery")

PEER_PORT = "shunter.ai/peer-port"


def own_pod_name() -> str:
    """This gateway's pod: ``$POD_NAME``, else the host name (a pod's name in Kubernetes)."""
    return os.environ.get("POD_NAME") or socket.gethostname()


def peer_endpoints(
    pods: Iterable[PodView], port: int, own_name: str, processes: int = 1
) -> frozenset[str]:
    """The peer endpoints (``host:port``) of the gateway pods that can be peers now."""
    endpoints: set[str] = set()
    for pod in pods:
        if not (pod.running and pod.ready and pod.ip) or pod.terminating:
            continue
        if pod.name == own_name:
            continue
        first = _annotated_port(pod) or port
        host = f"[{pod.ip}]" if ":" in pod.ip else pod.ip
        endpoints.update(f"{host}:{first + i}" for i in range(processes))
    return frozenset(endpoints)


def _annotated_port(pod: PodView) -> int | None:
    text = pod.annotations.get(PEER_PORT)
    if text is None:
        return None
    text = text.strip()
    if text.isascii() and text.isdigit() and 0 < int(text) < 65536:
        return int(text)
    log.warning(
        "a gateway pod's peer port annotation is not a port; using --peer-port",
        extra={"pod": pod.key, "annotation": PEER_PORT, "value": text},
    )
    return None


class GatewayPods:
    """Watches the gateways' pods and tells ``found`` the peer endpoints on every change."""

    def __init__(
        self,
        config: DiscoveryConfig,
        port: int,
        found: Callable[[frozenset[str]], None],
        *,
        processes: int = 1,
        own_name: str | None = None,
        client: Callable[[], AsyncClient] | None = None,
    ) -> None:
        self.port = port
        self.processes = processes
        self.own_name = own_name or own_pod_name()
        self.found = found
        self.pods: dict[str, PodView] = {}
        self.watcher = PodWatcher(
            config, self.pods, self._changed, client, selector=config.router_selector
        )
        self.endpoints: frozenset[str] = frozenset()
        self._task: asyncio.Task[None] | None = None

    def _changed(self) -> None:
        endpoints = peer_endpoints(self.pods.values(), self.port, self.own_name, self.processes)
        if endpoints != self.endpoints:
            self.endpoints = endpoints
            self.found(endpoints)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.watcher.run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
