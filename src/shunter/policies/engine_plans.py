"""Precise mode's rebalancing: a plan from the engines' KV events, made in the background.

In precise mode the engines' events, not the tree, say where a prompt is, so the leader's
moves in the tree (``rebalance.py``, ``peers/exchange.py``) do not apply. Instead every
gateway plans from the events on its own: a unit is the prompts sharing their first block
(``kv_events/index.py``), weighed in blocks, and ``plan_move`` picks the move that evens the
engines out. Gateways reading the same events plan the same move, so they agree without
talking (independent precise gateways over 8 sims: requests max/min 1.48-2.16 before this,
1.00-1.48 after, ``bench/README.md``).

- **Off the request path.** A plan is made by a background task every ``PLAN_SECS``, when
  the events changed; a request only reads the latest (``read``). Fleets caching more than
  ``MAX_UNITS`` units are not planned for: sorting 100,000 units took ~0.5 s, and with that
  many units, placement's noise averages out anyway.
- **Gathering is a tie-break, not a move.** Between engines holding a prompt's run alike (a
  prompt placed on two at once, or one moved whose old copy is not evicted yet) the lighter
  one takes it (``weight``, read with the plan). Planned as moves, gathering a stale copy
  held up every later move until the old engine evicted it.
- **A cold unit is passed over.** A move happens only as its prompt's requests arrive; a
  planned unit no request took within ``COLD_SECS`` (its prompt is no longer asked for) is
  left out of plans for ``PASS_OVER_SECS``, so it does not hold up the next move.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

from shunter.aio.periodic import Periodic
from shunter.fleet.registry import Workers
from shunter.fleet.worker import Worker
from shunter.policies.rebalance import Move, Unit, plan_move, weights

PLAN_SECS = 0.1  # between plans (50 ms measured no better on the replicas bench)
MAX_UNITS = 1024  # more units than this: no plan (a plan of 1,024 takes ~1-2 ms)
COLD_SECS = 1.0
PASS_OVER_SECS = 30.0
_NO_WEIGHT: Mapping[str, float] = {}


class EngineUnits(Protocol):
    """What the plan reads of the engines' events (``kv_events/hub.py``)."""

    def tracks(self, url: str) -> bool: ...

    def version(self, model: str) -> int:
        """Changes whenever ``units`` would answer differently."""
        ...

    def units(
        self, model: str, eligible: Collection[str], limit: int
    ) -> list[tuple[int, dict[str, int]]] | None:
        """The engines' units: each key with the blocks each worker in ``eligible`` holds of
        it, in key order; None when there are more than ``limit``."""
        ...

    def unit_of(self, model: str, text: str, chat: bytes | None = None) -> int | None:
        """The key of a request's unit (None: too short to have one)."""
        ...


@dataclass(slots=True)
class _Plan:
    version: int  # of the events it was made from
    move: Move | None
    weight: Mapping[str, float]
    since: float  # when this move was first planned
    taken: bool = False  # a request has moved


class EnginePlans:
    def __init__(self, engines: EngineUnits) -> None:
        self.engines = engines
        self.plans: dict[str, _Plan] = {}
        self._workers: dict[str, Workers] = {}  # per model, the workers its last request saw
        self._cold: dict[int, float] = {}  # unit key -> until when it is passed over
        self._task = Periodic("engine rebalancing", PLAN_SECS, self.plan_all)

    def start(self) -> None:
        self._task.start()

    async def stop(self) -> None:
        await self._task.stop()

    # --- the request path ------------------------------------------------------------------

    def read(self, model: str, workers: Workers) -> Mapping[str, float]:
        """The latest plan's engine weights for ``model`` (a dictionary read), and which
        workers to plan over next."""
        self._workers[model] = workers
        plan = self.plans.get(model)
        return _NO_WEIGHT if plan is None else plan.weight

    def moved_to(
        self,
        model: str,
        holder: Worker,
        by_url: Mapping[str, Worker],
        text: str,
        chat: bytes | None,
    ) -> Worker | None:
        """Where this request's prompt goes instead of ``holder``, its engine: the planned
        move's target, when the prompt is the move's unit, ``holder`` its source and the
        target available; else None. The prompt's unit is asked for (a second tokenization,
        the hub's cache aside) only for requests headed to the move's source."""
        plan = self.plans.get(model)
        move = None if plan is None else plan.move
        if plan is None or move is None or move.source != holder.url:
            return None
        target = by_url.get(move.target)
        if target is None or not target.state.available:
            return None
        if self.engines.unit_of(model, text, chat) != move.key:
            return None
        plan.taken = True
        return target

    # --- the background task ---------------------------------------------------------------

    def plan_all(self) -> None:
        now = time.monotonic()
        for model, workers in list(self._workers.items()):
            self.plan(model, workers, now)

    def plan(self, model: str, workers: Workers, now: float) -> None:
        engines = self.engines
        version = engines.version(model)
        last = self.plans.get(model)
        if last is not None and last.version == version:
            return
        if (
            last is not None
            and last.move is not None
            and not last.taken
            and (now - last.since >= COLD_SECS)
        ):
            self._cold[last.move.key] = now + PASS_OVER_SECS
        cold = self._cold
        for key in [k for k, until in cold.items() if until <= now]:
            del cold[key]
        eligible = {w.url for w in workers if w.state.available and engines.tracks(w.url)}
        listed = engines.units(model, eligible, MAX_UNITS)
        if listed is None:
            self.plans[model] = _Plan(version, None, _NO_WEIGHT, now)
            return
        units = [Unit("", 0, held, key) for key, held in listed]
        weight = weights(units, eligible)  # cold units take room all the same
        warm = [unit for unit in units if unit.key not in cold]
        move = plan_move(warm, eligible, False, weight)
        if last is not None and move is not None and _same(last.move, move):
            self.plans[model] = _Plan(version, move, weight, last.since, last.taken)
        else:
            self.plans[model] = _Plan(version, move, weight, now)


def _same(planned: Move | None, move: Move) -> bool:
    """Whether two plans move the same unit the same way (its size may have changed)."""
    return planned is not None and (planned.key, planned.source, planned.target) == (
        move.key,
        move.source,
        move.target,
    )
