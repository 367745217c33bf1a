"""Peer messages: a batch round-trips; another version, or anything malformed, is refused
and counted by the exchange without stopping it."""

from __future__ import annotations

import logging

import msgspec
import pytest
from peer_support import exchange_on, sample_gateway

from shunter.peers.messages import (
    PROTOCOL_VERSION,
    Batch,
    Decision,
    Hello,
    ManualWorker,
    MessageError,
    StoredResponse,
    WorkerSetting,
    decode,
    encode,
)


def test_a_batch_round_trips() -> None:
    batch = Batch(
        Hello("node-a", ["m"]),
        [Decision("m", "http://w:1", 0, ["x" * 256])],
        [ManualWorker("http://w:2", 5, "node-a", b'{"url": "http://w:2"}')],
    )
    assert decode(encode(batch)) == batch


class BatchBeforeSettings(msgspec.Struct, array_like=True, frozen=True):
    """A batch as gateways that predate worker settings (PATCH) sent and read it."""

    hello: Hello
    decisions: list[Decision] = []
    workers: list[ManualWorker] = []
    responses: list[StoredResponse] = []


def test_settings_go_beside_older_peers_without_a_version_change() -> None:
    """A gateway that predates settings reads a batch carrying them (skipping them), and
    a batch from such a gateway reads as carrying none: both keep talking."""
    setting = WorkerSetting("http://w:2", 5, "node-a", "priority", "", 3)
    spec = ManualWorker("http://w:2", 4, "node-a", b'{"url": "http://w:2"}', "id")
    frames = encode(Batch(Hello("node-a", ["m"]), [], [spec], [], [setting]))
    assert decode(frames).settings == [setting]
    older = msgspec.msgpack.decode(frames[1], type=BatchBeforeSettings)
    assert older.workers == [spec]
    sent_by_older = msgspec.msgpack.encode(BatchBeforeSettings(Hello("node-b", ["m"]), [], [spec]))
    batch = decode([frames[0], sent_by_older])
    assert batch.workers == [spec] and batch.settings == []


def test_another_version_is_named_in_the_error() -> None:
    frames = encode(Batch(Hello("a", [])))
    frames[0] = (PROTOCOL_VERSION + 1).to_bytes(2, "big")
    with pytest.raises(MessageError) as error:
        decode(frames)
    assert error.value.version == PROTOCOL_VERSION + 1


async def test_a_peer_of_another_version_is_refused_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await sample_gateway()
    exchange = exchange_on(gw)
    url = gw.fleet.registry.all()[0].url
    frames = encode(Batch(Hello("b", ["m"]), [Decision("m", url, 0, ["x" * 256])]))
    frames[0] = (PROTOCOL_VERSION + 1).to_bytes(2, "big")
    with caplog.at_level(logging.WARNING, "shunter.peers"):
        exchange.receive(frames, 0.0)
        exchange.receive(frames, 0.0)
    assert exchange.counters.wrong_version == 2
    assert exchange.counters.decisions_applied == 0
    assert gw.fleet.registry.all()[0].state.in_flight == 0
    refused = [r for r in caplog.records if r.getMessage() == "peer refused"]
    assert len(refused) == 1  # logged once, counted every time
    await gw.close()


async def test_malformed_messages_are_counted_and_skipped() -> None:
    gw = await sample_gateway()
    exchange = exchange_on(gw)
    version = PROTOCOL_VERSION.to_bytes(2, "big")
    bad = [
        [b"\x00"],  # one frame
        [version, b"\xc1"],  # not msgpack
        [version, msgspec.msgpack.encode({"hello": 1})],  # not a batch
        [version, msgspec.msgpack.encode([["a", ["m"]], [["m", "u", "not an int", []]], []])],
        [b"\x00\x01\x02", b""],  # a 3-byte version
    ]
    for frames in bad:
        exchange.receive(frames, 0.0)
    assert exchange.counters.malformed == len(bad)
    url = gw.fleet.registry.all()[0].url
    exchange.receive(encode(Batch(Hello("b", ["m"]), [Decision("m", url, 0, [])])), 0.0)
    assert exchange.counters.decisions_applied == 1  # still taking good batches
    await gw.close()
