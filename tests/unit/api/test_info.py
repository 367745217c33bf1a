"""The fleet's information routes when one worker's backend fails in an unexpected way: that
worker's part of the answer says so, the others' are there, and the answer is no 500."""

from __future__ import annotations

import orjson

from shunter.wire.mock import MockRequest, MockResponse

from support.fakes import Workers, call, gateway, ready

FAN_OUT_CALLS = ("/get_load", "/v1/loads?include=core", "/metrics", "/flush_cache")


class OneRaises(Workers):
    """Two SGLang workers; once registered, a load, metrics or flush call to ``http://bad:1``
    raises (a bug, not a network failure), and ``http://good:1`` answers."""

    def control_handler(self, request: MockRequest) -> MockResponse:
        if request.url.startswith("http://bad:1") and request.url.endswith(FAN_OUT_CALLS):
            raise RuntimeError("a bug in a control call")
        if request.url.endswith("/get_load"):
            return MockResponse(200, body=orjson.dumps([{"num_tokens": 7}]))
        if request.url.endswith("/metrics"):
            return MockResponse(200, body=b'sglang:num_running_reqs{model_name="m"} 1\n')
        return MockResponse(200, body=b"{}")


async def test_a_worker_whose_calls_raise_is_reported_as_failed_not_a_500() -> None:
    gw = gateway(("http://good:1", "http://bad:1"), network=OneRaises())
    await ready(gw)
    loads = await call(gw.app, "GET", "/get_loads")
    assert loads.status == 200
    assert {r["worker"]: r["load"] for r in loads.json()["workers"]} == {
        "http://good:1": 7,
        "http://bad:1": -1,
    }
    flushed = await call(gw.app, "POST", "/flush_cache")
    assert flushed.status == 206
    assert flushed.json()["successful"] == ["http://good:1"]
    assert [f["worker"] for f in flushed.json()["failed"]] == ["http://bad:1"]
    metrics = await call(gw.app, "GET", "/engine_metrics")
    assert metrics.status == 200 and b"http://good:1" in metrics.body
    assert b"http://bad:1" not in metrics.body
    await gw.close()
