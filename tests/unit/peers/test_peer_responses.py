"""Stored responses shared between peers: one small entry per response a gateway learnt."""

from __future__ import annotations

from peer_support import RecordingSockets, exchange_on, sample_gateway

from shunter.peers.exchange import Exchange
from shunter.peers.messages import Batch, Hello, encode
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


async def test_a_peer_heard_for_the_first_time_is_sent_the_recent_responses_again() -> None:
    """It subscribed after they went out (ZeroMQ drops for a subscriber not connected yet):
    without a second sending, a GET through it would not find the response."""
    gw = await sample_gateway()
    sockets = RecordingSockets()
    sender = exchange_on(gw, sockets, node="a")
    sender.response_created("resp_1", "http://w:2")
    sender.flush(now=0.0)
    sender.receive(encode(Batch(Hello("b", ["m"]))), now=1.0)  # b joins
    sender.flush(now=1.0)
    assert len(sockets.sent) == 2
    assert [r.id for r in sockets.batches()[1].responses] == ["resp_1"]
    sender.receive(encode(Batch(Hello("b", ["m"]))), now=2.0)  # b again: nothing new to send
    sender.flush(now=2.0)
    assert len(sockets.sent) == 2
    await gw.close()
