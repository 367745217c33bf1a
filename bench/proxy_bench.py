"""Proxy overhead: direct-to-worker against through-the-gateway, in the same run.

Run: python bench/proxy_bench.py [--duration 8] [--baseline REV]   (needs `wrk`)

``--baseline REV`` runs Shunter as it was at git revision REV beside the working copy, in
the same run (a temporary worktree, imported first through PYTHONPATH): a before/after
ratio that survives a noisy machine. ``--baseline DIR``, a directory holding a Shunter tree
(``DIR/src``), runs that tree as it is instead: a variant that is not a commit, such as
modules compiled in place (``baseline_tree``, which every bench taking ``--baseline``
uses). The Rust routers (smg, vllm-router, sglang-router) are measured in the same run
when installed; every figure is printed with its ratio to vllm-router's.

Every gateway runs at its own default log level, as it ships: Shunter writes its access log
(a line per request), smg and sglang-router two lines per request, vllm-router none.

The gateway runs alone on CPU 1; the mock worker, wrk and the stream client share CPU 0.
Gateway CPU per request is the gateway process's user+system time over the requests wrk
completed, the figure that survives a noisy machine. One more row puts the mock worker
and wrk on CPU 1 beside the gateways (one connection): the latency a gateway adds when it
has to share its core, where waking up costs what it costs. Streams: 64 chunks 10 ms apart;
time to first byte at 1 stream (median of 30 one-chunk streams),
CPU per stream at 32 concurrent streams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from common import (
    WRK_POST_LUA,
    comparison_parser,
    cpu_seconds,
    free_port,
    gateway_args,
    median_ratio,
    wait_http,
)

HERE = Path(__file__).resolve().parent
BODY = (HERE / "chat_1k.json").read_bytes()
LUA = WRK_POST_LUA
GATEWAY_CPU = 1
LOAD_CPU = 0
# The reference every figure is divided by, when it ran.
REFERENCE = "vllm-router"
STREAM_CHUNKS = 64


def spawn(cpu: int, *args: str, source: Path | None = None) -> subprocess.Popen[bytes]:
    """``python args`` on ``cpu``; with ``source``, Shunter is imported from that tree."""
    return subprocess.Popen(
        ["taskset", "-c", str(cpu), sys.executable, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=importing(source),
    )


def importing(source: Path | None) -> dict[str, str]:
    """The environment for a Python that imports Shunter from ``source`` first (None: as
    this one does)."""
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def build_of(source: Path | None) -> str:
    """Which build of Shunter ``source`` holds (None: the one this Python imports), as
    ``shunter --version`` says it: "compiled" or "interpreted" (a revision from before the
    compiled build says neither, and is "interpreted")."""
    version = subprocess.run(
        [sys.executable, "-m", "shunter", "--version"],
        capture_output=True,
        text=True,
        check=True,
        env=importing(source),
        cwd=tempfile.gettempdir(),  # not a directory holding a shunter of its own
    ).stdout
    return "compiled" if "(compiled)" in version else "interpreted"


def pin(pid: int, cpu: int) -> None:
    """Move every thread of process ``pid`` to ``cpu``."""
    subprocess.run(
        ["taskset", "-a", "-p", "-c", str(cpu), str(pid)], check=True, capture_output=True
    )


@contextlib.contextmanager
def baseline_tree(rev: str | None) -> Iterator[Path | None]:
    """The Shunter tree ``--baseline`` names, its ``src`` to import Shunter from: None
    without one; a directory holding a tree, as it is; else a worktree of git revision
    ``rev`` in a temporary directory, removed on the way out."""
    if not rev or Path(rev).is_dir():
        yield Path(rev) if rev else None
        return
    where = Path(tempfile.mkdtemp(prefix="shunter-baseline-"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(where), rev],
        cwd=HERE.parent,
        check=True,
        capture_output=True,
    )
    try:
        yield where
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(where)], cwd=HERE.parent, check=True
        )


def to_us(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    value, unit = match.groups()
    return float(value) * {"us": 1, "ms": 1e3, "s": 1e6, "m": 6e7}[unit]


def run_wrk(
    url: str, conns: int, seconds: int, script: str, cpu: int = LOAD_CPU
) -> dict[str, float]:
    out = subprocess.run(
        [
            "taskset",
            "-c",
            str(cpu),
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


async def one_stream(port: int, body: bytes = BODY) -> tuple[float, float]:
    """(seconds to the first body byte, seconds to [DONE]) for one streamed request."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = body.replace(b'"stream": false', b'"stream": true')
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


# A one-chunk stream (the mock worker sends ``max_tokens`` chunks at most): a first byte
# measured without waiting out a whole stream, the worker's connection back in the pool.
TTFB_BODY = BODY.replace(b'"max_tokens": 64', b'"max_tokens": 1')


async def stream_ttfb(port: int, runs: int = 30) -> float:
    firsts = [(await one_stream(port, TTFB_BODY))[0] for _ in range(runs)]
    return statistics.median(firsts) * 1e6


async def stream_batch(port: int, concurrent: int, rounds: int) -> int:
    for _ in range(rounds):
        await asyncio.gather(*(one_stream(port) for _ in range(concurrent)))
    return concurrent * rounds


def shunter(up_url: str, source: Path | None = None) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    args = gateway_args(port, "round_robin", up_url, quiet=False)
    return spawn(GATEWAY_CPU, *args, source=source), port


def smg_command(smg: str, port: int, up_url: str) -> list[str]:
    return [
        *(smg, "launch", "--host", "127.0.0.1", "--port", str(port)),
        *("--prometheus-port", str(free_port()), "--policy", "round_robin"),
        *("--worker-urls", up_url),
    ]


def vllm_router_command(router: str, port: int, up_url: str) -> list[str]:
    """vllm-router's own CLI: no subcommand."""
    return [
        *(router, "--host", "127.0.0.1", "--port", str(port)),
        *("--prometheus-port", str(free_port()), "--policy", "round_robin"),
        *("--worker-urls", up_url),
    ]


def sglang_router_command(module: str, port: int, up_url: str) -> list[str]:
    """sglang-router is launched as its module (its package also installs a ``smg`` script,
    which would shadow smg's own); the arguments are smg's, from which it forked."""
    _program, _launch, *arguments = smg_command("", port, up_url)
    return [sys.executable, "-m", module, *arguments]


# The Rust routers measured beside Shunter: name -> command for (program, port, worker URL).
ROUTERS: dict[str, Callable[[str, int, str], list[str]]] = {
    "smg": smg_command,
    "vllm-router": vllm_router_command,
    "sglang-router": sglang_router_command,
}


def start_gateways(
    up_url: str, routers: dict[str, str], baseline: Path | None = None
) -> dict[str, tuple[subprocess.Popen[bytes], int]]:
    """Shunter, its baseline and every router named in ``routers`` (name -> program, ''
    to skip), each on the gateway CPU: name -> (process, port)."""
    gateways = {"shunter": shunter(up_url)}
    if baseline is not None:
        gateways["baseline"] = shunter(up_url, baseline / "src")
    for name, program in routers.items():
        if not program:
            continue
        port = free_port()
        command = ROUTERS[name](program, port, up_url)
        process = subprocess.Popen(
            ["taskset", "-c", str(GATEWAY_CPU), *command],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        gateways[name] = (process, port)
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


def installed_module(name: str) -> str:
    return name if importlib.util.find_spec(name.split(".")[0]) is not None else ""


Results = dict[tuple[str, str], list[dict[str, float]]]


def measure_wrk(
    results: Results,
    label: str,
    gateways: dict[str, tuple[subprocess.Popen[bytes], int]],
    direct_url: str,
    conns: int,
    args: argparse.Namespace,
    script: str,
    cpu: int = LOAD_CPU,
) -> None:
    """One round of row ``label``: direct, then each gateway, wrk on ``cpu``."""
    direct = run_wrk(direct_url, conns, args.duration, script, cpu)
    results.setdefault(("direct", label), []).append(direct)
    for name, (process, port) in gateways.items():
        before = cpu_seconds(process.pid)
        row = run_wrk(
            f"http://127.0.0.1:{port}/v1/chat/completions", conns, args.duration, script, cpu
        )
        row["cpu_us"] = (cpu_seconds(process.pid) - before) / row["total"] * 1e6
        row["added_p50"] = row["p50"] - direct["p50"]
        row["added_p99"] = row["p99"] - direct["p99"]
        results.setdefault((name, label), []).append(row)


def main() -> None:
    parser = comparison_parser(__doc__, duration=8)
    parser.add_argument(
        "--conns",
        default="1,32,256",
        help="comma-separated connection counts for the gateway-on-its-own-core rows",
    )
    parser.add_argument(
        "--streams", type=int, default=32, help="concurrent streams for CPU per stream"
    )
    parser.add_argument(
        "--vllm-router",
        default=shutil.which("vllm-router") or "",
        help="vllm-router executable (pip install vllm-router); '' to skip",
    )
    parser.add_argument(
        "--sglang-router",
        default=installed_module("sglang_router.launch_router"),
        help="sglang-router's launch module (pip install sglang-router); '' to skip",
    )
    args = parser.parse_args()
    conn_counts = [int(c) for c in args.conns.split(",") if c]
    routers = {
        "smg": args.smg,
        "vllm-router": args.vllm_router,
        "sglang-router": args.sglang_router,
    }
    with baseline_tree(args.baseline) as baseline:
        results, streams, names = measure_all(args, conn_counts, routers, baseline)
        trees = {"shunter": None, **({"baseline": baseline / "src"} if baseline else {})}
        builds = {name: build_of(source) for name, source in trees.items()}
    report(results, streams, names, args)
    print("builds: " + ", ".join(f"{name} {build}" for name, build in builds.items()))


def measure_all(
    args: argparse.Namespace,
    conn_counts: list[int],
    routers: dict[str, str],
    baseline: Path | None,
) -> tuple[Results, dict[str, list[dict[str, float]]], list[str]]:
    """Every row, ``args.rounds`` times, for Shunter, ``baseline`` and ``routers``: the
    whole requests' results, the streams' and the gateways' names."""
    up_port = free_port()
    upstream = spawn(LOAD_CPU, str(HERE / "mock_upstream.py"), str(up_port))
    wait_http(f"http://127.0.0.1:{up_port}/health")
    gateways = start_gateways(f"http://127.0.0.1:{up_port}", routers, baseline)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA.format(body=HERE / "chat_1k.json"))
    results: Results = {}
    streams: dict[str, list[dict[str, float]]] = {}
    try:
        for _process, port in gateways.values():
            wait_routing(port)
        direct_url = f"http://127.0.0.1:{up_port}/v1/chat/completions"
        for conns in conn_counts:
            for _ in range(args.rounds):
                measure_wrk(results, str(conns), gateways, direct_url, conns, args, script.name)
        pin(upstream.pid, GATEWAY_CPU)
        try:
            for _ in range(args.rounds):
                measure_wrk(
                    results, "1, one core", gateways, direct_url, 1, args, script.name, GATEWAY_CPU
                )
        finally:
            pin(upstream.pid, LOAD_CPU)
        for _ in range(args.rounds):
            direct_ttfb = asyncio.run(stream_ttfb(up_port))
            for name, (process, port) in gateways.items():
                ttfb = asyncio.run(stream_ttfb(port))
                before = cpu_seconds(process.pid)
                count = asyncio.run(stream_batch(port, args.streams, 4))
                cpu = (cpu_seconds(process.pid) - before) / count * 1e6
                streams.setdefault(name, []).append(
                    {
                        "ttfb": ttfb,
                        "added": ttfb - direct_ttfb,
                        "cpu": cpu,
                        "cpu_chunk": cpu / (STREAM_CHUNKS + 1),
                    }
                )
            streams.setdefault("direct", []).append({"ttfb": direct_ttfb})
    finally:
        for process, _port in gateways.values():
            process.terminate()
            process.wait()
        upstream.terminate()
        upstream.wait()
        os.unlink(script.name)
    return results, streams, list(gateways)


def ratio(rounds: list[dict[str, float]], references: list[dict[str, float]], key: str) -> str:
    """``key``'s ratio to the reference's, round by round (``median_ratio``), or '-'."""
    found = median_ratio((r[key] for r in rounds), (r[key] for r in references))
    return f"{found:>5.2f}" if found is not None else f"{'-':>5}"


def report(
    results: Results,
    streams: dict[str, list[dict[str, float]]],
    names: list[str],
    args: argparse.Namespace,
) -> None:
    def med(name: str, label: str, key: str) -> float:
        return statistics.median(r[key] for r in results[(name, label)])

    def x(name: str, label: str, key: str) -> str:
        return ratio(results[(name, label)], results.get((REFERENCE, label), []), key)

    print(
        f"1 KB chat body, wrk -t1, {args.duration}s x {args.rounds} rounds per row (medians); "
        f"gateways pinned to CPU {GATEWAY_CPU}, mock worker and wrk on CPU {LOAD_CPU} "
        f'("one core": all on CPU {GATEWAY_CPU}); x = ratio to {REFERENCE} (median of '
        "each round's); "
        f"load average at the end {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'gateway':>13} {'conns':>11} | {'req/s':>7} {'direct':>7} | {'added p50':>9} {'x':>5} "
        f"{'added p99':>9} | {'CPU/req':>9} {'x':>5}"
    )
    labels = list(dict.fromkeys(label for _name, label in results))
    for label in labels:
        for name in names:
            p50, cpu = med(name, label, "added_p50"), med(name, label, "cpu_us")
            p50_x, cpu_x = x(name, label, "added_p50"), x(name, label, "cpu_us")
            print(
                f"{name:>13} {label:>11} | {med(name, label, 'rps'):>7.0f} "
                f"{med('direct', label, 'rps'):>7.0f} | {p50:>7.0f}us {p50_x} "
                f"{med(name, label, 'added_p99'):>7.0f}us | {cpu:>7.1f}us {cpu_x}"
            )

    def smed(name: str, key: str) -> float:
        return statistics.median(r[key] for r in streams[name])

    def sx(name: str, key: str) -> str:
        return ratio(streams[name], streams.get(REFERENCE, []), key)

    print(
        f"streams: {STREAM_CHUNKS} chunks 10 ms apart; TTFB median of 30 "
        f"(direct {smed('direct', 'ttfb'):.0f}us); CPU per stream at {args.streams} concurrent "
        f"x 4, per chunk = per stream / {STREAM_CHUNKS + 1}"
    )
    for name in names:
        added, cpu = smed(name, "added"), smed(name, "cpu")
        print(
            f"{name:>13} | TTFB {smed(name, 'ttfb'):>6.0f}us added {added:>6.0f}us "
            f"{sx(name, 'added')} | CPU/stream {cpu:>6.0f}us {sx(name, 'cpu')}"
            f" | CPU/chunk {smed(name, 'cpu_chunk'):>5.1f}us"
        )


if __name__ == "__main__":
    main()
