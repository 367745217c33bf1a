"""Proxy overhead: direct-to-worker against through-the-gateway, in the same run.

Run: python bench/proxy_bench.py [--duration 8] [--baseline REV]   (needs `wrk`)

``--baseline REV`` runs Shunter as it was at git revision REV beside the working copy, in
the same run (a temporary worktree, imported first through PYTHONPATH): a before/after
ratio that survives a noisy machine.

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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import WRK_POST_LUA, cpu_seconds, free_port, gateway_args, wait_http

HERE = Path(__file__).resolve().parent
BODY = (HERE / "chat_1k.json").read_bytes()
LUA = WRK_POST_LUA


def spawn(cpu: int, *args: str, source: Path | None = None) -> subprocess.Popen[bytes]:
    """``python args`` on ``cpu``; with ``source``, Shunter is imported from that tree."""
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        ["taskset", "-c", str(cpu), sys.executable, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )


def checkout(rev: str) -> Path:
    """A worktree of ``rev`` in a temporary directory; its ``src`` to import Shunter from."""
    where = Path(tempfile.mkdtemp(prefix="shunter-baseline-"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(where), rev],
        cwd=HERE.parent,
        check=True,
        capture_output=True,
    )
    return where


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
    p50 = to_us(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = to_us(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
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


def shunter(up_url: str, source: Path | None = None) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    return spawn(1, *gateway_args(port, "round_robin", up_url), source=source), port


def start_gateways(
    up_url: str, smg: str | None, baseline: Path | None = None
) -> dict[str, tuple[subprocess.Popen[bytes], int]]:
    gateways = {"shunter": shunter(up_url)}
    if baseline is not None:
        gateways["baseline"] = shunter(up_url, baseline / "src")
    if smg:
        port = free_port()
        process = subprocess.Popen(
            [
                "taskset",
                "-c",
                "1",
                smg,
                "launch",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--worker-urls",
                up_url,
                "--policy",
                "round_robin",
                "--prometheus-port",
                str(free_port()),
                "--log-level",
                "warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        gateways["smg"] = (process, port)
    return gateways


def wait_routing(port: int, timeout: float = 60, body: bytes = BODY) -> None:
    """Wait until a chat request (``body``) through the gateway succeeds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=body,
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"gateway on {port} never routed a request")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs per row; the median of each figure is reported"
    )
    parser.add_argument(
        "--baseline", default=None, help="git revision of Shunter to measure beside this one"
    )
    parser.add_argument(
        "--smg",
        default=shutil.which("smg"),
        help="smg executable to measure in the same run (pip install smg)",
    )
    args = parser.parse_args()
    up_port = free_port()
    upstream = spawn(0, str(HERE / "mock_upstream.py"), str(up_port))
    wait_http(f"http://127.0.0.1:{up_port}/health")
    baseline = checkout(args.baseline) if args.baseline else None
    gateways = start_gateways(f"http://127.0.0.1:{up_port}", args.smg, baseline)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA.format(body=HERE / "chat_1k.json"))
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    streams: dict[str, dict[str, float]] = {}
    try:
        for _process, port in gateways.values():
            wait_routing(port)
        direct_url = f"http://127.0.0.1:{up_port}/v1/chat/completions"
        for conns in (1, 32, 256):
            for _ in range(args.rounds):
                direct = run_wrk(direct_url, conns, args.duration, script.name)
                results.setdefault(("direct", conns), []).append(direct)
                for name, (process, port) in gateways.items():
                    before = cpu_seconds(process.pid)
                    row = run_wrk(
                        f"http://127.0.0.1:{port}/v1/chat/completions",
                        conns,
                        args.duration,
                        script.name,
                    )
                    row["cpu_us"] = (cpu_seconds(process.pid) - before) / row["total"] * 1e6
                    row["added_p50"] = row["p50"] - direct["p50"]
                    row["added_p99"] = row["p99"] - direct["p99"]
                    results.setdefault((name, conns), []).append(row)
        direct_ttfb = asyncio.run(stream_ttfb(up_port))
        for name, (process, port) in gateways.items():
            ttfb = asyncio.run(stream_ttfb(port))
            before = cpu_seconds(process.pid)
            count = asyncio.run(stream_batch(port, 64, 4))
            streams[name] = {
                "ttfb": ttfb,
                "added": ttfb - direct_ttfb,
                "cpu": (cpu_seconds(process.pid) - before) / count * 1e6,
            }
    finally:
        for process, _port in gateways.values():
            process.terminate()
            process.wait()
        upstream.terminate()
        upstream.wait()
        os.unlink(script.name)
        if baseline is not None:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(baseline)], cwd=HERE.parent, check=True
            )
    report(results, streams, direct_ttfb, args)


def report(
    results: dict[tuple[str, int], list[dict[str, float]]],
    streams: dict[str, dict[str, float]],
    direct_ttfb: float,
    args: argparse.Namespace,
) -> None:
    def med(name: str, conns: int, key: str) -> float:
        return statistics.median(r[key] for r in results[(name, conns)])

    print(
        f"1 KB chat body, wrk -t1, {args.duration}s x {args.rounds} rounds per row (medians); "
        "gateways pinned to CPU 1, mock worker and wrk on CPU 0"
    )
    print(
        f"{'gateway':>8} {'conns':>5} | {'req/s':>7} {'direct req/s':>12} | {'added p50':>10} "
        f"{'added p99':>10} | {'CPU/req':>9}"
    )
    names = sorted({name for name, _ in results if name != "direct"})
    for conns in (1, 32, 256):
        for name in names:
            print(
                f"{name:>8} {conns:>5} | {med(name, conns, 'rps'):>7.0f} "
                f"{med('direct', conns, 'rps'):>12.0f} | "
                f"{med(name, conns, 'added_p50'):>8.0f}us {med(name, conns, 'added_p99'):>8.0f}us"
                f" | {med(name, conns, 'cpu_us'):>7.1f}us"
            )
    print(
        f"streams: 64 chunks 10 ms apart; TTFB median of 30 (direct {direct_ttfb:.0f}us); "
        "CPU per stream at 64 concurrent x 4"
    )
    for name, row in streams.items():
        print(
            f"{name:>8} | TTFB {row['ttfb']:>6.0f}us  added {row['added']:>6.0f}us | "
            f"CPU/stream {row['cpu']:>7.0f}us"
        )


if __name__ == "__main__":
    main()
