"""The pods discovery sees: LIST, then WATCH from the list's version, on lightkube.

lightkube is the client (small, typed, asyncio; kubernetes-asyncio was the alternative:
untyped, ten times the size, on aiohttp). The label selector goes to the API server, so
only selected pods cross the wire.

The cache of pods is replaced whole on every LIST and patched by each watch event; every
change asks the reconciler for a pass. Anything that ends a watch starts over with a LIST:
a ``410 Gone`` (the version is too old: the server compacted its history), a dropped
connection, an API error. So a deletion missed while disconnected is found by the next
LIST, and the pass that follows converges. Every ``resync_secs`` the watch is ended on
purpose for a full LIST.

Failures wait a backoff, 0.5 s doubling to 30 s, which starts over only once a watch has
proven healthy (it delivered an event, reached its deadline or expired with a 410): a
server that answers the LIST but drops or refuses every WATCH is asked ever less often,
never in a loop. After a failed watch the next one's deadline is ``PROBATION_SECS``, not the
resync interval, so that a quiet watch that works proves it in 2 s (and a fixed RBAC rule
shows on ``/readiness`` then, not a minute later). Each failure is logged once, however
often it repeats, and its end once.

A 401 or 403 means the gateway's credentials or its permissions are wrong: the message
names what to grant, and ``Failure.denied`` marks it, so ``/readiness`` reports it even
after a first LIST (a LIST that works is no view while the WATCH is refused, and RBAC
does not fix itself). It is retried with the backoff: RBAC may be fixed while we run.

What lightkube 1.0 raises, read in its source (``core/generic_client.py``:
``GenericAsyncClient.watch``, ``handle_response``, ``transform_exception``; proven against
the fake API server in ``tests/unit/test_fake_kube.py``):

- LIST: an error status is ``ApiError`` (``status.code``, ``status.message``) when the
  answer's Content-Type is exactly ``application/json``, else a plain
  ``httpx2.HTTPStatusError``; no answer is an ``httpx2.TransportError`` (``ConnectError``,
  a timeout after the client's 10 s).
- WATCH: lightkube calls ``raise_for_status()`` on the streamed answer itself, so an error
  status (401, 403) is a plain ``httpx2.HTTPStatusError`` (``response.status_code``; the
  body is never read), not an ApiError. A 410 arrives as an ERROR event in the stream:
  ``ApiError`` with ``status.code == 410`` and no response. A connection dropped
  mid-stream is ``httpx2.RemoteProtocolError`` (closed) or ``httpx2.ReadError`` (reset).
  A stream the server ends cleanly is re-opened by lightkube from the last version it
  yielded: the iteration never ends by itself, and a watch has no read timeout (a silent
  connection would block for ever), hence the resync deadline around it.
- The watch is an async generator that closes its response only in a ``finally``: left
  other than by its own error (a deadline, an error in the loop's body) it holds the
  connection open until the garbage collector finalises it, so it is iterated under
  ``contextlib.aclosing``, which closes it before the next LIST.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import httpx2
from lightkube import ALL_NS, ApiError, AsyncClient, KubeConfig
from lightkube.resources.core_v1 import Pod

from shunter.discovery.config import DiscoveryConfig, Selector
from shunter.discovery.pods import PodView

log = logging.getLogger("shunter.discovery")

FIRST_BACKOFF_SECS = 0.5
MAX_BACKOFF_SECS = 30.0
PROBATION_SECS = 2.0

Step = Literal["list", "watch"]


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


@dataclass(frozen=True)
class Failure:
    """Why the last LIST or WATCH failed."""

    step: Step
    message: str
    denied: bool = False  # a 401 or 403: credentials or RBAC


class PodWatcher:
    def __init__(
        self,
        config: DiscoveryConfig,
        pods: dict[str, PodView],
        changed: Callable[[], None],
        client: Callable[[], AsyncClient] | None = None,
        selector: Selector | None = None,
    ) -> None:
        self.config = config
        # What the API server filters on: the workers' selector, unless another is given
        # (the gateways' own pods, for --router-selector).
        self.selector = config.server_selector() if selector is None else dict(selector)
        self.pods = pods  # by uid, shared with the reconciler
        self.changed = changed
        self._client_factory = client or (lambda: kube_client(config.kubeconfig))
        self._client: AsyncClient | None = None
        self._backoff = FIRST_BACKOFF_SECS
        self.listed = False  # a LIST has succeeded at least once
        self.failure: Failure | None = None  # the last failure, until that step works

    @property
    def error(self) -> str | None:
        return None if self.failure is None else self.failure.message

    async def run(self) -> None:
        """LIST and WATCH until cancelled."""
        try:
            while True:
                if not await self._list_and_watch():
                    await asyncio.sleep(self._backoff)
                    self._backoff = min(self._backoff * 2, MAX_BACKOFF_SECS)
        finally:
            await self._drop_client()

    async def _list_and_watch(self) -> bool:
        """One LIST and the WATCH from its version; False when either failed."""
        try:
            if self._client is None:
                self._client = self._client_factory()
            version = await self._list(self._client)
        except Exception as exc:
            await self._failed(_failure("list", exc, self.config.namespace))
            return False
        deadline = self.config.resync_secs
        if self.failure is not None and self.failure.step == "watch":
            deadline = min(deadline, PROBATION_SECS)
        try:
            async with asyncio.timeout(deadline):
                await self._watch(self._client, version)
        except TimeoutError:
            self._healthy()  # open until its deadline: time for a full LIST
        except ApiError as exc:
            if exc.status.code != 410:
                await self._failed(_failure("watch", exc, self.config.namespace))
                return False
            log.info("pod watch expired (410 Gone); listing again")
            self._healthy()
        except Exception as exc:
            await self._failed(_failure("watch", exc, self.config.namespace))
            return False
        return True

    async def _list(self, client: AsyncClient) -> str:
        listing = client.list(Pod, namespace=self._namespace(), labels=self._labels())
        pods = {}
        async for pod in listing:
            view = pod_view(pod)
            pods[view.uid] = view
        self.pods.clear()
        self.pods.update(pods)
        if not self.listed:
            log.info("pods listed", extra={"pods": len(pods)})
        self.listed = True
        if self.failure is not None and self.failure.step == "list":
            self._recovered()
        self.changed()
        return listing.resourceVersion

    async def _watch(self, client: AsyncClient, version: str) -> None:
        # lightkube types it AsyncIterable; it is an async generator (see the docstring).
        events = cast(
            AsyncGenerator[tuple[str, Pod], None],
            client.watch(
                Pod, namespace=self._namespace(), labels=self._labels(), resource_version=version
            ),
        )
        async with contextlib.aclosing(events):
            async for kind, pod in events:
                self._healthy()
                if kind == "BOOKMARK":
                    continue
                view = pod_view(pod)
                if kind == "DELETED":
                    self.pods.pop(view.uid, None)
                else:
                    self.pods[view.uid] = view
                self.changed()

    def _healthy(self) -> None:
        """The watch works: the backoff starts over, and a watch failure is over."""
        self._backoff = FIRST_BACKOFF_SECS
        if self.failure is not None and self.failure.step == "watch":
            self._recovered()

    def _recovered(self) -> None:
        log.info("service discovery recovered", extra={"after": self.error})
        self.failure = None

    async def _failed(self, failure: Failure) -> None:
        """Note the failure (logged when it is new) and start the next try on a fresh
        client: the kubeconfig or the token may have changed."""
        if failure != self.failure:
            level = logging.ERROR if failure.denied or not self.listed else logging.WARNING
            log.log(level, "service discovery failed; retrying", extra={"error": failure.message})
        self.failure = failure
        await self._drop_client()

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    def _namespace(self) -> str:
        return self.config.namespace or ALL_NS

    def _labels(self) -> dict[str, Any]:  # lightkube takes operators too
        return dict(self.selector)


def _failure(step: Step, exc: Exception, namespace: str | None) -> Failure:
    """What went wrong, said so that whoever runs the gateway knows what to fix."""
    if isinstance(exc, httpx2.HTTPStatusError):
        if isinstance(exc, ApiError):  # a decoded Status: its code and message
            code, detail = exc.status.code, exc.status.message or ""
        else:  # a WATCH's status (lightkube does not read its body)
            code, detail = exc.response.status_code, exc.response.reason_phrase
        if code == 401:
            return Failure(
                step,
                f"the API server refused the gateway's credentials (401 {detail}) when it "
                f"tried to {step} pods; check the kubeconfig or the service account token",
                denied=True,
            )
        if code == 403:
            scope = (
                f"in namespace {namespace} (a Role and RoleBinding)"
                if namespace
                else "cluster-wide (a ClusterRole and ClusterRoleBinding)"
            )
            return Failure(
                step,
                f"the API server forbids the gateway to {step} pods (403 {detail}); grant its "
                f"service account list and watch on pods {scope}",
                denied=True,
            )
        return Failure(step, f"the API server answered {code} to a {step} of pods: {detail}")
    if isinstance(exc, httpx2.TransportError):
        where = f" at {exc.request.url.copy_with(query=None)}" if _has_request(exc) else ""
        return Failure(step, f"cannot reach the Kubernetes API server{where}: {exc!r}")
    return Failure(step, f"the pod {step} failed: {exc!r}")


def _has_request(exc: httpx2.TransportError) -> bool:
    try:
        exc.request  # noqa: B018  (httpx raises RuntimeError when it has none)
    except RuntimeError:
        return False
    return True
