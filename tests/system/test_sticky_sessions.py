"""Sticky sessions end to end: a gateway with --sticky-sessions before three sims (so that
once the key's worker is removed, staying on its new one is not the only choice left)."""

from __future__ import annotations

from urllib.parse import quote

import httpx

from support.harness import Gateway, Proc, Sim, wait_for


def served_by(gateway: Gateway, key: str) -> str:
    answer = httpx.post(
        gateway.url + "/v1/completions",
        json={"prompt": "hello", "max_tokens": 1},
        headers={"x-session-id": key},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return answer.headers["x-worker-id"]


def test_a_key_survives_its_workers_brief_unavailability_and_moves_when_it_is_removed(
    procs: list[Proc],
) -> None:
    sims = {name: Sim(name) for name in ("s1", "s2", "s3")}
    procs += sims.values()
    gateway = Gateway(
        "--policy",
        "round_robin",
        "--sticky-sessions",
        "--routing-key-headers",
        "x-session-id",
        "--health-check-interval-secs",
        "0.1",
        "--health-failure-threshold",
        "1",
        "--health-success-threshold",
        "1",
        workers=[s.url for s in sims.values()],
    )
    procs.append(gateway)
    home = served_by(gateway, "agent-7")
    assert {served_by(gateway, "agent-7") for _ in range(4)} == {home}
    sim = sims[home]

    def healthy() -> bool:
        return bool(next(w for w in gateway.workers() if w["url"] == sim.url)["is_healthy"])

    sim.set_faults(fail_health=True)
    wait_for(lambda: not healthy(), 10, f"{home} marked unhealthy")
    assert home not in {served_by(gateway, "agent-7") for _ in range(3)}
    sim.set_faults(fail_health=False)
    wait_for(healthy, 10, f"{home} readmitted")
    assert served_by(gateway, "agent-7") == home  # the key kept its worker

    with gateway.client() as http:
        assert http.delete("/workers/" + quote(sim.url, safe="")).status_code == 202
    wait_for(lambda: all(w["url"] != sim.url for w in gateway.workers()), 10, f"{home} removed")
    moved = served_by(gateway, "agent-7")
    assert moved != home
    # Round robin alone would alternate over the two left: the key sticks to its new worker.
    assert {served_by(gateway, "agent-7") for _ in range(4)} == {moved}
