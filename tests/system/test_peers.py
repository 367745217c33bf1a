"""Two gateway processes peered (--peer-port, --peer-urls): a worker added by hand on one
appears on the other, a prefix one of them placed is routed to the same worker by the
other, and a killed peer neither hurts the survivor nor stays behind once restarted. A worker
added later is given a prompt by the leader's move, on both gateways. A PUT
or PATCH on one reaches the other and a restarted one, changes made at once on both settle
the same, and a peer sending what is not valid is counted and logged, nothing more."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import msgspec
import zmq

from shunter.peers.messages import (
    PROTOCOL_VERSION,
    Batch,
    Hello,
    ManualWorker,
    WorkerSetting,
    encode,
)

from support.harness import LOOPBACK, Gateway, Proc, Sim, free_port, wait_for

SYSTEMS = [f"You are assistant number {i}. " + "Follow the house style. " * 80 for i in range(4)]


def peered(port: int, peer: int, workers: list[str], *extra: str) -> Gateway:
    return Gateway(
        "--policy",
        "cache_aware",
        "--peer-port",
        str(port),
        "--peer-urls",
        f"127.0.0.1:{peer}",
        *extra,
        workers=workers,
    )


def two_peered(
    procs: list[Proc], name: str, count: int
) -> tuple[list[Sim], Sim, Gateway, Gateway, tuple[int, int]]:
    """``count`` sims, a spare one (not registered), two gateways peered over the sims, and
    the gateways' peer ports."""
    sims = [Sim(f"{name}-{i}") for i in range(count)]
    spare = Sim(f"{name}-extra")
    procs += [*sims, spare]
    port_a, port_b = free_port(), free_port()
    urls = [s.url for s in sims]
    a = peered(port_a, port_b, urls)
    procs.append(a)
    b = peered(port_b, port_a, urls)
    procs.append(b)
    return sims, spare, a, b, (port_a, port_b)


def peer_stats(gateway: Gateway) -> dict[str, Any]:
    data = httpx.get(gateway.url + "/dashboard/data", timeout=5).json()
    return data["peers"]  # type: ignore[no-any-return]


def worker_of(gateway: Gateway, system: str, user: str) -> str:
    body = {
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": 2,
    }
    response = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.headers["x-worker-id"]


def test_two_peered_gateways_share_workers_and_placements(procs: list[Proc]) -> None:
    sims, extra, a, b, (port_a, port_b) = two_peered(procs, "peer", 3)
    urls = [s.url for s in sims]

    # A worker registered by hand on A is registered on B too.
    added = httpx.post(a.url + "/workers", json={"url": extra.url}, timeout=5)
    assert added.status_code == 202
    b.wait_workers(4)

    # Each prefix A placed, B routes to the same worker (asked in the reverse order, so
    # that B placing them on its own would not land them the same way).
    homes = {i: worker_of(a, system, "first question") for i, system in enumerate(SYSTEMS)}
    wait_for(lambda: peer_stats(b)["decisions_applied"] >= len(SYSTEMS), what="decisions")
    for i in reversed(range(len(SYSTEMS))):
        assert worker_of(b, SYSTEMS[i], "second question") == homes[i], i

    # A dies: B keeps serving, every request answered.
    a.kill()
    for i, system in enumerate(SYSTEMS):
        assert worker_of(b, system, "while A is down") == homes[i]

    # Back, A learns the hand-registered worker from B's snapshot (it was started with the
    # three flag workers only), and hears B's decisions again.
    restarted = Gateway(
        "--policy",
        "cache_aware",
        "--peer-port",
        str(port_a),
        "--peer-urls",
        f"127.0.0.1:{port_b}",
        workers=urls,
    )
    procs.append(restarted)
    restarted.wait_workers(4)
    wait_for(lambda: bool(peer_stats(restarted)["peers"]), what="B heard")
    fresh = "You are a new assistant. " + "Answer briefly. " * 80
    home = worker_of(b, fresh, "after the restart")
    wait_for(lambda: peer_stats(restarted)["decisions_applied"] >= 1, what="catch-up")
    assert worker_of(restarted, fresh, "on A") == home


def test_a_worker_added_later_is_handed_a_prompt_and_both_gateways_follow(
    procs: list[Proc],
) -> None:
    """Four prompts over two workers (2 and 2); a third worker joins. The leader moves one
    prompt to it (2 against 0 is worth a move, 2 against 1 is not), and both gateways send
    that prompt there from then on."""
    _, joiner, a, b, _ = two_peered(procs, "move", 2)
    before = {i: worker_of(a, system, "first question") for i, system in enumerate(SYSTEMS)}
    assert sorted(list(before.values()).count(w) for w in set(before.values())) == [2, 2]
    assert httpx.post(a.url + "/workers", json={"url": joiner.url}, timeout=5).status_code == 202
    b.wait_workers(3)
    a.wait_workers(3)

    def moves() -> int:
        return sum(peer_stats(g)["moves_sent"] for g in (a, b))

    wait_for(lambda: moves() >= 1, timeout=10, what="a move")
    time.sleep(0.5)  # the move reaches the other gateway within milliseconds
    after_a = {i: worker_of(a, system, "again on A") for i, system in enumerate(SYSTEMS)}
    after_b = {i: worker_of(b, system, "again on B") for i, system in enumerate(SYSTEMS)}
    assert after_a == after_b
    assert list(after_a.values()).count("move-extra") == 1  # the sims answer with their name
    assert sum(1 for i in before if before[i] != after_a[i]) == 1
    time.sleep(2.5)  # two more plans: 2/1/1 stays as it is
    assert moves() == 1


def row(gateway: Gateway, worker_id: str) -> dict[str, Any]:
    """``worker_id``'s row in the gateway's ``/workers`` (empty while it has none)."""
    return next((w for w in gateway.workers() if w["id"] == worker_id), {})


def labels(gateway: Gateway, worker_id: str) -> dict[str, str]:
    return row(gateway, worker_id).get("labels", {})  # type: ignore[no-any-return]


def test_put_and_patch_reach_the_peer_a_restarted_peer_and_settle_the_same(
    procs: list[Proc],
) -> None:
    sims = [Sim(f"upd-{i}") for i in range(2)]
    extra = Sim("upd-extra")
    procs += [*sims, extra]
    port_a, port_b, broken_port = free_port(), free_port(), free_port()
    urls = [s.url for s in sims]
    # A broken peer B listens to: a ZeroMQ PUB of the test's own.
    context = zmq.Context()
    broken = context.socket(zmq.PUB)
    broken.setsockopt(zmq.LINGER, 0)
    broken.bind(f"tcp://{LOOPBACK}:{broken_port}")
    a = Gateway("--peer-port", str(port_a), "--peer-urls", f"{LOOPBACK}:{port_b}", workers=urls)
    procs.append(a)
    b_args = (
        "--peer-port",
        str(port_b),
        "--peer-urls",
        f"{LOOPBACK}:{port_a}",
        f"{LOOPBACK}:{broken_port}",
    )
    b = Gateway(*b_args, workers=urls)
    procs.append(b)
    added = httpx.post(a.url + "/workers", json={"url": extra.url}, timeout=5)
    assert added.status_code == 202, added.text
    worker_id = added.json()["worker_id"]
    path = f"/workers/{worker_id}"
    wait_for(lambda: row(b, worker_id).get("status") == "ready", what="B adding it")

    # A PATCH on A: B's /workers shows it.
    patch = {"labels": {"zone": "east"}, "priority": 5}
    assert httpx.patch(a.url + path, json=patch, timeout=5).status_code == 200
    wait_for(lambda: labels(b, worker_id).get("zone") == "east", what="the PATCH on B")
    assert row(b, worker_id)["priority"] == 5

    # A whole-spec PUT on A: B replaces the worker under the same id (its labels are the
    # new spec's: a PATCH adds labels, a replacement starts from the spec).
    spec = {"url": extra.url, "labels": {"generation": "2"}, "cost": 4}
    assert httpx.put(a.url + path, json=spec, timeout=5).status_code == 202
    wait_for(lambda: labels(b, worker_id).get("generation") == "2", what="the PUT on B")
    assert "zone" not in labels(b, worker_id) and row(b, worker_id)["cost"] == 4
    assert "replacing a worker" in b.output() and "worker replaced" in b.output()

    # B is down while A's worker is patched again: B restarted (with its flag workers
    # only) learns the worker as it is now from A's snapshot, under its id.
    b.kill()
    again = {"labels": {"zone": "west"}}
    assert httpx.patch(a.url + path, json=again, timeout=5).status_code == 200
    b = Gateway(*b_args, workers=urls)
    procs.append(b)
    wait_for(lambda: labels(b, worker_id).get("zone") == "west", 20, "the restarted B")
    assert labels(b, worker_id) == labels(a, worker_id)
    assert labels(b, worker_id)["generation"] == "2"
    assert row(b, worker_id)["cost"] == 4 and row(b, worker_id)["status"] == "ready"

    # The same settings changed on A and B at once settle on the same answer on both.
    def agree() -> bool:
        on_a, on_b = row(a, worker_id), row(b, worker_id)
        keys = ("labels", "priority", "cost")
        return "owner" in on_a["labels"] and all(on_a[k] == on_b[k] for k in keys)

    with ThreadPoolExecutor(2) as pool:
        patched = [
            pool.submit(httpx.patch, g.url + path, json=body, timeout=5)
            for g, body in (
                (a, {"labels": {"owner": "a"}, "priority": 1}),
                (b, {"labels": {"owner": "b"}, "priority": 2, "cost": 6}),
            )
        ]
    assert [p.result().status_code for p in patched] == [200, 200]
    wait_for(agree, what="A and B agreeing")
    heard = peer_stats(a)["batches_received"], peer_stats(b)["batches_received"]
    wait_for(  # two snapshots each way later, still the same
        lambda: (
            peer_stats(a)["batches_received"] >= heard[0] + 2
            and peer_stats(b)["batches_received"] >= heard[1] + 2
        ),
        what="snapshots",
    )
    assert agree() and row(a, worker_id)["cost"] == 6

    # What a broken peer sends is counted and logged; B keeps serving.
    stamp = time.time_ns()
    nowhere = f"http://{LOOPBACK}:9"
    bad = encode(
        Batch(
            Hello("broken", ["sim-model"]),
            workers=[ManualWorker(nowhere, stamp, "broken", b'{"url": "ftp://nowhere"}')],
            settings=[WorkerSetting(nowhere, stamp + 1, "broken", "priority", "", -1)],
        )
    )
    wrong_type = msgspec.msgpack.encode([["broken", ["sim-model"]], [], [], [], [[1, 2]]])
    malformed = [PROTOCOL_VERSION.to_bytes(2, "big"), wrong_type]

    def refused() -> bool:
        broken.send_multipart(bad)  # again until B is connected: counted once all the same
        broken.send_multipart(malformed)
        stats = peer_stats(b)
        return bool(stats["workers_rejected"] >= 2 and stats["malformed"] >= 1)

    wait_for(refused, what="the broken peer's batches counted")
    time.sleep(0.2)
    assert peer_stats(b)["workers_rejected"] == 2
    out = b.output()
    assert "a peer's worker is not valid here" in out
    assert "a peer's worker setting is not valid here" in out
    assert worker_of(b, SYSTEMS[0], "still serving")
    assert row(b, worker_id)["priority"] == row(a, worker_id)["priority"]
    broken.close()
    context.term()


def test_peers_with_a_shared_secret_talk_and_one_with_another_is_shut_out(
    procs: list[Proc], tmp_path: Path
) -> None:
    """--peer-secret-file: A and B share a secret and a hand-registered worker; C, with
    another secret and subscribed to A, never learns it, and both sides count the refused
    handshakes (the dashboard's ``peers``)."""
    sim, extra = Sim("secure-0"), Sim("secure-extra")
    procs += [sim, extra]
    shared, other = tmp_path / "shared", tmp_path / "other"
    shared.write_text("a secret the two gateways share\n")
    other.write_text("a secret of some other gateway\n")
    port_a, port_b, port_c = free_port(), free_port(), free_port()
    a = Gateway(
        "--peer-port",
        str(port_a),
        "--peer-urls",
        f"127.0.0.1:{port_b}",
        "--peer-secret-file",
        str(shared),
        workers=[sim.url],
    )
    procs.append(a)
    b = peered(port_b, port_a, [sim.url], "--peer-secret-file", str(shared))
    procs.append(b)
    c = peered(port_c, port_a, [sim.url], "--peer-secret-file", str(other))
    procs.append(c)

    added = httpx.post(a.url + "/workers", json={"url": extra.url}, timeout=5)
    assert added.status_code == 202
    b.wait_workers(2)
    wait_for(lambda: peer_stats(c)["handshake_failures"] >= 1, what="C's refused handshake")
    wait_for(lambda: peer_stats(a)["handshake_failures"] >= 1, what="A's refused handshake")
    time.sleep(2.5)  # a snapshot (every 2 s) would have reached C by now
    assert [w["url"] for w in c.workers()] == [sim.url]
    assert peer_stats(c)["batches_received"] == 0
