"""--health-check-port: the probes on a listener of their own, from start to shutdown (the
real server on real sockets; the workers on the mock network)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from shunter import run
from shunter.config import ConfigError, GatewayConfig
from shunter.gateway import Gateway

from support.fakes import gateway
from support.harness import LOOPBACK, free_port


async def until(predicate, what: str, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    """Await ``await predicate()`` turning true, polling every 10 ms."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.01)


async def test_the_probes_answer_on_their_port_until_the_gateway_has_drained(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(run, "_tune_gc", lambda: None)  # not this test process's collector
    data_port, probe_port = free_port(), free_port()
    # Grace 2 s: a settle window of 1 s, during which /readiness answers "draining".
    gw: Gateway = gateway(
        host=LOOPBACK, port=data_port, health_check_port=probe_port, shutdown_grace_secs=2.0
    )
    stop = asyncio.Event()
    serving = asyncio.create_task(run.serve(gw, stop))
    probes = f"http://{LOOPBACK}:{probe_port}"
    data = f"http://{LOOPBACK}:{data_port}"
    async with httpx.AsyncClient(timeout=5) as client:

        async def ready() -> bool:
            try:
                return (await client.get(probes + "/readiness")).status_code == 200
            except httpx.TransportError:  # not listening yet
                return False

        await until(ready, "readiness on the probe port")
        for path in ("/health", "/liveness"):
            assert (await client.get(probes + path)).status_code == 200
        assert (await client.head(probes + "/health")).status_code == 200
        missing = await client.get(probes + "/v1/models")
        assert missing.status_code == 404
        assert "only the probes" in missing.json()["error"]["message"]
        assert (await client.post(probes + "/v1/completions", json={})).status_code == 404
        assert (await client.get(data + "/v1/models")).status_code == 200  # there, it is served

        stop.set()
        await until(lambda: asyncio.sleep(0, gw.draining), "the drain to start")
        readiness = await client.get(probes + "/readiness")
        assert readiness.status_code == 503
        assert readiness.json() == {"status": "not ready", "reason": "draining"}
        assert (await client.get(probes + "/liveness")).status_code == 200
        await asyncio.wait_for(serving, 10)
        with pytest.raises(httpx.ConnectError):  # closed with the gateway
            await client.get(probes + "/health")


@pytest.mark.parametrize(
    ("flags", "other"),
    [
        ({"port": 30000}, "--port"),
        ({"prometheus_port": 29000}, "--prometheus-port"),
        ({"peer_port": 31000}, "--peer-port"),
    ],
)
def test_a_probe_port_shared_with_another_listener_is_refused(
    flags: dict[str, int], other: str
) -> None:
    port = next(iter(flags.values()))
    with pytest.raises(ConfigError, match=f"--health-check-port {port} is also {other}"):
        GatewayConfig(health_check_port=port, **flags).validate()  # type: ignore[arg-type]


def test_the_probe_port_must_be_a_port() -> None:
    with pytest.raises(ConfigError, match="--health-check-port must be between 1 and 65535"):
        GatewayConfig(health_check_port=70000).validate()
