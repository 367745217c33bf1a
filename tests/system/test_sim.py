"""The simulated worker: prefix cache, slots and load, faults."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from shunter.backends.http.engines.sglang import sglang_load
from shunter.sim.cache import PrefixCache
from shunter.sim.config import Faults

from support.harness import Sim


def test_prefix_cache_matches_whole_blocks_of_a_shared_prefix() -> None:
    cache = PrefixCache(capacity_tokens=1024, block_size=4)
    system = [f"s{i}" for i in range(10)]
    assert cache.match_and_insert([*system, "q1"]) == 0
    assert cache.match_and_insert([*system, "q2"]) == 8  # two whole blocks of the 10
    assert cache.match_and_insert(["other", *system]) == 0  # a prefix must match from the start


def test_prefix_cache_evicts_least_recently_used_blocks() -> None:
    cache = PrefixCache(capacity_tokens=8, block_size=4)
    a, b = [f"a{i}" for i in range(8)], [f"b{i}" for i in range(8)]
    cache.match_and_insert(a)
    cache.match_and_insert(b)  # capacity is 2 blocks: a's are evicted
    assert cache.used_tokens == 8
    assert cache.match_and_insert(a) == 0
    assert cache.match_and_insert(a) == 8


def test_faults_validate_names_and_types() -> None:
    faults = Faults()
    faults.update({"error_rate": 0.5, "hang": True})
    assert faults.error_rate == 0.5 and faults.hang
    for bad in (
        {"nope": 1},
        {"hang": 1},
        {"error_rate": 3},
        {"error_status": 42},
        {"drop_after_chunks": 1.5},
    ):
        with pytest.raises(ValueError):
            faults.update(bad)


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    sim = Sim("sim-t", "--max-running", "1", "--itl-ms", "20")
    yield sim
    sim.stop()


def test_repeated_prompt_reports_cached_tokens(sim: Sim) -> None:
    prompt = " ".join(f"w{i}" for i in range(100))
    first = httpx.post(sim.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1})
    second = httpx.post(sim.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1})
    assert first.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
    assert second.headers["x-worker-id"] == "sim-t"


def test_load_reflects_running_and_queued_requests(sim: Sim) -> None:
    import threading

    def slow() -> None:
        httpx.post(
            sim.url + "/generate",
            json={"text": "x", "sampling_params": {"max_new_tokens": 25}},
            timeout=10,
        )

    threads = [threading.Thread(target=slow) for _ in range(3)]
    for t in threads:
        t.start()
    import time

    time.sleep(0.2)
    load = httpx.get(sim.url + "/get_load").json()[0]
    metrics = httpx.get(sim.url + "/metrics").text  # at once: the queue moves on
    assert load["num_reqs"] == 3 and load["num_waiting_reqs"] == 2 and load["num_tokens"] > 0
    assert 'sglang:num_queue_reqs{model_name="sim-model"} 2' in metrics
    # SGLang's current endpoint, in its shape: what the gateway's load monitor reads first.
    current = httpx.get(sim.url + "/v1/loads", params={"include": "core"}).json()
    assert set(current) == {"timestamp", "version", "accelerator", "num_accelerators", "loads"}
    (rank,) = current["loads"]  # a moment later: the requests may have moved on since
    assert rank["dp_rank"] == 0 and rank["num_running_reqs"] + rank["num_waiting_reqs"] <= 3
    assert sglang_load(current, None) == rank["num_total_tokens"] == rank["num_used_tokens"]
    bad = httpx.get(sim.url + "/v1/loads", params={"include": "core,gpus"})
    assert bad.status_code == 400 and "gpus" in bad.text
    for t in threads:
        t.join()


def test_injected_errors_and_health_faults(sim: Sim) -> None:
    sim.set_faults(error_rate=1.0, error_status=503, fail_health=True)
    try:
        assert httpx.post(sim.url + "/v1/completions", json={"prompt": "x"}).status_code == 503
        assert httpx.get(sim.url + "/health").status_code == 503
    finally:
        sim.set_faults(error_rate=0.0, fail_health=False)
    assert httpx.get(sim.url + "/health").status_code == 200
    bad = httpx.post(sim.url + "/sim/faults", json={"error_rate": "lots"})
    assert bad.status_code == 400
