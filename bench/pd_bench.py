"""Prefill/decode disaggregation: Shunter PD against smg PD on the same simulated fleet.

Run: python bench/pd_bench.py [--quick] [--duration 5] [--rounds 3]   (smg from `pip install smg`)

Three parts, one run (~10 minutes, ~6 with ``--no-regular``; ``--quick`` ~30 s, a smoke
test):

1. Overhead. 2 prefill + 2 decode SGLang sims (``shunter sim --disaggregation-mode ...``)
   behind Shunter PD and smg PD, started once and shared; round_robin on both legs. A
   closed-loop load generator (this process, on our own HTTP/1.1 client) sends streamed
   and whole ``/v1/chat/completions`` (the 1 KB chat body, 16 output tokens) at a few
   concurrencies. "direct" is the load generator playing the gateway: it sends the same
   body with the same bootstrap fields to a prefill and a decode sim at once and reads the
   decode's answer, so "added" is what the gateway adds in that round. The sims answer in
   ttft 5 ms + 2 ms per token with no prefill cost, so the gateway's own cost is visible.
   The "regular" rows are the reference: the same two gateways in regular mode over 2
   ordinary sims of the same timing (and "direct regular", the client to a sim), so PD's
   CPU per request can be read against the regular router's in the same rounds. In each
   round a group's direct baseline runs first, then its gateways, who take turns at going
   first (A/B, B/A), so a noisy neighbour hits both.
2. Time to error. Both prefill sims answer 400 (``POST /sim/faults``); per round, N whole
   and N streamed requests go through each gateway, 4 at a time, the gateways taking turns
   at going first. The client's wait is reported, and what became of each decode leg (from
   the decode sims' ``/sim/requests``): cancelled by the gateway, or left polling for its
   room until the sims' bootstrap timeout. That timeout is short here (10 s,
   ``--bootstrap-timeout``; SGLang's default is 300 s) so that a leg left behind ends, and
   the run with it, soon; a wait near it means the gateway waited for the decode.
3. The skip rule (``--pd-min-prefill-tokens``), Shunter only (smg has no such rule):
   vLLM-runtime sims (NIXL's two phases) with a prefill cost per uncached prompt token,
   cache_aware on both legs, a mixed streamed workload (short prompts, long prompts, and
   long shared prefixes with a short new tail), with the rule off and on, in turns.

Every process runs pinned with taskset: the gateways on CPU 1, the sims and this load
generator on CPU 0. Gateway CPU per request is the gateway process's user+system time
(/proc, all threads) over the requests completed; the ratios (Shunter/smg, PD/regular) are
taken within each round, then their median reported. Every process started here is stopped
by its PID on the way out, Ctrl-C and errors included.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import os
import random
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from common import cpu_seconds, free_port, wait_http, wait_registered
from shunter.wire.base import UpstreamError
from shunter.wire.client import H1StreamClient

HERE = Path(__file__).resolve().parent
LOOPBACK = "127.0.0.1"
MODEL = "sim-model"  # the sims' served model name
GATEWAY_CPU, LOAD_CPU = 1, 0
HEADERS = [(b"content-type", b"application/json")]
CHAT = "/v1/chat/completions"
OUTPUT_TOKENS = 16
# The overhead sims: small fixed latencies, so that a gateway's cost shows; no prefill cost.
FAST_SIM = ["--ttft-ms", "5", "--itl-ms", "2", "--prefill-us-per-token", "0"]
# Room for every request in flight at once: neither the sims' queue nor smg's admission
# gate (it waits for a free slot in the decode's running window) should queue requests.
RUNNING_SLOTS = "256"


# --- processes --------------------------------------------------------------------------


class Processes:
    """Every process this run starts, pinned to a CPU, logged to a temporary directory and
    stopped by its PID (gateways first, so the sims see no new requests while stopping)."""

    def __init__(self) -> None:
        self.logs = Path(tempfile.mkdtemp(prefix="pd_bench-"))
        self.running: list[subprocess.Popen[bytes]] = []
        self.started = 0

    def start(self, cpu: int, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        slug = "".join(c if c.isalnum() else "-" for c in name)
        self.started += 1  # in the log's name: two processes may share a name
        with (self.logs / f"{self.started:02d}-{slug}.log").open("wb") as log:
            process = subprocess.Popen(
                ["taskset", "-c", str(cpu), *argv], stdout=log, stderr=subprocess.STDOUT
            )
        self.running.append(process)
        return process

    def stop(self, processes: list[subprocess.Popen[bytes]] | None = None) -> None:
        chosen = list(self.running) if processes is None else processes
        for process in reversed(chosen):
            if process.poll() is None:
                process.terminate()
        for process in reversed(chosen):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            self.running.remove(process)

    def cleanup(self, keep_logs: bool) -> None:
        self.stop()
        if keep_logs:
            print(f"process logs kept in {self.logs}", file=sys.stderr)
        else:
            shutil.rmtree(self.logs, ignore_errors=True)


@dataclass
class Sim:
    url: str
    process: subprocess.Popen[bytes]
    bootstrap_port: int | None = None  # a prefill's


@dataclass
class Fleet:
    prefills: list[Sim]
    decodes: list[Sim]

    @property
    def sims(self) -> list[Sim]:
        return self.prefills + self.decodes


def start_sim(procs: Processes, name: str, runtime: str, argv: list[str]) -> Sim:
    port = free_port()
    command = [sys.executable, "-m", "shunter", "sim", "--host", LOOPBACK, "--port", str(port)]
    command += ["--runtime", runtime, "--log-level", "warning", "--worker-id", name, *argv]
    return Sim(f"http://{LOOPBACK}:{port}", procs.start(LOAD_CPU, f"{runtime}-{name}", command))


def start_fleet(procs: Processes, count: int, sim_args: list[str], runtime: str) -> Fleet:
    def sim(role: str, index: int) -> Sim:
        extra = ["--disaggregation-mode", role, *sim_args]
        bootstrap = free_port() if role == "prefill" else None
        if bootstrap is not None:
            extra += ["--disaggregation-bootstrap-port", str(bootstrap)]
        started = start_sim(procs, f"{role}-{index}", runtime, extra)
        started.bootstrap_port = bootstrap
        return started

    fleet = Fleet(
        [sim("prefill", i) for i in range(count)], [sim("decode", i) for i in range(count)]
    )
    for s in fleet.sims:
        wait_http(s.url + "/health")
    return fleet


def start_regular(procs: Processes, count: int, sim_args: list[str]) -> list[Sim]:
    """``count`` ordinary SGLang sims (no PD): the regular router's reference."""
    sims = [start_sim(procs, f"regular-{i}", "sglang", sim_args) for i in range(count)]
    for s in sims:
        wait_http(s.url + "/health")
    return sims


@dataclass
class Gateway:
    name: str
    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


def pd_workers(fleet: Fleet, sglang: bool) -> list[str]:
    """PD mode and its workers, in the flags Shunter and smg share."""
    argv = ["--pd-disaggregation"]
    for s in fleet.prefills:
        argv += ["--prefill", s.url, str(s.bootstrap_port) if sglang else "none"]
    for s in fleet.decodes:
        argv += ["--decode", s.url]
    return argv


def regular_workers(sims: list[Sim]) -> list[str]:
    return ["--worker-urls", *(s.url for s in sims)]


def start_shunter(procs: Processes, name: str, workers: list[str], *extra: str) -> Gateway:
    port = free_port()
    argv = [sys.executable, "-m", "shunter", "serve", "--host", LOOPBACK, "--port", str(port)]
    argv += ["--prometheus-port", "0", "--log-level", "warning", "--policy", "round_robin"]
    argv += ["--shutdown-grace-period-secs", "0.5", *workers, *extra]
    return Gateway(name, procs.start(GATEWAY_CPU, name, argv), port)


def start_smg(procs: Processes, smg: str, name: str, workers: list[str]) -> Gateway:
    port = free_port()
    argv = [smg, "launch", "--host", LOOPBACK, "--port", str(port)]
    argv += ["--prometheus-host", LOOPBACK, "--prometheus-port", str(free_port())]
    argv += ["--policy", "round_robin", "--log-level", "warn"]
    argv += ["--shutdown-grace-period-secs", "1", *workers]
    return Gateway(name, procs.start(GATEWAY_CPU, name, argv), port)


def post_json(url: str, body: Any, timeout: float = 5) -> Any:
    request = urllib.request.Request(
        url, data=orjson.dumps(body), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return orjson.loads(response.read())


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return orjson.loads(response.read())


def wait_ready(gateway: Gateway, workers: int, timeout: float = 60) -> None:
    """Registered every worker, and routed a chat request end to end."""
    wait_registered(gateway.url, workers, timeout)
    deadline = time.monotonic() + timeout
    body = {"model": MODEL, "messages": [{"role": "user", "content": "ready?"}], "max_tokens": 2}
    while True:
        try:
            post_json(gateway.url + CHAT, body)
            return
        except OSError:
            if time.monotonic() > deadline or gateway.process.poll() is not None:
                raise TimeoutError(f"{gateway.name} never routed a request") from None
            time.sleep(0.2)


# --- the load generator -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    status: int
    ok: bool
    first: float  # seconds to the first SSE event (streams) or to the whole answer
    total: float  # seconds to the end of the answer


async def call(client: H1StreamClient, url: str, body: bytes, stream: bool) -> Sample:
    """One request; a stream is ok when it ends with ``[DONE]``."""
    started = time.perf_counter()
    first = 0.0
    chunks: list[bytes] = []
    try:
        response = await client.stream("POST", url, HEADERS, body)
        try:
            while (chunk := await response.next_chunk()) is not None:
                if not first and stream and b"data:" in chunk:
                    first = time.perf_counter()
                chunks.append(chunk)
        finally:
            await response.aclose()
    except UpstreamError:
        return Sample(0, False, 0.0, time.perf_counter() - started)
    ended = time.perf_counter()
    ok = response.status == 200 and (not stream or b"[DONE]" in b"".join(chunks[-3:]))
    return Sample(response.status, ok, (first or ended) - started, ended - started)


Send = Callable[[], Awaitable[Sample]]


class Clients:
    """One keep-alive client per base URL, for one event loop."""

    def __init__(self, read_timeout: float = 60) -> None:
        self.read_timeout = read_timeout
        self.by_base: dict[str, H1StreamClient] = {}

    def __getitem__(self, base: str) -> H1StreamClient:
        client = self.by_base.get(base)
        if client is None:
            client = H1StreamClient(base, 5.0, self.read_timeout)
            self.by_base[base] = client
        return client

    async def close(self) -> None:
        for client in self.by_base.values():
            await client.close()


def through(clients: Clients, gateway: Gateway, body: bytes, stream: bool) -> Send:
    url = gateway.url + CHAT
    client = clients[gateway.url]
    return lambda: call(client, url, body, stream)


def direct(clients: Clients, fleet: Fleet, base: dict[str, Any], stream: bool) -> Send:
    """The load generator as the gateway: both legs at once, same bootstrap fields, pairs in
    turn; the client's answer is the decode's (a failed prefill fails the request)."""
    pairs = itertools.cycle(list(zip(fleet.prefills, fleet.decodes, strict=True)))
    body = {**base, "stream": stream}

    async def send() -> Sample:
        prefill, decode = next(pairs)
        fields = {
            "bootstrap_host": LOOPBACK,
            "bootstrap_port": prefill.bootstrap_port,
            "bootstrap_room": random.getrandbits(63),
        }
        payload = orjson.dumps({**body, **fields})
        leg = asyncio.ensure_future(call(clients[prefill.url], prefill.url + CHAT, payload, stream))
        try:
            answer = await call(clients[decode.url], decode.url + CHAT, payload, stream)
        finally:
            prefilled = await leg
        return answer if prefilled.ok else Sample(prefilled.status, False, 0.0, answer.total)

    return send


def direct_regular(clients: Clients, sims: list[Sim], body: bytes, stream: bool) -> Send:
    """The load generator straight to the regular sims, in turn."""
    targets = itertools.cycle([(clients[s.url], s.url + CHAT) for s in sims])

    async def send() -> Sample:
        client, url = next(targets)
        return await call(client, url, body, stream)

    return send


async def closed_loop(send: Send, concurrency: int, seconds: float) -> tuple[list[Sample], float]:
    """``concurrency`` clients sending back to back for ``seconds``; (samples, elapsed)."""
    samples: list[Sample] = []
    started = time.perf_counter()
    deadline = started + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            samples.append(await send())

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return samples, time.perf_counter() - started


def rotated(items: list[Any], by: int) -> list[Any]:
    """``items`` from index ``by`` on, then the rest: who goes first changes each round."""
    by %= max(1, len(items))
    return items[by:] + items[:by]


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of the values at or below it."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def run_loop(coroutine: Awaitable[Any]) -> Any:
    """Run on uvloop when it is there (less load-generator CPU on the sims' core)."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None

    async def main() -> Any:
        return await coroutine

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


# --- 1. overhead ------------------------------------------------------------------------


@dataclass
class Measured:
    rounds: list[dict[str, float]] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.rounds)


def chat_body() -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads((HERE / "chat_1k.json").read_bytes())
    body.pop("stream", None)
    return body | {"model": MODEL, "max_tokens": OUTPUT_TOKENS}


async def measure(
    send: Send, concurrency: int, seconds: float, pid: int | None
) -> dict[str, float]:
    before = cpu_seconds(pid) if pid is not None else 0.0
    samples, elapsed = await closed_loop(send, concurrency, seconds)
    cpu = cpu_seconds(pid) - before if pid is not None else float("nan")
    good = [s for s in samples if s.ok]
    firsts = [s.first * 1e3 for s in good]
    totals = [s.total * 1e3 for s in good]
    return {
        "rps": len(good) / elapsed,
        "cpu_us": cpu / len(samples) * 1e6 if samples else float("nan"),
        "first50": percentile(firsts, 50),
        "first99": percentile(firsts, 99),
        "total50": percentile(totals, 50),
        "total99": percentile(totals, 99),
        "errors": len(samples) - len(good),
    }


@dataclass
class Target:
    """Where the load goes: a gateway (its PID for CPU time) or direct (None)."""

    name: str
    pid: int | None
    sends: dict[bool, Send]  # stream -> one request


@dataclass
class Group:
    """Targets in front of the same sims, compared with the first (direct) of them."""

    label: str
    targets: list[Target]


async def overhead(
    fleet: Fleet,
    gateways: list[Gateway],
    regular: tuple[list[Sim], list[Gateway]] | None,
    args: argparse.Namespace,
) -> dict[tuple[str, str, int, str], Measured]:
    """Rows keyed (group, target, concurrency, mode). In each round and mode, each group's
    direct baseline runs first and then its gateways, taking turns at going first."""
    clients = Clients()
    base = chat_body()
    bodies = {stream: orjson.dumps(base | {"stream": stream}) for stream in (True, False)}

    def through_all(gateways: list[Gateway]) -> list[Target]:
        return [
            Target(g.name, g.process.pid, {s: through(clients, g, bodies[s], s) for s in bodies})
            for g in gateways
        ]

    direct_pd = {s: direct(clients, fleet, base, s) for s in bodies}
    groups = [Group("PD", [Target("direct", None, direct_pd), *through_all(gateways)])]
    if regular is not None:
        sims, regular_gateways = regular
        direct_sims = {s: direct_regular(clients, sims, bodies[s], s) for s in bodies}
        targets = [Target("direct", None, direct_sims), *through_all(regular_gateways)]
        groups.append(Group("regular", targets))
    results: dict[tuple[str, str, int, str], Measured] = collections.defaultdict(Measured)
    try:
        for group in groups:  # warm-up: connections, the gateways' caches
            for target in group.targets:
                for send in target.sends.values():
                    await closed_loop(send, 8, args.duration / 4)
        for concurrency in args.concurrency:
            for round_ in range(args.rounds):
                for stream in (True, False):
                    mode = "stream" if stream else "whole"
                    for group in groups:
                        direct_target, *rest = group.targets
                        baseline: dict[str, float] = {}
                        for target in [direct_target, *rotated(rest, round_)]:
                            send = target.sends[stream]
                            row = await measure(send, concurrency, args.duration, target.pid)
                            baseline = baseline or row
                            row["added50"] = row["first50"] - baseline["first50"]
                            row["added99"] = row["first99"] - baseline["first99"]
                            key = (group.label, target.name, concurrency, mode)
                            results[key].rounds.append(row)
    finally:
        await clients.close()
    return results


def report_overhead(
    results: dict[tuple[str, str, int, str], Measured], names: list[str], args: argparse.Namespace
) -> None:
    groups = list(dict.fromkeys(key[0] for key in results))
    print(
        f"PD overhead: {args.pairs} prefill + {args.pairs} decode SGLang sims (ttft 5 ms, itl "
        f"2 ms, {OUTPUT_TOKENS} tokens, no prefill cost), 1 KB chat body, round_robin legs; "
        f"{args.duration:g} s x {args.rounds} rounds per row (medians); gateways on CPU "
        f"{GATEWAY_CPU}, sims and load on CPU {LOAD_CPU}; direct = the client sends both "
        "legs itself"
        + (
            f"; regular = the same gateways in regular mode over {args.pairs} ordinary sims "
            "of the same timing (direct: the client to a sim)"
            if "regular" in groups
            else ""
        )
    )
    for mode, first in (("stream", "TTFT"), ("whole", "latency")):
        print(f"{'streamed' if mode == 'stream' else 'whole'} /v1/chat/completions")
        print(
            f"{'gateway':>16} {'conc':>4} | {'req/s':>6} {'CPU/req':>9} | {first + ' p50':>11} "
            f"{first + ' p99':>11} | {'added p50':>9} {'added p99':>9} | "
            f"{'e2e p99' if mode == 'stream' else '':>8} | errors"
        )
        for group in groups:
            for concurrency in args.concurrency:
                for name in ["direct", *names]:
                    m = results[(group, name, concurrency, mode)]
                    label = name if group == "PD" else f"{name} regular"
                    cpu = "-" if name == "direct" else f"{m.median('cpu_us'):.0f}us"
                    added = (
                        ("-", "-")
                        if name == "direct"
                        else (f"{m.median('added50'):+.2f}ms", f"{m.median('added99'):+.2f}ms")
                    )
                    e2e = f"{m.median('total99'):.2f}ms" if mode == "stream" else ""
                    errors = sum(int(r["errors"]) for r in m.rounds)
                    print(
                        f"{label:>16} {concurrency:>4} | {m.median('rps'):>6.0f} {cpu:>9} | "
                        f"{m.median('first50'):>9.2f}ms {m.median('first99'):>9.2f}ms | "
                        f"{added[0]:>9} {added[1]:>9} | {e2e:>8} | {errors:>6}"
                    )
    report_cpu_ratios(results, names, groups, args)


def cpu_ratio(
    results: dict[tuple[str, str, int, str], Measured],
    a: tuple[str, str],
    b: tuple[str, str],
    concurrency: int,
    mode: str,
) -> float:
    """Median over rounds of ``a``'s CPU per request over ``b``'s, rounds paired."""
    rounds_a = results[(*a, concurrency, mode)].rounds
    rounds_b = results[(*b, concurrency, mode)].rounds
    return statistics.median(
        x["cpu_us"] / y["cpu_us"] for x, y in zip(rounds_a, rounds_b, strict=True)
    )


def report_cpu_ratios(
    results: dict[tuple[str, str, int, str], Measured],
    names: list[str],
    groups: list[str],
    args: argparse.Namespace,
) -> None:
    """CPU per request as ratios within a round: Shunter over smg, and PD over regular."""
    pairs: list[tuple[str, tuple[str, str], tuple[str, str]]] = []
    if "smg" in names:
        pairs += [(f"shunter/smg {g}", (g, "shunter"), (g, "smg")) for g in groups]
    if "regular" in groups:
        pairs += [(f"{n} PD/regular", ("PD", n), ("regular", n)) for n in names]
    if not pairs:
        return
    columns = [(c, m) for m in ("stream", "whole") for c in args.concurrency]
    print("CPU per request, ratios (median over rounds of the ratio within each round)")
    print(f"{'':>22} | " + " ".join(f"{m + ' ' + str(c):>10}" for c, m in columns))
    for label, a, b in pairs:
        cells = " ".join(f"{cpu_ratio(results, a, b, c, m):>9.2f}x" for c, m in columns)
        print(f"{label:>22} | {cells}")


# --- 2. time to error -------------------------------------------------------------------


@dataclass
class ErrorRun:
    """One gateway's error requests over every round."""

    waits: dict[str, list[float]] = field(default_factory=lambda: {"whole": [], "stream": []})
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    # mode -> the decode sims' records of this gateway's requests
    decode_legs: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"whole": [], "stream": []}
    )


def set_faults(fleet: Fleet, faults: dict[str, Any]) -> None:
    for s in fleet.prefills:
        post_json(s.url + "/sim/faults", faults)


def decode_records(fleet: Fleet, tag: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for s in fleet.decodes:
        records += [r for r in get_json(s.url + "/sim/requests") if tag in r["body"]]
    return records


async def errors_through(gateway: Gateway, tag: str, count: int, run: ErrorRun) -> None:
    """``count`` whole and ``count`` streamed requests, 4 at a time, their texts tagged."""
    clients = Clients(read_timeout=3600)  # a gateway that waits is measured, not cut short
    client = clients[gateway.url]
    jobs = [(mode, i) for i in range(count) for mode in ("whole", "stream")]

    async def worker() -> None:
        while jobs:
            mode, i = jobs.pop(0)
            stream = mode == "stream"
            text = f"{tag}{mode} {i}"
            body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
            body |= {"max_tokens": OUTPUT_TOKENS, "stream": stream}
            sample = await call(client, gateway.url + CHAT, orjson.dumps(body), stream)
            run.waits[mode].append(sample.total)
            run.statuses[sample.status] += 1

    try:
        await asyncio.gather(*(worker() for _ in range(4)))
    finally:
        await clients.close()


def settled_legs(fleet: Fleet, tag: str, timeout: float) -> list[dict[str, Any]]:
    """The decode records tagged ``tag`` once none is still waiting for its room (a leg
    left polling ends by the sims' bootstrap timeout), or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        legs = decode_records(fleet, tag)
        if all("bootstrap_wait_ms" in r for r in legs) or time.monotonic() > deadline:
            return legs
        time.sleep(0.2)


def time_to_error(
    fleet: Fleet, gateways: list[Gateway], args: argparse.Namespace
) -> dict[str, ErrorRun]:
    """Rounds of error requests, the gateways taking turns at going first."""
    runs = {g.name: ErrorRun() for g in gateways}
    set_faults(fleet, {"error_rate": 1.0, "error_status": 400})
    try:
        for round_ in range(args.rounds):
            for gateway in rotated(gateways, round_):
                run = runs[gateway.name]
                tag = f"pd-bench-error {gateway.name} r{round_} "
                run_loop(errors_through(gateway, tag, args.error_requests, run))
                time.sleep(0.2)  # a cancelled leg's record is written as its task unwinds
                legs = settled_legs(fleet, tag, args.bootstrap_timeout + 5)
                for mode, found in run.decode_legs.items():
                    found += [r for r in legs if f"{tag}{mode} " in r["body"]]
    finally:
        set_faults(fleet, {"error_rate": 0.0, "error_status": 500})
    return runs


def report_errors(runs: dict[str, ErrorRun], args: argparse.Namespace) -> None:
    print(
        f"time to error: both prefill sims answer 400; {args.rounds} rounds x "
        f"{args.error_requests} whole + {args.error_requests} streamed requests per gateway, 4 "
        f"at a time; decode sims' bootstrap timeout {args.bootstrap_timeout:g} s (SGLang's "
        "default is 300 s)"
    )
    print(
        f"{'gateway':>8} {'mode':>6} | {'answers':>13} | {'wait p50':>9} {'p99':>9} {'max':>9} "
        f"{'>100ms':>6} | decode legs: sent, cancelled, held p50 / max"
    )
    for name, run in runs.items():
        for mode in ("whole", "stream"):
            waits = [w * 1e3 for w in run.waits[mode]]
            legs = run.decode_legs[mode]
            held = [float(r.get("bootstrap_wait_ms", "nan")) for r in legs]
            cancelled = sum(1 for r in legs if r.get("aborted"))
            legs_text = (
                f"{len(legs)}, {cancelled}, {statistics.median(held):.1f} / {max(held):.1f} ms"
                if legs
                else "none sent"
            )
            answers = ", ".join(f"{n}x{code}" for code, n in sorted(run.statuses.items()))
            print(
                f"{name:>8} {mode:>6} | {answers if mode == 'whole' else '':>13} | "
                f"{percentile(waits, 50):>7.1f}ms {percentile(waits, 99):>7.1f}ms "
                f"{max(waits):>7.1f}ms {sum(1 for w in waits if w >= 100):>6} | {legs_text}"
            )


# --- 3. the skip rule -------------------------------------------------------------------

CLASSES = ("short", "long", "repeated")


def words(rng: random.Random, count: int) -> str:
    """``count`` words of three letters: 4 characters a token with its space, so that the
    gateway's estimate (4 characters a token) and the sim's count (words) agree."""
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=3)) for _ in range(count))


def skip_workload(
    texts: int, order: int, per_class: int, short: int, long: int, documents: int
) -> list[tuple[str, bytes]]:
    """(class, streamed chat body), shuffled: short prompts, long prompts, and one of
    ``documents`` long system prompts followed by a short new question. The words come from
    seed ``texts``, the order of the classes from seed ``order``."""
    rng = random.Random(texts)
    docs = [words(rng, long) for _ in range(documents)]
    jobs: list[tuple[str, list[dict[str, str]]]] = []
    for _ in range(per_class):
        jobs.append(("short", [{"role": "user", "content": words(rng, short)}]))
        jobs.append(("long", [{"role": "user", "content": words(rng, long)}]))
        system = {"role": "system", "content": rng.choice(docs)}
        jobs.append(("repeated", [system, {"role": "user", "content": words(rng, short)}]))
    random.Random(order).shuffle(jobs)
    return [
        (kind, orjson.dumps({"model": MODEL, "messages": messages, "stream": True}))
        for kind, messages in jobs
    ]


async def replay(
    gateway: Gateway, jobs: list[tuple[str, bytes]], concurrency: int
) -> tuple[dict[str, list[float]], int]:
    """TTFT (ms) by class, and the failed count, of ``jobs`` sent ``concurrency`` at a time."""
    clients = Clients()
    client = clients[gateway.url]
    queue = list(reversed(jobs))
    ttft: dict[str, list[float]] = {kind: [] for kind in CLASSES}
    failed = 0

    async def worker() -> None:
        nonlocal failed
        while queue:
            kind, body = queue.pop()
            sample = await call(client, gateway.url + CHAT, body, True)
            if sample.ok:
                ttft[kind].append(sample.first * 1e3)
            else:
                failed += 1

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await clients.close()
    return ttft, failed


def sims_total(sims: list[Sim], key: str) -> int:
    return sum(int(get_json(s.url + "/sim/stats")[key]) for s in sims)


def skip_rule(
    fleet: Fleet, gateways: list[Gateway], args: argparse.Namespace
) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {g.name: [] for g in gateways}
    for index, gateway in enumerate(gateways):  # warm-up, on texts of its own
        run_loop(replay(gateway, skip_workload(-1 - index, -1, 8, 64, 2048, 4), 8))
    for round_ in range(args.rounds):
        for index, gateway in rotated(list(enumerate(gateways)), round_):
            # Fresh texts for each run (the caches keep what earlier runs left), the same
            # shape and order for both gateways of a round.
            texts = round_ * len(gateways) + index
            jobs = skip_workload(texts, round_, args.skip_requests, 64, 2048, 4)
            prefills = sims_total(fleet.prefills, "requests_total")
            before = cpu_seconds(gateway.process.pid)
            ttft, failed = run_loop(replay(gateway, jobs, args.skip_concurrency))
            cpu = cpu_seconds(gateway.process.pid) - before
            runs[gateway.name].append(
                {
                    "ttft": ttft,
                    "failed": failed,
                    "requests": len(jobs),
                    "prefill_legs": sims_total(fleet.prefills, "requests_total") - prefills,
                    "cpu_us": cpu / len(jobs) * 1e6,
                }
            )
    return runs


def class_ttft(rounds: list[dict[str, Any]], kind: str, q: float) -> float:
    """The median over rounds of one class's TTFT percentile ``q`` (``all``: every class)."""
    values = []
    for run in rounds:
        ttft = run["ttft"]
        series = [v for k in CLASSES for v in ttft[k]] if kind == "all" else ttft[kind]
        values.append(percentile(series, q))
    return statistics.median(values)


def report_skip(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    print(
        f"skip rule: {args.pairs} prefill + {args.pairs} decode vLLM sims (ttft 5 ms, itl 2 ms, "
        f"{args.prefill_us:g} us per uncached prompt token), Shunter, cache_aware on both legs; "
        f"{args.skip_requests} x (short: 64-token prompt, long: 2048-token prompt, repeated: "
        f"one of 4 2048-token prefixes + 64 new tokens), streamed, {args.skip_concurrency} at "
        f"a time, {args.rounds} rounds (medians)"
    )
    names = list(runs)
    print(f"{'TTFT':>8} | " + " | ".join(f"{name + ': p50':>22} {'p99':>8}" for name in names))
    for kind in (*CLASSES, "all"):
        cells = [
            f"{class_ttft(runs[n], kind, 50):>20.1f}ms {class_ttft(runs[n], kind, 99):>6.1f}ms"
            for n in names
        ]
        print(f"{kind:>8} | " + " | ".join(cells))
    for name, rounds in runs.items():
        legs = statistics.median(r["prefill_legs"] for r in rounds)
        cpu = statistics.median(r["cpu_us"] for r in rounds)
        failed = sum(r["failed"] for r in rounds)
        print(
            f"{name}: {legs:.0f} of {rounds[0]['requests']} requests had a prefill leg; "
            f"gateway CPU {cpu:.0f}us per request; {failed} failed"
        )


# --- the run ----------------------------------------------------------------------------


@contextmanager
def stopped_on_signals() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that every ``finally`` stops its processes."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke test, well under a minute")
    parser.add_argument("--duration", type=float, default=5, help="seconds per overhead row")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--pairs", type=int, default=2, help="prefill sims (and decode sims)")
    parser.add_argument(
        "--no-regular",
        dest="regular",
        action="store_false",
        help="skip the regular-mode reference rows (half the overhead part's time)",
    )
    parser.add_argument("--smg", default=shutil.which("smg"), help="smg executable")
    parser.add_argument("--bootstrap-timeout", type=float, default=10, help="the sims', seconds")
    parser.add_argument("--error-requests", type=int, default=16, help="per mode and gateway")
    parser.add_argument(
        "--min-prefill-tokens", type=int, default=256, help="--pd-min-prefill-tokens of the rule"
    )
    parser.add_argument("--prefill-us", type=float, default=20, help="skip-rule sims' cost")
    parser.add_argument("--skip-requests", type=int, default=100, help="per class and run")
    parser.add_argument("--skip-concurrency", type=int, default=8)
    parser.add_argument("--only", choices=("overhead", "errors", "skip"), nargs="+", default=None)
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds, args.concurrency = 1.5, 1, [16]
        args.error_requests, args.skip_requests = 4, 15
    return args


def machine() -> str:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load}"


def version(smg: str | None) -> str:
    if smg is None:
        return "not found"
    out = subprocess.run([smg, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).strip() or "version unknown"


def main() -> None:
    args = parse_args()
    parts = set(args.only or ("overhead", "errors", "skip"))
    os.sched_setaffinity(0, {LOAD_CPU})
    procs = Processes()
    failed = True
    try:
        with stopped_on_signals():
            started = time.monotonic()
            print(f"{machine()}; smg: {version(args.smg)}\n")
            if parts & {"overhead", "errors"}:
                sglang_parts(procs, parts, args)
            if "skip" in parts:
                skip_part(procs, args)
            print(f"(run took {time.monotonic() - started:.0f} s; {machine()})")
        failed = False
    finally:
        procs.cleanup(keep_logs=failed)


def sglang_parts(procs: Processes, parts: set[str], args: argparse.Namespace) -> None:
    sim_args = [*FAST_SIM, "--max-running", RUNNING_SLOTS, "--max-tokens", str(OUTPUT_TOKENS)]
    pd_args = [*sim_args, "--disaggregation-bootstrap-timeout", f"{args.bootstrap_timeout:g}"]
    fleet = start_fleet(procs, args.pairs, pd_args, "sglang")
    workers = pd_workers(fleet, sglang=True)
    gateways = [start_shunter(procs, "shunter", workers)]
    if args.smg:
        gateways.append(start_smg(procs, args.smg, "smg", workers))
    else:
        print("smg not found (pip install smg): Shunter only", file=sys.stderr)
    regular: tuple[list[Sim], list[Gateway]] | None = None
    if "overhead" in parts and args.regular:
        sims = start_regular(procs, args.pairs, sim_args)
        plain = regular_workers(sims)
        regular_gateways = [start_shunter(procs, "shunter", plain)]
        if args.smg:
            regular_gateways.append(start_smg(procs, args.smg, "smg", plain))
        regular = (sims, regular_gateways)
    for gateway in gateways:
        wait_ready(gateway, 2 * args.pairs)
    for gateway in regular[1] if regular else []:
        wait_ready(gateway, args.pairs)
    names = [g.name for g in gateways]
    if "overhead" in parts:
        report_overhead(run_loop(overhead(fleet, gateways, regular, args)), names, args)
        print()
    if "errors" in parts:
        report_errors(time_to_error(fleet, gateways, args), args)
        print()
    procs.stop(list(procs.running))


def skip_part(procs: Processes, args: argparse.Namespace) -> None:
    sim_args = ["--ttft-ms", "5", "--itl-ms", "2", "--prefill-us-per-token", f"{args.prefill_us:g}"]
    sim_args += ["--max-tokens", str(OUTPUT_TOKENS)]
    sim_args += ["--disaggregation-bootstrap-timeout", f"{args.bootstrap_timeout:g}"]
    fleet = start_fleet(procs, args.pairs, sim_args, "vllm")
    policies = ("--prefill-policy", "cache_aware", "--decode-policy", "cache_aware")
    rule = ("--pd-min-prefill-tokens", str(args.min_prefill_tokens))
    workers = pd_workers(fleet, sglang=False)
    gateways = [
        start_shunter(procs, "shunter, rule off", workers, *policies),
        start_shunter(procs, f"shunter, N={args.min_prefill_tokens}", workers, *policies, *rule),
    ]
    for gateway in gateways:
        wait_ready(gateway, 2 * args.pairs)
    report_skip(skip_rule(fleet, gateways, args), args)
    procs.stop(list(procs.running))


if __name__ == "__main__":
    main()
