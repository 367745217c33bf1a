"""Prefix-cache hit rate of routing policies on a shared-prefix workload, against an oracle.

Run: python bench/cache_quality.py            (smg is measured too when `smg` is on PATH)

Workload: 8 system prompts of ~2,000 tokens x 64 users (512 chat requests, shuffled, 16 at a
time) through the gateway to 4 `shunter sim` workers whose prefix caches hold 5,000 tokens
each: two system prompts fit in one worker, all eight do not. The hit rate is what the sims
report (cached prompt tokens / prompt tokens). The oracle knows every cache: it sends each
system prompt to its own fixed worker, two per worker, and its hit rate is computed with
the sims' own cache model on the same request sequence.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import time

import httpx

from common import (
    cache_outcome,
    free_port,
    gateway_args,
    sim_stats,
    smg_args,
    start,
    start_sims,
    wait_registered,
)
from shunter.sim.cache import PrefixCache
from shunter.sim.engine import tokenize

WORKERS = 4
SYSTEMS = 8
USERS = 64
CACHE_TOKENS = 5000
CONCURRENCY = 16


def workload() -> list[tuple[int, list[dict[str, str]]]]:
    rng = random.Random(7)
    vocabulary = [f"w{i}" for i in range(5000)]
    systems = [" ".join(rng.choice(vocabulary) for _ in range(2000)) for _ in range(SYSTEMS)]
    requests = [
        (
            s,
            [
                {"role": "system", "content": systems[s]},
                {"role": "user", "content": f"user {u} asks about item {rng.randint(0, 10**6)}"},
            ],
        )
        for s in range(SYSTEMS)
        for u in range(USERS)
    ]
    rng.shuffle(requests)
    return requests


def sim_prompt(messages: list[dict[str, str]]) -> list[str]:
    """The token list the sim builds for a chat (see shunter.sim.app._chat_prompt)."""
    text = " ".join(f"<|{m['role']}|> {m['content']}" for m in messages) + " <|assistant|>"
    return tokenize(text)


def oracle_hit_rate(requests: list[tuple[int, list[dict[str, str]]]]) -> float:
    caches = [PrefixCache(CACHE_TOKENS) for _ in range(WORKERS)]
    hit = total = 0
    for system, messages in requests:
        tokens = sim_prompt(messages)
        hit += caches[system % WORKERS].match_and_insert(tokens)
        total += len(tokens)
    return hit / total


async def drive(gateway: str, requests: list[tuple[int, list[dict[str, str]]]]) -> float:
    gate = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(messages: list[dict[str, str]]) -> None:
            async with gate:
                response = await client.post(
                    gateway + "/v1/chat/completions",
                    json={"model": "sim-model", "messages": messages, "max_tokens": 1},
                )
                response.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(one(m) for _, m in requests))
        return time.perf_counter() - started


def measure(
    name: str,
    command: list[str],
    port: int,
    sims: list[str],
    requests: list[tuple[int, list[dict[str, str]]]],
) -> dict[str, float]:
    for sim in sims:
        httpx.post(sim + "/flush_cache").raise_for_status()
    before = sim_stats(sims)
    gateway = start(command)
    try:
        wait_registered(f"http://127.0.0.1:{port}", WORKERS)
        seconds = asyncio.run(drive(f"http://127.0.0.1:{port}", requests))
    finally:
        gateway.terminate()
        gateway.wait()
    hit, served = cache_outcome(before, sim_stats(sims))
    return {
        "hit": hit,
        "busiest": max(served) / max(1, min(served)),
        "served": served,
        "seconds": seconds,
    }  # type: ignore[dict-item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smg", default=shutil.which("smg"))
    args = parser.parse_args()
    requests = workload()
    sims, urls = start_sims(
        WORKERS,
        *("--cache-tokens", str(CACHE_TOKENS), "--ttft-ms", "1"),
        *("--prefill-us-per-token", "5", "--max-running", "16"),
    )
    rows: dict[str, dict[str, float]] = {}
    try:
        for policy in ("cache_aware", "round_robin", "prefix_hash"):
            port = free_port()
            rows[f"shunter {policy}"] = measure(
                policy,
                [sys.executable, *gateway_args(port, policy, *urls)],
                port,
                urls,
                requests,
            )
        if args.smg:
            port = free_port()
            rows["smg cache_aware"] = measure(
                "smg",
                smg_args(args.smg, port, "cache_aware", urls),
                port,
                urls,
                requests,
            )
    finally:
        for sim in sims:
            sim.terminate()
            sim.wait()
    oracle = oracle_hit_rate(requests)
    print(
        f"{SYSTEMS} system prompts x {USERS} users, {WORKERS} sims with {CACHE_TOKENS}-token "
        f"prefix caches, {CONCURRENCY} requests at a time"
    )
    print(
        f"{'routing':>22} | {'hit rate':>8} {'of oracle':>9} | {'busiest/least':>13} | "
        f"{'requests per worker':>22} | {'wall s':>6}"
    )
    print(
        f"{'oracle':>22} | {oracle:>8.1%} {'100%':>9} | {'1.00':>13} | {'128 each':>22} | {'':>6}"
    )
    for name, row in rows.items():
        served = "/".join(str(s) for s in row["served"])  # type: ignore[union-attr]
        print(
            f"{name:>22} | {row['hit']:>8.1%} {row['hit'] / oracle:>9.1%} | "
            f"{row['busiest']:>13.2f} | {served:>22} | {row['seconds']:>6.1f}"
        )


if __name__ == "__main__":
    main()
