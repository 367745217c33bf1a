"""Discovery running in a whole gateway (on a mock network of engines), fed by the fake
API server through the real client: passes, readiness, metrics, the retry of engines."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shunter.discovery import service as service_module
from shunter.discovery import watcher as watcher_module
from shunter.discovery.config import DiscoveryConfig
from shunter.discovery.service import Discovery
from shunter.gateway import Gateway

from support.fake_kube import FakeKube
from support.fakes import Engines, call, gateway

LABELS = {"app": "worker"}


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as fake:
        yield fake


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Short pauses: settle 10 ms, the first retry of a pass 50 ms, API backoff 20 ms."""
    monkeypatch.setattr(service_module, "SETTLE_SECS", 0.01)
    monkeypatch.setattr(service_module, "FIRST_RETRY_SECS", 0.05)
    monkeypatch.setattr(watcher_module, "FIRST_BACKOFF_SECS", 0.02)
    monkeypatch.setattr(watcher_module, "MAX_BACKOFF_SECS", 0.08)
    caplog.set_level(logging.INFO, "shunter.discovery")


class Running:
    def __init__(self, gw: Gateway, engines: Engines) -> None:
        self.gw = gw
        self.engines = engines
        assert gw.discovery is not None
        self.discovery: Discovery = gw.discovery

    def urls(self) -> dict[str, str | None]:
        """Registered URL -> its pod uid label."""
        return {w.url: w.labels.get("smg.ai/pod-uid") for w in self.gw.fleet.registry.all()}

    async def until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.005)

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        answer = await call(self.gw.app, "GET", "/readiness")
        return answer.status, answer.json()


@pytest.fixture
async def start(kube: FakeKube, tmp_path: Path) -> AsyncIterator[Callable[..., Running]]:
    """Start a gateway whose discovery watches the fake (``kubeconfig`` overrides)."""
    started: list[Gateway] = []
    default = str(kube.kubeconfig(tmp_path / "kubeconfig"))

    def run(*urls: str, kubeconfig: str = default, **fields: Any) -> Running:
        engines = Engines()
        values: dict[str, Any] = {
            "enabled": True,
            "selector": LABELS,
            "port": 8000,
            "kubeconfig": kubeconfig,
            "resync_secs": 30.0,
        }
        config = DiscoveryConfig(**{**values, **fields})
        gw = gateway(urls, network=engines, discovery=config, worker_startup_check_interval=0.01)
        gw.start()
        started.append(gw)
        return Running(gw, engines)

    yield run
    for gw in started:
        await gw.close()


async def test_pods_become_workers_and_leave(kube: FakeKube, start: Callable[..., Running]) -> None:
    kube.add_pod("a", ip="10.0.0.1", labels=LABELS)
    running = start()
    await running.until(lambda: running.urls() == {"http://10.0.0.1:8000": uid(kube, "a")})
    assert running.discovery.problem is None
    kube.add_pod("b", ip="10.0.0.2", labels=LABELS, annotations={"smg.ai/worker-ports": "1,2"})
    await running.until(lambda: len(running.urls()) == 3)
    kube.terminate("a")
    await running.until(lambda: len(running.urls()) == 2)
    kube.delete("a")
    kube.set_labels("b", {"app": "other"})
    await running.until(lambda: running.urls() == {})
    metrics = running.gw.metrics
    assert metrics.discovery_registrations == {("kubernetes", "success"): 3}
    assert metrics.discovery_deregistrations == {("pod_terminating",): 1, ("pod_gone",): 2}
    assert metrics.discovery_discovered == 0 and metrics.discovery_sync


def uid(kube: FakeKube, name: str) -> str:
    return str(kube.pod(name)["metadata"]["uid"])


async def test_readiness_names_a_refusal_until_it_is_lifted(
    kube: FakeKube, start: Callable[..., Running]
) -> None:
    kube.add_pod("a", namespace="prod", ip="10.0.0.1", labels=LABELS)
    kube.forbid()
    running = start(namespace="prod")
    status, body = await running.readiness()
    assert (status, body["reason"]) == (503, "service discovery has not listed the pods yet")
    await running.until(lambda: running.discovery.watcher.failure is not None)
    status, body = await running.readiness()
    assert status == 503
    assert body["reason"].startswith("the API server forbids the gateway to list pods (403 ")
    assert body["reason"].endswith("on pods in namespace prod (a Role and RoleBinding)")
    kube.forbid(False)
    await running.until(lambda: len(running.urls()) == 1)
    assert (await running.readiness())[0] == 200
    # A refusal after a first view is reported too: it lasts until someone fixes RBAC.
    kube.forbid()
    kube.sever_watches()
    await running.until(lambda: running.discovery.problem is not None)
    assert (await running.readiness())[0] == 503
    assert running.urls() != {}  # the workers stay: the view is stale, not empty
    kube.forbid(False)
    await running.until(lambda: running.discovery.problem is None)


async def test_no_pass_runs_before_the_first_list(
    tmp_path: Path, start: Callable[..., Running]
) -> None:
    running = start("http://10.9.9.9:80", kubeconfig=str(tmp_path / "missing"))
    await running.until(lambda: running.discovery.watcher.failure is not None)
    assert running.discovery.problem is not None
    assert "ConfigError" in running.discovery.problem
    await running.until(lambda: len(running.urls()) == 1)
    running.discovery.wake()  # as a registration ending does
    await running.until(lambda: not running.discovery._wake.is_set())  # the loop looked
    assert running.gw.metrics.discovery_sync == {}  # no pass: it would see no pods
    assert running.urls() == {"http://10.9.9.9:80": None}


async def test_an_engine_not_up_is_retried_sooner_than_the_resync(
    kube: FakeKube, start: Callable[..., Running]
) -> None:
    kube.add_pod("a", ip="10.0.0.1", labels=LABELS)
    running = start(resync_secs=60.0)
    running.engines.down.add("10.0.0.1")
    await running.until(
        lambda: running.gw.metrics.discovery_registrations.get(("kubernetes", "failure"), 0) >= 1,
        timeout=10,
    )
    running.engines.down.clear()
    await running.until(lambda: len(running.urls()) == 1)


async def test_a_failing_pass_is_logged_and_the_next_one_runs(
    kube: FakeKube, start: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    running = start()
    reconcile = running.discovery.reconciler.reconcile
    failures = iter([RuntimeError("a bug")])

    def flaky() -> Any:
        for error in failures:
            raise error
        return reconcile()

    running.discovery.reconciler.reconcile = flaky  # type: ignore[method-assign]
    await running.until(lambda: running.discovery.watcher.listed)
    kube.add_pod("a", ip="10.0.0.1", labels=LABELS)
    await running.until(lambda: len(running.urls()) == 1)
    assert "reconcile pass failed" in caplog.messages
