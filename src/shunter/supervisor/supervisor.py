"""Keep N child processes running: restart a crashed one (with backoff), and on a signal
forward it to every child and wait until all have exited.

The supervisor knows nothing of what its children are: ``spawn(index)`` starts the
process for slot ``index``. A child that exits while no stop was asked for has crashed,
whatever its exit code: it is restarted after a backoff that doubles at each crash in a
row (0.5 s, 1 s, 2 s ... up to 10 s) and goes back to the first step once an incarnation
has lived ``stable_secs``. So a child that cannot start (a bad flag, a port taken) costs
one attempt every 10 s, logged, and a child that crashes once a day is back in 0.5 s.

On stop, the signal received (SIGTERM or SIGINT) is sent to every live child, each of
which then drains with the gateway's three-phase shutdown; a slot waiting out a backoff
is not restarted. ``run`` returns 0 when every child exited with 0, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("shunter.supervisor")


class Child(Protocol):
    """What the supervisor needs of a started process (``asyncio.subprocess.Process`` is one)."""

    @property
    def pid(self) -> int: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...


Spawn = Callable[[int], Awaitable[Child]]


@dataclass(frozen=True)
class RestartPolicy:
    initial_backoff_secs: float = 0.5
    max_backoff_secs: float = 10.0
    stable_secs: float = 30.0  # an incarnation that lived this long resets the backoff

    def next_backoff(self, previous: float | None, lived_secs: float) -> float:
        """The wait before restarting a child that crashed after ``lived_secs``."""
        if previous is None or lived_secs >= self.stable_secs:
            return self.initial_backoff_secs
        return min(previous * 2, self.max_backoff_secs)


class Supervisor:
    def __init__(
        self,
        count: int,
        spawn: Spawn,
        policy: RestartPolicy = RestartPolicy(),
        restarted: Callable[[int], None] = lambda index: None,
    ) -> None:
        self.count = count
        self.spawn = spawn
        self.policy = policy
        self.restarted = restarted  # told before a crashed slot's child is started again
        self.children: dict[int, Child] = {}  # slot -> its live child
        self.restarts = 0
        self.stopping: int | None = None  # the signal received, once one was
        self._stopped = asyncio.Event()

    async def run(self) -> int:
        """Start the children, keep them until ``stop``, return the exit code."""
        codes = await asyncio.gather(*(self._keep(index) for index in range(self.count)))
        failed = {index: code for index, code in enumerate(codes) if code != 0}
        if failed:
            log.warning("gateway processes did not exit cleanly", extra={"exit_codes": failed})
        return 1 if failed else 0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Forward ``sig`` to every live child; none is started again."""
        self.stopping = sig
        self._stopped.set()
        log.info(
            "stopping gateway processes",
            extra={
                "signal": signal.Signals(sig).name,
                "pids": [child.pid for child in self.children.values()],
            },
        )
        for child in list(self.children.values()):
            _signal(child, sig)

    async def _keep(self, index: int) -> int:
        """Run slot ``index`` until stopped; its last child's exit code."""
        backoff: float | None = None
        while True:
            child = await self.spawn(index)
            self.children[index] = child
            if self.stopping is not None:  # the signal came while it was starting
                _signal(child, self.stopping)
            started = time.monotonic()
            log.info("gateway process started", extra={"index": index, "pid": child.pid})
            code = await child.wait()
            del self.children[index]
            if self.stopping is not None:
                log.info(
                    "gateway process exited",
                    extra={"index": index, "pid": child.pid, "exit_code": code},
                )
                return code
            lived = time.monotonic() - started
            backoff = self.policy.next_backoff(backoff, lived)
            log.error(
                "gateway process exited unexpectedly; restarting it",
                extra={
                    "index": index,
                    "pid": child.pid,
                    "exit_code": code,
                    "lived_secs": round(lived, 3),
                    "backoff_secs": backoff,
                },
            )
            try:
                await asyncio.wait_for(self._stopped.wait(), backoff)
                return code  # stopped during the backoff: nothing to restart
            except TimeoutError:
                pass
            self.restarts += 1
            self.restarted(index)


def _signal(child: Child, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it has just exited: its wait() returns
        child.send_signal(sig)
