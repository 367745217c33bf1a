"""A value created once, on first use, by one task; replaceable without blocking readers.

The hot path reads ``cell.value`` (an attribute read). Only when it is None does a caller
await ``get()``: the first caller starts the creation and every concurrent caller awaits
that same future, so N simultaneous first uses create exactly one value (single-flight).

A value found broken is handed to ``replace(broken)``: a new one is created in the
background while readers keep reading the old one; the swap is one assignment. The old
value is then *retired*, not closed: requests that read it just before the swap may still
be running on it, so ``retirer`` (a client's "close once your calls have ended") is given
it, and only ``close()`` closes values at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger("shunter.aio.once")


class CellClosed(RuntimeError):
    """The cell was closed: it creates nothing more."""


class OnceCell(Generic[T]):
    __slots__ = (
        "_closed",
        "_closer",
        "_factory",
        "_pending",
        "_replacing",
        "_retirer",
        "_retiring",
        "value",
    )

    def __init__(
        self,
        factory: Callable[[], Awaitable[T]],
        closer: Callable[[T], Awaitable[None]] | None = None,
        retirer: Callable[[T], Awaitable[None]] | None = None,
    ) -> None:
        """``closer`` closes a value now; ``retirer`` closes a replaced one once what runs on
        it has ended (``closer`` when not given)."""
        self.value: T | None = None
        self._factory = factory
        self._closer = closer
        self._retirer = retirer or closer
        self._pending: asyncio.Future[T] | None = None
        self._replacing: asyncio.Task[None] | None = None
        self._retiring: dict[asyncio.Task[None], T] = {}  # each with the value it retires
        self._closed = False

    async def get(self) -> T:
        """The value, creating it if nobody has yet (concurrent callers share one creation)."""
        value = self.value
        if value is not None:
            return value
        if self._closed:
            raise CellClosed("this client was closed")
        pending = self._pending
        if pending is None:
            pending = asyncio.ensure_future(self._create())
            self._pending = pending
        return await asyncio.shield(pending)

    async def _create(self) -> T:
        try:
            value = await self._factory()
        except BaseException:
            self._pending = None  # let the next caller try again
            raise
        self._pending = None
        if self._closed:  # closed while it was being made: nobody else would close it
            await self._close_now(value)
            raise CellClosed("this client was closed")
        self.value = value
        return value

    def replace(self, broken: T) -> None:
        """Start replacing ``broken`` in the background, unless that already happened."""
        if self.value is not broken or self._replacing is not None or self._closed:
            return
        self._replacing = asyncio.ensure_future(self._replace(broken))

    async def _replace(self, broken: T) -> None:
        try:
            fresh = await self._factory()
        except Exception:
            log.exception("replacing a broken client failed; keeping the old one")
            return
        finally:
            self._replacing = None
        if self._closed:
            await self._close_now(fresh)
            return
        self.value = fresh
        if self._retirer is not None:
            task = asyncio.ensure_future(self._retire(broken))
            self._retiring[task] = broken
            task.add_done_callback(self._retiring.pop)

    async def _retire(self, old: T) -> None:
        assert self._retirer is not None
        try:
            await self._retirer(old)
        except Exception:
            log.warning("closing a replaced client failed", exc_info=True)

    async def _close_now(self, value: T) -> None:
        if self._closer is not None:
            try:
                await self._closer(value)
            except Exception:
                log.warning("closing a client failed", exc_info=True)

    async def close(self) -> None:
        """Close the value, one being made or replaced, and those still retiring: at once.
        The cell makes nothing after this (``get`` raises CellClosed)."""
        self._closed = True
        retiring = dict(self._retiring)
        waits: list[asyncio.Future[Any]] = [*retiring]
        for task in retiring:
            task.cancel()
        if self._replacing is not None:
            self._replacing.cancel()
            waits.append(self._replacing)
        if self._pending is not None:
            waits.append(self._pending)  # it closes what it makes, seeing the cell closed
        if waits:
            await asyncio.wait(waits)
        for task, old in retiring.items():
            if task.cancelled():  # its retirer did not get to close it
                await self._close_now(old)
        value, self.value = self.value, None
        if value is not None:
            await self._close_now(value)
