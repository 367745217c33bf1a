"""Reconcile passes against a real fleet on a mock network (the engines answer through
``Workers``; pods are set by hand: the watch has its own tests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shunter.discovery.config import DiscoveryConfig
from shunter.discovery.pods import PodView
from shunter.discovery.reconciler import DiscoveryObserver, Reconciler
from shunter.fleet.spec import WorkerSpec
from shunter.gateway import Gateway
from shunter.wire.mock import MockRequest, MockResponse

from support.fakes import Workers, gateway

CONFIG = DiscoveryConfig(enabled=True, selector={"app": "w"}, port=8000)


class Engines(Workers):
    """Every address answers, except those in ``down`` (an engine still loading)."""

    def __init__(self) -> None:
        super().__init__()
        self.down: set[str] = set()

    def _control(self, request: MockRequest) -> MockResponse:
        if any(address in request.url for address in self.down):
            return MockResponse(503)
        return super()._control(request)


class Passes:
    def __init__(self, gw: Gateway, engines: Engines) -> None:
        self.gw = gw
        self.engines = engines
        self.events: list[tuple[str, Any]] = []
        observer = DiscoveryObserver(
            registered=lambda ok: self.events.append(("registered", ok)),
            deregistered=lambda why: self.events.append(("removed", why)),
        )
        self.reconciler = Reconciler(gw.fleet, CONFIG, False, "worker-key", 2, observer)

    def set(self, *pods: PodView) -> None:
        self.reconciler.pods.clear()
        self.reconciler.pods.update({p.uid: p for p in pods})

    async def settle(self) -> None:
        """Run a pass, and wait for the registrations it queued."""
        self.reconciler.reconcile()
        await self.jobs()

    async def jobs(self) -> None:
        for _ in range(500):
            if not self.gw.fleet.jobs._tasks:
                return
            await asyncio.sleep(0.002)
        raise AssertionError("registrations never ended")

    def urls(self) -> dict[str, str | None]:
        """Registered URL -> its pod uid label."""
        return {w.url: w.labels.get("smg.ai/pod-uid") for w in self.gw.fleet.registry.all()}


@pytest.fixture
async def passes() -> AsyncIterator[Passes]:
    engines = Engines()
    gw = gateway((), network=engines, worker_startup_check_interval=0.01)
    gw.start()
    yield Passes(gw, engines)
    await gw.close()


def pod(name: str, port: int, **fields: Any) -> PodView:
    values: dict[str, Any] = {
        "namespace": "ns",
        "uid": f"uid-{name}",
        "ip": "127.0.0.1",
        "labels": {"app": "w"},
        "annotations": {"smg.ai/worker-ports": str(port)},
        "running": True,
        "ready": True,
        **fields,
    }
    return PodView(name, **values)


async def test_a_ready_pod_is_registered_with_its_pod_labels_and_the_worker_key(
    passes: Passes,
) -> None:
    passes.set(pod("a", 1001), pod("b", 1002, ready=False))
    await passes.settle()
    assert passes.urls() == {"http://127.0.0.1:1001": "uid-a"}
    (worker,) = passes.gw.fleet.registry.all()
    assert worker.labels["smg.ai/pod-name"] == "a" and worker.api_key == "worker-key"
    assert passes.events == [("registered", True)]
    passes.set(pod("a", 1001), pod("b", 1002))  # b turns Ready
    await passes.settle()
    assert set(passes.urls()) == {"http://127.0.0.1:1001", "http://127.0.0.1:1002"}


async def test_a_pod_that_turns_not_ready_keeps_its_worker(passes: Passes) -> None:
    passes.set(pod("a", 1001))
    await passes.settle()
    passes.set(pod("a", 1001, ready=False))
    await passes.settle()
    assert passes.urls() == {"http://127.0.0.1:1001": "uid-a"}


@pytest.mark.parametrize(
    ("after", "reason"),
    [
        ((), "pod_gone"),  # deleted, force-deleted, or no longer selected
        ((pod("a", 1001, terminating=True),), "pod_terminating"),
        ((pod("a", 1001, uid="uid-new"),), "pod_replaced"),
    ],
)
async def test_an_owned_worker_is_removed_when_its_pod_goes(
    passes: Passes, after: tuple[PodView, ...], reason: str
) -> None:
    passes.set(pod("a", 1001))
    await passes.settle()
    passes.set(*after)
    await passes.settle()
    assert ("removed", reason) in passes.events
    if reason == "pod_replaced":  # the new pod's worker took its place
        assert passes.urls() == {"http://127.0.0.1:1001": "uid-new"}
    else:
        assert passes.urls() == {}


async def test_workers_added_by_hand_are_never_touched(passes: Passes) -> None:
    passes.gw.fleet.submit_add(WorkerSpec("http://127.0.0.1:1001"))
    await passes.jobs()
    passes.set(pod("a", 1001), pod("b", 1002))  # a pod on the manual worker's address
    await passes.settle()
    assert passes.urls() == {"http://127.0.0.1:1001": None, "http://127.0.0.1:1002": "uid-b"}
    passes.set()  # every pod gone
    await passes.settle()
    assert passes.urls() == {"http://127.0.0.1:1001": None}


async def test_an_engine_not_up_yet_is_queued_again_on_later_passes(passes: Passes) -> None:
    passes.engines.down.add("127.0.0.1:1001")
    passes.set(pod("a", 1001))
    await passes.settle()  # two probes, then the registration gives up
    assert passes.urls() == {} and passes.events == [("registered", False)]
    result = passes.reconciler.reconcile()
    assert result.missing == 1 and result.added == 1  # queued again
    again = passes.reconciler.reconcile()
    assert again.added == 0  # its registration is still running: not queued twice
    await passes.jobs()
    passes.engines.down.clear()  # the engine has loaded its model
    await passes.settle()
    assert passes.urls() == {"http://127.0.0.1:1001": "uid-a"}
