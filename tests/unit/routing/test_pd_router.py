"""The PD router, through a whole PD gateway on a mock network that plays SGLang's
bootstrap protocol: a prefill worker holds its answer until the decode worker of its room
has connected, as a real one holds the KV cache until it is fetched."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from prometheus_client import generate_latest

from shunter.fleet.worker import Worker
from shunter.gateway import Gateway
from shunter.routing.retry import RetryConfig
from shunter.wire.mock import MockRequest, MockResponse, UpstreamError

from support.fakes import Answer, Workers, call, pd_gateway, ready

PREFILLS = ("http://p1:1", "http://p2:1")
DECODES = ("http://d1:1", "http://d2:1")
NO_RETRIES = RetryConfig(disabled=True)
FAST_RETRIES = RetryConfig(initial_backoff_ms=1, max_backoff_ms=1)
JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream")]
PREFILL_LOGPROBS = [[-0.5, 11, None], [-0.25, 12, None]]
DECODE_LOGPROBS = [[-0.125, 13, None]]
Leg = Callable[[MockRequest, dict[str, Any]], Awaitable[MockResponse]]


def base_of(request: MockRequest) -> str:
    return "/".join(request.url.split("/", 3)[:3])


class PdFleet(Workers):
    """Prefill and decode workers on one mock network, handing over as SGLang's do: the
    decode connects to its room and waits for the cache; the prefill waits for its decode to
    connect, "sends" the cache and answers; the decode then answers (streams when asked).
    Tests replace ``prefill`` or ``decode`` to play a failing leg."""

    def __init__(self) -> None:
        super().__init__(self._answer)
        self.connected: dict[int, asyncio.Event] = {}  # room -> its decode has arrived
        self.sent_cache: dict[int, asyncio.Event] = {}  # room -> its prefill sent the cache
        self.sent: list[tuple[str, dict[str, Any]]] = []  # (base URL, body), in order
        self.cancelled: list[str] = []  # base URLs whose request was cancelled, in order
        self.prefill: Leg = self.holding_prefill
        self.decode: Leg = self.answering_decode

    @staticmethod
    def event(events: dict[int, asyncio.Event], room: int) -> asyncio.Event:
        return events.setdefault(room, asyncio.Event())

    async def _answer(self, request: MockRequest) -> MockResponse:
        if request.method == "GET":  # the generation check
            return MockResponse(200, JSON, b"{}")
        base = base_of(request)
        body = orjson.loads(request.body or b"{}")
        self.sent.append((base, body))
        leg = self.prefill if base in PREFILLS else self.decode
        try:
            return await leg(request, body)
        except asyncio.CancelledError:
            self.cancelled.append(base)
            raise

    async def holding_prefill(self, request: MockRequest, body: dict[str, Any]) -> MockResponse:
        rooms = body["bootstrap_room"]
        first = rooms[0] if isinstance(rooms, list) else rooms
        await self.event(self.connected, first).wait()
        self.event(self.sent_cache, first).set()
        meta = {"input_token_logprobs": PREFILL_LOGPROBS}
        if body.get("stream"):
            return MockResponse(200, SSE, [b"data: " + orjson.dumps({"meta_info": meta}) + b"\n\n"])
        return MockResponse(200, JSON, orjson.dumps({"text": "", "meta_info": meta}))

    async def answering_decode(self, request: MockRequest, body: dict[str, Any]) -> MockResponse:
        rooms = body["bootstrap_room"]
        first = rooms[0] if isinstance(rooms, list) else rooms
        self.event(self.connected, first).set()
        await self.event(self.sent_cache, first).wait()
        meta = {"input_token_logprobs": DECODE_LOGPROBS}
        if body.get("stream"):
            events = [
                b"data: " + orjson.dumps({"text": t, "meta_info": meta}) + b"\n\n"
                for t in ("hel", "hello")
            ]
            # One event split over two chunks: a merge must wait for its end.
            return MockResponse(
                200, SSE, [events[0][:9], events[0][9:], events[1], b"data: [DONE]\n\n"]
            )
        return MockResponse(200, JSON, orjson.dumps({"text": "hello", "meta_info": meta}))

    def bodies(self, base: str) -> list[dict[str, Any]]:
        return [body for url, body in self.sent if url == base]

    async def until_cancelled(self, count: int) -> None:
        for _ in range(500):
            if len(self.cancelled) >= count:
                return
            await asyncio.sleep(0.002)
        raise AssertionError(f"only {self.cancelled} were cancelled")


async def pd(fleet: PdFleet, **settings: Any) -> Gateway:
    gw = pd_gateway(PREFILLS, DECODES, fleet, **settings)
    await ready(gw, len(PREFILLS) + len(DECODES))
    return gw


def in_flight(gw: Gateway) -> list[int]:
    return [w.state.in_flight for w in gw.fleet.registry.all()]


async def settled(gw: Gateway) -> None:
    """Wait until every worker's in-flight count is back to 0."""
    for _ in range(500):
        if not any(in_flight(gw)):
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"still in flight: {in_flight(gw)}")


async def generate(gw: Gateway, payload: dict[str, Any], path: str = "/generate") -> Answer:
    return await call(gw.app, "POST", path, orjson.dumps(payload))


async def test_both_legs_get_the_same_bootstrap_fields_and_the_client_gets_the_decode() -> None:
    fleet = PdFleet()
    gw = await pd(fleet)
    answer = await generate(gw, {"text": "hi", "bootstrap_room": 7, "extra": [1]})
    assert answer.status == 200 and answer.json()["text"] == "hello"
    (prefill,), (decode,) = fleet.bodies("http://p1:1"), fleet.bodies("http://d1:1")
    assert prefill == decode  # the same request on both legs
    assert prefill["bootstrap_host"] == "p1" and prefill["bootstrap_port"] == 8998
    room = prefill["bootstrap_room"]
    assert room != 7 and 0 <= room < 2**63  # the client's room replaced by a fresh one
    assert prefill["text"] == "hi" and prefill["extra"] == [1]
    ids = {r.header(b"x-request-id") for r in fleet.requests("http://p1:1")}
    assert ids == {r.header(b"x-request-id") for r in fleet.requests("http://d1:1")}
    await settled(gw)
    await gw.close()


async def test_a_pair_counts_one_routed_request_and_a_selection_on_each_leg() -> None:
    fleet = PdFleet()
    gw = await pd(fleet)
    for _ in range(2):
        assert (await generate(gw, {"text": "hi"})).status == 200
    await settled(gw)
    exposed = generate_latest(gw.metrics.registry).decode()
    await gw.close()
    routed = (
        'smg_router_requests_total{backend_type="pd",connection_mode="HTTP",endpoint="/generate",'
        'model="m",router_type="http",streaming="false"} 2.0'
    )
    assert routed in exposed
    for kind in ("prefill", "decode"):
        selected = (
            f'smg_worker_selection_total{{connection_mode="HTTP",model="m",'
            f'policy="round_robin",worker_type="{kind}"}} 2.0'
        )
        assert selected in exposed


async def test_legs_follow_their_own_round_robin_and_rooms_are_fresh_per_request() -> None:
    fleet = PdFleet()
    gw = await pd(fleet)
    for _ in range(4):
        assert (await generate(gw, {"text": "hi"})).status == 200
    # Each leg's policy advanced once per request: every pair combination is used in turn.
    assert [len(fleet.bodies(url)) for url in (*PREFILLS, *DECODES)] == [2, 2, 2, 2]
    rooms = [body["bootstrap_room"] for url, body in fleet.sent if url in DECODES]
    assert len(set(rooms)) == 4
    await gw.close()


async def test_a_batch_gets_arrays_with_one_room_per_sequence() -> None:
    fleet = PdFleet()
    gw = await pd(fleet)
    answer = await generate(gw, {"text": ["a", "b"], "sampling_params": {"n": 2}})
    assert answer.status == 200
    (body,) = fleet.bodies("http://d1:1")
    assert body["bootstrap_host"] == ["p1"] * 4 and body["bootstrap_port"] == [8998] * 4
    assert len(set(body["bootstrap_room"])) == 4
    await gw.close()


async def test_a_prefill_error_ends_the_request_at_once_and_cancels_the_decode() -> None:
    fleet = PdFleet()

    async def refusing(request: MockRequest, body: dict[str, Any]) -> MockResponse:
        await asyncio.sleep(0.01)  # the decode is waiting by now
        error = {"error": {"message": "the prompt is longer than the context"}}
        return MockResponse(400, JSON, orjson.dumps(error))

    async def waiting(request: MockRequest, body: dict[str, Any]) -> MockResponse:
        await asyncio.Event().wait()  # a decode waiting for a cache that will never come
        raise AssertionError("unreachable")

    fleet.prefill, fleet.decode = refusing, waiting
    gw = await pd(fleet)
    started = time.perf_counter()
    answer = await generate(gw, {"text": "hi"}, "/v1/completions")
    assert time.perf_counter() - started < 1.0
    assert answer.status == 400
    error = answer.json()["error"]
    assert error["code"] == "prefill_bad_request"
    assert error["message"] == (
        "the prefill worker answered 400: the prompt is longer than the context"
    )
    assert "p1" not in answer.body.decode()  # the worker's address stays in the log
    assert fleet.cancelled == ["http://d1:1"]
    await settled(gw)
    exposed = generate_latest(gw.metrics.registry).decode()
    failure = 'smg_pd_bootstrap_failures_total{leg="prefill",model="m",reason="status_400"} 1.0'
    assert failure in exposed
    await gw.close()


async def test_an_unreachable_prefill_is_retried_on_a_new_pair_with_new_rooms() -> None:
    fleet = PdFleet()
    holding = fleet.holding_prefill

    async def p1_down(request: MockRequest, body: dict[str, Any]) -> MockResponse:
        if base_of(request) == "http://p1:1":
            raise UpstreamError("connect", "refused")
        return await holding(request, body)

    fleet.prefill = p1_down
    gw = await pd(fleet, retry=FAST_RETRIES)
    answer = await generate(gw, {"text": "hi"})
    assert answer.status == 200
    first, second = (body for url, body in fleet.sent if url in DECODES)
    assert first["bootstrap_room"] != second["bootstrap_room"]
    assert second["bootstrap_host"] == "p2"
    assert fleet.cancelled == ["http://d1:1"]  # the first attempt's decode
    await settled(gw)
    await gw.close()


async def test_the_last_prefill_failure_is_a_prefill_error_and_names_no_worker() -> None:
    fleet = PdFleet()

    async def down(request: MockRequest, body: dict[str, Any]) -> MockResponse:
        raise UpstreamError("connect", "refused by http://p1:1")

    fleet.prefill = down
    gw = await pd(fleet, retry=NO_RETRIES)
    answer = await generate(gw, {"text": "hi"})
    assert answer.status == 502
    assert answer.json()["error"] == {
        "message": "the prefill worker failed: the worker could not be reached",
        "type": "Bad Gateway",
        "code": "prefill_unavailable",
    }
    await settled(gw)
    await gw.close()


async def test_a_decode_failure_cancels_the_prefill_and_the_pair_is_retried() -> None:
    fleet = PdFleet()
    answering = fleet.answering_decode

    async def d1_busy(request: MockRequest, body: dict[str, Any]) -> MockResponse:
        if base_of(request) == "http://d1:1":
            return MockResponse(503, JSON, b'{"error": "overloaded"}')
        return await answering(request, body)

    fleet.decode = d1_busy
    gw = await pd(fleet, retry=FAST_RETRIES)
    answer = await generate(gw, {"text": "hi"})
    assert answer.status == 200 and answer.json()["text"] == "hello"
    await fleet.until_cancelled(1)
    assert fleet.cancelled == ["http://p1:1"]  # its prefill waited for a decode that left
    assert [url for url, _ in fleet.sent if url in DECODES] == ["http://d1:1", "http://d2:1"]
    await settled(gw)
    await gw.close()


async def test_a_stream_is_relayed_from_the_decode() -> None:
    fleet = PdFleet()
    gw = await pd(fleet)
    answer = await generate(gw, {"text": "hi", "stream": True})
    assert answer.status == 200
    assert answer.body.endswith(b"data: [DONE]\n\n")
    assert answer.body.count(b'"text"') == 2
    assert b"input_token_logprobs" in answer.body
    assert b"-0.5" not in answer.body  # no logprobs asked for: nothing merged
    await settled(gw)
    await gw.close()


async def test_input_logprobs_are_the_prefills_then_the_decodes_whole_and_streamed() -> None:
    fleet = PdFleet()
    gw = await pd(fleet)
    whole = await generate(gw, {"text": "hi", "return_logprob": True})
    merged = PREFILL_LOGPROBS + DECODE_LOGPROBS
    assert whole.json()["meta_info"]["input_token_logprobs"] == merged
    streamed = await generate(gw, {"text": "hi", "return_logprob": True, "stream": True})
    events = [e for e in streamed.body.split(b"\n\n") if e.startswith(b"data: {")]
    assert len(events) == 2
    for event in events:
        assert orjson.loads(event[6:])["meta_info"]["input_token_logprobs"] == merged
    assert streamed.body.endswith(b"data: [DONE]\n\n")
    await settled(gw)
    await gw.close()


async def test_a_client_that_leaves_cancels_the_prefill_then_the_decode() -> None:
    fleet = PdFleet()

    async def waiting(request: MockRequest, body: dict[str, Any]) -> MockResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    fleet.prefill = fleet.decode = waiting
    gw = await pd(fleet)
    request = asyncio.ensure_future(generate(gw, {"text": "hi", "stream": True}))
    while len(fleet.sent) < 2:
        await asyncio.sleep(0.001)
    request.cancel()
    await fleet.until_cancelled(2)
    assert fleet.cancelled == ["http://p1:1", "http://d1:1"]
    await settled(gw)
    await gw.close()


async def test_a_model_with_no_decode_worker_says_what_to_add() -> None:
    fleet = PdFleet()
    gw = pd_gateway(PREFILLS, (), fleet)
    await ready(gw, len(PREFILLS))
    answer = await generate(gw, {"text": "hi"})
    assert answer.status == 503
    error = answer.json()["error"]
    assert error["code"] == "no_decode_workers"
    assert '"worker_type": "decode"' in error["message"] and "--decode URL" in error["message"]
    readiness = await call(gw.app, "GET", "/readiness")
    assert readiness.status == 503 and readiness.json()["reason"] == "no healthy decode worker"
    await gw.close()


async def test_endpoints_pairs_do_not_serve_are_refused() -> None:
    fleet = PdFleet()
    gw = await pd(fleet)
    answer = await call(gw.app, "POST", "/v1/embeddings", b'{"input": "x"}')
    assert answer.status == 501 and answer.json()["error"]["code"] == "not_implemented"
    assert fleet.sent == []
    await gw.close()


async def test_readiness_and_the_generation_check_need_a_pair() -> None:
    fleet = PdFleet()
    gw = await pd(fleet)
    readiness = await call(gw.app, "GET", "/readiness")
    assert readiness.status == 200
    assert readiness.json()["healthy_prefill_workers"] == 2
    assert readiness.json()["healthy_decode_workers"] == 2
    check = await call(gw.app, "GET", "/health_generate")
    assert check.status == 200
    assert (check.json()["prefill"], check.json()["decode"]) == ("http://p1:1", "http://d1:1")
    for worker in workers_of(gw, PREFILLS):
        worker.state.retired()  # out of routing, as a worker being removed
    readiness = await call(gw.app, "GET", "/readiness")
    assert readiness.status == 503 and readiness.json()["reason"] == "no healthy prefill worker"
    check = await call(gw.app, "GET", "/health_generate")
    assert check.status == 503 and check.json()["error"]["code"] == "no_available_workers"
    await gw.close()


def workers_of(gw: Gateway, urls: tuple[str, ...]) -> list[Worker]:
    return [w for w in gw.fleet.registry.all() if w.url in urls]


class VllmFleet(PdFleet):
    """vLLM workers with a NIXL connector: the prefill answers one token and where its
    cache is; the decode needs those parameters."""

    PARAMS = {"do_remote_prefill": True, "remote_engine_id": "e1", "remote_block_ids": [1, 2]}

    def __init__(self) -> None:
        super().__init__()
        self.prefill, self.decode = self.vllm_prefill, self.vllm_decode

    def _control(self, request: MockRequest) -> MockResponse:
        if request.url.endswith(("/server_info", "/get_server_info")):
            return MockResponse(404)
        if request.url.endswith("/v1/models"):
            return MockResponse(200, JSON, b'{"data": [{"id": "m", "owned_by": "vllm"}]}')
        return super()._control(request)

    async def vllm_prefill(self, request: MockRequest, body: dict[str, Any]) -> MockResponse:
        answer = {"choices": [{"text": "x"}], "kv_transfer_params": self.PARAMS}
        return MockResponse(200, JSON, orjson.dumps(answer))

    async def vllm_decode(self, request: MockRequest, body: dict[str, Any]) -> MockResponse:
        if body.get("kv_transfer_params") != self.PARAMS:
            return MockResponse(400, JSON, b'{"error": "no cache to pull"}')
        if body.get("stream"):
            return MockResponse(200, SSE, [b'data: {"choices": []}\n\n', b"data: [DONE]\n\n"])
        return MockResponse(200, JSON, b'{"choices": [{"text": "hello"}]}')


async def test_vllm_pairs_run_the_prefill_then_the_decode_with_its_transfer_params() -> None:
    fleet = VllmFleet()
    gw = await pd(fleet)
    client = {
        "prompt": "hi",
        "max_tokens": 50,
        "max_completion_tokens": 50,
        "min_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    answer = await generate(gw, client, "/v1/completions")
    assert answer.status == 200 and answer.body.endswith(b"data: [DONE]\n\n")
    (prefill,), (decode,) = fleet.bodies("http://p1:1"), fleet.bodies("http://d1:1")
    assert prefill == {
        "prompt": "hi",
        "max_tokens": 1,
        "max_completion_tokens": 1,
        "stream": False,
        "n": 1,
        "kv_transfer_params": {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
        },
    }
    assert decode == {**client, "kv_transfer_params": VllmFleet.PARAMS}
    assert "bootstrap_room" not in decode
    # n > 1: vLLM's connectors hand over one sequence's cache, so the decode runs alone.
    answer = await generate(gw, {"prompt": "hi", "n": 2}, "/v1/completions")
    assert answer.status == 400  # this decode needs a cache it was not given
    assert len(fleet.bodies("http://p2:1")) == 0
    await settled(gw)
    await gw.close()


async def test_a_vllm_prefill_without_transfer_params_is_a_clear_502() -> None:
    fleet = VllmFleet()

    async def unconfigured(request: MockRequest, body: dict[str, Any]) -> MockResponse:
        return MockResponse(200, JSON, b'{"choices": [{"text": "x"}]}')

    fleet.prefill = unconfigured
    gw = await pd(fleet)
    answer = await generate(gw, {"prompt": "hi"}, "/v1/completions")
    assert answer.status == 502
    assert answer.json()["error"]["code"] == "prefill_bad_gateway"
    assert "kv_transfer_params" in answer.json()["error"]["message"]
    assert fleet.bodies("http://d1:1") == []
    await gw.close()


class AloneFleet(VllmFleet):
    """vLLM pairs whose decode workers serve a request without a transfer whole."""

    async def vllm_decode(self, request: MockRequest, body: dict[str, Any]) -> MockResponse:
        if "kv_transfer_params" not in body:
            return MockResponse(200, JSON, b'{"text": "alone"}')
        return await super().vllm_decode(request, body)


async def test_short_prompts_go_to_the_decode_worker_alone_under_the_skip_rule() -> None:
    fleet = AloneFleet()
    gw = await pd(fleet, pd_min_prefill_tokens=10, policy="cache_aware")
    short = await generate(gw, {"prompt": "a" * 36}, "/v1/completions")  # 9 tokens (4 chars each)
    assert short.json() == {"text": "alone"}
    assert not any(url in PREFILLS for url, _ in fleet.sent)
    long = "b" * 400  # 100 tokens: disaggregated
    answer = await generate(gw, {"prompt": long}, "/v1/completions")
    assert answer.json() == {"choices": [{"text": "hello"}]}
    decode_url = fleet.sent[-1][0]
    assert decode_url in DECODES and "kv_transfer_params" in fleet.sent[-1][1]
    # The same prompt again, plus a short tail: the decode worker that served it (as the
    # cache_aware decode policy remembers) holds all but a few tokens, so it runs alone.
    again = await generate(gw, {"prompt": long + "tail"}, "/v1/completions")
    assert again.json() == {"text": "alone"}
    assert fleet.sent[-1][0] == decode_url
    assert sum(1 for url, _ in fleet.sent if url in PREFILLS) == 1
    await settled(gw)
    await gw.close()


async def test_token_ids_count_exactly_for_the_skip_rule() -> None:
    fleet = AloneFleet()
    gw = await pd(fleet, pd_min_prefill_tokens=3)
    assert (await generate(gw, {"prompt": [1, 2]}, "/v1/completions")).json() == {"text": "alone"}
    long = await generate(gw, {"prompt": [1, 2, 3]}, "/v1/completions")
    assert long.json() == {"choices": [{"text": "hello"}]}
    await gw.close()


async def test_sglang_decode_workers_are_never_sent_a_request_alone() -> None:
    fleet = PdFleet()  # an SGLang decode worker waits for a room: it cannot run one alone
    gw = await pd(fleet, pd_min_prefill_tokens=1000)
    assert (await generate(gw, {"text": "short"})).json()["text"] == "hello"
    assert len(fleet.bodies("http://p1:1")) == 1
    await gw.close()


def receipt(answer: Answer) -> dict[str, str]:
    value = answer.header(b"x-shunter-route")
    assert value is not None
    return dict(part.split("=", 1) for part in value.decode("latin-1").split("; "))


async def test_a_pairs_receipt_names_both_legs_and_a_lone_decode_names_one() -> None:
    fleet = AloneFleet()
    gw = await pd(fleet, pd_min_prefill_tokens=10, policy="cache_aware", route_receipt=True)
    pair = await generate(gw, {"prompt": "b" * 400}, "/v1/completions")
    prefill_url = next(url for url, _ in fleet.sent if url in PREFILLS)
    assert receipt(pair) == {
        "worker": fleet.sent[-1][0],
        "policy": "cache_aware",
        "reason": "new_prefix",
        "predicted_cached": "0",
        "prefill": prefill_url,
        "prefill_policy": "cache_aware",
        "prefill_reason": "new_prefix",
        "prefill_predicted_cached": "0",
    }
    alone = await generate(gw, {"prompt": "a" * 36}, "/v1/completions")
    assert alone.json() == {"text": "alone"}
    assert set(receipt(alone)) == {"worker", "policy", "reason", "predicted_cached"}
    await settled(gw)
    await gw.close()


async def test_an_sglang_pair_has_a_receipt_only_when_asked_for() -> None:
    fleet = PdFleet()
    gw = await pd(fleet, route_receipt=True)
    answer = await generate(gw, {"text": "hi"})
    assert receipt(answer) == {
        "worker": "http://d1:1",
        "policy": "round_robin",
        "reason": "round_robin",
        "prefill": "http://p1:1",
        "prefill_policy": "round_robin",
        "prefill_reason": "round_robin",
    }
    await settled(gw)
    await gw.close()
    quiet = await pd(PdFleet())
    assert (await generate(quiet, {"text": "hi"})).header(b"x-shunter-route") is None
    await settled(quiet)
    await quiet.close()
