"""``PUT /workers/{url}`` while requests are in flight: the load stays counted, then ends.

Before the worker had a shared run-time state, an update copied the in-flight count into
a new object while the requests in flight counted down the old one: the updated worker kept
a phantom load for good, and every load-aware policy avoided it.
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote

from prometheus_client import generate_latest

from shunter.wire.asgi import Message
from shunter.wire.mock import MockRequest, MockResponse

from support.fakes import Workers, call, gateway, ok, ready

URL = "http://w:1"
PATH = "/workers/" + quote(URL, safe="")


def active_metric(text: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'smg_worker_requests_active{{worker="{URL}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no smg_worker_requests_active sample")


async def test_an_update_under_load_keeps_counting_the_requests_then_shows_none() -> None:
    release = asyncio.Event()

    async def held(request: MockRequest) -> MockResponse:
        await release.wait()
        return ok(request)

    gw = gateway(network=Workers(held))
    await ready(gw)
    requests = [
        asyncio.ensure_future(call(gw.app, "POST", "/v1/completions", b"{}")) for _ in range(3)
    ]
    await asyncio.sleep(0.01)
    before = gw.fleet.registry.get_by_url(URL)
    assert before is not None and before.state.in_flight == 3
    answer = await call(gw.app, "PUT", PATH, b'{"labels": {"zone": "b"}, "priority": 7}')
    assert answer.status == 202 and answer.json()["message"] == "Worker updated"
    listed = (await call(gw.app, "GET", "/workers")).json()["workers"][0]
    assert listed["metadata"]["zone"] == "b" and listed["priority"] == 7
    assert listed["load"] == 3  # the requests in flight are still counted
    release.set()
    assert [r.status for r in await asyncio.gather(*requests)] == [200, 200, 200]
    listed = (await call(gw.app, "GET", "/workers")).json()["workers"][0]
    assert listed["load"] == 0 and listed["processed"] == 3
    assert active_metric(generate_latest(gw.metrics.registry).decode()) == 0
    after = gw.fleet.registry.get_by_url(URL)
    assert after is not None and after is not before and after.state is before.state
    await gw.close()


async def test_an_update_refuses_fields_it_cannot_apply_and_applies_health_settings() -> None:
    gw = gateway()
    await ready(gw)
    refused = await call(gw.app, "PATCH", PATH, b'{"url": "http://elsewhere:1"}')
    assert refused.status == 400 and "unknown fields: url" in refused.json()["error"]["message"]
    moved = await call(gw.app, "PUT", PATH, b'{"url": "http://elsewhere:1"}')  # a replacement
    assert moved.status == 400 and "POST the new URL" in moved.json()["error"]["message"]
    mistyped = await call(gw.app, "PUT", PATH, b'{"health_failure_threshold": 1.5}')
    assert mistyped.status == 400
    applied = await call(
        gw.app, "PUT", PATH, b'{"health_check_interval_secs": 0.05, "health_failure_threshold": 1}'
    )
    assert applied.status == 202
    worker = gw.fleet.registry.get_by_url(URL)
    assert worker is not None and worker.health is not None
    assert worker.health.interval_secs == 0.05 and worker.health.failure_threshold == 1
    assert worker.health.timeout_secs == gw.config.health.timeout_secs  # the rest: the flags'
    await gw.close()


async def test_a_workers_own_health_settings_are_applied() -> None:
    """PUT's health fields are applied, not silently ignored: with its own 50 ms interval and
    a threshold of one, a worker that stops answering /health leaves at once, while the
    flags' interval (60 s) would have kept it for a minute."""
    network = Workers()
    gw = gateway(network=network)
    await ready(gw)
    body = b'{"health_check_interval_secs": 0.05, "health_failure_threshold": 1}'
    assert (await call(gw.app, "PUT", PATH, body)).status == 202
    network.healthy = False
    worker = gw.fleet.registry.get_by_url(URL)
    assert worker is not None
    for _ in range(100):
        if not worker.state.healthy:
            break
        await asyncio.sleep(0.01)
    assert not worker.state.healthy
    answer = await call(gw.app, "POST", "/v1/completions", b"{}")
    assert answer.status == 503
    await gw.close()


async def test_an_update_whose_worker_is_removed_while_its_body_arrives_is_404() -> None:
    gw = gateway()
    await ready(gw)
    body_asked, body_sent = asyncio.Event(), asyncio.Event()

    async def receive() -> dict[str, object]:
        body_asked.set()
        await body_sent.wait()  # a slow client: the body comes after the head
        return {"type": "http.request", "body": b'{"priority": 3}', "more_body": False}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "PUT",
        "path": "/workers/" + URL,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "headers": [(b"content-length", b"15")],
    }
    update = asyncio.ensure_future(gw.app(scope, receive, send))
    await body_asked.wait()  # the worker was there; the handler waits for the body
    gw.fleet.remove(URL)
    body_sent.set()
    await update
    assert sent[0]["status"] == 404
    await gw.close()
