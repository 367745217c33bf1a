"""Engine metrics, access logs without secrets, custom duration buckets."""

from __future__ import annotations

import json
from typing import Any

import httpx

from shunter.observability.engine_metrics import merge
from shunter.observability.streams import StreamStats

from support.harness import Fleet, Gateway, Proc, Sim, wait_for


def test_merge_labels_every_sample_with_its_worker_and_lists_families_once() -> None:
    a = (
        '# HELP vllm:running Running\n# TYPE vllm:running gauge\nvllm:running{m="x"} 2\n'
        "# TYPE up gauge\nup 1\n"
    )
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
    assert (
        httpx.post(gateway.url + "/v1/completions", json={"prompt": "x"}, headers=auth).status_code
        == 200
    )
    assert (
        httpx.post(
            gateway.url + "/v1/completions",
            json={"prompt": "x"},
            headers={"authorization": "Bearer wrong-key"},
        ).status_code
        == 401
    )

    def access_lines() -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in gateway.output().splitlines() if line[:1] == "{"]
        return [r for r in lines if r["logger"] == "shunter.access"]

    # The access line is written once the answer is sent: the client may read it first.
    # (Counting lines is not enough: the harness's own /health and /workers calls make two.)
    def both_logged() -> bool:
        statuses = {(r.get("request_id") == "trace-me-1", r.get("status")) for r in access_lines()}
        return (True, 200) in statuses and (False, 401) in statuses

    wait_for(both_logged, 5, "both access lines")
    output = gateway.output()
    assert "top-secret-key" not in output and "wrong-key" not in output
    access = access_lines()
    served = next(r for r in access if r["request_id"] == "trace-me-1")
    assert served["message"] == "POST /v1/completions 200"
    assert served["worker"] == sim.url and served["latency_ms"] > 0
    assert any(r["status"] == 401 and r["error_code"] == "unauthorized" for r in access)
    metrics = httpx.get(gateway.metrics_url).text
    assert 'le="0.5"' in metrics and 'le="2.0"' in metrics and 'le="240.0"' not in metrics


def test_stream_stats_read_usage_and_meta_info() -> None:
    stats = StreamStats(0.0)
    stats.on_chunk(b'data: {"choices": []}\n\n')
    assert stats.first is not None and stats.tokens() is None
    stats.on_chunk(
        b'data: {"choices": [], "usage": {"prompt_tokens": 7, '
        b'"completion_tokens": 3}}\n\ndata: [DONE]\n\n'
    )
    assert stats.tokens() == (7, 3)
    sglang = StreamStats(0.0)
    sglang.on_chunk(
        b'data: {"text": "a b", "meta_info": {"prompt_tokens": 4, "completion_tokens": 2}}\n\n'
    )
    assert sglang.tokens() == (4, 2)


def test_streams_report_ttft_tpot_and_tokens(fleet: Fleet) -> None:
    body = {
        "messages": [{"role": "user", "content": "count me"}],
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with fleet.gateway.client() as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            response.read()
        generate = {
            "text": "count me too",
            "stream": True,
            "sampling_params": {"max_new_tokens": 4},
        }
        with http.stream("POST", "/generate", json=generate) as response:
            response.read()
    text = httpx.get(fleet.gateway.metrics_url).text

    def sample(name: str, **labels: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no {name} {labels}")

    chat = {"model": "sim-model", "endpoint": "/v1/chat/completions", "router_type": "http"}
    assert sample("smg_router_ttft_seconds_count", **chat) >= 1
    assert sample("smg_router_tpot_seconds_count", **chat) >= 1
    assert sample("smg_router_tokens_total", token_type="output", **chat) >= 6
    assert sample("smg_router_tokens_total", token_type="output", endpoint="/generate") >= 4


def test_router_metrics_cover_durations_errors_and_upstream_answers(fleet: Fleet) -> None:
    with fleet.gateway.client() as http:
        http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        http.post("/v1/chat/completions", json={"messages": "not a list"})  # the worker's 400
    text = httpx.get(fleet.gateway.metrics_url).text

    def has(name: str, **labels: str) -> bool:
        return any(
            line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
            for line in text.splitlines()
        )

    assert has("smg_router_request_duration_seconds_bucket", endpoint="/v1/completions")
    assert has(
        "smg_router_request_errors_total", error_type="status_400", endpoint="/v1/chat/completions"
    )
    assert has("smg_router_upstream_responses_total", router_type="http", status_code="200")
    assert has("smg_worker_connections_active", worker_type="regular", connection_mode="HTTP")
