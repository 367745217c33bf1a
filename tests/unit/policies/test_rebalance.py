"""Moving prompts between workers: the tree's move, the plan (units, consolidation, evening
out) and the cache-aware policy applying moves and redirecting late decisions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import pytest

from shunter.fleet.worker import Worker
from shunter.kv_events.hub import KvEvents
from shunter.kv_events.wire import BlockRemoved, BlockStored
from shunter.policies import engine_plans
from shunter.policies.base import RouteRequest
from shunter.policies.cache_aware import LOAD_BAND, CacheAwareConfig, CacheAwarePolicy
from shunter.policies.engine_plans import EnginePlans
from shunter.policies.rebalance import UNIT_CHARS, Move, Unit, plan_move, scan_units
from shunter.policies.tree import Tree
from shunter.tokenizer.words import text_ids

from support.fakes import WithoutUnits, make_worker


def prompt(n: int, words: int = 200) -> str:
    """A system prompt of its own; every one starts with "w", as the bench's do."""
    return " ".join(f"w{(n * 7919 + i * 31) % 5000}" for i in range(words))


def units_of(tree: Tree, eligible: set[str]) -> list[Unit]:
    found: list[Unit] = []
    for _ in scan_units(tree, eligible, found):
        pass
    return found


def fleet(n: int) -> tuple[Worker, ...]:
    return tuple(make_worker(f"http://w{i}", models=("m",)) for i in range(n))


def holders(tree: Tree, text: str) -> Mapping[str, float]:
    return tree.match(text)[1]


# --- Tree.move ----------------------------------------------------------------------------


def test_a_move_hands_the_subtree_below_the_cut_and_the_path_to_it() -> None:
    tree = Tree()
    shared = "x" * 300
    tree.insert(shared + "first prompt " * 10, "a", 1.0)
    tree.insert(shared + "first prompt " * 10 + "user 1", "a", 2.0)
    tree.insert(shared + "second prompt " * 10, "a", 3.0)
    before = tree.tenant_chars["a"]
    moved = tree.move(shared + "first", 300, "a", "b", 5.0)
    assert moved == len("first prompt " * 10 + "user 1")
    assert tree.tenant_chars["a"] == before - moved
    assert tree.tenant_chars["b"] == 300 + moved  # the path to the unit too
    assert holders(tree, shared + "first prompt " * 10 + "user 1") == {"b": 5.0}
    assert holders(tree, shared + "second prompt " * 10) == {"a": 3.0}  # left alone
    assert tree.held(shared, "a") == (300, 3.0)  # a keeps the shared start


def test_a_move_splits_an_edge_at_the_cut() -> None:
    tree = Tree()
    text = "y" * 1000
    tree.insert(text, "a", 1.0)
    assert tree.move(text[:400], 256, "a", "b", 2.0) == 1000 - 256
    assert tree.held(text, "a") == (256, 1.0)
    assert holders(tree, text) == {"b": 2.0}


def test_a_move_of_what_the_tree_does_not_hold_changes_nothing() -> None:
    tree = Tree()
    tree.insert("z" * 600, "a", 1.0)
    assert tree.move("q" * 600, 256, "a", "b", 2.0) == 0  # another text
    assert tree.move("z" * 100 + "q" * 400, 256, "a", "b", 2.0) == 0  # parts before the cut
    assert tree.move("z" * 600, 256, "c", "b", 2.0) == 0  # c holds none of it
    assert tree.move("z" * 200, 256, "a", "b", 2.0) == 0  # the text stops short of the cut
    assert "b" not in tree.tenant_chars or tree.tenant_chars["b"] == 0
    assert holders(tree, "z" * 600) == {"a": 1.0}


# --- the plan -----------------------------------------------------------------------------


def test_units_are_prompts_not_the_trees_first_branches() -> None:
    """Every prompt starts with "w": the tree branches at the second character, by chance,
    with prompts of different workers under one branch. Units are the prompts."""
    tree = Tree()
    for n in range(12):
        tree.insert(prompt(n), f"w{n % 4}")
    units = units_of(tree, {"w0", "w1", "w2", "w3"})
    assert len(units) == 12
    assert all(len(unit.held) == 1 and unit.cut == UNIT_CHARS for unit in units)


def test_units_part_where_a_long_shared_start_ends() -> None:
    tree = Tree()
    shared = "the one system prompt " * 50  # 1,100 characters every text shares
    for user in range(4):
        tree.insert(shared + f"user {user} asks", "a")
    units = units_of(tree, {"a", "b"})
    assert len(units) == 4 and {unit.cut for unit in units} == {len(shared) + len("user ")}


def test_five_prompts_against_three_even_out_five_against_four_do_not() -> None:
    tree = Tree()
    counts = {"a": 5, "b": 4, "c": 4, "d": 3}
    n = 0
    for url, count in counts.items():
        for _ in range(count):
            tree.insert(prompt(n), url)
            n += 1
    move = plan_move(units_of(tree, set(counts)), set(counts))
    assert move is not None and (move.source, move.target, move.reason) == ("a", "d", "even")
    assert tree.move(move.text, move.cut, move.source, move.target, 9.0) == move.chars
    assert plan_move(units_of(tree, set(counts)), set(counts)) is None  # 4/4/4/4


def test_a_prompt_split_over_two_workers_is_gathered_onto_the_lighter() -> None:
    tree = Tree()
    for n in range(3):
        tree.insert(prompt(n), "a")
    tree.insert(prompt(3), "b")
    split = prompt(9)
    tree.insert(split + " user 1", "a")
    tree.insert(split + " user 2", "b")
    move = plan_move(units_of(tree, {"a", "b"}), {"a", "b"})
    assert move is not None and (move.source, move.target) == ("a", "b")
    assert move.reason == "consolidate" and split.startswith(move.text[: move.cut + 1])
    # While load is imbalanced a prompt may be spread on purpose: not gathered then.
    again = plan_move(units_of(tree, {"a", "b"}), {"a", "b"}, consolidate=False)
    assert again is None or again.reason == "even"


def test_small_gaps_and_ineligible_workers_are_left_alone() -> None:
    tree = Tree()
    tree.insert(prompt(1), "a")
    tree.insert(prompt(2), "a")
    tree.insert(prompt(3), "b")
    tree.insert(prompt(4), "gone")
    # Only a and b are eligible: 2 against 1 is one unit apart, not worth a move.
    assert plan_move(units_of(tree, {"a", "b"}), {"a", "b"}) is None
    assert plan_move(units_of(tree, {"a"}), {"a"}) is None  # one worker: nowhere to go
    # A worker that holds nothing is eligible and takes one.
    move = plan_move(units_of(tree, {"a", "b", "c"}), {"a", "b", "c"})
    assert move is not None and (move.source, move.target) == ("a", "c")


# --- the policy -----------------------------------------------------------------------------


async def test_a_moved_prompt_goes_to_its_new_worker_and_late_decisions_follow_it() -> None:
    workers = fleet(4)
    policy = CacheAwarePolicy()
    tree = policy.tree_for("m")
    for n in range(8):  # 3/2/2/1 prompts: w0's extra one moves to w3
        tree.insert(prompt(n), workers[[0, 0, 0, 1, 1, 2, 2, 3][n]].url)
    move = await policy.rebalance("m", workers)
    assert move is not None and move.source == "http://w0" and move.target == "http://w3"
    assert policy.moves == 1
    moved_prompt = next(prompt(n) for n in range(8) if prompt(n).startswith(move.text))
    chosen = policy.select(workers, RouteRequest("m", moved_prompt + " user 5"))
    assert chosen is workers[3]
    # A peer routed the prompt to w0 before it heard of the move: counted as w3's.
    policy.insert_remote("m", moved_prompt + " user 6", "http://w0")
    assert set(holders(tree, moved_prompt + " user 6")) == {"http://w3"}
    assert await policy.rebalance("m", workers) is None  # even now


async def test_rebalancing_yields_to_the_loop_on_a_big_tree() -> None:
    policy = CacheAwarePolicy()
    tree = policy.tree_for("m")
    workers = fleet(2)
    for n in range(3000):
        tree.insert(prompt(n, words=60), workers[0].url)
    ticks = 0

    async def count_ticks() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(count_ticks())
    await asyncio.sleep(0)
    move = await policy.rebalance("m", workers, slice_secs=0.0)
    ticker.cancel()
    assert move is not None and move.target == workers[1].url
    assert ticks > 5  # the scan handed the loop back between slices


async def test_precise_mode_is_not_rebalanced() -> None:
    class Events(WithoutUnits):
        active = True

        def tracks(self, url: str) -> bool:
            return True

        def cached_tokens(
            self, model: str, text: str, chat: bytes | None = None
        ) -> tuple[int, Mapping[str, int]]:
            return 0, {}

        def held_tokens(self, model: str, url: str) -> int:
            return 0

    policy = CacheAwarePolicy(CacheAwareConfig(), scorer=Events())
    workers = fleet(2)
    for n in range(4):
        policy.tree_for("m").insert(prompt(n), workers[0].url)
    assert await policy.rebalance("m", workers) is None


def test_a_move_heard_for_an_unknown_prompt_only_sets_the_redirect() -> None:
    policy = CacheAwarePolicy()
    move = Move(prompt(1)[:300], UNIT_CHARS, "http://w0", "http://w1", 0, "even")
    assert policy.apply_move("m", move) == 0
    policy.insert_remote("m", prompt(1), "http://w0")
    assert set(holders(policy.tree_for("m"), prompt(1))) == {"http://w1"}
    policy.insert_remote("m", prompt(2), "http://w0")  # another prompt: not redirected
    assert set(holders(policy.tree_for("m"), prompt(2))) == {"http://w0"}


# --- precise mode: the engines' units -----------------------------------------------------


def engines(urls: list[str], owners: list[int]) -> KvEvents:
    """A hub whose index holds prompt ``n`` on ``urls[owners[n]]``, as its engine's events
    said (prompt ``n``'s blocks have engine hashes from ``1000 * n`` on)."""
    hub = KvEvents(text_ids)
    hub.subscribers = dict.fromkeys(urls)  # type: ignore[assignment]  # tracks() reads the keys
    hub.active = True
    for n, owner in enumerate(owners):
        store(hub, urls[owner], n)
    return hub


def blocks_of(n: int, first_hash: int) -> tuple[tuple[int, ...], list[int]]:
    ids = text_ids(prompt(n))
    count = len(ids) // 16
    return tuple(range(first_hash, first_hash + count)), ids[: count * 16]


def store(
    hub: KvEvents, url: str, n: int, first_hash: int | None = None, ts: float | None = None
) -> None:
    hashes, ids = blocks_of(n, 1000 * n if first_hash is None else first_hash)
    hub.index.of("m").apply(url, BlockStored(hashes, None, tuple(ids), 16), ts)


def plans_of(policy: CacheAwarePolicy) -> EnginePlans:
    assert policy.engine_plans is not None
    return policy.engine_plans


def only_move(plans: EnginePlans) -> Move | None:
    """The one move planned for model "m" (None: none)."""
    plan = plans.plans.get("m")
    moves = [] if plan is None else list(plan.moves.values())
    assert len(moves) <= 1
    return moves[0] if moves else None


def test_precise_gateways_move_the_same_prompt_off_the_fullest_engine() -> None:
    """3/2/2/1 prompts on four engines: every gateway reading these events sends the same
    one of w0's three prompts to w3, and keeps sending it there once w3 holds it too."""
    workers = fleet(4)
    urls = [w.url for w in workers]
    owners = [0, 0, 0, 1, 1, 2, 2, 3]
    hub = engines(urls, owners)
    gateways = [CacheAwarePolicy(scorer=hub) for _ in range(3)]
    for policy in gateways:  # a first request shows the plan its workers; then it plans
        assert policy.decide(workers, RouteRequest("m", prompt(7))).reason == "cached_blocks"
        plans_of(policy).plan_all()
    moved = []
    for n in range(3):
        decisions = [g.decide(workers, RouteRequest("m", prompt(n) + " user 1")) for g in gateways]
        assert len({(d.worker, d.reason) for d in decisions}) == 1  # the gateways agree
        if decisions[0].reason == "rebalanced":
            assert decisions[0].worker is workers[3]
            moved.append(n)
        else:
            assert (decisions[0].worker, decisions[0].reason) == (workers[0], "cached_blocks")
    assert len(moved) == 1
    store(hub, urls[3], moved[0], first_hash=99_000)  # w3 prefilled it
    for policy in gateways:
        plans_of(policy).plan_all()  # the events changed: a new plan, no move (4.5 vs 3.5)
        assert policy.decide(workers, RouteRequest("m", prompt(7))).reason == "cached_blocks"
        decision = policy.decide(workers, RouteRequest("m", prompt(moved[0]) + " user 2"))
        assert (decision.worker, decision.reason) == (workers[3], "cached_blocks")  # the tie
    # w0 evicts its copy: the prompt is w3's alone, and 2/2/2/2 needs no move.
    hub.index.of("m").apply(urls[0], BlockRemoved(blocks_of(moved[0], 1000 * moved[0])[0]))
    plans_of(gateways[0]).plan_all()
    for n in range(8):
        decision = gateways[0].decide(workers, RouteRequest("m", prompt(n) + " user 3"))
        assert decision.reason == "cached_blocks"


@pytest.mark.parametrize("taken", [False, True])
def test_a_planned_move_no_request_takes_is_passed_over(taken: bool) -> None:
    """The unit to move is cold (its prompt is no longer asked for): once it has been the
    plan for COLD_SECS with no request taking it, the plan moves another. A move a request
    took stays planned."""
    workers = fleet(4)
    hub = engines([w.url for w in workers], [0, 0, 0, 1, 1, 2, 2, 3])
    plans = EnginePlans(hub)

    def one_block_more(n: int) -> None:  # the events change, the weights barely
        ids = tuple(text_ids(prompt(n, words=16)))  # a unit of its own: n is not 0-7
        hub.index.of("m").apply(workers[2].url, BlockStored((70_000 + n,), None, ids, 16))

    plans.watch("m", workers)
    plans.plan("m", workers, now=100.0)
    first = only_move(plans)
    assert first is not None and (first.source, first.target) == (workers[0].url, workers[3].url)
    one_block_more(20)
    plans.plan("m", workers, now=100.5)
    again = only_move(plans)
    assert again is not None and again.key == first.key  # the same move, not yet a second old
    if taken:
        n = next(n for n in range(3) if hub.unit_of("m", prompt(n)) == first.key)
        by_url = {w.url: w for w in workers}
        assert plans.moved_to("m", workers[0], by_url, prompt(n), None) is workers[3]
    one_block_more(21)
    plans.plan("m", workers, now=101.5)
    second = only_move(plans)
    assert second is not None and second.source == first.source
    assert (second.key == first.key) is taken


def test_too_many_units_are_not_planned_for() -> None:
    workers = fleet(2)
    hub = engines([w.url for w in workers], [0, 0, 0, 1])
    plans = EnginePlans(hub)
    plans.watch("m", workers)
    plans.plan("m", workers, now=1.0)
    assert only_move(plans) is not None
    store(hub, workers[0].url, 5)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_plans, "MAX_UNITS", 3)
        plans.plan("m", workers, now=2.0)
    assert only_move(plans) is None


def test_a_prompt_held_alike_goes_to_its_newest_holder_unless_it_is_busier_by_a_band() -> None:
    workers = fleet(2)
    hub = engines([w.url for w in workers], [0, 1, 1])
    store(hub, workers[1].url, 0, first_hash=99_000)  # prompt 0 copied to w1: its home now
    policy = CacheAwarePolicy(scorer=hub)
    assert policy.decide(workers, RouteRequest("m", prompt(0))).worker is workers[1]
    workers[1].state.in_flight = LOAD_BAND  # busier by a band: the less loaded takes it
    assert policy.decide(workers, RouteRequest("m", prompt(0))).worker is workers[0]
    workers[0].state.in_flight = LOAD_BAND - 1  # one apart, across a multiple of the band
    assert policy.decide(workers, RouteRequest("m", prompt(0))).worker is workers[1]
    workers[0].state.in_flight = workers[1].state.in_flight = 0


def test_a_unit_weighs_its_demand_on_its_home_not_its_blocks_on_every_holder() -> None:
    """w0 was sent prompts 0-3 and w1 none; then two of them were copied to w1 (moved). By
    blocks held w0 still outweighs w1 3 to 1 and a move would follow; by demand on the
    homes it is 2 to 2, nothing to move."""
    workers = fleet(2)
    hub = engines([w.url for w in workers], [0, 0, 0, 0])
    for n in (0, 1):
        store(hub, workers[1].url, n, first_hash=90_000 + 100 * n)
    plans = EnginePlans(hub)
    plans.watch("m", workers)
    plans.plan("m", workers, now=1.0)
    assert only_move(plans) is None


def test_a_full_cache_does_not_hide_an_engine_serving_more_prompts() -> None:
    """w0 serves four prompts but its cache kept half of each; w1 serves two, whole. Both
    hold as many blocks; by demand w0 serves twice as much, and one of its prompts moves."""
    workers = fleet(2)
    hub = engines([w.url for w in workers], [0, 0, 0, 0, 1, 1])
    for n in range(4):
        hashes, _ = blocks_of(n, 1000 * n)
        hub.index.of("m").apply(workers[0].url, BlockRemoved(hashes[len(hashes) // 2 :]))
    assert hub.held_tokens("m", workers[0].url) == hub.held_tokens("m", workers[1].url)
    plans = EnginePlans(hub)
    plans.watch("m", workers)
    plans.plan("m", workers, now=1.0)
    move = only_move(plans)
    assert move is not None and (move.source, move.target) == (workers[0].url, workers[1].url)


def test_a_new_prompt_is_not_placed_where_a_planned_move_is_headed() -> None:
    """w0 holds two prompts, w1 a short one, w2 none: the plan moves one of w0's to w2. A
    short new prompt goes to w1, not to the emptiest engine: w2 is to receive the moved
    prompt, which makes it the fuller of the two."""
    workers = fleet(3)
    urls = [w.url for w in workers]
    hub = engines(urls, [0, 0])
    short = text_ids(prompt(9, words=100))[:96]
    hub.index.of("m").apply(
        urls[1], BlockStored(tuple(range(80_000, 80_006)), None, tuple(short), 16)
    )
    policy = CacheAwarePolicy(scorer=hub)
    policy.decide(workers, RouteRequest("m", prompt(0)))
    plans_of(policy).plan_all()
    move = only_move(plans_of(policy))
    assert move is not None and (move.source, move.target) == (urls[0], urls[2])
    decision = policy.decide(workers, RouteRequest("m", prompt(20, words=64)))
    assert (decision.worker, decision.reason) == (workers[1], "new_prefix")


def test_one_plan_repairs_several_engines_at_once() -> None:
    """5/5/4/4/4/4/3/3 prompts: two moves in one plan, each from a five to a three."""
    workers = fleet(8)
    urls = [w.url for w in workers]
    owners = [i for i, count in enumerate([5, 5, 4, 4, 4, 4, 3, 3]) for _ in range(count)]
    plans = EnginePlans(engines(urls, owners))
    plans.watch("m", workers)
    plans.plan("m", workers, now=1.0)
    moves = sorted((m.source, m.target) for m in plans.plans["m"].moves.values())
    assert len(moves) == 2 and {s for s, _ in moves} == {urls[0], urls[1]}
    assert {t for _, t in moves} == {urls[6], urls[7]}


def test_a_move_never_goes_to_an_engine_holding_an_older_copy() -> None:
    """w0 is the home of prompts 0-2, w1 of prompt 3 and holds older copies of 0-2: moving
    one of them to w1 would not make w1 its home (requests would stay on w0), so there is
    no move, although w0 outweighs w1 three to one."""
    workers = fleet(2)
    hub = engines([w.url for w in workers], [])
    older, newer = time.time() - 10, time.time() - 5  # demand decays by the engines' clock
    for n in range(3):
        store(hub, workers[1].url, n, first_hash=90_000 + 100 * n, ts=older)
        store(hub, workers[0].url, n, ts=newer)
    store(hub, workers[1].url, 3, ts=newer)
    plans = EnginePlans(hub)
    plans.watch("m", workers)
    plans.plan("m", workers, now=1.0)
    assert only_move(plans) is None
    store(hub, workers[0].url, 4, ts=newer)  # a prompt of w0's alone: that one moves
    plans.plan("m", workers, now=2.0)
    move = only_move(plans)
    assert move is not None and move.key == hub.unit_of("m", prompt(4))
