"""The pods discovery sees: LIST, then WATCH from the list's version, on lightkube.

lightkube is the client (small, typed, asyncio; kubernetes-asyncio was the alternative:
untyped, ten times the size, on aiohttp). The label selector goes to the API server, so
only selected pods cross the wire.

The cache of pods is replaced whole on every LIST and patched by each watch event; every
change asks the reconciler for a pass. Anything that ends a watch starts over with a LIST:
a ``410 Gone`` (the version is too old: the server compacted its history), a dropped
connection, an API error. So a deletion missed while disconnected is found by the next
LIST, and the pass that follows converges. Failures wait a backoff (0.5 s doubling to 30 s);
a 410 does not. Every ``resync_secs`` the watch is ended on purpose for a full LIST.

A 403 means the gateway's service account lacks a permission: said once, plainly, with what
to grant, and retried with the backoff (RBAC may be fixed while we run).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from lightkube import ALL_NS, ApiError, AsyncClient, KubeConfig
from lightkube.resources.core_v1 import Pod

from shunter.discovery.config import DiscoveryConfig
from shunter.discovery.pods import PodView

log = logging.getLogger("shunter.discovery")

FIRST_BACKOFF_SECS = 0.5
MAX_BACKOFF_SECS = 30.0


def pod_view(pod: Any) -> PodView:
    """What discovery reads of a lightkube ``Pod``."""
    meta, status = pod.metadata, pod.status
    conditions = (status.conditions if status is not None else None) or []
    return PodView(
        name=meta.name or "",
        namespace=meta.namespace or "",
        uid=meta.uid or "",
        ip=(status.podIP if status is not None else None) or None,
        labels=dict(meta.labels or {}),
        annotations=dict(meta.annotations or {}),
        running=status is not None and status.phase == "Running",
        ready=any(c.type == "Ready" and c.status == "True" for c in conditions),
        terminating=meta.deletionTimestamp is not None,
    )


def kube_client(kubeconfig: str | None) -> AsyncClient:
    """In-cluster config in a pod, else ``kubeconfig``, else ``$KUBECONFIG`` or
    ``~/.kube/config``, as every Kubernetes client finds its cluster."""
    config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
    return AsyncClient(config)


class PodWatcher:
    def __init__(
        self,
        config: DiscoveryConfig,
        pods: dict[str, PodView],
        changed: Callable[[], None],
        client: Callable[[], AsyncClient] | None = None,
    ) -> None:
        self.config = config
        self.pods = pods  # by uid, shared with the reconciler
        self.changed = changed
        self._client_factory = client or (lambda: kube_client(config.kubeconfig))
        self.listed = False  # a LIST has succeeded at least once
        self.error: str | None = None  # why the last attempt failed, until one succeeds

    async def run(self) -> None:
        """LIST and WATCH until cancelled."""
        backoff = FIRST_BACKOFF_SECS
        client: AsyncClient | None = None
        while True:
            try:
                if client is None:
                    client = self._client_factory()
                version = await self._list(client)
                backoff = FIRST_BACKOFF_SECS
                async with asyncio.timeout(self.config.resync_secs):
                    await self._watch(client, version)
                log.info("pod watch ended; listing again")
            except TimeoutError:
                continue  # time for the periodic full LIST
            except ApiError as exc:
                if exc.status.code == 410:
                    log.info("pod watch expired (410 Gone); listing again")
                    continue
                self._failed(_api_error(exc, self.config.namespace))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(f"cannot reach the Kubernetes API server: {exc!r}")
                client = None  # a fresh client: the config may have been the problem
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECS)

    def _failed(self, error: str) -> None:
        if error != self.error:
            log.error("service discovery failed; retrying", extra={"error": error})
        self.error = error

    async def _list(self, client: AsyncClient) -> str:
        listing = client.list(Pod, namespace=self._namespace(), labels=self._labels())
        pods = {}
        async for pod in listing:
            view = pod_view(pod)
            pods[view.uid] = view
        self.pods.clear()
        self.pods.update(pods)
        if self.error is not None or not self.listed:
            log.info("pods listed", extra={"pods": len(pods)})
        self.listed, self.error = True, None
        self.changed()
        return listing.resourceVersion

    async def _watch(self, client: AsyncClient, version: str) -> None:
        watch = client.watch(
            Pod, namespace=self._namespace(), labels=self._labels(), resource_version=version
        )
        async for kind, pod in watch:
            if kind == "BOOKMARK":
                continue
            view = pod_view(pod)
            if kind == "DELETED":
                self.pods.pop(view.uid, None)
            else:
                self.pods[view.uid] = view
            self.changed()

    def _namespace(self) -> str:
        return self.config.namespace or ALL_NS

    def _labels(self) -> dict[str, Any]:  # lightkube takes operators too
        return dict(self.config.server_selector())


def _api_error(exc: ApiError, namespace: str | None) -> str:
    code = exc.status.code
    if code in (401, 403):
        scope = f"in namespace {namespace}" if namespace else "cluster-wide (a ClusterRole)"
        return (
            f"the API server refused to list or watch pods ({code}: {exc.status.message}); "
            f"grant the gateway's service account get, list and watch on pods {scope}"
        )
    return f"the API server answered {code}: {exc.status.message}"
