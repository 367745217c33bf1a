"""A prefill's bootstrap rooms: claimed once, forgotten when claimed, cancelled or expired."""

from __future__ import annotations

import asyncio

import pytest

from shunter.sim.bootstrap import BootstrapTimeout
from shunter.sim.config import SimConfig
from shunter.sim.pd import Disaggregation
from shunter.sim.rooms import RoomInUse, RoomRegistry

INFO = {"room": 7, "prompt_tokens": 3, "cached_tokens": 0}


async def test_a_room_is_claimed_once_and_its_prefill_hears_it() -> None:
    rooms = RoomRegistry(timeout_secs=5)
    assert rooms.claim("7") is None  # not published yet: the decode polls again
    room = rooms.publish("7", INFO)
    assert rooms.claim("7") == INFO
    assert rooms.claim("7") is None and len(rooms) == 0
    assert await room.settled() is True


async def test_an_unclaimed_room_expires_after_the_timeout() -> None:
    rooms = RoomRegistry(timeout_secs=0.05)
    room = rooms.publish("7", INFO)
    assert await asyncio.wait_for(room.settled(), 1) is False
    assert len(rooms) == 0 and rooms.claim("7") is None


async def test_a_room_in_use_is_refused_until_it_is_forgotten() -> None:
    rooms = RoomRegistry(timeout_secs=5)
    first = rooms.publish("7", INFO)
    with pytest.raises(RoomInUse):
        rooms.publish("7", INFO)
    rooms.forget(first)
    assert await first.settled() is False
    rooms.publish("7", INFO)  # free again
    rooms.forget(first)  # forgetting a stale room leaves the new one alone
    assert rooms.claim("7") == INFO


async def test_hold_names_the_first_room_never_claimed_and_leaves_none_behind() -> None:
    pd = Disaggregation(
        SimConfig(disaggregation_mode="prefill", disaggregation_bootstrap_timeout=0.05)
    )
    claimed = pd.publish("1", {**INFO, "room": 1})
    unclaimed = pd.publish("2", {**INFO, "room": 2})
    assert pd.rooms.claim("1") is not None
    with pytest.raises(BootstrapTimeout, match="room 2 was never claimed"):
        await pd.hold([claimed, unclaimed])
    assert len(pd.rooms) == 0


async def test_a_cancelled_hold_forgets_its_rooms_at_once() -> None:
    pd = Disaggregation(SimConfig(disaggregation_mode="prefill"))  # 300 s timeout
    room = pd.publish("1", INFO)
    hold = asyncio.ensure_future(pd.hold([room]))
    await asyncio.sleep(0)
    hold.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hold
    assert len(pd.rooms) == 0 and await room.settled() is False
