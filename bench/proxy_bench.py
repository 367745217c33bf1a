"""Proxy overhead: direct-to-worker against through-the-gateway, in the same run.

Run: python bench/proxy_bench.py [--duration 8]     (needs `wrk`: apt-get install wrk)

The gateway runs alone on CPU 1; the mock worker, wrk and the stream client share CPU 0.
Gateway CPU per request is the gateway process's user+system time over the requests wrk
completed, the figure that survives a noisy machine. Streams: 64 chunks 10 ms apart;
time to first byte at 1 stream (median of 30), CPU per stream at 64 concurrent streams.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
BODY = (HERE / "chat_1k.json").read_bytes()
TICKS = os.sysconf("SC_CLK_TCK")
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = io.open("{body}", "rb"):read("*a")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def spawn(cpu: int, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["taskset", "-c", str(cpu), sys.executable, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(url)


def to_us(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    value, unit = match.groups()
    return float(value) * {"us": 1, "ms": 1e3, "s": 1e6, "m": 6e7}[unit]


def run_wrk(url: str, conns: int, seconds: int, script: str) -> dict[str, float]:
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "0",
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            script,
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = to_us(re.search(r"50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = to_us(re.search(r"99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{errors.group(1)} failed responses from {url}")
    return {"total": total, "rps": rps, "p50": p50, "p99": p99}


async def one_stream(port: int) -> tuple[float, float]:
    """(seconds to the first body byte, seconds to [DONE]) for one streamed request."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = BODY.replace(b'"stream": false', b'"stream": true')
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    data = b""
    while b"\r\n\r\n" not in data:
        data += await reader.read(65536)
    _head, rest = data.split(b"\r\n\r\n", 1)
    while b"data:" not in rest:
        rest += await reader.read(65536)
    first = time.perf_counter() - started
    while b"[DONE]" not in rest:
        chunk = await reader.read(65536)
        if not chunk:
            break
        rest += chunk
    writer.close()
    return first, time.perf_counter() - started


async def stream_ttfb(port: int, runs: int = 30) -> float:
    firsts = [(await one_stream(port))[0] for _ in range(runs)]
    return statistics.median(firsts) * 1e6


async def stream_batch(port: int, concurrent: int, rounds: int) -> int:
    for _ in range(rounds):
        await asyncio.gather(*(one_stream(port) for _ in range(concurrent)))
    return concurrent * rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    args = parser.parse_args()
    up_port, gw_port = free_port(), free_port()
    upstream = spawn(0, str(HERE / "mock_upstream.py"), str(up_port))
    gateway = spawn(
        1,
        "-m",
        "shunter",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(gw_port),
        "--prometheus-port",
        "0",
        "--log-level",
        "warning",
        "--policy",
        "round_robin",
        "--worker-urls",
        f"http://127.0.0.1:{up_port}",
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA.format(body=HERE / "chat_1k.json"))
    try:
        wait_http(f"http://127.0.0.1:{up_port}/health")
        wait_http(f"http://127.0.0.1:{gw_port}/readiness")
        rows = []
        for conns in (1, 32, 256):
            direct = run_wrk(
                f"http://127.0.0.1:{up_port}/v1/chat/completions", conns, args.duration, script.name
            )
            before = cpu_seconds(gateway.pid)
            proxied = run_wrk(
                f"http://127.0.0.1:{gw_port}/v1/chat/completions", conns, args.duration, script.name
            )
            cpu_us = (cpu_seconds(gateway.pid) - before) / proxied["total"] * 1e6
            rows.append((conns, direct, proxied, cpu_us))
        direct_ttfb = asyncio.run(stream_ttfb(up_port))
        gateway_ttfb = asyncio.run(stream_ttfb(gw_port))
        before = cpu_seconds(gateway.pid)
        streams = asyncio.run(stream_batch(gw_port, 64, 4))
        stream_cpu = (cpu_seconds(gateway.pid) - before) / streams * 1e6
    finally:
        gateway.terminate()
        upstream.terminate()
        gateway.wait()
        upstream.wait()
        os.unlink(script.name)
    print(f"1 KB chat body; wrk -t1 for {args.duration}s per row; gateway pinned to CPU 1")
    print(
        f"{'conns':>5} | {'direct req/s':>12} {'gateway req/s':>13} | {'added p50':>10} "
        f"{'added p99':>10} | {'gateway CPU/req':>15}"
    )
    for conns, direct, proxied, cpu_us in rows:
        print(
            f"{conns:>5} | {direct['rps']:>12.0f} {proxied['rps']:>13.0f} | "
            f"{proxied['p50'] - direct['p50']:>8.0f}us {proxied['p99'] - direct['p99']:>8.0f}us"
            f" | {cpu_us:>13.1f}us"
        )
    print(
        f"streams (64 chunks, 10 ms apart): TTFB direct {direct_ttfb:.0f}us, via gateway "
        f"{gateway_ttfb:.0f}us, added {gateway_ttfb - direct_ttfb:.0f}us; "
        f"gateway CPU per stream {stream_cpu:.0f}us (64 concurrent, {streams} streams)"
    )


if __name__ == "__main__":
    main()
