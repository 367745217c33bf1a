"""The subscribers' figures reach Prometheus: a real PUB on 127.0.0.1 feeds the hub, and a
scrape of the gateway's metrics shows, per worker, what was applied, the gap and resync,
the malformed message, the blocks held and whether the SUB is connected."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shunter.kv_events.hub import KvEvents
from shunter.observability.metrics import Metrics

from support.harness import free_port

WORKER = "http://w:1"


def _stored(hash_: int, parent: int | None, tokens: list[int]) -> list[Any]:
    return ["BlockStored", [hash_], parent, tokens, 4, None, "GPU"]


def _scrape(metrics: Metrics) -> dict[str, float]:
    """``name`` -> value of the worker's series, for the kv events families."""
    text = generate_latest(metrics.registry).decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("shunter_kv_events_")
        for sample in family.samples
        if sample.labels == {"worker": WORKER}
    }


async def _until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 5
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def test_a_scrape_shows_each_subscribers_figures() -> None:
    context = zmq.asyncio.Context()
    pub = context.socket(zmq.PUB)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    pub.bind(endpoint)
    hub = KvEvents(lambda text: [int(t) for t in text.split()])
    metrics = Metrics()
    metrics.kv_events = hub.counters

    async def publish(seq: int, events: list[Any]) -> None:
        payload = msgspec.msgpack.encode([time.time(), events, 0])
        await pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])

    try:
        hub.add(WORKER, "m", endpoint, None)
        subscriber = hub.subscribers[WORKER]
        await _until(lambda: subscriber.connected, "the SUB connected")
        # The SUB misses what is sent before its subscription reaches the PUB: resend
        # batch 0 (a duplicate once applied) until it is in.
        while subscriber.counters.batches == 0:
            await publish(0, [_stored(1, None, [1, 2, 3, 4])])
            await asyncio.sleep(0.01)
        before = _scrape(metrics)
        assert before["shunter_kv_events_connected"] == 1
        assert before["shunter_kv_events_blocks"] == 1

        await publish(1, [_stored(2, 1, [5, 6, 7, 8]), _stored(3, 2, [9, 10, 11, 12])])
        await pub.send_multipart([b"", b"no seq"])  # malformed: no batch
        await publish(3, [_stored(4, None, [7, 7, 7, 7])])  # a gap (2), and no replay
        await _until(lambda: subscriber.counters.gaps == 1, "the gap")
        after = _scrape(metrics)
        delta = {name: after[name] - before[name] for name in after}
        assert delta["shunter_kv_events_applied_total"] == 3
        assert delta["shunter_kv_events_batches_total"] == 2
        assert delta["shunter_kv_events_gaps_total"] == 1
        assert delta["shunter_kv_events_resyncs_total"] == 1  # no replay endpoint
        assert delta["shunter_kv_events_replays_total"] == 0
        assert delta["shunter_kv_events_malformed_total"] == 1
        assert after["shunter_kv_events_blocks"] == 1  # the resync dropped the first three

        pub.close(linger=0)  # the worker goes away: the SUB is disconnected
        await _until(lambda: not subscriber.connected, "the SUB disconnected")
        assert _scrape(metrics)["shunter_kv_events_connected"] == 0
        hub.remove(WORKER)
        assert _scrape(metrics) == {}  # a worker no longer followed has no series
    finally:
        await hub.close()
        context.destroy(linger=0)
