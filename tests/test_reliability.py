"""Circuit breaker, retry backoff, admission control and health transitions, in isolation."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from prometheus_client import generate_latest

from shunter.aio.once import OnceCell
from shunter.cli import _config_from_args, build_parser
from shunter.config import GatewayConfig
from shunter.fleet.breaker import BreakerConfig, CircuitBreaker, State
from shunter.fleet.ejection import in_panic
from shunter.fleet.health import HealthChecker, HealthConfig
from shunter.fleet.worker import Worker
from shunter.protocols.errors import ApiError
from shunter.routing.limiter import Admission, AdmissionConfig
from shunter.routing.retry import RetryConfig
from shunter.routing.router import Inbound
from shunter.routing.verdict import Verdict
from shunter.server.state import GatewayState
from shunter.transport.base import FullResponse, HeaderPairs, UpstreamError


def breaker_for(worker: Worker, **config: float) -> CircuitBreaker:
    """A breaker whose opening excludes the worker (no panic: the worker is alone)."""

    def moved(breaker: CircuitBreaker, old: State, new: State) -> None:
        worker.breaker_open = new is State.OPEN

    worker.breaker = CircuitBreaker(BreakerConfig(**config), moved)  # type: ignore[arg-type]
    return worker.breaker


async def test_breaker_opens_after_consecutive_failures_then_half_opens_and_closes() -> None:
    worker = Worker(url="http://w", healthy=True)
    breaker = breaker_for(worker, failure_threshold=3, success_threshold=2, timeout_secs=0.05)
    breaker.record(False)
    breaker.record(False)
    breaker.record(True)  # a success breaks the streak
    breaker.record(False)
    breaker.record(False)
    assert breaker.state is State.CLOSED and worker.is_available
    breaker.record(False)
    assert breaker.state is State.OPEN and not worker.is_available
    await asyncio.sleep(0.1)
    assert breaker.state is State.HALF_OPEN and worker.is_available
    breaker.record(True)
    assert breaker.state is State.HALF_OPEN
    breaker.record(True)
    assert breaker.state is State.CLOSED


async def test_a_half_open_failure_opens_the_circuit_again() -> None:
    worker = Worker(url="http://w", healthy=True)
    breaker = breaker_for(worker, failure_threshold=1, timeout_secs=0.02)
    breaker.record(False)
    await asyncio.sleep(0.05)
    assert breaker.state is State.HALF_OPEN
    breaker.record(False)
    assert breaker.state is State.OPEN and worker.breaker_open


def test_failures_further_apart_than_the_window_do_not_add_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    worker = Worker(url="http://w", healthy=True)
    breaker = breaker_for(worker, failure_threshold=3, window_secs=10)
    for _ in range(5):
        breaker.record(False)
        clock[0] += 6  # two failures fit in a window, never three
    assert breaker.state is State.CLOSED
    breaker.record(False)
    breaker.record(False)
    assert breaker.state is State.OPEN


def test_a_disabled_breaker_never_opens() -> None:
    worker = Worker(url="http://w", healthy=True)
    breaker = breaker_for(worker, failure_threshold=1, disabled=True)
    for _ in range(10):
        breaker.record(False)
    assert breaker.state is State.CLOSED and worker.is_available


def test_backoff_grows_caps_and_jitters() -> None:
    config = RetryConfig(initial_backoff_ms=100, max_backoff_ms=300, backoff_multiplier=2,
                         jitter_factor=0.1)  # fmt: skip
    rng = random.Random(1)
    for attempt, base in ((0, 0.1), (1, 0.2), (2, 0.3), (5, 0.3)):
        delays = [config.backoff_secs(attempt, rng) for _ in range(200)]
        assert all(base * 0.9 - 1e-9 <= d <= base * 1.1 + 1e-9 for d in delays)
    assert RetryConfig(disabled=True).attempts == 1
    assert RetryConfig(max_retries=5).attempts == 5


async def test_admission_queues_then_answers_429_and_408() -> None:
    admission = Admission(AdmissionConfig(max_concurrent=1, queue_size=1, queue_timeout_secs=0.1))
    await admission.acquire()  # runs
    waiting = asyncio.ensure_future(admission.acquire())  # queued
    await asyncio.sleep(0)
    with pytest.raises(ApiError) as full:
        await admission.acquire()
    assert full.value.status == 429
    with pytest.raises(ApiError) as late:
        await waiting
    assert late.value.status == 408


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
    checker = HealthChecker(HealthConfig(failure_threshold=3, success_threshold=2), tuple, None)  # type: ignore[arg-type]
    worker = Worker(url="http://w", healthy=True)
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
        assert worker.healthy is healthy


# --- ejection time backs off ----------------------------------------------------------------


def test_each_consecutive_opening_lasts_twice_the_last_up_to_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(time, "monotonic", lambda: 1000.0)
    worker = Worker(url="http://w", healthy=True)
    breaker = breaker_for(worker, failure_threshold=1, base_open_secs=1, timeout_secs=5)
    durations = []
    breaker.record(False)
    for _ in range(5):
        durations.append(breaker.open_secs)
        breaker.health_passed()  # half-open; its probe fails:
        breaker.record(False)
    assert breaker.state is State.OPEN
    assert durations == [1, 2, 4, 5, 5]
    assert breaker.ejections == 6


def test_the_openings_count_afresh_once_the_circuit_stayed_closed_as_long_as_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    worker = Worker(url="http://w", healthy=True)
    breaker = breaker_for(
        worker, failure_threshold=1, success_threshold=1, base_open_secs=1, timeout_secs=8
    )

    def open_then_close() -> float:
        breaker.record(False)
        assert breaker.state is State.OPEN
        opened_for = breaker.open_secs
        breaker.health_passed()
        breaker.record(True)
        assert breaker.state is State.CLOSED
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
    worker = Worker(url="http://w", healthy=True)

    def moved(breaker: CircuitBreaker, old: State, new: State) -> None:
        if new is State.HALF_OPEN:
            half_open.set()

    worker.breaker = breaker = CircuitBreaker(
        BreakerConfig(failure_threshold=1, base_open_secs=0.02, timeout_secs=10), moved
    )
    for expected in (0.02, 0.04, 0.08):
        half_open.clear()
        breaker.record(False)  # opens (from closed, then from half-open)
        opened = loop.time()
        await asyncio.wait_for(half_open.wait(), 5)
        assert loop.time() - opened >= expected - 0.002


def test_a_cap_below_the_base_caps_the_first_opening_too() -> None:
    worker = Worker(url="http://w", healthy=True)
    breaker = breaker_for(worker, failure_threshold=1, timeout_secs=0.5)  # base 2 s by default
    breaker.record(False)
    assert breaker.open_secs == 0.5


# --- a passing health check lets an open breaker probe ---------------------------------------


def test_a_passing_health_check_half_opens_an_open_breaker_at_once() -> None:
    checker = HealthChecker(HealthConfig(), tuple, None)  # type: ignore[arg-type]
    worker = Worker(url="http://w", healthy=True)
    breaker = breaker_for(worker, failure_threshold=1, timeout_secs=60)
    breaker.record(False)
    checker.apply(worker, False)
    assert breaker.state is State.OPEN and not worker.is_available
    checker.apply(worker, True)
    assert breaker.state is State.HALF_OPEN and worker.is_available
    checker.apply(worker, True)
    assert breaker.state is State.HALF_OPEN  # only requests close it


# --- panic threshold -----------------------------------------------------------------------


def fleet_of(healthy: int, opened: int, unhealthy: int = 0) -> list[Worker]:
    """``healthy`` healthy workers of which ``opened`` have an open breaker, then
    ``unhealthy`` unhealthy ones with an open breaker."""
    workers = []
    for i in range(healthy + unhealthy):
        worker = Worker(url=f"http://w{i}", models=("m",), healthy=i < healthy)
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


class Scripted:
    """A worker's client that answers every request alike: with ``answer`` if it is a
    status, else by failing with that UpstreamError kind (connect, io, timeout)."""

    def __init__(self, answer: int | str = 200) -> None:
        self.answer = answer
        self.calls = 0

    async def request(
        self, method: str, url: str, headers: HeaderPairs, body: bytes | None
    ) -> FullResponse:
        self.calls += 1
        if isinstance(self.answer, str):
            raise UpstreamError(self.answer, "scripted failure")
        return FullResponse(self.answer, [("content-type", "application/json")], b"{}")

    async def close(self) -> None:
        pass


def gateway(
    *answers: int | str, panic: float = 0.5, failure_threshold: int = 10
) -> tuple[GatewayState, list[Worker], list[Scripted]]:
    """A gateway (no sockets) in front of one worker per answer, all serving model "m"."""
    config = GatewayConfig(
        prometheus_port=0,
        policy="round_robin",
        retry=RetryConfig(initial_backoff_ms=0, max_backoff_ms=0),  # 5 attempts, no waiting
        breaker=BreakerConfig(failure_threshold=failure_threshold, panic_threshold=panic),
    ).validate()
    state = GatewayState(config, client_factory=lambda settings: Scripted())  # type: ignore[arg-type,return-value]
    workers, clients = [], []
    for i, answer in enumerate(answers):
        worker = Worker(url=f"http://w{i}:1", models=("m",), healthy=True)
        client = Scripted(answer)

        async def create(client: Scripted = client) -> Scripted:
            return client

        worker.client_cell = OnceCell(create)  # type: ignore[arg-type]
        state.registry.register(worker)
        state.fleet_changed([worker], ())
        workers.append(worker)
        clients.append(client)
    return state, workers, clients


async def send_request(state: GatewayState, request_id: str = "req") -> int:
    """One non-streamed completion through the router; the status the client got."""

    async def send(message: dict[str, object]) -> None:
        pass

    async def receive() -> dict[str, object]:
        await asyncio.Event().wait()
        return {}

    request = Inbound(
        "POST",
        "/v1/completions",
        b"",
        [],
        b'{"prompt": "x"}',
        request_id,
        started=time.perf_counter(),
    )
    try:
        return await state.router.route(request, send, receive)  # type: ignore[arg-type]
    except ApiError as exc:
        return exc.status


def available(workers: list[Worker]) -> list[bool]:
    return [w.is_available for w in workers]


async def test_a_model_whose_breakers_leave_too_few_workers_in_ignores_them() -> None:
    state, workers, _ = gateway(200, 200, 200, failure_threshold=1)
    panic_gauge = 'shunter_breaker_panic{model="m"}'
    for worker in workers[:2]:
        assert worker.breaker is not None
    workers[0].breaker.record(False)  # type: ignore[union-attr]
    assert available(workers) == [False, True, True]  # 2 of 3 left in
    assert f"{panic_gauge} 0.0" in generate_latest(state.metrics.registry).decode()
    workers[1].breaker.record(False)  # type: ignore[union-attr]
    assert available(workers) == [True, True, True]  # 1 of 3: panic
    assert state.ejection.panicking == {"m"}
    assert f"{panic_gauge} 1.0" in generate_latest(state.metrics.registry).decode()
    # A health flip decides again: worker 0 is down, so 1 of the 2 healthy is left in.
    for _ in range(state.config.health.failure_threshold):
        state.health.apply(workers[0], False)
    assert available(workers) == [False, False, True]
    assert state.ejection.panicking == set()
    # So does a worker leaving: worker 2 gone, worker 1 alone and open: panic again.
    state.registry.remove(workers[2].url)
    state.fleet_changed((), [workers[2]])
    assert available(workers) == [False, True, False]
    # And a breaker transition: worker 1 half-opens on a passing check, so no panic.
    state.health.apply(workers[1], True)
    assert workers[1].breaker.state is State.HALF_OPEN  # type: ignore[union-attr]
    assert state.ejection.panicking == set() and available(workers) == [False, True, False]
    assert f"{panic_gauge} 0.0" in generate_latest(state.metrics.registry).decode()


async def test_entering_and_leaving_panic_are_logged_once_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, workers, _ = gateway(200, 200, failure_threshold=1)
    caplog.set_level("INFO", "shunter.breaker")
    for worker in workers:
        worker.breaker.record(False)  # type: ignore[union-attr]
        worker.breaker.record(False)  # type: ignore[union-attr]
    for worker in workers:
        worker.breaker.reset()  # type: ignore[union-attr]
    messages = [r.getMessage() for r in caplog.records if "panic" in r.getMessage()]
    assert len(messages) == 2 and "ignored" in messages[0] and "over" in messages[1]


async def test_a_lone_worker_is_served_through_its_open_breaker_unless_panic_is_off() -> None:
    state, (worker,), (client,) = gateway(500, failure_threshold=1)
    assert worker.breaker is not None
    worker.breaker.record(False)
    assert worker.breaker.state is State.OPEN
    assert worker.is_available  # panic: the model's only healthy worker is tried anyway
    assert await send_request(state) == 500  # the worker's own answer, not a 503
    client.answer = 200
    assert await send_request(state) == 200
    state, (worker,), _ = gateway(200, failure_threshold=1, panic=0)
    assert worker.breaker is not None
    worker.breaker.record(False)
    assert not worker.is_available
    assert await send_request(state) == 503


# --- a request's attempts count once; a poison request against no worker -------------------


async def test_a_request_counts_once_against_each_worker_it_failed_on() -> None:
    state, (worker,), (client,) = gateway(500)
    assert await send_request(state) == 500
    assert client.calls == 5  # every attempt went to the only worker
    assert worker.breaker is not None and worker.breaker.outcomes == {"success": 0, "failure": 1}
    state, workers, clients = gateway("connect", "connect")
    assert await send_request(state) == 502
    assert sorted(c.calls for c in clients) == [2, 3]
    assert [w.breaker.outcomes["failure"] for w in workers] == [1, 1]  # type: ignore[union-attr]


async def test_a_poison_request_counts_against_no_worker_that_answered_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state, workers, clients = gateway(500, 500, 500, failure_threshold=2)
    for i in range(3):
        assert await send_request(state, f"poison-{i}") == 500
    assert sum(c.calls for c in clients) == 15 and all(c.calls for c in clients)
    for worker in workers:
        assert worker.breaker is not None
        assert worker.breaker.state is State.CLOSED and worker.breaker.outcomes["failure"] == 0
    logged = [r for r in caplog.records if r.getMessage().startswith("poison request")]
    assert [r.request_id for r in logged] == ["poison-0", "poison-1", "poison-2"]  # type: ignore[attr-defined]
    for client in clients:
        client.answer = 200
    assert [await send_request(state) for _ in range(3)] == [200] * 3


async def test_a_poison_request_still_counts_against_a_worker_that_did_not_answer() -> None:
    state, workers, _ = gateway(500, 500, "connect")
    assert await send_request(state) == 500
    failures = [w.breaker.outcomes["failure"] for w in workers]  # type: ignore[union-attr]
    assert failures == [0, 0, 1]


def test_a_request_answered_in_the_end_is_not_poison() -> None:
    a, b, c = (Worker(url=f"http://{n}", healthy=True) for n in "abc")
    for worker in (a, b, c):
        breaker_for(worker)
    verdict = Verdict()
    verdict.answered(a, 500)
    verdict.answered(b, 503)
    verdict.answered(a, 500)
    verdict.relayed(c, 200, "r")
    verdict.settle("r")  # once only
    outcomes = [w.breaker.outcomes for w in (a, b, c)]  # type: ignore[union-attr]
    assert outcomes == [
        {"success": 0, "failure": 1},
        {"success": 0, "failure": 1},
        {"success": 1, "failure": 0},
    ]


def test_a_request_that_ends_busy_after_two_refusals_is_poison() -> None:
    a, b, c = (Worker(url=f"http://{n}", healthy=True) for n in "abc")
    for worker in (a, b, c):
        breaker_for(worker)
    verdict = Verdict()
    verdict.answered(a, 500)
    verdict.answered(b, 500)
    verdict.relayed(c, 429, "r")  # the last attempt: the client gets a 429, not an answer
    outcomes = [w.breaker.outcomes for w in (a, b, c)]  # type: ignore[union-attr]
    assert outcomes == [
        {"success": 0, "failure": 0},
        {"success": 0, "failure": 0},
        {"success": 1, "failure": 0},
    ]


def test_the_breaker_flags_are_read() -> None:
    parser, commands = build_parser()
    args = parser.parse_args(["serve", "--cb-base-open-secs", "3", "--cb-panic-threshold", "0.25"])
    breaker = _config_from_args(args, commands["serve"]).breaker
    assert (breaker.base_open_secs, breaker.panic_threshold) == (3, 0.25)
    defaults = _config_from_args(parser.parse_args(["serve"]), commands["serve"]).breaker
    assert defaults.base_open_secs == 2 and defaults.panic_threshold == 0.5
    assert defaults.timeout_secs == 60
    for bad in (("--cb-panic-threshold", "1.5"), ("--cb-base-open-secs", "0")):
        with pytest.raises(SystemExit):
            _config_from_args(parser.parse_args(["serve", *bad]), commands["serve"])
