"""Two gateway processes whose peers are found from their pods (``--router-selector``) on
the fake API server: a worker registered by hand on one reaches the other, and a gateway
pod deleted is dropped from the other's peers.

Both pods' IP is 127.0.0.1, so each names its own peer port (``shunter.ai/peer-port``);
each gateway knows its own pod by ``$POD_NAME``, as the downward API would give it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from support.fake_kube import FakeKube
from support.harness import Gateway, Proc, Sim, free_port, wait_for

GATEWAYS = {"app": "shunter"}
PEER_PORT = "shunter.ai/peer-port"


def selected_gateway(
    monkeypatch: pytest.MonkeyPatch, name: str, peer_port: int, kubeconfig: Path, worker: str
) -> Gateway:
    monkeypatch.setenv("POD_NAME", name)  # the child process inherits the environment
    return Gateway(
        "--peer-port",
        str(peer_port),
        "--router-selector",
        "app=shunter",
        "--kubeconfig",
        str(kubeconfig),
        workers=[worker],
    )


def peer_stats(gateway: Gateway) -> dict[str, Any]:
    data = httpx.get(gateway.url + "/dashboard/data", timeout=5).json()
    return data["peers"]  # type: ignore[no-any-return]


def test_gateways_found_by_selector_share_workers_and_drop_a_deleted_pod(
    procs: list[Proc], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with FakeKube() as kube:
        kubeconfig = kube.kubeconfig(tmp_path / "kubeconfig")
        worker, extra = Sim("rsel-worker"), Sim("rsel-extra")
        procs += [worker, extra]
        port_a, port_b = free_port(), free_port()
        kube.add_pod("gw-a", labels=GATEWAYS, annotations={PEER_PORT: str(port_a)})
        kube.add_pod("gw-b", labels=GATEWAYS, annotations={PEER_PORT: str(port_b)})
        kube.add_pod("not-a-gateway", labels={"app": "sglang"})
        a = selected_gateway(monkeypatch, "gw-a", port_a, kubeconfig, worker.url)
        procs.append(a)
        b = selected_gateway(monkeypatch, "gw-b", port_b, kubeconfig, worker.url)
        procs.append(b)
        # Each finds the other, not itself, and no worker pod.
        wait_for(lambda: peer_stats(a)["found"] == [f"127.0.0.1:{port_b}"], 10, "A finds B")
        wait_for(lambda: peer_stats(b)["found"] == [f"127.0.0.1:{port_a}"], 10, "B finds A")

        # A worker registered by hand on A is registered on B too.
        added = httpx.post(a.url + "/workers", json={"url": extra.url}, timeout=5)
        assert added.status_code == 202
        b.wait_workers(2)

        # A's pod deleted: B drops A.
        kube.delete("gw-a")
        wait_for(lambda: peer_stats(b)["found"] == [], 10, "B drops A")
        assert peer_stats(a)["found"] == [f"127.0.0.1:{port_b}"]
