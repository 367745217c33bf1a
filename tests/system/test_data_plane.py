"""End to end through a real gateway process to real sim processes, with the OpenAI SDK."""

from __future__ import annotations

import json
from collections import Counter

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from support.harness import Fleet


@pytest.fixture(scope="module")
def sdk(fleet: Fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.gateway.url + "/v1", api_key="unused", max_retries=0)


def test_chat_completion(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(
        model="sim-model", messages=[{"role": "user", "content": "hello there"}], max_tokens=5
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.content and len(reply.choices[0].message.content.split()) == 5
    assert reply.usage is not None and reply.usage.completion_tokens == 5


def test_streamed_chat_equals_the_whole_answer(sdk: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "stream this please"}]
    whole = sdk.chat.completions.create(model="sim-model", messages=messages, max_tokens=8)
    stream = sdk.chat.completions.create(
        model="sim-model",
        messages=messages,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == whole.choices[0].message.content
    assert usage is not None and usage.completion_tokens == 8


def test_completions(sdk: openai.OpenAI) -> None:
    reply = sdk.completions.create(model="sim-model", prompt="once upon a time", max_tokens=3)
    assert reply.object == "text_completion"
    assert len(reply.choices[0].text.split()) == 3


def test_any_model_name_works_on_a_single_model_fleet(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(
        model="whatever-the-client-says", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content


def test_embeddings_and_rerank_are_relayed(fleet: Fleet, sdk: openai.OpenAI) -> None:
    emb = sdk.embeddings.create(model="sim-model", input=["a b", "c d"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 16
    with fleet.gateway.client() as http:
        response = http.post(
            "/v1/rerank", json={"query": "red fox", "documents": ["a red fox", "blue sky"]}
        )
    assert response.status_code == 200
    assert response.json()[0]["document"] == "a red fox"


def test_generate_streaming(fleet: Fleet) -> None:
    body = {"text": "tell me", "stream": True, "sampling_params": {"max_new_tokens": 4}}
    with fleet.gateway.client() as http, http.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    texts = [json.loads(e)["text"] for e in events[:-1]]
    assert len(texts) == 4 and len(texts[-1].split()) == 4


def test_models_lists_the_registry_as_json(fleet: Fleet) -> None:
    response = httpx.get(fleet.gateway.url + "/v1/models")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "object": "list",
        "data": [{"id": "sim-model", "object": "model", "owned_by": "local"}],
    }


def test_round_robin_spreads_requests_over_both_workers(fleet: Fleet) -> None:
    with fleet.gateway.client() as http:
        seen = Counter(
            http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).headers[
                "x-worker-id"
            ]
            for _ in range(10)
        )
    assert seen == {"sim-a": 5, "sim-b": 5}


def test_body_bytes_are_forwarded_unchanged_with_unknown_fields(fleet: Fleet) -> None:
    raw = (
        b'{"model":"sim-model","prompt":"keep me","max_tokens":1,'
        b'"my_custom_field":{"nested":[1,2,3]},  "spacing" : true}'
    )
    with fleet.gateway.client() as http:
        response = http.post(
            "/v1/completions",
            content=raw,
            headers={
                "content-type": "application/json",
                "x-request-id-custom": "kept",  # on the allow-list (x-request-id-*)
                "x-request-id": "my-id-1",
            },
        )
    assert response.status_code == 200
    sim = next(s for s in fleet.sims if s.name == response.headers["x-worker-id"])
    seen = next(r for r in reversed(sim.requests()) if "keep me" in r["body"])
    assert seen["body"].encode() == raw
    assert seen["headers"]["x-request-id-custom"] == ["kept"]
    assert seen["headers"]["x-request-id"] == ["my-id-1"]
    assert "connection" not in seen["headers"] or seen["headers"]["connection"] != ["close"]


def test_request_ids_are_echoed_or_generated(fleet: Fleet) -> None:
    with fleet.gateway.client() as http:
        given = http.post(
            "/v1/completions", json={"prompt": "x"}, headers={"x-correlation-id": "corr-42"}
        )
        generated_chat = http.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
        )
        generated_gen = http.post("/generate", json={"text": "x"})
        on_error = http.get("/no/such/path")
    assert given.headers["x-request-id"] == "corr-42"
    chat_id = generated_chat.headers["x-request-id"]
    assert chat_id.startswith("chatcmpl-") and len(chat_id) == len("chatcmpl-") + 24
    assert generated_gen.headers["x-request-id"].startswith("gnt-")
    assert on_error.headers["x-request-id"].startswith("req-")


def test_worker_response_headers_and_status_are_relayed(fleet: Fleet) -> None:
    with fleet.gateway.client() as http:
        response = http.post("/v1/chat/completions", json={"messages": "not a list"})
    assert response.status_code == 400  # the worker's own validation error, relayed
    assert response.headers["x-worker-id"] in ("sim-a", "sim-b")
    assert "messages" in response.json()["error"]["message"]


def test_health_endpoints(fleet: Fleet) -> None:
    with fleet.gateway.client() as http:
        assert http.get("/health").text == "OK"
        assert http.get("/liveness").status_code == 200
        ready = http.get("/readiness").json()
        assert ready == {"status": "ready", "healthy_workers": 2, "total_workers": 2}
        assert http.get("/health_generate").status_code == 200
        info = http.get("/get_server_info").json()
        assert info["served_model_name"] == "sim-model"
        assert http.get("/get_model_info").json()["model_type"] == "llama"


def test_get_loads_and_flush_cache(fleet: Fleet) -> None:
    with fleet.gateway.client() as http:
        loads = http.get("/get_loads").json()
        flushed = http.post("/flush_cache")
    assert sorted(w["worker"] for w in loads["workers"]) == sorted(s.url for s in fleet.sims)
    assert all(w["load"] == 0 for w in loads["workers"])
    assert flushed.status_code == 200
    assert flushed.json()["status"] == "success" and flushed.json()["workers_flushed"] == 2


def test_metrics_count_requests_by_route_and_status(fleet: Fleet) -> None:
    with fleet.gateway.client() as http:
        http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        http.get("/nothing-here")
    text = httpx.get(fleet.gateway.metrics_url).text
    assert 'smg_http_requests_total{method="POST",path="/v1/completions",status="2xx"}' in text
    assert 'smg_http_requests_total{method="GET",path="other",status="4xx"}' in text
    assert "smg_http_request_duration_seconds_bucket" in text
    for sim in fleet.sims:
        assert f'smg_worker_requests_active{{worker="{sim.url}"}} 0.0' in text
    assert (
        'smg_worker_pool_size{connection_mode="HTTP",model="sim-model",worker_type="regular"} 2.0'
        in text
    )
    assert 'smg_http_responses_total{error_code="not_found",status_code="404"}' in text


def test_cors_allows_any_origin_by_default(fleet: Fleet) -> None:
    with fleet.gateway.client() as http:
        preflight = http.options(
            "/v1/chat/completions",
            headers={
                "origin": "http://app.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type",
            },
        )
        actual = http.post(
            "/v1/completions",
            json={"prompt": "x", "max_tokens": 1},
            headers={"origin": "http://app.example"},
        )
        plain = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert preflight.headers["access-control-max-age"] == "3600"
    assert actual.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-origin" not in plain.headers
