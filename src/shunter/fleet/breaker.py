"""A per-worker circuit breaker: closed -> open -> half-open -> closed, as smg's.

- Closed: requests flow. ``failure_threshold`` consecutive failures open it, provided they
  all fall within ``window_secs`` (smg validates its window and ignores it; here a failure
  streak older than the window starts over, so rare failures never add up to an outage).
- Open: the worker is out of selection. It turns half-open when its open time is up (a
  timer, so readers only ever look at a flag), or at once when a health check passes.
- Half-open: requests flow again; ``success_threshold`` consecutive successes close it, one
  failure opens it again.

How long a circuit stays open backs off, as an outlier ejection does: the first opening
lasts ``base_open_secs``, each further consecutive one twice the last, up to
``timeout_secs`` (smg's ``--cb-timeout-duration-secs``, which smg uses for every opening).
A worker that merely restarted is back within seconds instead of a minute, while one that
keeps failing is soon probed only once a minute. The openings count as consecutive until
the circuit has stayed closed for ``timeout_secs``.

The breaker knows nothing of routing: ``on_change`` hears every transition, and
``fleet/ejection.py`` decides from that whether the worker is excluded (``WorkerRuntime.exclude``).
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
    timeout_secs: float = 60.0  # the longest an opening lasts
    window_secs: float = 120.0
    disabled: bool = False
    # The first opening. 2 s: a worker that restarted or shed a burst is probed again
    # soon, and one that stays dead costs five failed probes (at 2, 6, 14, 30 and 62 s,
    # each one attempt retried elsewhere) before it is probed once a minute. In the
    # breakers chaos bench 1, 2 and 5 s all failed no request; 1 s failed more probes.
    base_open_secs: float = 2.0
    # Below this share of a model's healthy workers left by their breakers, the model's
    # breakers are ignored (fleet/ejection.py); 0 turns that off.
    panic_threshold: float = 0.5

    def validate(self) -> BreakerConfig:
        if self.failure_threshold < 1 or self.success_threshold < 1:
            raise ValueError("--cb-failure-threshold and --cb-success-threshold must be >= 1")
        if self.timeout_secs <= 0 or self.window_secs <= 0:
            raise ValueError("--cb-timeout-duration-secs and --cb-window-duration-secs must be > 0")
        if self.base_open_secs <= 0:
            raise ValueError("--cb-base-open-secs must be > 0")
        if not 0 <= self.panic_threshold <= 1:
            raise ValueError("--cb-panic-threshold must be between 0 and 1")
        return self


Transition = Callable[["CircuitBreaker", State, State], None]


class CircuitBreaker:
    __slots__ = (
        "_closed_since",
        "_streak_started",
        "_timer",
        "config",
        "consecutive_failures",
        "consecutive_successes",
        "ejections",
        "on_change",
        "open_secs",
        "outcomes",
        "state",
    )

    def __init__(self, config: BreakerConfig, on_change: Transition | None = None) -> None:
        self.config = config
        self.on_change = on_change
        self.state = State.CLOSED
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        self.ejections = 0  # consecutive openings so far
        self.open_secs = 0.0  # how long the current (or last) opening lasts
        self.outcomes = {"success": 0, "failure": 0}
        self._streak_started = 0.0
        self._closed_since = time.monotonic()
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

    def health_passed(self) -> None:
        """A health check passed: an open circuit turns half-open now, not when its time is
        up, so a worker that is back is tried again at the next check."""
        if self.state is State.OPEN:
            self._move(State.HALF_OPEN)

    def _move(self, new: State) -> None:
        old, self.state = self.state, new
        self.consecutive_failures = 0
        self.consecutive_successes = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = time.monotonic()
        if new is State.CLOSED:
            self._closed_since = now
        elif new is State.OPEN:
            config = self.config
            if old is State.CLOSED and now - self._closed_since >= config.timeout_secs:
                self.ejections = 0  # closed long enough: this opening starts afresh
            self.ejections += 1
            longer = config.base_open_secs if self.ejections == 1 else 2 * self.open_secs
            self.open_secs = min(longer, config.timeout_secs)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                self._timer = loop.call_later(self.open_secs, self._half_open)
        if self.on_change is not None:
            self.on_change(self, old, new)

    def _half_open(self) -> None:
        self._timer = None
        if self.state is State.OPEN:
            self._move(State.HALF_OPEN)

    def reset(self) -> None:
        self.ejections = 0
        self.open_secs = 0.0
        if self.state is not State.CLOSED:
            self._move(State.CLOSED)
