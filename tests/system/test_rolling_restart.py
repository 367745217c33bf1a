"""Rolling restarts lose nothing: two gateways behind a Service-like front, restarted in turn
under load, and every request answered in full.

The front (support/front.py) sends new connections only to gateways whose /readiness says
200, as kube-proxy does, and keeps a connection on its gateway for its whole life. So what
this proves is the gateway's side of the bargain: on SIGTERM it turns unready at once, still
serves for the settle window (min(grace / 2, 5 s)) while the balancer catches up, tells
keep-alive clients to go (``Connection: close``) so that their next request reconnects
through the front, and finishes what is in flight before it exits 0.

Each restart is made hard on purpose: SIGTERM comes just after the front's probes (so the
front goes on sending new connections to the gateway for a whole poll period), and while a
"witness" stream on that gateway is sure to outlast the settle window. Tried by breaking
the drain in run.py: with no settle window, new connections sent in that period and
kept-alive requests are lost; with streams cut when the gateway stops accepting, the witness
is; without ``Connection: close`` keep-alive clients stay into the drain and lose requests
to the final close (or, when they are lucky, send after the settle window, which is checked).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from support.front import Backend, Front
from support.harness import Gateway, Proc, Sim

GRACE_SECS = 5.0
SETTLE_SECS = min(GRACE_SECS / 2, 5.0)
ITL_MS = 20
STREAM_TOKENS = 40  # ~0.8 s a stream: two back to back fit in the settle window
WHOLE_TOKENS = 3  # ~60 ms a whole answer
# ~3 s: a stream begun just before SIGTERM that outlasts the settle window (2.5 s), so it is
# still running when the gateway stops accepting, and must end within the grace period.
WITNESS_TOKENS = 150
CLIENTS_OF_EACH_KIND = 3  # x 4 kinds: 12 clients
CALL_TIMEOUT_SECS = 15.0


class Lost(Exception):
    """A request that did not get its whole answer."""


async def whole(client: httpx.AsyncClient) -> None:
    body = {"prompt": "hello", "max_tokens": WHOLE_TOKENS}
    response = await client.post("/v1/completions", json=body)
    if response.status_code != 200 or not response.json()["choices"][0]["text"]:
        raise Lost(f"{response.status_code} {response.text[:200]}")


async def stream(client: httpx.AsyncClient) -> None:
    body = {"prompt": "hello", "max_tokens": STREAM_TOKENS, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        text = (await response.aread()).decode()
    _check_stream(response, text)


def _check_stream(response: httpx.Response, text: str) -> None:
    if response.status_code != 200 or not text.rstrip().endswith("data: [DONE]"):
        raise Lost(f"{response.status_code} ...{text[-200:]!r}")


async def witness_on(front: Front, gateway: Backend) -> asyncio.Task[float]:
    """A long stream through the front that landed on ``gateway`` (new connections take
    turns, so a try or two); the task ends with the stream, at the time it ended."""
    for _ in range(20):
        landed = asyncio.get_running_loop().create_future()
        witness = asyncio.create_task(_witness(front, gateway, landed))
        await asyncio.wait((landed, witness), return_when=asyncio.FIRST_COMPLETED)
        if landed.done() and landed.result():
            return witness
        await witness  # it went elsewhere and gave up (or failed: this raises)
    raise AssertionError("no stream landed on the gateway in 20 tries")


async def _witness(front: Front, gateway: Backend, landed: asyncio.Future[bool]) -> float:
    body = {"prompt": "hello", "max_tokens": WITNESS_TOKENS, "stream": True}
    async with (
        httpx.AsyncClient(base_url=front.url, timeout=CALL_TIMEOUT_SECS) as client,
        client.stream("POST", "/v1/completions", json=body) as response,
    ):
        client_port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
        landed.set_result(front.backend_of(client_port) is gateway)
        if not landed.result():
            return 0.0  # leaving closes the connection: the gateway drops the stream
        text = (await response.aread()).decode()
    _check_stream(response, text)
    return time.monotonic()


@dataclass
class Load:
    """Clients calling through the front, one call at a time each, until ``stop``."""

    url: str
    done: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        for call in (whole, stream):
            for keep_alive in (False, True):
                for _ in range(CLIENTS_OF_EACH_KIND):
                    self._tasks.append(asyncio.create_task(self._client(call, keep_alive)))

    async def stop(self) -> None:
        """Let each client finish the call it is in, then return."""
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _client(
        self, call: Callable[[httpx.AsyncClient], Awaitable[None]], keep_alive: bool
    ) -> None:
        # One connection, reused while the server keeps it; or a new connection per call.
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=int(keep_alive))
        kind = f"{call.__name__}/{'keep-alive' if keep_alive else 'new connection'}"
        async with httpx.AsyncClient(
            base_url=self.url, limits=limits, timeout=CALL_TIMEOUT_SECS
        ) as client:
            while not self._stop.is_set():
                try:
                    await call(client)
                    self.done[kind] += 1
                except (Lost, httpx.HTTPError) as exc:
                    self.failures.append(f"{kind}: {exc!r}")


@dataclass
class Restart:
    """One gateway's stop, in seconds from its SIGTERM."""

    exit_code: int
    secs_to_exit: float
    secs_to_witness_end: float  # the stream in flight on it at the signal
    secs_to_last_request: float  # the last bytes a client sent it


async def test_a_rolling_restart_behind_a_service_loses_no_request(procs: list[Proc]) -> None:
    def start_sim(name: str) -> Sim:
        sim = Sim(name, "--itl-ms", str(ITL_MS))
        procs.append(sim)
        return sim

    sims = await asyncio.gather(*(asyncio.to_thread(start_sim, f"roll-{i}") for i in "ab"))

    def start_gateway() -> Gateway:
        gateway = Gateway(
            "--shutdown-grace-period-secs", str(GRACE_SECS), workers=[s.url for s in sims]
        )
        procs.append(gateway)
        return gateway

    front = Front()
    await front.start()
    load = Load(front.url)
    try:
        gateways = list(await asyncio.gather(*(asyncio.to_thread(start_gateway) for _ in "ab")))
        backends = [front.add(g.port) for g in gateways]
        every_backend = list(backends)
        for backend in backends:
            await asyncio.wait_for(backend.became_ready.wait(), 10)
        load.start()

        async def restart(index: int) -> Restart:
            """As a Deployment's rolling update does it with no surge: stop, then replace."""
            old, old_backend = gateways[index], backends[index]
            witness = await witness_on(front, old_backend)
            # Just after the front's probes: it goes on sending new connections to the
            # gateway for a whole poll period after the signal, as a slow balancer would.
            await front.probed()
            signalled = time.monotonic()
            old.popen.send_signal(signal.SIGTERM)
            exit_code = await asyncio.to_thread(old.popen.wait, 30)
            secs = time.monotonic() - signalled
            witness_end = await witness
            front.remove(old_backend)  # its endpoint is gone
            gateways[index] = await asyncio.to_thread(start_gateway)
            backends[index] = front.add(gateways[index].port)
            every_backend.append(backends[index])
            await asyncio.wait_for(backends[index].became_ready.wait(), 10)
            return Restart(
                exit_code, secs, witness_end - signalled, old_backend.last_sent - signalled
            )

        restarts = [await restart(0), await restart(1)]
        # The last one started takes its share before the load stops.
        await _until(lambda: backends[1].relayed >= 5, 10, "the new gateway to get connections")
    finally:
        await load.stop()
        await front.close()
        for proc in procs:
            proc.kill()  # the test is over: no settle window (2.5 s each) to wait for

    assert load.failures == [], f"{len(load.failures)} lost: {load.failures[:5]}"
    assert front.refused == 0
    for kind in ("whole/new connection", "whole/keep-alive"):
        assert load.done[kind] >= 20, load.done
    for kind in ("stream/new connection", "stream/keep-alive"):
        assert load.done[kind] >= 6, load.done
    # Keep-alive connections carried several requests each.
    assert sum(b.relayed for b in every_backend) < sum(load.done.values())
    for done in restarts:
        assert done.secs_to_witness_end > SETTLE_SECS  # it was served after the settle window
        assert done.exit_code == 0
        assert done.secs_to_exit < GRACE_SECS  # what was in flight finished in time
        # Its keep-alive clients left while it still served: none was left to be cut off
        # when it stopped accepting, or at the end of the grace period.
        assert done.secs_to_last_request < SETTLE_SECS


async def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll in-process state the front updates as connections come."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
