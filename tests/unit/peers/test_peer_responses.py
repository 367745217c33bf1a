"""Stored responses shared between peers: one small entry per response a gateway learnt."""

from __future__ import annotations

from peer_support import RecordingSockets, exchange_on, sample_gateway

from shunter.peers.exchange import Exchange
from shunter.routing.affinity import ResponseAffinity


async def test_a_created_response_goes_to_the_peers_and_theirs_are_learnt() -> None:
    gw = await sample_gateway()
    sockets = RecordingSockets()
    sender = exchange_on(gw, sockets)
    sender.response_created("resp_1", "http://w:2")
    sender.flush(now=0.0)
    [batch] = sockets.batches()
    assert [(r.id, r.worker) for r in batch.responses] == [("resp_1", "http://w:2")]
    affinity = ResponseAffinity()
    receiver = Exchange(
        gw.fleet,
        gw.policies.policy_for,
        lambda: RecordingSockets(),  # type: ignore[arg-type,return-value]
        stored_response=affinity.remember,
    )
    receiver.receive(sockets.sent[0], now=0.0)
    assert affinity.worker_of("resp_1") == "http://w:2"
    assert receiver.counters.responses_learnt == 1
    await gw.close()
