"""The leader's rebalancing over the exchange: who leads, a move sent and applied by a
peer, a plan soon after a placement, and moves a peer must refuse."""

from __future__ import annotations

import asyncio
import time

import msgspec
from peer_support import RecordingSockets, exchange_on, sample_gateway

from shunter.peers import exchange as exchange_module
from shunter.peers.messages import Batch, Decision, Hello, PromptMove, decode, encode
from shunter.peers.prefixes import PrefixEncoder
from shunter.policies.base import RouteRequest
from shunter.policies.cache_aware import CacheAwarePolicy


def prompt(n: int) -> str:
    return " ".join(f"w{(n * 7919 + i * 31) % 5000}" for i in range(200))


def cache_aware(policy: object) -> CacheAwarePolicy:
    assert isinstance(policy, CacheAwarePolicy)
    return policy


async def test_the_smallest_node_heard_lately_leads() -> None:
    gw = await sample_gateway()
    exchange = exchange_on(gw, node="m-node")
    assert exchange.leads(now=100.0)  # alone
    exchange.receive(encode(Batch(Hello("z-node", ["m"]))), now=100.0)
    assert exchange.leads(now=100.0)  # the other's id is larger
    exchange.receive(encode(Batch(Hello("a-node", ["m"]))), now=100.0)
    assert not exchange.leads(now=100.0)
    assert exchange.leads(now=100.0 + exchange_module.LEADER_SECS + 1)  # a-node went quiet
    await gw.close()


async def test_the_leaders_move_reaches_a_peer_whose_next_request_follows_it() -> None:
    leader_gw, follower_gw = await sample_gateway(), await sample_gateway()
    sockets = RecordingSockets()
    leader = exchange_on(leader_gw, sockets, node="a")
    follower = exchange_on(follower_gw, node="b")
    owners = ["http://w:1"] * 3 + ["http://w:2", "http://w:2", "http://w:3", "http://w:3"]
    for gw in (leader_gw, follower_gw):  # the same view on both: w:4 holds nothing
        tree = cache_aware(gw.policies.policy_for("m")).tree_for("m")
        for n, url in enumerate(owners):
            tree.insert(prompt(n), url)
    await leader.rebalance()
    [batch] = sockets.batches()
    [move] = batch.moves
    assert (move.source, move.target, move.reason) == ("http://w:1", "http://w:4", "even")
    assert leader.counters.moves_sent == 1
    follower.receive(sockets.sent[0], now=1.0)
    assert follower.counters.moves_applied == 1
    moved = next(prompt(n) for n in range(7) if prompt(n).startswith(move.text))
    for gw in (leader_gw, follower_gw):
        workers = gw.fleet.registry.get_by_model("m")
        policy = cache_aware(gw.policies.policy_for("m"))
        chosen = policy.select(workers, RouteRequest("m", moved + " user 1"))
        assert chosen is not None and chosen.url == "http://w:4"
    await follower.rebalance()  # not the leader: plans nothing
    assert follower.counters.moves_sent == 0
    await leader_gw.close()
    await follower_gw.close()


async def test_a_placement_brings_the_leaders_plan_forward() -> None:
    gw = await sample_gateway()
    exchange = exchange_on(gw, node="a")
    planned = asyncio.Event()

    async def plan() -> None:
        planned.set()

    exchange._rebalancer.work = plan
    exchange._rebalancer.interval_secs = 60.0  # only the placement can bring it on
    exchange._rebalancer.start()
    base, blocks = PrefixEncoder().encode("m", prompt(1), now=0.0)
    placed = Decision("m", "http://w:2", base, blocks, placed=True)
    exchange.receive(encode(Batch(Hello("b", ["m"]), [placed])), now=1.0)
    await asyncio.wait_for(planned.wait(), timeout=5 * exchange_module.SETTLE_SECS + 1)
    await exchange.close()
    await gw.close()


async def test_malformed_or_unknown_moves_are_counted_and_skipped() -> None:
    gw = await sample_gateway()
    exchange = exchange_on(gw, node="b")
    text = prompt(1)[:300]
    bad = [
        PromptMove("m", "http://w:1", "http://w:2", 300, text, "even"),  # cut past the text
        PromptMove("m", "http://w:1", "http://w:2", -1, text, "even"),
        PromptMove("m", "http://w:1", "http://w:2", 0, "x" * 10_000, "even"),  # too long
    ]
    unknown = PromptMove("m", "http://w:1", "http://elsewhere:9", 256, text, "even")
    exchange.receive(encode(Batch(Hello("a", ["m"]), moves=[*bad, unknown])), now=1.0)
    counters = exchange.counters
    assert (counters.malformed, counters.unknown_worker, counters.moves_applied) == (3, 1, 0)
    await gw.close()


class DecisionBeforePlacements(msgspec.Struct, array_like=True, frozen=True):
    model: str
    worker: str
    base: int
    blocks: list[str]


class BatchBeforeMoves(msgspec.Struct, array_like=True, frozen=True):
    hello: Hello
    decisions: list[DecisionBeforePlacements] = []


def test_placements_and_moves_go_beside_older_peers_without_a_version_change() -> None:
    move = PromptMove("m", "http://w:1", "http://w:2", 256, "x" * 300, "even")
    placed = Decision("m", "http://w:1", 0, ["x" * 256], placed=True)
    frames = encode(Batch(Hello("a", ["m"]), [placed], moves=[move]))
    older = msgspec.msgpack.decode(frames[1], type=BatchBeforeMoves)
    assert older.decisions == [DecisionBeforePlacements("m", "http://w:1", 0, ["x" * 256])]
    sent_by_older = msgspec.msgpack.encode(BatchBeforeMoves(Hello("b", ["m"]), older.decisions))
    batch = decode([frames[0], sent_by_older])
    assert batch.moves == [] and batch.decisions[0].placed is False


def test_node_ids_order_by_age() -> None:
    first = exchange_module.new_node_id()
    time.sleep(0.002)
    assert exchange_module.new_node_id() > first
