"""Admission control for inference routes (smg's limiter and queue).

Two limits, both must allow a request to start:

- concurrency: at most ``max_concurrent`` requests in progress; a slot is returned when the
  response ends, a stream included, or the client leaves;
- rate, only when ``tokens_per_second`` is given (``--rate-limit-tokens-per-second``): a
  token bucket of ``max_concurrent`` tokens refilled at that rate, one token per admission.
  (smg refills at the concurrency limit by default and also returns a token when a request
  ends, which mixes the two limits; here each flag means one thing.)

A request that cannot start waits in a FIFO queue of ``queue_size`` places for at most
``queue_timeout_secs``: a full queue answers 429, a timeout 408 (smg sends both with an
empty body; here they carry the error envelope).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass


class QueueFull(Exception):
    """No place left in the admission queue (the API answers 429)."""


class QueueTimeout(Exception):
    """A request waited its ``queue_timeout_secs`` without being admitted (408)."""


@dataclass(frozen=True)
class AdmissionConfig:
    max_concurrent: int = -1  # <= 0: no limit
    queue_size: int = 100
    queue_timeout_secs: float = 60.0
    tokens_per_second: float | None = None  # None: no rate limit, only the concurrency limit

    @property
    def enabled(self) -> bool:
        return self.max_concurrent > 0

    def validate(self) -> AdmissionConfig:
        if self.queue_size < 0:
            raise ValueError("--queue-size must be >= 0")
        if self.enabled and self.queue_size > 0 and self.queue_timeout_secs <= 0:
            raise ValueError("--queue-timeout-secs must be > 0")
        if self.tokens_per_second is not None and self.tokens_per_second <= 0:
            raise ValueError("--rate-limit-tokens-per-second must be > 0")
        return self


class Admission:
    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self.free_slots = config.max_concurrent
        self.capacity = float(config.max_concurrent)
        self.rate = config.tokens_per_second or 0.0  # 0: no rate limit
        self.tokens = self.capacity
        self._refilled_at = time.monotonic()
        self.queue: deque[asyncio.Future[None]] = deque()
        self._wakeup: asyncio.TimerHandle | None = None

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self._refilled_at) * self.rate)
        self._refilled_at = now

    def _can_start(self) -> bool:
        if self.free_slots <= 0:
            return False
        if not self.rate:
            return True
        self._refill()
        return self.tokens >= 1.0

    def _take(self) -> None:
        self.free_slots -= 1
        if self.rate:
            self.tokens -= 1.0

    async def acquire(self) -> None:
        """Wait for a slot and a token, or raise QueueFull / QueueTimeout (waited too long)."""
        if not self.queue and self._can_start():
            self._take()
            return
        if len(self.queue) >= self.config.queue_size:
            raise QueueFull
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue.append(waiter)
        self._schedule_refill()
        try:
            async with asyncio.timeout(self.config.queue_timeout_secs):  # wait_for: see wire/client
                await asyncio.shield(waiter)
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # admitted at the last moment
            waiter.cancel()
            self._forget(waiter)
            raise QueueTimeout from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # admitted, but the client left: hand the slot on
            else:
                waiter.cancel()
                self._forget(waiter)
            raise

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self.queue.remove(waiter)

    def release(self) -> None:
        self.free_slots += 1
        self._admit_waiting()

    def _admit_waiting(self) -> None:
        while self.queue and self._can_start():
            waiter = self.queue.popleft()
            if waiter.done():
                continue
            self._take()
            waiter.set_result(None)
        self._schedule_refill()

    def _schedule_refill(self) -> None:
        """With waiters blocked only by the rate limit, wake up when the next token is due."""
        if self._wakeup is not None or not self.queue or self.free_slots <= 0 or not self.rate:
            return
        self._refill()
        delay = max(0.0, (1.0 - self.tokens) / self.rate)
        self._wakeup = asyncio.get_running_loop().call_later(delay, self._on_refill)

    def _on_refill(self) -> None:
        self._wakeup = None
        self._admit_waiting()
