"""Slot turns: when a request for a prompt waits for its busy slot on a llama.cpp worker."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, cast

import pytest

from shunter.backends.base import Address
from shunter.backends.http.calls import WorkerCalls
from shunter.backends.http.discovery import _llamacpp_slots
from shunter.backends.http.slot_turns import MIN_PROMPT_CHARS, SlotTurns, prompt_key

A, B, C = "a" * MIN_PROMPT_CHARS, "b" * MIN_PROMPT_CHARS, "c" * MIN_PROMPT_CHARS


async def waits(awaitable: Awaitable[None]) -> bool:
    """Whether ``awaitable`` is still waiting after the loop has run everything ready."""
    task = asyncio.ensure_future(awaitable)
    for _ in range(5):
        await asyncio.sleep(0)
    if task.done():
        task.result()
        return False
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return True


async def full_of(turns: SlotTurns, *keys: str) -> None:
    """Each of ``keys`` ran once and ended: one slot holds each."""
    for key in keys:
        await turns.take(key)
        turns.release(key)


def test_the_key_is_the_start_of_a_long_prompt() -> None:
    assert prompt_key(None) is None
    assert prompt_key("x" * (MIN_PROMPT_CHARS - 1)) is None  # short: never worth a wait
    assert prompt_key(A + " and the rest") == A


async def test_a_running_prompt_waits_only_when_its_slot_would_evict_another() -> None:
    turns = SlotTurns(slots=2, wait_secs=10)
    await turns.take(A)  # A runs in one slot; the other is free
    assert not await waits(turns.take(A))  # a free slot takes a second copy of A
    turns.release(A)
    turns.release(A)
    await full_of(turns, B)  # evicts one of A's two copies: the slots hold A and B
    await turns.take(A)
    assert not await waits(turns.take(C))  # a prompt new here never waits: a miss anyway
    turns.release(C)  # C took B's slot (the least recently used): A and C now
    assert await waits(turns.take(A))  # A's only copy is busy; running would evict C
    assert turns.waits == 1


async def test_an_idle_copy_or_a_spare_duplicate_means_no_wait() -> None:
    turns = SlotTurns(slots=3, wait_secs=10)
    await turns.take(A)
    await turns.take(A)  # two copies of A
    turns.release(A)
    turns.release(A)
    await full_of(turns, B)  # slots: A, A, B
    await turns.take(A)
    assert not await waits(turns.take(A))  # A's second copy is idle
    await turns.take(B)
    # A's copies and B's are all busy, and no idle slot holds a duplicate: B must wait.
    assert await waits(turns.take(B))
    turns.release(A)
    # An idle copy of A is a spare (A has another): evicting it loses nothing.
    assert not await waits(turns.take(B))


async def test_a_waiter_goes_when_its_prompt_ends_in_arrival_order() -> None:
    turns = SlotTurns(slots=2, wait_secs=10)
    await full_of(turns, A, B)
    await turns.take(A)
    order: list[int] = []

    async def request(number: int) -> None:
        await turns.take(A)
        order.append(number)

    first, second = asyncio.create_task(request(1)), asyncio.create_task(request(2))
    await asyncio.sleep(0.01)
    assert order == [] and turns.waits == 2
    turns.release(A)
    await asyncio.sleep(0.01)
    assert order == [1]  # one slot freed: one waiter goes
    turns.release(A)
    await asyncio.sleep(0.01)
    assert order == [1, 2]
    assert first.done() and second.done()
    assert turns.timeouts == 0


async def test_a_newcomer_queues_behind_waiters() -> None:
    turns = SlotTurns(slots=2, wait_secs=10)
    await full_of(turns, A, B)
    await turns.take(A)
    waiting = asyncio.create_task(turns.take(A))
    await asyncio.sleep(0.01)
    turns.release(A)  # the waiter is woken; a newcomer arriving now must not overtake it
    assert await waits(turns.take(A))
    await waiting


async def test_a_wait_ends_after_wait_secs_and_the_request_goes() -> None:
    turns = SlotTurns(slots=2, wait_secs=0.05)
    await full_of(turns, A, B)
    await turns.take(A)
    started = asyncio.get_running_loop().time()
    await turns.take(A)  # goes anyway: a second copy of A, evicting B
    assert asyncio.get_running_loop().time() - started >= 0.04
    assert (turns.waits, turns.timeouts) == (1, 1)
    turns.release(A)
    turns.release(A)
    assert not await waits(turns.take(A))  # idle copies of A now


async def test_a_woken_waiter_whose_client_left_passes_its_turn_on() -> None:
    turns = SlotTurns(slots=2, wait_secs=10)
    await full_of(turns, A, B)
    await turns.take(A)
    leaving = asyncio.create_task(turns.take(A))
    staying = asyncio.create_task(turns.take(A))
    await asyncio.sleep(0.01)
    turns.release(A)  # wakes ``leaving``...
    leaving.cancel()  # ...whose client leaves before it runs
    with pytest.raises(asyncio.CancelledError):
        await leaving
    await asyncio.wait_for(staying, 1)  # the turn went on to the next waiter


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    turns = SlotTurns(slots=2, wait_secs=10)
    await full_of(turns, A, B)
    await turns.take(A)
    assert await waits(turns.take(A))  # cancelled while waiting
    turns.release(A)
    assert not await waits(turns.take(A))  # nobody left in line: the idle copy is free


class _Props:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    async def get_json(self, target: Any, paths: tuple[str, ...]) -> Any:
        assert paths == ("/props",)
        return self.answer


@pytest.mark.parametrize(
    ("answer", "slots"),
    [
        ({"total_slots": 4}, 4),
        ({"total_slots": 0}, None),
        ({"total_slots": True}, None),
        ({"total_slots": "4"}, None),
        ({}, None),
        (None, None),  # no /props: an older server, or not llama.cpp after all
        ([4], None),
    ],
)
async def test_llamacpp_slots_come_from_props(answer: Any, slots: int | None) -> None:
    calls = cast(WorkerCalls, _Props(answer))
    assert await _llamacpp_slots(calls, Address("http://w")) == slots
