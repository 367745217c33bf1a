"""`shunter sim --grpc` as SGLang's scheduler service serves it, in process over a real
gRPC socket: what a gateway (Shunter's or smg) reads from it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

pytest.importorskip("grpc")

from shunter.backends.grpc.scheduler import SchedulerClient
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
