"""The floor of a Python gRPC data plane: a bare client's CPU per call and per message.

Run: python bench/grpc_floor.py PORT   (a ``shunter sim --grpc`` listening on PORT)

A client that only calls ``Generate`` and reads the answers, with no gateway around it: what
every Python gateway built on that client pays before doing any work of its own. Issue 17
asks Shunter's gRPC path to spend no more CPU than smg's whole gateway (Rust) per chat and
per streamed token; when the bare client alone spends more, the target is out of reach on
that client, whatever the gateway does. ``grpc_bench.py`` runs this on the gateways' core
in the same run as smg.

- ``grpc.aio`` (what Shunter uses): 16 concurrent unary calls of 16 tokens
  (``stream=false``: one message each, as a whole chat is), then 16 concurrent streams of 64
  tokens (65 messages each: a chunk per token and the finishing message).
- ``grpclib`` (pure Python over ``h2``), when installed: the same two loads.

The event loop is uvloop's, as the gateway's is. Output: one ``floor:`` line per client.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import grpc
import uvloop
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from common import cpu_seconds

GENERATE = "/sglang.grpc.scheduler.SglangScheduler/Generate"
CONCURRENT = 16
PROMPT_IDS = list(range(100, 300))

Call = Callable[[Any], Awaitable[int]]  # one Generate call: the messages it read


def request(index: int, stream: bool) -> Any:
    return pb.GenerateRequest(
        request_id=f"floor-{index}",
        tokenized=pb.TokenizedInput(original_text="floor", input_ids=PROMPT_IDS),
        sampling_params=pb.SamplingParams(
            max_new_tokens=64 if stream else 16, temperature=1, top_p=1, top_k=-1
        ),
        stream=stream,
    )


async def measure(call: Call, calls: int, stream: bool) -> tuple[float, float]:
    """CPU µs per call and per message over ``calls`` calls, ``CONCURRENT`` at a time,
    after a warm-up."""
    gate = asyncio.Semaphore(CONCURRENT)

    async def one(index: int) -> int:
        async with gate:
            return await call(request(index, stream))

    await asyncio.gather(*(one(i) for i in range(100)))
    before = cpu_seconds(os.getpid())
    messages = sum(await asyncio.gather(*(one(i) for i in range(calls))))
    spent = (cpu_seconds(os.getpid()) - before) * 1e6
    return spent / calls, spent / max(1, messages)


async def grpc_aio(port: int) -> tuple[float, float]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    unary = channel.unary_unary(
        GENERATE,
        request_serializer=pb.GenerateRequest.SerializeToString,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    streamed = channel.unary_stream(
        GENERATE,
        request_serializer=pb.GenerateRequest.SerializeToString,
        response_deserializer=pb.GenerateResponse.FromString,
    )

    async def whole(message: Any) -> int:
        await unary(message, timeout=30)
        return 1

    async def stream(message: Any) -> int:
        return sum([1 async for _ in streamed(message, timeout=30)])

    try:
        per_call, _ = await measure(whole, 3000, stream=False)
        _, per_message = await measure(stream, 400, stream=True)
    finally:
        await channel.close()
    return per_call, per_message


async def grpclib_client(port: int) -> tuple[float, float]:
    from grpclib.client import Channel
    from grpclib.const import Cardinality

    channel = Channel("127.0.0.1", port)

    async def call(message: Any) -> int:
        kind = Cardinality.UNARY_STREAM
        async with channel.request(
            GENERATE, kind, pb.GenerateRequest, pb.GenerateResponse, timeout=30
        ) as exchange:
            await exchange.send_message(message, end=True)
            return sum([1 async for _ in exchange])

    try:
        per_call, _ = await measure(call, 2000, stream=False)
        _, per_message = await measure(call, 300, stream=True)
    finally:
        channel.close()
    return per_call, per_message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    port = parser.parse_args().port
    clients: dict[str, Callable[[int], Coroutine[Any, Any, tuple[float, float]]]] = {
        "grpc.aio": grpc_aio
    }
    try:
        import grpclib  # noqa: F401

        clients["grpclib"] = grpclib_client
    except ImportError:
        pass
    for name, client in clients.items():
        began = time.perf_counter()
        per_call, per_message = uvloop.run(client(port))
        print(
            f"floor: {name} | {per_call:.0f} us CPU per whole call | "
            f"{per_message:.1f} us per streamed message | {time.perf_counter() - began:.1f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
