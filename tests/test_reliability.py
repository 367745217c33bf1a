"""Circuit breaker, retry backoff, admission control and health transitions, in isolation."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from shunter.core.breaker import BreakerConfig, CircuitBreaker, State
from shunter.core.health import HealthChecker, HealthConfig
from shunter.core.limiter import Admission, AdmissionConfig
from shunter.core.retry import RetryConfig
from shunter.core.worker import Worker
from shunter.protocols.errors import ApiError


def breaker_for(worker: Worker, **config: float) -> CircuitBreaker:
    def set_open(is_open: bool) -> None:
        worker.breaker_open = is_open

    worker.breaker = CircuitBreaker(BreakerConfig(**config), set_open)  # type: ignore[arg-type]
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
