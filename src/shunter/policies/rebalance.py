"""Rebalancing: moving one prompt between workers so cache-aware placement stays even.

``cache_aware`` places a new prompt on a worker holding the least text, and every later
request of that prompt follows it there. Placement is final, so a misplacement lasts as long
as the prompt does. A lone gateway seldom misplaces, since each placement lifts its worker
out of the smallest level before the next one is made. Peered gateways place different new
prompts in the same milliseconds, before they hear of each other: balls thrown into bins
without coordination. With 32 prompts over 8 workers, one worker then holds 5 prompts and
another 3 (requests max/min 5/3 = 1.67: 3 of 10 runs of 4 and 8 peered gateways ended at
1.54-1.67), or one prompt is split over two workers because two gateways placed it at once.

One gateway among the peers (the leader, ``peers/exchange.py``) repairs that: soon after a
placement, and every ``REBALANCE_SECS``, it plans at most one move per model (``plan_move``),
applies it to its tree and sends it to the peers, which apply it to theirs. A move hands a
prompt's subtree from one worker to another in the tree (``Tree.move``), so that every
gateway's next request of that prompt goes to the new worker; only one gateway decides, so
the gateways never move the same prompt in different directions or pile moves onto the same
worker.

What is moved is a **unit**: the texts that agree on their first ``UNIT_CHARS`` characters,
or, when every text shares a longer start, on everything up to where they first part. With
many system prompts a unit is one system prompt and its conversations; with one long shared
system prompt, one conversation. (Where a radix tree branches first is no guide on its own:
texts part at their first character by chance, "w1..." from "w2...", long before they part
as prompts, and a branch that held several prompts on several workers looked like one prompt
split over them.) Texts shorter than that are in no unit and never move. A unit's
**weight** on a worker is the characters it holds of the unit, shared equally between the
unit's holders; a worker's weight is the sum over units. Two moves, in this order:

1. **Consolidate**: a unit held by several workers goes to the one holding the least weight,
   and the others drop it. Skipped for a while after load overrode a match
   (``CacheAwarePolicy.rebalance``), since that is when ``cache_aware`` spreads a hot prompt
   over several workers on purpose.
2. **Even out**: when the heaviest worker outweighs the lightest by more than 1.25 of one of
   its units (moving that unit then narrows the gap by more than half a unit) and by more
   than ``MIN_GAP_SHARE`` of the mean weight (no churn over the noise of short texts), the
   unit that best halves the gap goes from the heaviest to the lightest.

A move costs the new worker one prefill of the prompt. The scan of the tree (``scan_units``)
is a generator that yields every ``SCAN_STEP`` nodes, so the caller hands the event loop back
between slices, as tree eviction does.

**Precise mode** (the engines' KV events) plans from the engines' units instead of the tree:
a unit is the prompts sharing their first block (``kv_events/index.py``), weighed by its
demand (the tokens of it stored new lately).
Every gateway subscribed to the same engines plans the same move from the same events, so
gateways that do not talk agree all the same; a unit held by several engines is its newest
holder's (the one requests go to), see ``engine_plans.py``. Prompts
that all share their first block (a fixed preamble of 16 tokens or more before anything
differs) make one unit there, and precise mode then has nothing to move.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass

from shunter.policies.tree import Tree

REBALANCE_SECS = 1.0  # between two moves: the last one reaches every peer in milliseconds
MIN_GAP_SHARE = 0.1  # of the mean weight: smaller gaps are left alone
UNIT_CHARS = 256  # texts agreeing this far are one unit (a peer learns whole 256-char blocks)
KEY_CHARS = 256  # of a unit's text sent to peers past its start: enough to find the branch
SCAN_STEP = 256  # nodes scanned between two yields of ``scan_units``
# A unit with more nodes than this is never moved: a move walks its whole subtree in one go
# on every gateway (a unit of 100,000 conversations took 71 ms), where the scan is sliced.
MAX_MOVE_NODES = 10_000
# Prompts that part later than this are not rebalanced: a move names its unit by the text
# leading to it, and peers refuse longer moves (a bound on what a peer can make us walk).
MAX_PATH_CHARS = 65_536


@dataclass(frozen=True, slots=True)
class Move:
    """Hand ``source``'s holdings of the unit that ``text`` enters at character ``cut`` to
    ``target``. ``text`` runs from the tree's root into the unit, at most ``KEY_CHARS``
    past ``cut``; ``chars`` is what ``source`` held of it (precise mode: the unit's demand,
    in tokens); ``reason`` says which of the two moves it is (``consolidate`` or ``even``)."""

    text: str
    cut: int
    source: str
    target: str
    chars: float
    reason: str
    key: int = 0  # an engine unit's key (precise mode: ``Unit.key``), 0 for the tree's


class Unit:
    """A unit (see the module's docstring). In the tree: ``text`` runs from the root into it
    (at most ``KEY_CHARS`` past its start, ``cut``), and ``held`` is per worker URL the
    characters that worker holds of it. In the engines' events (precise mode,
    ``kv_events/index.py``): ``key`` is its first block's key, ``held`` the blocks."""

    __slots__ = ("blocked", "cut", "held", "key", "nodes", "text")

    def __init__(
        self,
        text: str,
        cut: int,
        held: dict[str, float],
        key: int = 0,
        nodes: int = 0,
        blocked: frozenset[str] = frozenset(),
    ) -> None:
        self.text = text
        self.cut = cut
        self.held = held
        self.key = key
        self.nodes = nodes  # the tree's nodes below the cut (0: not from a tree)
        # Workers a move of it must not go to (precise mode: they hold an older copy, and
        # would not become its home by receiving it, ``engine_plans.py``).
        self.blocked = blocked


def scan_units(tree: Tree, eligible: Collection[str], found: list[Unit]) -> Iterator[None]:
    """Append ``tree``'s units, with what each worker in ``eligible`` holds of them, to
    ``found``; units none of them holds are left out. Yields every ``SCAN_STEP`` nodes: the
    tree may change between yields (requests insert into it), which makes the figures
    approximate, never wrong enough to matter (a move names its unit by text)."""
    node, path = tree.root, ""
    while len(node.children) == 1:  # the start every text shares
        node = next(iter(node.children.values()))
        path += node.text
        if len(path) > MAX_PATH_CHARS:
            return
    cut = max(len(path), UNIT_CHARS)
    # (a node, the text from the root to where its edge starts)
    stack = [(child, path) for child in node.children.values()]
    visited = 0
    while stack:
        top, above = stack.pop()
        text = above + top.text
        if len(text) <= cut:  # above the cut: its children may be units
            stack.extend((child, text) for child in top.children.values())
            continue
        held: dict[str, float] = {}
        nodes = 0
        below = [top]
        while below:
            node = below.pop()
            size = len(node.text) if node is not top else len(text) - cut  # below the cut
            for url in node.tenants:
                if url in eligible:
                    held[url] = held.get(url, 0) + size
            below.extend(node.children.values())
            visited += 1
            nodes += 1
            if visited % SCAN_STEP == 0:
                yield
        if held and nodes <= MAX_MOVE_NODES:
            found.append(Unit(text[: cut + KEY_CHARS], cut, held, nodes=nodes))


def plan_move(
    units: list[Unit],
    eligible: Collection[str],
    consolidate: bool = True,
    weight: dict[str, float] | None = None,
) -> Move | None:
    """The one move that best evens the ``units`` out over the workers in ``eligible``
    (those available and serving the model), or None. ``consolidate``: whether a unit held by
    several workers may be gathered onto one (not while load is imbalanced). ``weight``: the
    workers' weights, if the caller has them (``weights``)."""
    if len(units) < 2 or len(eligible) < 2:
        return None
    weight = weights(units, eligible) if weight is None else weight
    if consolidate:
        move = _consolidate(units, weight)
        if move is not None:
            return move
    return _even_out(units, weight)


def plan_moves(
    units: list[Unit], eligible: Collection[str], weight: dict[str, float], limit: int
) -> list[Move]:
    """Up to ``limit`` even-out moves at once, each planned on the weights the ones before
    it leave (precise mode, ``engine_plans.py``: one plan, agreed by every gateway, repairs
    several misplacements in one round instead of one per round)."""
    if len(eligible) < 2:
        return []
    weight = dict(weight)
    left = list(units)
    moves: list[Move] = []
    while len(moves) < limit and len(left) > 1:
        move = _even_out(left, weight)
        if move is None:
            break
        moves.append(move)
        weight[move.source] -= move.chars
        weight[move.target] += move.chars
        left = [u for u in left if (u.key, u.text) != (move.key, move.text)]
    return moves


def weights(units: list[Unit], eligible: Collection[str]) -> dict[str, float]:
    """Each eligible worker's weight: what it holds of each unit, a shared unit's size
    divided between its holders."""
    weight = dict.fromkeys(eligible, 0.0)
    for unit in units:
        share = 1 / len(unit.held)
        for url, chars in unit.held.items():
            weight[url] += chars * share
    return weight


def _consolidate(units: list[Unit], weight: dict[str, float]) -> Move | None:
    """The first unit (the largest) held by more than one worker: moved from its heaviest
    holder to its lightest (the next plans gather it further, one holder a move)."""
    shared = [u for u in units if len(u.held) > 1]
    if not shared:
        return None
    unit = max(shared, key=lambda u: (sum(u.held.values()), u.text, u.key))
    keeper = min(unit.held, key=lambda url: (weight[url], url))
    source = max((url for url in unit.held if url != keeper), key=lambda url: (weight[url], url))
    return Move(unit.text, unit.cut, source, keeper, unit.held[source], "consolidate", unit.key)


def _even_out(units: list[Unit], weight: dict[str, float]) -> Move | None:
    heaviest = max(weight, key=lambda url: (weight[url], url))
    lightest = min(weight, key=lambda url: (weight[url], url))
    gap = weight[heaviest] - weight[lightest]
    if gap <= MIN_GAP_SHARE * sum(weight.values()) / len(weight):
        return None
    best: Unit | None = None
    best_after = gap
    for unit in units:
        if list(unit.held) != [heaviest] or lightest in unit.blocked:
            continue  # only the heaviest's own units: a shared one is consolidated first
        chars = unit.held[heaviest]
        after = abs(gap - 2 * chars)  # the gap once this unit has moved
        if after < gap - chars / 2 and after < best_after:
            best, best_after = unit, after
    if best is None:
        return None
    return Move(best.text, best.cut, heaviest, lightest, best.held[heaviest], "even", best.key)
