"""Chaos, scale and fuzz runs against a real gateway and real sims.

Run: python bench/chaos_bench.py [chaos] [breakers] [streams] [fuzz]
(chaos, streams and fuzz by default)

- chaos: 3 sims, 64 concurrent clients (1 in 4 streaming) for 60 s; one sim is killed
  (SIGKILL) and restarted on its port every 10 s. Counts failed non-streamed requests (target
  0), failed streams split by whether they had started, and latency percentiles.
- breakers: the circuit breakers at their default flags against workers that restart in
  turn: 3 sims, 32 clients for 60 s; one sim is SIGKILLed every 6 s and restarted 2 s later
  (never two down at once). Counts failed requests by status (target 0), breaker openings
  and latency percentiles.
- streams: 10,000 concurrent slow streams held open through the gateway; its RSS then.
- fuzz: 10,000 random or malformed requests (bodies, headers, paths, methods, raw bytes);
  counts 5xx answers made by the gateway itself (target 0), checks it is still up, and
  compares its RSS before and after.
"""

from __future__ import annotations

import asyncio
import random
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import httpx

from common import free_port, wait_http

HERE = Path(__file__).resolve().parent
FILES = 65536
GATEWAY_LOG = "/tmp/shunter-chaos-gateway.log"  # errors the gateway logged during a run


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(FILES, hard), max(FILES, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def spawn(*args: str, log: str | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(
        [sys.executable, "-m", "shunter", *args], preexec_fn=raise_fd_limit, stdout=out, stderr=out
    )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Fleet:
    def __init__(self, sims: int, sim_args: list[str], gateway_args: list[str]) -> None:
        self.ports = [free_port() for _ in range(sims)]
        self.sim_args = sim_args
        self.sims = [self._start_sim(i) for i in range(sims)]
        for port in self.ports:
            wait_http(f"http://127.0.0.1:{port}/health")
        self.port = free_port()
        urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        self.gateway = spawn(
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--prometheus-port",
            "0",
            "--log-level",
            "error",
            *gateway_args,
            "--worker-urls",
            *urls,
            log=GATEWAY_LOG,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while self._healthy() != sims:
            if time.monotonic() > deadline:
                raise TimeoutError("workers never became healthy")
            time.sleep(0.1)

    def _healthy(self) -> int:
        try:
            return int(
                httpx.get(self.url + "/readiness", timeout=1).json().get("healthy_workers", 0)
            )
        except (httpx.HTTPError, ValueError):
            return 0

    def _start_sim(self, i: int) -> subprocess.Popen[bytes]:
        return spawn("sim", "--port", str(self.ports[i]), "--worker-id", f"sim-{i}", *self.sim_args)

    def restart(self, i: int, down_secs: float = 0.5) -> None:
        self.kill(i)
        time.sleep(down_secs)
        self.revive(i)

    def kill(self, i: int) -> None:
        self.sims[i].kill()
        self.sims[i].wait()

    def revive(self, i: int) -> None:
        self.sims[i] = self._start_sim(i)

    def stop(self) -> None:
        self.gateway.send_signal(signal.SIGTERM)
        try:
            self.gateway.wait(60)
        except subprocess.TimeoutExpired:
            self.gateway.kill()
            self.gateway.wait()
        for sim in self.sims:
            sim.kill()
            sim.wait()


# --- chaos --------------------------------------------------------------------------------


async def chaos_client(
    url: str, streaming: bool, stop_at: float, stats: dict[str, list[float] | Counter[str]]
) -> None:
    latencies = stats["latency"]
    outcomes = stats["outcomes"]
    assert isinstance(latencies, list) and isinstance(outcomes, Counter)
    async with httpx.AsyncClient(timeout=60) as client:
        while time.monotonic() < stop_at:
            body = {"prompt": "chaos " * 20, "max_tokens": 8, "stream": streaming}
            started = time.monotonic()
            if not streaming:
                try:
                    response = await client.post(url + "/v1/completions", json=body)
                    outcomes[
                        "ok" if response.status_code == 200 else f"failed {response.status_code}"
                    ] += 1
                except httpx.HTTPError as exc:
                    outcomes[f"failed {type(exc).__name__}"] += 1
                latencies.append(time.monotonic() - started)
                continue
            first = False
            try:
                async with client.stream("POST", url + "/v1/completions", json=body) as r:
                    text = ""
                    async for chunk in r.aiter_text():
                        first = True
                        text += chunk
                complete = r.status_code == 200 and "[DONE]" in text and "error" not in text
                outcomes["stream ok" if complete else f"stream failed after start={first}"] += 1
            except httpx.HTTPError:
                outcomes[f"stream failed after start={first}"] += 1


def run_chaos(seconds: float = 60, every: float = 10) -> None:
    fleet = Fleet(
        3,
        ["--itl-ms", "5", "--max-running", "64"],
        [
            "--policy",
            "round_robin",
            "--health-check-interval-secs",
            "1",
            "--retry-initial-backoff-ms",
            "20",
            "--cb-timeout-duration-secs",
            "2",
        ],
    )
    stats: dict[str, list[float] | Counter[str]] = {"latency": [], "outcomes": Counter()}
    stop_at = time.monotonic() + seconds

    async def main() -> None:
        clients = [chaos_client(fleet.url, i % 4 == 3, stop_at, stats) for i in range(64)]
        task = asyncio.gather(*clients)
        victim = 0
        while time.monotonic() < stop_at - every / 2:
            await asyncio.sleep(every)
            await asyncio.to_thread(fleet.restart, victim)
            victim = (victim + 1) % 3
        await task

    try:
        asyncio.run(main())
    finally:
        fleet.stop()
    outcomes = stats["outcomes"]
    latencies = sorted(stats["latency"])  # type: ignore[arg-type]
    assert isinstance(outcomes, Counter)
    failed_plain = sum(v for k, v in outcomes.items() if k.startswith("failed"))
    print(
        f"chaos: 3 sims, 64 clients (16 streaming), {seconds:.0f} s, a sim SIGKILLed and "
        f"restarted every {every:.0f} s"
    )
    print(
        f"  non-streamed: {outcomes['ok'] + failed_plain} requests, {failed_plain} failed; "
        f"latency p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms"
    )
    print(
        f"  streams: {outcomes['stream ok']} complete, "
        f"{outcomes['stream failed after start=True']} broke after their first byte, "
        f"{outcomes['stream failed after start=False']} failed before it"
    )
    print(f"  all outcomes: {dict(outcomes)}")


# --- breakers against workers restarting in turn --------------------------------------------


async def plain_client(
    url: str, stop_at: float, statuses: Counter[str], latencies: list[float]
) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        while time.monotonic() < stop_at:
            body = {"prompt": "breakers " * 20, "max_tokens": 8}
            started = time.monotonic()
            try:
                response = await client.post(url + "/v1/completions", json=body)
                statuses[str(response.status_code)] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
            latencies.append(time.monotonic() - started)


def breaker_openings(metrics_url: str) -> int:
    """Breaker openings the gateway counted (smg_worker_cb_transitions to="open")."""
    text = httpx.get(metrics_url, timeout=5).text
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("smg_worker_cb_transitions_total{") and 'to="open"' in line
    )


def run_breakers(
    seconds: float = 60,
    every: float = 6,
    down: float = 2,
    clients: int = 32,
    gateway_args: Sequence[str] = (),  # e.g. other breaker flags, to compare
) -> None:
    metrics_port = free_port()
    fleet = Fleet(
        3,
        ["--itl-ms", "5", "--max-running", "64"],
        ["--policy", "round_robin", "--prometheus-port", str(metrics_port), *gateway_args],
    )
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds
    kills = 0

    async def main() -> None:
        nonlocal kills
        task = asyncio.gather(
            *(plain_client(fleet.url, stop_at, statuses, latencies) for _ in range(clients))
        )
        victim = 0
        while time.monotonic() + every < stop_at:
            await asyncio.sleep(every - down)
            await asyncio.to_thread(fleet.kill, victim)
            kills += 1
            await asyncio.sleep(down)
            await asyncio.to_thread(fleet.revive, victim)
            victim = (victim + 1) % 3
        await task

    try:
        asyncio.run(main())
        openings = breaker_openings(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        fleet.stop()
    total = sum(statuses.values())
    failed = {k: v for k, v in sorted(statuses.items()) if k != "200"}
    latencies.sort()
    print(
        f"breakers: 3 sims, {clients} clients, {seconds:.0f} s, {kills} kills (SIGKILL every "
        f"{every:g} s, restarted {down:g} s later), breaker flags: "
        f"{' '.join(gateway_args) or 'the defaults'}"
    )
    print(f"  requests: {total}, failed: {sum(failed.values())} by status {failed}")
    print(
        f"  breaker openings: {openings}; latency p50 "
        f"{statistics.median(latencies) * 1000:.1f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms"
    )


# --- 10,000 streams -------------------------------------------------------------------------


async def hold_stream(port: int, opened: list[int], done: asyncio.Event) -> bool:
    body = b'{"prompt": "hold", "max_tokens": 1000, "stream": true}'
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nhost: b\r\ncontent-type: "
            b"application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        data = b""
        while b"data:" not in data:
            chunk = await reader.read(4096)
            if not chunk:
                return False
            data += chunk
        opened.append(1)
        await done.wait()
        writer.close()
        return True
    except OSError:
        return False


def run_streams(count: int = 10_000) -> None:
    raise_fd_limit()
    fleet = Fleet(
        1, ["--itl-ms", "1000", "--max-running", str(count * 2)], ["--policy", "round_robin"]
    )
    try:
        idle = rss_mib(fleet.gateway.pid)

        async def main() -> tuple[int, float]:
            opened: list[int] = []
            done = asyncio.Event()
            gate = asyncio.Semaphore(500)

            async def one() -> bool:
                async with gate:
                    opening = asyncio.ensure_future(hold_stream(fleet.port, opened, done))
                    while not opening.done() and len(opened) == 0:
                        await asyncio.sleep(0.001)
                return await opening

            tasks = [asyncio.ensure_future(one()) for _ in range(count)]
            deadline = time.monotonic() + 180
            while len(opened) < count and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            await asyncio.sleep(1)
            rss = rss_mib(fleet.gateway.pid)
            done.set()
            await asyncio.gather(*tasks)
            return len(opened), rss

        held, rss = asyncio.run(main())
        print(
            f"streams: {held:,} slow streams held open at once (1 token/s): gateway RSS "
            f"{rss:.0f} MiB (idle {idle:.0f} MiB), {(rss - idle) * 1024 / max(held, 1):.1f} "
            "KiB per stream"
        )
    finally:
        fleet.stop()


# --- fuzz -----------------------------------------------------------------------------------

VALID = [
    b'{"prompt": "hi", "max_tokens": 1}',
    b'{"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}',
    b'{"text": "hi", "sampling_params": {"max_new_tokens": 1}}',
]
PATHS = [
    "/v1/completions",
    "/v1/chat/completions",
    "/generate",
    "/v1/embeddings",
    "/v1/rerank",
    "/workers",
    "/workers/x",
    "/v1/models",
    "/flush_cache",
    "/nope",
    "/" + "a" * 5000,
    "/workers/%zz",
    "/health",
]


def mutate(rng: random.Random, body: bytes) -> bytes:
    choice = rng.randrange(9)
    if choice == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
    if choice == 1:
        return body[: rng.randrange(len(body))]
    if choice == 2:
        data = bytearray(body)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if choice == 3:
        depth = rng.randrange(1, 3000)
        return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    if choice == 4:
        return b'{"model": %s, "stream": %s}' % (
            rng.choice([b"1", b"null", b"[]", b'"x"', b"{}"]),
            rng.choice([b"1", b'"yes"', b"null", b"true", b"[]"]),
        )
    if choice == 5:
        return b'{"prompt": "' + "é漢🙂".encode() * rng.randrange(1, 500) + b'"}'
    if choice == 6:
        return b'{"max_tokens": 1e999, "prompt": "x", "n": -1}'
    if choice == 7:
        return b'{"prompt": "x", "stream": true, "max_tokens": 2}'
    return rng.choice(VALID)


def fuzz_request(rng: random.Random) -> tuple[str, str, dict[str, str], bytes]:
    method = rng.choice(["POST", "POST", "POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
    path = rng.choice(PATHS)
    headers = {"content-type": rng.choice(["application/json", "text/plain", "x/" + "y" * 300])}
    if rng.random() < 0.3:
        headers["x-request-id"] = "".join(
            chr(rng.randrange(33, 127)) for _ in range(rng.randrange(1, 400))
        )
    if rng.random() < 0.2:
        headers["origin"] = "http://evil.example"
    if rng.random() < 0.2:
        headers["authorization"] = "Bearer " + "k" * rng.randrange(0, 3000)
    if rng.random() < 0.1:
        headers["x-smg-routing-key"] = str(rng.random())
    return method, path, headers, mutate(rng, rng.choice(VALID))


async def raw_garbage(port: int, rng: random.Random) -> None:
    """Bytes that are not HTTP at all, or HTTP broken in the middle."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        kind = rng.randrange(7)
        if kind == 0:
            writer.write(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 500))))
        elif kind == 1:
            writer.write(b"POST /v1/completions HTTP/1.1\r\ncontent-length: 100\r\n\r\n{")
        elif kind == 2:  # over the head limit (431)
            writer.write(b"GET / HTTP/1.1\r\n" + b"x-long: " + b"a" * 100_000 + b"\r\n\r\n")
        elif kind == 3:  # over the header count (431)
            writer.write(b"GET /health HTTP/1.1\r\n" + b"x: 1\r\n" * 150 + b"\r\n")
        elif kind == 4:  # an upgrade (400)
            writer.write(b"GET /health HTTP/1.1\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n")
        elif kind == 5:  # a bad chunk size behind a valid request (200, then 400)
            writer.write(
                b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
                b"POST /v1/completions HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"
            )
        else:  # HEAD on a GET route: a head and no body
            writer.write(b"HEAD /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(reader.read(1000), 2)
        writer.close()
    except (OSError, TimeoutError):
        pass


def run_fuzz(count: int = 10_000) -> None:
    fleet = Fleet(
        1, ["--itl-ms", "0"], ["--policy", "round_robin", "--max-payload-size", "1048576"]
    )
    rng = random.Random(2026)
    gateway_5xx: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    try:
        baseline = rss_mib(fleet.gateway.pid)

        async def main() -> None:
            gate = asyncio.Semaphore(32)
            async with httpx.AsyncClient(timeout=30) as client:

                async def one(i: int) -> None:
                    async with gate:
                        if i % 20 == 0:
                            await raw_garbage(fleet.port, rng)
                            return
                        method, path, headers, body = fuzz_request(rng)
                        try:
                            r = await client.request(
                                method, fleet.url + path, headers=headers, content=body
                            )
                        except httpx.HTTPError:
                            statuses[0] += 1  # the gateway closed on a request it refused
                            return
                        statuses[r.status_code] += 1
                        if r.status_code >= 500 and "x-worker-id" not in r.headers:
                            gateway_5xx[f"{r.status_code} {r.text[:80]}"] += 1

                await asyncio.gather(*(one(i) for i in range(count)))

        after = []
        for _ in range(3):  # the same load three times: a leak grows every round
            asyncio.run(main())
            time.sleep(1)
            after.append(rss_mib(fleet.gateway.pid))
        alive = httpx.get(fleet.url + "/health").status_code == 200
        made = sum(gateway_5xx.values())
        print(
            f"fuzz: 3 x {count:,} random or malformed requests (1 in 20 raw non-HTTP "
            f"bytes); answers {dict(sorted(statuses.items()))}"
        )
        print(
            f"  5xx made by the gateway itself: {made} {dict(gateway_5xx) if made else ''}; "
            f"still up: {alive}; RSS {baseline:.0f} MiB before, after each round: "
            + ", ".join(f"{r:.0f}" for r in after)
            + " MiB"
        )
    finally:
        fleet.stop()


if __name__ == "__main__":
    wanted = set(sys.argv[1:]) or {"chaos", "streams", "fuzz"}
    if "fuzz" in wanted:
        run_fuzz()
    if "chaos" in wanted:
        run_chaos()
    if "breakers" in wanted:
        run_breakers()
    if "streams" in wanted:
        run_streams()
