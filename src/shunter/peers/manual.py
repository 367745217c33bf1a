"""Workers registered by hand, shared: a last-writer-wins map of ``POST``/``DELETE /workers``.

Each entry is the latest change to one URL, wherever it was made: the ``POST /workers``
body and the id the API gave the worker (every gateway registers it under that id, so
``/workers/{id}`` means the same worker on each), or ``None`` for a removal (a tombstone,
kept ``TOMBSTONE_SECS`` so a late or replayed addition cannot bring the worker back). The
later ``(stamp, origin)`` wins, so every gateway settles on the same answer whatever order
the changes arrive in.

Loops are impossible by construction: a change learnt from a peer is applied to the fleet
directly (never through the API that records local changes), and merging a change already
held does nothing. The whole map is also sent every few seconds, learnt entries included,
so a gateway that restarts learns every hand-registered worker from any peer. Workers given
by flag or found by discovery never enter the map: each gateway has its own.
"""

from __future__ import annotations

import json
import logging
import time

from shunter.fleet.fleet import Fleet
from shunter.fleet.ids import parse_worker_id
from shunter.fleet.jobs import QueueFull
from shunter.fleet.spec import SpecError, WorkerSpec
from shunter.peers.messages import ManualWorker

log = logging.getLogger("shunter.peers")

TOMBSTONE_SECS = 600.0


class ManualWorkers:
    def __init__(self, node: str, fleet: Fleet) -> None:
        self.node = node
        self.fleet = fleet
        self.entries: dict[str, ManualWorker] = {}
        self._last_stamp = 0
        self.rejected = 0  # peers' specs this gateway could not take

    def _stamp(self) -> int:
        self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
        return self._last_stamp

    # --- local changes (the API) -------------------------------------------------------------

    def added(self, url: str, body: dict[str, object], worker_id: str) -> ManualWorker:
        entry = ManualWorker(url, self._stamp(), self.node, json.dumps(body).encode(), worker_id)
        self.entries[url] = entry
        return entry

    def removed(self, url: str) -> ManualWorker:
        entry = ManualWorker(url, self._stamp(), self.node, None)
        self.entries[url] = entry
        return entry

    # --- peers' changes --------------------------------------------------------------------

    def merge(self, entry: ManualWorker) -> bool:
        """Take a peer's change if it is newer than ours; True when it was applied."""
        held = self.entries.get(entry.url)
        if held is not None and (held.stamp, held.origin) >= (entry.stamp, entry.origin):
            return False
        self.entries[entry.url] = entry
        self._last_stamp = max(self._last_stamp, entry.stamp)
        if entry.spec is None:
            self._remove(entry.url)
        else:
            self._add(entry)
        return True

    def _add(self, entry: ManualWorker) -> None:
        try:
            spec = WorkerSpec.from_json(json.loads(entry.spec or b""))
            worker_id = parse_worker_id(entry.worker_id)
            if worker_id is not None:  # else (an older peer's) one derived from the URL
                spec.worker_id = worker_id
        except (ValueError, SpecError) as exc:  # json's errors are ValueErrors
            self.rejected += 1
            log.warning(
                "a peer's worker is not valid here",
                extra={"url": entry.url, "origin": entry.origin, "error": str(exc)},
            )
            return
        fleet = self.fleet
        if fleet.taken(spec) is not None or fleet.adding(spec.url):
            return
        try:
            fleet.submit_add(spec)
        except QueueFull:
            self.rejected += 1
            log.warning("a peer's worker could not be queued", extra={"url": entry.url})
            return
        log.info("adding a worker a peer registered", extra={"url": spec.url, "from": entry.origin})

    def _remove(self, url: str) -> None:
        if self.fleet.find(url):
            self.fleet.remove(url)
            log.info("removed a worker a peer removed", extra={"url": url})

    # --- catching up -------------------------------------------------------------------------

    def snapshot(self, now_ns: int | None = None) -> list[ManualWorker]:
        """Every entry (old tombstones forgotten first), for a periodic full send."""
        horizon = (time.time_ns() if now_ns is None else now_ns) - int(TOMBSTONE_SECS * 1e9)
        for url in [u for u, e in self.entries.items() if e.spec is None and e.stamp < horizon]:
            del self.entries[url]
        return list(self.entries.values())
