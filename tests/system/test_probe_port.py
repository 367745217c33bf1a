"""``--health-check-port``: the probes on a port of their own, in a real gateway process (the
drain is tested in process, tests/unit/api/test_probes.py; ``--workers N`` in
test_workers_processes.py)."""

from __future__ import annotations

import socket

import httpx

from support.harness import LOOPBACK, Gateway, Proc, free_port


def test_the_probes_answer_on_their_port_and_nothing_else_does(procs: list[Proc]) -> None:
    port = free_port()
    gateway = Gateway("--health-check-port", str(port))
    procs.append(gateway)
    probes = f"http://{LOOPBACK}:{port}"
    for path in ("/health", "/liveness", "/readiness"):
        there = httpx.get(probes + path, timeout=5)
        here = httpx.get(gateway.url + path, timeout=5)
        assert (there.status_code, there.text) == (here.status_code, here.text), path
    assert httpx.get(probes + "/health", timeout=5).status_code == 200
    models = httpx.get(gateway.url + "/v1/models", timeout=5)
    assert models.status_code != 404  # a route on --port (503 here: no worker yet)
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        answer = httpx.request(method, probes + path, json={}, timeout=5)
        assert answer.status_code == 404, path
        assert answer.json()["error"]["code"] == "not_found"


def test_a_probe_port_another_program_holds_is_a_clear_error_at_start() -> None:
    with socket.socket() as other:
        other.bind((LOOPBACK, 0))
        other.listen()
        held = other.getsockname()[1]
        proc = Proc(
            [
                "serve",
                "--host",
                LOOPBACK,
                "--port",
                str(free_port()),
                "--prometheus-port",
                "0",
                "--health-check-port",
                str(held),
            ]
        )
        try:
            assert proc.popen.wait(30) == 1
            assert (
                f"cannot listen on the probes' port (--health-check-port) host={LOOPBACK} "
                f"port={held}" in proc.output()
            )
        finally:
            proc.stop()
