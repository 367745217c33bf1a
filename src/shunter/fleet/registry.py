"""The worker registry: immutable snapshots, replaced copy-on-write.

Readers take no lock and copy nothing: every index lives in one frozen ``_Snapshot`` and a
read is an attribute load plus a dict lookup that returns a tuple, whatever the fleet size.
Writers (add, remove, update: rare) serialise on a lock, build the next snapshot from the
current one and publish it with a single assignment, so a reader sees either the old
fleet or the new one, never half of a change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from shunter.fleet.worker import Worker, WorkerType

Workers = tuple[Worker, ...]
EMPTY: Workers = ()
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    by_url: dict[str, Worker] = field(default_factory=dict)
    by_model: dict[str, Workers] = field(default_factory=dict)
    # Per model, the workers that serve SGLang's native endpoints (/generate).
    native_by_model: dict[str, Workers] = field(default_factory=dict)
    by_type: dict[WorkerType, Workers] = field(default_factory=dict)
    # Per (worker type, model): the pools a prefill/decode pair is chosen from.
    by_pool: dict[tuple[WorkerType, str], Workers] = field(default_factory=dict)
    all: Workers = EMPTY
    models: tuple[str, ...] = ()
    # The fleet's only model and its workers, when it serves exactly one (else None).
    only_model: tuple[str, Workers] | None = None


def _reindex(
    index: dict[K, Workers],
    keys_of: Callable[[Worker], Iterable[K]],
    old: Worker | None,
    new: Worker | None,
) -> dict[K, Workers]:
    """A copy of ``index`` with ``old`` replaced by ``new`` (either may be None).

    A replaced worker keeps its position, so round-robin order survives an update.
    """
    old_keys = set(keys_of(old)) if old is not None else set()
    new_keys = list(keys_of(new)) if new is not None else []
    if not old_keys and not new_keys:
        return index
    result = dict(index)
    for key in old_keys - set(new_keys):
        remaining = tuple(w for w in result.get(key, EMPTY) if w is not old)
        if remaining:
            result[key] = remaining
        else:
            result.pop(key, None)
    for key in new_keys:
        current = result.get(key, EMPTY)
        assert new is not None
        if key in old_keys:
            result[key] = tuple(new if w is old else w for w in current)
        else:
            result[key] = (*current, new)
    return result


def _models_of(worker: Worker) -> tuple[str, ...]:
    return worker.model_ids


def _native_models_of(worker: Worker) -> tuple[str, ...]:
    return worker.model_ids if worker.serves_generate else ()


def _pools_of(worker: Worker) -> tuple[tuple[WorkerType, str], ...]:
    return tuple((worker.worker_type, model) for model in worker.model_ids)


class WorkerRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snap = _Snapshot()

    # --- reads: no lock, no copy --------------------------------------------------------

    def get_by_model(self, model_id: str) -> Workers:
        return self._snap.by_model.get(model_id, EMPTY)

    def get_native_by_model(self, model_id: str) -> Workers:
        """The model's workers that serve SGLang's native endpoints."""
        return self._snap.native_by_model.get(model_id, EMPTY)

    def get_by_url(self, url: str) -> Worker | None:
        return self._snap.by_url.get(url)

    def get_by_type(self, worker_type: WorkerType) -> Workers:
        return self._snap.by_type.get(worker_type, EMPTY)

    def get_pool(self, worker_type: WorkerType, model_id: str) -> Workers:
        """The model's workers of one type: its prefill or decode pool in a PD fleet."""
        return self._snap.by_pool.get((worker_type, model_id), EMPTY)

    def all(self) -> Workers:
        return self._snap.all

    def models(self) -> tuple[str, ...]:
        return self._snap.models

    def only_model(self) -> tuple[str, Workers] | None:
        """(model id, workers) when the fleet serves exactly one model, else None."""
        return self._snap.only_model

    def __len__(self) -> int:
        return len(self._snap.all)

    def stats(self) -> dict[str, Any]:
        snap = self._snap
        return {
            "total_workers": len(snap.all),
            "total_models": len(snap.models),
            "healthy_workers": sum(1 for w in snap.all if w.state.healthy),
            "total_load": sum(w.state.in_flight for w in snap.all),
            "regular_workers": len(snap.by_type.get(WorkerType.REGULAR, EMPTY)),
            "prefill_workers": len(snap.by_type.get(WorkerType.PREFILL, EMPTY)),
            "decode_workers": len(snap.by_type.get(WorkerType.DECODE, EMPTY)),
        }

    # --- writes: copy-on-write under the lock -------------------------------------------

    def register(self, worker: Worker) -> Worker | None:
        """Add ``worker``, or replace the worker with the same URL (an upsert).

        Returns the worker it replaced, if any.
        """
        with self._lock:
            old = self._snap.by_url.get(worker.url)
            self._publish(old, worker)
            return old

    def remove(self, url: str) -> Worker | None:
        """Remove the worker with this exact URL; returns it, or None if unknown."""
        with self._lock:
            old = self._snap.by_url.get(url)
            if old is not None:
                self._publish(old, None)
            return old

    def remove_base_url(self, base_url: str) -> list[Worker]:
        """Remove the worker at ``base_url`` and every DP rank ``base_url@k`` of it."""
        with self._lock:
            victims = [w for w in self._snap.all if w.url == base_url or w.base_url == base_url]
            for worker in victims:
                self._publish(worker, None)
            return victims

    def _publish(self, old: Worker | None, new: Worker | None) -> None:
        snap = self._snap
        by_url = dict(snap.by_url)
        if old is not None:
            del by_url[old.url]
        if new is not None:
            by_url[new.url] = new
        if old is not None and new is not None:
            workers = tuple(new if w is old else w for w in snap.all)
        elif new is not None:
            workers = (*snap.all, new)
        else:
            workers = tuple(w for w in snap.all if w is not old)
        by_model = _reindex(snap.by_model, _models_of, old, new)
        models = tuple(by_model)
        self._snap = _Snapshot(
            by_url=by_url,
            by_model=by_model,
            native_by_model=_reindex(snap.native_by_model, _native_models_of, old, new),
            by_type=_reindex(snap.by_type, lambda w: (w.worker_type,), old, new),
            by_pool=_reindex(snap.by_pool, _pools_of, old, new),
            all=workers,
            models=models,
            only_model=(models[0], by_model[models[0]]) if len(models) == 1 else None,
        )
