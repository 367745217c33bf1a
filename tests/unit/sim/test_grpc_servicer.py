"""`shunter sim --grpc` as SGLang's scheduler service serves it, in process over a real
gRPC socket: what a gateway (Shunter's or smg) reads from it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip("grpc")

from shunter.backends.grpc.scheduler import SchedulerClient, pb
from shunter.sim.config import SimConfig
from shunter.sim.engine import Engine
from shunter.sim.grpc_server import serve_grpc

from support.harness import free_port


@pytest.fixture
async def client() -> AsyncIterator[SchedulerClient]:
    config = SimConfig(ttft_ms=0, itl_ms=0, prefill_us_per_token=0)
    port = free_port()
    server = await serve_grpc(config, Engine(config), port)
    scheduler = SchedulerClient(f"grpc://127.0.0.1:{port}")
    try:
        yield scheduler
    finally:
        await scheduler.close()
        await server.stop(grace=None)


async def test_the_tokenizer_archive_carries_the_model_config(client: SchedulerClient) -> None:
    """SGLang's GetTokenizer zips the model directory's config.json and
    generation_config.json with the tokenizer: smg reads the model's config from there, and
    without it looked the model up on the Hugging Face hub on every chat request."""
    files = await client.tokenizer_files(5.0)
    info = await client.model_info(5.0)
    assert {"tokenizer.json", "tokenizer_config.json"} <= files.keys()
    config = json.loads(files["config.json"])
    assert config["model_type"] == info.model_type
    assert config["architectures"] == list(info.architectures)
    assert config["vocab_size"] == info.vocab_size
    assert config["max_position_embeddings"] == info.max_context_length
    assert config["eos_token_id"] in info.eos_token_ids
    generation = json.loads(files["generation_config.json"])
    assert generation["eos_token_id"] == list(info.eos_token_ids)


async def generate(client: SchedulerClient, max_new_tokens: int, **params: int) -> list[Any]:
    request = pb.GenerateRequest(
        request_id=f"r{max_new_tokens}-{params}",
        tokenized=pb.TokenizedInput(input_ids=[5, 6, 7]),
        sampling_params=pb.SamplingParams(max_new_tokens=max_new_tokens, **params),
        stream=True,
    )
    return [message async for message in client.generate(request, 5.0)]


async def test_a_stream_sends_a_chunk_per_stream_interval(client: SchedulerClient) -> None:
    """SGLang's scheduler streams a request's first token at once, then every
    ``stream_interval`` tokens (its sampling parameter), and the rest at the end."""
    *chunks, _ = await generate(client, 10, stream_interval=4)
    assert [len(m.chunk.token_ids) for m in chunks] == [1, 4, 4, 1]
    assert [m.chunk.completion_tokens for m in chunks] == [1, 5, 9, 10]
    *chunks, _ = await generate(client, 3)
    assert [len(m.chunk.token_ids) for m in chunks] == [1, 1, 1]  # SGLang's default: 1


async def test_a_streamed_complete_repeats_the_last_chunk(client: SchedulerClient) -> None:
    """SGLang's servicer sends the finishing step as a chunk and again as the complete."""
    *chunks, complete = await generate(client, 6, stream_interval=4)
    assert complete.WhichOneof("response") == "complete"
    assert list(complete.complete.output_ids) == list(chunks[-1].chunk.token_ids)
    assert complete.complete.completion_tokens == 6
