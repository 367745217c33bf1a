"""Placement conflicts: two peered gateways put different new prompts on one worker before
hearing of each other; exactly one of them moves its prompt (peers/conflicts.py)."""

from __future__ import annotations

import time

from peer_support import URLS, RecordingSockets, exchange_on, sample_gateway

from shunter.gateway import Gateway
from shunter.peers.conflicts import Placements
from shunter.peers.exchange import Exchange
from shunter.policies.base import RouteRequest
from shunter.policies.cache_aware import CacheAwarePolicy

from support.fakes import make_worker

PROMPT = "a system prompt for the first team. " * 20


def policy_of(gw: Gateway) -> CacheAwarePolicy:
    policy = gw.policies.policy_for("m")
    assert isinstance(policy, CacheAwarePolicy)
    return policy


def place(gw: Gateway, text: str) -> str:
    decision = policy_of(gw).decide(gw.fleet.registry.get_by_model("m"), RouteRequest("m", text))
    assert decision.reason == "new_prefix" and decision.worker is not None
    return decision.worker.url


async def peered(node: str) -> tuple[Gateway, Exchange, RecordingSockets]:
    gw = await sample_gateway()
    sockets = RecordingSockets()
    exchange = exchange_on(gw, sockets, node=node, flush_secs=60.0)
    policy_of(gw).decisions = exchange.decided
    return gw, exchange, sockets


async def test_of_two_gateways_that_placed_on_one_worker_the_greater_node_moves() -> None:
    a, exchange_a, sent_a = await peered("node-a")
    b, exchange_b, sent_b = await peered("node-b")
    home = place(a, PROMPT)
    # A different prompt that b, as blind to a's placement, also puts on that worker.
    other = next(
        text
        for text in (f"team {n} has its own system prompt. " * 20 for n in range(200))
        if place_on_fresh(text) == home
    )
    assert place(b, other) == home
    now = time.monotonic()
    exchange_a.flush(now)
    exchange_b.flush(now)
    exchange_b.receive(sent_a.sent[-1], now)  # b hears a: b's node is the greater, b moves
    exchange_a.receive(sent_b.sent[-1], now)  # a hears b's first placement: a stays
    assert (exchange_b.counters.placements_moved, exchange_a.counters.placements_moved) == (1, 0)
    follow = policy_of(b).decide(b.fleet.registry.get_by_model("m"), RouteRequest("m", other))
    assert follow.reason == "prefix_match" and follow.worker is not None
    moved_to = follow.worker.url
    assert moved_to != home
    # a hears of the move (a placement too) and follows it; its own prompt stays home.
    exchange_b.flush(time.monotonic())
    exchange_a.receive(sent_b.sent[-1], time.monotonic())
    workers = a.fleet.registry.get_by_model("m")
    for text, where in ((other, moved_to), (PROMPT, home)):
        chosen = policy_of(a).select(workers, RouteRequest("m", text + "more"))
        assert chosen is not None and chosen.url == where
    for gw in (a, b):
        await gw.close()


def place_on_fresh(text: str) -> str:
    """Where a gateway with an empty tree places ``text`` (the prompt's hash decides)."""
    workers = tuple(make_worker(url, models=("m",)) for url in URLS)
    chosen = CacheAwarePolicy().select(workers, RouteRequest("m", text))
    assert chosen is not None
    return chosen.url


def test_the_same_prompt_or_a_smaller_node_or_an_old_placement_is_no_conflict() -> None:
    placements = Placements("node-b", window_secs=0.5)
    placements.placed("m", PROMPT + "user 1", "http://w:1", now=10.0)
    # The same prompt (another user of it) placed by a peer: agreement, not a conflict.
    assert placements.yielding_to("node-a", "m", PROMPT, "http://w:1", now=10.1) == []
    # Another worker, or another model: no conflict.
    assert placements.yielding_to("node-a", "m", "x" * 300, "http://w:2", now=10.1) == []
    assert placements.yielding_to("node-a", "n", "x" * 300, "http://w:1", now=10.1) == []
    # The smaller node of the two keeps its placement:
    smaller = Placements("node-a")
    smaller.placed("m", PROMPT, "http://w:1", now=10.0)
    assert smaller.yielding_to("node-b", "m", "x" * 300, "http://w:1", now=10.1) == []
    # Outside the window: long settled.
    assert placements.yielding_to("node-a", "m", "x" * 300, "http://w:1", now=11.0) == []


def test_a_conflicting_placement_is_handed_out_once() -> None:
    placements = Placements("node-b")
    placements.placed("m", PROMPT, "http://w:1", now=10.0)
    [moving] = placements.yielding_to("node-a", "m", "x" * 300, "http://w:1", now=10.1)
    assert (moving.text, moving.url) == (PROMPT, "http://w:1")
    assert placements.yielding_to("node-c", "m", "y" * 300, "http://w:1", now=10.1) == []
