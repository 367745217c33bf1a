"""The Responses API's routing pieces: the affinity map's bounds, finding a response's id in
its answer, and the gateway on a mock network (DP ranks, gRPC-only)."""

from __future__ import annotations

import orjson
import pytest

from shunter.backends.http.backend import HttpBackend
from shunter.fleet.registry import WorkerRegistry
from shunter.fleet.runtime import WorkerRuntime
from shunter.fleet.worker import Worker
from shunter.observability.metrics import Metrics
from shunter.policies.factory import PolicySettings, create_policy
from shunter.policies.registry import PolicyRegistry
from shunter.protocols.errors import ApiError
from shunter.routing.affinity import ResponseAffinity
from shunter.routing.request import InferenceRequest
from shunter.routing.responses import StreamIdFinder, whole_response_id
from shunter.routing.router import Router
from shunter.wire.mock import MockRequest, MockResponse

from support.fakes import Workers, call, gateway, make_worker, ready


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_affinity_forgets_the_oldest_past_its_count() -> None:
    affinity = ResponseAffinity(max_entries=2, ttl_secs=60)
    for n in range(3):
        affinity.remember(f"resp_{n}", f"http://w:{n}")
    assert [affinity.worker_of(f"resp_{n}") for n in range(3)] == [None, "http://w:1", "http://w:2"]
    affinity.remember("resp_1", "http://w:1")  # learnt again: the newest now
    affinity.remember("resp_3", "http://w:3")
    assert affinity.worker_of("resp_2") is None and affinity.worker_of("resp_1") == "http://w:1"
    assert len(affinity) == 2 and affinity.evicted == 2


def test_the_affinity_forgets_what_is_older_than_its_ttl() -> None:
    clock = Clock()
    affinity = ResponseAffinity(max_entries=10, ttl_secs=5, clock=clock)
    affinity.remember("resp_old", "http://w:1")
    clock.now = 3.0
    affinity.remember("resp_new", "http://w:2")
    clock.now = 5.5  # the old one is past its TTL, on lookup
    assert affinity.worker_of("resp_old") is None
    assert affinity.worker_of("resp_new") == "http://w:2"
    clock.now = 9.0
    affinity.remember("resp_newest", "http://w:1")  # learning drops the expired from the front
    assert len(affinity) == 1


def test_an_affinity_of_no_entries_remembers_nothing() -> None:
    affinity = ResponseAffinity(max_entries=0)
    affinity.remember("resp_1", "http://w:1")
    assert affinity.worker_of("resp_1") is None and len(affinity) == 0


CREATED = (
    b'event: response.created\ndata: {"type":"response.created","sequence_number":0,'
    b'"response":{"id":"resp_abc","object":"response","output":[]}}\n\n'
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
    b'"delta":"hi","item_id":"msg_1"}\n\n'
)


@pytest.mark.parametrize("cut", [1, 10, 30, 60, 100, len(CREATED) - 5])
def test_the_stream_id_is_found_wherever_the_chunks_are_cut(cut: int) -> None:
    finder = StreamIdFinder()
    found = [finder.feed(CREATED[:cut]), finder.feed(CREATED[cut:])]
    assert [f for f in found if f is not None] == ["resp_abc"] and finder.done


def test_the_stream_id_in_crlf_events_and_giving_up_on_other_streams() -> None:
    finder = StreamIdFinder()
    assert finder.feed(CREATED.replace(b"\n", b"\r\n")) == "resp_abc"
    other = StreamIdFinder()
    for _ in range(StreamIdFinder.MAX_EVENTS):
        assert other.feed(b'data: {"choices": []}\n\n') is None
    assert other.done  # not a Responses stream: not looked at any further


def test_the_whole_answers_id() -> None:
    assert whole_response_id(b'{"output": [{"id": "msg_1"}], "id": "resp_x"}') == "resp_x"
    assert whole_response_id(b'{"id": 5}') is None
    assert whole_response_id(b"not json") is None


async def test_a_stored_response_of_a_dp_rank_is_asked_for_without_a_body() -> None:
    def handler(request: MockRequest) -> MockResponse:
        if request.method == "POST":
            return MockResponse(200, body=b'{"id": "resp_r", "object": "response"}')
        sent = (request.body or b"").decode()
        return MockResponse(200, body=orjson.dumps({"asked": request.url, "body": sent}))

    network = Workers(handler, dp_size=2)
    gw = gateway(network=network, dp_aware=True)
    await ready(gw, 2)
    created = await call(gw.app, "POST", "/v1/responses", b'{"input": "hi"}')
    assert created.status == 200
    for _ in range(2):  # round robin would take the other rank once
        got = await call(gw.app, "GET", "/v1/responses/resp_r")
        assert got.status == 200
        assert got.json() == {"asked": "http://w:1/v1/responses/resp_r", "body": ""}
    await gw.close()


class GrpcLike(HttpBackend):
    def serves(self, path: str) -> bool:
        return False


def test_a_fleet_of_grpc_workers_is_told_responses_need_http() -> None:
    registry = WorkerRegistry()
    plain = make_worker("grpc://w:1").backend
    assert isinstance(plain, HttpBackend)
    grpc_like = GrpcLike(plain.engine, plain._clients, plain._calls)
    state = WorkerRuntime()
    state.ready()
    registry.register(Worker("grpc://w:1", grpc_like, state, models=("m",)))
    policies = PolicyRegistry(create_policy("round_robin"), PolicySettings())
    router = Router(registry, policies, Metrics())
    request = InferenceRequest("POST", "/v1/responses", b"", [], b'{"input": "hi"}', "r1")
    request.http_only = True
    with pytest.raises(ApiError) as caught:
        router.select(request)
    assert caught.value.status == 501 and "HTTP workers only" in caught.value.message
