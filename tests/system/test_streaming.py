"""Streams are relayed chunk by chunk, and a client that leaves cancels the worker's request."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import httpx
import pytest

from support.harness import Gateway, Sim, wait_for


@pytest.fixture(scope="module")
def slow() -> Iterator[tuple[Gateway, Sim]]:
    sim = Sim("sim-slow", "--itl-ms", "100", "--ttft-ms", "5")
    gateway = Gateway(workers=[sim.url])
    yield gateway, sim
    gateway.stop()
    sim.stop()


def test_chunks_reach_the_client_as_they_leave_the_worker(slow: tuple[Gateway, Sim]) -> None:
    gateway, _ = slow
    body = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
        "stream": True,
    }
    arrivals = []
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", gateway.url + "/v1/chat/completions", json=body) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                arrivals.append(time.monotonic())
    assert len(arrivals) == 8
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # The worker waits 100 ms between tokens. A relay that buffered would deliver them
    # together at the end; relayed one by one, most gaps keep the worker's pacing.
    assert sum(1 for g in gaps if g > 0.05) >= 5, gaps
    assert arrivals[-1] - arrivals[0] > 0.4


def test_a_client_leaving_mid_stream_cancels_the_worker_request(slow: tuple[Gateway, Sim]) -> None:
    gateway, sim = slow
    before = sim.stats()["aborted_total"]
    body = {"prompt": "a long one", "max_tokens": 300, "stream": True}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", gateway.url + "/v1/completions", json=body) as response,
    ):
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen == 3:
                break  # leaving the block closes the connection mid-stream
    wait_for(lambda: sim.stats()["aborted_total"] == before + 1, 10, "the sim to see the abort")
    assert sim.stats()["running"] == 0
    wait_for(lambda: gateway.workers()[0]["load"] == 0, 10, "the gateway load to drop")


def test_a_dropped_worker_stream_ends_with_an_error_event(slow: tuple[Gateway, Sim]) -> None:
    gateway, sim = slow
    sim.set_faults(drop_after_chunks=2)
    try:
        body = {"prompt": "x", "max_tokens": 10, "stream": True}
        with (
            httpx.Client(timeout=30) as http,
            http.stream("POST", gateway.url + "/v1/completions", json=body) as response,
        ):
            lines = [ln for ln in response.iter_lines() if ln.startswith("data: ")]
    finally:
        sim.set_faults(drop_after_chunks=-1)
    assert response.status_code == 200
    assert len(lines) == 3
    assert '"upstream_stream_broken"' in lines[-1]
    assert httpx.get(gateway.url + "/health").status_code == 200
