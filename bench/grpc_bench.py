"""The gRPC data plane's cost: gateway CPU per chat request and per streamed token, gRPC
against HTTP to the same simulated worker, and the per-request channel fetch on its own.

Run: python bench/grpc_bench.py [--duration 6]     (needs `wrk` and the grpc extra)

One `shunter sim --grpc --http-port` process serves both protocols from one engine (no
latency: --ttft-ms 0 --itl-ms 0). Two gateways run side by side on CPU 1, one with the
worker as grpc://, one as http://; the sim, wrk and the stream client share CPU 0. Gateway
CPU is the process's user+system time over the requests completed.

- Whole chat: wrk, 16 connections, `max_tokens` 16.
- Streams: 16 concurrent streamed chats of 64 tokens, repeated; CPU per token.
- Channel fetch: ``cell.value or await cell.get()`` timed in process, from 1 to 1,000
  concurrent tasks (target: under 1 µs, flat).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time

import httpx

from common import free_port, gateway_args, wait_http
from proxy_bench import LUA, cpu_seconds, run_wrk, spawn, wait_routing

CHAT = {
    "model": "sim-model",
    "max_tokens": 16,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant. " * 20},
        {"role": "user", "content": "Tell me about the old stone bridge."},
    ],
}


def start_gateway(worker: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    return spawn(1, *gateway_args(port, "round_robin", worker)), port


async def streams(port: int, concurrent: int, rounds: int) -> int:
    """Run ``rounds`` x ``concurrent`` streamed chats of 64 tokens; the tokens received."""
    body = {**CHAT, "max_tokens": 64, "stream": True}
    tokens = 0
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:

        async def one() -> int:
            count = 0
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and '"content":"' in line:
                        count += 1
            return count

        for _ in range(rounds):
            tokens += sum(await asyncio.gather(*(one() for _ in range(concurrent))))
    return tokens


async def ttft_under_load(port: int, concurrent: int = 64) -> float:
    """Median ms to the first content chunk with ``concurrent`` streams opened at once
    (DESIGN §6 saw grpc.aio on uvloop starve new streams: 6 ms became 61 ms at 64)."""
    body = {**CHAT, "max_tokens": 64, "stream": True}
    limits = httpx.Limits(max_connections=concurrent)
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def one() -> float:
            began = time.perf_counter()
            first: float | None = None
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if first is None and '"content":"' in line and '"content":""' not in line:
                        first = time.perf_counter() - began
            if first is None:
                raise RuntimeError("no content")
            return first * 1000

        return statistics.median(await asyncio.gather(*(one() for _ in range(concurrent))))


async def fetch_cost(concurrency: int, fetches: int = 20_000) -> float:
    """ns per channel fetch with ``concurrency`` tasks fetching at once."""
    from shunter.backends.grpc.backend import GrpcBackend

    backend = GrpcBackend("grpc://127.0.0.1:1", None, 1.0)  # type: ignore[arg-type]
    cell = backend.channel
    await cell.get()
    per_task = max(1, fetches // concurrency)
    start = asyncio.Event()

    async def task() -> float:
        await start.wait()
        began = time.perf_counter_ns()
        for _ in range(per_task):
            client = cell.value or await cell.get()
        assert client is not None
        return (time.perf_counter_ns() - began) / per_task

    tasks = [asyncio.ensure_future(task()) for _ in range(concurrency)]
    await asyncio.sleep(0)
    start.set()
    costs = await asyncio.gather(*tasks)
    await cell.close()
    return statistics.median(costs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    grpc_port, http_port = free_port(), free_port()
    sim = spawn(
        0,
        "-m",
        "shunter",
        "sim",
        "--grpc",
        "--port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--ttft-ms",
        "0",
        "--itl-ms",
        "0",
        "--prefill-us-per-token",
        "0",
        "--max-running",
        "256",
    )
    gateways: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    rows: dict[str, dict[str, list[float]]] = {}
    try:
        wait_http(f"http://127.0.0.1:{http_port}/health")
        gateways["gRPC"] = start_gateway(f"grpc://127.0.0.1:{grpc_port}")
        gateways["HTTP"] = start_gateway(f"http://127.0.0.1:{http_port}")
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as body_file:
            json.dump(CHAT, body_file)
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
            script.write(LUA.format(body=body_file.name))
        for _, port in gateways.values():
            wait_routing(port, body=json.dumps(CHAT).encode())
        for _ in range(args.rounds):
            for name, (process, port) in gateways.items():
                row = rows.setdefault(
                    name, {"cpu_us": [], "rps": [], "p50": [], "tok_us": [], "ttft": []}
                )
                pid = process.pid
                before = cpu_seconds(pid)
                result = run_wrk(
                    f"http://127.0.0.1:{port}/v1/chat/completions", 16, args.duration, script.name
                )
                row["cpu_us"].append((cpu_seconds(pid) - before) / result["total"] * 1e6)
                row["rps"].append(result["rps"])
                row["p50"].append(result["p50"])
                before = cpu_seconds(pid)
                tokens = asyncio.run(streams(port, 16, 4))
                row["tok_us"].append((cpu_seconds(pid) - before) / max(1, tokens) * 1e6)
                row["ttft"].append(asyncio.run(ttft_under_load(port)))
    finally:
        for process, _ in gateways.values():
            process.terminate()
            process.wait()
        sim.terminate()
        sim.wait()
    print(
        f"gateway CPU, same sim, medians of {args.rounds} rounds ({args.duration} s wrk, "
        "16 connections; streams: 16 x 64 tokens x 4)"
    )
    print(
        f"{'worker':>6} | {'CPU/chat':>9} | {'req/s':>7} | {'p50':>8} | "
        f"{'CPU/streamed token':>18} | {'TTFT, 64 streams':>16}"
    )
    for name, row in rows.items():
        print(
            f"{name:>6} | {statistics.median(row['cpu_us']):>7.0f}us | "
            f"{statistics.median(row['rps']):>7.0f} | {statistics.median(row['p50']):>6.0f}us | "
            f"{statistics.median(row['tok_us']):>16.1f}us | "
            f"{statistics.median(row['ttft']):>14.1f}ms"
        )
    print("channel fetch (cell.value or await cell.get()), ns per fetch:")
    costs = {n: asyncio.run(fetch_cost(n)) for n in (1, 10, 100, 1000)}
    print("  " + "  ".join(f"{n} tasks: {ns:.0f}" for n, ns in costs.items()))
    print(f"  ratio 1000/1: {costs[1000] / costs[1]:.2f}")


if __name__ == "__main__":
    main()
