"""What a worker receives of a client's headers, as the sim recorded it: the allow-list by
default, plus the names given with ``--forward-headers``, on every route the gateway
forwards (streamed or whole)."""

from __future__ import annotations

import itertools
from typing import Any

import httpx

from support.harness import Gateway, Proc, Sim

_ids = itertools.count()

# A browser session, another service's key, a proxy's credential, a tenant tag, and what a
# traced client sends: only some of it may reach a worker.
CLIENT = {
    "cookie": "session=secret",
    "x-api-key": "sk-other-service",
    "proxy-authorization": "Basic cHJveHk=",
    "x-tenant": "acme",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "x-correlation-id": "corr-1",
    "x-request-id-foo": "foo-1",
    "user-agent": "curious-client/1.0",
}
ALWAYS = {"traceparent", "x-correlation-id", "x-request-id-foo", "content-type", "accept"}
NEVER = {"cookie", "proxy-authorization", "user-agent", "accept-encoding"}
REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2}}),
    ("/v1/embeddings", {"input": "hi"}),
]


def received(gateway: Gateway, sim: Sim) -> list[dict[str, list[str]]]:
    """The headers the sim received for each of ``REQUESTS`` sent through ``gateway``."""
    seen = []
    for path, body in REQUESTS:
        request_id = f"fwd-{next(_ids)}"
        headers = {"x-request-id": request_id, **CLIENT}  # first: the id the gateway takes
        answer = httpx.post(gateway.url + path, json=body, headers=headers, timeout=15)
        assert answer.status_code == 200, answer.text
        records = sim.requests()
        mine = [r for r in records if r["headers"].get("x-request-id") == [request_id]]
        assert len(mine) == 1, (path, records[-2:])
        seen.append(mine[0]["headers"])
    return seen


def test_a_worker_receives_the_allow_list_and_the_named_headers(procs: list[Proc]) -> None:
    sim = Sim("sim-hdr")
    procs.append(sim)
    plain = Gateway(workers=[sim.url])
    procs.append(plain)
    for headers in received(plain, sim):
        assert headers.keys() >= ALWAYS
        assert not (NEVER | {"x-api-key", "x-tenant"}) & headers.keys()
        assert len(headers["x-request-id"]) == 1  # the one, the gateway's (the client's here)
    named = Gateway("--forward-headers", "X-Api-Key", "x-tenant", workers=[sim.url])
    procs.append(named)
    for headers in received(named, sim):
        assert ALWAYS | {"x-api-key", "x-tenant"} <= headers.keys()
        assert not NEVER & headers.keys()
        assert headers["x-api-key"] == ["sk-other-service"]
