"""Engine runtimes: what the gateway does differently for llama.cpp, generic OpenAI and SGLang.

The sim plays each runtime (`--runtime llamacpp` adds llama.cpp's /slots and llamacpp:*
metrics); the real llama.cpp server is exercised by the e2e tier (test_e2e_llamacpp.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait

import httpx
import pytest

from support.harness import Gateway, Proc, Sim, wait_for

PROMPT = "one two three four five six seven eight nine ten " * 8


def cached_tokens(http: httpx.Client) -> int:
    response = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
    assert response.status_code == 200
    return int(response.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_llamacpp_worker_is_detected_flushed_and_health_checked(procs: list[Proc]) -> None:
    sim = Sim("llama", "--runtime", "llamacpp", "--served-model-name", "smol")
    procs.append(sim)
    gateway = Gateway(workers=[sim.url])
    procs.append(gateway)
    assert gateway.workers()[0]["runtime_type"] == "llamacpp"
    with gateway.client() as http:
        cached_tokens(http)
        assert cached_tokens(http) > 0  # the prompt is in the engine's cache
        flushed = http.post("/flush_cache")
        assert flushed.status_code == 200, flushed.text
        assert flushed.json()["workers_flushed"] == 1
        assert cached_tokens(http) == 0  # erasing the slots emptied it

        before = sim.stats()["requests_total"]
        assert http.get("/health_generate").status_code == 200
        assert sim.stats()["requests_total"] == before + 1  # a real generation ran
        assert sim.requests()[-1]["path"] == "/v1/completions"


def test_llamacpp_load_comes_from_its_metrics(procs: list[Proc]) -> None:
    sim = Sim("llama", "--runtime", "llamacpp", "--max-running", "1", "--itl-ms", "50")
    procs.append(sim)
    gateway = Gateway(workers=[sim.url])
    procs.append(gateway)
    with gateway.client() as http, httpx.Client(base_url=gateway.url, timeout=30) as slow:
        assert http.get("/get_loads").json()["workers"][0]["load"] == 0
        body = {"prompt": "x", "max_tokens": 40, "stream": True}
        with slow.stream("POST", "/v1/completions", json=body) as stream:
            chunks = stream.iter_bytes()  # held: a dropped iterator closes the stream
            next(chunks)

            def busy() -> bool:
                return bool(http.get("/get_loads").json()["workers"][0]["load"] == 1)

            wait_for(busy, what="llamacpp:requests_processing to show the stream")


def test_failed_generation_check_is_a_503(procs: list[Proc]) -> None:
    sim = Sim("llama", "--runtime", "llamacpp")
    procs.append(sim)
    gateway = Gateway(workers=[sim.url])
    procs.append(gateway)
    sim.set_faults(error_rate=1.0, error_status=500)
    with gateway.client() as http:
        response = http.get("/health_generate")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "health_generate_failed"
    # The kind of failure; the worker and its answer are in the gateway's log, not here.
    message = response.json()["error"]["message"]
    assert message == "the generation check failed: the worker answered with an error"
    assert sim.url.split("://")[1] not in response.text


def test_generate_needs_an_sglang_worker(procs: list[Proc]) -> None:
    llama = Sim("llama", "--runtime", "llamacpp", "--served-model-name", "m")
    plain = Sim("plain", "--runtime", "openai", "--served-model-name", "m")
    procs += [llama, plain]
    gateway = Gateway("--policy", "round_robin", workers=[llama.url, plain.url])
    procs.append(gateway)
    with gateway.client() as http:
        refused = http.post("/generate", json={"text": "hello", "model": "m"})
        assert http.post("/v1/completions", json={"prompt": "x"}).status_code == 200
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "endpoint_not_supported"
    assert "/generate" in error["message"] and "/v1/completions" in error["message"]
    assert llama.stats()["requests_total"] + plain.stats()["requests_total"] == 1


def test_generate_goes_only_to_sglang_workers_of_a_mixed_fleet(procs: list[Proc]) -> None:
    sglang = Sim("native", "--served-model-name", "m")
    llama = Sim("llama", "--runtime", "llamacpp", "--served-model-name", "m")
    procs += [sglang, llama]
    gateway = Gateway("--policy", "round_robin", workers=[sglang.url, llama.url])
    procs.append(gateway)
    with gateway.client() as http:
        served_by = {
            http.post("/generate", json={"text": "hello"}).headers["x-worker-id"] for _ in range(6)
        }
        chat_by = {
            http.post("/v1/completions", json={"prompt": "x"}).headers["x-worker-id"]
            for _ in range(6)
        }
    assert served_by == {"native"}
    assert chat_by == {"native", "llama"}


def test_flush_skips_servers_that_cannot_flush(procs: list[Proc]) -> None:
    native = Sim("native", "--served-model-name", "m")
    plain = Sim("plain", "--runtime", "openai", "--served-model-name", "m")
    procs += [native, plain]
    gateway = Gateway(workers=[native.url, plain.url])
    procs.append(gateway)
    with gateway.client() as http:
        flushed = http.post("/flush_cache").json()
    assert flushed["status"] == "success"
    assert flushed["workers_flushed"] == 1 and flushed["total_workers"] == 2


SYSTEM_PROMPT = "You answer questions about orders. " + "Be brief and exact. " * 60


@pytest.mark.parametrize("slot_wait", [True, False])
def test_llamacpp_requests_for_one_prompt_take_turns_with_slot_wait_secs(
    procs: list[Proc], slot_wait: bool
) -> None:
    """Two slots hold prompts A and B; while A runs, a second request for A waits for A's
    slot (with --slot-wait-secs) instead of evicting B; without the flag it runs at once."""
    sim = Sim("llama", "--runtime", "llamacpp", "--max-running", "2", "--itl-ms", "40")
    procs.append(sim)
    gateway = Gateway(*(("--slot-wait-secs", "10") if slot_wait else ()), workers=[sim.url])
    procs.append(gateway)

    def chat(prompt: str, **fields: object) -> dict[str, object]:
        messages = [{"role": "system", "content": prompt}, {"role": "user", "content": "hi"}]
        return {"messages": messages, "max_tokens": 1, **fields}

    a, b = "A: " + SYSTEM_PROMPT, "B: " + SYSTEM_PROMPT
    with gateway.client() as http, httpx.Client(base_url=gateway.url, timeout=30) as other:
        for prompt in (a, b):  # one slot holds each
            assert http.post("/v1/chat/completions", json=chat(prompt)).status_code == 200
        with other.stream(
            "POST", "/v1/chat/completions", json=chat(a, max_tokens=40, stream=True)
        ) as stream:  # A runs for ~1.6 s
            chunks = stream.iter_bytes()
            next(chunks)
            with ThreadPoolExecutor(1) as pool:
                second = pool.submit(http.post, "/v1/chat/completions", json=chat(a))
                done_while_a_ran = wait([second], timeout=0.8).done
                for _ in chunks:
                    pass
                assert second.result().status_code == 200
    assert bool(done_while_a_ran) is not slot_wait
    if slot_wait:
        scraped = httpx.get(gateway.metrics_url).text
        assert f'shunter_slot_waits_total{{outcome="turn",worker="{sim.url}"}} 1.0' in scraped
