"""Two gateway processes peered (--peer-port, --peer-urls): a worker added by hand on one
appears on the other, a prefix one of them placed is routed to the same worker by the
other, and a killed peer neither hurts the survivor nor stays behind once restarted."""

from __future__ import annotations

from typing import Any

import httpx

from support.harness import Gateway, Proc, Sim, free_port, wait_for

SYSTEMS = [f"You are assistant number {i}. " + "Follow the house style. " * 80 for i in range(4)]


def peered(port: int, peer: int, workers: list[str]) -> Gateway:
    return Gateway(
        "--policy",
        "cache_aware",
        "--peer-port",
        str(port),
        "--peer-urls",
        f"127.0.0.1:{peer}",
        workers=workers,
    )


def peer_stats(gateway: Gateway) -> dict[str, Any]:
    data = httpx.get(gateway.url + "/dashboard/data", timeout=5).json()
    return data["peers"]  # type: ignore[no-any-return]


def worker_of(gateway: Gateway, system: str, user: str) -> str:
    body = {
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": 2,
    }
    response = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.headers["x-worker-id"]


def test_two_peered_gateways_share_workers_and_placements(procs: list[Proc]) -> None:
    sims = [Sim(f"peer-{i}") for i in range(3)]
    extra = Sim("peer-extra")
    procs += [*sims, extra]
    port_a, port_b = free_port(), free_port()
    urls = [s.url for s in sims]
    a = peered(port_a, port_b, urls)
    procs.append(a)
    b = peered(port_b, port_a, urls)
    procs.append(b)

    # A worker registered by hand on A is registered on B too.
    added = httpx.post(a.url + "/workers", json={"url": extra.url}, timeout=5)
    assert added.status_code == 202
    b.wait_workers(4)

    # Each prefix A placed, B routes to the same worker (asked in the reverse order, so
    # that B placing them on its own would not land them the same way).
    homes = {i: worker_of(a, system, "first question") for i, system in enumerate(SYSTEMS)}
    wait_for(lambda: peer_stats(b)["decisions_applied"] >= len(SYSTEMS), what="decisions")
    for i in reversed(range(len(SYSTEMS))):
        assert worker_of(b, SYSTEMS[i], "second question") == homes[i], i

    # A dies: B keeps serving, every request answered.
    a.kill()
    for i, system in enumerate(SYSTEMS):
        assert worker_of(b, system, "while A is down") == homes[i]

    # Back, A learns the hand-registered worker from B's snapshot (it was started with the
    # three flag workers only), and hears B's decisions again.
    restarted = Gateway(
        "--policy",
        "cache_aware",
        "--peer-port",
        str(port_a),
        "--peer-urls",
        f"127.0.0.1:{port_b}",
        workers=urls,
    )
    procs.append(restarted)
    restarted.wait_workers(4)
    wait_for(lambda: bool(peer_stats(restarted)["peers"]), what="B heard")
    fresh = "You are a new assistant. " + "Answer briefly. " * 80
    home = worker_of(b, fresh, "after the restart")
    wait_for(lambda: peer_stats(restarted)["decisions_applied"] >= 1, what="catch-up")
    assert worker_of(restarted, fresh, "on A") == home
