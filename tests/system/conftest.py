"""Fixtures for the tests that start real processes (sims, gateways) on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.harness import Fleet, Gateway, Proc, Sim, stop_all


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes a test starts; all are stopped at its end, by PID."""
    started: list[Proc] = []
    yield started
    stop_all(started)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """Two sims of one model behind a round-robin gateway, shared by a module's tests.

    Tests using it must leave it as they found it (faults cleared, workers in place).
    """
    sims = [Sim("sim-a", "--itl-ms", "5"), Sim("sim-b", "--itl-ms", "5")]
    gateway = Gateway("--policy", "round_robin", workers=[s.url for s in sims])
    yield Fleet(sims, gateway)
    stop_all([*sims, gateway])
