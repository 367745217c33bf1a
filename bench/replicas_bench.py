"""Cache hit rate and balance with 1, 2, 4 and 8 gateway replicas, independent or peered.

Run: python bench/replicas_bench.py [--gateways 1 2 4 8] [--burst] [--rounds N] [--precise-only]

Workload: 32 system prompts of 500 words x 16 users (512 chat requests, shuffled, 16 at a
time) sprayed over N gateway processes (each request to one picked at random) in front of
8 `shunter sim` workers whose prefix caches hold 2,800 tokens: about 5 system prompts
each, so where a prompt is placed decides the hit rate. Rows: N independent gateways (each
learns only from what it routes) and N peered ones (``--peer-port``/``--peer-urls``: they
share their decisions). The hit rate is the sims' own (cached / prompt tokens), shown as a
share of the single gateway's; max/min is requests per worker; bytes per request is what
the gateways published to their peers (each peer receives it once); CPU per request is
the gateways' user+system time over the run.

Precise rows (on unless ``--no-precise``): N gateways that do not talk to each other, over a
second fleet of the same sims publishing their KV-cache events; every gateway subscribes to
every sim (found in the sims' server info) and scores workers by their cached blocks.

``--burst``: 512 simultaneous requests with distinct new prefixes over 4 gateways, with
reservations shared (the default) and without (``--peer-reservation-ttl-secs 0``).

``--rounds N`` runs every row N times (a row each: a run lasts ~0.7 s, so balance varies
from run to run); ``--precise-only`` leaves out the multi-gateway rows without events.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import urllib.request

import httpx

from common import (
    cache_outcome,
    cpu_seconds,
    free_port,
    gateway_args,
    sim_stats,
    start,
    start_sims,
    wait_registered,
)

WORKERS = 8
SYSTEMS = 32
USERS = 16
WORDS = 500
CACHE_TOKENS = 2800
CONCURRENCY = 16

SIM_FLAGS = (
    *("--cache-tokens", str(CACHE_TOKENS), "--ttft-ms", "1"),
    *("--prefill-us-per-token", "5", "--max-running", "64"),
)

Request = list[dict[str, str]]


def workload(seed: int = 11) -> list[Request]:
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(5000)]
    systems = [" ".join(rng.choice(vocabulary) for _ in range(WORDS)) for _ in range(SYSTEMS)]
    requests = [
        [
            {"role": "system", "content": systems[s]},
            {"role": "user", "content": f"user {u} asks about item {rng.randint(0, 10**6)}"},
        ]
        for s in range(SYSTEMS)
        for u in range(USERS)
    ]
    rng.shuffle(requests)
    return requests


def burst_workload(count: int = 512) -> list[Request]:
    return [[{"role": "user", "content": f"burst {i} " + "x" * 400}] for i in range(count)]


def peer_stats(base: str) -> dict[str, object]:
    with urllib.request.urlopen(base + "/dashboard/data", timeout=5) as response:
        peers: dict[str, object] = json.loads(response.read())["peers"] or {}
        return peers


def heard(base: str) -> int:
    """How many peers the gateway at ``base`` hears."""
    peers = peer_stats(base).get("peers")
    return len(peers) if isinstance(peers, dict) else 0


def events_connected(base: str, sims: list[str]) -> bool:
    """Whether the gateway at ``base`` is subscribed to every sim's KV events."""
    with urllib.request.urlopen(base + "/dashboard/data", timeout=5) as response:
        subscribers = json.loads(response.read()).get("kv_events") or {}
    return all(int(subscribers.get(sim, {}).get("connected", 0)) for sim in sims)


async def drive(gateways: list[str], requests: list[Request], concurrency: int) -> float:
    gate = asyncio.Semaphore(concurrency)
    rng = random.Random(3)
    picks = [rng.choice(gateways) for _ in requests]
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(base: str, messages: Request) -> None:
            async with gate:
                response = await client.post(
                    base + "/v1/chat/completions",
                    json={"model": "sim-model", "messages": messages, "max_tokens": 1},
                )
                response.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(one(b, m) for b, m in zip(picks, requests, strict=True)))
        return time.perf_counter() - started


def run(
    sims: list[str],
    count: int,
    shared: bool,
    requests: list[Request],
    concurrency: int,
    extra: tuple[str, ...] = (),
    precise: bool = False,
) -> dict[str, object]:
    for sim in sims:
        httpx.post(sim + "/flush_cache").raise_for_status()
    before = sim_stats(sims)
    ports = [free_port() for _ in range(count)]
    peer_ports = [free_port() for _ in range(count)]
    procs = []
    for index, port in enumerate(ports):
        command = [sys.executable, *gateway_args(port, "cache_aware", *sims)]
        if shared:
            others = [f"127.0.0.1:{p}" for i, p in enumerate(peer_ports) if i != index]
            command += ["--peer-port", str(peer_ports[index]), "--peer-urls", *others, *extra]
        procs.append(start(command))
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for base in bases:
            wait_registered(base, len(sims))
        if precise:  # every gateway hears every engine before the run starts
            deadline = time.monotonic() + 30
            while not all(events_connected(b, sims) for b in bases):
                if time.monotonic() > deadline:
                    raise TimeoutError("the gateways never subscribed to the sims' events")
                time.sleep(0.1)
        if shared:  # every gateway hears every other before the run starts
            deadline = time.monotonic() + 30
            while any(heard(b) < count - 1 for b in bases):
                if time.monotonic() > deadline:
                    raise TimeoutError("the gateways never heard each other")
                time.sleep(0.1)
        cpu_before = sum(cpu_seconds(p.pid) for p in procs)
        sent_before = sum(int(peer_stats(b).get("bytes_sent", 0)) for b in bases)  # type: ignore[call-overload]
        seconds = asyncio.run(drive(bases, requests, concurrency))
        cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu_before
        sent = sum(int(peer_stats(b).get("bytes_sent", 0)) for b in bases) - sent_before  # type: ignore[call-overload]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
    hit, served = cache_outcome(before, sim_stats(sims))
    return {
        "hit": hit,
        "max_min": max(served) / max(1, min(served)),
        "served": served,
        "seconds": seconds,
        "cpu_ms": 1000 * cpu / len(requests),
        "bytes": sent / len(requests),
    }


def row(name: str, result: dict[str, object], single: float) -> str:
    served = "/".join(str(s) for s in result["served"])  # type: ignore[attr-defined]
    return (
        f"| {name} | {result['hit']:.2f} | {result['hit'] / single:.2f} | "  # type: ignore[operator]
        f"{result['max_min']:.2f} | {result['bytes']:.0f} | {result['cpu_ms']:.2f} | "
        f"{served} |"
    )


def precise_rows(
    counts: list[int], requests: list[Request], single: float, rounds: int = 1
) -> None:
    """Rows for N gateways that do not talk to each other but all subscribe to the same
    engines' KV events (precise mode), on a fleet of its own whose sims publish them; and
    for N gateways doing both."""
    procs, sims = start_sims(WORKERS, *SIM_FLAGS, kv_events=True)
    try:
        for count in sorted({1, *counts}):
            for _ in range(rounds):
                result = run(sims, count, False, requests, CONCURRENCY, precise=True)
                print(row(f"{count} precise (events)", result, single), flush=True)
            for _ in range(rounds if count > 1 else 0):
                result = run(sims, count, True, requests, CONCURRENCY, precise=True)
                print(row(f"{count} precise, peered", result, single), flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gateways", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--burst", action="store_true")
    parser.add_argument(
        "--precise",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add rows for independent gateways scoring by the sims' KV events",
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs of every row")
    parser.add_argument(
        "--precise-only", action="store_true", help="no multi-gateway rows without events"
    )
    args = parser.parse_args()
    procs, sims = start_sims(WORKERS, *SIM_FLAGS)
    try:
        requests = workload()
        print(
            f"{SYSTEMS} system prompts x {USERS} users, {WORKERS} sims with {CACHE_TOKENS}-token "
            f"caches, {CONCURRENCY} requests at a time, clients spread at random over gateways"
        )
        print(
            "| gateways | hit rate | of 1 gateway | max/min per worker | "
            "bytes/request to peers | gateway CPU ms/request | requests per worker |"
        )
        print("|---|---|---|---|---|---|---|")
        single = run(sims, 1, False, requests, CONCURRENCY)
        print(row("1", single, float(single["hit"])), flush=True)  # type: ignore[arg-type]
        for count in [] if args.precise_only else args.gateways:
            if count == 1:
                continue
            for shared in (False, True):
                for _ in range(args.rounds):
                    result = run(sims, count, shared, requests, CONCURRENCY)
                    name = f"{count} {'peered' if shared else 'independent'}"
                    print(row(name, result, float(single["hit"])), flush=True)  # type: ignore[arg-type]
        if args.precise or args.precise_only:
            hit = float(single["hit"])  # type: ignore[arg-type]
            precise_rows(args.gateways, requests, hit, args.rounds)
        if args.burst:
            burst = burst_workload()
            print("\nburst: 512 simultaneous distinct prefixes over 4 gateways, 8 workers")
            for name, shared, extra in (
                ("independent", False, ()),
                ("peered, no reservations", True, ("--peer-reservation-ttl-secs", "0")),
                ("peered, reservations", True, ()),
            ):
                result = run(sims, 4, shared, burst, len(burst), extra)
                served = "/".join(str(s) for s in result["served"])  # type: ignore[attr-defined]
                print(f"| {name} | {result['max_min']:.2f} | {served} |", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
