"""The gRPC data plane against `shunter sim --grpc`: registration, the three endpoints,
streaming, stops, n > 1, aborts, parsers, retries, and a worker restarted on its port."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import (
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionToolParam,
)

pytest.importorskip("smg_grpc_proto")

from shunter.sim.tokenizer import tokenizer_archive

from support.harness import Gateway, GrpcSim, Proc, Sim, wait_for

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "tell me about the river"}]


@pytest.fixture(scope="module")
def grpc_fleet() -> Iterator[tuple[list[GrpcSim], Gateway]]:
    sims = [GrpcSim("grpc-a", "--itl-ms", "2"), GrpcSim("grpc-b", "--itl-ms", "2")]
    gateway = Gateway("--policy", "round_robin", workers=[s.url for s in sims])
    yield sims, gateway
    gateway.stop()
    for sim in sims:
        sim.stop()


@pytest.fixture
def sdk(grpc_fleet: tuple[list[GrpcSim], Gateway]) -> openai.OpenAI:
    return openai.OpenAI(base_url=grpc_fleet[1].url + "/v1", api_key="x", max_retries=0)


def test_grpc_workers_register_with_their_model(grpc_fleet: tuple[list[GrpcSim], Gateway]) -> None:
    infos = grpc_fleet[1].workers()
    assert {w["connection_mode"] for w in infos} == {"grpc"}
    assert {w["model_id"] for w in infos} == {"sim-model"}


def test_chat_whole_and_streamed_agree(sdk: openai.OpenAI) -> None:
    whole = sdk.chat.completions.create(model="sim-model", messages=CHAT, max_tokens=12)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens > 5
    chunks = list(
        sdk.chat.completions.create(
            model="sim-model",
            messages=CHAT,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_cached_tokens_are_reported(sdk: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "the same long system prompt " * 20},
        *CHAT,
    ]
    sdk.chat.completions.create(model="sim-model", messages=messages, max_tokens=1)
    # round_robin: the third request lands on the worker that served the first
    sdk.chat.completions.create(model="sim-model", messages=CHAT, max_tokens=1)
    again = sdk.chat.completions.create(model="sim-model", messages=messages, max_tokens=1)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert (again.usage.prompt_tokens_details.cached_tokens or 0) > 0


def test_completions_and_n(sdk: openai.OpenAI) -> None:
    reply = sdk.completions.create(model="sim-model", prompt="the river", max_tokens=5, n=2)
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert all(c.text for c in reply.choices)
    assert reply.usage is not None and reply.usage.completion_tokens == 10


def test_generate_native_shape(grpc_fleet: tuple[list[GrpcSim], Gateway]) -> None:
    with grpc_fleet[1].client() as http:
        by_text = http.post(
            "/generate", json={"text": "the river", "sampling_params": {"max_new_tokens": 4}}
        )
        ids = by_text.json()["output_ids"]
        by_ids = http.post(
            "/generate", json={"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 3}}
        )
    assert by_text.status_code == 200, by_text.text
    body = by_text.json()
    assert body["text"] and len(ids) == 4
    assert body["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    assert body["meta_info"]["prompt_tokens"] > 0
    assert len(by_ids.json()["output_ids"]) == 3


def test_stop_string_ends_the_output_and_aborts_the_worker(
    sdk: openai.OpenAI, grpc_fleet: tuple[list[GrpcSim], Gateway]
) -> None:
    full = sdk.completions.create(model="sim-model", prompt="stop test", max_tokens=20)
    words = full.choices[0].text.split()
    stop = words[3]
    cut = sdk.completions.create(model="sim-model", prompt="stop test", max_tokens=20, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full.choices[0].text[: full.choices[0].text.index(stop)]
    kept = sdk.completions.create(
        model="sim-model",
        prompt="stop test",
        max_tokens=20,
        stop=[stop],
        extra_body={"no_stop_trim": True},
    )
    assert kept.choices[0].text.endswith(stop)
    sims = grpc_fleet[0]
    wait_for(lambda: sum(s.stats()["abort_rpcs"] for s in sims) >= 2, what="Abort calls")


def test_client_disconnect_aborts_the_generation(
    grpc_fleet: tuple[list[GrpcSim], Gateway],
) -> None:
    sims, gateway = grpc_fleet
    before = sum(s.stats()["aborted_total"] for s in sims)
    aborts = sum(s.stats()["abort_rpcs"] for s in sims)
    body = {"model": "sim-model", "prompt": "long", "max_tokens": 5000, "stream": True}
    with (
        httpx.Client(base_url=gateway.url, timeout=30) as client,
        client.stream("POST", "/v1/completions", json=body) as stream,
    ):
        chunks = stream.iter_bytes()  # held: a dropped iterator closes the stream
        for _ in range(3):
            next(chunks)
    wait_for(
        lambda: sum(s.stats()["abort_rpcs"] for s in sims) == aborts + 1,
        what="the gateway to send Abort",
    )
    wait_for(
        lambda: sum(s.stats()["aborted_total"] for s in sims) == before + 1,
        what="the worker to abort the generation",
    )
    assert sum(s.stats()["running"] for s in sims) == 0


def test_bad_requests_are_400s(grpc_fleet: tuple[list[GrpcSim], Gateway]) -> None:
    with grpc_fleet[1].client() as http:
        for body in (
            {"messages": "hi"},
            {"messages": [{"content": "no role"}]},
            {"messages": CHAT, "temperature": "hot"},
            {"messages": CHAT, "n": 0},
        ):
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 400, (body, response.text)
            assert response.json()["error"]["code"] == "invalid_request"
        assert http.post("/v1/embeddings", json={"input": "x"}).status_code == 501
        assert http.post("/v1/chat/completions", json={"messages": CHAT}).status_code == 200


def test_parsers_split_reasoning_and_tool_calls(procs: list[Proc]) -> None:
    sim = GrpcSim("parsing")
    procs.append(sim)
    gateway = Gateway(
        "--reasoning-parser", "qwen3", "--tool-call-parser", "qwen", workers=[sim.url]
    )
    procs.append(gateway)
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    sim.set_faults(
        scripted_reply=f"<think>User wants weather.</think>Checking."
        f"<tool_call>{json.dumps(call)}</tool_call>"
    )
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    tools: list[ChatCompletionToolParam] = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    ]
    reply = sdk.chat.completions.create(model="m", messages=CHAT, tools=tools, max_tokens=200)
    message = reply.choices[0].message
    assert message.content == "Checking."
    assert message.model_extra and message.model_extra["reasoning_content"] == "User wants weather."
    assert message.tool_calls
    tool_call = message.tool_calls[0]
    assert isinstance(tool_call, ChatCompletionMessageFunctionToolCall)
    assert tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == {"city": "Paris"}
    assert reply.choices[0].finish_reason == "tool_calls"

    chunks = list(
        sdk.chat.completions.create(
            model="m",
            messages=CHAT,
            tools=tools,
            max_tokens=200,
            stream=True,
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert reasoning == "User wants weather."
    assert "".join(d.content or "" for d in deltas) == "Checking."
    streamed_calls = [t for d in deltas for t in (d.tool_calls or [])]
    assert [t.function.name for t in streamed_calls if t.function] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_failing_worker_is_retried_elsewhere(procs: list[Proc]) -> None:
    good, bad = GrpcSim("good"), GrpcSim("bad")
    procs += [good, bad]
    gateway = Gateway("--policy", "round_robin", workers=[good.url, bad.url])
    procs.append(gateway)
    bad.set_faults(error_rate=1.0, error_status=503)
    with gateway.client() as http:
        statuses = Counter(
            http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code
            for _ in range(10)
        )
    assert statuses == {200: 10}
    assert good.stats()["requests_total"] == 10


def test_breaker_opens_on_a_failing_grpc_worker(procs: list[Proc]) -> None:
    good, bad = GrpcSim("good"), GrpcSim("bad")
    procs += [good, bad]
    gateway = Gateway(
        "--policy",
        "round_robin",
        "--disable-retries",
        "--cb-failure-threshold",
        "2",
        workers=[good.url, bad.url],
    )
    procs.append(gateway)
    bad.set_faults(error_rate=1.0, error_status=503)
    with gateway.client() as http:
        statuses = Counter(
            http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code
            for _ in range(12)
        )
    assert statuses == {200: 10, 502: 2}  # two failures open the circuit; then only `good`
    assert len(bad.requests()) == 2


def test_bare_url_is_probed_as_grpc_and_http(procs: list[Proc]) -> None:
    grpc_sim, http_sim = GrpcSim("bare-grpc", "--served-model-name", "g"), Sim("bare-http")
    procs += [grpc_sim, http_sim]
    gateway = Gateway(workers=[f"127.0.0.1:{grpc_sim.port}", f"127.0.0.1:{http_sim.port}"])
    procs.append(gateway)
    modes = {w["url"]: w["connection_mode"] for w in gateway.workers()}
    assert modes == {
        f"grpc://127.0.0.1:{grpc_sim.port}": "grpc",
        f"http://127.0.0.1:{http_sim.port}": "http",
    }


def test_worker_restarted_on_its_port_is_served_again(procs: list[Proc]) -> None:
    sim = GrpcSim("phoenix")
    procs.append(sim)
    gateway = Gateway("--health-check-interval-secs", "1", workers=[sim.url])
    procs.append(gateway)

    def ok() -> bool:
        with gateway.client() as http:
            body = {"prompt": "x", "max_tokens": 2}
            return http.post("/v1/completions", json=body).status_code == 200

    assert ok()
    sim.kill()
    reborn = GrpcSim("phoenix", port=sim.port)
    procs.append(reborn)
    wait_for(ok, timeout=30, what="requests to reach the restarted worker")


def test_concurrent_first_requests_share_one_channel(procs: list[Proc]) -> None:
    sim = GrpcSim("shared")
    procs.append(sim)
    gateway = Gateway(workers=[sim.url])
    procs.append(gateway)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            body = {"prompt": "x", "max_tokens": 2}
            replies = await asyncio.gather(
                *(client.post("/v1/completions", json=body) for _ in range(64))
            )
        return [r.status_code for r in replies]

    assert asyncio.run(burst()) == [200] * 64
    assert sim.stats()["grpc_connections"] == 1  # registration, checks and all 64: one channel


def test_channel_replaced_under_load_loses_no_request(procs: list[Proc]) -> None:
    sim = GrpcSim("steady", "--itl-ms", "1")
    procs.append(sim)
    gateway = Gateway(
        "--health-check-interval-secs", "1", "--health-failure-threshold", "5", workers=[sim.url]
    )
    procs.append(gateway)
    statuses: Counter[int] = Counter()
    stop = threading.Event()

    def load() -> None:
        with gateway.client() as http:
            while not stop.is_set():
                body = {"prompt": "x", "max_tokens": 3}
                statuses[http.post("/v1/completions", json=body).status_code] += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: statuses.total() > 20, what="load")
        # Two failed checks (below the threshold of 5): each starts a new channel in the
        # background while requests keep flowing on the old one.
        sim.set_faults(fail_health=True)
        wait_for(lambda: sim.stats()["grpc_connections"] >= 2, what="a replacement channel")
        sim.set_faults(fail_health=False)
        count = statuses.total()
        wait_for(lambda: statuses.total() > count + 20, what="load on the new channel")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert set(statuses) == {200}, statuses


async def test_concurrent_first_use_creates_one_channel() -> None:
    from shunter.backends.grpc.backend import GrpcBackend

    backend = GrpcBackend("grpc://127.0.0.1:1", None, 1.0)  # type: ignore[arg-type]
    channel = backend.channel
    clients = await asyncio.gather(*(channel.get() for _ in range(100)))
    assert len({id(c) for c in clients}) == 1
    await backend.close()


def test_post_workers_takes_grpc_urls_and_parser_fields(procs: list[Proc]) -> None:
    sim = GrpcSim("posted", "--served-model-name", "thinker")
    procs.append(sim)
    gateway = Gateway()
    procs.append(gateway)
    with gateway.client() as http:
        refused = http.post("/workers", json={"url": sim.url, "reasoning_parser": "nope"})
        assert refused.status_code == 400
        assert "reasoning_parser" in refused.json()["error"]["message"]
        body = {"url": sim.url, "reasoning_parser": "deepseek_r1", "tool_parser": "json"}
        assert http.post("/workers", json=body).status_code == 202
        gateway.wait_workers(1)
        sim.set_faults(scripted_reply="pondering</think>Done.")
        reply = http.post("/v1/chat/completions", json={"messages": CHAT}).json()
    info = gateway.workers()[0]
    assert info["connection_mode"] == "grpc" and info["model_id"] == "thinker"
    message = reply["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("pondering", "Done.")


def sent_sampling(sim: GrpcSim) -> dict[str, Any]:
    """The sampling parameters of the last Generate call the sim received."""
    return dict(json.loads(sim.requests()[-1]["body"])["sampling_params"])


def test_sampling_defaults_are_sglangs_and_fields_pass_through(procs: list[Proc]) -> None:
    sim = GrpcSim("sampling")
    procs.append(sim)
    gateway = Gateway(workers=[sim.url])
    procs.append(gateway)
    with gateway.client() as http:
        assert http.post("/v1/chat/completions", json={"messages": CHAT}).status_code == 200
        params = sent_sampling(sim)
        # proto3 would read 0 for these: the gateway sets SGLang's defaults explicitly
        assert (params["temperature"], params["top_p"], params["top_k"]) == (1.0, 1.0, -1)
        assert params["repetition_penalty"] == 1.0 and params["skip_special_tokens"] is True
        assert "max_new_tokens" not in params  # unset: the worker's own limit applies
        body = {
            "messages": CHAT,
            "temperature": 0,
            "top_k": 5,
            "max_tokens": 3,
            "stop_token_ids": [7],
            "ignore_eos": True,
        }
        assert http.post("/v1/chat/completions", json=body).status_code == 200
    params = sent_sampling(sim)
    assert params["max_new_tokens"] == 3 and params["top_k"] == 5
    assert params.get("temperature", 0.0) == 0.0 and params["stop_token_ids"] == [7]
    assert params["ignore_eos"] is True


def test_tokenizer_from_a_local_directory_with_a_template_override(
    procs: list[Proc], tmp_path: Path
) -> None:
    with zipfile.ZipFile(io.BytesIO(tokenizer_archive())) as archive:
        archive.extractall(tmp_path)
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    sim = GrpcSim("local-tokenizer")
    procs.append(sim)
    gateway = Gateway(
        "--tokenizer-path", str(tmp_path), "--chat-template", str(template), workers=[sim.url]
    )
    procs.append(gateway)
    with gateway.client() as http:
        reply = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    sent = json.loads(sim.requests()[-1]["body"])["tokenized"]["original_text"]
    assert sent == "tell me about the river\n"  # the override, not the ChatML template


def test_stream_broken_by_the_worker_ends_with_an_error_event(procs: list[Proc]) -> None:
    sim = GrpcSim("fragile", "--itl-ms", "20")
    procs.append(sim)
    gateway = Gateway(workers=[sim.url])
    procs.append(gateway)
    body = {"prompt": "x", "max_tokens": 500, "stream": True}
    events: list[str] = []
    with (
        httpx.Client(base_url=gateway.url, timeout=30) as client,
        client.stream("POST", "/v1/completions", json=body) as stream,
    ):
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(line)
                if len(events) == 3:
                    sim.kill()  # the worker dies mid-stream
    assert len(events) > 3
    assert json.loads(events[-1][6:])["error"]["code"] == "upstream_stream_broken"
    with gateway.client() as http:  # the gateway itself is fine
        assert http.get("/health").status_code == 200


def test_admin_endpoints_speak_grpc(grpc_fleet: tuple[list[GrpcSim], Gateway]) -> None:
    sims, gateway = grpc_fleet
    with gateway.client() as http:
        assert http.get("/health_generate").status_code == 200
        info = http.get("/get_server_info")
        assert info.status_code == 200 and info.json()["server_type"] == "grpc"
        assert http.get("/get_model_info").json()["served_model_name"] == "sim-model"
        flushed = http.post("/flush_cache").json()
        loads = http.get("/get_loads").json()["workers"]
    assert flushed["status"] == "success" and flushed["workers_flushed"] == 2
    assert [w["load"] for w in loads] == [0, 0]
    for sim in sims:  # the scheduler reports itself unhealthy: a 503 that says why
        sim.set_faults(fail_health=True)
    try:
        with gateway.client() as http:
            failed = http.get("/health_generate")
    finally:
        for sim in sims:
            sim.set_faults(fail_health=False)
    assert failed.status_code == 503
    assert failed.json()["error"]["code"] == "health_generate_failed"


def test_stop_token_ids_end_the_output_trimmed_unless_asked(
    grpc_fleet: tuple[list[GrpcSim], Gateway],
) -> None:
    def generate(**params: object) -> dict[str, Any]:
        body = {"text": "stop ids", "sampling_params": {"max_new_tokens": 12, **params}}
        with grpc_fleet[1].client() as http:
            reply = http.post("/generate", json=body)
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    full = generate()
    ids = full["output_ids"]
    at = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    cut = generate(stop_token_ids=[ids[at]])
    assert cut["output_ids"] == ids[: at + 1]
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[at]}
    kept = generate(stop_token_ids=[ids[at]], no_stop_trim=True)
    assert full["text"].startswith(kept["text"]) and kept["text"].startswith(cut["text"])
    assert len(kept["text"]) > len(cut["text"])  # the stop token's text stays in
