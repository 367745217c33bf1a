"""The route receipt through a whole gateway on a mock network: the header (only when
asked for, well formed, never on the gateway's own errors), the route span's attributes,
the precision histogram, and cache_aware's correction fed by the workers' answers."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest

from shunter.observability.tracing import Tracing
from shunter.policies.cache_aware import CacheAwarePolicy
from shunter.routing.retry import RetryConfig
from shunter.wire.mock import MockRequest, MockResponse, UpstreamError

from support.fakes import call, gateway, ready

URLS = ("http://w:1", "http://w:2")
SYSTEM = "You are a careful assistant. " * 40
JSON = [(b"content-type", b"application/json")]


def chat(question: str, stream: bool = False) -> bytes:
    body: dict[str, object] = {
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def usage(cached: int, prompt: int = 300) -> dict[str, object]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": 1,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class Engine:
    """Workers whose answers report ``cached`` tokens (whole, or as a stream's usage)."""

    def __init__(self, cached: int = 0) -> None:
        self.cached = cached
        self.delay = 0.0  # seconds the next answer waits

    async def __call__(self, request: MockRequest) -> MockResponse:
        if self.delay:
            delay, self.delay = self.delay, 0.0
            await asyncio.sleep(delay)
        figures = usage(self.cached)
        if b'"stream":true' in (request.body or b""):
            chunks = [
                b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n',
                b"data: " + orjson.dumps({"choices": [], "usage": figures}) + b"\n\n",
                b"data: [DONE]\n\n",
            ]
            return MockResponse(200, [(b"content-type", b"text/event-stream")], chunks)
        return MockResponse(200, JSON, orjson.dumps({"choices": [], "usage": figures}))


def fields(value: bytes) -> dict[str, str]:
    """The receipt's ``key=value; ...`` fields; fails on anything malformed."""
    pairs = [part.split("=", 1) for part in value.decode("latin-1").split("; ")]
    assert all(len(pair) == 2 and pair[0] and pair[1] for pair in pairs), value
    return dict((k, v) for k, v in pairs)


async def test_no_receipt_unless_asked_for() -> None:
    gw = gateway(URLS, handler=Engine())
    await ready(gw)
    answer = await call(gw.app, "POST", "/v1/chat/completions", chat("q"))
    assert answer.status == 200 and answer.header(b"x-shunter-route") is None
    await gw.close()


async def test_the_receipt_names_the_worker_the_policy_and_its_reason() -> None:
    gw = gateway(URLS, handler=Engine(), route_receipt=True)
    await ready(gw)
    answer = await call(gw.app, "POST", "/v1/chat/completions", chat("q"))
    receipt = fields(answer.header(b"x-shunter-route") or b"")
    assert receipt["worker"] in URLS
    assert (
        receipt["worker"] == (answer.header(b"x-worker-id") or receipt["worker"].encode()).decode()
    )
    assert receipt["policy"] == "round_robin" and receipt["reason"] == "round_robin"
    assert "predicted_cached" not in receipt  # round robin predicts nothing
    await gw.close()


async def test_cache_aware_receipts_predict_what_the_matched_worker_holds() -> None:
    gw = gateway(URLS, handler=Engine(), policy="cache_aware", route_receipt=True)
    await ready(gw, 2)
    first = fields(
        (await call(gw.app, "POST", "/v1/chat/completions", chat("one"))).header(b"x-shunter-route")
        or b""
    )
    second = fields(
        (await call(gw.app, "POST", "/v1/chat/completions", chat("two"))).header(b"x-shunter-route")
        or b""
    )
    assert (first["reason"], first["predicted_cached"]) == ("new_prefix", "0")
    assert second["reason"] == "prefix_match" and second["worker"] == first["worker"]
    # The first answer counted 300 prompt tokens for its text (the system prompt, a
    # separator and "one"): the prediction turns the matched characters into tokens so.
    ratio = (len(SYSTEM) + 1 + len("one")) / 300
    assert policy_of(gw).chars_per_token["m"] == ratio
    assert int(second["predicted_cached"]) == int((len(SYSTEM) + 1) / ratio)
    await gw.close()


async def test_a_relayed_worker_error_carries_the_receipt_the_gateways_own_do_not() -> None:
    def handler(request: MockRequest) -> MockResponse:
        if request.url.startswith("http://w:1"):
            return MockResponse(400, JSON, b'{"error": {"message": "bad"}}')
        raise UpstreamError("connect", "refused")

    gw = gateway(URLS, handler=handler, route_receipt=True, retry=RetryConfig(disabled=True))
    await ready(gw, 2)
    answers = [await call(gw.app, "POST", "/v1/chat/completions", chat("q")) for _ in range(2)]
    by_status = {a.status: a for a in answers}
    assert set(by_status) == {400, 502}
    assert fields(by_status[400].header(b"x-shunter-route") or b"")["worker"] == "http://w:1"
    assert by_status[502].header(b"x-shunter-route") is None  # names no worker
    await gw.close()


async def test_the_receipt_is_on_a_stream_too() -> None:
    gw = gateway(URLS, handler=Engine(), policy="cache_aware", route_receipt=True)
    await ready(gw, 2)
    answer = await call(gw.app, "POST", "/v1/chat/completions", chat("q", stream=True))
    assert answer.status == 200 and b"[DONE]" in answer.body
    assert fields(answer.header(b"x-shunter-route") or b"")["reason"] == "new_prefix"
    await gw.close()


# --- the precision histogram -------------------------------------------------------------------


async def test_precision_is_the_distance_from_the_prediction_for_whole_answers_and_streams() -> (
    None
):
    engine = Engine(cached=40)
    gw = gateway(URLS, handler=engine, policy="cache_aware")
    await ready(gw, 2)
    await call(gw.app, "POST", "/v1/chat/completions", chat("one"))  # predicted 0
    engine.cached = 250
    await call(gw.app, "POST", "/v1/chat/completions", chat("two", stream=True))
    # The second follows the first's match, at the first answer's characters per token.
    predicted = int((len(SYSTEM) + 1) / ((len(SYSTEM) + 1 + len("one")) / 300))
    under = gw.metrics.precision[("m", "cache_aware", "under")]  # 40 over a prediction of 0
    over = gw.metrics.precision[("m", "cache_aware", "over")]  # 250 under ~290
    assert (under.count, under.total) == (1, 40)
    assert (over.count, over.total) == (1, predicted - 250)
    scraped = generate_latest(gw.metrics.registry).decode()
    labels = 'direction="over",model="m",policy="cache_aware"'
    assert f"shunter_routing_precision_count{{{labels}}} 1.0" in scraped
    bucket = (
        'shunter_routing_precision_bucket{direction="over",le="%s",model="m",policy="cache_aware"}'
    )
    assert bucket % "16.0" + " 0.0" in scraped and bucket % "64.0" + " 1.0" in scraped
    await gw.close()


async def test_a_policy_that_predicts_nothing_is_not_measured() -> None:
    gw = gateway(URLS, handler=Engine(cached=40))
    await ready(gw, 2)
    await call(gw.app, "POST", "/v1/chat/completions", chat("one"))
    assert gw.metrics.precision == {}
    await gw.close()


async def test_an_answer_without_cached_tokens_is_not_measured() -> None:
    gw = gateway(
        URLS, handler=lambda r: MockResponse(200, JSON, b'{"choices": []}'), policy="cache_aware"
    )
    await ready(gw, 2)
    assert (await call(gw.app, "POST", "/v1/chat/completions", chat("one"))).status == 200
    assert gw.metrics.precision == {}
    await gw.close()


# --- tracing -------------------------------------------------------------------------------------


async def test_the_route_span_carries_the_receipt_and_the_actual_cached_tokens() -> None:
    exporter = InMemorySpanExporter()
    gw = gateway(URLS, handler=Engine(cached=40), policy="cache_aware")
    gw.router.tracing = Tracing("unused", exporter=exporter)
    await ready(gw, 2)
    await call(gw.app, "POST", "/v1/chat/completions", chat("one", stream=True))
    route = next(s for s in exporter.get_finished_spans() if s.name == "route")
    attributes = dict(route.attributes or {})
    assert attributes["shunter.route.worker"] in URLS
    assert attributes["shunter.route.policy"] == "cache_aware"
    assert attributes["shunter.route.reason"] == "new_prefix"
    assert attributes["shunter.route.predicted_cached"] == 0
    assert attributes["shunter.route.actual_cached"] == 40
    await gw.close()
    gw.router.tracing.shutdown()


# --- the self-correction, fed by the answers -----------------------------------------------------


def policy_of(gw: object) -> CacheAwarePolicy:
    policy = gw.router.policies.policy_for("m")  # type: ignore[attr-defined]
    assert isinstance(policy, CacheAwarePolicy)
    return policy


SHORT = "Be brief. " * 20  # 200 characters
DOCUMENT = "a long document the user pasted " * 40


def talk(user: str) -> bytes:
    return orjson.dumps(
        {"messages": [{"role": "system", "content": SHORT}, {"role": "user", "content": user}]}
    )


async def route_after_an_eviction(gw: object, engine: Engine) -> list[dict[str, str]]:
    """A document, then a short chat on the same worker whose answer shows the worker
    kept nothing, then the document's follow-up: the three receipts."""
    app = gw.app  # type: ignore[attr-defined]
    engine.delay = 0.2  # the document's request takes long: its prefix is not "just routed"
    receipts = []
    for user in (DOCUMENT, "hello there " * 10, DOCUMENT + "next question"):
        answer = await call(app, "POST", "/v1/chat/completions", talk(user))
        receipts.append(fields(answer.header(b"x-shunter-route") or b""))
    return receipts


async def test_an_answer_showing_an_eviction_unpins_what_the_worker_lost() -> None:
    engine = Engine(cached=0)  # the worker keeps nothing: every prefix is evicted at once
    gw = gateway(URLS, handler=engine, policy="cache_aware", route_receipt=True)
    await ready(gw, 2)
    document, chat, follow_up = await route_after_an_eviction(gw, engine)
    assert chat["reason"] == "prefix_match" and chat["worker"] == document["worker"]
    # It answered 0 cached of ~50 predicted (and the follow-up may correct once more, if
    # placed where the short prompt is still recorded).
    assert policy_of(gw).corrections >= 1
    assert follow_up["reason"] == "new_prefix"  # not pulled back by the lost document
    await gw.close()


async def test_without_the_correction_the_stale_entry_keeps_its_pull() -> None:
    from shunter.policies.cache_aware import CacheAwareConfig
    from shunter.policies.factory import PolicySettings

    engine = Engine(cached=0)
    settings = PolicySettings(cache_aware=CacheAwareConfig(self_correct=False))
    gw = gateway(
        URLS, handler=engine, policy="cache_aware", route_receipt=True, policy_settings=settings
    )
    await ready(gw, 2)
    document, _, follow_up = await route_after_an_eviction(gw, engine)
    assert follow_up["reason"] == "prefix_match" and follow_up["worker"] == document["worker"]
    assert policy_of(gw).corrections == 0
    await gw.close()


def test_the_receipt_is_opt_in_and_the_correction_opt_out_on_the_command_line() -> None:
    from shunter.cli import serve_config

    default = serve_config([])
    assert not default.route_receipt and default.policy_settings.cache_aware.self_correct
    chosen = serve_config(["--route-receipt", "--no-cache-self-correction"])
    assert chosen.route_receipt and not chosen.policy_settings.cache_aware.self_correct


async def test_a_policy_that_fails_to_learn_does_not_break_the_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from shunter.fleet.registry import Workers as Fleet
    from shunter.fleet.worker import Worker
    from shunter.policies.base import Policy, RouteRequest

    class Clumsy(Policy):
        name = "clumsy"
        learns_from_cache = True

        def select(self, workers: Fleet, request: RouteRequest) -> Worker | None:
            return workers[0]

        def on_cached(self, *args: object) -> None:
            raise RuntimeError("oops")

    gw = gateway(URLS, handler=Engine(cached=5))
    await ready(gw, 2)
    gw.router.policies.default = Clumsy()
    gw.router.policies.by_model.clear()
    answer = await call(gw.app, "POST", "/v1/chat/completions", chat("q"))
    assert answer.status == 200 and answer.json()["usage"]["prompt_tokens"] == 300
    assert "policy failed to learn from an answer" in caplog.text
    await gw.close()
