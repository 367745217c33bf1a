"""Instructions per proxied request and per relayed stream chunk, counted by callgrind.

Run: python bench/instructions_bench.py [--baseline REV] [--vllm-router PATH]   (needs valgrind)

CPU time on a shared 2-core machine moves by ±10% between runs; callgrind's instruction
count for the same work moves by ~1% (whole requests) to a few % (streams), whatever else
runs. So a change worth 1-3% shows here and not in ``proxy_bench.py``. What it does not
see: the kernel (every gateway makes the same syscalls per request: a read and a write on
each side) and how fast the instructions run (Rust's run faster than the interpreter's).

Each gateway runs under ``valgrind --tool=callgrind`` with instrumentation off; once it
routes, a warm-up, then instrumentation on for exactly N whole requests (one keep-alive
connection, the 1 KB chat body) and then for M rounds of 2 concurrent 64-chunk streams
(per chunk: those rounds' instructions over their chunks, each stream's request included).
The gateway is at its default log level (Shunter writes its access log). Starting under
valgrind takes ~1-2 minutes; the gateways run side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import free_port, gateway_args, wait_http
from proxy_bench import (
    BODY,
    HERE,
    baseline_tree,
    importing,
    one_stream,
    vllm_router_command,
    wait_routing,
)

STREAMS_PER_ROUND = 2  # more, and the gateway under valgrind falls behind (reads coalesce)
CHUNKS_PER_STREAM = 65  # 64 tokens and [DONE]


def callgrind(pid: int, *command: str) -> None:
    subprocess.run(["callgrind_control", *command, str(pid)], check=True, capture_output=True)


def counted(pid: int, out: Path, work: Callable[[], None]) -> int:
    """Instructions process ``pid`` ran while ``work()`` ran."""
    callgrind(pid, "-z")
    for old in out.parent.glob(out.name + "*"):
        old.unlink()
    callgrind(pid, "-i", "on")
    work()
    callgrind(pid, "-d")
    callgrind(pid, "-i", "off")
    total = 0
    for dump in out.parent.glob(out.name + "*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


def whole_requests(port: int, count: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(count):
        connection.request(
            "POST", "/v1/chat/completions", body=BODY, headers={"content-type": "application/json"}
        )
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"gateway on {port} answered {response.status}")
    connection.close()


def streams(port: int, rounds: int) -> None:
    async def run() -> None:
        for _ in range(rounds):
            await asyncio.gather(*(one_stream(port) for _ in range(STREAMS_PER_ROUND)))

    asyncio.run(run())


def measure(
    command: list[str], env: dict[str, str], requests: int, rounds: int, scratch: Path
) -> tuple[float, float]:
    """(instructions per whole request, per stream chunk) of the gateway ``command`` on
    the port it was given (its last ``--port``)."""
    port = int(command[command.index("--port") + 1])
    out = scratch / f"callgrind.{port}"
    process = subprocess.Popen(
        [
            *("valgrind", "--tool=callgrind", "--instr-atstart=no"),
            f"--callgrind-out-file={out}",
            *command,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_routing(port, timeout=600)
        whole_requests(port, max(2, requests // 10))
        per_request = counted(process.pid, out, lambda: whole_requests(port, requests)) / requests
        streams(port, 1)
        chunks = rounds * STREAMS_PER_ROUND * CHUNKS_PER_STREAM
        per_chunk = counted(process.pid, out, lambda: streams(port, rounds)) / chunks
    finally:
        process.terminate()
        process.wait()
    return per_request, per_chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300, help="whole requests counted")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of 2 streams counted")
    parser.add_argument("--baseline", default=None, help="git revision to count beside this one")
    parser.add_argument(
        "--vllm-router",
        default=shutil.which("vllm-router") or "",
        help="vllm-router executable to count too; '' to skip",
    )
    args = parser.parse_args()
    up_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(HERE / "mock_upstream.py"), str(up_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_http(f"http://127.0.0.1:{up_port}/health")
    up_url = f"http://127.0.0.1:{up_port}"
    with baseline_tree(args.baseline) as baseline:

        def gateway() -> list[str]:
            return [sys.executable, *gateway_args(free_port(), "round_robin", up_url, quiet=False)]

        # name -> (command, environment): each Shunter imports its own tree first.
        runs = {"shunter": (gateway(), importing(None))}
        if baseline is not None:
            runs["baseline"] = (gateway(), importing(baseline / "src"))
        if args.vllm_router:
            command = vllm_router_command(args.vllm_router, free_port(), up_url)
            runs["vllm-router"] = (command, importing(None))
        results: dict[str, tuple[float, float]] = {}
        try:
            with (
                tempfile.TemporaryDirectory(prefix="callgrind-") as scratch,
                ThreadPoolExecutor(len(runs)) as pool,
            ):
                where = Path(scratch)
                futures = {
                    name: pool.submit(measure, command, env, args.requests, args.rounds, where)
                    for name, (command, env) in runs.items()
                }
                results = {name: future.result() for name, future in futures.items()}
        finally:
            upstream.terminate()
            upstream.wait()
    reference = results.get("vllm-router")
    print(
        f"user-space instructions (callgrind), {args.requests} whole requests on one "
        f"connection, {args.rounds} x {STREAMS_PER_ROUND} streams of {CHUNKS_PER_STREAM} chunks"
    )
    for name, (request, chunk) in results.items():
        ratios = (
            f"  x vllm-router {request / reference[0]:.2f} / {chunk / reference[1]:.2f}"
            if reference
            else ""
        )
        print(
            f"{name:>12} | {request / 1000:7.1f}k per request | "
            f"{chunk / 1000:6.1f}k per chunk{ratios}"
        )


if __name__ == "__main__":
    main()
