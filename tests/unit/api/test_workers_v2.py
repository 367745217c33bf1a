"""Worker API v2 on the mock network: ids, both path forms, PUT/PATCH, statuses, the
``X-SMG-Routed-Worker-Id`` header and ``--remove-unhealthy-workers``."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import orjson

from shunter.api.call import Call
from shunter.api.workers import WorkersApi
from shunter.fleet.runtime import HealthConfig
from shunter.gateway import Gateway
from shunter.routing.retry import RetryConfig
from shunter.supervisor.siblings import merge_rows
from shunter.wire.mock import MockRequest, MockResponse

from support.fakes import Answer, Engines, Workers, call, gateway, ok, ready

URL = "http://w:1"
URL_PATH = "/workers/" + quote(URL, safe="")


async def get(gw: Gateway, path: str) -> Answer:
    return await call(gw.app, "GET", path, raw_path=path.encode())


async def send(gw: Gateway, method: str, path: str, body: object = None) -> Answer:
    data = b"" if body is None else orjson.dumps(body)
    return await call(gw.app, method, path, data, raw_path=path.encode())


async def until(done: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not done():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def listed(answer: Answer) -> dict[str, dict[str, object]]:
    return {str(w["url"]): w for w in answer.json()["workers"]}


async def test_a_posted_worker_is_pending_under_its_id_then_ready_under_the_same_one() -> None:
    network = Engines()
    network.down.add("w:2")  # still loading its model
    gw = gateway(network=network, worker_startup_check_interval=0.05)
    await ready(gw)
    added = await send(gw, "POST", "/workers", {"url": "http://w:2"})
    assert added.status == 202
    body = added.json()
    worker_id = body["worker_id"]
    assert uuid.UUID(worker_id).version == 4
    assert body == {
        "status": "accepted",
        "worker_id": worker_id,
        "url": "http://w:2",
        "location": f"/workers/{worker_id}",
        "message": "Worker addition queued for background processing",
    }
    assert added.header(b"location") == f"/workers/{worker_id}".encode()
    pending = (await get(gw, f"/workers/{worker_id}")).json()
    assert pending["status"] == "pending" and pending["url"] == "http://w:2"
    assert pending["job_status"]["worker_id"] == worker_id
    assert listed(await get(gw, "/workers"))["http://w:2"]["status"] == "pending"
    again = await send(gw, "POST", "/workers", {"url": "http://w:2"})
    assert again.status == 409 and worker_id in again.json()["error"]["message"]

    network.down.clear()
    await until(lambda: bool(gw.fleet.find("http://w:2")))
    ready_now = (await get(gw, f"/workers/{worker_id}")).json()
    assert ready_now["id"] == worker_id and ready_now["status"] == "ready"
    assert ready_now["is_healthy"] is True and ready_now["connection_mode"] == "http"
    duplicate = await send(gw, "POST", "/workers", {"url": "http://w:2"})
    assert duplicate.status == 409
    assert duplicate.json()["error"]["code"] == "WORKER_ALREADY_EXISTS"
    assert worker_id in duplicate.json()["error"]["message"]
    await gw.close()


async def test_the_url_form_and_the_id_form_name_the_same_worker() -> None:
    gw = gateway()
    await ready(gw)
    by_url = (await get(gw, URL_PATH)).json()
    worker_id = by_url["id"]
    assert uuid.UUID(worker_id) and worker_id != URL
    by_id = (await get(gw, f"/workers/{worker_id}")).json()
    assert by_id == by_url
    upper = (await get(gw, f"/workers/{worker_id.upper()}")).json()
    assert upper["id"] == worker_id  # a UUID's case does not matter
    item = listed(await get(gw, "/workers"))[URL]
    for key in ("id", "url", "model_id", "worker_type", "connection_mode", "runtime_type"):
        assert key in item
    assert item["labels"] == {"model_path": "m"}  # what the worker's /server_info said
    assert item["load"] == 0 and item["status"] == "ready"

    patched = await send(gw, "PATCH", f"/workers/{worker_id}", {"priority": 9})
    assert patched.status == 200 and patched.json()["queued"] is False
    old_style = await send(gw, "PUT", URL_PATH, {"labels": {"zone": "a"}})  # no url: an update
    assert old_style.status == 202 and old_style.json()["message"] == "Worker updated"
    info = (await get(gw, f"/workers/{worker_id}")).json()
    assert info["priority"] == 9 and info["labels"] == {
        "model_path": "m",
        "priority": "9",
        "zone": "a",
    }
    assert info["id"] == worker_id  # updates keep the id

    removed = await send(gw, "DELETE", f"/workers/{worker_id}")
    assert removed.status == 202 and removed.json()["queued"] is False
    assert gw.fleet.find(URL) == []
    gone = await get(gw, f"/workers/{worker_id}")
    assert gone.status == 404 and worker_id in gone.json()["error"]["message"]
    await gw.close()


async def test_unknown_and_malformed_ids_and_bad_patches_are_named() -> None:
    gw = gateway()
    await ready(gw)
    stranger = str(uuid.uuid4())
    for method in ("GET", "PATCH", "PUT", "DELETE"):
        missing = await send(gw, method, f"/workers/{stranger}", {"priority": 1})
        assert missing.status == 404, method
        error = missing.json()["error"]
        assert error["code"] == "WORKER_NOT_FOUND" and stranger in error["message"]
    for malformed in ("1234-abcd", "not-a-uuid", stranger[:-1], stranger + "0"):
        bad = await send(gw, "DELETE", f"/workers/{malformed}")
        assert bad.status == 400, malformed
        error = bad.json()["error"]
        assert error["code"] == "BAD_REQUEST" and repr(malformed) in error["message"]
    worker_id = gw.fleet.find(URL)[0].id
    path = f"/workers/{worker_id}"
    unknown = await send(gw, "PATCH", path, {"priority": 1, "colour": "blue"})
    assert unknown.status == 400 and "colour" in unknown.json()["error"]["message"]
    for field, value in (
        ("priority", "high"),
        ("health_failure_threshold", 1.5),
        ("health_check_timeout_secs", "5"),
        ("labels", ["a"]),
        ("api_key", 7),
    ):
        mistyped = await send(gw, "PATCH", path, {field: value})
        assert mistyped.status == 400, field
        assert field in mistyped.json()["error"]["message"], field
    not_object = await send(gw, "PATCH", path, [1])
    assert not_object.status == 400
    assert gw.fleet.find(URL)[0].priority == 50  # nothing half-applied
    await gw.close()


async def test_a_patched_health_setting_takes_effect_on_the_running_worker() -> None:
    """With the flags' 60 s interval the worker would stay in for a minute after it stops
    answering; PATCHed to 20 ms and one failure, it is out at once, even though its next
    check had already been scheduled a minute away."""
    network = Workers()
    gw = gateway(network=network)
    await ready(gw)
    worker_id = gw.fleet.find(URL)[0].id
    assert (await send(gw, "PATCH", f"/workers/{worker_id}", {"priority": 1})).status == 200
    await until(lambda: gw.fleet.health.next_check(URL) is not None)  # scheduled: 60 s away
    body = {"health_check_interval_secs": 0.02, "health_failure_threshold": 1}
    assert (await send(gw, "PATCH", f"/workers/{worker_id}", body)).status == 200
    network.healthy = False
    worker = gw.fleet.find(URL)[0]
    await until(lambda: not worker.state.healthy, timeout=2.0)
    info = (await get(gw, f"/workers/{worker_id}")).json()
    assert info["status"] == "not_ready" and info["is_healthy"] is False
    assert (await call(gw.app, "POST", "/v1/completions", b"{}")).status == 503
    await gw.close()


async def test_breaker_settings_posted_or_patched_apply_to_the_running_worker() -> None:
    """The flags' breaker opens after 10 failures; a worker POSTed with 2, or PATCHed to 1,
    opens after that many. Retries are off so each request is one outcome."""

    def failing(request: MockRequest) -> MockResponse:
        return MockResponse(503 if "w:2" in request.url else 200, body=b"{}")

    gw = gateway(handler=failing, retry=RetryConfig(disabled=True))
    await ready(gw)
    posted = await send(gw, "POST", "/workers", {"url": "http://w:2", "cb_failure_threshold": 2})
    assert posted.status == 202
    await until(lambda: bool(gw.fleet.find("http://w:2")))
    second = gw.fleet.find("http://w:2")[0]
    target = [(b"x-smg-target-worker", b"http://w:2")]

    async def fail_once() -> None:
        answer = await call(gw.app, "POST", "/v1/completions", b"{}", headers=target)
        assert answer.status in (503, 502)

    for _ in range(2):
        await fail_once()
    assert second.state.breaker is not None and second.state.breaker.state.label == "open"

    first = gw.fleet.find(URL)[0]
    assert first.state.breaker is not None
    assert first.state.breaker.config.failure_threshold == 10
    patched = await send(gw, "PATCH", URL_PATH, {"cb_failure_threshold": 1})
    assert patched.status == 200
    assert gw.fleet.find(URL)[0].state.breaker.config.failure_threshold == 1  # type: ignore[union-attr]
    for body in ({"cb_failure_threshold": 0}, {"cb_timeout_duration_secs": "1"}):
        refused = await send(gw, "PATCH", URL_PATH, body)
        assert refused.status == 400 and next(iter(body)) in refused.json()["error"]["message"]
    await gw.close()


async def test_put_with_a_whole_spec_replaces_the_worker_under_the_same_id() -> None:
    gw = gateway()
    await ready(gw)
    before = gw.fleet.find(URL)[0]
    assert (await send(gw, "PATCH", URL_PATH, {"labels": {"zone": "a"}})).status == 200
    spec = {"url": URL, "labels": {"rack": "r7"}, "model_id": "renamed"}
    replaced = await send(gw, "PUT", f"/workers/{before.id}", spec)
    assert replaced.status == 202
    assert replaced.json()["queued"] is True and replaced.json()["worker_id"] == before.id
    await until(lambda: gw.fleet.find(URL)[0] is not before and not gw.fleet.job_status(URL))
    after = gw.fleet.find(URL)[0]
    assert after.id == before.id
    assert after.labels["rack"] == "r7" and "zone" not in after.labels  # replaced, not merged
    assert after.model_id == "renamed" and after.backend is not before.backend
    assert before.state.removed and not after.state.removed
    assert [w["id"] for w in (await get(gw, "/workers")).json()["workers"]] == [before.id]
    answer = await call(gw.app, "POST", "/v1/completions", b'{"model": "renamed"}')
    assert answer.status == 200 and answer.header(b"x-smg-routed-worker-id") == before.id.encode()
    moved = await send(gw, "PUT", URL_PATH, {"url": "http://w:9"})
    assert moved.status == 400 and "POST the new URL" in moved.json()["error"]["message"]
    await gw.close()


async def test_the_model_filter_holds_for_rows_merged_from_sibling_processes() -> None:
    """Under --workers N the siblings send all their rows: the filter applies to them too."""
    gw = gateway()
    await ready(gw)

    async def siblings(own: list[dict[str, Any]]) -> list[dict[str, Any]]:
        other = {"url": "http://w:7", "model_id": "other", "models": ["other"], "load": 1}
        return merge_rows(own, [[*own, other]])

    api = WorkersApi(gw.fleet, lambda _name: None, merge_siblings=siblings)
    scope = {"query_string": b"model=other", "type": "http", "method": "GET", "path": "/workers"}
    answer = await _listed(api, scope)
    assert [w["url"] for w in answer["workers"]] == ["http://w:7"] and answer["total"] == 1
    scope["query_string"] = b"model=m"
    answer = await _listed(api, scope)
    assert [w["url"] for w in answer["workers"]] == [URL]
    assert answer["workers"][0]["load"] == 0  # merged with the sibling's copy of itself
    await gw.close()


async def _listed(api: WorkersApi, scope: dict[str, Any]) -> Any:
    reply = await api.list_workers(Call(scope, _no_body, "r", 0))
    assert isinstance(reply.body, bytes)
    return orjson.loads(reply.body)


async def _no_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def test_the_list_filters_by_model_and_shows_a_removed_worker_draining() -> None:
    release = asyncio.Event()

    async def held(request: MockRequest) -> MockResponse:
        await release.wait()
        return ok(request)

    gw = gateway(network=Workers(held))
    await ready(gw)
    added = await send(gw, "POST", "/workers", {"url": "http://w:2", "model_id": "other"})
    await until(lambda: bool(gw.fleet.find("http://w:2")))
    answer = await call(gw.app, "GET", "/workers", query=b"model=other")
    assert set(listed(answer)) == {"http://w:2"} and answer.json()["total"] == 1
    nobody = await call(gw.app, "GET", "/workers", query=b"model=nobody")
    assert nobody.json()["workers"] == []
    assert set(listed(await get(gw, "/workers"))) == {URL, "http://w:2"}

    request = asyncio.ensure_future(call(gw.app, "POST", "/v1/completions", b'{"model": "m"}'))
    worker = gw.fleet.find(URL)[0]
    await until(lambda: worker.state.in_flight == 1)
    assert (await send(gw, "DELETE", URL_PATH)).status == 202
    draining = listed(await get(gw, "/workers"))[URL]
    assert draining["status"] == "draining" and draining["id"] == worker.id
    assert (await get(gw, f"/workers/{worker.id}")).json()["status"] == "draining"
    assert (await send(gw, "DELETE", f"/workers/{worker.id}")).status == 404  # already removed
    release.set()
    assert (await request).status == 200
    assert set(listed(await get(gw, "/workers"))) == {"http://w:2"}
    assert added.json()["worker_id"] == gw.fleet.find("http://w:2")[0].id
    await gw.close()


async def test_every_relayed_answer_names_its_worker_streams_and_errors_too() -> None:
    def answer(request: MockRequest) -> MockResponse:
        if b'"stream": true' in (request.body or b""):
            return MockResponse(200, [(b"content-type", b"text/event-stream")], [b"data: 1\n\n"])
        if b'"refuse"' in (request.body or b""):
            return MockResponse(400, [], b'{"error": "no"}')
        return ok(request)

    gw = gateway(("http://w:1", "http://w:2"), network=Workers(answer))
    await ready(gw)
    ids = {w.id for w in gw.fleet.registry.all()}
    assert len(ids) == 2
    seen = set()
    for body in (b"{}", b"{}", b'{"stream": true}', b'{"refuse": 1}'):
        reply = await call(gw.app, "POST", "/v1/completions", body)
        named = [v for k, v in reply.headers if k == b"x-smg-routed-worker-id"]
        assert len(named) == 1, body
        seen.add(named[0].decode())
    assert seen == ids  # round robin: both workers, each by its own id
    gw.fleet.remove(URL)
    gw.fleet.remove("http://w:2")
    own_error = await call(gw.app, "POST", "/v1/completions", b"{}")
    assert own_error.status == 503 and own_error.header(b"x-smg-routed-worker-id") is None
    await gw.close()


async def test_remove_unhealthy_workers_removes_a_worker_that_fails_its_checks() -> None:
    checks = HealthConfig(interval_secs=0.02, failure_threshold=2)
    kept_network, removed_network = Workers(), Workers()
    kept = gateway(network=kept_network, health=checks)
    removing = gateway(network=removed_network, health=checks, remove_unhealthy_workers=True)
    await ready(kept)
    await ready(removing)
    worker = removing.fleet.find(URL)[0]
    kept_network.healthy = removed_network.healthy = False
    await until(lambda: not removing.fleet.find(URL))
    assert worker.state.removed
    await until(lambda: not kept.fleet.find(URL)[0].state.healthy)
    assert kept.fleet.find(URL)  # without the flag: unhealthy, still registered
    assert (await get(removing, f"/workers/{worker.id}")).status == 404
    await kept.close()
    await removing.close()
