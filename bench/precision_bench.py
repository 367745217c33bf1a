"""How well cache_aware's approximate tree predicts the workers' caches once they evict, with
and without the self-correction (the tree forgetting what answers show was evicted).

Run: python bench/precision_bench.py

Workload: 96 conversations of 6 turns over 8 system prompts of ~300 tokens, in random
interleaving; each turn resends the conversation so far (a 60-word question, a 20-word
reply per turn), so a conversation reaches ~800 tokens. 4 `shunter sim` workers whose
prefix caches hold 2,000 tokens each: the working set (96 histories) far exceeds the
fleet's caches (8,000 tokens), so engines evict, and a conversation's history held at a
worker goes stale while the tree still believes it. 576 chat requests, 8 at a time, through
a gateway with ``--route-receipt``; the same request sequence for each mode, the sims'
caches flushed between modes. Prompts are made of
three-letter words, so the sims' word tokens are ~4 characters, as the gateway's
characters-per-token estimate assumes: the error measured is the tree's, not the estimate's.

Per request the receipt gives the predicted cached tokens and the answer's ``usage`` the
actual ones. Reported per mode: mean absolute error (tokens), the mean of each, how often
a prediction of more than 64 tokens found less than a quarter of it cached ("stale
trust"), and the hit rate (cached / prompt tokens, as the sims count them).
"""

from __future__ import annotations

import asyncio
import random
import string
import sys
import time

import httpx

from common import free_port, gateway_args, start, start_sims, wait_registered

WORKERS = 4
SYSTEMS = 8
SYSTEM_WORDS = 300
CONVERSATIONS = 96
TURNS = 6
USER_WORDS = 60
REPLY_WORDS = 20
CACHE_TOKENS = 2000
CONCURRENCY = 8


def workload() -> list[list[dict[str, str]]]:
    """Conversations in random interleaving: each turn resends the conversation so far."""
    rng = random.Random(11)
    vocabulary = ["".join(rng.choices(string.ascii_lowercase, k=3)) for _ in range(3000)]

    def words(count: int) -> str:
        return " ".join(rng.choices(vocabulary, k=count))

    systems = [words(SYSTEM_WORDS) for _ in range(SYSTEMS)]
    conversations = [
        [{"role": "system", "content": systems[c % SYSTEMS]}] for c in range(CONVERSATIONS)
    ]
    turns_left = [TURNS] * CONVERSATIONS
    requests = []
    while any(turns_left):
        c = rng.choice([i for i, left in enumerate(turns_left) if left])
        turns_left[c] -= 1
        conversations[c].append({"role": "user", "content": words(USER_WORDS)})
        requests.append(list(conversations[c]))
        conversations[c].append({"role": "assistant", "content": words(REPLY_WORDS)})
    return requests


async def drive(
    gateway: str, requests: list[list[dict[str, str]]]
) -> list[tuple[int, int, int, str]]:
    """(predicted, actual, prompt tokens, reason) per request."""
    gate = asyncio.Semaphore(CONCURRENCY)
    results: list[tuple[int, int, int, str]] = []
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(messages: list[dict[str, str]]) -> None:
            async with gate:
                response = await client.post(
                    gateway + "/v1/chat/completions",
                    json={"model": "sim-model", "messages": messages, "max_tokens": 1},
                )
                response.raise_for_status()
            receipt = dict(
                part.split("=", 1) for part in response.headers["x-shunter-route"].split("; ")
            )
            usage = response.json()["usage"]
            results.append(
                (
                    int(receipt["predicted_cached"]),
                    usage["prompt_tokens_details"]["cached_tokens"],
                    usage["prompt_tokens"],
                    receipt["reason"],
                )
            )

        await asyncio.gather(*(one(m) for m in requests))
    return results


def measure(
    correct: bool, urls: list[str], requests: list[list[dict[str, str]]]
) -> dict[str, float]:
    for url in urls:
        httpx.post(url + "/flush_cache").raise_for_status()
    port = free_port()
    extra = ["--route-receipt"] + ([] if correct else ["--no-cache-self-correction"])
    gateway = start([sys.executable, *gateway_args(port, "cache_aware", *urls), *extra])
    try:
        wait_registered(f"http://127.0.0.1:{port}", WORKERS)
        started = time.perf_counter()
        results = asyncio.run(drive(f"http://127.0.0.1:{port}", requests))
        seconds = time.perf_counter() - started
    finally:
        gateway.terminate()
        gateway.wait()
    count = len(results)
    stale = sum(1 for p, a, _, _ in results if p > 64 and a < p / 4)
    return {
        "mae": sum(abs(a - p) for p, a, _, _ in results) / count,
        "predicted": sum(p for p, _, _, _ in results) / count,
        "actual": sum(a for _, a, _, _ in results) / count,
        "stale": stale / count,
        "hit": sum(a for _, a, _, _ in results) / sum(t for _, _, t, _ in results),
        "matched": sum(1 for *_, r in results if r == "prefix_match") / count,
        "seconds": seconds,
    }


def main() -> None:
    requests = workload()
    sims, urls = start_sims(
        WORKERS,
        *("--cache-tokens", str(CACHE_TOKENS), "--ttft-ms", "1"),
        *("--prefill-us-per-token", "5", "--max-running", "16"),
    )
    rows: dict[str, dict[str, float]] = {}
    try:
        rows["self-correction on"] = measure(True, urls, requests)
        rows["self-correction off"] = measure(False, urls, requests)
    finally:
        for sim in sims:
            sim.terminate()
            sim.wait()
    print(
        f"{CONVERSATIONS} conversations x {TURNS} turns over {SYSTEMS} system prompts of "
        f"~{SYSTEM_WORDS} tokens, {WORKERS} sims with {CACHE_TOKENS}-token caches, "
        f"{CONCURRENCY} requests at a time"
    )
    print(
        f"{'cache_aware':>20} | {'MAE tokens':>10} | {'mean predicted':>14} | "
        f"{'mean actual':>11} | {'stale trust':>11} | {'prefix_match':>12} | {'hit rate':>8} | "
        f"{'wall s':>6}"
    )
    for name, row in rows.items():
        print(
            f"{name:>20} | {row['mae']:>10.1f} | {row['predicted']:>14.1f} | "
            f"{row['actual']:>11.1f} | {row['stale']:>11.1%} | {row['matched']:>12.1%} | "
            f"{row['hit']:>8.1%} | {row['seconds']:>6.1f}"
        )


if __name__ == "__main__":
    main()
