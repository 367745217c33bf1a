"""A per-worker circuit breaker: closed -> open -> half-open -> closed, as smg (inventory §4.2).

- Closed: requests flow. ``failure_threshold`` consecutive failures open it, provided they
  all fall within ``window_secs`` (smg validates its window and ignores it; here a failure
  streak older than the window starts over, so rare failures never add up to an outage).
- Open: the worker is out of selection. After ``timeout_secs`` it turns half-open (a timer,
  so readers only ever look at a flag).
- Half-open: requests flow again; ``success_threshold`` consecutive successes close it, one
  failure opens it again.

``worker.breaker_open`` mirrors "open" so ``worker.is_available`` stays an attribute read.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass


class State(enum.Enum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 10
    success_threshold: int = 3
    timeout_secs: float = 60.0
    window_secs: float = 120.0
    disabled: bool = False

    def validate(self) -> BreakerConfig:
        if self.failure_threshold < 1 or self.success_threshold < 1:
            raise ValueError("--cb-failure-threshold and --cb-success-threshold must be >= 1")
        if self.timeout_secs <= 0 or self.window_secs <= 0:
            raise ValueError("--cb-timeout-duration-secs and --cb-window-duration-secs must be > 0")
        return self


Transition = Callable[["CircuitBreaker", State, State], None]


class CircuitBreaker:
    __slots__ = ("_streak_started", "_timer", "config", "consecutive_failures",
                 "consecutive_successes", "on_change", "outcomes", "set_open", "state")  # fmt: skip

    def __init__(
        self,
        config: BreakerConfig,
        set_open: Callable[[bool], None],
        on_change: Transition | None = None,
    ) -> None:
        self.config = config
        self.set_open = set_open
        self.on_change = on_change
        self.state = State.CLOSED
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self.outcomes = {"success": 0, "failure": 0}
        self._streak_started = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def record(self, success: bool) -> None:
        if self.config.disabled:
            return
        if success:
            self.outcomes["success"] += 1
            self.consecutive_failures = 0
            self.consecutive_successes += 1
            if (
                self.state is State.HALF_OPEN
                and self.consecutive_successes >= self.config.success_threshold
            ):
                self._move(State.CLOSED)
            return
        self.outcomes["failure"] += 1
        now = time.monotonic()
        self.consecutive_successes = 0
        if self.consecutive_failures == 0 or now - self._streak_started > self.config.window_secs:
            self._streak_started = now
            self.consecutive_failures = 0
        self.consecutive_failures += 1
        if self.state is State.HALF_OPEN or (
            self.state is State.CLOSED
            and self.consecutive_failures >= self.config.failure_threshold
        ):
            self._move(State.OPEN)

    def _move(self, new: State) -> None:
        old, self.state = self.state, new
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if new is State.OPEN:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                self._timer = loop.call_later(self.config.timeout_secs, self._half_open)
        self.set_open(new is State.OPEN)
        if self.on_change is not None:
            self.on_change(self, old, new)

    def _half_open(self) -> None:
        self._timer = None
        if self.state is State.OPEN:
            self._move(State.HALF_OPEN)

    def reset(self) -> None:
        if self.state is not State.CLOSED:
            self._move(State.CLOSED)
