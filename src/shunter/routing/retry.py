"""Retry settings and backoff, as smg's.

``max_retries`` counts every attempt, the first included (smg's meaning of the flag). The
delay before attempt k+1 is ``min(initial * multiplier**k, max)`` scaled by a random factor in
``[1 - jitter, 1 + jitter]``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryConfig:
    max_retries: int = 5
    initial_backoff_ms: float = 50.0
    max_backoff_ms: float = 30_000.0
    backoff_multiplier: float = 1.5
    jitter_factor: float = 0.2
    disabled: bool = False

    @property
    def attempts(self) -> int:
        return 1 if self.disabled else max(1, self.max_retries)

    def validate(self) -> RetryConfig:
        if self.max_retries < 1:
            raise ValueError("--retry-max-retries must be >= 1 (it counts the first attempt)")
        if self.initial_backoff_ms < 0 or self.max_backoff_ms < self.initial_backoff_ms:
            raise ValueError("--retry-max-backoff-ms must be >= --retry-initial-backoff-ms >= 0")
        if self.backoff_multiplier < 1:
            raise ValueError("--retry-backoff-multiplier must be >= 1")
        if not 0 <= self.jitter_factor <= 1:
            raise ValueError("--retry-jitter-factor must be between 0 and 1")
        return self

    def backoff_secs(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        base = min(self.initial_backoff_ms * self.backoff_multiplier**attempt, self.max_backoff_ms)
        jitter = (rng or random).uniform(-self.jitter_factor, self.jitter_factor)
        return max(0.0, base * (1 + jitter)) / 1000
