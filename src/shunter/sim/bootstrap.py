"""The bootstrap protocol between the two legs of a PD pair, over plain HTTP.

A prefill worker serves ``GET /bootstrap/{room}`` on its bootstrap port: 200 with
``{"room", "prompt_tokens", "cached_tokens"}`` once that room's prefill has finished (the
room is then claimed: the decode "took the KV"), 404 while it is unknown or not ready.
A decode worker polls that URL every ``POLL_SECS`` until it gets its room or its bootstrap
timeout passes. Real engines move the KV over RDMA (Mooncake, NIXL) after a handshake of
this kind; the sim keeps the handshake, which is what decides whether a pair works, and
drops the bytes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from shunter.sim.rooms import RoomRegistry
from shunter.sim.send import send_json
from shunter.wire.asgi import Receive, Scope, Send
from shunter.wire.base import UpstreamError
from shunter.wire.client import H1StreamClient
from shunter.wire.server import HttpServer

log = logging.getLogger("shunter.sim.bootstrap")

ROUTE = "/bootstrap/"
# How often a decode asks for its room. A prefill's KV is ready tens of milliseconds after
# the request arrives at the earliest, so 10 ms adds at most one poll's worth of latency.
POLL_SECS = 0.010
# One poll's own bound: the prefill is on the same network and answers at once, so a poll
# that takes longer than this is a prefill gone away; the next poll tries again.
REQUEST_TIMEOUT_SECS = 1.0


class BootstrapTimeout(Exception):
    """A room was not claimed, or not found, within the bootstrap timeout."""


class BootstrapServer:
    """A prefill's bootstrap listener: hands each finished room to the decode asking for it."""

    def __init__(self, rooms: RoomRegistry) -> None:
        self.rooms = rooms
        self._server: HttpServer | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = HttpServer(self._app, keep_alive_secs=30.0)
        await self._server.listen(host, port)
        log.info("bootstrap server on %s:%d", host, port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown(drain_secs=0.5)

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if scope["method"] != "GET" or not path.startswith(ROUTE):
            await send_json(send, 404, {"error": f"no route {scope['method']} {path}"})
            return
        room = path[len(ROUTE) :]
        info = self.rooms.claim(room)
        if info is None:
            await send_json(send, 404, {"error": f"room {room} is unknown or not ready"})
            return
        await send_json(send, 200, info)


class BootstrapClient:
    """A decode's side: asks a prefill's bootstrap server for rooms, one pool per server."""

    def __init__(self) -> None:
        self._pools: dict[tuple[str, int], H1StreamClient] = {}

    def _pool(self, host: str, port: int) -> H1StreamClient:
        pool = self._pools.get((host, port))
        if pool is None:
            literal = f"[{host}]" if ":" in host else host
            pool = H1StreamClient(
                f"http://{literal}:{port}", REQUEST_TIMEOUT_SECS, REQUEST_TIMEOUT_SECS
            )
            self._pools[(host, port)] = pool
        return pool

    async def claim(self, host: str, port: int, room: str, timeout_secs: float) -> dict[str, Any]:
        """Poll until the prefill hands over ``room``; BootstrapTimeout after ``timeout_secs``.

        A prefill not listening yet is polled again like a room not ready yet: the two legs
        start at the same moment, and either may be first.
        """
        pool = self._pool(host, port)
        url = f"{pool.origin}{ROUTE}{room}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_secs
        while True:
            found = await self._ask(pool, url)
            if found is not None:
                return found
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BootstrapTimeout(
                    f"bootstrap timed out waiting for room {room} at {host}:{port}"
                )
            await asyncio.sleep(min(POLL_SECS, remaining))

    async def _ask(self, pool: H1StreamClient, url: str) -> dict[str, Any] | None:
        try:
            stream = await pool.stream("GET", url, [], None)
            try:
                body = b""
                while (chunk := await stream.next_chunk()) is not None:
                    body += chunk
            finally:
                await stream.aclose()
        except UpstreamError:
            return None
        if stream.status != 200:
            return None
        try:
            info = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        return info if isinstance(info, dict) else None

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()
