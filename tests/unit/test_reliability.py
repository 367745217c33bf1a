"""Circuit breaker, retry backoff, admission control and health transitions, in isolation."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from prometheus_client import generate_latest

from shunter.cli import serve_config
from shunter.fleet.breaker import BreakerConfig, CircuitBreaker, State
from shunter.fleet.ejection import in_panic
from shunter.fleet.health import HealthChecker
from shunter.fleet.runtime import HealthConfig
from shunter.fleet.worker import Worker, WorkerType
from shunter.gateway import Gateway
from shunter.routing.limiter import Admission, AdmissionConfig, QueueFull, QueueTimeout
from shunter.routing.retry import RetryConfig
from shunter.routing.verdict import Verdict
from shunter.wire.mock import MockRequest, MockResponse, UpstreamError

from support.fakes import Workers, call, gateway, make_worker, ready, with_breaker


def state_of(breaker: CircuitBreaker) -> State:
    """The breaker's state now (read through a call, so the type checker does not assume
    it unchanged since the last assertion)."""
    return breaker.state


def breaker_for(worker: Worker, **config: float) -> CircuitBreaker:
    """A breaker whose opening excludes the worker (no panic: the worker is alone)."""
    return with_breaker(worker, **config)


async def test_breaker_opens_after_consecutive_failures_then_half_opens_and_closes() -> None:
    worker = make_worker("http://w")
    breaker = breaker_for(worker, failure_threshold=3, success_threshold=2, timeout_secs=0.05)
    breaker.record(False)
    breaker.record(False)
    breaker.record(True)  # a success breaks the streak
    breaker.record(False)
    breaker.record(False)
    assert state_of(breaker) is State.CLOSED and worker.is_available
    breaker.record(False)
    assert state_of(breaker) is State.OPEN and not worker.is_available
    await asyncio.sleep(0.1)
    assert state_of(breaker) is State.HALF_OPEN and worker.is_available
    breaker.record(True)
    assert state_of(breaker) is State.HALF_OPEN
    breaker.record(True)
    assert state_of(breaker) is State.CLOSED


async def test_a_half_open_failure_opens_the_circuit_again() -> None:
    worker = make_worker("http://w")
    breaker = breaker_for(worker, failure_threshold=1, timeout_secs=0.02)
    breaker.record(False)
    await asyncio.sleep(0.05)
    assert state_of(breaker) is State.HALF_OPEN
    breaker.record(False)
    assert state_of(breaker) is State.OPEN and worker.state.excluded


def test_failures_further_apart_than_the_window_do_not_add_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    worker = make_worker("http://w")
    breaker = breaker_for(worker, failure_threshold=3, window_secs=10)
    for _ in range(5):
        breaker.record(False)
        clock[0] += 6  # two failures fit in a window, never three
    assert state_of(breaker) is State.CLOSED
    breaker.record(False)
    breaker.record(False)
    assert state_of(breaker) is State.OPEN


def test_a_disabled_breaker_never_opens() -> None:
    worker = make_worker("http://w")
    breaker = breaker_for(worker, failure_threshold=1, disabled=True)
    for _ in range(10):
        breaker.record(False)
    assert state_of(breaker) is State.CLOSED and worker.is_available


def test_backoff_grows_caps_and_jitters() -> None:
    config = RetryConfig(
        initial_backoff_ms=100, max_backoff_ms=300, backoff_multiplier=2, jitter_factor=0.1
    )
    rng = random.Random(1)
    for attempt, base in ((0, 0.1), (1, 0.2), (2, 0.3), (5, 0.3)):
        delays = [config.backoff_secs(attempt, rng) for _ in range(200)]
        assert all(base * 0.9 - 1e-9 <= d <= base * 1.1 + 1e-9 for d in delays)
    assert RetryConfig(disabled=True).attempts == 1
    assert RetryConfig(max_retries=5).attempts == 5


async def test_admission_queues_then_refuses_when_full_and_after_the_timeout() -> None:
    admission = Admission(AdmissionConfig(max_concurrent=1, queue_size=1, queue_timeout_secs=0.1))
    await admission.acquire()  # runs
    waiting = asyncio.ensure_future(admission.acquire())  # queued
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        await admission.acquire()
    with pytest.raises(QueueTimeout):
        await waiting


async def test_admission_hands_a_released_slot_to_the_first_in_line() -> None:
    admission = Admission(AdmissionConfig(max_concurrent=1, queue_size=5, queue_timeout_secs=5))
    await admission.acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        await admission.acquire()
        order.append(i)

    waiters = [asyncio.ensure_future(wait(i)) for i in range(3)]
    await asyncio.sleep(0)
    for _ in range(3):
        admission.release()
        await asyncio.sleep(0.01)
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2]


async def test_admission_rate_limit_spaces_admissions() -> None:
    admission = Admission(
        AdmissionConfig(
            max_concurrent=100, queue_size=10, queue_timeout_secs=5, tokens_per_second=20
        )
    )
    admission.tokens = 0.0
    started = time.monotonic()
    for _ in range(3):
        await admission.acquire()
    assert time.monotonic() - started >= 0.1  # three tokens at 20/s need ~150 ms


async def test_an_admitted_waiter_whose_client_left_hands_its_slot_on() -> None:
    admission = Admission(AdmissionConfig(max_concurrent=1, queue_size=5, queue_timeout_secs=5))
    await admission.acquire()
    leaving = asyncio.ensure_future(admission.acquire())
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.sleep(0)
    admission.release()
    await asyncio.wait_for(admission.acquire(), 1)  # the slot was not lost


def test_health_transitions_follow_the_thresholds() -> None:
    checker = HealthChecker(HealthConfig(failure_threshold=3, success_threshold=2), tuple)
    worker = make_worker("http://w")
    for ok, healthy in (
        (False, True),
        (False, True),
        (True, True),
        (False, True),
        (False, True),
        (False, False),
        (True, False),
        (True, True),
    ):
        checker.apply(worker, ok)
        assert worker.state.healthy is healthy


async def test_a_probe_that_raises_fails_its_worker_and_the_round_goes_on() -> None:
    def raises(request: MockRequest) -> MockResponse:
        raise RuntimeError("a bug in a probe")

    good, bad = make_worker("http://good"), make_worker("http://bad", handler=raises)
    checked: dict[str, bool] = {}
    both = asyncio.Event()

    def on_check(worker: Worker, ok: bool) -> None:
        checked[worker.url] = ok
        if len(checked) == 2:
            both.set()

    config = HealthConfig(interval_secs=0.01, failure_threshold=1)
    checker = HealthChecker(config, lambda: (good, bad), on_check=on_check)
    checker.start()
    await asyncio.wait_for(both.wait(), 5)
    await checker.stop()
    assert checked == {"http://good": True, "http://bad": False}
    assert good.state.healthy and not bad.state.healthy


# --- ejection time backs off ----------------------------------------------------------------


def test_each_consecutive_opening_lasts_twice_the_last_up_to_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(time, "monotonic", lambda: 1000.0)
    worker = make_worker("http://w")
    breaker = breaker_for(worker, failure_threshold=1, base_open_secs=1, timeout_secs=5)
    durations = []
    breaker.record(False)
    for _ in range(5):
        durations.append(breaker.open_secs)
        breaker.health_passed()  # half-open; its probe fails:
        breaker.record(False)
    assert state_of(breaker) is State.OPEN
    assert durations == [1, 2, 4, 5, 5]
    assert breaker.ejections == 6


def test_the_openings_count_afresh_once_the_circuit_stayed_closed_as_long_as_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    worker = make_worker("http://w")
    breaker = breaker_for(
        worker, failure_threshold=1, success_threshold=1, base_open_secs=1, timeout_secs=8
    )

    def open_then_close() -> float:
        breaker.record(False)
        assert state_of(breaker) is State.OPEN
        opened_for = breaker.open_secs
        breaker.health_passed()
        breaker.record(True)
        assert state_of(breaker) is State.CLOSED
        return opened_for

    assert open_then_close() == 1
    clock[0] += 7.9  # closed for less than the cap: the next opening is consecutive
    assert open_then_close() == 2
    clock[0] += 7.9
    assert open_then_close() == 4
    clock[0] += 8  # closed for the cap: forgiven
    assert open_then_close() == 1
    assert breaker.ejections == 1


async def test_the_open_timer_waits_the_backed_off_time() -> None:
    loop = asyncio.get_running_loop()
    half_open = asyncio.Event()
    worker = make_worker("http://w")

    def moved(breaker: CircuitBreaker, old: State, new: State) -> None:
        if new is State.HALF_OPEN:
            half_open.set()

    worker.state.breaker = breaker = CircuitBreaker(
        BreakerConfig(failure_threshold=1, base_open_secs=0.02, timeout_secs=10), moved
    )
    for expected in (0.02, 0.04, 0.08):
        half_open.clear()
        breaker.record(False)  # opens (from closed, then from half-open)
        opened = loop.time()
        await asyncio.wait_for(half_open.wait(), 5)
        assert loop.time() - opened >= expected - 0.002


def test_a_cap_below_the_base_caps_the_first_opening_too() -> None:
    worker = make_worker("http://w")
    breaker = breaker_for(worker, failure_threshold=1, timeout_secs=0.5)  # base 2 s by default
    breaker.record(False)
    assert breaker.open_secs == 0.5


# --- a passing health check lets an open breaker probe ---------------------------------------


def test_a_passing_health_check_half_opens_an_open_breaker_at_once() -> None:
    checker = HealthChecker(HealthConfig(), tuple)
    worker = make_worker("http://w")
    breaker = breaker_for(worker, failure_threshold=1, timeout_secs=60)
    breaker.record(False)
    checker.apply(worker, False)
    assert state_of(breaker) is State.OPEN and not worker.is_available
    checker.apply(worker, True)
    assert state_of(breaker) is State.HALF_OPEN and worker.is_available
    checker.apply(worker, True)
    assert state_of(breaker) is State.HALF_OPEN  # only requests close it


# --- panic threshold -----------------------------------------------------------------------


def fleet_of(healthy: int, opened: int, unhealthy: int = 0) -> list[Worker]:
    """``healthy`` healthy workers of which ``opened`` have an open breaker, then
    ``unhealthy`` unhealthy ones with an open breaker."""
    workers = []
    for i in range(healthy + unhealthy):
        worker = make_worker(f"http://w{i}", models=("m",), healthy=i < healthy)
        breaker = breaker_for(worker, failure_threshold=1)
        if i < opened or i >= healthy:
            breaker.record(False)
        workers.append(worker)
    return workers


@pytest.mark.parametrize(
    ("healthy", "opened", "unhealthy", "threshold", "panic"),
    [
        (2, 1, 0, 0.5, False),  # 1 of 2 left in: not below one half
        (3, 1, 0, 0.5, False),
        (3, 2, 0, 0.5, True),  # 1 of 3
        (4, 2, 0, 0.5, False),
        (4, 3, 0, 0.5, True),
        (10, 7, 0, 0.3, False),  # 3 of 10 is not below 0.3
        (10, 8, 0, 0.3, True),
        (2, 1, 5, 0.5, False),  # unhealthy workers are not counted
        (1, 1, 0, 0.5, True),  # a single worker: its breaker alone would strand the model
        (3, 3, 0, 0.0, False),  # 0 turns panic off
        (0, 0, 3, 0.5, False),  # nothing healthy: nothing to route to anyway
        (3, 0, 0, 1.0, False),
        (3, 1, 0, 1.0, True),
    ],
)
def test_panic_when_the_share_left_in_falls_below_the_threshold(
    healthy: int, opened: int, unhealthy: int, threshold: float, panic: bool
) -> None:
    assert in_panic(fleet_of(healthy, opened, unhealthy), threshold) is panic


class Answers:
    """What each worker answers, by URL: a status, or an UpstreamError kind to fail with
    (connect, io, timeout). Changeable while the gateway runs."""

    def __init__(self, answers: list[int | str]) -> None:
        self.by_url = {f"http://w{i}:1": answer for i, answer in enumerate(answers)}

    def __call__(self, request: MockRequest) -> MockResponse:
        answer = self.by_url[request.url.split("/v1/", 1)[0]]
        if isinstance(answer, str):
            raise UpstreamError(answer, "scripted failure")
        return MockResponse(answer, [(b"content-type", b"application/json")], b"{}")


class Fleet:
    """A gateway (no sockets) in front of one worker per answer, all serving model "m"."""

    def __init__(self, gw: Gateway, answers: Answers, network: Workers) -> None:
        self.gw = gw
        self.answers = answers
        self.network = network
        self.workers = [gw.fleet.registry.get_by_url(url) for url in answers.by_url]

    def calls(self, i: int) -> int:
        return len(self.network.requests(f"http://w{i}:1"))


async def fleet(*answers: int | str, panic: float = 0.5, failure_threshold: int = 10) -> Fleet:
    scripted = Answers(list(answers))
    network = Workers(scripted)
    gw = gateway(
        tuple(scripted.by_url),
        network=network,
        retry=RetryConfig(initial_backoff_ms=0, max_backoff_ms=0),  # 5 attempts, no waiting
        breaker=BreakerConfig(failure_threshold=failure_threshold, panic_threshold=panic),
    )
    await ready(gw)
    result = Fleet(gw, scripted, network)
    assert all(w is not None for w in result.workers)
    return result


async def send_request(fleet: Fleet, request_id: str = "req") -> int:
    """One non-streamed completion through the gateway; the status the client got."""
    headers = [(b"x-request-id", request_id.encode())]
    return (await call(fleet.gw.app, "POST", "/v1/completions", b'{"prompt": "x"}', headers)).status


def available(workers: list[Worker | None]) -> list[bool]:
    return [w is not None and w.is_available for w in workers]


def breaker(worker: Worker | None) -> CircuitBreaker:
    assert worker is not None and worker.state.breaker is not None
    return worker.state.breaker


async def test_a_model_whose_breakers_leave_too_few_workers_in_ignores_them() -> None:
    f = await fleet(200, 200, 200, failure_threshold=1)
    gw, workers = f.gw, f.workers
    panic_gauge = 'shunter_breaker_panic{model="m",worker_type="regular"}'
    breaker(workers[0]).record(False)
    assert available(workers) == [False, True, True]  # 2 of 3 left in
    assert f"{panic_gauge} 0.0" in generate_latest(gw.metrics.registry).decode()
    breaker(workers[1]).record(False)
    assert available(workers) == [True, True, True]  # 1 of 3: panic
    assert gw.fleet.ejection.panicking == {("m", WorkerType.REGULAR)}
    assert f"{panic_gauge} 1.0" in generate_latest(gw.metrics.registry).decode()
    # A health flip decides again: worker 0 is down, so 1 of the 2 healthy is left in.
    for _ in range(gw.config.health.failure_threshold):
        gw.fleet.health.apply(workers[0], False)  # type: ignore[arg-type]
    assert available(workers) == [False, False, True]
    assert gw.fleet.ejection.panicking == set()
    # So does a worker leaving: worker 2 gone, worker 1 alone and open: panic again.
    gw.fleet.remove("http://w2:1")
    assert available(workers) == [False, True, False]
    # And a breaker transition: worker 1 half-opens on a passing check, so no panic.
    gw.fleet.health.apply(workers[1], True)  # type: ignore[arg-type]
    assert breaker(workers[1]).state is State.HALF_OPEN
    assert gw.fleet.ejection.panicking == set() and available(workers) == [False, True, False]
    assert f"{panic_gauge} 0.0" in generate_latest(gw.metrics.registry).decode()
    await gw.close()


async def test_entering_and_leaving_panic_are_logged_once_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    f = await fleet(200, 200, failure_threshold=1)
    caplog.set_level("INFO", "shunter.breaker")
    for worker in f.workers:
        breaker(worker).record(False)
        breaker(worker).record(False)
    for worker in f.workers:
        breaker(worker).reset()
    messages = [r.getMessage() for r in caplog.records if "panic" in r.getMessage()]
    assert len(messages) == 2 and "ignored" in messages[0] and "over" in messages[1]
    await f.gw.close()


async def test_a_lone_worker_is_served_through_its_open_breaker_unless_panic_is_off() -> None:
    f = await fleet(500, failure_threshold=1)
    (worker,) = f.workers
    breaker(worker).record(False)
    assert breaker(worker).state is State.OPEN
    assert available(f.workers) == [True]  # panic: the model's only healthy worker is tried
    assert await send_request(f) == 500  # the worker's own answer, not a 503
    f.answers.by_url["http://w0:1"] = 200
    assert await send_request(f) == 200
    await f.gw.close()
    f = await fleet(200, failure_threshold=1, panic=0)
    breaker(f.workers[0]).record(False)
    assert available(f.workers) == [False]
    assert await send_request(f) == 503
    await f.gw.close()


# --- a request's attempts count once; a poison request against no worker -------------------


async def test_a_request_counts_once_against_each_worker_it_failed_on() -> None:
    f = await fleet(500)
    assert await send_request(f) == 500
    assert f.calls(0) == 5  # every attempt went to the only worker
    assert breaker(f.workers[0]).outcomes == {"success": 0, "failure": 1}
    await f.gw.close()
    f = await fleet("connect", "connect")
    assert await send_request(f) == 502
    assert sorted([f.calls(0), f.calls(1)]) == [2, 3]
    assert [breaker(w).outcomes["failure"] for w in f.workers] == [1, 1]
    await f.gw.close()


async def test_a_poison_request_counts_against_no_worker_that_answered_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    f = await fleet(500, 500, 500, failure_threshold=2)
    for i in range(3):
        assert await send_request(f, f"poison-{i}") == 500
    calls = [f.calls(i) for i in range(3)]
    assert sum(calls) == 15 and all(calls)
    for worker in f.workers:
        assert breaker(worker).state is State.CLOSED and breaker(worker).outcomes["failure"] == 0
    logged = [r for r in caplog.records if r.getMessage().startswith("poison request")]
    assert [r.request_id for r in logged] == ["poison-0", "poison-1", "poison-2"]  # type: ignore[attr-defined]
    for url in f.answers.by_url:
        f.answers.by_url[url] = 200
    assert [await send_request(f) for _ in range(3)] == [200] * 3
    await f.gw.close()


async def test_a_poison_request_still_counts_against_a_worker_that_did_not_answer() -> None:
    f = await fleet(500, 500, "connect")
    assert await send_request(f) == 500
    assert [breaker(w).outcomes["failure"] for w in f.workers] == [0, 0, 1]
    await f.gw.close()


def test_a_request_answered_in_the_end_is_not_poison() -> None:
    a, b, c = (make_worker(f"http://{n}") for n in "abc")
    for worker in (a, b, c):
        breaker_for(worker)
    verdict = Verdict()
    verdict.answered(a, 500)
    verdict.answered(b, 503)
    verdict.answered(a, 500)
    verdict.relayed(c, 200, "r")
    verdict.settle("r")  # once only
    outcomes = [w.state.breaker.outcomes for w in (a, b, c)]  # type: ignore[union-attr]
    assert outcomes == [
        {"success": 0, "failure": 1},
        {"success": 0, "failure": 1},
        {"success": 1, "failure": 0},
    ]


def test_a_request_that_ends_busy_after_two_refusals_is_poison() -> None:
    a, b, c = (make_worker(f"http://{n}") for n in "abc")
    for worker in (a, b, c):
        breaker_for(worker)
    verdict = Verdict()
    verdict.answered(a, 500)
    verdict.answered(b, 500)
    verdict.relayed(c, 429, "r")  # the last attempt: the client gets a 429, not an answer
    outcomes = [w.state.breaker.outcomes for w in (a, b, c)]  # type: ignore[union-attr]
    assert outcomes == [
        {"success": 0, "failure": 0},
        {"success": 0, "failure": 0},
        {"success": 1, "failure": 0},
    ]


def test_the_breaker_flags_are_read() -> None:
    breaker = serve_config(["--cb-base-open-secs", "3", "--cb-panic-threshold", "0.25"]).breaker
    assert (breaker.base_open_secs, breaker.panic_threshold) == (3, 0.25)
    defaults = serve_config([]).breaker
    assert defaults.base_open_secs == 2 and defaults.panic_threshold == 0.5
    assert defaults.timeout_secs == 60
    for bad in (("--cb-panic-threshold", "1.5"), ("--cb-base-open-secs", "0")):
        with pytest.raises(SystemExit):
            serve_config(bad)
