"""One ``/workers`` for ``--workers N``: each process's view of the workers, asked and merged.

Every process of a ``--workers`` gateway routes on its own: it counts its own requests in
flight to each worker, what each served, its own breaker per worker, and it health-checks
every worker itself. A client's ``GET /workers`` lands on whichever process the kernel
gave its connection to, so without merging, two calls in a row could disagree on every
count. The process that answers asks its siblings (over their control sockets,
control.py) and merges:

- ``load`` (requests in flight), ``processed`` and ``errors`` are summed: the gateway's
  figures are the sum of its processes';
- what the worker reports of itself (``cache_hit_rate``) and what the operator set is the
  same in every process: the answering process's own is kept;
- ``is_healthy`` holds only if every process that knows the worker finds it healthy (its
  ``status`` then ``not_ready``, not ``ready``), and
  ``circuit_state`` is the worst of the processes' (open, then half_open, then closed),
  since a worker one process will not route to is not fully in service;
- a worker only a sibling knows yet (added through it a moment ago) is listed too.

A sibling that does not answer within ``ASK_TIMEOUT_SECS`` (restarting, say) is left out
of that answer; the answer is never held up longer than that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import orjson

from shunter.supervisor.control import WORKERS

log = logging.getLogger("shunter.supervisor")

ASK_TIMEOUT_SECS = 1.0
_SUMMED = ("load", "processed", "errors")
_CIRCUIT_ORDER = {"closed": 0, "half_open": 1, "open": 2}

Row = dict[str, Any]


async def ask(path: str, question: bytes, timeout: float = ASK_TIMEOUT_SECS) -> bytes:
    """The answer of the control socket at ``path`` to ``question``; OSError or TimeoutError
    when it cannot be had in time."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(question + b"\n")
            await writer.drain()
            return await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class Siblings:
    """The other processes of this ``--workers`` gateway, by their control sockets."""

    def __init__(self, sockets: Sequence[str], timeout: float = ASK_TIMEOUT_SECS) -> None:
        self.sockets = tuple(sockets)
        self.timeout = timeout

    async def worker_rows(self) -> list[list[Row]]:
        """Each sibling's rows that could be had in time (a list of JSON objects each)."""
        answers = await asyncio.gather(*(self._rows(path) for path in self.sockets))
        return [rows for rows in answers if rows is not None]

    async def _rows(self, path: str) -> list[Row] | None:
        try:
            rows = orjson.loads(await ask(path, WORKERS, self.timeout))
        except (OSError, TimeoutError, orjson.JSONDecodeError) as exc:
            log.debug("a sibling's workers could not be read", extra={"path": path, "error": exc})
            return None
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            log.warning("a sibling's workers are not a list of objects", extra={"path": path})
            return None
        return rows

    async def merged(self, own: list[Row]) -> list[Row]:
        """``own`` rows with every sibling's merged in (see the module docstring)."""
        return merge_rows(own, await self.worker_rows())


def _key(row: Row) -> tuple[object, object]:
    return row.get("url"), row.get("dp_rank")  # DP ranks of one URL are separate workers


def merge_rows(own: list[Row], others: list[list[Row]]) -> list[Row]:
    """One row per worker: ``own`` order first, then workers only siblings know."""
    merged: dict[tuple[object, object], Row] = {}
    for rows in (own, *others):
        for row in rows:
            key = _key(row)
            into = merged.get(key)
            if into is None:
                merged[key] = dict(row)
                continue
            for name in _SUMMED:
                into[name] = (into.get(name) or 0) + (row.get(name) or 0)
            into["is_healthy"] = bool(into.get("is_healthy")) and bool(row.get("is_healthy"))
            if not into["is_healthy"] and into.get("status") == "ready":
                into["status"] = "not_ready"  # as the process that finds it unhealthy says
            theirs = str(row.get("circuit_state", "closed"))
            ours = str(into.get("circuit_state", "closed"))
            if _CIRCUIT_ORDER.get(theirs, 0) > _CIRCUIT_ORDER.get(ours, 0):
                into["circuit_state"] = theirs
    return list(merged.values())
