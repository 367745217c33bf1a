"""The other gateways' pods as peers (``--router-selector``): which pods count, and the
peer set kept current through the real watcher against the fake API server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from shunter.discovery.config import DiscoveryConfig
from shunter.discovery.gateways import PEER_PORT, GatewayPods, peer_endpoints
from shunter.discovery.pods import PodView
from shunter.discovery.watcher import kube_client

from support.fake_kube import FakeKube

GATEWAYS = {"app": "shunter"}


def pod(name: str, ip: str | None = "10.0.0.1", **fields: object) -> PodView:
    values: dict[str, object] = {"running": True, "ready": True, "labels": GATEWAYS}
    return PodView(name=name, namespace="ns", uid=name, ip=ip, **{**values, **fields})  # type: ignore[arg-type]


def test_only_running_ready_addressed_pods_other_than_this_one_are_peers() -> None:
    pods = [
        pod("a", "10.0.0.1"),
        pod("self", "10.0.0.2"),
        pod("not-ready", "10.0.0.3", ready=False),
        pod("pending", "10.0.0.4", running=False),
        pod("no-ip", None),
        pod("leaving", "10.0.0.5", terminating=True),
        pod("v6", "fd00::7"),
    ]
    assert peer_endpoints(pods, 7000, "self") == {"10.0.0.1:7000", "[fd00::7]:7000"}


def test_an_annotation_names_a_pods_own_port_and_workers_give_a_range() -> None:
    pods = [pod("a", "10.0.0.1", annotations={PEER_PORT: "7100"}), pod("b", "10.0.0.2")]
    assert peer_endpoints(pods, 7000, "self", processes=2) == {
        "10.0.0.1:7100",
        "10.0.0.1:7101",
        "10.0.0.2:7000",
        "10.0.0.2:7001",
    }
    bad = [pod("a", "10.0.0.1", annotations={PEER_PORT: "seventy"})]
    assert peer_endpoints(bad, 7000, "self") == {"10.0.0.1:7000"}


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_the_peer_set_follows_the_gateway_pods(tmp_path: Path) -> None:
    with FakeKube() as kube:
        path = kube.kubeconfig(tmp_path / "kubeconfig")
        kube.add_pod("gw-self", labels=GATEWAYS, ip="10.0.0.1")
        kube.add_pod("gw-b", labels=GATEWAYS, ip="10.0.0.2")
        kube.add_pod("worker", labels={"app": "sglang"}, ip="10.0.0.9")
        found: list[frozenset[str]] = []
        config = DiscoveryConfig(router_selector=GATEWAYS, resync_secs=30.0)
        pods = GatewayPods(
            config, 7000, found.append, own_name="gw-self", client=lambda: kube_client(str(path))
        )
        pods.start()
        try:
            await until(lambda: bool(found))
            assert found[-1] == {"10.0.0.2:7000"}
            kube.add_pod("gw-c", labels=GATEWAYS, ip="10.0.0.3", ready=False)
            kube.set_ready("gw-c", True)
            await until(lambda: found[-1] == {"10.0.0.2:7000", "10.0.0.3:7000"})
            kube.delete("gw-b")
            await until(lambda: found[-1] == {"10.0.0.3:7000"})
            kube.set_ready("gw-c", False)
            await until(lambda: found[-1] == frozenset())
            # Only changes are told: the not-ready pod added, then made ready, is one change.
            assert found == [
                {"10.0.0.2:7000"},
                {"10.0.0.2:7000", "10.0.0.3:7000"},
                {"10.0.0.3:7000"},
                frozenset(),
            ]
            assert {r.query.get("labelSelector") for r in kube.requests} == {"app=shunter"}
        finally:
            await pods.stop()
