"""Precise mode's rebalancing: a plan from the engines' KV events, made in the background.

In precise mode the engines' events, not the tree, say where a prompt is, so the leader's
moves in the tree (``rebalance.py``, ``peers/exchange.py``) do not apply. Instead every
gateway plans from the events on its own: a unit is the prompts sharing their first block
(``kv_events/index.py``), and ``plan_moves`` picks up to ``MAX_MOVES`` moves that even the
engines out, each planned on the weights the ones before it leave, so one round repairs
several misplacements. Gateways reading the same events plan the same moves, so they agree
without talking (4 independent precise gateways over 8 sims: requests max/min 1.48-2.16
before this, 1.05-1.40 over 21 runs with it, ``bench/README.md``).

- **A unit's home is its newest holder.** Between engines holding a prompt's run alike (a
  prompt placed on two at once, or one moved whose old copy is not evicted yet) a request
  goes to the engine that began holding the unit last by the engines' clock (``cache_aware``'s
  tie-break, ``kv_events/units.py``), the same on every gateway, so all of them follow a
  move once its target's events arrive, as peered gateways follow a move in their trees.
  Gathering on the lighter holder instead let each change of the weights send a prompt
  back and forth, undoing the moves made to even the engines out (4 independent gateways
  over 8 sims ended with 5 prompts on an engine that began with 3). So a move never goes to
  an engine holding an older copy: receiving it would not make that engine its home.
- **Weighed by demand, all of it on the home.** A unit weighs its demand (the tokens of it
  stored new lately, ``kv_events/units.py``) on its home alone: old copies draw no new
  requests. Not the blocks held: those stop telling engines apart once the caches are full.
  A unit is all the prompts sharing a first block, so where several system prompts share
  one (a long fixed preamble), its demand sits on one engine while others serve some of its
  prompts by their longer runs; such a fleet's plans are coarse, as ``rebalance.py`` says.
- **Off the request path.** A plan is made by a background task every ``PLAN_SECS``, when
  the events changed; a request only reads the latest (``moved_to``). Fleets caching more
  than ``MAX_UNITS`` units are not planned for: sorting 100,000 units took ~0.5 s, and with
  that many units, placement's noise averages out anyway.
- **A cold unit is passed over.** A move happens only as its prompt's requests arrive; a
  planned unit no request took within ``COLD_SECS`` (its prompt is no longer asked for) is
  left out of plans for ``PASS_OVER_SECS``, so it does not hold up the next move.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from shunter.aio.periodic import Periodic
from shunter.fleet.registry import Workers
from shunter.fleet.worker import Worker
from shunter.policies.rebalance import Move, Unit, plan_moves, weights

PLAN_SECS = 0.1  # between plans (50 ms measured no better on the replicas bench)
MAX_UNITS = 1024  # more units than this: no plan (a plan of 1,024 takes ~1-2 ms)
MAX_MOVES = 4  # per plan (traced: 2-3 engines a prompt off after a burst of new prompts)
COLD_SECS = 1.0
PASS_OVER_SECS = 30.0


class EngineUnit(Protocol):
    """A unit as the plan reads it (``kv_events/units.py`` lists them)."""

    @property
    def key(self) -> int: ...

    @property
    def holders(self) -> tuple[str, ...]:
        """The workers holding it, its home last."""
        ...

    @property
    def demand(self) -> float: ...

    @property
    def tokens(self) -> int:
        """What its home holds of it: what a move of it brings its target."""
        ...


class EngineUnits(Protocol):
    """What the plan reads of the engines' events (``kv_events/hub.py``)."""

    def tracks(self, url: str) -> bool: ...

    def version(self, model: str) -> int:
        """Changes whenever ``units`` would answer differently."""
        ...

    def units(
        self, model: str, eligible: Collection[str], limit: int
    ) -> Sequence[EngineUnit] | None:
        """The units held by workers in ``eligible``, in key order; None when there are more
        than ``limit``."""
        ...

    def unit_of(self, model: str, text: str, chat: bytes | None = None) -> int | None:
        """The key of a request's unit (None: too short to have one)."""
        ...


@dataclass(slots=True)
class _Plan:
    version: int  # of the events it was made from
    moves: dict[int, Move]  # by unit key
    tokens: dict[int, int]  # unit key -> the tokens its move brings its target
    since: dict[int, float]  # unit key -> when its move was first planned
    taken: set[int]  # units a request has moved
    sources: frozenset[str]  # the moves' sources: a request headed elsewhere is not looked up


def _no_plan(version: int) -> _Plan:
    return _Plan(version, {}, {}, {}, set(), frozenset())


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

    def watch(self, model: str, workers: Workers) -> None:
        """Plan ``model`` over ``workers`` from now on (its latest request's snapshot)."""
        self._workers[model] = workers

    def arriving(self, model: str) -> list[tuple[str, int]]:
        """Per planned move of ``model``, its target and the tokens it brings there."""
        plan = self.plans.get(model)
        if plan is None:
            return []
        return [(move.target, plan.tokens[key]) for key, move in plan.moves.items()]

    def moved_to(
        self,
        model: str,
        holder: Worker,
        by_url: Mapping[str, Worker],
        text: str,
        chat: bytes | None,
    ) -> Worker | None:
        """Where this request's prompt goes instead of ``holder``, its engine: a planned
        move's target, when the prompt is the move's unit, ``holder`` its source and the
        target available; else None. The prompt's unit is asked for (a second tokenization,
        the hub's cache aside) only for requests headed to a move's source."""
        plan = self.plans.get(model)
        if plan is None or holder.url not in plan.sources:
            return None
        unit = self.engines.unit_of(model, text, chat)
        move = None if unit is None else plan.moves.get(unit)
        if move is None or move.source != holder.url:
            return None
        target = by_url.get(move.target)
        if target is None or not target.state.available:
            return None
        plan.taken.add(move.key)
        return target

    # --- the background task ---------------------------------------------------------------

    def plan_all(self) -> None:
        now = time.monotonic()
        for model, workers in list(self._workers.items()):
            self.plan(model, workers, now)

    def plan(self, model: str, workers: Workers, now: float) -> None:
        engines = self.engines
        version = engines.version(model)
        last = self.plans.get(model) or _no_plan(-1)
        if last.version == version:
            return
        cold = self._cold
        for key in last.moves:
            if key not in last.taken and now - last.since[key] >= COLD_SECS:
                cold[key] = now + PASS_OVER_SECS
        for key in [k for k, until in cold.items() if until <= now]:
            del cold[key]
        eligible = {w.url for w in workers if w.state.available and engines.tracks(w.url)}
        listed = engines.units(model, eligible, MAX_UNITS)
        if listed is None:
            self.plans[model] = _no_plan(version)
            return
        # All of a unit's demand on its home, the last to begin holding it (see above); a
        # move never goes to an older holder.
        units = [
            Unit("", 0, {unit.holders[-1]: unit.demand}, unit.key, blocked=frozenset(unit.holders))
            for unit in listed
        ]
        weight = weights(units, eligible)  # cold units take room all the same
        warm = [unit for unit in units if unit.key not in cold]
        moves = {m.key: m for m in plan_moves(warm, eligible, weight, MAX_MOVES)}
        tokens = {unit.key: unit.tokens for unit in listed if unit.key in moves}
        # A move planned before, the same way, keeps its age and whether it was taken.
        kept = {key for key, m in moves.items() if _same(last.moves.get(key), m)}
        since = {key: last.since[key] if key in kept else now for key in moves}
        sources = frozenset(m.source for m in moves.values())
        self.plans[model] = _Plan(version, moves, tokens, since, last.taken & kept, sources)


def _same(planned: Move | None, move: Move) -> bool:
    """Whether two plans move the same unit the same way (its size may have changed)."""
    return planned is not None and (planned.key, planned.source, planned.target) == (
        move.key,
        move.source,
        move.target,
    )
