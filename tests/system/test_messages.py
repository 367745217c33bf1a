"""Anthropic's Messages API and tokenize/detokenize through the gateway, from a client's
side: SGLang-like HTTP sims (relayed), a llama.cpp fleet (which does not serve Messages),
and a gRPC sim (the gateway converts Messages to its chat path and tokenizes itself)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import MessageParam

from support.harness import Gateway, GrpcSim, Sim, stop_all

ASK: list[MessageParam] = [{"role": "user", "content": "tell me about the river"}]


@pytest.fixture(scope="module")
def http_fleet() -> Iterator[tuple[list[Sim], Gateway]]:
    sims = [Sim("msg-a", "--itl-ms", "2"), Sim("msg-b", "--itl-ms", "2")]
    gateway = Gateway("--policy", "round_robin", workers=[s.url for s in sims])
    yield sims, gateway
    stop_all([*sims, gateway])


@pytest.fixture(scope="module")
def llama_fleet() -> Iterator[Gateway]:
    sim = Sim("llama", "--runtime", "llamacpp")
    gateway = Gateway(workers=[sim.url])
    yield gateway
    stop_all([sim, gateway])


@pytest.fixture(scope="module")
def grpc_fleet() -> Iterator[tuple[GrpcSim, Gateway]]:
    pytest.importorskip("smg_grpc_proto")
    sim = GrpcSim("grpc-msg", "--itl-ms", "2")
    gateway = Gateway(workers=[sim.url])
    yield sim, gateway
    stop_all([sim, gateway])


def sdk(gateway: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key="x", max_retries=0)


def test_messages_whole_and_streamed_through_http_workers(
    http_fleet: tuple[list[Sim], Gateway],
) -> None:
    sims, gateway = http_fleet
    client = sdk(gateway)
    whole = client.messages.create(
        model="sim-model", max_tokens=6, system="you are a guide", messages=ASK
    )
    assert whole.type == "message" and whole.role == "assistant"
    assert whole.stop_reason == "max_tokens"
    assert whole.usage.output_tokens == 6 and whole.usage.input_tokens > 4
    text = whole.content[0].text  # type: ignore[union-attr]
    assert len(text.split()) == 6
    with client.messages.stream(
        model="sim-model", max_tokens=6, system="you are a guide", messages=ASK
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text  # the sims answer a prompt deterministically
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 6
    received = [r for s in sims for r in s.requests() if r["path"] == "/v1/messages"]
    assert len(received) == 2 and all('"system"' in r["body"] for r in received)


def test_messages_errors_are_in_anthropics_envelope(
    http_fleet: tuple[list[Sim], Gateway],
) -> None:
    with httpx.Client(base_url=http_fleet[1].url, timeout=10) as http:
        malformed = http.post("/v1/messages", content=b"{not json")
    assert malformed.status_code == 400
    assert malformed.headers["x-smg-error-code"] == "json_parse_error"
    body = malformed.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "malformed JSON" in body["error"]["message"]


def test_messages_to_a_fleet_that_does_not_serve_them(llama_fleet: Gateway) -> None:
    client = sdk(llama_fleet)
    with pytest.raises(anthropic.APIStatusError) as refused:
        client.messages.create(model="sim-model", max_tokens=4, messages=ASK)
    assert refused.value.status_code == 501
    error = refused.value.body["error"]  # type: ignore[index]
    assert error["type"] == "api_error"
    assert "/v1/messages" in error["message"] and "llamacpp" in error["message"]
    assert refused.value.response.headers["x-smg-error-code"] == "messages_not_supported"
    with (
        pytest.raises(anthropic.APIStatusError) as streamed,
        client.messages.stream(model="sim-model", max_tokens=4, messages=ASK) as stream,
    ):
        list(stream.text_stream)
    assert streamed.value.status_code == 501
    with httpx.Client(base_url=llama_fleet.url, timeout=10) as http:  # chat still works
        chat = http.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
        )
    assert chat.status_code == 200


def test_tokenize_and_detokenize_through_an_sglang_worker(
    http_fleet: tuple[list[Sim], Gateway],
) -> None:
    prompt = "the silver river 42 stars"  # the sim's vocabulary, and a number
    with httpx.Client(base_url=http_fleet[1].url, timeout=10) as http:
        tokens = http.post("/v1/tokenize", json={"model": "sim-model", "prompt": prompt})
        assert tokens.status_code == 200, tokens.text
        ids = tokens.json()["tokens"]
        assert tokens.json()["count"] == len(ids) == 5 and tokens.json()["max_model_len"] > 0
        usage = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1}).json()
        assert usage["usage"]["prompt_tokens"] == len(ids)  # what the worker counts
        batch = http.post("/v1/tokenize", json={"prompt": [prompt, "a b"]}).json()
        assert batch["tokens"][0] == ids and batch["count"] == [5, 2]
        text = http.post("/v1/detokenize", json={"tokens": ids})
        assert text.status_code == 200 and text.json() == {"text": prompt}
        unknown = http.post("/v1/tokenize", json={"prompt": "zebra"}).json()["tokens"]
        assert http.post("/v1/detokenize", json={"tokens": unknown}).json() == {
            "text": str(unknown[0])  # out of the vocabulary: its id
        }


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/tokenize", {"model": "sim-model"}, "'prompt'"),
        ("/v1/tokenize", {"prompt": 7}, "'prompt'"),
        ("/v1/detokenize", {"tokens": ["a", 1]}, "'tokens'"),
        ("/v1/detokenize", {"text": "x"}, "'tokens'"),
    ],
)
def test_bad_tokenize_input_is_a_400_naming_the_field(
    http_fleet: tuple[list[Sim], Gateway], path: str, body: dict[str, object], field: str
) -> None:
    sims, gateway = http_fleet
    before = sum(s.stats()["requests_total"] for s in sims)
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        refused = http.post(path, json=body)
    assert refused.status_code == 400
    assert field in refused.json()["error"]["message"]
    assert sum(s.stats()["requests_total"] for s in sims) == before


def test_tokenize_without_a_tokenizer_or_a_worker_that_has_one(llama_fleet: Gateway) -> None:
    with httpx.Client(base_url=llama_fleet.url, timeout=10) as http:
        refused = http.post("/v1/tokenize", json={"prompt": "x"})
    assert refused.status_code == 501
    assert "/v1/tokenize" in refused.json()["error"]["message"]


def test_messages_on_a_grpc_worker_go_through_the_chat_template(
    grpc_fleet: tuple[GrpcSim, Gateway],
) -> None:
    client = sdk(grpc_fleet[1])
    whole = client.messages.create(
        model="sim-model", max_tokens=8, system="you are a guide", messages=ASK
    )
    text = whole.content[0].text  # type: ignore[union-attr]
    assert text and whole.stop_reason == "max_tokens"
    assert whole.usage.output_tokens == 8 and whole.usage.input_tokens > 5
    with client.messages.stream(
        model="sim-model", max_tokens=8, system="you are a guide", messages=ASK
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events if e.type not in ("text", "content_block")]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert final.content[0].text == text  # type: ignore[union-attr]
    assert final.usage.output_tokens == 8 and final.stop_reason == "max_tokens"
    # A stop sequence ends the reply early, named
    stop = text.split()[2]
    cut = client.messages.create(
        model="sim-model",
        max_tokens=8,
        system="you are a guide",
        messages=ASK,
        stop_sequences=[stop],
    )
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.index(stop)]  # type: ignore[union-attr]


def test_messages_a_grpc_worker_cannot_render_are_refused(
    grpc_fleet: tuple[GrpcSim, Gateway],
) -> None:
    image: Any = {"type": "image", "source": {"type": "base64", "media_type": "image/png"}}
    turn: MessageParam = {"role": "user", "content": [image]}
    with pytest.raises(anthropic.BadRequestError) as refused:
        sdk(grpc_fleet[1]).messages.create(
            model="sim-model",
            max_tokens=4,
            messages=[turn],
        )
    error = refused.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error" and "'image' block" in error["message"]


def test_tokenize_on_a_grpc_fleet_uses_the_gateways_tokenizer(
    grpc_fleet: tuple[GrpcSim, Gateway],
) -> None:
    from shunter.sim.tokenizer import sim_tokenizer

    prompt = "the quick brown fox, café 🙂"
    expected = sim_tokenizer().encode(prompt).ids
    with httpx.Client(base_url=grpc_fleet[1].url, timeout=10) as http:
        tokens = http.post("/v1/tokenize", json={"prompt": prompt})
        assert tokens.status_code == 200, tokens.text
        assert tokens.json() == {
            "tokens": expected,
            "count": len(expected),
            "max_model_len": 32768,
        }
        text = http.post("/v1/detokenize", json={"tokens": expected})
    assert text.json() == {"text": prompt}
