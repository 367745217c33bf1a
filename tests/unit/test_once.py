"""Per-worker clients: created once under concurrent first use, replaced without blocking."""

from __future__ import annotations

import asyncio

from shunter.aio.once import OnceCell


class FakeClient:
    def __init__(self, serial: int) -> None:
        self.serial = serial
        self.closed = False


class CountingFactory:
    def __init__(self, delay: float = 0.01, failures: int = 0) -> None:
        self.created = 0
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
        return FakeClient(self.created)


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
