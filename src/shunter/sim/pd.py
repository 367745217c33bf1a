"""A sim's part in PD disaggregation: a prefill publishes and holds rooms, a decode pulls them.

``--disaggregation-mode prefill`` runs a bootstrap server (``bootstrap.py``) beside the
worker; each request prefills its prompt, publishes its rooms there, and (SGLang) holds its
answer until the decode has claimed every room, because a real prefill's request completes
only after its KV has been sent, which needs the decode. ``decode`` claims each room from
the prefill named in the request before generating. Either side gives up after
``--disaggregation-bootstrap-timeout``, as SGLang's engines do, so a pairing the gateway
broke (a leg never sent, a wrong host or room, a leg cancelled) fails here exactly as it
would on a real fleet. HTTP (``pd_http.py``) and gRPC (``grpc_server.py``) share this.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from shunter.sim.bootstrap import BootstrapClient, BootstrapServer, BootstrapTimeout
from shunter.sim.config import SimConfig
from shunter.sim.rooms import Room, RoomRegistry

log = logging.getLogger("shunter.sim.pd")
T = TypeVar("T")


async def all_or_none(coroutines: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Run the items of one request at once; the first failure (in order) is the request's,
    and stops the others (``asyncio.gather`` would leave them running)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return [await task for task in tasks]
    finally:
        for task in tasks:
            task.cancel()


class Disaggregation:
    def __init__(self, config: SimConfig) -> None:
        self.mode = config.disaggregation_mode
        self.host = config.host
        self.bootstrap_port = config.disaggregation_bootstrap_port
        self.timeout_secs = config.disaggregation_bootstrap_timeout
        self.rooms = RoomRegistry(self.timeout_secs)
        self._server = BootstrapServer(self.rooms) if self.mode == "prefill" else None
        self._client = BootstrapClient()
        self._started = False

    async def start(self) -> None:
        """Open the bootstrap port of a prefill; once, whichever server starts first."""
        if self._started:
            return
        self._started = True
        if self._server is not None:
            await self._server.start(self.host, self.bootstrap_port)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
        await self._client.close()

    # --- prefill -------------------------------------------------------------------------

    def publish(self, key: str, info: dict[str, Any]) -> Room:
        """Make one finished prefill claimable (raises ``RoomInUse``)."""
        return self.rooms.publish(key, info)

    async def hold(self, rooms: Sequence[Room]) -> None:
        """Wait until the decode has claimed every room; BootstrapTimeout naming the first
        that was not. However it ends, no room is left claimable."""
        try:
            for room in rooms:
                if not await room.settled():
                    raise BootstrapTimeout(
                        f"bootstrap timed out: room {room.info['room']} was never claimed"
                    )
        finally:
            self.forget(rooms)

    def forget(self, rooms: Sequence[Room]) -> None:
        for room in rooms:
            self.rooms.forget(room)

    # --- decode --------------------------------------------------------------------------

    async def pull(self, sources: Sequence[tuple[str, int | None, str]]) -> list[dict[str, Any]]:
        """Claim each ``(host, port, room)`` at its prefill, all at once; a null port is
        this sim's own bootstrap port (SGLang's default). BootstrapTimeout for the first
        room (in order) not found in time; the other polls stop with it."""
        return await all_or_none(
            [
                self._client.claim(host, port or self.bootstrap_port, room, self.timeout_secs)
                for host, port, room in sources
            ]
        )
