"""A round-robin TCP balancer for tests: what a Kubernetes Service puts in front of gateways.

It models kube-proxy (or an L4 ingress): each NEW connection goes to the next backend whose
readiness probe last answered 200, in turn, and its bytes are relayed both ways; a
connection stays on the backend it was given for its whole life, so keep-alive requests go
where the first one went, draining or not. A backend whose probe fails gets no new
connection, but its open connections are left alone. The probe (``GET /readiness``) runs
every ``poll_secs`` (100 ms by default): a kubelet's period is seconds, which would only make
a test longer; what matters to the gateway is that its settle window outlasts the period.

What it does not do, on purpose, as kube-proxy does not: retry. A connection whose backend
refuses it is closed at once, so the client sees the failure. Its limits: 127.0.0.1 only;
no half-close (when either side ends or fails, both are closed once what was read has been
written); each direction holds at most one read (``CHUNK_BYTES``) and the transport's write
buffer (asyncio's 64 KiB high-water mark) before it stops reading.

For tests to look inside: ``probed()`` returns after a round of probes (so a test can act
when the front's view is freshest and will stay as it is longest), ``backend_of()`` says
where a client's connection went, and each ``Backend`` counts what it was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

LOOPBACK = "127.0.0.1"
CHUNK_BYTES = 64 * 1024
PROBE_TIMEOUT_SECS = 1.0


@dataclass(eq=False)
class Backend:
    """One endpoint behind the front, with what the front saw of it."""

    port: int
    ready: bool = False  # what the last readiness probe said
    relayed: int = 0  # connections ever relayed to it
    last_sent: float = 0.0  # monotonic time of the last bytes a client sent it
    became_ready: asyncio.Event = field(default_factory=asyncio.Event)


class Front:
    """Listens on 127.0.0.1 (``url``); backends come and go with ``add`` and ``remove``."""

    def __init__(self, poll_secs: float = 0.1) -> None:
        self.poll_secs = poll_secs
        self.backends: list[Backend] = []
        self.refused = 0  # client connections closed because no backend would take them
        self.port = 0
        self._turn = 0
        self._server: asyncio.Server | None = None
        self._poller: asyncio.Task[None] | None = None
        self._relays: set[asyncio.Task[None]] = set()
        self._routes: dict[int, Backend] = {}  # client's port -> its backend, while open
        self._probed: list[asyncio.Future[None]] = []  # waiting for a round of probes to end

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._poller = asyncio.create_task(self._poll())

    def add(self, port: int) -> Backend:
        """A new endpoint: it gets connections once a probe has found it ready."""
        backend = Backend(port)
        self.backends.append(backend)
        return backend

    def remove(self, backend: Backend) -> None:
        """The endpoint is gone (its pod terminated): no new connection goes there."""
        self.backends.remove(backend)

    async def probed(self) -> None:
        """Return when the next round of probes has ended: what the front knows is then as
        old as it gets, a full ``poll_secs`` before the next round."""
        waiter = asyncio.get_running_loop().create_future()
        self._probed.append(waiter)
        await waiter

    def backend_of(self, client_port: int) -> Backend | None:
        """Where the open connection from 127.0.0.1:``client_port`` was sent."""
        return self._routes.get(client_port)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self._server is not None:
            self._server.close()
        for relay in list(self._relays):
            relay.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)

    # --- readiness ---------------------------------------------------------------------------

    async def _poll(self) -> None:
        while True:
            backends = list(self.backends)
            answers = await asyncio.gather(*(self._probe(b.port) for b in backends))
            for backend, ready in zip(backends, answers, strict=True):
                backend.ready = ready
                if ready:
                    backend.became_ready.set()
            waiters, self._probed = self._probed, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
            await asyncio.sleep(self.poll_secs)

    @staticmethod
    async def _probe(port: int) -> bool:
        """Whether ``GET /readiness`` answers 200 within ``PROBE_TIMEOUT_SECS``."""
        writer = None
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_SECS):
                reader, writer = await asyncio.open_connection(LOOPBACK, port)
                writer.write(b"GET /readiness HTTP/1.1\r\nhost: front\r\nconnection: close\r\n\r\n")
                status_line = await reader.readline()
        except (OSError, TimeoutError):
            return False
        finally:
            if writer is not None:
                writer.close()
        return status_line.startswith(b"HTTP/1.1 200 ")

    # --- relaying ----------------------------------------------------------------------------

    def _pick(self) -> Backend | None:
        ready = [b for b in self.backends if b.ready]
        if not ready:
            return None
        self._turn += 1
        return ready[self._turn % len(ready)]

    async def _accept(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        try:
            await self._relay(client_in, client_out)
        except asyncio.CancelledError:
            pass  # close(): asyncio's stream server would log a handler that ends cancelled
        finally:
            self._relays.discard(task)

    async def _relay(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        backend = self._pick()
        if backend is None:
            self.refused += 1
            client_out.close()
            return
        try:
            backend_in, backend_out = await asyncio.open_connection(LOOPBACK, backend.port)
        except OSError:
            self.refused += 1
            client_out.close()
            return
        client_port = client_out.get_extra_info("peername")[1]
        self._routes[client_port] = backend
        backend.relayed += 1
        pumps = [
            asyncio.create_task(_pump(client_in, backend_out, backend)),
            asyncio.create_task(_pump(backend_in, client_out, None)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            backend_out.close()  # what was written and not yet sent still goes out
            client_out.close()
            del self._routes[client_port]


async def _pump(
    source: asyncio.StreamReader, sink: asyncio.StreamWriter, to: Backend | None
) -> None:
    """Copy until ``source`` ends; back-pressure from ``sink`` stops the reading. ``to``:
    the backend ``sink`` leads to, when the bytes are a client's."""
    with contextlib.suppress(OSError):
        while data := await source.read(CHUNK_BYTES):
            if to is not None:
                to.last_sent = time.monotonic()
            sink.write(data)
            await sink.drain()
