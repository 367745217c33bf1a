"""What one request's attempts say about the workers it tried, told to their breakers once.

Feeding a breaker on every attempt lets one request speak many times: a request retried
five times on a worker counted five failures, so two requests could open a breaker with
the default threshold of 10. And a request that makes every worker fail (a poison input: a
prompt that crashes the model's code path) would open every breaker in turn, turning one
client's bad input into an outage for all. So the retry loop collects the attempts here and
the breakers hear them once, when the loop ends and before any body is relayed:

- a worker that failed this request counts one failure, however many times it was tried;
- a worker that answered (a status below 500, 408 and 429 included: it is up, if busy)
  counts one success;
- when no attempt succeeded and at least two distinct workers answered with a 5xx status,
  the request is poison: they were reachable and all refused this input, so those answers
  count against no worker (logged once, with the request id). Attempts that got no answer
  at all (no connection, a broken one, a timeout) still count: a dead worker is dead.

A stream that breaks after its first byte is a failure of its own, fed at once
(``stream_broke``).
"""

from __future__ import annotations

import logging

from shunter.fleet.worker import Worker
from shunter.routing.retry import RETRYABLE_STATUSES

log = logging.getLogger("shunter.breaker")


# One attempt's outcome, in order of how much it says against the worker. Plain ints: an
# enum member costs a class attribute lookup (~0.1 us) on every request.
ANSWERED = 0  # a status below 500
REFUSED = 1  # a 5xx status: reachable, but it failed this request
UNREACHABLE = 2  # no answer: no connection, a broken one, or a timeout


def _feed(worker: Worker, success: bool) -> None:
    breaker = worker.state.breaker
    if breaker is not None:
        breaker.record(success)


class Verdict:
    """One per request. Most requests take one attempt whose answer is relayed: for them
    ``relayed`` feeds the breaker at once and nothing else is kept. Measured in a timeit
    loop (a no-op call 27 ns): ~0.4 us per request over feeding the breaker directly,
    where collecting every attempt in a list cost ~0.9 us; a proxied request costs the
    gateway ~130 us of CPU (bench/README.md)."""

    __slots__ = ("served", "settled", "tried")

    def __init__(self) -> None:
        self.tried: list[tuple[Worker, int]] | None = None  # attempts not relayed, in order
        self.served = False  # the last attempt got an answer that ends the request well
        self.settled = False

    def answered(self, worker: Worker, status: int) -> None:
        """An answer the client will not get as it is: retried, or turned into an error."""
        self._add(worker, ANSWERED if status < 500 else REFUSED)
        self.served = status < 500 and status not in RETRYABLE_STATUSES

    def unreachable(self, worker: Worker) -> None:
        self._add(worker, UNREACHABLE)
        self.served = False

    def _add(self, worker: Worker, outcome: int) -> None:
        if self.tried is None:
            self.tried = []
        self.tried.append((worker, outcome))

    def relayed(self, worker: Worker, status: int, request_id: str) -> None:
        """This answer goes to the client: the retry loop is over, the breakers hear it."""
        if self.tried is None:  # the only attempt
            self.settled = True
            _feed(worker, status < 500)
            return
        self.answered(worker, status)
        self.settle(request_id)

    def settle(self, request_id: str) -> None:
        """Feed each worker's breaker its one outcome; later calls do nothing."""
        if self.settled:
            return
        self.settled = True
        tried = self.tried
        if tried is None:
            return
        worst: dict[Worker, int] = {}
        for worker, outcome in tried:
            worst[worker] = max(outcome, worst.get(worker, ANSWERED))
        refused_by = {worker for worker, outcome in tried if outcome == REFUSED}
        poison = not self.served and len(refused_by) >= 2
        if poison:
            log.warning(
                "poison request: every worker that answered it failed; not held against them",
                extra={"request_id": request_id, "workers": sorted(w.url for w in refused_by)},
            )
        for worker, outcome in worst.items():
            if not (poison and outcome == REFUSED):
                _feed(worker, outcome == ANSWERED)

    @staticmethod
    def stream_broke(worker: Worker) -> None:
        """The worker broke off a stream the client had started to receive."""
        _feed(worker, False)

    @staticmethod
    def after(worker: Worker, success: bool) -> None:
        """An outcome known only once the request's answer is out (a prefill that finished
        behind its decode): fed at once."""
        _feed(worker, success)
