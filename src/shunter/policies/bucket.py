"""``bucket``: each worker owns a range of prompt lengths; ranges follow the traffic.

As smg's bucket policy, which it offers for PD prefill workers; here it
routes any model's workers. Initially ``[0, 4096)`` characters is split evenly (the last
worker also takes everything longer). Every ``bucket_adjust_interval_secs`` the boundaries
move so that each worker's range carried about the same number of characters in the last
interval. If the characters routed per worker in that window are imbalanced (the
``balance_*`` thresholds), the least-burdened worker takes the request instead.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field

from shunter.aio.periodic import Periodic
from shunter.fleet.registry import Workers
from shunter.fleet.worker import Worker
from shunter.policies.base import Decision, Policy, RouteRequest

INITIAL_MAX_CHARS = 4096


@dataclass
class _Buckets:
    workers: Workers
    urls: list[str]
    upper: list[int]  # exclusive upper bound of each worker's range but the last
    window: deque[tuple[float, str, int]] = field(default_factory=deque)
    chars: dict[str, int] = field(default_factory=dict)


class BucketPolicy(Policy):
    name = "bucket"
    needs_text = True

    def __init__(
        self,
        adjust_interval_secs: float = 5.0,
        balance_abs_threshold: int = 32,
        balance_rel_threshold: float = 1.0001,
    ) -> None:
        self.adjust_interval_secs = adjust_interval_secs
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.models: dict[str, _Buckets] = {}
        self._adjuster = Periodic("bucket boundaries", adjust_interval_secs, self.adjust)

    def _buckets(self, model: str, workers: Workers) -> _Buckets:
        state = self.models.get(model)
        if state is None or state.workers is not workers:
            urls = sorted(w.url for w in workers)
            step = INITIAL_MAX_CHARS // len(urls)
            upper = [step * (i + 1) for i in range(len(urls) - 1)]
            state = _Buckets(workers, urls, upper)
            if model in self.models:  # keep the traffic history across fleet changes
                state.window = self.models[model].window
            self.models[model] = state
        return state

    def select(self, workers: Workers, request: RouteRequest) -> Worker | None:
        return self.decide(workers, request).worker

    def decide(self, workers: Workers, request: RouteRequest) -> Decision:
        """Reasons: ``bucket`` (the length's range owner), ``load_override`` (characters
        routed were imbalanced: the least burdened took it), ``fallback`` (the owner is
        unavailable: the least burdened available worker took it)."""
        if not workers:
            return Decision(None, "bucket")
        state = self._buckets(request.model, workers)
        length = len(request.text or "")
        by_url = {w.url: w for w in workers if w.state.available}
        if not by_url:
            return Decision(None, "bucket")
        self._expire(state, time.monotonic())
        loads = [state.chars.get(url, 0) for url in by_url]
        low, high = min(loads), max(loads)
        if high - low > self.balance_abs_threshold and high > low * self.balance_rel_threshold:
            url, reason = min(by_url, key=lambda u: state.chars.get(u, 0)), "load_override"
        else:
            url, reason = state.urls[bisect.bisect_right(state.upper, length)], "bucket"
            if url not in by_url:
                url, reason = min(by_url, key=lambda u: state.chars.get(u, 0)), "fallback"
        state.window.append((time.monotonic(), url, length))
        state.chars[url] = state.chars.get(url, 0) + length
        return Decision(by_url[url], reason)

    def _expire(self, state: _Buckets, now: float) -> None:
        cutoff = now - self.adjust_interval_secs
        while state.window and state.window[0][0] < cutoff:
            _, url, length = state.window.popleft()
            state.chars[url] -= length

    def adjust(self) -> None:
        """Move every model's boundaries so each range carried an equal share of characters."""
        for state in self.models.values():
            lengths = sorted(length for _, _, length in state.window)
            total = sum(lengths)
            count = len(state.urls)
            if not lengths or count < 2 or total == 0:
                continue
            upper: list[int] = []
            running, target = 0, total / count
            for length in lengths:
                running += length
                while len(upper) < count - 1 and running >= target * (len(upper) + 1):
                    upper.append(length + 1)
            while len(upper) < count - 1:
                upper.append((upper[-1] if upper else lengths[-1]) + 1)
            state.upper = upper

    def start(self) -> None:
        self._adjuster.start()

    async def stop(self) -> None:
        await self._adjuster.stop()
