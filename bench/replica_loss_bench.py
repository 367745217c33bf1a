"""Replica loss: one of 4 peered gateways SIGKILLed mid-run and restarted at once.

Run: python bench/replica_loss_bench.py [--seconds 40] [--kill-at 15] [--independent]

Workload: the shape of ``replicas_bench.py`` (32 system prompts of 500 words, each request a
system prompt picked at random and a user line never seen before), 16 requests at a time
for ``--seconds``, each sent to one of 4 gateways picked at random, in front of 8 ``shunter
sim`` workers whose prefix caches hold ~5 prompts each. The gateways are peered
(``--peer-port``/``--peer-urls``), or with ``--independent`` share nothing (the baseline).
At ``--kill-at`` seconds gateway 0 is SIGKILLed and started again at once on the same ports
and flags: it comes back with an empty tree and learns placements from its peers'
decisions as they arrive. Clients keep picking gateway 0 at random throughout.

Reported: requests failed through the surviving gateways (any error or non-200: the
target is 0); requests to gateway 0 while it was down or starting, by kind (connection
refused, or an answer other than 200); and per second after the restart, the hit rate of
the requests gateway 0 routed against the others' (the hit rate of a request is the
worker's cached / prompt tokens, from the response's usage).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import httpx

from common import free_port, gateway_args, start, start_sims, wait_registered

GATEWAYS = 4
WORKERS = 8
SYSTEMS = 32
WORDS = 500
CACHE_TOKENS = 2800
CONCURRENCY = 16
TOLERANCE = 0.05  # "back to the others' hit rate": within this of it, every second after
SIM_FLAGS = (
    *("--cache-tokens", str(CACHE_TOKENS)),
    *("--ttft-ms", "1", "--prefill-us-per-token", "5", "--max-running", "64"),
)


@dataclass
class Outcome:
    at: float  # seconds since the run started, when the answer (or error) came
    gateway: int
    kind: str  # "ok", "connect" (refused or reset), "status <code>", an exception's name
    prompt: int = 0
    cached: int = 0


def systems(seed: int = 11) -> list[str]:
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(5000)]
    return [" ".join(rng.choice(vocabulary) for _ in range(WORDS)) for _ in range(SYSTEMS)]


class Fleet:
    """The 4 gateways, peered, with fixed ports so one can be restarted as it was."""

    def __init__(self, sims: list[str], peered: bool = True) -> None:
        self.peered = peered
        self.ports = [free_port() for _ in range(GATEWAYS)]
        self.peer_ports = [free_port() for _ in range(GATEWAYS)]
        self.sims = sims
        self.procs = [self.spawn(i) for i in range(GATEWAYS)]
        self.bases = [f"http://127.0.0.1:{port}" for port in self.ports]

    def spawn(self, index: int) -> subprocess.Popen[bytes]:
        command = [sys.executable, *gateway_args(self.ports[index], "cache_aware", *self.sims)]
        if self.peered:
            others = [f"127.0.0.1:{p}" for i, p in enumerate(self.peer_ports) if i != index]
            command += ["--peer-port", str(self.peer_ports[index]), "--peer-urls", *others]
        return start(command)

    def kill_and_restart(self, index: int) -> None:
        os.kill(self.procs[index].pid, signal.SIGKILL)
        self.procs[index].wait()
        self.procs[index] = self.spawn(index)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait()


async def drive(
    fleet: Fleet, prompts: list[str], seconds: float, kill_at: float
) -> tuple[list[Outcome], dict[str, float]]:
    rng = random.Random(3)
    outcomes: list[Outcome] = []
    marks: dict[str, float] = {}
    started = time.monotonic()
    deadline = started + seconds
    counter = iter(range(10**9))
    limits = httpx.Limits(max_connections=CONCURRENCY * GATEWAYS)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def one(index: int) -> None:
            body = {
                "model": "sim-model",
                "max_tokens": 1,
                "messages": [
                    {"role": "system", "content": rng.choice(prompts)},
                    {"role": "user", "content": f"question {next(counter)} of the run"},
                ],
            }
            try:
                response = await client.post(fleet.bases[index] + "/v1/chat/completions", json=body)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                outcomes.append(Outcome(time.monotonic() - started, index, "connect"))
                return
            except httpx.HTTPError as exc:
                outcomes.append(Outcome(time.monotonic() - started, index, type(exc).__name__))
                return
            now = time.monotonic() - started
            if response.status_code != 200:
                outcomes.append(Outcome(now, index, f"status {response.status_code}"))
                return
            usage = response.json()["usage"]
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            outcomes.append(Outcome(now, index, "ok", usage["prompt_tokens"], cached))

        async def user() -> None:
            while time.monotonic() < deadline:
                await one(rng.randrange(GATEWAYS))
                if outcomes and outcomes[-1].kind == "connect":
                    await asyncio.sleep(0.01)  # a refused connection returns at once

        async def killer() -> None:
            await asyncio.sleep(kill_at)
            marks["killed"] = time.monotonic() - started
            await asyncio.to_thread(fleet.kill_and_restart, 0)
            await asyncio.to_thread(wait_registered, fleet.bases[0], len(fleet.sims))
            marks["ready"] = time.monotonic() - started

        await asyncio.gather(killer(), *(user() for _ in range(CONCURRENCY)))
    return outcomes, marks


def hit(outcomes: list[Outcome]) -> float | None:
    prompt = sum(o.prompt for o in outcomes)
    return sum(o.cached for o in outcomes) / prompt if prompt else None


def report(outcomes: list[Outcome], marks: dict[str, float], seconds: float) -> None:
    survivors = [o for o in outcomes if o.gateway != 0]
    failed = [o for o in survivors if o.kind != "ok"]
    print(
        f"gateway 0 SIGKILLed at {marks['killed']:.1f} s, restarted and serving (every worker "
        f"registered) at {marks['ready']:.1f} s"
    )
    print(f"requests through the surviving gateways: {len(survivors)}, failed: {len(failed)}")
    kinds: dict[str, int] = defaultdict(int)
    for o in outcomes:
        if o.gateway == 0 and o.kind != "ok":
            kinds[o.kind] += 1
    print(f"requests to gateway 0 that failed (while down or starting): {dict(kinds) or 0}")
    before = [o for o in outcomes if o.kind == "ok" and 5 <= o.at < marks["killed"]]
    own, rest = hit([o for o in before if o.gateway == 0]), hit([o for o in before if o.gateway])
    print(f"hit rate before the kill (from 5 s): gateway 0 {own:.2f}, others {rest:.2f}")
    print("\n| second after restart | gateway 0 requests | gateway 0 hit | others' hit |")
    print("|---|---|---|---|")
    restart = marks["ready"]
    behind: list[int] = []  # seconds in which gateway 0 trailed the others by > TOLERANCE
    for second in range(int(seconds - restart)):
        window = [o for o in outcomes if o.kind == "ok" and second <= o.at - restart < second + 1]
        mine = [o for o in window if o.gateway == 0]
        others = [o for o in window if o.gateway != 0]
        own, rest = hit(mine), hit(others)
        if own is not None and rest is not None and own < rest - TOLERANCE:
            behind.append(second)
        print(
            f"| {second}-{second + 1} | {len(mine)} | "
            f"{'-' if own is None else f'{own:.2f}'} | {'-' if rest is None else f'{rest:.2f}'} |"
        )
    back = 0 if not behind else behind[-1] + 1
    print(
        f"\ngateway 0's hit rate within {TOLERANCE} of the others' from {back} s after the "
        "restart on"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--kill-at", type=float, default=15.0)
    parser.add_argument(
        "--independent", action="store_true", help="the baseline: gateways that share nothing"
    )
    args = parser.parse_args()
    sim_procs, sims = start_sims(WORKERS, *SIM_FLAGS)
    fleet: Fleet | None = None
    try:
        fleet = Fleet(sims, peered=not args.independent)
        for base in fleet.bases:
            wait_registered(base, len(sims))
        outcomes, marks = asyncio.run(drive(fleet, systems(), args.seconds, args.kill_at))
        report(outcomes, marks, args.seconds)
    finally:
        if fleet is not None:
            fleet.stop()
        for proc in sim_procs:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
