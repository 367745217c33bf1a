"""Engine metrics, access logs without secrets, custom duration buckets."""

from __future__ import annotations

import json

import httpx

from shunter.observability.engine_metrics import merge

from conftest import Fleet
from harness import Gateway, Proc, Sim


def test_merge_labels_every_sample_with_its_worker_and_lists_families_once() -> None:
    a = ('# HELP vllm:running Running\n# TYPE vllm:running gauge\nvllm:running{m="x"} 2\n'
         "# TYPE up gauge\nup 1\n")  # fmt: skip
    b = '# TYPE vllm:running gauge\nvllm:running{m="x"} 5\n'
    text = merge({"http://a:1": a, "http://b:2": b})
    assert text.count("# TYPE vllm_running gauge") == 1
    assert 'vllm_running{m="x",worker_addr="http://a:1"} 2' in text
    assert 'vllm_running{m="x",worker_addr="http://b:2"} 5' in text
    assert 'up{worker_addr="http://a:1"} 1' in text


def test_engine_metrics_fans_out_to_the_workers(fleet: Fleet) -> None:
    response = httpx.get(fleet.gateway.url + "/engine_metrics")
    assert response.status_code == 200
    text = response.text
    assert text.count("# TYPE sglang_num_running_reqs gauge") == 1
    for sim in fleet.sims:
        assert f'sglang_num_running_reqs{{model_name="sim-model",worker_addr="{sim.url}"}}' in text


def test_engine_metrics_with_no_workers_is_503(procs: list[Proc]) -> None:
    gateway = Gateway()
    procs.append(gateway)
    assert httpx.get(gateway.url + "/engine_metrics").status_code == 503


def test_one_access_line_per_request_in_json_and_never_a_key(procs: list[Proc]) -> None:
    sim = Sim("logged")
    procs.append(sim)
    gateway = Gateway(
        "--log-json",
        "--log-level",
        "info",
        "--api-key",
        "top-secret-key",
        "--prometheus-duration-buckets",
        "0.5",
        "2",
        workers=[sim.url],
    )
    procs.append(gateway)
    auth = {"authorization": "Bearer top-secret-key", "x-request-id": "trace-me-1"}
    assert httpx.post(gateway.url + "/v1/completions", json={"prompt": "x"},
                      headers=auth).status_code == 200  # fmt: skip
    assert (
        httpx.post(
            gateway.url + "/v1/completions",
            json={"prompt": "x"},
            headers={"authorization": "Bearer wrong-key"},
        ).status_code
        == 401
    )
    output = gateway.output()
    assert "top-secret-key" not in output and "wrong-key" not in output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    access = [r for r in lines if r["logger"] == "shunter.access"]
    served = next(r for r in access if r["request_id"] == "trace-me-1")
    assert served["message"] == "POST /v1/completions 200"
    assert served["worker"] == sim.url and served["latency_ms"] > 0
    assert any(r["status"] == 401 and r["error_code"] == "unauthorized" for r in access)
    metrics = httpx.get(gateway.metrics_url).text
    assert 'le="0.5"' in metrics and 'le="2.0"' in metrics and 'le="240.0"' not in metrics
