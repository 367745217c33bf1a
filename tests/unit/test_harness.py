"""The test harness's own promise: no process a test run started outlives the run."""

from __future__ import annotations

from support.harness import Sim, stop_unstopped, unstopped


def test_a_process_nothing_stopped_is_listed_and_stopped_at_the_end() -> None:
    left = Sim("left-running")  # as a fixture leaves its sims when its gateway fails
    assert left in unstopped()
    assert stop_unstopped([left]) == [left]  # the run's end: stopped and named
    assert left.popen.poll() is not None
    assert left not in unstopped()


def test_a_stopped_process_is_not_listed_again() -> None:
    sim = Sim("stopped-by-its-test")
    sim.stop()
    assert sim not in unstopped()
    assert stop_unstopped([sim]) == []  # nothing was running: nothing to name
