"""Per-worker clients: created once under concurrent first use, replaced without blocking."""

from __future__ import annotations

import asyncio

import pytest

from shunter.aio.once import CellClosed, OnceCell


class FakeClient:
    def __init__(self, serial: int) -> None:
        self.serial = serial
        self.closed = False


class CountingFactory:
    def __init__(self, delay: float = 0.01, failures: int = 0) -> None:
        self.created = 0
        self.made: list[FakeClient] = []
        self.delay = delay
        self.failures = failures
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> FakeClient:
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(self.delay)  # creation takes a while: all first users pile up
        if self.failures:
            self.failures -= 1
            raise ConnectionError("cannot create")
        self.created += 1
        self.made.append(FakeClient(self.created))
        return self.made[-1]


async def close(client: FakeClient) -> None:
    client.closed = True


async def test_a_thousand_concurrent_first_uses_create_exactly_one_client() -> None:
    factory = CountingFactory()
    cell: OnceCell[FakeClient] = OnceCell(factory, close)
    clients = await asyncio.gather(*(cell.get() for _ in range(1000)))
    assert factory.created == 1
    assert all(c is clients[0] for c in clients)
    assert cell.value is clients[0]  # later readers: an attribute read


async def test_a_failed_creation_is_seen_by_its_waiters_and_the_next_use_retries() -> None:
    factory = CountingFactory(failures=1)
    cell: OnceCell[FakeClient] = OnceCell(factory, close)
    results = await asyncio.gather(*(cell.get() for _ in range(10)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    client = await cell.get()
    assert client.serial == 1 and factory.created == 1


async def test_a_cancelled_first_user_does_not_cancel_the_creation_for_others() -> None:
    factory = CountingFactory(delay=0.05)
    cell: OnceCell[FakeClient] = OnceCell(factory, close)
    first = asyncio.ensure_future(cell.get())
    others = [asyncio.ensure_future(cell.get()) for _ in range(5)]
    await asyncio.sleep(0.01)
    first.cancel()
    results = await asyncio.gather(*others)
    assert factory.created == 1 and all(r is results[0] for r in results)


async def test_replace_keeps_readers_on_the_old_client_until_the_new_one_is_ready() -> None:
    factory = CountingFactory(delay=0)
    cell: OnceCell[FakeClient] = OnceCell(factory, close)
    old = await cell.get()
    factory.gate = asyncio.Event()
    cell.replace(old)
    cell.replace(old)  # a second report of the same breakage starts nothing new
    await asyncio.sleep(0.01)
    assert cell.value is old  # creation is held at the gate; readers are not blocked
    assert await cell.get() is old
    factory.gate.set()
    for _ in range(100):
        if cell.value is not old:
            break
        await asyncio.sleep(0.005)
    assert cell.value is not None and cell.value.serial == 2
    assert factory.created == 2
    await asyncio.sleep(0)
    assert old.closed


async def test_replace_of_a_client_that_is_no_longer_current_does_nothing() -> None:
    factory = CountingFactory(delay=0)
    cell: OnceCell[FakeClient] = OnceCell(factory, close)
    stale = FakeClient(99)
    await cell.get()
    cell.replace(stale)
    await asyncio.sleep(0.01)
    assert factory.created == 1


async def test_a_replaced_client_is_retired_not_closed() -> None:
    factory = CountingFactory(delay=0)
    retired: list[FakeClient] = []
    quiet = asyncio.Event()  # the old client's calls have ended

    async def retire(client: FakeClient) -> None:
        await quiet.wait()
        retired.append(client)

    cell: OnceCell[FakeClient] = OnceCell(factory, close, retire)
    old = await cell.get()
    cell.replace(old)
    while cell.value is old:
        await asyncio.sleep(0)
    assert not old.closed and not retired  # still serving what ran on it
    quiet.set()
    while not retired:
        await asyncio.sleep(0)
    assert retired == [old] and not old.closed


async def test_close_closes_a_client_still_retiring_at_once() -> None:
    factory = CountingFactory(delay=0)

    async def never_quiet(client: FakeClient) -> None:
        await asyncio.Event().wait()

    cell: OnceCell[FakeClient] = OnceCell(factory, close, never_quiet)
    old = await cell.get()
    cell.replace(old)
    while cell.value is old:
        await asyncio.sleep(0)
    fresh = cell.value
    await cell.close()
    assert old.closed and fresh is not None and fresh.closed


async def background_work_done() -> None:
    """Wait for every task the cell started (the test's own loop runs nothing else)."""
    await asyncio.gather(*(asyncio.all_tasks() - {asyncio.current_task()}))


async def test_a_client_made_while_the_cell_closes_is_closed_too() -> None:
    factory = CountingFactory(delay=0)
    factory.gate = asyncio.Event()
    cell: OnceCell[FakeClient] = OnceCell(factory, close)
    first_use = asyncio.ensure_future(cell.get())
    await asyncio.sleep(0)  # the creation has started and waits at the gate
    closing = asyncio.ensure_future(cell.close())
    await asyncio.sleep(0)
    factory.gate.set()
    await closing
    with pytest.raises(CellClosed):
        await first_use
    assert factory.created == 1 and factory.made[0].closed
    with pytest.raises(CellClosed):
        await cell.get()  # nothing is made after close
    assert factory.created == 1


async def test_a_replacement_under_way_when_the_cell_closes_leaves_nothing_open() -> None:
    factory = CountingFactory(delay=0)
    cell: OnceCell[FakeClient] = OnceCell(factory, close)
    old = await cell.get()
    factory.gate = asyncio.Event()
    cell.replace(old)
    await asyncio.sleep(0)  # the replacement waits at the gate
    await cell.close()
    factory.gate.set()
    await background_work_done()
    assert factory.made and all(client.closed for client in factory.made)
