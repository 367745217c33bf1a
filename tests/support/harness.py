"""Real processes on 127.0.0.1: simulated workers and gateways, started and stopped by PID."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

LOOPBACK = "127.0.0.1"


# Ports handed to test servers come from below the kernel's ephemeral range (32768-60999 on
# Linux): a port the kernel picked with bind(0) is free only until the process binds it, and in
# between the kernel may give that same port to an outgoing connection (a health probe, a client),
# so the server then fails to start or, worse, a test talks to the wrong peer. CI saw a worker
# that never became healthy twice in five runs. Each pytest-xdist worker owns its own slice of
# the range; each process starts at a random place in it and walks forward, so two processes of
# one xdist worker (a test and a helper it spawned) rarely meet, and a port is checked free
# before it is handed out.
_PORT_BASE = 20000
_PORT_SLICE = 2000
_PORT_SLICES = 6


def _port_cursor() -> list[int]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) % _PORT_SLICES if worker.isdigit() else 0
    start = _PORT_BASE + index * _PORT_SLICE
    return [start, start + random.randrange(_PORT_SLICE)]


_cursor = _port_cursor()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on and the kernel will not hand out itself."""
    start, _ = _cursor
    for _ in range(_PORT_SLICE):
        port = _cursor[1]
        _cursor[1] = start + (port + 1 - start) % _PORT_SLICE
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}-{start + _PORT_SLICE - 1}")


def wait_for(
    predicate: Callable[[], bool],
    timeout: float = 15.0,
    what: str = "condition",
    interval: float = 0.05,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


# A process that starts is polled every 10 ms (a refused connect costs microseconds; an
# HTTP request is made only once it listens): at 50 ms, each start (~0.25 s) waited 25 ms
# more on average, ~230 starts in a run.
STARTING_POLL_SECS = 0.01


def listening(url: str) -> bool:
    """Whether something accepts connections on ``url``'s host and port."""
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=1).close()
    except OSError:
        return False
    return True


# Every process the tests started and have not stopped, oldest first. A fixture that starts
# sims and then fails (its gateway never saw them) leaves them running with nothing to stop
# them, and they outlived the test run (four PD sims, seen after a failed run):
# ``stop_unstopped`` at the run's end stops whatever is still here, by PID.
_unstopped: list[Proc] = []


class Proc:
    """A subprocess whose output goes to a temp file (shown when a test fails)."""

    def __init__(self, args: Sequence[str]) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="shunter-", suffix=".log", delete=False)
        self.args = list(args)
        self.signalled = False  # SIGTERM sent: see ``terminate``
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "shunter", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        _unstopped.append(self)

    def started(self, wait: Callable[[], None]) -> None:
        """Run a readiness wait; if it fails, stop the process before raising (no orphans),
        with what the process printed in the error (it is never in ``procs`` to be shown)."""
        try:
            wait()
        except Exception as exc:
            printed = self.output()
            self.stop()
            if len(printed) > 8000:  # its start and its end: the middle is mostly polling
                printed = printed[:5000] + "\n[...]\n" + printed[-3000:]
            raise RuntimeError(f"{exc}; the process printed:\n{printed}") from exc
        except BaseException:
            self.stop()
            raise

    def answers(self, url: str, statuses: Sequence[int], what: str) -> bool:
        """Whether ``GET url`` answers one of ``statuses``; raises if the process exited."""
        if self.popen.poll() is not None:
            raise RuntimeError(f"{what} exited:\n{self.output()}")
        if not listening(url):
            return False
        try:
            return httpx.get(url, timeout=1, verify=False).status_code in statuses
        except httpx.HTTPError:
            return False

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def kill(self) -> None:
        """Kill at once (SIGKILL), as a crash would."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def terminate(self) -> None:
        """Send SIGTERM without waiting (``stop`` then waits): see ``stop_all``.

        Once only: a second SIGTERM can come while the process saves its coverage data on
        the way out, in coverage's own SIGTERM handler (a sim re-raises the signal after
        uvicorn's shutdown); the handler runs again inside the first and ends the process
        with the data file half written ("isn't a coverage data file" at the combine, in 5
        of 9 runs once gateways stopped in 0.12 s: ``stop`` then reached the sims just as
        they saved; coverage's debug log showed the nested "sigterm" in the sim).
        """
        if self.popen.poll() is None and not self.signalled:
            self.popen.send_signal(signal.SIGTERM)
            self.signalled = True

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
        with contextlib.suppress(ValueError):  # stopped before (stop is idempotent)
            _unstopped.remove(self)


def unstopped() -> list[Proc]:
    """The processes started and not stopped yet, oldest first."""
    return list(_unstopped)


def stop_unstopped(procs: Sequence[Proc] | None = None) -> list[Proc]:
    """Stop ``procs`` (default: every process not stopped yet, at the run's end) together;
    the ones that were still running, for the run to say so."""
    chosen = unstopped() if procs is None else list(procs)
    running = [proc for proc in chosen if proc.popen.poll() is None]
    stop_all(chosen)
    return running


def stop_all(procs: Sequence[Proc]) -> None:
    """Stop ``procs`` together: SIGTERM to each, then wait for each (last started first).

    One by one, a test's teardown waited for each exit in turn (a gateway's settle window,
    then every sim's); signalled together they exit in parallel, which took a fleet of a
    gateway and two sims from ~0.9 s to ~0.5 s.
    """
    for proc in reversed(procs):
        proc.terminate()
    for proc in reversed(procs):
        proc.stop()


_reaper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reaper")
_reaping: list[Future[None]] = []


def stop_in_background(procs: Sequence[Proc]) -> None:
    """SIGTERM to ``procs`` now; their exits are waited for in a thread (``stop`` there, so
    a process that ignores the signal is still killed after 10 s), while the next test
    starts. ``reaped`` waits for every one of them.

    A teardown that waited spent ~0.2 s per test on its sims' exits alone (uvicorn looks for
    the signal every 0.1 s, then gives its connections 0.1 s): ~80 tests start processes of
    their own. Nothing is left to check by then; their ports stay taken until they exit,
    and ``free_port`` hands out only free ones.
    """
    for proc in reversed(procs):
        proc.terminate()
    _reaping.append(_reaper.submit(_stop_each, list(reversed(procs))))


def _stop_each(procs: Sequence[Proc]) -> None:
    for proc in procs:
        proc.stop()


def reaped() -> None:
    """Wait until every process ``stop_in_background`` was given has exited (the test run
    waits for this before it ends: coverage reads the data they write as they exit)."""
    while _reaping:
        _reaping.pop(0).result()


class Sim(Proc):
    """`shunter sim`. With ``http_port`` it serves gRPC on ``port`` (``url`` is grpc://)
    and its HTTP API (/health, /sim/*) on ``http_port``; ``control_url`` is that API."""

    def __init__(
        self, name: str, *extra: str, port: int | None = None, http_port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.name = name
        scheme = "https" if "--tls-cert-path" in extra else "http"
        self.url = self.control_url = f"{scheme}://{LOOPBACK}:{self.port}"
        args = ["sim", "--port", str(self.port), "--worker-id", name, *extra]
        if http_port is not None:
            self.url = f"grpc://{LOOPBACK}:{self.port}"
            self.control_url = f"http://{LOOPBACK}:{http_port}"
            args += ["--grpc", "--http-port", str(http_port)]
        super().__init__(args)
        self.started(lambda: wait_for(self.ready, what=f"sim {name}", interval=STARTING_POLL_SECS))

    def ready(self) -> bool:
        if self.control_url.startswith("https"):  # it may demand a client certificate
            if self.popen.poll() is not None:
                raise RuntimeError(f"sim {self.name} exited:\n{self.output()}")
            try:
                socket.create_connection((LOOPBACK, self.port), timeout=1).close()
                return True
            except OSError:
                return False
        return self.answers(self.control_url + "/health", (200, 503), f"sim {self.name}")

    def stats(self) -> dict[str, Any]:
        return httpx.get(self.control_url + "/sim/stats", timeout=5).json()  # type: ignore[no-any-return]

    def requests(self) -> list[dict[str, Any]]:
        return httpx.get(self.control_url + "/sim/requests", timeout=5).json()  # type: ignore[no-any-return]

    def set_faults(self, **faults: Any) -> None:
        httpx.post(self.control_url + "/sim/faults", json=faults, timeout=5).raise_for_status()


class GrpcSim(Sim):
    """`shunter sim --grpc`, with its HTTP API on a port of its own."""

    def __init__(self, name: str, *extra: str, port: int | None = None) -> None:
        super().__init__(name, *extra, port=port, http_port=free_port())


class LlamaCpp(Proc):
    """llama.cpp's own server with SmolLM2 (`shunter llamacpp`; needs the e2e extra)."""

    def __init__(self, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        super().__init__(["llamacpp", "--port", str(self.port), *extra])
        self.started(lambda: wait_for(self.ready, timeout=60, what="llama.cpp worker"))

    def ready(self) -> bool:
        return self.answers(self.url + "/health", (200,), "llama.cpp worker")

    def metric(self, name: str) -> float:
        """One sample of the engine's own /metrics (llamacpp:*)."""
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


class Gateway(Proc):
    def __init__(self, *extra: str, workers: Sequence[str] = (), ready: bool = True) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        scheme = "https" if "--tls-cert-path" in extra else "http"
        self.url = f"{scheme}://{LOOPBACK}:{self.port}"
        self.metrics_url = f"http://{LOOPBACK}:{self.metrics_port}/metrics"
        key = extra[extra.index("--api-key") + 1] if "--api-key" in extra else None
        self.auth = {"authorization": f"Bearer {key}"} if key else {}
        args = [
            "serve",
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--prometheus-host",
            LOOPBACK,
            "--prometheus-port",
            str(self.metrics_port),
            "--log-level",
            "debug",
            # Tests stop many gateways: a short settle window (0.1 s) unless a test sets one.
            # (Grace 0.5 s, settle 0.25 s, cost ~0.15 s more per gateway stopped; the tests
            # that drain requests in flight set their own grace.)
            *(
                ()
                if "--shutdown-grace-period-secs" in extra
                else ("--shutdown-grace-period-secs", "0.2")
            ),
            *extra,
        ]
        if workers:
            args += ["--worker-urls", *workers]
        super().__init__(args)
        self.started(lambda: wait_for(self.alive, what="gateway", interval=STARTING_POLL_SECS))
        if ready and workers:
            # Generous: registration probes back off (up to 5 s apart) on a loaded machine.
            # At least: a peer (--peer-urls) may hand it more workers before its own are.
            self.started(lambda: self.wait_workers(len(workers), timeout=30.0, at_least=True))

    def alive(self) -> bool:
        return self.answers(self.url + "/health", (200,), "gateway")

    def workers(self) -> list[dict[str, Any]]:
        response = httpx.get(self.url + "/workers", timeout=5, verify=False, headers=self.auth)
        return response.json()["workers"]  # type: ignore[no-any-return]

    def wait_workers(self, count: int, timeout: float = 15.0, at_least: bool = False) -> None:
        def enough() -> bool:
            healthy = sum(1 for w in self.workers() if w["is_healthy"])
            return healthy >= count if at_least else healthy == count

        wait_for(enough, timeout, f"{'at least ' if at_least else ''}{count} healthy workers")

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 15), **kwargs)


class Fleet:
    """Sims and the gateway in front of them, as a fixture shares them."""

    def __init__(self, sims: list[Sim], gateway: Gateway) -> None:
        self.sims = sims
        self.gateway = gateway
