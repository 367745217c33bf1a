"""Settings for the whole test run, and the fixtures of the tests that start real processes
(sims, gateways) on 127.0.0.1.

The settings are made in the main process, before the xdist workers start: they inherit them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from support.harness import Fleet, Gateway, Proc, Sim, reaped, stop_in_background, stop_unstopped


def pytest_configure(config: pytest.Config) -> None:
    _cache_bytecode(config)


def pytest_sessionfinish(session: pytest.Session) -> None:
    reaped()  # the processes tests stopped in the background have all exited
    # Left running by a fixture that failed half-way: stopped here, and named.
    if left := stop_unstopped():
        names = "; ".join(" ".join(proc.args[:5]) for proc in left)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"\nstopped {len(left)} process(es) no test stopped: {names}")


def _cache_bytecode(config: pytest.Config) -> None:
    """With PYTHONDONTWRITEBYTECODE set, every gateway and sim the tests start (~230 in a
    run) compiled Shunter's source again (~0.1 s of CPU per gateway, ~0.05 s per sim), and
    each xdist worker the tests (collection 6.6 -> 4.0 s). The bytecode goes to pytest's
    cache directory instead (PYTHONPYCACHEPREFIX): the source tree stays as clean as the
    variable asked, and each module is compiled once."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or not hasattr(config, "cache"):
        return
    os.environ["PYTHONPYCACHEPREFIX"] = str(config.cache.mkdir("pycache"))
    del os.environ["PYTHONDONTWRITEBYTECODE"]


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes a test starts; all are stopped at its end, by PID (their exits are waited
    for while the next test runs)."""
    started: list[Proc] = []
    yield started
    stop_in_background(started)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """Two sims of one model behind a round-robin gateway, shared by a module's tests.

    Tests using it must leave it as they found it (faults cleared, workers in place).
    """
    sims = [Sim("sim-a", "--itl-ms", "5"), Sim("sim-b", "--itl-ms", "5")]
    gateway = Gateway("--policy", "round_robin", workers=[s.url for s in sims])
    yield Fleet(sims, gateway)
    stop_in_background([*sims, gateway])
