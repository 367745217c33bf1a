"""A model of two llama.cpp workers' slots under the affinity workload: why placement alone
cannot stop one prompt's overlapping requests from evicting another, and what waiting saves.

Run: python bench/slot_model.py [--seeds 200] [--users 3|24] [--decode-tokens 16]

Not a measurement: a discrete-event model in virtual time, to compare routing variants on
hundreds of seeds where a real run (bench/affinity_bench.py) gives one noisy sample. Each
worker has 4 slots holding one prompt each; a request takes the idle slot sharing the
longest prefix with it (if that covers more than a tenth of the prompt), else the least
recently used idle slot, else it queues (llama.cpp's server with its host-RAM prompt cache
off); it costs ~7 ms per uncached prompt token and ~25 ms per generated one, each slot on its
own (the model leaves out the CPU the slots share). The workload is affinity_bench's (8
system prompts of ~300 tokens, users x 2 turns, 4 users at a time), routed by the real
``cache_aware`` policy. Reported per variant: prompt tokens processed per run (mean), max/min
between the workers (median), and the mean of the runs' median time to first token.
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
from dataclasses import dataclass, field
from typing import Any

from affinity_bench import SYSTEMS, TURNS, workload
from shunter.backends.http.slot_turns import SlotTurns
from shunter.fleet.worker import Worker
from shunter.policies.base import RouteRequest
from shunter.policies.cache_aware import CacheAwarePolicy

SLOTS, CONCURRENCY = 4, 4
SYSTEM_TOKENS, USER_TOKENS, ANSWER_TOKENS = 300, 20, 16
PREFILL_MS, DECODE_MS = 7.0, 25.0
SIMILARITY = 0.1  # llama.cpp's --slot-prompt-similarity

Prompt = tuple[tuple[str, int], ...]  # (segment, tokens) from the start


def common_tokens(a: Prompt, b: Prompt) -> int:
    shared = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        shared += x[1]
    return shared


def length(prompt: Prompt) -> int:
    return sum(tokens for _, tokens in prompt)


@dataclass
class Slot:
    prompt: Prompt = ()
    busy: bool = False
    last_used: float = -1.0


@dataclass
class Engine:
    slots: list[Slot] = field(default_factory=lambda: [Slot() for _ in range(SLOTS)])
    queue: list[Any] = field(default_factory=list)
    processed: int = 0


@dataclass
class Job:
    user: int
    prompt: Prompt
    worker: Worker
    system: int
    submitted: float


class _Backend:  # a Worker needs one; the policy never touches it
    runtime = None


def run(seed: int, variant: str, users: int, decode_tokens: int) -> tuple[list[int], float]:
    """One run: the prompt tokens each worker processed, and the median time to first token."""
    rng = random.Random(seed)
    systems, sessions = workload(users, seed=seed)
    policy = CacheAwarePolicy()
    workers = tuple(Worker(f"http://w{i}", _Backend()) for i in range(2))  # type: ignore[arg-type]
    for worker in workers:
        worker.state.ready()  # registered and healthy
    engines = {w.url: Engine() for w in workers}
    turns = {w.url: SlotTurns(SLOTS, 1e9) for w in workers}  # the model of what was built
    running: dict[tuple[str, int], int] = {}  # (worker, system prompt) -> requests running
    parked: dict[tuple[str, int], list[int]] = {}  # waiting for that prompt's slot there
    events: list[tuple[float, int, Any, Any]] = []
    order = 0
    now = 0.0
    answers: dict[tuple[int, int], str] = {}
    turn_of = dict.fromkeys(range(len(sessions)), 0)
    first_submitted: dict[int, float] = {}
    ttfts: list[float] = []
    next_user = 0

    def start(engine: Engine, job: Job) -> None:
        nonlocal order
        idle = [s for s in engine.slots if not s.busy]
        best = max(idle, key=lambda s: common_tokens(s.prompt, job.prompt))
        if common_tokens(best.prompt, job.prompt) <= SIMILARITY * length(job.prompt):
            best = min(idle, key=lambda s: s.last_used)
        cached = min(common_tokens(best.prompt, job.prompt), length(job.prompt) - 1)
        best.busy, best.prompt = True, job.prompt
        uncached = length(job.prompt) - cached
        engine.processed += uncached
        prefill = uncached * PREFILL_MS * rng.uniform(0.8, 1.2)
        order += 1
        heapq.heappush(events, (now + prefill + decode_tokens * DECODE_MS, order, job, best))

    def must_wait(url: str, system: int) -> bool:
        if variant == "wait always":
            return running.get((url, system), 0) > 0
        if variant == "wait (built)":
            return turns[url].must_wait(str(system))
        return False

    def submit(user: int, forced: bool = False) -> None:
        session = sessions[user]
        turn = turn_of[user]
        first_submitted.setdefault(user, now)
        prompt: list[tuple[str, int]] = [(f"S{session.system}", SYSTEM_TOKENS)]
        text = systems[session.system]
        for i in range(turn + 1):
            prompt.append((f"u{user}-{i}", USER_TOKENS))
            text += " " + session.turns[i]
            if i < turn:
                prompt.append((f"a{user}-{i}", ANSWER_TOKENS))
                text += " " + answers[user, i]
        if variant == "fixed":
            worker = workers[session.system % 2]
        else:
            choices = workers
            if variant == "other worker":
                free = tuple(w for w in workers if not running.get((w.url, session.system)))
                choices = free or workers
            decided = policy.decide(choices, RouteRequest("m", text)).worker
            assert decided is not None
            worker = decided
        key = (worker.url, session.system)
        if not forced and must_wait(worker.url, session.system):
            parked.setdefault(key, []).append(user)
            return
        if variant == "wait (built)":
            turns[worker.url].admit(str(session.system))
        running[key] = running.get(key, 0) + 1
        worker.state.started()
        job = Job(user, tuple(prompt), worker, session.system, first_submitted[user])
        engine = engines[worker.url]
        if any(not s.busy for s in engine.slots):
            start(engine, job)
        else:
            engine.queue.append(job)

    def new_user() -> None:
        nonlocal next_user
        if next_user < len(sessions):
            next_user += 1
            submit(next_user - 1)

    for _ in range(CONCURRENCY):
        new_user()
    while events:
        now, _, job, slot = heapq.heappop(events)
        slot.busy, slot.last_used = False, now
        worker = job.worker
        worker.state.finished()
        key = (worker.url, job.system)
        running[key] -= 1
        if variant == "wait (built)":
            turns[worker.url].release(str(job.system))  # the model's own count; no waiter
        engine = engines[worker.url]
        if engine.queue:
            start(engine, engine.queue.pop(0))
        waiting = parked.get(key)
        if waiting:
            submit(waiting.pop(0), forced=True)  # the slot it waited for is idle now
        ttfts.append(now - decode_tokens * DECODE_MS - first_submitted.pop(job.user))
        answers[job.user, turn_of[job.user]] = f"answer {rng.random():.6f}"
        turn_of[job.user] += 1
        if turn_of[job.user] < TURNS:
            submit(job.user)
        else:
            new_user()
    return [engines[w.url].processed for w in workers], statistics.median(ttfts)


VARIANTS: dict[str, str] = {
    "cache_aware": "cache_aware as it is",
    "fixed": "each system prompt to one worker",
    "other worker": "an overlapping request goes to the other worker",
    "wait always": "wait for the prompt's slot whenever it is running",
    "wait (built)": "wait when running would evict a prompt held only once (SlotTurns)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--users", type=int, default=3, help="users per system prompt")
    parser.add_argument("--decode-tokens", type=int, default=16)
    args = parser.parse_args()
    print(
        f"{SYSTEMS} system prompts x {args.users} users x {TURNS} turns, {args.seeds} seeds, "
        f"{args.decode_tokens} tokens generated per request"
    )
    print("| variant | prompt tokens per run | max/min (median) | median TTFT, ms |")
    print("|---|---|---|---|")
    for variant, meaning in VARIANTS.items():
        totals, splits, ttfts = [], [], []
        for seed in range(args.seeds):
            processed, ttft = run(seed, variant, args.users, args.decode_tokens)
            totals.append(float(sum(processed)))
            splits.append(max(processed) / max(1, min(processed)))
            ttfts.append(ttft)
        print(
            f"| {variant}: {meaning} | {statistics.mean(totals):,.0f} | "
            f"{statistics.median(splits):.2f} | {statistics.mean(ttfts):.0f} |"
        )


if __name__ == "__main__":
    main()
