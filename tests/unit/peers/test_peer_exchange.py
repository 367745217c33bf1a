"""The exchange: batching, bounded queues, dead and slow peers, and what a peer's batch
does here (tree inserts, reservations, hand-registered workers)."""

from __future__ import annotations

import asyncio
import json
import time

import zmq
import zmq.asyncio
from peer_support import RecordingSockets, exchange_on, sample_gateway

from shunter.peers.exchange import Exchange
from shunter.peers.messages import Batch, Decision, Hello, ManualWorker, decode, encode
from shunter.peers.prefixes import PrefixEncoder
from shunter.peers.transport import PeerSockets
from shunter.policies.base import RouteRequest
from shunter.policies.cache_aware import CacheAwarePolicy

from support.fakes import call, gateway, ready
from support.harness import free_port

SYSTEM = "".join(f"w{i} " for i in range(600))


async def test_decisions_queued_between_flushes_go_in_one_batch() -> None:
    gw = await sample_gateway()
    sockets = RecordingSockets()
    exchange = exchange_on(gw, sockets)
    for user in range(3):
        exchange.decided("m", SYSTEM + f"user {user}", "http://w:1")
    exchange.flush(now=0.0)
    [batch] = sockets.batches()
    assert [d.worker for d in batch.decisions] == ["http://w:1"] * 3
    assert batch.hello.node == exchange.node and batch.hello.models == ["m"]
    exchange.flush(now=0.0)
    assert len(sockets.sent) == 1  # nothing queued, no snapshot due: nothing sent
    await gw.close()


async def test_a_placement_goes_out_on_the_next_turn_a_match_waits_for_the_batch() -> None:
    gw = await sample_gateway()
    sockets = RecordingSockets()
    exchange = exchange_on(gw, sockets, flush_secs=60.0)
    exchange.decided("m", SYSTEM + "user 1", "http://w:1")  # a match: batched
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert sockets.sent == []
    exchange.decided("m", SYSTEM + "user 2", "http://w:1", placed=True)  # a new prefix
    exchange.decided("m", SYSTEM + "user 3", "http://w:1")  # decided in the same turn
    await asyncio.sleep(0)
    [batch] = sockets.batches()  # all three at once, without waiting the 60 s
    assert len(batch.decisions) == 3
    await gw.close()


async def test_a_full_queue_drops_decisions_and_counts_them() -> None:
    gw = await sample_gateway()
    exchange = exchange_on(gw, queue_limit=5)
    for _ in range(8):
        exchange.decided("m", SYSTEM, "http://w:1")
    assert exchange.counters.queue_full == 3
    await gw.close()


async def test_a_dead_or_stalled_peer_never_blocks_the_sender() -> None:
    """One peer port nobody listens on, one peer that connected and never reads: thousands
    of batches go out at once (ZeroMQ drops for them past its queue)."""
    context = zmq.Context()
    gw = await sample_gateway(host="127.0.0.1")
    port = free_port()
    sockets = PeerSockets(f"127.0.0.1:{port}", [f"127.0.0.1:{free_port()}"])
    stalled = context.socket(zmq.SUB)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.connect(f"tcp://127.0.0.1:{port}")
    exchange = Exchange(gw.fleet, gw.policies.policy_for, lambda: sockets)
    exchange._sockets = sockets
    started = time.perf_counter()
    for round_ in range(3000):
        exchange.decided("m", SYSTEM + str(round_), "http://w:1")
        exchange.flush(now=float(round_))
    elapsed = time.perf_counter() - started
    assert exchange.counters.batches_sent == 3000
    assert exchange.counters.send_refused == 0
    assert elapsed < 10  # ~0.3 s here; a blocked send would never return
    await exchange.close()
    stalled.close(linger=0)
    context.term()
    await gw.close()


def _peer_batch(encoder: PrefixEncoder, text: str, url: str, node: str = "peer") -> list[bytes]:
    base, blocks = encoder.encode("m", text, now=0.0)
    return encode(Batch(Hello(node, ["m"]), [Decision("m", url, base, blocks)]))


async def test_a_peers_decision_is_inserted_into_the_tree_and_reserves_its_worker() -> None:
    gw = await sample_gateway()
    exchange = exchange_on(gw, reservation_ttl_secs=1.0)
    worker = gw.fleet.registry.get_by_url("http://w:3")
    assert worker is not None
    exchange.receive(_peer_batch(PrefixEncoder(), SYSTEM + "user 1", "http://w:3"), now=10.0)
    assert exchange.counters.decisions_applied == 1
    policy = gw.policies.policy_for("m")
    assert isinstance(policy, CacheAwarePolicy)
    matched, tenants = policy.cached_prefix(RouteRequest("m", SYSTEM + "user 2"))
    assert matched == len(SYSTEM) // 256 * 256 and tenants == {"http://w:3"}
    assert (worker.state.in_flight, worker.state.reserved) == (1, 1)
    exchange.reservations.expire(now=10.5)
    assert worker.state.in_flight == 1  # still within its TTL
    exchange.reservations.expire(now=11.0)
    assert (worker.state.in_flight, worker.state.reserved) == (0, 0)
    await gw.close()


async def test_reservations_can_be_turned_off() -> None:
    gw = await sample_gateway()
    exchange = exchange_on(gw, reservation_ttl_secs=0.0)
    exchange.receive(_peer_batch(PrefixEncoder(), SYSTEM, "http://w:3"), now=10.0)
    assert exchange.counters.decisions_applied == 1
    assert all(w.state.in_flight == 0 for w in gw.fleet.registry.all())
    await gw.close()


async def test_a_remote_decision_makes_the_next_request_follow_it() -> None:
    """The tree insert is what routing reads: a prefix a peer placed on w:3 goes there
    here too, though w:3 is the busiest worker (placement of a new prefix avoids it)."""
    gw = await sample_gateway()
    policy = gw.policies.policy_for("m")
    assert isinstance(policy, CacheAwarePolicy)
    workers = gw.fleet.registry.get_by_model("m")
    busiest = next(w for w in workers if w.url == "http://w:3")
    busiest.state.in_flight = 3
    policy.insert_remote("m", SYSTEM, "http://w:3")
    chosen = {policy.select(workers, RouteRequest("m", SYSTEM + f"user {u}")) for u in range(8)}
    assert chosen == {busiest}
    busiest.state.in_flight = 0
    await gw.close()


async def test_own_echoes_are_ignored_and_disjoint_models_refused() -> None:
    gw = await sample_gateway()
    exchange = exchange_on(gw)
    encoder = PrefixEncoder()
    exchange.receive(_peer_batch(encoder, SYSTEM, "http://w:1", node=exchange.node), 0.0)
    assert exchange.counters.batches_received == 0
    other = encode(Batch(Hello("elsewhere", ["other-model"]), [Decision("m", "http://w:1", 0, [])]))
    exchange.receive(other, 0.0)
    assert exchange.counters.refused_models == 1 and exchange.counters.decisions_applied == 0
    unknown = encode(Batch(Hello("peer", ["m"]), [Decision("m", "http://nowhere:1", 0, [])]))
    exchange.receive(unknown, 0.0)
    assert exchange.counters.unknown_worker == 1
    await gw.close()


async def test_hand_registered_workers_merge_by_last_writer() -> None:
    gw = await sample_gateway(urls=("http://w:1",))
    exchange = exchange_on(gw)
    body = json.dumps({"url": "http://w:9"}).encode()

    def batch(*entries: ManualWorker) -> list[bytes]:
        return encode(Batch(Hello("peer", ["m"]), [], list(entries)))

    worker_id = "0b9e3f4c-52a1-4a8e-9d5e-3c1f0e6a7b21"  # the one the peer's API gave it
    exchange.receive(batch(ManualWorker("http://w:9", 100, "peer", body, worker_id)), 0.0)
    await _until(lambda: gw.fleet.registry.get_by_url("http://w:9") is not None)
    assert [w.id for w in gw.fleet.find_id(worker_id)] == [worker_id]
    exchange.receive(batch(ManualWorker("http://w:9", 50, "peer", None)), 0.0)  # older
    assert gw.fleet.registry.get_by_url("http://w:9") is not None
    exchange.receive(batch(ManualWorker("http://w:9", 200, "peer", None)), 0.0)
    assert gw.fleet.registry.get_by_url("http://w:9") is None
    exchange.receive(batch(ManualWorker("http://w:9", 150, "peer", body)), 0.0)  # too late
    assert not gw.fleet.adding("http://w:9")
    exchange.receive(batch(ManualWorker("http://w:8", 300, "peer", b"{not json")), 0.0)
    assert exchange.manual.rejected == 1
    await gw.close()


async def test_the_api_shares_hand_changes_and_not_flag_workers() -> None:
    """Through real sockets: a subscriber on the gateway's peer port hears the POST and
    the DELETE made through the API, and nothing of the --worker-urls worker itself."""
    port = free_port()
    gw = gateway(("http://w:1",), policy="cache_aware", host="127.0.0.1", peer_port=port)
    context = zmq.asyncio.Context()
    listener = context.socket(zmq.SUB)
    listener.setsockopt(zmq.SUBSCRIBE, b"")
    listener.connect(f"tcp://127.0.0.1:{port}")
    await ready(gw)
    await listener.recv_multipart()  # the first snapshot: we are connected
    answer = await call(gw.app, "POST", "/workers", json.dumps({"url": "http://w:2"}).encode())
    assert answer.status == 202
    path = b"/workers/http%3A%2F%2Fw%3A1"
    assert (await call(gw.app, "DELETE", path.decode(), raw_path=path)).status == 202
    heard: dict[str, bool] = {}  # url -> registered (False: removed)
    ids: dict[str, str] = {}
    async with asyncio.timeout(5):
        while len(heard) < 2:
            batch = decode(await listener.recv_multipart())
            heard |= {w.url: w.spec is not None for w in batch.workers}
            ids |= {w.url: w.worker_id for w in batch.workers if w.spec is not None}
    assert heard == {"http://w:2": True, "http://w:1": False}
    assert ids == {"http://w:2": answer.json()["worker_id"]}  # peers register it under it
    listener.close(linger=0)
    context.term()
    await gw.close()


async def _until(done: object, timeout: float = 5.0) -> None:
    assert callable(done)
    deadline = asyncio.get_running_loop().time() + timeout
    while not done():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)
