"""Workers broken on purpose: errors, crashes, hangs, recoveries, bursts, shutdown."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from shunter.backends.connect import grpc_available

from support.harness import Gateway, GrpcSim, Proc, Sim, wait_for

FAST_RETRY = ("--retry-initial-backoff-ms", "5", "--retry-max-backoff-ms", "50")


def complete(gateway: Gateway, **extra: Any) -> httpx.Response:
    body = {"prompt": "hello", "max_tokens": 2, **extra}
    return httpx.post(gateway.url + "/v1/completions", json=body, timeout=30)


def worker_info(gateway: Gateway, sim: Sim) -> dict[str, Any]:
    return next(w for w in gateway.workers() if w["url"] == sim.url)


def test_a_failing_worker_is_retried_elsewhere_then_circuit_broken(procs: list[Proc]) -> None:
    bad, good = Sim("bad", "--error-rate", "1.0", "--error-status", "500"), Sim("good")
    procs += [bad, good]
    gateway = Gateway(
        "--policy",
        "round_robin",
        "--cb-failure-threshold",
        "3",
        "--cb-timeout-duration-secs",
        "300",
        # The first opening lasts 2 s by default: on a loaded machine the requests below
        # may outlast it and half-open the circuit. Held open for the whole test instead.
        "--cb-base-open-secs",
        "300",
        *FAST_RETRY,
        workers=[bad.url, good.url],
    )
    procs.append(gateway)
    answers = [complete(gateway) for _ in range(12)]
    assert [r.status_code for r in answers] == [200] * 12
    assert {r.headers["x-worker-id"] for r in answers} == {"good"}
    assert worker_info(gateway, bad)["circuit_state"] == "open"
    tried = len(bad.requests())  # every request the sim received, errors included
    assert tried == 3  # after the third failure the circuit opened: no more traffic
    for _ in range(5):
        complete(gateway)
    assert len(bad.requests()) == tried
    metrics = httpx.get(gateway.metrics_url).text
    assert f'smg_worker_cb_state{{worker="{bad.url}"}} 1.0' in metrics
    assert "smg_worker_retries_total" in metrics


def test_a_worker_killed_under_load_loses_no_request_that_can_be_retried(
    procs: list[Proc],
) -> None:
    doomed, survivor = Sim("doomed", "--itl-ms", "2"), Sim("survivor", "--itl-ms", "2")
    procs += [doomed, survivor]
    gateway = Gateway("--policy", "round_robin", *FAST_RETRY, workers=[doomed.url, survivor.url])
    procs.append(gateway)
    stop = time.monotonic() + 3.0
    killed = threading.Event()
    statuses: Counter[int] = Counter()
    broken_streams: list[str] = []
    lock = threading.Lock()

    def client(streaming: bool) -> None:
        with httpx.Client(timeout=30) as http:
            while time.monotonic() < stop:
                body = {"prompt": "x", "max_tokens": 4, "stream": streaming}
                if not streaming:
                    status = http.post(gateway.url + "/v1/completions", json=body).status_code
                    with lock:
                        statuses[status] += 1
                    continue
                started_after_kill = killed.is_set()
                with http.stream("POST", gateway.url + "/v1/completions", json=body) as r:
                    text = r.read().decode()
                with lock:
                    statuses[r.status_code] += 1
                    if "[DONE]" not in text and started_after_kill:
                        broken_streams.append(text)

    threads = [threading.Thread(target=client, args=(i % 4 == 3,)) for i in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    doomed.kill()
    killed.set()
    for thread in threads:
        thread.join()
    assert set(statuses) == {200}, statuses
    assert sum(statuses.values()) > 50
    assert broken_streams == []  # streams that had not started when it died were retried


def test_a_hanging_worker_costs_a_client_at_most_the_timeout(procs: list[Proc]) -> None:
    hung = Sim("hung", "--hang")
    procs.append(hung)
    gateway = Gateway("--request-timeout-secs", "1", "--disable-retries", workers=[hung.url])
    procs.append(gateway)
    started = time.monotonic()
    response = complete(gateway)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < 10
    stream = complete(gateway, stream=True)
    assert stream.status_code == 504


def test_an_unhealthy_worker_leaves_and_is_readmitted_when_it_recovers(procs: list[Proc]) -> None:
    flaky, steady = Sim("flaky"), Sim("steady")
    procs += [flaky, steady]
    gateway = Gateway(
        "--policy",
        "round_robin",
        "--health-check-interval-secs",
        "0.1",
        "--health-failure-threshold",
        "2",
        "--health-success-threshold",
        "2",
        workers=[flaky.url, steady.url],
    )
    procs.append(gateway)
    flaky.set_faults(fail_health=True)
    wait_for(lambda: not worker_info(gateway, flaky)["is_healthy"], 10, "flaky marked unhealthy")
    assert {complete(gateway).headers["x-worker-id"] for _ in range(6)} == {"steady"}
    flaky.set_faults(fail_health=False)
    wait_for(lambda: worker_info(gateway, flaky)["is_healthy"], 10, "flaky readmitted")
    assert {complete(gateway).headers["x-worker-id"] for _ in range(6)} == {"flaky", "steady"}
    assert (
        'smg_worker_health_checks_total{result="failure",worker_type="regular"}'
        in httpx.get(gateway.metrics_url).text
    )


def test_an_open_circuit_half_opens_and_closes_when_the_worker_recovers(
    procs: list[Proc],
) -> None:
    sim = Sim("recovering", "--error-rate", "1.0")
    procs.append(sim)
    # Panic off: with the default threshold a model's only worker is never excluded.
    gateway = Gateway(
        "--cb-failure-threshold",
        "2",
        "--cb-success-threshold",
        "1",
        "--cb-timeout-duration-secs",
        "0.5",
        "--disable-retries",
        "--cb-panic-threshold",
        "0",
        workers=[sim.url],
    )
    procs.append(gateway)
    assert [complete(gateway).status_code for _ in range(2)] == [500, 500]
    refused = complete(gateway)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "no_available_workers"
    sim.set_faults(error_rate=0.0)
    wait_for(lambda: worker_info(gateway, sim)["circuit_state"] == "half_open", 5, "half-open")
    assert complete(gateway).status_code == 200
    assert worker_info(gateway, sim)["circuit_state"] == "closed"


def test_a_burst_gets_429_when_the_queue_is_full_and_408_when_it_waits_too_long(
    procs: list[Proc],
) -> None:
    sim = Sim("slowpoke", "--itl-ms", "50")
    procs.append(sim)
    gateway = Gateway(
        "--max-concurrent-requests",
        "2",
        "--queue-size",
        "2",
        "--queue-timeout-secs",
        "0.3",
        workers=[sim.url],
    )
    procs.append(gateway)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: complete(gateway, max_tokens=30), range(8)))
    codes = Counter(r.status_code for r in answers)
    assert codes == {200: 2, 408: 2, 429: 4}, codes
    for response in answers:
        if response.status_code != 200:
            error = response.json()["error"]
            assert error["code"] in ("rate_limit_exceeded", "queue_timeout")
    assert complete(gateway).status_code == 200  # every slot came back


def test_a_client_that_leaves_returns_its_slot(procs: list[Proc]) -> None:
    sim = Sim("long", "--itl-ms", "50")
    procs.append(sim)
    gateway = Gateway("--max-concurrent-requests", "1", "--queue-size", "0", workers=[sim.url])
    procs.append(gateway)
    body = {"prompt": "x", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()  # held: dropping the iterator closes the response
        next(lines)
        assert complete(gateway).status_code == 429  # the slot is taken
    wait_for(lambda: complete(gateway).status_code == 200, 10, "the slot to come back")


def test_sigterm_settles_then_finishes_streams_in_flight_and_exits_zero(
    procs: list[Proc],
) -> None:
    """Readiness turns 503 at once; new requests are still served for the settle window
    (min(grace / 2, 5 s)); then no new connection is accepted, the stream in flight
    finishes, and the process exits 0."""
    sim = Sim("draining", "--itl-ms", "40")
    procs.append(sim)
    gateway = Gateway("--shutdown-grace-period-secs", "4", workers=[sim.url])
    procs.append(gateway)
    result: dict[str, str] = {}

    def stream() -> None:
        body = {"prompt": "x", "max_tokens": 80, "stream": True}  # ~3.2 s
        with httpx.stream("POST", gateway.url + "/v1/completions", json=body, timeout=30) as r:
            result["text"] = r.read().decode()

    thread = threading.Thread(target=stream)
    thread.start()
    wait_for(lambda: sim.stats()["running"] == 1, 10, "the stream to start")
    signalled = time.monotonic()
    gateway.popen.send_signal(signal.SIGTERM)
    wait_for(
        lambda: httpx.get(gateway.url + "/readiness", timeout=2).status_code == 503,
        1,
        "readiness to turn 503",
    )
    assert httpx.get(gateway.url + "/readiness", timeout=2).json()["reason"] == "draining"
    settling = httpx.post(gateway.url + "/v1/completions", json={"prompt": "y"}, timeout=5)
    assert settling.status_code == 200  # still served during the settle window

    def refused() -> bool:
        try:
            httpx.get(gateway.url + "/health", timeout=2)
        except httpx.TransportError:
            return True
        return False

    wait_for(refused, 5, "new connections to be refused")
    assert time.monotonic() - signalled >= 2.0  # not before the settle window (4 / 2 s)
    thread.join(30)
    assert result["text"].rstrip().endswith("data: [DONE]")
    assert gateway.popen.wait(20) == 0


def test_the_gateway_refuses_to_start_on_unreadable_tls_files() -> None:
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "shunter",
            "serve",
            "--tls-cert-path",
            "/nope",
            "--tls-key-path",
            "/nope",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "cannot read it" in out.stderr


def test_workers_killed_and_restarted_in_turn_never_strand_the_fleet(procs: list[Proc]) -> None:
    """Each kill opens the victim's breaker; when it is back, so is its share of the traffic.

    With every opening lasting the full --cb-timeout-duration-secs (60 s) the third kill
    left every breaker open while every worker was up, and requests got 503s.
    """
    sims = [Sim(f"turn-{i}", "--itl-ms", "1") for i in range(3)]
    procs += sims
    gateway = Gateway(
        "--policy",
        "round_robin",
        "--cb-failure-threshold",
        "3",
        *FAST_RETRY,
        workers=[s.url for s in sims],
    )
    procs.append(gateway)
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    done = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not done.is_set():
                body = {"prompt": "x", "max_tokens": 2}
                status = http.post(gateway.url + "/v1/completions", json=body).status_code
                with lock:
                    statuses[status] += 1

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        for i, victim in enumerate(sims):  # never two down at once
            time.sleep(1.5)
            victim.kill()
            time.sleep(1.0)
            sims[i] = Sim(victim.name, "--itl-ms", "1", port=victim.port)
            procs.append(sims[i])
        time.sleep(1.5)  # the last victim's breaker may still be open: the others serve
    finally:
        done.set()
        for thread in threads:
            thread.join()
    assert set(statuses) == {200}, statuses
    assert statuses[200] > 300
    metrics = httpx.get(gateway.metrics_url).text
    opened = {
        line.split('worker="')[1].split('"')[0]
        for line in metrics.splitlines()
        if line.startswith("smg_worker_cb_transitions_total") and 'to="open"' in line
    }
    assert opened == {s.url for s in sims}  # every kill did open a breaker
    # The last opening ends within its backed-off time (2 s, or 4 s if its first probe
    # came before the sim was back).
    wait_for(lambda: "open" not in {w["circuit_state"] for w in gateway.workers()}, 10, "probes")
    served = Counter(complete(gateway).headers["x-worker-id"] for _ in range(9))
    assert set(served) == {s.name for s in sims}, served  # all back in service


def test_a_poison_request_opens_no_breaker(procs: list[Proc]) -> None:
    sims = [Sim(f"taster-{i}") for i in range(3)]
    procs += sims
    gateway = Gateway(
        "--policy",
        "round_robin",
        "--cb-failure-threshold",
        "2",
        *FAST_RETRY,
        workers=[s.url for s in sims],
    )
    procs.append(gateway)
    for sim in sims:
        sim.set_faults(poison_text="DROP TABLE")
    for _ in range(3):  # more than the failure threshold
        poisoned = complete(gateway, prompt="x'; DROP TABLE users")
        assert poisoned.status_code == 500
    assert sum(len(s.requests()) for s in sims) == 3 * 5  # each tried on every attempt
    assert {w["circuit_state"] for w in gateway.workers()} == {"closed"}
    served = Counter(complete(gateway).headers["x-worker-id"] for _ in range(6))
    assert served == {s.name: 2 for s in sims}
    assert "poison request" in gateway.output()


@pytest.mark.skipif(not grpc_available(), reason="needs the grpc extra")
def test_a_request_every_grpc_worker_fails_opens_no_breaker(procs: list[Proc]) -> None:
    """The gRPC attempt path tells the breakers through the same Verdict as HTTP."""
    sims = [GrpcSim(f"grpc-taster-{i}") for i in range(2)]
    procs += sims
    gateway = Gateway(
        "--policy",
        "round_robin",
        "--cb-failure-threshold",
        "2",
        *FAST_RETRY,
        workers=[s.url for s in sims],
    )
    procs.append(gateway)
    for sim in sims:
        sim.set_faults(error_rate=1.0, error_status=500)  # gRPC INTERNAL: an answer
    assert [complete(gateway).status_code for _ in range(3)] == [502] * 3
    assert {w["circuit_state"] for w in gateway.workers()} == {"closed"}
    before = [sim.stats()["requests_total"] for sim in sims]
    for sim in sims:
        sim.set_faults(error_rate=0.0)
    assert [complete(gateway).status_code for _ in range(4)] == [200] * 4
    after = [sim.stats()["requests_total"] for sim in sims]
    assert [now - then for now, then in zip(after, before, strict=True)] == [2, 2]
