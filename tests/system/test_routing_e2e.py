"""Policies through a real gateway: cache affinity, loads from the monitor, labels, plugins."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import httpx

import support
from support.harness import Gateway, Proc, Sim, wait_for


def worker_of(gateway: Gateway, body: dict[str, object]) -> str:
    response = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.headers["x-worker-id"]


def chat(system: str, user: str) -> dict[str, object]:
    return {
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": 2,
    }


def test_cache_aware_keeps_each_system_prompt_on_one_worker(procs: list[Proc]) -> None:
    sims = [Sim("ca-a"), Sim("ca-b")]
    procs += sims
    gateway = Gateway(workers=[s.url for s in sims])  # cache_aware is the default
    procs.append(gateway)
    systems = [
        f"You are assistant number {i}. " + "Follow the house style. " * 80 for i in range(4)
    ]
    homes: dict[int, Counter[str]] = {i: Counter() for i in range(4)}
    for user in range(6):
        for i, system in enumerate(systems):
            homes[i][worker_of(gateway, chat(system, f"question {user}"))] += 1
    assert all(len(c) == 1 for c in homes.values()), homes
    assert Counter(next(iter(c)) for c in homes.values()) == {"ca-a": 2, "ca-b": 2}
    cached = sum(s.stats()["cached_tokens_total"] for s in sims)
    prompt = sum(s.stats()["prompt_tokens_total"] for s in sims)
    assert cached / prompt > 0.7


def test_power_of_two_avoids_the_worker_that_reports_load(procs: list[Proc]) -> None:
    busy, idle = Sim("busy", "--itl-ms", "50", "--max-running", "2"), Sim("idle")
    procs += [busy, idle]
    gateway = Gateway(
        "--policy",
        "power_of_two",
        "--worker-startup-check-interval",
        "0.2",
        workers=[busy.url, idle.url],
    )
    procs.append(gateway)

    def load_busy() -> None:  # straight to the worker: the gateway cannot count these
        # Cut short by the kill below once the routing is seen: only the load matters here.
        with contextlib.suppress(httpx.TransportError):
            httpx.post(
                busy.url + "/generate",
                timeout=30,
                json={"text": "x " * 500, "sampling_params": {"max_new_tokens": 60}},
            )

    threads = [threading.Thread(target=load_busy) for _ in range(4)]
    for thread in threads:
        thread.start()

    def loads_seen() -> bool:
        loads = httpx.get(gateway.url + "/get_loads").json()["workers"]
        return any(w["load"] > 0 for w in loads)

    wait_for(loads_seen, 10, "the busy worker's load")
    time.sleep(0.5)  # a poll of the monitor after the load appeared
    seen = Counter(worker_of(gateway, chat("s", f"q{i}")) for i in range(10))
    # The load has done its part: waiting out its 60 tokens x 50 ms, twice (two queued
    # behind two running), cost ~6 s; killing the busy sim ends the four calls at once.
    busy.kill()
    for thread in threads:
        thread.join()
    assert seen == {"idle": 10}


def test_a_worker_label_sets_its_models_policy_and_bad_labels_are_refused(
    procs: list[Proc],
) -> None:
    a, b = Sim("lab-a", "--served-model-name", "rr"), Sim("lab-b", "--served-model-name", "rr")
    procs += [a, b]
    gateway = Gateway()
    procs.append(gateway)
    with gateway.client() as http:
        for sim in (a, b):
            added = http.post(
                "/workers", json={"url": sim.url, "labels": {"policy": "round_robin"}}
            )
            assert added.status_code == 202
        gateway.wait_workers(2)
        info = http.get("/workers/" + quote(a.url, safe="")).json()
        assert info["metadata"]["policy"] == "round_robin"
        refused = http.post(
            "/workers", json={"url": "http://127.0.0.1:9", "labels": {"policy": "fastest"}}
        )
        assert refused.status_code == 400 and "labels.policy" in refused.text
    same_prompt = chat("identical", "identical")
    # cache_aware would pin an identical prompt to one worker; round_robin alternates.
    assert Counter(worker_of(gateway, same_prompt) for _ in range(6)) == {"lab-a": 3, "lab-b": 3}


def test_a_plugin_policy_from_the_command_line(procs: list[Proc]) -> None:
    sims = [Sim("plug-a"), Sim("plug-b")]
    procs += sims
    tests = str(Path(support.__file__).resolve().parents[1])  # the plugin's package root
    os.environ["PYTHONPATH"] = tests + os.pathsep + os.environ.get("PYTHONPATH", "")
    try:
        policy = "support.plugins.lightest_first:LightestFirst"
        gateway = Gateway("--policy", policy, workers=[s.url for s in sims])
    finally:
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].split(os.pathsep, 1)[1]
    procs.append(gateway)
    # Sequential requests leave nothing in flight: the plugin's tie-break (URL) decides.
    first = min(sims, key=lambda s: s.url).name
    assert Counter(worker_of(gateway, chat("s", f"q{i}")) for i in range(4)) == {first: 4}


def test_removing_a_worker_lets_its_streams_finish_and_moves_new_traffic(
    procs: list[Proc],
) -> None:
    a, b = Sim("rm-a", "--itl-ms", "30"), Sim("rm-b", "--itl-ms", "30")
    procs += [a, b]
    gateway = Gateway("--policy", "round_robin", workers=[a.url, b.url])
    procs.append(gateway)
    results: list[tuple[str, int]] = []

    def stream() -> None:
        body = {"prompt": "x", "max_tokens": 30, "stream": True}
        with httpx.stream(
            "POST", gateway.url + "/v1/completions", json=body, timeout=30
        ) as response:
            lines = [ln for ln in response.iter_lines() if ln.startswith("data: ")]
        results.append((response.headers["x-worker-id"], len(lines)))

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for thread in threads:
        thread.start()

    # All four routed (two each, round robin) before the removal, rm-a's still streaming: a
    # thread that had not sent its request yet would be routed after it, to rm-b.
    def all_routed_and_streaming() -> bool:
        on_a, on_b = a.stats(), b.stats()
        return bool(on_a["requests_total"] == on_b["requests_total"] == 2 and on_a["running"] > 0)

    wait_for(all_routed_and_streaming, 10, "streams on both, rm-a's running")
    assert httpx.delete(gateway.url + "/workers/" + quote(a.url, safe="")).status_code == 202
    during = Counter(worker_of(gateway, chat("s", f"q{i}")) for i in range(4))
    for thread in threads:
        thread.join()
    assert during == {"rm-b": 4}
    assert sorted(results) == [("rm-a", 32), ("rm-a", 32), ("rm-b", 32), ("rm-b", 32)]
