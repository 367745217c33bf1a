"""The supervisor of ``--workers N``, on fake children: restarts with backoff, signal
forwarding, the exit code. (The real processes: tests/system/test_workers_processes.py.)"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import time

import pytest

from shunter.supervisor.supervisor import RestartPolicy, Supervisor

FAST = RestartPolicy(initial_backoff_secs=0.01, max_backoff_secs=0.04, stable_secs=60)


class FakeChild:
    """A process that exits when told to (``exit``), or with ``on_signal``'s code when
    signalled; records the signals it got."""

    pids = iter(range(1000, 10_000))

    def __init__(self, on_signal: int | None = 0) -> None:
        self.pid = next(self.pids)
        self.on_signal = on_signal
        self.signals: list[int] = []
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def wait(self) -> int:
        return await self._exited

    def exit(self, code: int) -> None:
        if not self._exited.done():
            self._exited.set_result(code)

    def send_signal(self, sig: int) -> None:
        if self._exited.done():
            raise ProcessLookupError
        self.signals.append(sig)
        if self.on_signal is not None:
            self.exit(self.on_signal)


class Spawner:
    def __init__(self, **child: int | None) -> None:
        self.children: dict[int, list[FakeChild]] = {}
        self.times: dict[int, list[float]] = {}
        self.child = child
        self.spawned = asyncio.Event()

    async def __call__(self, index: int) -> FakeChild:
        child = FakeChild(**self.child)
        self.children.setdefault(index, []).append(child)
        self.times.setdefault(index, []).append(time.monotonic())
        self.spawned.set()
        return child

    async def until(self, index: int, count: int) -> FakeChild:
        """The ``count``-th child of slot ``index``, once it is started."""
        while len(self.children.get(index, ())) < count:
            self.spawned.clear()
            await asyncio.wait_for(self.spawned.wait(), 5)
        return self.children[index][count - 1]


def test_the_backoff_doubles_to_its_cap_and_resets_after_a_stable_run() -> None:
    policy = RestartPolicy(initial_backoff_secs=0.5, max_backoff_secs=10, stable_secs=30)
    backoffs, previous = [], None
    for _ in range(7):
        previous = policy.next_backoff(previous, lived_secs=1)
        backoffs.append(previous)
    assert backoffs == [0.5, 1, 2, 4, 8, 10, 10]
    assert policy.next_backoff(10, lived_secs=30) == 0.5  # it ran long enough: start over


async def test_a_crashed_child_is_restarted_after_a_growing_backoff_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    spawn = Spawner()
    restarted: list[int] = []
    supervisor = Supervisor(2, spawn, FAST, restarted=restarted.append)
    caplog.set_level(logging.INFO, "shunter.supervisor")
    running = asyncio.create_task(supervisor.run())
    for crash in range(1, 5):
        (await spawn.until(0, crash)).exit(1)
    await spawn.until(0, 5)
    assert len(spawn.children[1]) == 1  # its sibling was left alone
    crashes = [r for r in caplog.records if "restarting" in r.getMessage()]
    assert [r.backoff_secs for r in crashes] == [0.01, 0.02, 0.04, 0.04]  # type: ignore[attr-defined]
    assert {r.exit_code for r in crashes} == {1}  # type: ignore[attr-defined]
    gaps = [after - before for before, after in itertools.pairwise(spawn.times[0])]
    for gap, backoff in zip(gaps, (0.01, 0.02, 0.04, 0.04), strict=True):
        assert gap >= backoff
    assert restarted == [0, 0, 0, 0]
    assert supervisor.restarts == 4
    supervisor.stop(signal.SIGTERM)
    assert await asyncio.wait_for(running, 5) == 0  # the live children drained cleanly


async def test_a_signal_is_forwarded_to_every_child_and_all_drained_exit_zero() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        spawn = Spawner()
        supervisor = Supervisor(3, spawn, FAST)
        running = asyncio.create_task(supervisor.run())
        children = [await spawn.until(index, 1) for index in range(3)]
        supervisor.stop(sig)
        assert await asyncio.wait_for(running, 5) == 0
        assert [c.signals for c in children] == [[sig]] * 3
        assert [len(spawn.children[i]) for i in range(3)] == [1, 1, 1]  # none restarted


async def test_run_waits_for_every_child_to_finish_its_drain() -> None:
    spawn = Spawner(on_signal=None)  # they drain until told to exit
    supervisor = Supervisor(2, spawn, FAST)
    running = asyncio.create_task(supervisor.run())
    first, second = [await spawn.until(index, 1) for index in range(2)]
    supervisor.stop(signal.SIGTERM)
    first.exit(0)
    await asyncio.sleep(0.05)
    assert not running.done()  # the second still drains
    second.exit(0)
    assert await asyncio.wait_for(running, 5) == 0


async def test_the_exit_code_is_1_when_a_child_did_not_drain_cleanly() -> None:
    spawn = Spawner(on_signal=None)
    supervisor = Supervisor(2, spawn, FAST)
    running = asyncio.create_task(supervisor.run())
    first, second = [await spawn.until(index, 1) for index in range(2)]
    supervisor.stop(signal.SIGTERM)
    first.exit(0)
    second.exit(-signal.SIGKILL)
    assert await asyncio.wait_for(running, 5) == 1


async def test_a_child_waiting_out_its_backoff_is_not_restarted_after_a_stop() -> None:
    slow = RestartPolicy(initial_backoff_secs=30, max_backoff_secs=30)
    spawn = Spawner()
    supervisor = Supervisor(2, spawn, slow)
    running = asyncio.create_task(supervisor.run())
    (await spawn.until(0, 1)).exit(1)
    await spawn.until(1, 1)
    await asyncio.sleep(0.05)  # slot 0 is in its 30 s backoff
    supervisor.stop(signal.SIGTERM)
    assert await asyncio.wait_for(running, 5) == 1  # its last child crashed
    assert len(spawn.children[0]) == 1


async def test_a_child_started_as_the_signal_comes_is_signalled_too() -> None:
    supervisor: Supervisor

    async def spawn_then_stop(index: int) -> FakeChild:
        child = FakeChild()
        supervisor.stop(signal.SIGTERM)  # arrives while the child is being started
        return child

    supervisor = Supervisor(1, spawn_then_stop, FAST)
    assert await asyncio.wait_for(supervisor.run(), 5) == 0
