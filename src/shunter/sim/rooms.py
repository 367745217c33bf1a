"""A prefill worker's bootstrap rooms: KV caches computed and waiting for their decode.

In PD disaggregation a request goes to two workers at once, a prefill and a decode, joined
by a *bootstrap room* (SGLang; vLLM calls it a transfer id). The prefill computes the
prompt's KV cache and publishes the room; the decode connects to the prefill's bootstrap
server, asks for its room and takes the KV (``claim``). A room nobody claims within the
bootstrap timeout is forgotten, and the prefill that published it fails, as SGLang's does.

Everything here runs on the event loop: no lock.
"""

from __future__ import annotations

import asyncio
from typing import Any


class RoomInUse(Exception):
    """A room is published while another request's room of the same name still waits."""


class Room:
    """One published room: what the decode receives, and how its wait ended."""

    __slots__ = ("_expiry", "_outcome", "info", "key")

    def __init__(self, key: str, info: dict[str, Any], expiry: asyncio.TimerHandle) -> None:
        self.key = key
        self.info = info
        self._expiry = expiry
        self._outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def _settle(self, claimed: bool) -> None:
        self._expiry.cancel()
        if not self._outcome.done():
            self._outcome.set_result(claimed)

    async def settled(self) -> bool:
        """Wait until the room is claimed (True) or forgotten unclaimed (False)."""
        return await asyncio.shield(self._outcome)


class RoomRegistry:
    """The rooms a prefill has published and no decode has claimed yet."""

    def __init__(self, timeout_secs: float) -> None:
        self.timeout_secs = timeout_secs
        self._rooms: dict[str, Room] = {}

    def __len__(self) -> int:
        return len(self._rooms)

    def publish(self, key: str, info: dict[str, Any]) -> Room:
        """Make ``key`` claimable with ``info``, for at most the bootstrap timeout."""
        if key in self._rooms:
            raise RoomInUse(f"bootstrap room {key} is already waiting for its decode")
        loop = asyncio.get_running_loop()
        expiry = loop.call_later(self.timeout_secs, self._expire, key)
        room = self._rooms[key] = Room(key, info, expiry)
        return room

    def claim(self, key: str) -> dict[str, Any] | None:
        """The decode takes the room: its info, once; None while it is unknown."""
        room = self._rooms.pop(key, None)
        if room is None:
            return None
        room._settle(True)
        return room.info

    def forget(self, room: Room) -> None:
        """Drop ``room`` unclaimed (its request failed or was cancelled)."""
        if self._rooms.get(room.key) is room:
            del self._rooms[room.key]
        room._settle(False)

    def _expire(self, key: str) -> None:
        room = self._rooms.get(key)
        if room is not None:
            self.forget(room)
