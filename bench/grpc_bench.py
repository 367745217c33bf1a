"""The gRPC data plane's cost: gateway CPU per chat request and per streamed token, Shunter
beside smg's gRPC path on the same simulated worker, in the same run.

Run: python bench/grpc_bench.py [--duration 6] [--rounds 3] [--baseline REV] [--smg PATH]
     (needs `wrk` and the grpc extra; smg from `pip install smg`)

One `shunter sim --grpc --http-port` process serves both protocols from one engine (no
latency: --ttft-ms 0 --itl-ms 0). The gateways run one after the other on CPU 1 (all
started at once, each measured alone): Shunter with the worker as grpc://, smg with the same
grpc:// worker (it takes the sim's tokenizer through ``GetTokenizer``), Shunter at
``--baseline REV`` (an older revision, from a temporary worktree through PYTHONPATH: a
before/after ratio that survives a noisy machine), and Shunter with the worker as http://
for reference. The sim, wrk and the stream client share CPU 0. Each gateway runs with its
defaults (metrics, retries, breakers, admission; logging at its default level, so
Shunter's access log is on). Gateway CPU is the process's user+system time over the
requests completed (or the tokens streamed).

- Whole chat: wrk, 16 connections, `max_tokens` 16.
- Streams: 16 concurrent streamed chats of 64 tokens, repeated; CPU per token, the tokens
  counted from each stream's usage chunk (``stream_options.include_usage``), so a gateway
  that sends several tokens per chunk is not charged more per token.
- Channel fetch: ``cell.value or await cell.get()`` timed in process, from 1 to 1,000
  concurrent tasks (target: under 1 µs, flat).
- Floor: each round, a bare client on the gateways' core (``grpc_floor.py``: grpc.aio, and
  grpclib and a minimal reader over h2 when installed) calls the same sim with no gateway
  around it: the CPU every Python gateway on that client pays per call and per message
  before any work of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from common import (
    comparison_parser,
    cpu_seconds,
    free_port,
    gateway_args,
    median_ratio,
    smg_args,
    wait_http,
)
from proxy_bench import HERE, LUA, baseline_tree, run_wrk, spawn, wait_routing

CHAT = {
    "model": "sim-model",
    "max_tokens": 16,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant. " * 20},
        {"role": "user", "content": "Tell me about the old stone bridge."},
    ],
}
STREAM = {**CHAT, "max_tokens": 64, "stream": True, "stream_options": {"include_usage": True}}


def default_log_level(args: list[str]) -> list[str]:
    """``args`` less their ``--log-level``: every gateway logs at its own default (Shunter's
    access log on, a line per request; smg's two), as issue 17's method asks."""
    at = args.index("--log-level")
    return args[:at] + args[at + 2 :]


def start_shunter(worker: str, source: Path | None = None) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    args = default_log_level(gateway_args(port, "round_robin", worker))
    return spawn(1, *args, source=source), port


def start_smg(smg: str, worker: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = default_log_level(smg_args(smg, port, "round_robin", [worker]))
    command += ["--prometheus-host", "127.0.0.1"]
    process = subprocess.Popen(
        ["taskset", "-c", "1", *command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return process, port


async def streams(port: int, concurrent: int, rounds: int) -> int:
    """Run ``rounds`` x ``concurrent`` streamed chats of 64 tokens; the tokens streamed
    (the completion tokens of each stream's usage chunk)."""
    tokens = 0
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:

        async def one() -> int:
            count = 0
            async with client.stream("POST", "/v1/chat/completions", json=STREAM) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and '"usage":{' in line:
                        usage = json.loads(line[6:]).get("usage") or {}
                        count = max(count, int(usage.get("completion_tokens") or 0))
            if not count:
                raise RuntimeError(f"a stream through port {port} had no usage chunk")
            return count

        for _ in range(rounds):
            tokens += sum(await asyncio.gather(*(one() for _ in range(concurrent))))
    return tokens


async def ttft_under_load(port: int, concurrent: int = 64) -> float:
    """Median ms to the first content chunk with ``concurrent`` streams opened at once
    (DESIGN §6 saw grpc.aio on uvloop starve new streams: 6 ms became 61 ms at 64)."""
    limits = httpx.Limits(max_connections=concurrent)
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def one() -> float:
            began = time.perf_counter()
            first: float | None = None
            async with client.stream("POST", "/v1/chat/completions", json=STREAM) as response:
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


def start_sim() -> tuple[subprocess.Popen[bytes], int, int]:
    grpc_port, http_port = free_port(), free_port()
    sim = spawn(
        0,
        *("-m", "shunter", "sim", "--grpc", "--port", str(grpc_port)),
        *("--http-port", str(http_port), "--ttft-ms", "0", "--itl-ms", "0"),
        *("--prefill-us-per-token", "0", "--max-running", "256"),
    )
    return sim, grpc_port, http_port


@dataclass
class ChatBench:
    """The sim every gateway of a run calls, the wrk script that posts ``CHAT``, and the
    gateways started so far (name: process and port), stopped with the sim."""

    grpc_port: int
    http_port: int
    script: str
    gateways: dict[str, tuple[subprocess.Popen[bytes], int]] = field(default_factory=dict)

    def wait_routing(self) -> None:
        for _, port in self.gateways.values():
            wait_routing(port, body=json.dumps(CHAT).encode())

    def chat_cpu(self, name: str, duration: int) -> tuple[float, dict[str, float]]:
        """Gateway ``name``'s CPU µs per whole chat under wrk (16 connections), and wrk's
        figures."""
        process, port = self.gateways[name]
        before = cpu_seconds(process.pid)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        result = run_wrk(url, 16, duration, self.script)
        return (cpu_seconds(process.pid) - before) / result["total"] * 1e6, result


@contextlib.contextmanager
def chat_bench() -> Iterator[ChatBench]:
    """A sim serving (``start_sim``) and the chat's wrk script; on the way out, every
    gateway added to ``gateways``, the sim and the files are gone."""
    sim, grpc_port, http_port = start_sim()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as body_file:
        json.dump(CHAT, body_file)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA.format(body=body_file.name))
    bench = ChatBench(grpc_port, http_port, script.name)
    try:
        wait_http(f"http://127.0.0.1:{http_port}/health")
        yield bench
    finally:
        for process, _ in bench.gateways.values():
            process.terminate()
            process.wait()
        sim.terminate()
        sim.wait()
        os.unlink(script.name)
        os.unlink(body_file.name)


def main() -> None:
    args = comparison_parser(__doc__, duration=6).parse_args()
    rows: dict[str, dict[str, list[float]]] = {}
    with baseline_tree(args.baseline) as baseline, chat_bench() as bench:
        measure_all(bench, args, rows, baseline)
    report(rows, args)


def measure_all(
    bench: ChatBench,
    args: argparse.Namespace,
    rows: dict[str, dict[str, list[float]]],
    baseline: Path | None,
) -> None:
    """Every gateway, ``args.rounds`` times, into ``rows``; the bare clients each round."""
    grpc_url = f"grpc://127.0.0.1:{bench.grpc_port}"
    gateways = bench.gateways
    gateways["shunter"] = start_shunter(grpc_url)
    if baseline is not None:
        gateways["baseline"] = start_shunter(grpc_url, baseline / "src")
    if args.smg:
        gateways["smg"] = start_smg(args.smg, grpc_url)
    gateways["HTTP"] = start_shunter(f"http://127.0.0.1:{bench.http_port}")
    bench.wait_routing()
    for _ in range(args.rounds):
        for name, (process, port) in gateways.items():
            row = rows.setdefault(
                name, {"cpu_us": [], "rps": [], "p50": [], "tok_us": [], "ttft": []}
            )
            per_chat, result = bench.chat_cpu(name, args.duration)
            row["cpu_us"].append(per_chat)
            row["rps"].append(result["rps"])
            row["p50"].append(result["p50"])
            before = cpu_seconds(process.pid)
            tokens = asyncio.run(streams(port, 16, 4))
            row["tok_us"].append((cpu_seconds(process.pid) - before) / max(1, tokens) * 1e6)
            row["ttft"].append(asyncio.run(ttft_under_load(port)))
        for name, per_call, per_message in floor(bench.grpc_port):
            row = rows.setdefault(name, {"cpu_us": [], "tok_us": []})
            row["cpu_us"].append(per_call)
            row["tok_us"].append(per_message)


def floor(grpc_port: int, clients: str = "") -> list[tuple[str, float, float]]:
    """The bare clients' CPU per whole call and per streamed message (``grpc_floor.py``, on
    the gateways' core; ``clients``: which, comma-separated, or every installed one): one
    ``(floor: client, per call, per message)`` per client. Each client takes a few seconds;
    five minutes means the sim stopped answering."""
    command = [sys.executable, str(HERE / "grpc_floor.py"), str(grpc_port), "--clients", clients]
    output = subprocess.run(
        ["taskset", "-c", "1", *command], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    found = []
    for line in output.splitlines():
        client, call, message, _ = (part.strip() for part in line.split("|"))
        name = "floor: " + client.removeprefix("floor:").strip()
        found.append((name, float(call.split()[0]), float(message.split()[0])))
    return found


def ratio(rows: dict[str, dict[str, list[float]]], other: str, key: str) -> float:
    """Shunter's figure over ``other``'s, round by round (``median_ratio``)."""
    found = median_ratio(rows["shunter"][key], rows[other][key])
    return found if found is not None else float("nan")


def report(rows: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    def med(name: str, key: str) -> float:
        return statistics.median(rows[name][key])

    print(
        f"gateway CPU, same sim, medians of {args.rounds} rounds ({args.duration} s wrk, "
        "16 connections; streams: 16 x 64 tokens x 4); load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    print(
        f"{'gateway':>15} | {'CPU/chat':>9} | {'req/s':>7} | {'p50':>8} | "
        f"{'CPU/streamed token':>18} | {'TTFT, 64 streams':>16}"
    )
    for name in rows:
        if name.startswith("floor: "):  # a bare client: per call, per message (65 a stream)
            print(
                f"{name:>15} | {med(name, 'cpu_us'):>7.0f}us | {'-':>7} | {'-':>8} | "
                f"{med(name, 'tok_us'):>14.1f}us/m | {'-':>16}"
            )
            continue
        print(
            f"{name:>15} | {med(name, 'cpu_us'):>7.0f}us | {med(name, 'rps'):>7.0f} | "
            f"{med(name, 'p50'):>6.0f}us | {med(name, 'tok_us'):>16.1f}us | "
            f"{med(name, 'ttft'):>14.1f}ms"
        )
    for other in ("smg", "baseline"):
        if other in rows:
            print(
                f"shunter/{other}: CPU per chat {ratio(rows, other, 'cpu_us'):.2f}, "
                f"CPU per streamed token {ratio(rows, other, 'tok_us'):.2f}"
            )
    print("channel fetch (cell.value or await cell.get()), ns per fetch:")
    costs = {n: asyncio.run(fetch_cost(n)) for n in (1, 10, 100, 1000)}
    print("  " + "  ".join(f"{n} tasks: {ns:.0f}" for n, ns in costs.items()))
    print(f"  ratio 1000/1: {costs[1000] / costs[1]:.2f}")


if __name__ == "__main__":
    main()
