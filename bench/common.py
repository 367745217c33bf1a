"""Helpers the benchmark scripts share (they run as `python bench/<name>.py`)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TICKS = os.sysconf("SC_CLK_TCK")
# wrk's script for POSTing one JSON body read from the file ``{body}``.
WRK_POST_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = io.open("{body}", "rb"):read("*a")
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far, all its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def gateway_args(
    port: int, policy: str = "round_robin", *workers: str, quiet: bool = True
) -> list[str]:
    """``-m shunter serve`` on 127.0.0.1:``port``, no metrics listener; ``quiet``: warnings
    only (no access log), else at its default log level."""
    return [
        "-m",
        "shunter",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--prometheus-port",
        "0",
        *(("--log-level", "warning") if quiet else ()),
        # Stopped at once at the end of a run. The old name (an alias now): a --baseline
        # revision from before --shutdown-grace-period-secs takes it too.
        "--graceful-shutdown-timeout-secs",
        "0.5",
        "--policy",
        policy,
        "--worker-urls",
        *workers,
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 30) -> None:
    """Wait until ``GET url`` answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(url)


def start(command: list[str]) -> subprocess.Popen[bytes]:
    """A process whose output nobody reads."""
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_sims(
    count: int, *extra: str, kv_events: bool = False
) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    """``count`` quiet ``shunter sim`` workers named sim-0, sim-1... with ``extra`` flags,
    answering (their /health) when this returns: the processes and their URLs. With
    ``kv_events``, each publishes its KV-cache events on a port of its own (advertised in
    its server info, where a gateway finds it)."""
    ports = [free_port() for _ in range(count)]
    sims = [
        start(
            [
                sys.executable,
                *("-m", "shunter", "sim", "--port", str(port), "--worker-id", f"sim-{i}"),
                *extra,
                *(("--kv-events-endpoint", f"tcp://127.0.0.1:{free_port()}") if kv_events else ()),
            ]
        )
        for i, port in enumerate(ports)
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for url in urls:
            wait_http(url + "/health")
    except BaseException:
        for sim in sims:
            sim.terminate()
        raise
    return sims, urls


def smg_args(smg: str, port: int, policy: str, workers: list[str]) -> list[str]:
    """``smg launch`` on 127.0.0.1:``port`` with ``policy`` over ``workers``, quiet, its
    Prometheus listener on a free port (it has no way to turn it off)."""
    return [
        *(smg, "launch", "--host", "127.0.0.1", "--port", str(port)),
        *("--prometheus-port", str(free_port()), "--log-level", "warn"),
        *("--policy", policy, "--worker-urls", *workers),
    ]


def sim_stats(urls: list[str]) -> list[dict[str, Any]]:
    """Each sim's ``/sim/stats`` (its counters so far)."""
    stats = []
    for url in urls:
        with urllib.request.urlopen(url + "/sim/stats", timeout=10) as response:
            stats.append(json.loads(response.read()))
    return stats


def cache_outcome(
    before: list[dict[str, Any]], after: list[dict[str, Any]]
) -> tuple[float, list[int]]:
    """Between two ``sim_stats`` readings: the prefix-cache hit rate the sims report
    (cached prompt tokens over prompt tokens) and the requests each sim served."""
    pairs = list(zip(after, before, strict=True))
    cached = sum(a["cached_tokens_total"] - b["cached_tokens_total"] for a, b in pairs)
    prompt = sum(a["prompt_tokens_total"] - b["prompt_tokens_total"] for a, b in pairs)
    served = [a["requests_total"] - b["requests_total"] for a, b in pairs]
    return cached / max(1, prompt), served


def wait_registered(base: str, count: int, timeout: float = 60) -> None:
    """Wait until the gateway at ``base`` (Shunter or smg) lists ``count`` healthy workers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/workers", timeout=2) as response:
                workers = json.loads(response.read())["workers"]
            if sum(1 for w in workers if w.get("is_healthy")) == count:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base} never registered {count} workers")


def make_worker(url: str, models: tuple[str, ...] = ("m",)) -> Any:
    """A healthy ``Worker`` for in-process benchmarks: a real HTTP backend over a mock client
    (``shunter.wire.mock``), so nothing here touches the network."""
    from shunter.aio.once import OnceCell
    from shunter.backends.base import Runtime
    from shunter.backends.http.backend import HttpBackend
    from shunter.backends.http.calls import WorkerCalls
    from shunter.backends.http.engines import ENGINES
    from shunter.fleet.runtime import WorkerRuntime
    from shunter.fleet.worker import Worker
    from shunter.wire.mock import MockClient, MockResponse

    client = MockClient(lambda request: MockResponse(200))

    async def create() -> MockClient:
        return client

    async def data() -> MockClient:
        return client

    backend = HttpBackend(ENGINES[Runtime.SGLANG], OnceCell(create), WorkerCalls(client, data))
    state = WorkerRuntime()
    state.ready()
    return Worker(url, backend, state, models=models)


def comparison_parser(doc: str | None, duration: int) -> argparse.ArgumentParser:
    """The flags every gateway-against-gateway bench takes: --duration (seconds per wrk
    run), --rounds (the median of each figure is reported), --baseline REV (Shunter as it
    was at REV, measured beside the working copy) and --smg (its executable; '' skips it)."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--duration", type=int, default=duration, help="seconds per wrk run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs per row; the median of each figure is reported"
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="git revision of Shunter (or a directory holding a Shunter tree) to measure "
        "beside this one",
    )
    parser.add_argument(
        "--smg",
        default=shutil.which("smg") or "",
        help="smg executable to measure in the same run (pip install smg); '' to skip",
    )
    return parser


def median_ratio(values: Iterable[float], references: Iterable[float]) -> float | None:
    """The median over rounds of each round's value over its reference (None without a round
    whose reference is positive): the two figures of each ratio were measured a minute
    apart, where a median of each over the whole run lets the machine's speed drift between
    them (this VM's CPU per request for one gateway has moved from 53 to 88 µs within an
    hour). Rounds pair up in order; an added latency can come out negative, within the
    noise, and is left out as a reference."""
    pairs = [mine / theirs for mine, theirs in zip(values, references, strict=False) if theirs > 0]
    return statistics.median(pairs) if pairs else None
