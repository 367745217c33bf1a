"""``shunter serve --workers 2``: two gateway processes on one port, under a supervisor.

Which process served a request is read from the access log: each child's lines carry
``gateway_process=<slot>``, and the clients send their own ``x-request-id``.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import threading
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import httpx

from support.harness import LOOPBACK, Gateway, Proc, Sim, free_port, wait_for

REQUESTS = 40


def served_by(gateway: Gateway, request_id: str) -> int | None:
    """The slot whose access log has ``request_id``, once it is logged."""
    found = re.search(
        rf"request_id={re.escape(request_id)} .*gateway_process=(\d+)", gateway.output()
    )
    return None if found is None else int(found.group(1))


def wait_served_by(gateway: Gateway, request_id: str) -> int:
    wait_for(lambda: served_by(gateway, request_id) is not None, what=f"{request_id} logged")
    slot = served_by(gateway, request_id)
    assert slot is not None
    return slot


def child_pids(gateway: Gateway) -> dict[int, list[int]]:
    """Each slot's children, in the order the supervisor started them."""
    pids: dict[int, list[int]] = {}
    for index, pid in re.findall(
        r"gateway process started index=(\d+) pid=(\d+)", gateway.output()
    ):
        pids.setdefault(int(index), []).append(int(pid))
    return pids


def logged(gateway: Gateway, pattern: str) -> int:
    """How many lines of the gateway's log (supervisor and children) match ``pattern``."""
    return len(re.findall(pattern, gateway.output(), re.M))


def serving(gateway: Gateway, sims: list[Sim], slot: int, incarnation: int = 1) -> bool:
    """Whether the ``incarnation``-th process of ``slot`` listens with every sim registered."""
    tag = rf"gateway_process={slot}$"
    return logged(gateway, rf"gateway listening .*{tag}") >= incarnation and all(
        logged(gateway, rf"worker registered url={re.escape(s.url)} .*{tag}") >= incarnation
        for s in sims
    )


def start(procs: list[Proc], *extra: str) -> tuple[Gateway, list[Sim]]:
    sims = [Sim(f"mp-{name}", "--itl-ms", "1") for name in "ab"]
    procs += sims
    gateway = Gateway(
        "--workers", "2", "--policy", "round_robin", *extra, workers=[s.url for s in sims]
    )
    procs.append(gateway)
    wait_for(lambda: serving(gateway, sims, 0) and serving(gateway, sims, 1), what="both serving")
    return gateway, sims


def complete(client: httpx.Client, request_id: str) -> httpx.Response:
    return client.post(
        "/v1/completions",
        json={"prompt": "hello", "max_tokens": 2},
        headers={"x-request-id": request_id},
    )


def gone(pid: int) -> bool:
    """Exited (a zombie left for its new parent to reap counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_two_processes_share_the_port_merge_their_metrics_and_drain_on_sigterm(
    procs: list[Proc],
) -> None:
    probe_port = free_port()
    gateway, _sims = start(procs, "--health-check-port", str(probe_port))
    for n in range(REQUESTS):  # a new connection each: the kernel picks a process for each
        with gateway.client() as client:
            assert complete(client, f"spread-{n}").status_code == 200
    slots = Counter(wait_served_by(gateway, f"spread-{n}") for n in range(REQUESTS))
    assert set(slots) == {0, 1}, slots
    # The probes' port too: every process listens there, each answering for itself.
    probes = f"http://{LOOPBACK}:{probe_port}/readiness"
    for n in range(REQUESTS):
        ready = httpx.get(probes, headers={"x-request-id": f"probe-{n}"}, timeout=5)
        assert ready.status_code == 200, ready.text
    slots = Counter(wait_served_by(gateway, f"probe-{n}") for n in range(REQUESTS))
    assert set(slots) == {0, 1}, slots

    def completions() -> float:
        for line in httpx.get(gateway.metrics_url, timeout=5).text.splitlines():
            if line.startswith('smg_http_requests_total{method="POST",path="/v1/completions"'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    wait_for(lambda: completions() == REQUESTS, what="the merged count")  # both processes'
    metrics = httpx.get(gateway.metrics_url, timeout=5).text
    assert re.search(r'smg_worker_cb_state\{process="0",worker=', metrics)  # per process
    assert re.search(r'smg_worker_cb_state\{process="1",worker=', metrics)

    # /workers counts the whole gateway's requests whichever process answers it.
    answered: dict[int, int] = {}
    for n in range(40):
        request_id = f"listing-{n}"
        with gateway.client() as client:
            listing = client.get("/workers", headers={"x-request-id": request_id}).json()
        answered[wait_served_by(gateway, request_id)] = sum(
            w["processed"] for w in listing["workers"]
        )
        if len(answered) == 2:
            break
    assert answered == {0: REQUESTS, 1: REQUESTS}

    children = [pids[0] for pids in child_pids(gateway).values()]
    gateway.popen.send_signal(signal.SIGTERM)
    assert gateway.popen.wait(15) == 0
    out = gateway.output()
    for index in range(2):
        assert re.search(rf"shutting down .*gateway_process={index}$", out, re.M)  # drained
        assert f"gateway process exited index={index} pid={children[index]} exit_code=0" in out
    assert all(gone(pid) for pid in children)


def test_a_killed_process_is_restarted_and_no_request_to_the_survivor_fails(
    procs: list[Proc],
) -> None:
    gateway, sims = start(procs)
    # Kept-alive clients, each on one connection, so on one process: until both have some.
    clients: dict[int, list[httpx.Client]] = {0: [], 1: []}
    for n in range(40):
        if min(len(c) for c in clients.values()) >= 2:
            break
        client = httpx.Client(base_url=gateway.url, timeout=15)
        assert complete(client, f"first-{n}").status_code == 200
        clients[wait_served_by(gateway, f"first-{n}")].append(client)
    assert min(len(c) for c in clients.values()) >= 2
    victim, survivor = 0, 1
    old_pid = child_pids(gateway)[victim][0]
    stop = threading.Event()
    outcomes: dict[int, Counter[str]] = {victim: Counter(), survivor: Counter()}
    lock = threading.Lock()

    def load(slot: int, client: httpx.Client, name: str) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                ok = complete(client, f"{name}-{n}").status_code == 200
            except httpx.HTTPError:
                ok = False
            with lock:
                outcomes[slot]["ok" if ok else "failed"] += 1

    threads = [
        threading.Thread(target=load, args=(slot, client, f"load{slot}.{i}"))
        for slot, group in clients.items()
        for i, client in enumerate(group)
    ]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: outcomes[survivor]["ok"] >= 20, what="load on the survivor")
        os.kill(old_pid, signal.SIGKILL)  # a crash
        wait_for(lambda: len(child_pids(gateway)[victim]) == 2, what="the restart")
        new_pid = child_pids(gateway)[victim][1]
        wait_for(lambda: serving(gateway, sims, victim, 2), what="the restarted one serving")
        at_restart = outcomes[survivor]["ok"]
        wait_for(lambda: outcomes[survivor]["ok"] >= at_restart + 20, what="more load")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert outcomes[survivor]["failed"] == 0, outcomes
    assert re.search(
        rf"gateway process exited unexpectedly; restarting it index={victim} pid={old_pid} "
        r"exit_code=-9 .*backoff_secs=0.5",
        gateway.output(),
    )
    # New connections reach both processes again, the restarted one included.
    slots: Counter[int] = Counter()
    for n in range(REQUESTS):
        with gateway.client() as client:
            assert complete(client, f"after-{n}").status_code == 200
    slots = Counter(wait_served_by(gateway, f"after-{n}") for n in range(REQUESTS))
    assert set(slots) == {0, 1}, slots
    # The supervisor dies: its children follow (they drain on the SIGTERM the kernel sends).
    gateway.kill()
    wait_for(lambda: gone(new_pid) and gone(child_pids(gateway)[survivor][0]), what="orphans exit")
    for group in clients.values():
        for client in group:
            client.close()


def test_a_port_another_program_holds_is_a_clear_error_at_start() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        proc = Proc(["serve", "--workers", "2", "--host", "127.0.0.1", "--port", str(port)])
        try:
            assert proc.popen.wait(30) == 1
            assert re.search(
                rf"cannot listen on the gateway's port host=127.0.0.1 port={port} "
                "error=Address already in use",
                proc.output(),
            )
            assert "gateway process started" not in proc.output()  # no child was tried
        finally:
            proc.stop()


def test_a_worker_added_through_one_process_is_known_to_every_process(
    procs: list[Proc],
) -> None:
    gateway, _ = start(procs)
    extra = Sim("mp-extra", "--itl-ms", "1")
    procs.append(extra)
    added = httpx.post(gateway.url + "/workers", json={"url": extra.url}, timeout=10)
    assert added.status_code == 202, added.text

    worker_id = added.json()["worker_id"]
    asked = itertools.count()

    def slots_listing_it() -> set[int]:
        """The slots that answered a GET /workers/{id} with the new worker ready, over fresh
        connections (the kernel spreads them over both processes): each process registered
        it under the id the first one gave it."""
        slots = set()
        for _ in range(16):
            request_id = f"list-{next(asked)}"  # each once: the log is searched for it
            with httpx.Client(base_url=gateway.url, timeout=5) as client:
                found = client.get(f"/workers/{worker_id}", headers={"x-request-id": request_id})
            if found.status_code == 200 and found.json()["status"] == "ready":
                assert found.json()["url"] == extra.url
                slots.add(wait_served_by(gateway, request_id))
        return slots

    # The peer exchange between the children carries the hand-added worker to both.
    wait_for(lambda: slots_listing_it() == {0, 1}, 20, "both processes listing the worker")


def test_a_patch_through_one_process_is_seen_by_every_process(procs: list[Proc]) -> None:
    """A PATCH lands on one process; the peer exchange carries it to the other, so that
    GET /workers/{id} shows it whichever process answers. The worker is a --worker-urls
    one, which every process holds (a POSTed one is shared the same way)."""
    gateway, sims = start(procs)
    url = sims[0].url
    [worker_id] = [w["id"] for w in gateway.workers() if w["url"] == url]
    change = {"labels": {"zone": "patched"}, "priority": 4, "cb_failure_threshold": 7}
    patched = httpx.patch(f"{gateway.url}/workers/{quote(url, safe='')}", json=change, timeout=10)
    assert patched.status_code == 200, patched.text
    assert patched.json()["worker_id"] == worker_id
    asked = itertools.count()

    def slots_showing_it() -> set[int]:
        slots = set()
        for _ in range(16):
            request_id = f"patched-{next(asked)}"
            with httpx.Client(base_url=gateway.url, timeout=5) as client:
                found = client.get(f"/workers/{worker_id}", headers={"x-request-id": request_id})
            info = found.json()
            if info["labels"].get("zone") == "patched" and info["priority"] == 4:
                slots.add(wait_served_by(gateway, request_id))
        return slots

    wait_for(lambda: slots_showing_it() == {0, 1}, 20, "both processes showing the PATCH")
    assert logged(gateway, r"updated a worker as a peer did .*gateway_process=[01]$") == 1


def test_a_probe_port_another_program_holds_is_a_clear_error_at_start() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        held = other.getsockname()[1]
        proc = Proc(
            [
                "serve",
                "--workers",
                "2",
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
                "--health-check-port",
                str(held),
            ]
        )
        try:
            assert proc.popen.wait(30) == 1
            assert re.search(
                rf"cannot listen on the probes' port host=127.0.0.1 port={held} "
                "error=Address already in use",
                proc.output(),
            )
            assert "gateway process started" not in proc.output()  # no child was tried
        finally:
            proc.stop()
