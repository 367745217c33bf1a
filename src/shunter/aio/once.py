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
from typing import Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger("shunter.aio.once")


class OnceCell(Generic[T]):
    __slots__ = ("_closer", "_factory", "_pending", "_replacing", "_retirer", "value")

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

    async def get(self) -> T:
        """The value, creating it if nobody has yet (concurrent callers share one creation)."""
        value = self.value
        if value is not None:
            return value
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
        self.value = value
        self._pending = None
        return value

    def replace(self, broken: T) -> None:
        """Start replacing ``broken`` in the background, unless that already happened."""
        if self.value is not broken or self._replacing is not None:
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
        self.value = fresh
        if self._retirer is not None:
            try:
                await self._retirer(broken)
            except Exception:
                log.warning("closing a replaced client failed", exc_info=True)

    async def close(self) -> None:
        value, self.value = self.value, None
        if value is not None and self._closer is not None:
            await self._closer(value)
