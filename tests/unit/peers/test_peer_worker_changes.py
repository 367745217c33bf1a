"""PUT and PATCH through ``/workers`` on one gateway reach its peers: a PATCH updates their
worker in place, a whole-spec PUT replaces it under its id, a restarted peer catches up
from a snapshot, changes made at once on two gateways settle the same on both, and what a
peer sends that is not valid here is counted and logged without stopping anything.

Two gateways on the mock network, each with its real exchange and ``/workers`` API; only
the ZeroMQ sockets are replaced by recorders, so that a test decides when (and in which
order) each gateway hears the other (``tests/system/test_peers.py`` has them talk over
ZeroMQ, as processes)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import msgspec
import pytest
from peer_support import RecordingSockets, deliver, peered_gateway, until

from shunter.gateway import Gateway
from shunter.peers.messages import (
    PROTOCOL_VERSION,
    Batch,
    Hello,
    ManualWorker,
    WorkerSetting,
    decode,
    encode,
)
from shunter.wire.mock import MockRequest, MockResponse

from support.fakes import Engines, Workers, call

URL = "http://w:9"  # the worker registered by hand in these tests
FLAG = "http://w:1"  # every gateway's --worker-urls worker
FLAG_PATH = "/workers/http%3A%2F%2Fw%3A1"


def send(gw: Gateway) -> None:
    """What ``gw`` has queued for its peers, sent now rather than in 5 ms."""
    assert gw.peers is not None
    gw.peers.flush(time.monotonic())


def snapshot(gw: Gateway) -> None:
    assert gw.peers is not None
    gw.peers.flush(time.monotonic(), snapshot=True)


async def api(gw: Gateway, method: str, path: str, body: Any = None) -> dict[str, Any]:
    raw = b"" if body is None else json.dumps(body).encode()
    answer = await call(gw.app, method, path, raw, raw_path=path.encode())
    assert answer.status in (200, 202), answer.body
    result: dict[str, Any] = answer.json()
    return result


def listed(gw: Gateway, url: str) -> dict[str, Any]:
    [worker] = gw.fleet.find(url)
    return worker.to_info()


async def registered_on_both(
    url: str = URL,
) -> tuple[Gateway, RecordingSockets, Gateway, RecordingSockets, str]:
    """Gateways A and B, each knowing the other's changes, with ``url`` POSTed on A."""
    a, to_b = await peered_gateway()
    b, to_a = await peered_gateway()
    worker_id = (await api(a, "POST", "/workers", {"url": url}))["worker_id"]
    send(a)
    deliver(to_b, b)
    await until(lambda: a.fleet.find(url) and b.fleet.find(url))
    return a, to_b, b, to_a, worker_id


async def test_a_patch_on_one_gateway_updates_the_peers_worker_in_place() -> None:
    a, to_b, b, _, worker_id = await registered_on_both()
    [before] = b.fleet.find(URL)
    patch = {
        "labels": {"zone": "east"},
        "priority": 7,
        "cost": 2.5,
        "api_key": "key-2",
        "health_check_interval_secs": 9,
        "health_failure_threshold": 4,
        "cb_failure_threshold": 11,
        "cb_timeout_duration_secs": 3.5,
    }
    await api(a, "PATCH", f"/workers/{worker_id}", patch)
    send(a)
    deliver(to_b, b)

    [after] = b.fleet.find(URL)
    assert after.id == worker_id
    assert after.state is before.state  # in place: its requests, counts and breaker kept
    row = (await call(b.app, "GET", "/workers")).json()["workers"]
    [shown] = [w for w in row if w["id"] == worker_id]
    assert shown["labels"]["zone"] == "east" and shown["priority"] == 7 and shown["cost"] == 2.5
    assert after.api_key == "key-2"
    assert after.health is not None
    assert (after.health.interval_secs, after.health.failure_threshold) == (9, 4)
    breaker = after.state.breaker
    assert breaker is not None
    assert (breaker.config.failure_threshold, breaker.config.timeout_secs) == (11, 3.5)
    assert listed(b, URL)["labels"] == listed(a, URL)["labels"]
    # Applied there as a peer's change, not queued as B's own: nothing goes back.
    assert b.peers is not None and b.peers._settings == [] and b.peers._workers == []
    await a.close()
    await b.close()


async def test_a_patch_or_partial_put_of_a_flag_worker_is_shared_by_url() -> None:
    """The processes of --workers N hold the same --worker-urls workers: a change to one
    through any process holds in all (DELETE was already shared)."""
    a, to_b, b, _ = (*(await peered_gateway()), *(await peered_gateway()))
    await api(a, "PATCH", FLAG_PATH, {"labels": {"rack": "r1"}})
    await api(a, "PUT", FLAG_PATH, {"priority": 3})  # a PUT without url: an update
    send(a)
    deliver(to_b, b)
    assert listed(b, FLAG)["labels"]["rack"] == "r1" and listed(b, FLAG)["priority"] == 3
    await a.close()
    await b.close()


async def test_a_whole_spec_put_replaces_the_peers_worker_under_the_same_id() -> None:
    a, to_b, b, _, worker_id = await registered_on_both()
    [before] = b.fleet.find(URL)
    spec = {"url": URL, "model_id": "m-two", "labels": {"generation": "2"}}
    answer = await api(a, "PUT", f"/workers/{worker_id}", spec)
    assert answer["queued"] is True
    send(a)
    deliver(to_b, b)
    await until(lambda: listed(b, URL)["model_id"] == "m-two")
    [after] = b.fleet.find(URL)
    assert after.id == worker_id and after.labels["generation"] == "2"
    assert after.state is not before.state  # replaced: a new registration
    assert listed(a, URL)["model_id"] == "m-two"  # and A did the same
    await a.close()
    await b.close()


async def test_a_restarted_peer_learns_the_latest_spec_and_settings() -> None:
    a, _, _, _, worker_id = await registered_on_both()
    await api(a, "PUT", f"/workers/{worker_id}", {"url": URL, "model_id": "m-two"})
    await until(lambda: listed(a, URL)["model_id"] == "m-two")
    await api(a, "PATCH", f"/workers/{worker_id}", {"labels": {"zone": "west"}, "api_key": "k3"})
    await api(a, "PATCH", FLAG_PATH, {"priority": 9})  # a flag worker the new peer has too

    # A gateway that starts now hears A's periodic snapshot before its own flag worker is
    # registered: it adds the hand-registered worker as it is now, under its id and with the
    # new key from its first probe (the worker now refuses any other), and patches its flag
    # worker once that is registered.
    c, _ = await peered_gateway(network=KeyedWorkers(URL, "k3"), wait=False)
    to_c = RecordingSockets()
    assert a.peers is not None
    a.peers._sockets = to_c  # type: ignore[assignment]
    snapshot(a)
    deliver(to_c, c)
    assert not c.fleet.find(FLAG)
    await until(lambda: c.fleet.find(URL) and listed(c, FLAG)["priority"] == 9)
    [learnt] = c.fleet.find(URL)
    assert learnt.id == worker_id and learnt.model_id == "m-two"
    assert learnt.labels["zone"] == "west" and learnt.api_key == "k3"
    await a.close()
    await c.close()


class KeyedWorkers(Workers):
    """The mock network, where the worker at ``url`` answers only with ``key``."""

    def __init__(self, url: str, key: str) -> None:
        super().__init__()
        self.url, self.key = url, key

    def _control(self, request: MockRequest) -> MockResponse:
        keyed = f"Bearer {self.key}".encode()
        if request.url.startswith(self.url) and request.header(b"authorization") != keyed:
            return MockResponse(401)
        return super()._control(request)


async def test_a_setting_arriving_before_its_worker_is_applied_when_the_worker_is() -> None:
    a, to_b = await peered_gateway()
    b, _ = await peered_gateway()
    worker_id = (await api(a, "POST", "/workers", {"url": URL}))["worker_id"]
    send(a)
    posted = list(to_b.sent)
    to_b.sent.clear()
    await until(lambda: a.fleet.find(URL))
    await api(a, "PATCH", f"/workers/{worker_id}", {"labels": {"zone": "north"}})
    send(a)
    deliver(to_b, b)  # the PATCH first: B has no such worker yet, and keeps the setting
    assert not b.fleet.find(URL)
    assert b.peers is not None and b.peers.counters.settings_merged == 1
    to_b.sent[:] = posted
    deliver(to_b, b)  # then the POST: added with the setting
    await until(lambda: b.fleet.find(URL))
    assert listed(b, URL)["labels"]["zone"] == "north"
    await a.close()
    await b.close()


async def test_a_spec_arriving_during_an_addition_is_applied_once_it_ends() -> None:
    a, to_b = await peered_gateway()
    b, _ = await peered_gateway()
    worker_id = (await api(a, "POST", "/workers", {"url": URL}))["worker_id"]
    send(a)
    await until(lambda: a.fleet.find(URL))
    await api(a, "PUT", f"/workers/{worker_id}", {"url": URL, "model_id": "m-two"})
    send(a)
    deliver(to_b, b)  # B hears the POST and the PUT at once: the PUT waits for the addition
    await until(lambda: b.fleet.find(URL) and listed(b, URL)["model_id"] == "m-two")
    assert listed(b, URL)["id"] == worker_id

    # The same for a removal heard while the addition is under way.
    other = "http://w:8"
    await api(a, "POST", "/workers", {"url": other})
    send(a)
    await until(lambda: a.fleet.find(other))
    await api(a, "DELETE", "/workers/http%3A%2F%2Fw%3A8")
    send(a)
    deliver(to_b, b)
    assert b.fleet.adding(other)
    await until(lambda: not b.fleet.adding(other))
    await until(lambda: not b.fleet.find(other))
    await a.close()
    await b.close()


async def test_a_spec_waiting_for_an_addition_that_failed_is_applied_on_the_next_tick() -> None:
    a, to_b = await peered_gateway()
    network = Engines()
    network.down.add("w:9")  # B cannot reach it at first
    b, _ = await peered_gateway(network=network)
    posted = await api(a, "POST", "/workers", {"url": URL, "max_connection_attempts": 1})
    await until(lambda: a.fleet.find(URL))
    await api(a, "PUT", f"/workers/{posted['worker_id']}", {"url": URL, "model_id": "m-two"})
    send(a)
    deliver(to_b, b)  # the PUT waits for the POST's addition, which fails at its first probe
    await until(lambda: (job := b.fleet.job_status(URL)) is not None and job.status == "failed")
    network.down.clear()
    await until(lambda: b.fleet.find(URL) and listed(b, URL)["model_id"] == "m-two")
    assert listed(b, URL)["id"] == posted["worker_id"]
    await a.close()
    await b.close()


async def test_changes_made_at_once_on_two_gateways_settle_the_same_on_both() -> None:
    a, to_b, b, to_a, worker_id = await registered_on_both()
    path = f"/workers/{worker_id}"
    # Neither hears the other before both have changed the worker.
    await api(a, "PATCH", path, {"priority": 1, "labels": {"zone": "a", "from-a": "yes"}})
    await api(b, "PATCH", path, {"priority": 2, "labels": {"zone": "b"}, "cost": 3})
    send(a)
    send(b)
    sent = [s for frames in [*to_b.sent, *to_a.sent] for s in decode(frames).settings]
    deliver(to_b, b)
    deliver(to_a, a)

    def latest(field: str, key: str = "") -> object:
        made = [s for s in sent if (s.field, s.key) == (field, key)]
        return max(made, key=lambda s: (s.stamp, s.origin)).value

    on_a, on_b = listed(a, URL), listed(b, URL)
    assert on_a["labels"] == on_b["labels"] and on_a["priority"] == on_b["priority"]
    assert on_a["priority"] == latest("priority")
    assert on_a["labels"]["zone"] == latest("labels", "zone")
    assert on_a["labels"]["from-a"] == "yes" and on_a["cost"] == on_b["cost"] == 3  # both kept
    await a.close()
    await b.close()


async def test_a_put_newer_than_a_patch_replaces_it_and_a_later_patch_stays_on_top() -> None:
    a, to_b, b, to_a, worker_id = await registered_on_both()
    path = f"/workers/{worker_id}"
    await api(a, "PATCH", path, {"labels": {"zone": "a"}})  # older than B's PUT: replaced
    await api(b, "PUT", path, {"url": URL, "labels": {"generation": "2"}})
    send(a)
    send(b)
    deliver(to_b, b)
    deliver(to_a, a)
    await until(lambda: all(listed(g, URL)["labels"].get("generation") == "2" for g in (a, b)))
    assert "zone" not in listed(a, URL)["labels"] and "zone" not in listed(b, URL)["labels"]

    await api(a, "PATCH", path, {"labels": {"zone": "late"}})  # newer than the PUT: kept
    send(a)
    deliver(to_b, b)
    assert listed(b, URL)["labels"] == listed(a, URL)["labels"]
    assert listed(b, URL)["labels"]["zone"] == "late"
    await a.close()
    await b.close()


async def test_a_peers_invalid_settings_and_specs_are_counted_logged_and_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    b, _ = await peered_gateway()
    assert b.peers is not None
    stamp = time.time_ns()

    def setting(field: str, value: Any, key: str = "") -> WorkerSetting:
        return WorkerSetting(FLAG, stamp, "peer", field, key, value)

    bad_settings = [
        setting("priority", -1),
        setting("labels", 5, key="zone"),  # a label that is not a string
        setting("no_such_field", 1),
        setting("cost", 1, key="stray"),
        setting("cb_failure_threshold", 0),
    ]
    bad_specs = [
        ManualWorker("http://w:7", stamp, "peer", b"{not json"),
        ManualWorker("http://w:6", stamp, "peer", b'{"url": "ftp://w:6"}'),
        ManualWorker("http://w:5", stamp, "peer", b'{"url": "http://w:5", "priority": -3}'),
    ]
    good = setting("labels", "kept", key="rack")
    frames = encode(Batch(Hello("peer", ["m"]), [], bad_specs, [], [*bad_settings, good]))
    with caplog.at_level(logging.WARNING, "shunter.peers"):
        b.peers.receive(frames, 0.0)
        b.peers.receive(frames, 0.0)  # the same again (a snapshot): not counted twice
    assert b.peers.stats()["workers_rejected"] == len(bad_settings) + len(bad_specs)
    logged = [r for r in caplog.records if "not valid here" in r.getMessage()]
    assert len(logged) == len(bad_settings) + len(bad_specs)
    assert listed(b, FLAG)["labels"]["rack"] == "kept"  # the valid one in the batch applied
    assert listed(b, FLAG)["priority"] != -1
    assert not any(b.fleet.find(f"http://w:{port}") for port in (5, 6, 7))

    # A setting whose value is not one a setting can have is a malformed batch.
    wrong = msgspec.msgpack.encode([["peer", ["m"]], [], [], [], [[FLAG, 1, "p", "cost", "", []]]])
    b.peers.receive([PROTOCOL_VERSION.to_bytes(2, "big"), wrong], 0.0)
    assert b.peers.counters.malformed == 1
    assert (await call(b.app, "GET", "/workers")).status == 200  # still serving
    await b.close()
