"""Worker management at run time, model discovery, multi-model routing, DP-aware ranks."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import openai
import pytest

from support.harness import Gateway, Proc, Sim, free_port, wait_for


@pytest.fixture(scope="module")
def empty_gateway() -> Iterator[Gateway]:
    gateway = Gateway()
    yield gateway
    gateway.stop()


def workers_seen(gateway: Gateway, n: int, **body: object) -> Counter[str]:
    payload = {"prompt": "x", "max_tokens": 1, **body}
    with gateway.client() as http:
        return Counter(
            http.post("/v1/completions", json=payload).headers.get("x-worker-id", "?")
            for _ in range(n)
        )


def test_adding_and_removing_workers_moves_traffic(procs: list[Proc]) -> None:
    a, b = Sim("sim-a"), Sim("sim-b")
    procs += [a, b]
    gateway = Gateway("--policy", "round_robin", workers=[a.url])
    procs.append(gateway)
    assert workers_seen(gateway, 4) == {"sim-a": 4}

    with gateway.client() as http:
        added = http.post("/workers", json={"url": b.url})
    assert added.status_code == 202
    b_id = added.json()["worker_id"]
    assert added.json() == {
        "status": "accepted",
        "worker_id": b_id,
        "url": b.url,
        "location": f"/workers/{b_id}",
        "message": "Worker addition queued for background processing",
    }
    assert added.headers["location"] == f"/workers/{b_id}"
    gateway.wait_workers(2)
    assert workers_seen(gateway, 4) == {"sim-a": 2, "sim-b": 2}

    with gateway.client() as http:
        a_id = http.get("/workers/" + quote(a.url, safe="")).json()["id"]
        # The old form (the URL) and the new (the id) side by side, for the same workers.
        assert http.get(f"/workers/{b_id}").json()["url"] == b.url
        assert http.patch(f"/workers/{b_id}", json={"priority": 60}).status_code == 200
        assert http.put("/workers/" + quote(b.url, safe=""), json={"cost": 2}).status_code == 202
        info = http.get("/workers/" + quote(b.url, safe="")).json()
        assert (info["id"], info["priority"], info["cost"]) == (b_id, 60, 2)
        served = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        named = {a_id: "sim-a", b_id: "sim-b"}[served.headers["x-smg-routed-worker-id"]]
        assert named == served.headers["x-worker-id"]  # the sim that answered says who it is
        removed = http.delete(f"/workers/{a_id}")
    assert removed.status_code == 202 and removed.json()["status"] == "accepted"
    assert removed.json()["worker_id"] == a_id and removed.json()["queued"] is False
    assert [w["url"] for w in gateway.workers()] == [b.url]
    assert workers_seen(gateway, 4) == {"sim-b": 4}


def test_worker_info_update_and_not_found(procs: list[Proc]) -> None:
    sim = Sim("sim-i")
    procs.append(sim)
    gateway = Gateway(workers=[sim.url])
    procs.append(gateway)
    path = "/workers/" + quote(sim.url, safe="")
    with gateway.client() as http:
        info = http.get(path).json()
        assert info["url"] == sim.url and info["model_id"] == "sim-model"
        assert info["is_healthy"] is True and info["connection_mode"] == "http"
        assert info["worker_type"] == "regular" and info["priority"] == 50
        updated = http.put(path, json={"priority": 80, "labels": {"zone": "a"}})
        assert updated.status_code == 202
        info = http.get(path).json()
        assert info["priority"] == 80 and info["metadata"]["zone"] == "a"
        assert len(gateway.workers()) == 1  # an update is an upsert, not a second entry
        missing = http.get("/workers/" + quote("http://127.0.0.1:9", safe=""))
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "WORKER_NOT_FOUND"
        assert http.delete("/workers/" + quote("http://127.0.0.1:9", safe="")).status_code == 404
        assert http.put(path, json={"priority": "high"}).status_code == 400
        assert http.put(path, json={"bogus": 1}).status_code == 400
        assert http.post("/workers", json={"url": sim.url}).status_code == 409


@pytest.mark.parametrize(
    "body",
    [
        {"url": "file:///etc/passwd"},
        {"url": "gopher://x:70"},
        {},
        {"url": 5},
        {"url": "http://"},
        {"url": "http://h:1", "worker_type": "boss"},
        {"url": "http://h:1", "priority": -1},
        [1],
    ],
)
def test_bad_worker_specs_are_400(empty_gateway: Gateway, body: object) -> None:
    gateway = empty_gateway
    response = httpx.post(gateway.url + "/workers", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_worker_spec"


def test_gateway_answers_health_at_once_and_503_until_a_worker_is_ready(
    procs: list[Proc],
) -> None:
    port = free_port()
    gateway = Gateway(workers=[f"http://127.0.0.1:{port}"], ready=False)
    procs.append(gateway)
    with gateway.client() as http:
        assert http.get("/health").status_code == 200
        response = http.post("/v1/completions", json={"prompt": "x"})
        assert response.status_code == 503
        job = http.get("/workers/" + quote(f"http://127.0.0.1:{port}", safe="")).json()
        assert job["job_status"]["status"] in ("pending", "processing")
        assert job["is_healthy"] is False
    procs.append(Sim("late", port=port))
    gateway.wait_workers(1)
    assert workers_seen(gateway, 2) == {"late": 2}


def test_registration_that_times_out_leaves_a_failed_job(procs: list[Proc]) -> None:
    gateway = Gateway("--worker-startup-timeout-secs", "1")
    procs.append(gateway)
    url = f"http://127.0.0.1:{free_port()}"
    path = "/workers/" + quote(url, safe="")
    with gateway.client() as http:
        assert http.post("/workers", json={"url": url}).status_code == 202

        def failed() -> bool:
            return bool(http.get(path).json()["job_status"]["status"] == "failed")

        wait_for(failed, 10, "the job to fail")
        assert "not ready" in http.get(path).json()["job_status"]["message"]


def test_two_model_fleet_routes_each_model_to_its_workers(procs: list[Proc]) -> None:
    llama = Sim("llama-1", "--served-model-name", "llama")
    qwen = Sim("qwen-1", "--served-model-name", "qwen")
    procs += [llama, qwen]
    gateway = Gateway(workers=[llama.url, qwen.url])
    procs.append(gateway)
    assert workers_seen(gateway, 3, model="llama") == {"llama-1": 3}
    assert workers_seen(gateway, 3, model="qwen") == {"qwen-1": 3}
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    assert sorted(m.id for m in sdk.models.list()) == ["llama", "qwen"]
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found"
    with gateway.client() as http:
        anonymous = http.post("/v1/completions", json={"prompt": "x"})
    assert anonymous.status_code == 400
    assert anonymous.json()["error"]["code"] == "model_required"


def test_openai_only_worker_is_discovered_through_v1_models(procs: list[Proc]) -> None:
    sim = Sim("plain", "--runtime", "openai", "--served-model-name", "smol")
    procs.append(sim)
    gateway = Gateway(workers=[sim.url])
    procs.append(gateway)
    info = gateway.workers()[0]
    assert info["runtime_type"] == "openai" and info["model_id"] == "smol"
    with gateway.client() as http:
        assert http.get("/health_generate").status_code == 200
        loads = http.get("/get_loads").json()["workers"]
    assert loads == [{"worker": sim.url, "load": -1}]


def test_worker_api_key_is_sent_as_bearer(procs: list[Proc]) -> None:
    sim = Sim("locked", "--api-key", "worker-key")
    procs.append(sim)
    gateway = Gateway()
    procs.append(gateway)
    with gateway.client() as http:
        http.post("/workers", json={"url": sim.url, "api_key": "worker-key"})
        gateway.wait_workers(1)
        response = http.post(
            "/v1/completions", json={"prompt": "x"}, headers={"authorization": "Bearer client-key"}
        )
    assert response.status_code == 200
    assert sim.requests()[-1]["headers"]["authorization"] == ["Bearer worker-key"]


def test_configured_workers_get_the_worker_key_and_never_the_gateways(procs: list[Proc]) -> None:
    locked, open_ = Sim("locked", "--api-key", "worker-key"), Sim("open")
    procs += [locked, open_]
    gateway = Gateway(
        "--api-key",
        "gateway-key",
        "--worker-api-key",
        "worker-key",
        "--policy",
        "round_robin",
        workers=[locked.url, open_.url],
    )
    procs.append(gateway)
    with gateway.client(headers=gateway.auth) as http:
        for _ in range(4):
            assert http.post("/v1/completions", json={"prompt": "x"}).status_code == 200
    for sim in (locked, open_):
        seen = {a for r in sim.requests() for a in r["headers"].get("authorization", [])}
        assert seen == {"Bearer worker-key"}, sim.name


def test_dp_aware_expands_ranks_and_injects_the_rank(procs: list[Proc]) -> None:
    sim = Sim("dp", "--dp-size", "2")
    procs.append(sim)
    gateway = Gateway("--dp-aware", "--policy", "round_robin", workers=[sim.url], ready=False)
    procs.append(gateway)
    gateway.wait_workers(2)
    assert sorted(w["url"] for w in gateway.workers()) == [sim.url + "@0", sim.url + "@1"]
    workers_seen(gateway, 4)
    ranks = [json.loads(r["body"])["data_parallel_rank"] for r in sim.requests()[-4:]]
    assert sorted(ranks) == [0, 0, 1, 1]
    with gateway.client() as http:
        assert http.delete("/workers/" + quote(sim.url, safe="")).status_code == 202
    assert gateway.workers() == []
