"""Workers changed by hand, shared: last-writer-wins maps of what ``/workers`` was told.

Two kinds of change, each ordered by ``(stamp, origin)`` (wall-clock nanoseconds, strictly
increasing per gateway, then the gateway's node id), so every gateway settles on the same
answer whatever order the changes arrive in:

- a worker's **spec**, per URL (``ManualWorker``): the ``POST /workers`` body, or the body
  of a whole-spec ``PUT /workers/{id}`` (which replaces the worker under its id), with the
  id the API gave it (every gateway registers it under that id, so ``/workers/{id}`` means
  the same worker on each); or ``None`` for a ``DELETE`` (a tombstone, kept
  ``TOMBSTONE_SECS`` so a late or replayed addition cannot bring the worker back);
- a worker's **settings** changed in place (``PATCH``, or a ``PUT`` without ``url``), one
  register per ``(url, field, label key)`` (``WorkerSetting``): two gateways changing
  different settings of a worker at once both keep both changes; the same setting ends
  with the later value. A spec newer than a setting replaces it (a ``PUT`` or a re-``POST``
  after a ``DELETE`` starts from its own body); a setting older than the spec is ignored.

A peer's change that wins is applied as the API applies it here: a newer spec adds the
worker (``Fleet.submit_add``) or, where this gateway has a worker at that URL, replaces it
keeping its id, the old spec serving until the new one is reached
(``Fleet.submit_replace``); a tombstone removes it; settings update the running worker in
place (``Fleet.update``). A spec carries the newer settings folded in, so a gateway that
adds a worker it just learnt of (after a restart, say) starts it with them, an ``api_key``
changed by ``PATCH`` included. A worker with an addition or replacement under way is left
to it: the latest spec is applied once that job ends (``_pending``, checked on every
registration and on the exchange's tick), and settings are applied again to every worker
registered at a URL that has any, whatever registered it, since the job's spec may predate
them.

Workers given by flag (``--worker-urls``) or found by discovery are each gateway's own and
are never announced, but what the API does to them is a change by hand like any other: a
``DELETE`` (as before) and a ``PATCH`` are shared by URL, so the processes of ``--workers
N`` (which all hold the same flag and discovered workers) keep one view of them, and a
replica holding a worker at that URL applies the change too. A whole-spec ``PUT`` gives the
worker a spec by hand: from then on it is shared as a ``POST``ed worker is (a gateway
without one at that URL adds it). A setting for a URL a gateway does not hold (yet) is
kept, and applied if a worker is registered there (a peer's ``POST`` arriving later, a
restart's flag workers, discovery). A peer's ``POST`` for a URL this gateway holds by flag
replaces that worker with the posted spec (it keeps its own id): the latest spec given by
hand wins everywhere.

Loops are impossible by construction: a change learnt from a peer is applied to the fleet
directly (never through the API that records local changes), and merging a change already
held does nothing. Both maps are also sent every few seconds, learnt entries included, so
a gateway that restarts learns every hand-registered worker with its latest spec and
settings from any peer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from shunter.fleet.fleet import Fleet
from shunter.fleet.ids import parse_worker_id
from shunter.fleet.jobs import QueueFull
from shunter.fleet.spec import SpecError, WorkerSpec, check_update
from shunter.fleet.worker import Worker
from shunter.peers.messages import ManualWorker, WorkerSetting

log = logging.getLogger("shunter.peers")

TOMBSTONE_SECS = 600.0

Version = tuple[int, str]
SettingValue = str | int | float | None


def _version(change: ManualWorker | WorkerSetting) -> Version:
    return change.stamp, change.origin


class ManualWorkers:
    def __init__(self, node: str, fleet: Fleet) -> None:
        self.node = node
        self.fleet = fleet
        self.entries: dict[str, ManualWorker] = {}  # url -> its latest spec or removal
        self.settings: dict[str, dict[tuple[str, str], WorkerSetting]] = {}  # url -> latest
        # URLs whose latest spec waits for a job under way on the worker to end.
        self._pending: set[str] = set()
        self._last_stamp = 0
        self.rejected = 0  # peers' specs and settings this gateway could not take
        fleet.subscribe(self._membership)

    def _stamp(self) -> int:
        self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
        return self._last_stamp

    # --- local changes (the API) -------------------------------------------------------------

    def added(self, url: str, body: dict[str, object], worker_id: str) -> ManualWorker:
        """A spec given here: ``POST /workers``, or a whole-spec ``PUT`` (``replaced``)."""
        entry = ManualWorker(url, self._stamp(), self.node, json.dumps(body).encode(), worker_id)
        self._set_spec(entry)
        return entry

    replaced = added

    def removed(self, url: str) -> ManualWorker:
        entry = ManualWorker(url, self._stamp(), self.node, None)
        self._set_spec(entry)
        return entry

    def updated(self, url: str, changes: dict[str, Any]) -> list[WorkerSetting]:
        """Settings changed here in place (``changes``: as ``spec.check_update`` passed it)."""
        stamp = self._stamp()
        made = [
            WorkerSetting(url, stamp, self.node, field, key, value)
            for field, key, value in _flatten(changes)
        ]
        for setting in made:
            self.settings.setdefault(url, {})[setting.field, setting.key] = setting
        return made

    def _set_spec(self, entry: ManualWorker) -> None:
        """Hold ``entry`` as the URL's spec; settings older than it are replaced by it."""
        self.entries[entry.url] = entry
        held = self.settings.get(entry.url)
        if held is not None:
            newer = {k: s for k, s in held.items() if _version(s) > _version(entry)}
            if newer:
                self.settings[entry.url] = newer
            else:
                del self.settings[entry.url]

    # --- peers' changes --------------------------------------------------------------------

    def merge(
        self, specs: Sequence[ManualWorker], settings: Sequence[WorkerSetting] = ()
    ) -> tuple[int, int]:
        """Take a peer's changes that are newer than ours, then apply them to the fleet (each
        worker once, after the whole batch is merged); how many specs and settings won."""
        respecified = {entry.url: None for entry in specs if self._merge_spec(entry)}
        changed: dict[str, list[WorkerSetting]] = {}
        for setting in settings:
            if self._merge_setting(setting):
                changed.setdefault(setting.url, []).append(setting)
        for url in respecified:
            self._apply_spec(url)
        for url, won in changed.items():
            if url not in respecified:  # a new spec carries the settings folded in
                self._apply_settings(url, won)
        return len(respecified), sum(len(won) for won in changed.values())

    def _merge_spec(self, entry: ManualWorker) -> bool:
        held = self.entries.get(entry.url)
        if held is not None and _version(held) >= _version(entry):
            return False
        self._set_spec(entry)
        self._last_stamp = max(self._last_stamp, entry.stamp)
        return True

    def _merge_setting(self, setting: WorkerSetting) -> bool:
        spec = self.entries.get(setting.url)
        if spec is not None and _version(spec) >= _version(setting):
            return False  # made before the spec that replaced it
        held = self.settings.setdefault(setting.url, {})
        slot = (setting.field, setting.key)
        if slot in held and _version(held[slot]) >= _version(setting):
            return False
        held[slot] = setting
        self._last_stamp = max(self._last_stamp, setting.stamp)
        problem = _problem(setting)
        if problem is not None:  # held all the same: it is the latest, and not counted twice
            self._reject("a peer's worker setting is not valid here", setting, problem)
        return True

    def _apply_spec(self, url: str) -> None:
        """Make this gateway's worker at ``url`` what its latest spec says."""
        entry = self.entries.get(url)
        if entry is None:
            return
        if self._busy(url):
            self._pending.add(url)
            return
        self._pending.discard(url)
        fleet = self.fleet
        if entry.spec is None:
            if fleet.find(url):
                fleet.remove(url)
                log.info("removed a worker a peer removed", extra={"url": url})
            return
        spec = self._spec(entry)
        if spec is None:
            return
        held = fleet.taken(spec)
        if held is not None and self._busy(held):
            self._pending.add(url)
            return
        try:
            if held is None:
                fleet.submit_add(spec)
            else:
                fleet.submit_replace(held, spec)
        except QueueFull:
            self.rejected += 1
            log.warning("a peer's worker could not be queued", extra={"url": url})
            return
        what = "adding a worker a peer registered" if held is None else "replacing a worker"
        log.info(what, extra={"url": spec.url, "id": spec.worker_id, "from": entry.origin})

    def _apply_settings(self, url: str, won: Iterable[WorkerSetting]) -> None:
        """Update the running worker at ``url`` in place, as ``PATCH`` does. One not
        registered (yet) takes them when it is (``_registered``)."""
        valid = [s for s in won if _problem(s) is None]
        if not valid or not self.fleet.find(url):
            return
        changes = _as_changes(valid)
        self.fleet.update(url, changes)
        log.info(
            "updated a worker as a peer did",
            extra={"url": url, "fields": sorted(changes), "from": valid[-1].origin},
        )

    def _spec(self, entry: ManualWorker) -> WorkerSpec | None:
        """The spec ``entry`` gives, the newer settings folded in; None when it is invalid
        here (counted and logged)."""
        try:
            body = _folded(json.loads(entry.spec or b""), self._effective(entry.url))
            spec = WorkerSpec.from_json(body)
        except (ValueError, SpecError) as exc:  # json's errors are ValueErrors
            self._reject("a peer's worker is not valid here", entry, str(exc))
            return None
        worker_id = parse_worker_id(entry.worker_id)
        if worker_id is not None:  # else (an older peer's) one derived from the URL
            spec.worker_id = worker_id
        return spec

    def _effective(self, url: str) -> list[WorkerSetting]:
        """The URL's settings that hold now (every one held is newer than its spec)."""
        return [s for s in self.settings.get(url, {}).values() if _problem(s) is None]

    def _busy(self, url: str) -> bool:
        """Whether an addition or replacement of ``url`` is queued or under way."""
        job = self.fleet.job_status(url)
        return job is not None and job.status in ("pending", "processing")

    def _reject(self, what: str, change: ManualWorker | WorkerSetting, error: str) -> None:
        self.rejected += 1
        log.warning(what, extra={"url": change.url, "origin": change.origin, "error": error})

    # --- the fleet's side ----------------------------------------------------------------

    def _membership(self, added: Sequence[Worker], removed: Sequence[Worker]) -> None:
        """A worker was registered (added, or replaced): once the job that did it has ended
        (the loop's next turn), apply a spec that waited for it, and the URL's settings."""
        due = {w.base_url for w in added} & (self._pending | self.settings.keys())
        if due:
            loop = asyncio.get_running_loop()
            for url in due:
                loop.call_soon(self._registered, url)

    def _registered(self, url: str) -> None:
        if url in self._pending:
            self._apply_spec(url)
        if self._busy(url):
            return  # its registration comes back here
        settings = self._effective(url)
        if settings and self.fleet.find(url):
            self.fleet.update(url, _as_changes(settings))

    def retry_pending(self) -> None:
        """Apply the specs that waited for a job which has ended without registering a
        worker (a failed addition): on the exchange's tick."""
        for url in [u for u in self._pending if not self._busy(u)]:
            self._apply_spec(url)

    # --- catching up -------------------------------------------------------------------------

    def snapshot(self, now_ns: int | None = None) -> list[ManualWorker]:
        """Every spec (old tombstones forgotten first), for a periodic full send."""
        horizon = (time.time_ns() if now_ns is None else now_ns) - int(TOMBSTONE_SECS * 1e9)
        for url in [u for u, e in self.entries.items() if e.spec is None and e.stamp < horizon]:
            del self.entries[url]
        return list(self.entries.values())

    def settings_snapshot(self) -> list[WorkerSetting]:
        """Every setting held, sent with ``snapshot``."""
        return [s for held in self.settings.values() for s in held.values()]


def _flatten(changes: dict[str, Any]) -> list[tuple[str, str, SettingValue]]:
    """A checked ``PATCH`` body as ``(field, label key, value)`` settings. A ``None`` leaves
    a setting as it is, except for ``api_key``, which it removes (as ``Registrar.update``)."""
    flat: list[tuple[str, str, SettingValue]] = []
    for field, value in changes.items():
        if field == "labels":
            flat += [("labels", str(k), str(v)) for k, v in (value or {}).items()]
        elif value is not None or field == "api_key":
            flat.append((field, "", value))
    return flat


def _as_changes(settings: Iterable[WorkerSetting]) -> dict[str, Any]:
    """Settings as the ``PATCH`` body that makes them."""
    changes: dict[str, Any] = {}
    for setting in settings:
        if setting.field == "labels":
            changes.setdefault("labels", {})[setting.key] = setting.value
        else:
            changes[setting.field] = setting.value
    return changes


def _problem(setting: WorkerSetting) -> str | None:
    """Why a peer's setting cannot be applied here (``PATCH``'s own checks), or None."""
    if setting.field == "labels" and not isinstance(setting.value, str):
        return "a label's value must be a string"
    if setting.field != "labels" and setting.key:
        return f"'{setting.field}' takes no key"
    try:
        check_update(_as_changes((setting,)))
    except SpecError as exc:
        return str(exc)
    return None


def _folded(body: Any, settings: Sequence[WorkerSetting]) -> Any:
    """A ``POST``/``PUT`` body with ``settings`` applied, as a ``PATCH`` after it would."""
    if not settings or not isinstance(body, dict):
        return body
    changes = _as_changes(settings)
    labels = changes.pop("labels", None)
    folded = {**body, **changes}
    given = body.get("labels")
    if labels and (given is None or isinstance(given, dict)):  # else from_json says why
        folded["labels"] = {**(given or {}), **labels}
    return folded
